"""The synchronous client: an :class:`Agent` opens :class:`Task` s."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from . import _jws
from . import _model as m
from .errors import ConfigurationError, KeygateError, TransportError

DEFAULT_SERVER = "http://127.0.0.1:8470"
log = logging.getLogger("keygate")

PathLike = Union[str, Path]


class _Identity:
    """How an agent proves who it is, shared by both clients."""

    def __init__(
        self,
        agent_id: str,
        key_file: Optional[PathLike],
        key_pem: Optional[bytes],
        federated_token_file: Optional[PathLike],
        server: str,
        dpop: bool,
    ) -> None:
        if not agent_id:
            raise ConfigurationError("an agent id is required")
        given = sum(x is not None for x in (key_file, key_pem, federated_token_file))
        if given != 1:
            raise ConfigurationError(
                "give exactly one of key_file, key_pem or federated_token_file"
            )
        if not server.startswith(("http://", "https://")):
            raise ConfigurationError("server must be an http:// or https:// URL")
        self.agent_id = agent_id
        self.server = server.rstrip("/")
        self._key: Optional[_jws.PrivateKey] = None
        if key_file is not None:
            try:
                key_pem = Path(key_file).read_bytes()
            except OSError as e:
                raise ConfigurationError(f"cannot read the agent key `{key_file}`: {e.strerror}") from None
        if key_pem is not None:
            self._key = _jws.load_key(key_pem)
        self._federated_token_file = federated_token_file
        #: The key DPoP proofs are made with: fresh per Agent, never written.
        self._dpop_key: Optional[_jws.PrivateKey] = (
            ec.generate_private_key(ec.SECP256R1()) if dpop else None
        )

    def federated_token(self) -> Optional[str]:
        """Read afresh at each use: workload tokens are rotated on disk."""
        if self._federated_token_file is None:
            return None
        try:
            return Path(self._federated_token_file).read_text().strip()
        except OSError as e:
            raise ConfigurationError(
                f"cannot read the federated token `{self._federated_token_file}`: {e.strerror}"
            ) from None

    def open_form(self, audience: str, task: str, ttl: Optional[int], on_behalf_of: Optional[str]) -> Dict[str, str]:
        return m.open_form(
            self.agent_id, self._key, self.federated_token(), audience, task, ttl, on_behalf_of
        )

    def actor_token(self, audience: str) -> str:
        """What this agent shows as the actor of a delegation."""
        token = self.federated_token()
        if token is not None:
            return token
        assert self._key is not None
        return _jws.client_assertion(self._key, self.agent_id, audience)

    def dpop_header(self, method: str, url: str, token: Optional[str]) -> Dict[str, str]:
        if self._dpop_key is None:
            return {}
        return {"DPoP": _jws.dpop_proof(self._dpop_key, method, url, token)}

    @property
    def dpop_jkt(self) -> Optional[str]:
        if self._dpop_key is None:
            return None
        return _jws.thumbprint(_jws.public_jwk(self._dpop_key))

    def __repr__(self) -> str:
        return f"Agent({self.agent_id!r}, server={self.server!r}, dpop={self._dpop_key is not None})"


class Agent(_Identity):
    """An agent identity. ``key_file`` (PKCS#8 PEM, ES256 or EdDSA) signs
    ``private_key_jwt`` assertions; ``federated_token_file`` is a workload
    identity token (Kubernetes, CI) read afresh at each task open.
    ``dpop=True`` binds every session token to a key held only here."""

    def __init__(
        self,
        agent_id: str,
        *,
        key_file: Optional[PathLike] = None,
        key_pem: Optional[bytes] = None,
        federated_token_file: Optional[PathLike] = None,
        server: str = DEFAULT_SERVER,
        dpop: bool = False,
        timeout: float = 30.0,
        verify: Union[bool, str] = True,
        http: Optional[httpx.Client] = None,
    ) -> None:
        super().__init__(agent_id, key_file, key_pem, federated_token_file, server, dpop)
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout, verify=verify)
        self._meta: Optional[m.Metadata] = None

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        # Raised after the except block, not in it: `from None` only hides
        # httpx's exception, which would stay the error's `__context__` with
        # the request, its Authorization header and body (a session token).
        try:
            return self._http.request(method, url, **kw)
        except httpx.HTTPError as e:
            err = m.transport_error(self.server, e)
        raise err

    def metadata(self) -> m.Metadata:
        """The broker's RFC 8414 metadata: the token endpoint assertions
        name as their audience, and the issuer DPoP proofs are made for."""
        if self._meta is None:
            resp = self._send("GET", f"{self.server}/.well-known/oauth-authorization-server")
            self._meta = m.metadata(m.check(resp))
        return self._meta

    def _token(self, form: Dict[str, str]) -> "Task":
        meta = self.metadata()
        headers = self.dpop_header("POST", meta.token_endpoint, None)
        resp = self._send("POST", f"{self.server}/oauth/token", data=form, headers=headers)
        return Task(self, m.check(resp))

    def task(self, name: str, *, ttl: Optional[int] = None, on_behalf_of: Optional[str] = None) -> "Task":
        """Opens a task. Use it as a context manager: leaving the block
        completes the task, which revokes every credential of it."""
        return self._token(self.open_form(self.metadata().token_endpoint, name, ttl, on_behalf_of))

    def accept_delegation(
        self, subject_token: Union[m.Secret, str], scopes: Sequence[str], *, ttl: Optional[int] = None
    ) -> "Task":
        """RFC 8693: take a slice of another agent's task, proving who this
        agent is. ``subject_token`` is the delegating task's session token."""
        token = subject_token.reveal() if isinstance(subject_token, m.Secret) else subject_token
        audience = self.metadata().token_endpoint
        return self._token(m.exchange_form(token, self.actor_token(audience), list(scopes), ttl))


class Task:
    """An open task and its session token. Completing it (``complete()``,
    or leaving its ``with`` block by any path) revokes every credential."""

    def __init__(self, agent: Agent, answer: Dict[str, Any]) -> None:
        self._agent = agent
        self._token = m.Secret(answer["access_token"])
        self.task_id: str = answer.get("task_id", "")
        self.token_type: str = answer.get("token_type", "Bearer")
        self.expires_at: float = time.time() + float(answer.get("expires_in", 0))
        self.delegated: bool = "issued_token_type" in answer
        self._completion: Optional[m.Completion] = None

    @property
    def agent_id(self) -> str:
        return self._agent.agent_id

    @property
    def token(self) -> m.Secret:
        """The session token (for a sub-agent taking a delegation)."""
        return self._token

    def __repr__(self) -> str:
        return f"Task(agent={self.agent_id!r}, task_id={self.task_id!r}, token_type={self.token_type!r})"

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.complete()
        except KeygateError as e:
            if exc is None:
                raise
            # The block's own error wins; the task still ends at its TTL.
            log.warning("completing task %s after an error failed: %s", self.task_id, e)

    def _call(self, method: str, path: str, *, timeout: Optional[float] = None, **kw: Any) -> httpx.Response:
        token = self._token.reveal()
        meta = self._agent.metadata()
        headers = {"Authorization": f"{self.token_type} {token}"}
        headers.update(self._agent.dpop_header(method, f"{meta.issuer.rstrip('/')}{path}", token))
        if timeout is not None:
            kw["timeout"] = timeout
        return self._agent._send(method, f"{self._agent.server}{path}", headers=headers, **kw)

    def session(self) -> Dict[str, Any]:
        """``GET /v1/session``: the agent and task the token stands for."""
        return m.check(self._call("GET", "/v1/session"))

    def request(
        self,
        scope: str,
        *,
        ttl: Optional[int] = None,
        params: Optional[Dict[str, Any]] = None,
        justification: Optional[str] = None,
    ) -> Union[m.Credential, m.PendingApproval]:
        """Asks once: the credential, or the approval a sensitive scope waits for."""
        body = m.credential_body(scope, ttl, params, justification)
        return m.asked(self._call("POST", "/v1/credentials", json=body))

    def credential(
        self,
        scope: str,
        *,
        ttl: Optional[int] = None,
        params: Optional[Dict[str, Any]] = None,
        justification: Optional[str] = None,
        approval_timeout: float = 600.0,
    ) -> m.Credential:
        """The credential for ``scope``; a sensitive scope waits for its
        approvers (up to ``approval_timeout`` seconds), then is redeemed."""
        got = self.request(scope, ttl=ttl, params=params, justification=justification)
        if isinstance(got, m.Credential):
            return got
        log.info("scope %s waits for approval %s", scope, got.approval_id)
        return self.wait_for_approval(got, timeout=approval_timeout)

    def wait_for_approval(self, pending: Union[m.PendingApproval, str], *, timeout: float = 600.0) -> m.Credential:
        """Waits for an approval's decision and redeems it (once), through
        a restart of the broker too (asking again until it is back)."""
        approval_id = pending.approval_id if isinstance(pending, m.PendingApproval) else pending
        scope = pending.scope if isinstance(pending, m.PendingApproval) else ""
        deadline = time.monotonic() + timeout
        while True:
            wait = m.next_wait(approval_id, deadline, timeout)
            try:
                resp = self._call("GET", f"/v1/approvals/{approval_id}?wait={wait}", timeout=wait + 30)
            except TransportError:
                # The broker restarting: the approval waits in its store.
                time.sleep(m.retry_in(deadline))
                continue
            body = m.check(resp)
            failed = m.approval_outcome(approval_id, scope or body.get("scope", ""), body)
            if failed is not None:
                raise failed
            if body.get("status") == "approved":
                break
        return m.Credential(m.check(self._call("POST", f"/v1/approvals/{approval_id}/redeem"), (200, 201)))

    def renew(self, lease: Union[m.Credential, str], increment: int) -> m.Renewal:
        """Extends a renewable credential (Vault tokens, database leases);
        :class:`~keygate.errors.NotRenewable` for the others."""
        path = f"/v1/credentials/{m.lease_id_of(lease)}/renew"
        return m.renewal(m.check(self._call("POST", path, json={"increment": increment})))

    def release(self, lease: Union[m.Credential, str]) -> m.Release:
        """Revokes one credential before the task ends."""
        return m.release(m.check(self._call("DELETE", f"/v1/credentials/{m.lease_id_of(lease)}")))

    def delegate(self, to: Agent, scopes: Sequence[str], *, ttl: Optional[int] = None) -> "Task":
        """Hands ``to`` (the sub-agent, proving who it is with its own key)
        a task limited to ``scopes``; it ends when this task does."""
        return to.accept_delegation(self._token, scopes, ttl=ttl)

    def complete(self) -> m.Completion:
        """Ends the task: the broker revokes every credential of it. A
        second call returns the first's answer."""
        if self._completion is None:
            self._completion = m.completion(m.check(self._call("POST", "/v1/tasks/complete")))
        return self._completion


__all__: List[str] = ["Agent", "Task", "DEFAULT_SERVER"]
