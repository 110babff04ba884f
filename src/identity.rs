//! Who is calling: agents' client assertions (RFC 7523 `private_key_jwt`) and
//! the broker's own session tokens.

mod assertion;
pub mod dpop;
mod federation;
mod keys;
mod session;

pub use assertion::{
    AssertionClaims, sign_client_assertion, unverified_issuer, validate_public_jwks,
    verify_client_assertion,
};
pub use federation::{Federated, Federation, REFRESH_FLOOR as JWKS_REFRESH_FLOOR};
pub use keys::{PublicKey, generate_agent_key, write_private as write_private_file};
pub use session::{SessionClaims, SessionSigner};

/// Why an identity check failed. Messages are safe to return to the caller:
/// they describe the defect, never echo the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    InvalidToken(String),
    #[error("signing key problem: {0}")]
    Key(String),
    /// The check could not be made now (an issuer's keys cannot be
    /// fetched); the token may be fine, so the caller should retry.
    #[error("{0}")]
    Unavailable(String),
}

impl AuthError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidToken(msg.into())
    }
}

/// Maps jsonwebtoken's errors to messages a client can act on.
pub(crate) fn describe_jwt_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    let msg = match e.kind() {
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "the JWT is malformed".into(),
        K::InvalidSignature => "the JWT signature does not verify".into(),
        K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
            "the JWT `alg` is not supported (allowed: ES256, ES384, EdDSA, RS256, PS256)".into()
        }
        K::InvalidAlgorithm => "the JWT `alg` does not match the key".into(),
        K::MissingRequiredClaim(c) => format!("the JWT lacks the `{c}` claim"),
        K::InvalidClaimFormat(c) => format!("the JWT claim `{c}` has the wrong type"),
        K::ExpiredSignature => "the JWT has expired".into(),
        K::ImmatureSignature => "the JWT is not valid yet (`nbf` in the future)".into(),
        K::InvalidIssuer => "the JWT `iss` is wrong".into(),
        K::InvalidAudience => "the JWT `aud` does not name this broker".into(),
        K::InvalidSubject => "the JWT `sub` is wrong".into(),
        _ => "the JWT cannot be verified".into(),
    };
    AuthError::InvalidToken(msg)
}
