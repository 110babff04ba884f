//! DPoP (RFC 9449): proof-of-possession for session tokens. An agent that
//! presents a DPoP proof at the token endpoint gets a token bound to its key
//! (`cnf.jkt`); every later call must carry a fresh proof by the same key for
//! that method and URL, over that token (`ath`). A stolen token alone is useless.
//!
//! This module checks a proof's form and signature; replay (`jti`) is the
//! caller's check against the store.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuthError;
// The same asymmetric algorithms as client assertions.
use super::assertion::ALLOWED;

/// How far a proof's `iat` may be from now.
pub const MAX_SKEW_SECS: i64 = 60;

#[derive(Debug, Deserialize)]
struct ProofClaims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<i64>,
    ath: Option<String>,
}

/// A verified proof: the key's thumbprint and the proof's `jti`.
#[derive(Debug, Clone)]
pub struct Proof {
    pub jkt: String,
    pub jti: String,
    pub iat: i64,
}

/// RFC 7638 thumbprint of a public JWK: SHA-256 over its required members
/// in lexicographic order, base64url.
pub fn thumbprint(jwk: &Jwk) -> Result<String, AuthError> {
    let canonical = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => {
            let crv = serde_json::to_value(&ec.curve)
                .map_err(|_| AuthError::invalid("DPoP key: unknown curve"))?;
            format!(
                r#"{{"crv":{},"kty":"EC","x":"{}","y":"{}"}}"#,
                crv, ec.x, ec.y
            )
        }
        AlgorithmParameters::RSA(rsa) => {
            format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, rsa.e, rsa.n)
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            let crv = serde_json::to_value(&okp.curve)
                .map_err(|_| AuthError::invalid("DPoP key: unknown curve"))?;
            format!(r#"{{"crv":{},"kty":"OKP","x":"{}"}}"#, crv, okp.x)
        }
        _ => {
            return Err(AuthError::invalid(
                "DPoP key: only EC, RSA and OKP public keys can prove possession",
            ));
        }
    };
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// Whether the proof header's `jwk` holds private key members (`d` for EC
/// and OKP; `p`, `q`, `dp`, `dq`, `qi`, `oth` for RSA; `k` for a symmetric
/// key). The parsed [`Jwk`] drops them, so the raw header is read.
fn jwk_has_private_members(proof: &str) -> bool {
    let Some(Ok(bytes)) = proof.split('.').next().map(|h| URL_SAFE_NO_PAD.decode(h)) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|h| {
        h["jwk"].as_object().is_some_and(|k| {
            ["d", "p", "q", "dp", "dq", "qi", "oth", "k"]
                .iter()
                .any(|m| k.contains_key(*m))
        })
    })
}

/// `ath`: base64url SHA-256 of the access token.
pub fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

/// Verifies a DPoP proof for `method` and `url` (without query or
/// fragment); with `access_token`, also its `ath`.
pub fn verify_proof(
    proof: &str,
    method: &str,
    url: &str,
    access_token: Option<&str>,
    now: i64,
) -> Result<Proof, AuthError> {
    let bad = |m: &str| AuthError::invalid(format!("DPoP proof: {m}"));
    let header = jsonwebtoken::decode_header(proof).map_err(|_| bad("not a JWT"))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(bad("`typ` must be `dpop+jwt`"));
    }
    if !ALLOWED.contains(&header.alg) {
        return Err(bad("`alg` must be an asymmetric signature algorithm"));
    }
    let jwk = header
        .jwk
        .ok_or_else(|| bad("the header carries no `jwk`"))?;
    if jwk_has_private_members(proof) {
        // RFC 9449 §4.3: the `jwk` must not contain a private key.
        return Err(bad(
            "the `jwk` must be a public key: it carries private key members",
        ));
    }
    let jkt = thumbprint(&jwk)?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| bad("the `jwk` is unusable"))?;
    let mut v = Validation::new(header.alg);
    v.set_required_spec_claims::<&str>(&[]);
    v.validate_exp = false;
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<ProofClaims>(proof, &key, &v)
        .map_err(|_| bad("the signature does not verify with its `jwk`"))?
        .claims;
    let jti = claims
        .jti
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| bad("`jti` is required"))?;
    if claims.htm.as_deref() != Some(method) {
        return Err(bad(&format!("`htm` must be `{method}`")));
    }
    let strip = |u: &str| u.split(['?', '#']).next().unwrap_or(u).to_owned();
    if claims.htu.as_deref().map(strip).as_deref() != Some(url) {
        return Err(bad(&format!("`htu` must be `{url}`")));
    }
    let iat = claims.iat.ok_or_else(|| bad("`iat` is required"))?;
    if now.checked_sub(iat).is_none_or(|d| d.abs() > MAX_SKEW_SECS) {
        return Err(bad(
            "`iat` is not recent: send a fresh proof with each request",
        ));
    }
    if let Some(token) = access_token
        && claims.ath.as_deref() != Some(token_hash(token).as_str())
    {
        return Err(bad(
            "`ath` must be the hash of the access token it accompanies",
        ));
    }
    Ok(Proof { jkt, jti, iat })
}

/// The client's half: a key made for one process, never written, that signs
/// a fresh proof for each request (`keygate exec`, `credential-process`).
pub struct ProofKey {
    pem: secrecy::SecretString,
    jwk: Jwk,
}

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProofKey").finish_non_exhaustive()
    }
}

impl ProofKey {
    /// A new P-256 key.
    pub fn generate() -> Result<Self, AuthError> {
        let (pem, public) = super::keys::generate_agent_key("ES256")?;
        let mut members = public.jwk;
        if let Some(m) = members.as_object_mut() {
            // The proof's `jwk` is the bare public key.
            m.remove("kid");
            m.remove("use");
        }
        let jwk = serde_json::from_value(members)
            .map_err(|e| AuthError::Key(format!("building the DPoP JWK: {e}")))?;
        Ok(Self { pem, jwk })
    }

    /// The key's RFC 7638 thumbprint (the bound token's `cnf.jkt`).
    pub fn thumbprint(&self) -> Result<String, AuthError> {
        thumbprint(&self.jwk)
    }

    /// A single-use proof for `method` on `url` (its query is left out),
    /// over `access_token` when one accompanies it.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        access_token: Option<&str>,
    ) -> Result<String, AuthError> {
        use secrecy::ExposeSecret;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.pem.expose_secret().as_bytes())
            .map_err(|_| AuthError::Key("the DPoP key is unusable".into()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(self.jwk.clone());
        let mut claims = serde_json::json!({
            "jti": uuid::Uuid::new_v4().to_string(),
            "htm": method,
            "htu": url.split(['?', '#']).next().unwrap_or(url),
            "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        });
        if let Some(t) = access_token {
            claims["ath"] = token_hash(t).into();
        }
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| AuthError::Key(format!("signing a DPoP proof: {e}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proof_key_tests {
    use super::*;

    #[test]
    fn a_generated_proof_verifies_for_its_method_url_and_token() {
        let k = ProofKey::generate().unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let p = k
            .proof("POST", "http://127.0.0.1:1/v1/credentials?x=1", Some("tok"))
            .unwrap();
        let v = verify_proof(
            &p,
            "POST",
            "http://127.0.0.1:1/v1/credentials",
            Some("tok"),
            now,
        )
        .unwrap();
        assert_eq!(v.jkt, k.thumbprint().unwrap());
        assert!(
            verify_proof(
                &p,
                "GET",
                "http://127.0.0.1:1/v1/credentials",
                Some("tok"),
                now
            )
            .is_err()
        );
        assert!(
            verify_proof(
                &p,
                "POST",
                "http://127.0.0.1:1/v1/credentials",
                Some("other"),
                now
            )
            .is_err()
        );
        assert!(!format!("{k:?}").contains("PRIVATE"));
    }
}
