"""The asyncio client: the same flow, awaited."""

from __future__ import annotations

import asyncio

import pytest

import keygate
from conftest import KEYS


def test_async_flow_with_approval_and_delegation(broker):
    async def main() -> None:
        async with keygate.AsyncAgent("demo-agent", key_file=KEYS / "demo-agent.pem",
                                      server=broker.url, dpop=True) as agent, \
                keygate.AsyncAgent("demo-subagent", key_file=KEYS / "demo-subagent.pem",
                                   server=broker.url) as sub:
            async with agent.task("python async: report", ttl=600) as task:
                assert task.token_type == "DPoP"
                a, b = await asyncio.gather(task.credential("x509-svid"), task.credential("x509-svid"))
                assert a.lease_id != b.lease_id
                approver = broker.decide_when_pending("payments-ca", "approve")
                paid = await task.credential("payments-ca", ttl=300, justification="async",
                                             approval_timeout=60)
                approver.join()
                assert "certificate" in paid
                with pytest.raises(keygate.NotRenewable):
                    await task.renew(a, 60)
            assert {l["state"] for l in broker.leases(task.task_id)} == {"revoked"}
            plain = await keygate.AsyncAgent("demo-agent", key_file=KEYS / "demo-agent.pem",
                                             server=broker.url).task("python async: parent")
            child = await plain.delegate(sub, ["x509-svid"])
            await child.credential("x509-svid")
            await plain.complete()
            with pytest.raises(keygate.InvalidToken):
                await child.credential("x509-svid")

    asyncio.run(main())
