"""No secret in a repr, a log line or an exception: the session token, the
credential's values and the agent's key stay where they belong."""

from __future__ import annotations

import logging

import pytest

import keygate
from conftest import KEYS


def test_no_secret_in_repr_logs_or_errors(broker, agent_factory, caplog):
    caplog.set_level(logging.DEBUG)  # httpx, httpcore and keygate at their most talkative
    seen = []
    agent = agent_factory()
    with agent.task("python: hygiene") as task:
        cred = task.credential("x509-svid")
        jwt = task.credential("jwt-svid", params={"audience": "https://api.example.org"})
        token = task.token.reveal()
        secrets = [token, cred["private_key"], jwt["token"]]
        seen += [repr(agent), repr(task), str(task), repr(cred), str(cred), repr(jwt), repr(task.token),
                 str(task.token), f"{task.token}"]
        with pytest.raises(keygate.NotRenewable) as e:
            task.renew(cred, 60)
        seen += [str(e.value), repr(e.value)]
    with pytest.raises(keygate.InvalidToken) as after:
        task.credential("x509-svid")
    seen += [str(after.value), repr(after.value)]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(cred)
    seen.append(caplog.text)
    key_body = "".join((KEYS / "demo-agent.pem").read_text().splitlines()[1:-1])
    for text in seen:
        for s in secrets + [key_body]:
            assert s not in text
        for line in secrets[1].splitlines()[1:-1]:
            assert line not in text
    assert "fields=['" in repr(cred) and "private_key" in repr(cred)


def test_a_transport_error_keeps_no_request_behind_it(tmp_path):
    # The broker goes away mid-task: the error raised for the next call
    # carries no httpx exception (whose request holds the Authorization
    # header with the session token), neither as cause nor as context.
    from conftest import Broker

    b = Broker(tmp_path)
    pem = b.register("py-transport-secrets")
    try:
        with keygate.Agent("py-transport-secrets", key_pem=pem, server=b.url) as agent:
            task = agent.task("python: broker gone", ttl=600)
            token = task.token.reveal()
            b.stop()
            for call in (lambda: task.credential("x509-svid"), task.complete):
                with pytest.raises(keygate.TransportError) as e:
                    call()
                assert e.value.__cause__ is None and e.value.__context__ is None, repr(e.value.__context__)
                assert token not in repr(vars(e.value)) and token not in str(e.value)
    finally:
        if b.proc.poll() is None:
            b.stop()
