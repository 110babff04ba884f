"""The asyncio client: the same calls as :mod:`keygate.client`, awaited.
Requests and answers are built and read by the same code (``_model``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Dict, Generator, Optional, Sequence, Union

import httpx

from . import _model as m
from .client import DEFAULT_SERVER, PathLike, _Identity, log
from .errors import KeygateError, TransportError


class AsyncAgent(_Identity):
    """:class:`keygate.Agent` for asyncio."""

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
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        super().__init__(agent_id, key_file, key_pem, federated_token_file, server, dpop)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, verify=verify)
        self._meta: Optional[m.Metadata] = None

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncAgent":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        # Raised after the except block, not in it: `from None` only hides
        # httpx's exception, which would stay the error's `__context__` with
        # the request, its Authorization header and body (a session token).
        try:
            return await self._http.request(method, url, **kw)
        except httpx.HTTPError as e:
            err = m.transport_error(self.server, e)
        raise err

    async def metadata(self) -> m.Metadata:
        if self._meta is None:
            resp = await self._send("GET", f"{self.server}/.well-known/oauth-authorization-server")
            self._meta = m.metadata(m.check(resp))
        return self._meta

    async def _token(self, form: Dict[str, str]) -> "AsyncTask":
        meta = await self.metadata()
        headers = self.dpop_header("POST", meta.token_endpoint, None)
        resp = await self._send("POST", f"{self.server}/oauth/token", data=form, headers=headers)
        return AsyncTask(self, m.check(resp))

    def task(
        self, name: str, *, ttl: Optional[int] = None, on_behalf_of: Optional[str] = None
    ) -> "_Opening":
        """Opens a task: ``task = await agent.task(...)``, or ``async with
        agent.task(...) as task:``, which completes it on leaving the block."""

        async def open_() -> "AsyncTask":
            meta = await self.metadata()
            return await self._token(self.open_form(meta.token_endpoint, name, ttl, on_behalf_of))

        return _Opening(open_)

    async def accept_delegation(
        self, subject_token: Union[m.Secret, str], scopes: Sequence[str], *, ttl: Optional[int] = None
    ) -> "AsyncTask":
        token = subject_token.reveal() if isinstance(subject_token, m.Secret) else subject_token
        audience = (await self.metadata()).token_endpoint
        return await self._token(m.exchange_form(token, self.actor_token(audience), list(scopes), ttl))


class _Opening:
    """A task being opened: awaitable, or an async context manager."""

    def __init__(self, open_: Callable[[], Awaitable["AsyncTask"]]) -> None:
        self._open = open_
        self._task: Optional[AsyncTask] = None

    def __await__(self) -> Generator[Any, None, "AsyncTask"]:
        return self._open().__await__()

    async def __aenter__(self) -> "AsyncTask":
        self._task = await self._open()
        return self._task

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._task is not None
        await self._task.__aexit__(exc_type, exc, tb)


class AsyncTask:
    """:class:`keygate.Task` for asyncio."""

    def __init__(self, agent: AsyncAgent, answer: Dict[str, Any]) -> None:
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
        return self._token

    def __repr__(self) -> str:
        return f"AsyncTask(agent={self.agent_id!r}, task_id={self.task_id!r}, token_type={self.token_type!r})"

    async def __aenter__(self) -> "AsyncTask":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            await self.complete()
        except KeygateError as e:
            if exc is None:
                raise
            log.warning("completing task %s after an error failed: %s", self.task_id, e)

    async def _call(self, method: str, path: str, *, timeout: Optional[float] = None, **kw: Any) -> httpx.Response:
        token = self._token.reveal()
        meta = await self._agent.metadata()
        headers = {"Authorization": f"{self.token_type} {token}"}
        headers.update(self._agent.dpop_header(method, f"{meta.issuer.rstrip('/')}{path}", token))
        if timeout is not None:
            kw["timeout"] = timeout
        return await self._agent._send(method, f"{self._agent.server}{path}", headers=headers, **kw)

    async def session(self) -> Dict[str, Any]:
        return m.check(await self._call("GET", "/v1/session"))

    async def request(
        self,
        scope: str,
        *,
        ttl: Optional[int] = None,
        params: Optional[Dict[str, Any]] = None,
        justification: Optional[str] = None,
    ) -> Union[m.Credential, m.PendingApproval]:
        body = m.credential_body(scope, ttl, params, justification)
        return m.asked(await self._call("POST", "/v1/credentials", json=body))

    async def credential(
        self,
        scope: str,
        *,
        ttl: Optional[int] = None,
        params: Optional[Dict[str, Any]] = None,
        justification: Optional[str] = None,
        approval_timeout: float = 600.0,
    ) -> m.Credential:
        got = await self.request(scope, ttl=ttl, params=params, justification=justification)
        if isinstance(got, m.Credential):
            return got
        log.info("scope %s waits for approval %s", scope, got.approval_id)
        return await self.wait_for_approval(got, timeout=approval_timeout)

    async def wait_for_approval(
        self, pending: Union[m.PendingApproval, str], *, timeout: float = 600.0
    ) -> m.Credential:
        approval_id = pending.approval_id if isinstance(pending, m.PendingApproval) else pending
        scope = pending.scope if isinstance(pending, m.PendingApproval) else ""
        deadline = time.monotonic() + timeout
        while True:
            wait = m.next_wait(approval_id, deadline, timeout)
            try:
                resp = await self._call("GET", f"/v1/approvals/{approval_id}?wait={wait}", timeout=wait + 30)
            except TransportError:
                # The broker restarting: the approval waits in its store.
                await asyncio.sleep(m.retry_in(deadline))
                continue
            body = m.check(resp)
            failed = m.approval_outcome(approval_id, scope or body.get("scope", ""), body)
            if failed is not None:
                raise failed
            if body.get("status") == "approved":
                break
        resp = await self._call("POST", f"/v1/approvals/{approval_id}/redeem")
        return m.Credential(m.check(resp, (200, 201)))

    async def renew(self, lease: Union[m.Credential, str], increment: int) -> m.Renewal:
        path = f"/v1/credentials/{m.lease_id_of(lease)}/renew"
        return m.renewal(m.check(await self._call("POST", path, json={"increment": increment})))

    async def release(self, lease: Union[m.Credential, str]) -> m.Release:
        return m.release(m.check(await self._call("DELETE", f"/v1/credentials/{m.lease_id_of(lease)}")))

    async def delegate(self, to: AsyncAgent, scopes: Sequence[str], *, ttl: Optional[int] = None) -> "AsyncTask":
        return await to.accept_delegation(self._token, scopes, ttl=ttl)

    async def complete(self) -> m.Completion:
        if self._completion is None:
            self._completion = m.completion(m.check(await self._call("POST", "/v1/tasks/complete")))
        return self._completion
