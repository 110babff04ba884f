//! Agent-facing endpoints: the token endpoint and the session API.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::AgentSession;
use super::error::ApiJson;
use super::{ApiError, AppState};
use crate::broker::{OAuthError, TokenRequest};

/// `POST /oauth/token` (form-encoded). Errors follow RFC 6749 §5.2.
pub async fn token(
    State(b): State<AppState>,
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
    let req = match form {
        Ok(axum::Form(r)) => r,
        Err(e) => {
            let err = OAuthError::new(
                "invalid_request",
                format!(
                    "the body must be application/x-www-form-urlencoded: {}",
                    e.body_text()
                ),
            );
            b.record_auth_failure(None, &err).await;
            return oauth_error(StatusCode::BAD_REQUEST, err.error, &err.description);
        }
    };
    match b.token(req).await {
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
}

/// `POST /v1/credentials`.
pub async fn request_credential(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    ApiJson(body): ApiJson<CredentialBody>,
) -> Result<Response, ApiError> {
    let issued = b
        .request_credential(&s, &body.scope, body.ttl, body.params)
        .await?;
    let expires_at = issued
        .expires_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut body = json!({
        "lease_id": issued.lease_id,
        "scope": issued.scope,
        "provider": issued.provider,
        "expires_at": expires_at,
        "revocation": issued.revocability,
        // The one place a secret leaves the broker: straight to its agent.
        "credential": issued.credential.expose_to_agent(),
    });
    if let Some(note) = issued.note {
        body["note"] = note.into();
    }
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response())
}

/// `DELETE /v1/credentials/{lease_id}`.
pub async fn release(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    Path(lease_id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
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
    Ok(Json(b.renew(&s, &lease_id, body.increment).await?))
}

/// `POST /v1/tasks/complete`.
pub async fn complete(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(b.complete_task(&s).await?))
}
