"""examples/python/tool_agent.py runs as its docstring says, against the
real broker, with and without its sensitive tool."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def run_example(broker, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python" / "tool_agent.py")],
        cwd=ROOT,
        env={**os.environ, "KEYGATE_SERVER": broker.url, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tool_agent_example_runs(broker):
    out = run_example(broker)
    assert out.returncode == 0, out.stderr
    assert "as spiffe://example.org/agent/demo-agent" in out.stdout
    assert "completed: its credentials are revoked" in out.stdout
    assert "PRIVATE KEY" not in out.stdout + out.stderr


def test_the_tool_agent_example_waits_for_an_approval(broker):
    approver = broker.decide_when_pending("payments-ca", "approve")
    out = run_example(broker, ASK_SENSITIVE="1")
    approver.join()
    assert out.returncode == 0, out.stderr
    assert "tool sign_payment_batch: signed batch 2026-12" in out.stdout, out.stdout
