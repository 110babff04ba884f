"""What the broker answers, as typed values, and the requests the agent
makes, built once for the sync and the async client."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import httpx

from . import _jws
from .errors import KeygateError, TransportError, from_answer

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class Secret:
    """A secret string that does not print itself: ``repr``, ``str`` and
    f-strings show ``***``. ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not pickled")


def parse_time(value: Optional[str]) -> Optional[_dt.datetime]:
    if not value:
        return None
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


class Credential(Mapping[str, str]):
    """An issued credential. Its fields (``cred["access_key_id"]``,
    ``cred["certificate"]``…) are the provider's, read as a mapping; its
    ``repr`` names them without their values."""

    def __init__(self, answer: Dict[str, Any]) -> None:
        self.lease_id: str = answer["lease_id"]
        self.scope: str = answer["scope"]
        self.provider: str = answer.get("provider", "")
        self.expires_at: Optional[_dt.datetime] = parse_time(answer.get("expires_at"))
        #: How its backend ends it: ``revocable``, ``expires_at`` or ``not_applicable``.
        self.revocation: Any = answer.get("revocation")
        self.note: Optional[str] = answer.get("note")
        fields = answer.get("credential") or {}
        self._fields: Dict[str, str] = {
            k: v if isinstance(v, str) else str(v) for k, v in fields.items()
        }

    def __getitem__(self, name: str) -> str:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return (
            f"Credential(lease_id={self.lease_id!r}, scope={self.scope!r}, "
            f"provider={self.provider!r}, expires_at={self.expires_at!r}, "
            f"fields={sorted(self._fields)!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Credential is not pickled")


@dataclass(frozen=True)
class Renewal:
    lease_id: str
    expires_at: _dt.datetime
    #: The latest expiry any renewal can reach.
    not_after: _dt.datetime


@dataclass(frozen=True)
class Release:
    lease_id: str
    state: str
    #: Set when the backend could not kill the credential: it lives until then.
    lives_until: Optional[_dt.datetime]
    note: Optional[str] = None


@dataclass(frozen=True)
class Completion:
    task_id: str
    state: str
    #: Counts of the task's leases by state after completion.
    leases: Dict[str, Any] = field(default_factory=dict)
    #: Credentials that outlive the task because their backend cannot revoke them.
    lives_until: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class PendingApproval:
    """A sensitive scope waiting for approvers (202)."""

    approval_id: str
    scope: str
    required: int
    expires_at: Optional[_dt.datetime]


@dataclass(frozen=True)
class Metadata:
    issuer: str
    token_endpoint: str


# Requests: (method, path, keyword arguments for httpx).
Request = Tuple[str, str, Dict[str, Any]]


def check(resp: httpx.Response, expect: Tuple[int, ...] = (200,)) -> Dict[str, Any]:
    """The JSON object of an expected answer, or the typed error."""
    if resp.status_code in expect:
        if resp.status_code == 204 or not resp.content:
            return {}
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise TransportError(
                f"the broker answered {resp.status_code} with a body that is not a JSON object",
                status=resp.status_code,
            )
        return body
    try:
        body = resp.json()
    except ValueError:
        body = None
    raise from_answer(resp.status_code, body, resp.headers.get("retry-after"))


def transport_error(server: str, e: httpx.HTTPError) -> KeygateError:
    # httpx's message names the URL and the OS error, never a header or body.
    return TransportError(f"cannot reach the broker at {server}: {type(e).__name__}: {e}")


def metadata(body: Dict[str, Any]) -> Metadata:
    try:
        return Metadata(issuer=body["issuer"], token_endpoint=body["token_endpoint"])
    except (KeyError, TypeError):
        raise TransportError("the broker's metadata names no issuer or token_endpoint") from None


def open_form(
    agent: str,
    key: Optional[_jws.PrivateKey],
    federated_token: Optional[str],
    audience: str,
    task: str,
    ttl: Optional[int],
    on_behalf_of: Optional[str],
) -> Dict[str, str]:
    form = {"task": task}
    if ttl is not None:
        form["ttl"] = str(ttl)
    if on_behalf_of is not None:
        form["on_behalf_of"] = on_behalf_of
    if federated_token is not None:
        form["grant_type"] = JWT_BEARER_GRANT
        form["assertion"] = federated_token
    else:
        assert key is not None
        form.update(
            grant_type="client_credentials",
            client_id=agent,
            client_assertion_type=JWT_BEARER_ASSERTION,
            client_assertion=_jws.client_assertion(key, agent, audience),
        )
    return form


def exchange_form(
    subject_token: str, actor_assertion: str, scopes: List[str], ttl: Optional[int]
) -> Dict[str, str]:
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "actor_token": actor_assertion,
        "actor_token_type": JWT_TOKEN_TYPE,
        "scope": " ".join(scopes),
    }
    if ttl is not None:
        form["ttl"] = str(ttl)
    return form


def credential_body(
    scope: str,
    ttl: Optional[int],
    params: Optional[Dict[str, Any]],
    justification: Optional[str],
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"scope": scope}
    if ttl is not None:
        body["ttl"] = ttl
    if params:
        body["params"] = params
    if justification is not None:
        body["justification"] = justification
    return body


def asked(resp: httpx.Response) -> "Credential | PendingApproval":
    body = check(resp, (201, 202))
    if resp.status_code == 202:
        return PendingApproval(
            approval_id=body["approval_id"],
            scope=body.get("scope", ""),
            required=int(body.get("required", 1)),
            expires_at=parse_time(body.get("expires_at")),
        )
    return Credential(body)


def renewal(body: Dict[str, Any]) -> Renewal:
    return Renewal(
        lease_id=body["lease_id"],
        expires_at=parse_time(body["expires_at"]),  # type: ignore[arg-type]
        not_after=parse_time(body["not_after"]),  # type: ignore[arg-type]
    )


def release(body: Dict[str, Any]) -> Release:
    return Release(
        lease_id=body["lease_id"],
        state=body["state"],
        lives_until=parse_time(body.get("lives_until")),
        note=body.get("note"),
    )


def completion(body: Dict[str, Any]) -> Completion:
    return Completion(
        task_id=body["task_id"],
        state=body["state"],
        leases=body.get("leases") or {},
        lives_until=body.get("lives_until") or [],
    )


def approval_outcome(approval_id: str, scope: str, body: Dict[str, Any]) -> Optional[KeygateError]:
    """None while pending or once approved; the error it ended in otherwise."""
    from .errors import ApprovalDenied, ApprovalExpired

    status = body.get("status")
    if status in ("pending", "approved"):
        return None
    reason = body.get("reason") or ""
    text = f"approval {approval_id} for scope `{scope}` ended {status}"
    if reason:
        text += f": {reason}"
    cls = ApprovalDenied if status == "denied" else ApprovalExpired
    return cls(text, approval_id=approval_id)


def retry_in(deadline: float) -> float:
    """Seconds to wait before asking an unreachable broker again (1, or
    what is left before ``deadline``)."""
    import time

    return max(0.0, min(1.0, deadline - time.monotonic()))


def next_wait(approval_id: str, deadline: float, timeout: float) -> int:
    """Seconds for the next long poll of an approval (1 to 30), or
    :class:`ApprovalTimeout` once the client has waited ``timeout``."""
    import time

    from .errors import ApprovalTimeout

    left = deadline - time.monotonic()
    if left <= 0:
        raise ApprovalTimeout(
            f"approval {approval_id} was not decided within {timeout:.0f} s",
            approval_id=approval_id,
        )
    return max(1, min(30, int(left)))


def lease_id_of(lease: "Credential | str") -> str:
    return lease.lease_id if isinstance(lease, Credential) else lease
