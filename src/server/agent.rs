//! Agent-facing endpoints: the token endpoint and the session API.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::{AgentSession, Caller, Operator, PeerAddr, PeerCert};
use super::error::ApiJson;
use super::{ApiError, AppState};
use crate::audit::Actor;
use crate::broker::{CredentialAsk, CredentialOutcome, IssuedCredential, OAuthError, TokenRequest};
use crate::config::Role;

/// `POST /oauth/token` (form-encoded). Errors follow RFC 6749 §5.2.
pub async fn token(
    State(b): State<AppState>,
    PeerCert(cert): PeerCert,
    PeerAddr(source): PeerAddr,
    headers: axum::http::HeaderMap,
    form: Result<axum::Form<TokenRequest>, axum::extract::rejection::FormRejection>,
) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
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

/// `GET /v1/session`: who the token belongs to.
pub async fn whoami(AgentSession(s): AgentSession) -> Json<serde_json::Value> {
    Json(json!({ "agent": s.agent.id, "task": s.task }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    scope: String,
    ttl: Option<u64>,
    /// Provider-specific request parameters (e.g. a JWT-SVID `audience`).
    #[serde(default)]
    params: serde_json::Value,
    /// Why the credential is needed; shown to approvers of sensitive scopes.
    justification: Option<String>,
}

/// The 201 answer carrying a credential.
pub(super) fn issued_body(issued: &IssuedCredential) -> Response {
    let mut body = json!({
        "lease_id": issued.lease_id,
        "scope": issued.scope,
        "provider": issued.provider,
        "expires_at": crate::model::rfc3339(issued.expires_at),
        "revocation": issued.revocability,
        // The one place a secret leaves the broker: straight to its agent.
        "credential": issued.credential.expose_to_agent(),
    });
    if let Some(note) = &issued.note {
        body["note"] = note.clone().into();
    }
    (
        StatusCode::CREATED,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// `POST /v1/credentials`: 201 with the credential, or 202 with an
/// approval to wait for when the scope is sensitive.
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
            view["message"] = json!(format!(
                "scope is sensitive: wait for approval (GET /v1/approvals/{0}?wait=30), then POST /v1/approvals/{0}/redeem",
                a.id
            ));
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
    }
}

/// `DELETE /v1/credentials/{lease_id}`.
pub async fn release(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    Path(lease_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    b.check_agent_rate(&s.agent.id)?;
    Ok(Json(b.release(&s, &lease_id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    /// Requested lifetime from now, in seconds.
    increment: u64,
}

/// `POST /v1/credentials/{lease_id}/renew`.
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
pub async fn complete(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(b.complete_task(&s).await?))
}

/// The form of `/oauth/introspect` and `/oauth/revoke`.
#[derive(Debug, Deserialize)]
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
