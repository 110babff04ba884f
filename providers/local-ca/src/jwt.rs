//! JWT-SVIDs: ES256 tokens signed with a dedicated key, and their JWKS.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keygate_provider_api::jws::Es256Signer;
use keygate_provider_api::{ProviderError, Verification};
use rcgen::PublicKeyData as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{keys, verdict};

/// The JWT-SVID signing key and what relying parties need to check it.
pub(crate) struct JwtKeys {
    /// Parsed once: each JWT-SVID costs one signature.
    signing: Es256Signer,
    decoding: DecodingKey,
    kid: String,
    /// The public key's affine coordinates, base64url, for the JWKS.
    x: String,
    y: String,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKeys")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: i64,
    iat: i64,
    jti: &'a str,
}

/// Claims as presented; `aud` may be a string or a list (RFC 7519 §4.1.3).
#[derive(Deserialize)]
struct PresentedClaims {
    sub: String,
    aud: Audience,
    exp: i64,
    jti: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl JwtKeys {
    /// Loads the JWT key, generating it on first start.
    pub(crate) fn open(path: &Path) -> Result<Self, ProviderError> {
        let key = keys::load_or_generate_key(path, "jwt key")?;
        let point = key.public_key_raw();
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        let (x, y) = match point {
            [0x04, xy @ ..] if xy.len() == 64 => xy.split_at(32),
            _ => {
                return Err(ProviderError::Internal(
                    "jwt key has an unexpected public key encoding".into(),
                ));
            }
        };
        Ok(Self {
            signing: Es256Signer::from_pkcs8(key.serialized_der())
                .map_err(|e| ProviderError::Internal(format!("jwt key: {e}")))?,
            decoding: DecodingKey::from_ec_der(point),
            kid: keys::key_id(&key.subject_public_key_info()),
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
        })
    }

    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWK Set relying parties fetch to check JWT-SVIDs.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": self.x,
                "y": self.y,
                "kid": self.kid,
                "use": "sig",
                "alg": "ES256",
            }]
        })
    }

    /// Signs a JWT-SVID. `jti` is the lease id, so a lease whose handle was
    /// never recorded can still be revoked.
    pub(crate) fn sign(
        &self,
        spiffe_id: &str,
        audiences: &[String],
        jti: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<SecretString, ProviderError> {
        let claims = Claims {
            sub: spiffe_id,
            aud: audiences,
            exp: expires_at.unix_timestamp(),
            iat: now.unix_timestamp(),
            jti,
        };
        self.signing
            .sign(Some(&self.kid), Some("JWT"), &claims)
            .map(SecretString::from)
            .map_err(|e| ProviderError::Internal(format!("cannot sign the jwt-svid: {e}")))
    }

    /// Checks a presented token as a relying party for `audience` would.
    /// The token itself never appears in the result or in logs.
    pub(crate) fn verify(
        &self,
        token: &str,
        audience: &str,
        now: OffsetDateTime,
        is_revoked: impl Fn(&str) -> bool,
    ) -> Verification {
        // Checked before jsonwebtoken sees the token so `alg: none` and
        // foreign algorithms read as a bad signature, not as garbage.
        match header_alg_and_kid(token) {
            None => return verdict::invalid("malformed"),
            Some((alg, kid)) => {
                if alg != "ES256" || kid.is_some_and(|k| k != self.kid) {
                    return verdict::invalid("bad_signature");
                }
            }
        }
        let mut validation = Validation::new(Algorithm::ES256);
        // Expiry and audience are checked below, to report them separately.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let claims =
            match jsonwebtoken::decode::<PresentedClaims>(token, &self.decoding, &validation) {
                Ok(data) => data.claims,
                Err(e) => {
                    return verdict::invalid(match e.kind() {
                        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                            "bad_signature"
                        }
                        _ => "malformed",
                    });
                }
            };
        let expires_at = OffsetDateTime::from_unix_timestamp(claims.exp).ok();
        let audience_ok = match &claims.aud {
            Audience::One(a) => a == audience,
            Audience::Many(list) => list.iter().any(|a| a == audience),
        };
        let reason = if expires_at.is_none() {
            Some("malformed")
        } else if claims.exp <= now.unix_timestamp() {
            Some("expired")
        } else if is_revoked(&claims.jti) {
            Some("revoked")
        } else if !audience_ok {
            Some("wrong_audience")
        } else {
            None
        };
        verdict::with_reason(reason, Some(claims.sub), expires_at)
    }
}

/// The header's `alg` and `kid`, or `None` if the header is not readable.
fn header_alg_and_kid(token: &str) -> Option<(String, Option<String>)> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let alg = header.get("alg")?.as_str()?.to_owned();
    let kid = match header.get("kid") {
        None => None,
        Some(k) => Some(k.as_str()?.to_owned()),
    };
    Some((alg, kid))
}
