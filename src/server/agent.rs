//! Agent-facing endpoints: the token endpoint and the session API.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::auth::{AgentSession, Caller, Operator, PeerAddr, PeerCert};
use super::error::{ApiJson, OAUTH_ERROR_CODES};
use super::openapi::{AGENT, OAUTH};
use super::{ApiError, AppState};
use crate::audit::Actor;
use crate::broker::{
    CompletedTask, CredentialAsk, CredentialOutcome, IssuedCredential, OAuthError, ReleasedLease,
    RenewedLease, TokenRequest, TokenResponse,
};
use crate::config::Role;
use crate::model::{Revocability, Task};

/// `POST /oauth/token` (form-encoded). Errors follow RFC 6749 §5.2.
#[utoipa::path(post, path = "/oauth/token", tag = OAUTH,
    summary = "Open a task: client_credentials (private_key_jwt or mTLS), a federated JWT bearer, or an RFC 8693 token exchange",
    description = "A `DPoP` header binds the session token to the proof's key (`token_type: DPoP`).",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A session token for the new task", body = TokenResponse),
        (status = 400, description = "Refused (RFC 6749 §5.2)", body = super::openapi::OAuthErrorBody),
        (status = 401, description = "The client's proof of identity was refused", body = super::openapi::OAuthErrorBody),
        (status = 429, description = "Too many token requests (`Retry-After`)", body = super::openapi::OAuthErrorBody),
    ))]
pub async fn token(
    State(b): State<AppState>,
    PeerCert(cert): PeerCert,
    PeerAddr(source): PeerAddr,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<TokenRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        debug_assert!(
            OAUTH_ERROR_CODES.contains(&error),
            "`{error}` is not listed"
        );
        (
            status,
            [(axum::http::header::CACHE_CONTROL, "no-store")],
            Json(json!({ "error": error, "error_description": description })),
        )
            .into_response()
    };
    let mut req = match form {
        Ok(axum::Form(r)) => r,
        Err(e) => {
            let err = OAuthError::new(
                "invalid_request",
                format!(
                    "the body must be application/x-www-form-urlencoded: {}",
                    crate::limits::clip_message(&e.body_text())
                ),
            );
            b.record_auth_failure(source, None, &err).await;
            return oauth_error(StatusCode::BAD_REQUEST, err.error, &err.description);
        }
    };
    req.client_cert = cert;
    req.source = source;
    if let Some(cid) = req.client_id.as_deref().filter(|c| !c.is_empty())
        && let Err(l) = b.limits.check_client(cid)
    {
        b.metrics.limited(l.limit);
        let secs = l.retry_after_secs();
        let mut resp = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("too many token requests for this client_id; retry in {secs} s"),
        );
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, secs.into());
        return resp;
    }
    let dpop = headers.get("dpop").and_then(|v| v.to_str().ok());
    match b.token(req, dpop).await {
        Ok(resp) => (
            StatusCode::OK,
            [(axum::http::header::CACHE_CONTROL, "no-store")],
            Json(resp),
        )
            .into_response(),
        Err(e) => {
            let status = match e.error {
                "invalid_client" => StatusCode::UNAUTHORIZED,
                "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
                "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            oauth_error(status, e.error, &e.description)
        }
    }
}

/// Who a session token belongs to.
#[derive(Serialize, ToSchema)]
pub struct WhoAmI {
    pub agent: String,
    pub task: Task,
}

/// `GET /v1/session`: who the token belongs to.
#[utoipa::path(get, path = "/v1/session", tag = AGENT,
    responses((status = 200, description = "The agent and its task", body = WhoAmI)))]
pub async fn whoami(AgentSession(s): AgentSession) -> Json<WhoAmI> {
    Json(WhoAmI {
        agent: s.agent.id.clone(),
        task: s.task.clone(),
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    scope: String,
    /// Seconds; the scope's default when absent, never past its `max_ttl_secs`.
    ttl: Option<u64>,
    /// Provider-specific request parameters (e.g. a JWT-SVID `audience`).
    #[serde(default)]
    #[schema(value_type = Object)]
    params: serde_json::Value,
    /// Why the credential is needed; shown to approvers of sensitive scopes.
    justification: Option<String>,
}

/// An issued credential, as its agent receives it.
#[derive(Serialize, ToSchema)]
pub struct IssuedBody {
    pub lease_id: String,
    pub scope: String,
    pub provider: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// How its backend ends it early, if at all.
    pub revocation: Revocability,
    /// The credential's fields as its provider names them (`certificate`,
    /// `private_key`, `access_key_id`, `token`…): the one place a secret
    /// leaves the broker.
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
    /// Set when the credential outlives the lease asked for (its backend
    /// fixes its lifetime).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The 201 answer carrying a credential.
pub(super) fn issued_body(issued: &IssuedCredential) -> Response {
    let body = IssuedBody {
        lease_id: issued.lease_id.clone(),
        scope: issued.scope.clone(),
        provider: issued.provider.clone(),
        expires_at: issued.expires_at,
        revocation: issued.revocability,
        // Straight to its agent.
        credential: issued.credential.expose_to_agent(),
        note: issued.note.clone(),
    };
    (
        StatusCode::CREATED,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// `POST /v1/credentials`: 201 with the credential, or 202 with an
/// approval to wait for when the scope is sensitive.
#[utoipa::path(post, path = "/v1/credentials", tag = AGENT,
    request_body = CredentialBody,
    responses(
        (status = 201, description = "The credential", body = IssuedBody),
        (status = 202, description = "The scope is sensitive: wait for the approval, then redeem it", body = super::approvals::AgentApprovalView),
        (status = 403, description = "`policy_denied` (with the deciding `policies`) or `forbidden`", body = super::openapi::ErrorBody),
    ))]
pub async fn request_credential(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    ApiJson(body): ApiJson<CredentialBody>,
) -> Result<Response, ApiError> {
    b.check_agent_rate(&s.agent.id)?;
    let ask = CredentialAsk {
        scope: body.scope,
        ttl: body.ttl,
        params: body.params,
        justification: body.justification,
    };
    match b.request_credential(&s, ask).await? {
        CredentialOutcome::Issued(issued) => Ok(issued_body(&issued)),
        CredentialOutcome::Pending(a) => {
            let mut view = super::approvals::agent_view(&a);
            view.message = Some(format!(
                "scope is sensitive: wait for approval (GET /v1/approvals/{0}?wait=30), then POST /v1/approvals/{0}/redeem",
                a.id
            ));
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
    }
}

/// `DELETE /v1/credentials/{lease_id}`.
#[utoipa::path(delete, path = "/v1/credentials/{lease_id}", tag = AGENT,
    summary = "Release (revoke) one credential of the task before it ends",
    params(("lease_id" = String, Path, description = "The credential's lease")),
    responses((status = 200, description = "What became of it", body = ReleasedLease)))]
pub async fn release(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    Path(lease_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    b.check_agent_rate(&s.agent.id)?;
    Ok(Json(b.release(&s, &lease_id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// Requested lifetime from now, in seconds.
    increment: u64,
}

/// `POST /v1/credentials/{lease_id}/renew`.
#[utoipa::path(post, path = "/v1/credentials/{lease_id}/renew", tag = AGENT,
    summary = "Extend a renewable credential (capped by the scope's max_ttl and the task's expiry); others: `not_renewable`",
    params(("lease_id" = String, Path, description = "The credential's lease")),
    request_body = RenewBody,
    responses((status = 200, description = "Its new expiry", body = RenewedLease)))]
pub async fn renew(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    Path(lease_id): Path<String>,
    ApiJson(body): ApiJson<RenewBody>,
) -> Result<impl IntoResponse, ApiError> {
    b.check_agent_rate(&s.agent.id)?;
    Ok(Json(b.renew(&s, &lease_id, body.increment).await?))
}

/// `POST /v1/tasks/complete`.
#[utoipa::path(post, path = "/v1/tasks/complete", tag = AGENT,
    summary = "End the task: every credential of it is revoked, the session token dies",
    responses((status = 200, description = "The task and its leases' revocation", body = CompletedTask)))]
pub async fn complete(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(b.complete_task(&s).await?))
}

/// The form of `/oauth/introspect` and `/oauth/revoke`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenForm {
    token: Option<String>,
    // `token_type_hint` is accepted and ignored: Keygate has one token type.
}

fn token_field(
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<String, ApiError> {
    let axum::Form(f) = form.map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be application/x-www-form-urlencoded: {}",
            crate::limits::clip_message(&e.body_text())
        ))
    })?;
    f.token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("`token` is required"))
}

/// `POST /oauth/introspect` (RFC 7662), for resource servers: an operator
/// token with the `introspector`, `admin` or `secops` role.
#[utoipa::path(post, path = "/oauth/introspect", tag = OAUTH,
    summary = "RFC 7662 introspection (operators: introspector, admin, secops)",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "`active`, and for an active token its claims (`cnf.jkt` when DPoP-bound)", body = Object)),
    security(("operator" = [])))]
pub async fn introspect(
    State(b): State<AppState>,
    op: Operator,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    op.require(&[Role::Introspector, Role::Admin, Role::Secops])?;
    let token = token_field(form)?;
    Ok((
        StatusCode::OK,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(b.introspect(&token).await),
    )
        .into_response())
}

/// `POST /oauth/revoke` (RFC 7009): by the token's own holder (the same
/// token as bearer) or by secops/admin. Unknown tokens answer 200 too.
#[utoipa::path(post, path = "/oauth/revoke", tag = OAUTH,
    summary = "RFC 7009 revocation of a session token, by its holder or by secops/admin",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, description = "Revoked, or unknown")),
    security(("session" = []), ("operator" = [])))]
pub async fn revoke_token(
    State(b): State<AppState>,
    caller: Caller,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, ApiError> {
    let token = token_field(form)?;
    let actor = match &caller {
        Caller::Operator(op) => {
            op.require(&[Role::Secops, Role::Admin])?;
            op.actor()
        }
        Caller::Agent(s) => {
            let own = b
                .signer
                .verify(&token)
                .is_ok_and(|c| c.task_id == s.task.id);
            if !own {
                return Err(ApiError::forbidden(
                    "an agent may revoke only the session token it presents",
                ));
            }
            Actor::Agent(s.agent.id.clone())
        }
    };
    b.revoke_session_token(&actor, &token).await?;
    Ok(StatusCode::OK.into_response())
}
