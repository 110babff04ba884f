"""The asyncio client: the same flow, awaited."""

from __future__ import annotations

import asyncio

import pytest

import keygate
from conftest import KEYS, Broker


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


def test_async_approval_wait_goes_on_through_a_broker_restart(tmp_path):
    # As the sync client's test: a broker of its own, restarted while the
    # client awaits the approval.
    b = Broker(tmp_path)

    async def main() -> None:
        pem = b.register("py-async-restart-agent")
        async with keygate.AsyncAgent("py-async-restart-agent", key_pem=pem, server=b.url) as agent:
            async with agent.task("python async: across a restart", ttl=600) as task:
                pending = await task.request("payments-ca", ttl=300, justification="restart")
                assert isinstance(pending, keygate.PendingApproval)
                waiting = asyncio.create_task(task.wait_for_approval(pending, timeout=60))
                await asyncio.sleep(0.5)
                await asyncio.to_thread(b.restart)
                assert not waiting.done(), "the client gave up while the broker restarted"
                await asyncio.to_thread(lambda: b.decide_when_pending("payments-ca", "approve", delay=0).join())
                cred = await waiting
                assert cred.scope == "payments-ca" and "certificate" in cred

    try:
        asyncio.run(main())
    finally:
        b.stop()
