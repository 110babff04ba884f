"""Keygate's agent client: prove who the agent is, open a task, obtain
short-lived credentials, and have them all revoked when the task ends.

    agent = keygate.Agent("research-agent", key_file="agent.pem", server=URL)
    with agent.task("nightly report", ttl=600) as task:
        aws = task.credential("aws-reports")   # waits for approval if sensitive
    # leaving the block completes the task: everything is revoked

:mod:`keygate.aio` has the same for asyncio.
"""

from ._model import Completion, Credential, PendingApproval, Release, Renewal, Secret
from .aio import AsyncAgent, AsyncTask
from .client import DEFAULT_SERVER, Agent, Task
from .errors import *  # noqa: F401,F403  (one class per stable error code)
from .errors import ERRORS, KeygateError

__all__ = [
    "Agent",
    "Task",
    "AsyncAgent",
    "AsyncTask",
    "Credential",
    "PendingApproval",
    "Renewal",
    "Release",
    "Completion",
    "Secret",
    "KeygateError",
    "ERRORS",
    "DEFAULT_SERVER",
]
