//! The broker's session tokens: ES256 JWTs naming the agent and its task.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::keys::{PublicKey, load_or_generate, public_jwk};
use super::{AuthError, describe_jwt_error};

/// Claims of a session token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
    /// The task (broker session) this token belongs to.
    pub task_id: String,
    /// For a delegated task (RFC 8693 §4.1): the agent that delegated, with
    /// its own delegator nested inside, up to the root orchestrator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<serde_json::Value>,
    /// DPoP binding (RFC 9449 §6): `{"jkt": <key thumbprint>}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<serde_json::Value>,
}

/// Signs and verifies session tokens with the broker's key.
pub struct SessionSigner {
    issuer: String,
    public: PublicKey,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSigner")
            .field("issuer", &self.issuer)
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl SessionSigner {
    /// Loads the signing key from `path`, generating it on first start.
    pub fn open(path: &Path, issuer: &str) -> Result<Self, AuthError> {
        let (pem, key) = load_or_generate(path)?;
        let public = public_jwk(&key)?;
        let encoding = EncodingKey::from_ec_pem(pem.expose_secret().as_bytes())
            .map_err(|e| AuthError::Key(format!("session signing key: {e}")))?;
        let x = public.jwk["x"].as_str().unwrap_or_default();
        let y = public.jwk["y"].as_str().unwrap_or_default();
        let decoding = DecodingKey::from_ec_components(x, y)
            .map_err(|e| AuthError::Key(format!("session verifying key: {e}")))?;
        Ok(Self {
            issuer: issuer.to_owned(),
            public,
            encoding,
            decoding,
        })
    }

    /// The JWKS relying parties use to verify session tokens.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [self.public.jwk] })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Signs a session token.
    pub fn sign(&self, claims: &SessionClaims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.public.kid.clone());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AuthError::Key(format!("signing: {e}")))
    }

    /// Verifies a session token's signature, issuer, audience and expiry.
    /// Whether its task is still open is the caller's check.
    pub fn verify(&self, token: &str) -> Result<SessionClaims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| describe_jwt_error(&e))?;
        if header.kid.as_deref() != Some(self.public.kid.as_str()) {
            return Err(AuthError::invalid(
                "the session token was not signed by this broker",
            ));
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.leeway = 5;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<SessionClaims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| describe_jwt_error(&e))
    }
}
