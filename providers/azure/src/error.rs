//! Entra and Graph failures as provider errors: what was refused and why, in
//! the backend's own words (never a secret, never a response body that could
//! hold one), classified as transient or definitive.

use azure_core::error::ErrorKind;
use keygate_provider_api::ProviderError;
use serde::Deserialize;

/// The longest backend message kept in an error.
const MAX_MESSAGE: usize = 400;

/// Whether an HTTP status means "try again later".
pub(crate) fn transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// A failed token request (`what`: whose token, for what) as a provider
/// error: Entra's answer when it gave one, else what broke on the way.
pub(crate) fn from_entra(what: &str, e: &azure_core::Error) -> ProviderError {
    let text = format!("entra token request for {what} failed: {}", chain(e));
    match classify(e) {
        Class::Transient => ProviderError::Unavailable(text),
        Class::Refused => ProviderError::Refused(text),
        Class::Other => ProviderError::Internal(text),
    }
}

/// Whether Entra itself refused the credential (so a secret read by
/// reference may have been rotated and should be read again).
pub(crate) fn entra_refused(e: &azure_core::Error) -> bool {
    matches!(classify(e), Class::Refused)
}

enum Class {
    Transient,
    Refused,
    Other,
}

/// Looks through azure_core's wrapping (a credential error around the HTTP
/// or connection error) for what actually happened.
fn classify(e: &azure_core::Error) -> Class {
    let mut cur = Some(e);
    while let Some(err) = cur {
        match err.kind() {
            ErrorKind::HttpResponse { status, .. } => {
                return if transient_status(u16::from(*status)) {
                    Class::Transient
                } else {
                    Class::Refused
                };
            }
            ErrorKind::Connection | ErrorKind::Io => return Class::Transient,
            _ => cur = err.downcast_ref::<azure_core::Error>(),
        }
    }
    Class::Other
}

/// Every distinct message in the error's source chain, joined: azure_core's
/// own message ("failed to execute `reqwest` request") says little without
/// reqwest's underneath it.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        let msg = msg.trim();
        if !msg.is_empty() && !parts.iter().any(|p| p.contains(msg)) {
            parts.push(msg.to_owned());
        }
        cur = err.source();
    }
    truncate(&parts.join(": "))
}

/// A Graph error body: `{"error": {"code", "message"}}`.
#[derive(Debug, Default, Deserialize)]
struct GraphErrorBody {
    #[serde(default)]
    error: GraphError,
}

#[derive(Debug, Default, Deserialize)]
struct GraphError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// A non-2xx Graph answer to `operation` as a provider error. Only the error
/// object's `code` and `message` are read from the body.
pub(crate) fn from_graph(operation: &str, status: u16, body: &[u8]) -> ProviderError {
    let parsed: GraphErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let code = if parsed.error.code.is_empty() {
        "no error code".to_owned()
    } else {
        parsed.error.code
    };
    let message = if parsed.error.message.is_empty() {
        "no message".to_owned()
    } else {
        truncate(&parsed.error.message)
    };
    let text = format!("graph `{operation}` answered {status} {code}: {message}");
    if transient_status(status) {
        ProviderError::Unavailable(text)
    } else {
        ProviderError::Refused(text)
    }
}

/// A Graph call that got no answer.
pub(crate) fn from_transport(operation: &str, e: &reqwest::Error) -> ProviderError {
    ProviderError::Unavailable(format!("graph `{operation}` got no answer: {}", chain(e)))
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn graph_errors_name_code_and_message_only() {
        let body = br#"{"error":{"code":"Authorization_RequestDenied","message":"Insufficient privileges to complete the operation.","innerError":{"secretText":"leaked?"}}}"#;
        let e = from_graph("addPassword", 403, body);
        assert!(matches!(e, ProviderError::Refused(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("403 Authorization_RequestDenied: Insufficient privileges"),
            "{text}"
        );
        assert!(!text.contains("leaked"), "{text}");
        assert!(matches!(
            from_graph("removePassword", 503, b"<html>busy</html>"),
            ProviderError::Unavailable(_)
        ));
        let e = from_graph("addPassword", 429, b"");
        assert!(e.is_transient());
        assert!(e.to_string().contains("no error code"), "{e}");
        let long = format!(
            r#"{{"error":{{"code":"X","message":"{}"}}}}"#,
            "a".repeat(5000)
        );
        assert!(from_graph("x", 400, long.as_bytes()).to_string().len() < 600);
    }

    #[test]
    fn entra_errors_are_classified_through_the_wrapping() {
        use azure_core::http::StatusCode;
        let http = azure_core::Error::new(
            ErrorKind::HttpResponse {
                status: StatusCode::Unauthorized,
                error_code: Some("7000215".into()),
                raw_response: None,
            },
            "AADSTS7000215: Invalid client secret provided.",
        );
        let wrapped = azure_core::Error::with_error(
            ErrorKind::Credential,
            http,
            "ClientSecretCredential authentication failed. AADSTS7000215: Invalid client secret provided.",
        );
        let e = from_entra("keygate", &wrapped);
        assert!(matches!(e, ProviderError::Refused(_)), "{e:?}");
        assert!(entra_refused(&wrapped));
        let down = azure_core::Error::with_error(
            ErrorKind::Credential,
            azure_core::Error::with_message(ErrorKind::Connection, "connection refused"),
            "ClientSecretCredential authentication failed.",
        );
        let e = from_entra("keygate", &down);
        assert!(e.is_transient(), "{e:?}");
        assert!(e.to_string().contains("connection refused"), "{e}");
    }
}
