//! Operational and public endpoints: health, metrics, discovery, provider
//! documents; and request logging.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiJson;
use super::{ApiError, AppState};

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(b): State<AppState>) -> Result<&'static str, ApiError> {
    b.store.ping().await.map_err(|e| {
        tracing::error!(error = %e, "store not ready");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the store does not answer",
        )
    })?;
    Ok("ready")
}

pub async fn metrics(State(b): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.metrics.render(),
    )
}

pub async fn jwks(State(b): State<AppState>) -> Json<serde_json::Value> {
    Json(b.signer.jwks())
}

/// RFC 8414 authorization-server metadata.
pub async fn metadata(State(b): State<AppState>) -> Json<serde_json::Value> {
    let issuer = b.config.server.issuer.trim_end_matches('/');
    let mut auth_methods = vec!["private_key_jwt"];
    let mtls = b.config.server.tls.is_some();
    if mtls {
        auth_methods.push("tls_client_auth");
    }
    Json(json!({
        "issuer": b.config.server.issuer,
        "token_endpoint": b.config.token_endpoint(),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials", crate::broker::JWT_BEARER_GRANT, crate::broker::TOKEN_EXCHANGE],
        "dpop_signing_alg_values_supported": ["ES256", "ES384", "EdDSA", "RS256", "PS256"],
        "introspection_endpoint": format!("{}/oauth/introspect", b.config.server.issuer.trim_end_matches('/')),
        "revocation_endpoint": format!("{}/oauth/revoke", b.config.server.issuer.trim_end_matches('/')),
        "token_endpoint_auth_methods_supported": auth_methods,
        // RFC 8705 §3.3: tokens bound to the client certificate over mTLS.
        "tls_client_certificate_bound_access_tokens": mtls,
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "ES384", "EdDSA", "RS256", "PS256"],
        "response_types_supported": [],
    }))
}

/// `GET /v1/providers/{name}/{doc}`: a provider's public document (CRL, bundle).
pub async fn provider_document(
    State(b): State<AppState>,
    Path((name, doc)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let p = b
        .registry
        .provider(&name)
        .ok_or_else(|| ApiError::not_found(format!("no provider `{name}`")))?;
    let d = p
        .document(&doc)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "provider_error", e.to_string()))?
        .ok_or_else(|| ApiError::not_found(format!("provider `{name}` publishes no `{doc}`")))?;
    let mut resp = (StatusCode::OK, d.body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(d.content_type),
    );
    Ok(resp)
}

/// `POST /v1/providers/{name}/verify`: checks a credential as a relying party
/// would, honouring revocation.
pub async fn provider_verify(
    State(b): State<AppState>,
    Path(name): Path<String>,
    ApiJson(presented): ApiJson<serde_json::Value>,
) -> Result<impl IntoResponse, ApiError> {
    let p = b
        .registry
        .provider(&name)
        .ok_or_else(|| ApiError::not_found(format!("no provider `{name}`")))?;
    let v = p.verify(&presented).await.map_err(|e| match e {
        keygate_provider_api::ProviderError::Unsupported(m) => ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported",
            format!("not supported: {m}"),
        ),
        other => ApiError::new(StatusCode::BAD_GATEWAY, "provider_error", other.to_string()),
    })?;
    Ok(Json(v))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Logs each request with an allow-list of fields: method, matched route,
/// status, latency. Never headers, query strings or bodies.
pub async fn log_requests(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        route,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

/// Rate-limits the unauthenticated doors by source address, before anything
/// else runs (authentication, body parsing, audit writes): the token,
/// introspection and revocation endpoints and the Slack hook.
pub async fn limit_by_address(State(b): State<AppState>, req: Request, next: Next) -> Response {
    let door = match req.uri().path() {
        "/oauth/token" => "token",
        "/oauth/introspect" => "introspect",
        "/oauth/revoke" => "revoke",
        "/v1/hooks/slack/interactions" => "slack",
        _ => return next.run(req).await,
    };
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<super::ClientConn>>()
        .map(|c| c.0.addr.ip());
    let Some(source) = source else {
        return next.run(req).await;
    };
    match b.limits.check_address(door, source) {
        Ok(()) => next.run(req).await,
        Err(l) => {
            b.metrics.limited(l.limit);
            let secs = l.retry_after_secs();
            let message = format!(
                "too many requests from this address to {}; retry in {secs} s",
                req.uri().path()
            );
            let mut e = ApiError::rate_limited(message.clone(), secs);
            if door != "slack" {
                // The OAuth endpoints' error shape (RFC 6749 §5.2).
                e.extra = Some(Box::new(
                    serde_json::json!({ "error_description": message }),
                ));
            }
            e.into_response()
        }
    }
}

/// One JSON error contract: a rejection axum answers in plain text (a body
/// over the limit, a wrong method or content type, a malformed path) is
/// rewritten as `{"error", "message"}` with the same status.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message).into_response();
    // Keep what the original answer said beyond its body (e.g. `Allow`).
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
