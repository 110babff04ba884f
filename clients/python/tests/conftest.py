"""Runs the real `keygate` binary for the client's tests: the shipped
example config (`config/keygate.toml`: built-in CA, example policies and
agents) on a free port with its data in a temporary directory.

`KEYGATE_BIN` names the binary (default: `target/debug/keygate` of this
checkout). A missing binary fails the tests: it is never a skip."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
KEYS = ROOT / "examples" / "keys"

# The example config's operators (their SHA-256 is in config/keygate.toml).
ADMIN = "dev-admin-token"
APPROVER = "dev-approver-token"
SECOPS = "dev-secops-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, tmp: Path) -> None:
        binary = Path(os.environ.get("KEYGATE_BIN", ROOT / "target" / "debug" / "keygate"))
        if not binary.is_file():
            raise RuntimeError(
                f"the keygate binary is missing at {binary}: build it (`cargo build`) or set KEYGATE_BIN"
            )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        data = tmp / "data"
        config = (ROOT / "config" / "keygate.toml").read_text()
        for pattern, value in [
            (r'listen = "127\.0\.0\.1:8470"', f'listen = "127.0.0.1:{port}"'),
            (r'issuer = "http://127\.0\.0\.1:8470"', f'issuer = "{self.url}"'),
            (r'"sqlite://data/', f'"sqlite://{data}/'),
            (r'"data/', f'"{data}/'),
            (r'dir = "config/policies"', f'dir = "{ROOT}/config/policies"'),
            (r'seed_dir = "config/agents"', f'seed_dir = "{ROOT}/config/agents"'),
        ]:
            config, n = re.subn(pattern, value, config)
            assert n > 0, f"the example config no longer has {pattern}"
        self.config = tmp / "keygate.toml"
        self.config.write_text(config)
        self.log = tmp / "keygate.log"
        self._log_file = open(self.log, "wb")
        self._command = [str(binary), "serve", "--config", str(self.config)]
        self._cwd = tmp
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(self._command, cwd=self._cwd, stdout=self._log_file, stderr=subprocess.STDOUT)
        self._wait_ready()

    def restart(self) -> None:
        """Stops the broker as an operator would (SIGTERM) and starts it
        again on the same address and store."""
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self._start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keygate exited at start:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"keygate was not ready within 60 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()

    def operator(self, token: str, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def register(self, agent_id: str, team: str = "platform", alg: str = "ES256") -> bytes:
        """Registers a new agent with a fresh key; returns its PKCS#8 PEM."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        from keygate._jws import public_jwk

        key = ed25519.Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        resp = self.operator(
            ADMIN,
            "POST",
            "/v1/agents",
            json={
                "id": agent_id,
                "team": team,
                "sponsor": "jgill@example.com",
                "risk_tier": 1,
                "environment": "dev",
                "purpose": "python client test",
                "jwks": {"keys": [{**public_jwk(key), "alg": alg}]},
            },
        )
        assert resp.status_code == 201, resp.text
        return pem

    def leases(self, task_id: str) -> List[Dict]:
        resp = self.operator(ADMIN, "GET", f"/v1/leases?task={task_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def decide_when_pending(self, scope: str, decision: str, delay: float = 0.5) -> threading.Thread:
        """An approver in another thread: decides the first pending approval
        for `scope` once it appears, as a human in Slack would."""

        def run() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                resp = self.operator(APPROVER, "GET", "/v1/approvals?state=pending")
                for a in resp.json():
                    if a.get("scope") == scope:
                        time.sleep(delay)
                        r = self.operator(
                            APPROVER,
                            "POST",
                            f"/v1/approvals/{a['id']}/decision",
                            json={"decision": decision, "reason": "python client test"},
                        )
                        assert r.status_code == 200, r.text
                        return
                time.sleep(0.1)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("keygate"))
    yield b
    b.stop()


@pytest.fixture
def agent_factory(broker: Broker) -> Iterator[Callable[..., "object"]]:
    import keygate

    made: List[keygate.Agent] = []

    def make(agent_id: str = "demo-agent", **kw) -> keygate.Agent:
        kw.setdefault("key_file", KEYS / f"{agent_id}.pem")
        a = keygate.Agent(agent_id, server=broker.url, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()

