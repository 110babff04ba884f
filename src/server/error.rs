//! JSON errors: a stable code, a safe message; details go to the log once.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::broker::BrokerError;

/// RFC 9449 §7.1: the DPoP challenge, with the proof algorithms accepted
/// (those of `identity::assertion::ALLOWED`).
const DPOP_CHALLENGE: &str = "DPoP error=\"invalid_token\", algs=\"ES256 ES384 EdDSA RS256 PS256\"";

/// Every code a JSON API refusal may carry (`ErrorCode` in the OpenAPI
/// document; the Python client has a class for each). A new code is added
/// here first: debug builds refuse to answer with an unlisted one.
pub const ERROR_CODES: &[&str] = &[
    "invalid_request",
    "unauthorized",
    "invalid_token",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "conflict",
    "policy_denied",
    "task_ended",
    "not_renewable",
    "payload_too_large",
    "unsupported_media_type",
    "rate_limited",
    "provider_error",
    "unsupported",
    "invalid_signature",
    "not_ready",
    "temporarily_unavailable",
    "internal",
];

/// Every code the token endpoint answers with (RFC 6749 §5.2, RFC 8693,
/// RFC 9449, and `rate_limited`).
pub const OAUTH_ERROR_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "invalid_target",
    "unsupported_grant_type",
    "invalid_dpop_proof",
    "server_error",
    "temporarily_unavailable",
    "rate_limited",
];

/// An error answer: `{"error": "<code>", "message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<Box<serde_json::Value>>,
    /// A 401 for a DPoP-bound token challenges with the `DPoP` scheme
    /// (RFC 9449 §7.1) instead of `Bearer`.
    pub dpop_challenge: bool,
    /// Seconds for `Retry-After` (a 429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: None,
            dpop_challenge: false,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        e.retry_after = Some(retry_after_secs);
        e
    }

    /// Challenges with `WWW-Authenticate: DPoP …` if this is a 401.
    pub fn with_dpop_challenge(mut self) -> Self {
        self.dpop_challenge = true;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn invalid_token(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        use StatusCode as S;
        match e {
            BrokerError::InvalidRequest(m) => Self::new(S::BAD_REQUEST, "invalid_request", m),
            BrokerError::NotFound(m) => Self::new(S::NOT_FOUND, "not_found", m),
            BrokerError::Conflict(m) => Self::new(S::CONFLICT, "conflict", m),
            BrokerError::PolicyDenied { message, policies } => Self {
                status: S::FORBIDDEN,
                code: "policy_denied",
                message,
                extra: Some(Box::new(json!({ "policies": policies }))),
                dpop_challenge: false,
                retry_after: None,
            },
            BrokerError::Forbidden(m) => Self::new(S::FORBIDDEN, "forbidden", m),
            BrokerError::TaskEnded(m) => Self::new(S::CONFLICT, "task_ended", m),
            BrokerError::NotRenewable(m) => Self::new(S::BAD_REQUEST, "not_renewable", m),
            BrokerError::Provider(m) => {
                tracing::warn!(error = %m, "provider error");
                Self::new(S::BAD_GATEWAY, "provider_error", m)
            }
            BrokerError::RateLimited {
                message,
                retry_after_secs,
            } => Self::rate_limited(message, retry_after_secs),
            BrokerError::Unavailable(m) => {
                let mut e = Self::new(S::SERVICE_UNAVAILABLE, "temporarily_unavailable", m);
                e.retry_after = Some(1);
                e
            }
            BrokerError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the broker hit an internal error; see its log",
                )
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        BrokerError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        debug_assert!(
            ERROR_CODES.contains(&self.code),
            "`{}` is not in ERROR_CODES",
            self.code
        );
        let mut body = json!({ "error": self.code, "message": self.message });
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) =
            (self.extra.map(|e| *e), body.as_object_mut())
        {
            obj.extend(extra);
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let v = match (self.dpop_challenge, self.code == "invalid_token") {
                (true, _) => DPOP_CHALLENGE,
                (false, true) => "Bearer error=\"invalid_token\"",
                (false, false) => "Bearer",
            };
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
        }
        resp
    }
}

/// JSON body extractor whose rejections are JSON errors too.
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(JsonRejection::BytesRejection(_)) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large or unreadable",
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send `content-type: application/json`",
            )),
            Err(r) => Err(ApiError::bad_request(format!(
                "the body is not valid: {}",
                crate::limits::clip_message(&r.body_text())
            ))),
        }
    }
}

/// Parses a JSON body read as bytes, for handlers that must check the
/// caller's role before looking at the body.
/// A message that quotes the body is cut ([`crate::limits::clip_message`]).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not valid: {}",
            crate::limits::clip_message(&e.to_string())
        ))
    })
}

/// Parses a query string, after the role check, with a JSON error that
/// names the parameter at fault (`limit`: invalid digit found in string),
/// not only what went wrong.
pub fn parse_query<T: serde::de::DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let pairs = form_urlencoded::parse(query.unwrap_or("").as_bytes());
    serde_path_to_error::deserialize(serde_urlencoded::Deserializer::new(pairs)).map_err(|e| {
        let (path, inner) = (e.path().to_string(), e.inner().to_string());
        // An unknown field names itself already.
        let what = if path == "." || inner.contains(&format!("`{path}`")) {
            inner
        } else {
            format!("`{path}`: {inner}")
        };
        ApiError::bad_request(format!(
            "the query is not valid: {}",
            crate::limits::clip_message(&what)
        ))
    })
}
