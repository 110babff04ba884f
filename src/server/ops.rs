//! Operational and public endpoints: health, metrics, discovery, provider
//! documents; and request logging.

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiJson;
use super::openapi::PUBLIC;
use super::{ApiError, AppState};

#[utoipa::path(get, path = "/healthz", tag = PUBLIC,
    summary = "The process answers",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/readyz", tag = PUBLIC,
    summary = "The store answers and (several replicas) this replica holds its liveness lock",
    responses(
        (status = 200, description = "`ready`", content_type = "text/plain", body = String),
        (status = 503, description = "`not_ready`", body = super::openapi::ErrorBody),
    ))]
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

#[utoipa::path(get, path = "/metrics", tag = PUBLIC,
    summary = "Prometheus metrics (OpenMetrics text)",
    responses((status = 200, description = "The metrics", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(b): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.metrics.render(),
    )
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = PUBLIC,
    summary = "The keys session tokens are signed with",
    responses((status = 200, description = "A JWK set", body = Object)))]
pub async fn jwks(State(b): State<AppState>) -> Json<serde_json::Value> {
    Json(b.signer.jwks())
}

/// RFC 8414 authorization-server metadata.
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = PUBLIC,
    summary = "RFC 8414 metadata: `issuer` (DPoP `htu` base) and `token_endpoint` (client assertions' `aud`)",
    responses((status = 200, description = "The metadata", body = Object)))]
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
#[utoipa::path(get, path = "/v1/providers/{name}/{doc}", tag = PUBLIC,
    summary = "A provider's public document (the local CA's `crl`, `bundle`, `revoked.json`, `jwks`)",
    params(("name" = String, Path, description = "The provider"), ("doc" = String, Path, description = "The document")),
    responses((status = 200, description = "The document, in its own content type", body = String)))]
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
#[utoipa::path(post, path = "/v1/providers/{name}/verify", tag = PUBLIC,
    summary = "Check a credential as a relying party would, honouring revocation",
    params(("name" = String, Path, description = "The provider")),
    request_body(content = Object, description = "What the provider verifies (e.g. `{\"x509_svid\": PEM}` or `{\"jwt_svid\", \"audience\"}`)"),
    responses((status = 200, description = "`{valid, reason?, …}`", body = Object)))]
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
/// introspection and revocation endpoints, the Slack hook and the console's
/// sign-in. (Failed operator tokens at the API are limited where they fail,
/// `auth.rs`.)
pub async fn limit_by_address(State(b): State<AppState>, req: Request, next: Next) -> Response {
    let door = match req.uri().path() {
        "/oauth/token" => "token",
        "/oauth/introspect" => "introspect",
        "/oauth/revoke" => "revoke",
        "/v1/hooks/slack/interactions" => "slack",
        // The OIDC sign-in and its callback make Keygate call the issuer.
        "/ui/login" | "/ui/login/oidc" | "/ui/login/oidc/callback" => "console_login",
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
