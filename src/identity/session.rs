//! The broker's session tokens: ES256 JWTs naming the agent and its task.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keygate_provider_api::jws::Es256Signer;
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

/// Seconds of clock skew an expiry is given.
const LEEWAY_SECS: i64 = 5;
/// Verified tokens remembered (by hash); past this, expired ones are
/// forgotten, and if that is not enough, all of them.
const VERIFIED_MAX: usize = 65_536;

/// Signs and verifies session tokens with the broker's key.
pub struct SessionSigner {
    issuer: String,
    public: PublicKey,
    /// Parsed once: each token costs one signature.
    signing: Es256Signer,
    decoding: DecodingKey,
    /// Tokens whose signature, issuer and audience were verified, by the
    /// SHA-256 of the whole token (never the token itself), with their
    /// claims: an agent presents the same token on every call of its task,
    /// and a P-256 verification is most of what a call costs in CPU. Only
    /// the exact bytes verified before hit; expiry is checked on every use.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], SessionClaims>>,
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
        let key = load_or_generate(path)?;
        let public = public_jwk(&key)?;
        let signing = Es256Signer::from_pkcs8(key.serialized_der())
            .map_err(|e| AuthError::Key(format!("session signing key: {e}")))?;
        let x = public.jwk["x"].as_str().unwrap_or_default();
        let y = public.jwk["y"].as_str().unwrap_or_default();
        let decoding = DecodingKey::from_ec_components(x, y)
            .map_err(|e| AuthError::Key(format!("session verifying key: {e}")))?;
        Ok(Self {
            issuer: issuer.to_owned(),
            public,
            signing,
            decoding,
            verified: Default::default(),
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
        self.signing
            .sign(Some(&self.public.kid), Some("at+jwt"), claims)
            .map_err(|e| AuthError::Key(format!("signing: {e}")))
    }

    /// Verifies a session token's signature, issuer, audience and expiry.
    /// Whether its task is still open is the caller's check.
    pub fn verify(&self, token: &str) -> Result<SessionClaims, AuthError> {
        use sha2::Digest as _;
        let key: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Ok(mut verified) = self.verified.lock()
            && let Some(claims) = verified.get(&key)
        {
            if claims.exp + LEEWAY_SECS >= now {
                return Ok(claims.clone());
            }
            // Expired: forgotten, and refused below with the reason.
            verified.remove(&key);
        }
        let claims = self.verify_afresh(token)?;
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= VERIFIED_MAX {
                verified.retain(|_, c| c.exp + LEEWAY_SECS >= now);
                if verified.len() >= VERIFIED_MAX {
                    verified.clear();
                }
            }
            verified.insert(key, claims.clone());
        }
        Ok(claims)
    }

    /// [`Self::verify`] without the memory of verified tokens: what the
    /// first sight of a token costs (the bench's crypto floor measures it).
    pub fn verify_afresh(&self, token: &str) -> Result<SessionClaims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| describe_jwt_error(&e))?;
        if header.kid.as_deref() != Some(self.public.kid.as_str()) {
            return Err(AuthError::invalid(
                "the session token was not signed by this broker",
            ));
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.leeway = LEEWAY_SECS.unsigned_abs();
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<SessionClaims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| describe_jwt_error(&e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod verified_memory_tests {
    use super::*;

    fn signer() -> (tempfile::TempDir, SessionSigner) {
        let dir = tempfile::tempdir().unwrap();
        let s = SessionSigner::open(&dir.path().join("session.pem"), "https://kg.test").unwrap();
        (dir, s)
    }

    fn claims(exp: i64) -> SessionClaims {
        SessionClaims {
            iss: "https://kg.test".into(),
            sub: "agent-1".into(),
            aud: "https://kg.test".into(),
            iat: exp - 60,
            exp,
            jti: "st_1".into(),
            task_id: "task_1".into(),
            act: None,
            cnf: None,
        }
    }

    #[test]
    fn a_remembered_token_still_refuses_any_other_bytes_and_its_own_expiry() {
        let (_dir, s) = signer();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = s.sign(&claims(now + 300)).unwrap();
        // Verified twice: the second from memory, the same claims.
        assert_eq!(s.verify(&token).unwrap(), s.verify(&token).unwrap());
        // Every other signature over the same claims is verified afresh and
        // refused, remembered token or not.
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut forged = sig.as_bytes().to_vec();
        forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
        let forged = format!("{head}.{}", String::from_utf8(forged).unwrap());
        assert!(s.verify(&forged).is_err());
        // Another broker's key over the same claims: refused.
        let (_d2, other) = signer();
        assert!(s.verify(&other.sign(&claims(now + 300)).unwrap()).is_err());

        // Past its expiry (and the leeway) a remembered token is refused.
        let short = s.sign(&claims(now - LEEWAY_SECS + 2)).unwrap();
        s.verify(&short).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3100));
        let e = s.verify(&short).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
    }
}
