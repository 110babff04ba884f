//! Calling Vault through vaultrs' request layer, and classifying failures.
//!
//! Every call goes `endpoint.with_middleware(..).exec(client.http())`, which
//! keeps the whole answer (`lease_id`, `lease_duration`, `auth`, `warnings`)
//! that vaultrs' convenience functions drop. Paths vaultrs has no typed
//! request for (`sys/leases/*`, `renew-self`) use [`Raw`], a plain rustify
//! endpoint on the same client.

use std::fmt;

use keygate_provider_api::ProviderError;
use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use rustify::errors::ClientError as RestError;
use serde_json::Value;

/// A Vault path vaultrs has no typed request for.
pub(crate) struct Raw {
    method: RequestMethod,
    path: String,
    body: Option<Value>,
}

impl Raw {
    pub(crate) fn get(path: impl Into<String>) -> Self {
        Self {
            method: RequestMethod::GET,
            path: path.into(),
            body: None,
        }
    }

    pub(crate) fn post(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: RequestMethod::POST,
            path: path.into(),
            body: Some(body),
        }
    }

    pub(crate) fn put(path: impl Into<String>, body: Value) -> Self {
        Self {
            method: RequestMethod::PUT,
            path: path.into(),
            body: Some(body),
        }
    }
}

#[async_trait::async_trait]
impl Endpoint for Raw {
    type Response = Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, RestError> {
        self.body
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| RestError::DataParseError { source: e.into() })
    }
}

/// Why a call to Vault failed. Messages carry Vault's `errors` list (never a
/// response body, which may hold secrets).
#[derive(Debug)]
pub(crate) enum VaultError {
    /// Vault could not be reached, or answered 5xx (sealed, standby, failing)
    /// or 429: retrying later may work.
    Unavailable(String),
    /// The request never reached Vault (connection refused, DNS, TLS).
    NotSent(String),
    /// Vault answered 4xx.
    Api { status: u16, errors: String },
    /// An answer we could not understand, or a local problem.
    Other(String),
}

impl fmt::Display for VaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(m) | Self::NotSent(m) | Self::Other(m) => f.write_str(m),
            Self::Api { status, errors } if errors.is_empty() => {
                write!(f, "vault answered {status}")
            }
            Self::Api { status, errors } => write!(f, "vault answered {status}: {errors}"),
        }
    }
}

impl VaultError {
    /// The 4xx status, if Vault answered one.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether Vault's error text mentions `needle` (lower case).
    pub(crate) fn mentions(&self, needle: &str) -> bool {
        matches!(self, Self::Api { errors, .. } if errors.to_lowercase().contains(needle))
    }

    /// Maps to the provider error the broker understands, prefixed with
    /// what Keygate was doing.
    pub(crate) fn into_provider(self, doing: &str) -> ProviderError {
        let msg = format!("{doing}: {self}");
        match self {
            Self::Unavailable(_) => ProviderError::Unavailable(msg),
            Self::NotSent(_) => ProviderError::NotSent(msg),
            Self::Api { .. } => ProviderError::Refused(msg),
            Self::Other(_) => ProviderError::Internal(msg),
        }
    }
}

/// Longest Vault error text kept in a message.
const MAX_ERROR_TEXT: usize = 300;

/// Classifies a rustify error. Only Vault's `errors` strings are kept from a
/// failed answer; rustify errors that carry a body are reduced to their
/// one-line description.
pub(crate) fn classify(e: RestError) -> VaultError {
    match e {
        RestError::ServerResponseError { code, content } => {
            let errors = content
                .as_deref()
                .and_then(|c| serde_json::from_str::<Value>(c).ok())
                .and_then(|v| {
                    v.get("errors").and_then(Value::as_array).map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                })
                .unwrap_or_default();
            let errors: String = errors.chars().take(MAX_ERROR_TEXT).collect();
            if code >= 500 || code == 429 {
                VaultError::Unavailable(if errors.is_empty() {
                    format!("vault answered {code}")
                } else {
                    format!("vault answered {code}: {errors}")
                })
            } else {
                VaultError::Api {
                    status: code,
                    errors,
                }
            }
        }
        // A connection that never opened (refused, unresolved, TLS refused)
        // carried no request: Vault did nothing.
        RestError::RequestError { source, .. }
            if source.chain().any(|c| {
                c.downcast_ref::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_connect)
            }) =>
        {
            VaultError::NotSent(format!("cannot reach vault: {source:#}"))
        }
        RestError::RequestError { source, .. } | RestError::ResponseError { source } => {
            VaultError::Unavailable(format!("cannot reach vault: {source:#}"))
        }
        // Parse errors keep the body in a field; only the description is used.
        other => VaultError::Other(format!("vault call failed: {other}")),
    }
}

/// Parses a response body (empty for 204) as JSON.
pub(crate) fn body_json(bytes: &[u8]) -> Result<Value, VaultError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|_| VaultError::Other("vault answered with something that is not JSON".into()))
}

/// A string field at a JSON pointer, or an error naming it.
pub(crate) fn str_at<'a>(v: &'a Value, pointer: &str) -> Result<&'a str, VaultError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .ok_or_else(|| VaultError::Other(format!("vault's answer lacks `{pointer}`")))
}

/// A number field at a JSON pointer, or an error naming it.
pub(crate) fn u64_at(v: &Value, pointer: &str) -> Result<u64, VaultError> {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .ok_or_else(|| VaultError::Other(format!("vault's answer lacks `{pointer}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_only_the_errors_list() {
        let e = classify(RestError::ServerResponseError {
            code: 400,
            content: Some(r#"{"errors":["1 error occurred:\n\t* invalid accessor\n\n"],"data":{"password":"hunter2"}}"#.into()),
        });
        assert_eq!(
            e.to_string(),
            "vault answered 400: 1 error occurred: * invalid accessor"
        );
        assert!(e.mentions("invalid accessor"));
        let e = classify(RestError::ServerResponseError {
            code: 503,
            content: Some(r#"{"errors":["Vault is sealed"]}"#.into()),
        });
        assert!(matches!(e, VaultError::Unavailable(_)), "{e}");
        let e = classify(RestError::ResponseParseError {
            source: std::io::Error::other("x").into(),
            content: Some("hunter2".into()),
        });
        assert!(!format!("{e} {e:?}").contains("hunter2"));
    }
}
