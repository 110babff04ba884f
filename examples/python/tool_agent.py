"""An LLM-style agent whose tools need credentials, on the Keygate Python
client. The agent loop is what a framework (LangChain, the OpenAI Agents
SDK, …) runs: a model picks a tool, the tool runs, its result goes back.
Here the "model" is a fixed plan so the example runs anywhere.

Each tool asks for the one credential it needs, for that one call, and
releases it when done; the whole run is one Keygate task, so whatever a
tool forgets is revoked when the run ends, by any path.

Start the broker (`scripts/serve`), then from the checkout:

    pip install ./clients/python
    python examples/python/tool_agent.py
    ASK_SENSITIVE=1 python examples/python/tool_agent.py   # a tool behind an approval

With ASK_SENSITIVE=1 it prints the approval id and waits; approve it with
`KEYGATE_TOKEN=dev-approver-token cargo run -- approvals approve <id>`.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

from cryptography import x509

import keygate

SERVER = os.environ.get("KEYGATE_SERVER", "http://127.0.0.1:8470")
KEY = os.environ.get("KEYGATE_AGENT_KEY_FILE", "examples/keys/demo-agent.pem")

Tool = Callable[[keygate.Task, str], str]
TOOLS: Dict[str, Tool] = {}


def tool(name: str) -> Callable[[Tool], Tool]:
    """Registers a tool the way agent frameworks do, by name."""

    def register(fn: Tool) -> Tool:
        TOOLS[name] = fn
        return fn

    return register


@tool("call_internal_api")
def call_internal_api(task: keygate.Task, arg: str) -> str:
    """Calls a service that authenticates callers by mTLS: it needs an
    X.509-SVID for the length of one call."""
    svid = task.credential("x509-svid", ttl=300)
    try:
        cert = x509.load_pem_x509_certificate(svid["certificate"].encode())
        # A real tool would hand svid["certificate"] and svid["private_key"]
        # to its HTTP client here; the key is never printed or logged.
        return f"called {arg} as {svid['spiffe_id']} (certificate serial {cert.serial_number:x})"
    finally:
        task.release(svid)


@tool("sign_payment_batch")
def sign_payment_batch(task: keygate.Task, arg: str) -> str:
    """A sensitive tool: its scope waits for a human approver."""
    asked = task.request("payments-ca", ttl=300, justification=f"sign {arg}")
    if isinstance(asked, keygate.PendingApproval):
        # A framework would tell the human in the loop; here, the terminal.
        print(f"tool sign_payment_batch: waiting for approval {asked.approval_id}", flush=True)
        asked = task.wait_for_approval(asked, timeout=600)
    cred = asked
    try:
        return f"signed {arg} with a certificate for {cred['spiffe_id']}"
    finally:
        task.release(cred)


def plan() -> List[tuple]:
    """What a model would decide to do, step by step."""
    steps = [("call_internal_api", "https://reports.internal/daily")]
    if os.environ.get("ASK_SENSITIVE") == "1":
        steps.append(("sign_payment_batch", "batch 2026-12"))
    return steps


def main() -> int:
    with keygate.Agent("demo-agent", key_file=KEY, server=SERVER) as agent:
        try:
            task_cm = agent.task("example: tool-using agent", ttl=900)
        except keygate.TransportError as e:
            print(f"{e}\nis the broker running? start it with `scripts/serve`", file=sys.stderr)
            return 1
        with task_cm as task:
            print(f"task {task.task_id} open")
            for name, arg in plan():
                try:
                    result = TOOLS[name](task, arg)
                except keygate.KeygateError as e:
                    # What goes back to the model is the refusal, not a crash.
                    result = f"tool {name} failed: {e}"
                print(f"tool {name}: {result}")
        done = task.complete()
        print(f"task {done.task_id} {done.state}: its credentials are revoked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
