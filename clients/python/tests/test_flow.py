"""The agent's flow against the real broker: open, obtain, release,
complete (by leaving the block, on any path), delegation, DPoP, approvals."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from cryptography import x509

import keygate
from conftest import KEYS, Broker


def lease_states(broker: Broker, task_id: str) -> dict:
    return {l["id"]: l["state"] for l in broker.leases(task_id)}


def token_refused(broker: Broker, task: keygate.Task) -> bool:
    resp = httpx.get(
        f"{broker.url}/v1/session",
        headers={"Authorization": f"Bearer {task.token.reveal()}"},
    )
    return resp.status_code == 401


def test_leaving_the_block_completes_the_task_and_revokes_everything(broker, agent_factory):
    agent = agent_factory()
    with agent.task("python: nightly report", ttl=600) as task:
        assert task.task_id.startswith("tk_")
        assert task.session()["agent"] == "demo-agent"
        svid = task.credential("x509-svid", ttl=300)
        cert = x509.load_pem_x509_certificate(svid["certificate"].encode())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://example.org/agent/demo-agent"
        ]
        assert svid.scope == "x509-svid" and svid.lease_id.startswith("ls_")
        assert svid.expires_at is not None
        jwt = task.credential("jwt-svid", params={"audience": "https://api.example.org"})
        released = task.release(jwt)
        assert released.state == "revoked"
    assert task.complete().state == "completed"
    assert set(lease_states(broker, task.task_id).values()) == {"revoked"}
    assert token_refused(broker, task)


def test_an_exception_in_the_block_still_completes_the_task(broker, agent_factory):
    agent = agent_factory()
    with pytest.raises(RuntimeError, match="the tool failed"):
        with agent.task("python: crashes mid-task") as task:
            task.credential("x509-svid")
            raise RuntimeError("the tool failed")
    assert set(lease_states(broker, task.task_id).values()) == {"revoked"}
    assert token_refused(broker, task)


def test_a_sensitive_scope_waits_for_approval_then_is_redeemed(broker, agent_factory):
    agent = agent_factory()
    with agent.task("python: pay the invoices", ttl=600) as task:
        approver = broker.decide_when_pending("payments-ca", "approve")
        cred = task.credential("payments-ca", ttl=300, justification="month-end run", approval_timeout=60)
        approver.join()
        assert cred.scope == "payments-ca" and "certificate" in cred


def test_a_denied_approval_raises_approval_denied(broker, agent_factory):
    agent = agent_factory()
    with agent.task("python: denied", ttl=600) as task:
        broker.decide_when_pending("payments-ca", "deny", delay=0)
        with pytest.raises(keygate.ApprovalDenied) as e:
            task.credential("payments-ca", ttl=300, justification="try", approval_timeout=60)
        assert e.value.approval_id.startswith("ap_")


def test_an_undecided_approval_times_out_on_the_client_side(broker, agent_factory):
    agent = agent_factory()
    with agent.task("python: nobody answers", ttl=600) as task:
        pending = task.request("payments-ca", ttl=300, justification="slow approvers")
        assert isinstance(pending, keygate.PendingApproval)
        with pytest.raises(keygate.ApprovalTimeout):
            task.wait_for_approval(pending, timeout=1)
    # The approval of an ended task takes no decision, and the reaper
    # cancels it.
    path = f"/v1/approvals/{pending.approval_id}"
    late = broker.operator("dev-approver-token", "POST", f"{path}/decision", json={"decision": "approve"})
    assert late.status_code == 409 and late.json()["error"] == "conflict"
    deadline = time.monotonic() + 20
    while broker.operator("dev-approver-token", "GET", path).json()["state"] != "cancelled":
        assert time.monotonic() < deadline, "never cancelled"
        time.sleep(0.2)


def test_an_approval_wait_goes_on_through_a_broker_restart(tmp_path):
    # A broker of its own, restarted (SIGTERM, then started again on the
    # same address) while the client waits: its long-poll is answered
    # `pending` as the broker stops, it asks again until the broker is
    # back, and the approval decided after the restart is redeemed.
    b = Broker(tmp_path)
    try:
        pem = b.register("py-restart-agent")
        with keygate.Agent("py-restart-agent", key_pem=pem, server=b.url) as agent:
            with agent.task("python: across a restart", ttl=600) as task:
                pending = task.request("payments-ca", ttl=300, justification="restart")
                assert isinstance(pending, keygate.PendingApproval)
                got: list = []
                waiter = threading.Thread(
                    target=lambda: got.append(task.wait_for_approval(pending, timeout=60)), daemon=True
                )
                waiter.start()
                time.sleep(0.5)
                b.restart()
                assert waiter.is_alive(), "the client gave up while the broker restarted"
                b.decide_when_pending("payments-ca", "approve", delay=0).join()
                waiter.join(60)
                assert got and got[0].scope == "payments-ca" and "certificate" in got[0]
    finally:
        b.stop()


def test_delegation_gives_the_sub_agent_a_slice_that_ends_with_the_parent(broker, agent_factory):
    parent_agent = agent_factory("demo-agent")
    sub_agent = agent_factory("demo-subagent")
    with parent_agent.task("python: orchestrate") as parent:
        child = parent.delegate(sub_agent, ["x509-svid"])
        assert child.delegated and child.agent_id == "demo-subagent"
        svid = child.credential("x509-svid")
        with pytest.raises(keygate.KeygateError) as outside:
            child.credential("jwt-svid")
        assert outside.value.status == 403
    assert set(lease_states(broker, child.task_id).values()) == {"revoked"}
    assert token_refused(broker, child)
    assert svid.lease_id in lease_states(broker, child.task_id)


def test_dpop_binds_the_session_to_a_key_only_the_client_holds(broker, agent_factory):
    agent = agent_factory(dpop=True)
    with agent.task("python: dpop") as task:
        assert task.token_type == "DPoP"
        task.credential("x509-svid")
        # The token alone, as a bearer token, is refused.
        stolen = httpx.post(
            f"{broker.url}/v1/credentials",
            headers={"Authorization": f"Bearer {task.token.reveal()}"},
            json={"scope": "x509-svid"},
        )
        assert stolen.status_code == 401
        intro = broker.operator(
            "dev-admin-token", "POST", "/oauth/introspect", data={"token": task.token.reveal()}
        ).json()
        assert intro["cnf"]["jkt"] == agent.dpop_jkt


def test_an_ed25519_key_in_memory_works(broker):
    pem = broker.register("py-ed25519-agent", alg="EdDSA")
    with keygate.Agent("py-ed25519-agent", key_pem=pem, server=broker.url) as agent:
        with agent.task("python: ed25519") as task:
            assert "certificate" in task.credential("x509-svid")
