"""Typed errors: one class per stable error code the broker answers with.

Every error carries the HTTP status, the broker's code and its message. The
broker never puts a secret in a message, and neither does this client: no
token, assertion, key or credential value appears in an exception."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Type


class KeygateError(Exception):
    """Base of everything this client raises."""

    #: The broker's stable error code (``error`` in its answer).
    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        retry_after: Optional[int] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code
        #: Seconds to wait before trying again (``Retry-After``), when given.
        self.retry_after = retry_after
        #: Members of the answer beyond ``error`` and ``message``.
        self.details: Dict[str, Any] = details or {}

    def __str__(self) -> str:
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


# Client-side conditions (no broker answer behind them).


class ConfigurationError(KeygateError):
    """The client was given something unusable (a key, a server URL)."""

    code = "configuration"


class TransportError(KeygateError):
    """The broker could not be reached or answered something that is not
    its JSON."""

    code = "transport"


class ApprovalError(KeygateError):
    """A sensitive scope's approval did not end in a credential."""

    def __init__(self, message: str, *, approval_id: str, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.approval_id = approval_id


class ApprovalDenied(ApprovalError):
    code = "approval_denied"


class ApprovalExpired(ApprovalError):
    """The approval expired or was cancelled (its task ended) undecided."""

    code = "approval_expired"


class ApprovalTimeout(ApprovalError):
    """The client stopped waiting; the approval may still be decided."""

    code = "approval_timeout"


# The broker's stable codes: the JSON API (`{"error", "message"}`).


class InvalidRequest(KeygateError):
    code = "invalid_request"


class Unauthorized(KeygateError):
    code = "unauthorized"


class InvalidToken(KeygateError):
    """The session token is not (or no longer) accepted: expired, revoked,
    its task ended, or a DPoP-bound token without a valid proof."""

    code = "invalid_token"


class Forbidden(KeygateError):
    code = "forbidden"


class NotFound(KeygateError):
    code = "not_found"


class MethodNotAllowed(KeygateError):
    code = "method_not_allowed"


class Conflict(KeygateError):
    code = "conflict"


class PolicyDenied(Forbidden):
    """Policy said no; ``policies`` names the policies that decided."""

    code = "policy_denied"

    @property
    def policies(self) -> List[str]:
        return list(self.details.get("policies", []))


class TaskEnded(Conflict):
    code = "task_ended"


class NotRenewable(InvalidRequest):
    """The credential's backend cannot extend it: ask for it again."""

    code = "not_renewable"


class PayloadTooLarge(KeygateError):
    code = "payload_too_large"


class UnsupportedMediaType(KeygateError):
    code = "unsupported_media_type"


class RateLimited(KeygateError):
    code = "rate_limited"


class ProviderError(KeygateError):
    """The credential backend failed (502)."""

    code = "provider_error"


class Unsupported(KeygateError):
    code = "unsupported"


class InvalidSignature(KeygateError):
    code = "invalid_signature"


class NotReady(KeygateError):
    code = "not_ready"


class InternalError(KeygateError):
    code = "internal"


# The token endpoint's codes (RFC 6749 §5.2, RFC 8693, RFC 9449).


class InvalidClient(KeygateError):
    """The agent's proof of identity was refused (unknown, suspended,
    a bad or replayed assertion)."""

    code = "invalid_client"


class InvalidGrant(KeygateError):
    code = "invalid_grant"


class InvalidScope(KeygateError):
    code = "invalid_scope"


class InvalidTarget(KeygateError):
    code = "invalid_target"


class UnsupportedGrantType(KeygateError):
    code = "unsupported_grant_type"


class InvalidDpopProof(KeygateError):
    code = "invalid_dpop_proof"


class ServerError(KeygateError):
    code = "server_error"


class TemporarilyUnavailable(KeygateError):
    code = "temporarily_unavailable"


#: Every stable code the broker documents (``ErrorCode`` in
#: ``/openapi.json``), to its class.
ERRORS: Dict[str, Type[KeygateError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        InvalidToken,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Conflict,
        PolicyDenied,
        TaskEnded,
        NotRenewable,
        PayloadTooLarge,
        UnsupportedMediaType,
        RateLimited,
        ProviderError,
        Unsupported,
        InvalidSignature,
        NotReady,
        InternalError,
        InvalidClient,
        InvalidGrant,
        InvalidScope,
        InvalidTarget,
        UnsupportedGrantType,
        InvalidDpopProof,
        ServerError,
        TemporarilyUnavailable,
    )
}


def from_answer(status: int, body: Any, retry_after: Optional[str]) -> KeygateError:
    """The error a refusal stands for. An unknown code still raises, as the
    base class with that code."""
    if not isinstance(body, dict):
        return TransportError(f"the broker answered {status} without a JSON error", status=status)
    code = str(body.get("error") or "error")
    message = str(body.get("message") or body.get("error_description") or "")
    details = {k: v for k, v in body.items() if k not in ("error", "message", "error_description")}
    wait: Optional[int] = None
    if retry_after is not None and retry_after.isdigit():
        wait = int(retry_after)
    cls = ERRORS.get(code, KeygateError)
    return cls(message, status=status, code=code, retry_after=wait, details=details)
