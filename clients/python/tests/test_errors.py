"""Each refusal arrives as the class of its stable code, with the status,
the broker's message and what else the answer carries."""

from __future__ import annotations

import pytest

import keygate
from conftest import KEYS


def test_a_key_that_is_not_the_agents_is_invalid_client(broker):
    with keygate.Agent("demo-agent", key_file=KEYS / "demo-subagent.pem", server=broker.url) as agent:
        with pytest.raises(keygate.InvalidClient) as e:
            agent.task("python: wrong key")
    assert e.value.status == 401 and e.value.message


def test_an_unknown_agent_is_invalid_client(broker):
    with keygate.Agent("nobody-agent", key_file=KEYS / "demo-agent.pem", server=broker.url) as agent:
        with pytest.raises(keygate.InvalidClient):
            agent.task("python: unknown agent")


def test_policy_denied_names_the_deciding_policies(broker):
    # No example policy permits a team outside platform and finance.
    pem = broker.register("py-outsider-agent", team="outsiders")
    with keygate.Agent("py-outsider-agent", key_pem=pem, server=broker.url) as agent:
        with agent.task("python: not permitted") as task:
            with pytest.raises(keygate.PolicyDenied) as e:
                task.credential("x509-svid")
    assert e.value.status == 403 and isinstance(e.value.policies, list)
    assert isinstance(e.value, keygate.Forbidden)


def test_renewing_a_certificate_is_not_renewable(broker, agent_factory):
    with agent_factory().task("python: renew") as task:
        svid = task.credential("x509-svid")
        with pytest.raises(keygate.NotRenewable):
            task.renew(svid, 60)


def test_an_unknown_lease_is_not_found(broker, agent_factory):
    with agent_factory().task("python: unknown lease") as task:
        with pytest.raises(keygate.NotFound):
            task.release("ls_00000000000000000000000000")


def test_an_unknown_scope_is_not_found(broker, agent_factory):
    with agent_factory().task("python: unknown scope") as task:
        with pytest.raises(keygate.NotFound) as e:
            task.credential("no-such-scope")
    assert e.value.status == 404 and "no-such-scope" in e.value.message


def test_a_completed_task_token_is_invalid_token(broker, agent_factory):
    task = agent_factory().task("python: after the end")
    task.complete()
    with pytest.raises(keygate.InvalidToken) as e:
        task.credential("x509-svid")
    assert e.value.status == 401


def test_a_kill_switch_ends_the_task_under_the_agent(broker, agent_factory):
    # demo-subagent, so that no other test's task is in the blast radius.
    agent = agent_factory("demo-subagent")
    with pytest.raises(keygate.InvalidToken):
        with agent.task("python: killed") as task:
            task.credential("x509-svid")
            resp = broker.operator(
                "dev-secops-token", "POST", "/v1/revocations",
                json={"agent": "demo-subagent", "reason": "python client test"},
            )
            assert resp.status_code in (200, 201, 202), resp.text
            task.credential("x509-svid")


def test_a_broker_that_is_down_is_a_transport_error(tmp_path):
    from conftest import free_port

    with keygate.Agent("demo-agent", key_file=KEYS / "demo-agent.pem",
                       server=f"http://127.0.0.1:{free_port()}") as agent:
        with pytest.raises(keygate.TransportError) as e:
            agent.task("python: nobody home")
    assert "cannot reach the broker" in str(e.value)


def test_bad_configuration_is_refused_before_any_call(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(keygate.ConfigurationError) as e:
        keygate.Agent("demo-agent", key_file=bad)
    assert "not a key" not in str(e.value)
    with pytest.raises(keygate.ConfigurationError):
        keygate.Agent("demo-agent")
    with pytest.raises(keygate.ConfigurationError):
        keygate.Agent("demo-agent", key_file=tmp_path / "missing.pem")
    with pytest.raises(keygate.ConfigurationError):
        keygate.Agent("demo-agent", key_file=KEYS / "demo-agent.pem", server="ftp://x")


def test_every_code_maps_to_its_class():
    for code, cls in keygate.ERRORS.items():
        err = keygate.errors.from_answer(400, {"error": code, "message": "m"}, "7")
        assert type(err) is cls and err.code == code and err.retry_after == 7
    unknown = keygate.errors.from_answer(418, {"error": "brand_new", "message": "m"}, None)
    assert type(unknown) is keygate.KeygateError and unknown.code == "brand_new"
