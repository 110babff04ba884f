//! RFC 7523 client assertions: a JWT the agent signs with its own key.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthError, describe_jwt_error};

/// The longest an assertion may be valid for, as RFC 7523 advises keeping
/// them short-lived.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: i64 = 30;

/// The claims Keygate reads from a verified assertion.
#[derive(Debug, Clone, Deserialize)]
pub struct AssertionClaims {
    pub exp: i64,
    #[serde(default)]
    pub iat: Option<i64>,
    #[serde(default)]
    pub jti: Option<String>,
}

pub(crate) const ALLOWED: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::PS256,
];

/// Checks that a JWKS holds only public signing keys Keygate can verify.
pub fn validate_public_jwks(jwks: &serde_json::Value) -> Result<(), String> {
    let keys = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("the JWKS must be an object with a `keys` array")?;
    if keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    for (i, k) in keys.iter().enumerate() {
        for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            if k.get(private).is_some() {
                return Err(format!(
                    "key {i} contains the private member `{private}`: register public keys only"
                ));
            }
        }
        let jwk: Jwk =
            serde_json::from_value(k.clone()).map_err(|e| format!("key {i} is not a JWK: {e}"))?;
        if key_algorithms(&jwk).is_empty() {
            return Err(format!(
                "key {i} has an unsupported type (use EC P-256/P-384, Ed25519 or RSA)"
            ));
        }
    }
    Ok(())
}

/// The algorithms a key may verify; an HMAC key verifies nothing, so a
/// public key can never be used as a shared secret (algorithm confusion).
fn key_algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256, Algorithm::PS256],
        _ => vec![],
    }
}

/// Signs a client assertion for `client_id`, as an agent (or its SDK) does:
/// `iss` = `sub` = the agent id, `aud` = the token endpoint, a fresh `jti`,
/// valid for `lifetime_secs` (at most 300 are accepted). `alg` is `ES256` or
/// `EdDSA`, matching the PKCS#8 PEM key.
pub fn sign_client_assertion(
    key_pem: &secrecy::SecretString,
    alg: &str,
    kid: Option<&str>,
    client_id: &str,
    audience: &str,
    lifetime_secs: i64,
) -> Result<String, AuthError> {
    use secrecy::ExposeSecret;
    let pem = key_pem.expose_secret().as_bytes();
    let (alg, key) = match alg {
        "ES256" => (
            Algorithm::ES256,
            jsonwebtoken::EncodingKey::from_ec_pem(pem),
        ),
        "EdDSA" => (
            Algorithm::EdDSA,
            jsonwebtoken::EncodingKey::from_ed_pem(pem),
        ),
        other => return Err(AuthError::Key(format!("cannot sign with `{other}`"))),
    };
    let key =
        key.map_err(|_| AuthError::Key("the agent key is not a PKCS#8 PEM of that type".into()))?;
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": audience,
        "iat": now, "exp": now + lifetime_secs,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| AuthError::Key(format!("signing: {e}")))
}

/// Names `alg: none` and HMAC algorithms explicitly, which the JWT library
/// would only call malformed or mismatched.
fn refuse_unsigned(token: &str) -> Result<(), AuthError> {
    use base64::Engine;
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    match alg.as_deref() {
        Some(a) if a.eq_ignore_ascii_case("none") => Err(AuthError::invalid(
            "unsigned assertions (`alg: none`) are refused",
        )),
        Some(a) if a.starts_with("HS") => Err(AuthError::invalid(
            "symmetric `alg` values are refused: sign with the agent's private key",
        )),
        _ => Ok(()),
    }
}

/// Verifies an agent's client assertion against its registered JWKS.
///
/// `audiences` are the values `aud` may carry (the issuer and the token
/// endpoint URL). Replay (`jti` reuse) is the caller's check, against the store.
pub fn verify_client_assertion(
    token: &str,
    agent_id: &str,
    jwks: &serde_json::Value,
    audiences: &[&str],
    now: i64,
) -> Result<AssertionClaims, AuthError> {
    refuse_unsigned(token)?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| describe_jwt_error(&e))?;
    if !ALLOWED.contains(&header.alg) {
        return Err(AuthError::invalid(format!(
            "the assertion `alg` {:?} is not allowed (use ES256, ES384, EdDSA, RS256 or PS256)",
            header.alg
        )));
    }
    let set: JwkSet = serde_json::from_value(jwks.clone())
        .map_err(|_| AuthError::invalid("the agent's registered JWKS is unusable"))?;
    let jwk = match &header.kid {
        Some(kid) => set.find(kid).ok_or_else(|| {
            AuthError::invalid("the assertion `kid` is not a registered key of this agent")
        })?,
        None if set.keys.len() == 1 => &set.keys[0],
        None => {
            return Err(AuthError::invalid(
                "the assertion has no `kid` and the agent has several keys",
            ));
        }
    };
    if !key_algorithms(jwk).contains(&header.alg) {
        return Err(AuthError::invalid(
            "the assertion `alg` does not match the key",
        ));
    }
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|_| AuthError::invalid("the agent's registered key is unusable"))?;
    let mut v = Validation::new(header.alg);
    v.set_audience(audiences);
    v.set_issuer(&[agent_id]);
    v.sub = Some(agent_id.to_owned());
    v.leeway = LEEWAY_SECS as u64;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let claims = jsonwebtoken::decode::<AssertionClaims>(token, &key, &v)
        .map_err(|e| describe_jwt_error(&e))?
        .claims;
    if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS {
        return Err(AuthError::invalid(format!(
            "the assertion `exp` is more than {MAX_ASSERTION_LIFETIME_SECS} seconds ahead"
        )));
    }
    if claims.iat.is_some_and(|iat| iat > now + LEEWAY_SECS) {
        return Err(AuthError::invalid("the assertion `iat` is in the future"));
    }
    match &claims.jti {
        Some(j) if !j.is_empty() && j.len() <= 256 => Ok(claims),
        _ => Err(AuthError::invalid(
            "the assertion needs a `jti` (a unique id, at most 256 characters)",
        )),
    }
}

/// The `iss` a JWT claims, read before any verification: only to find whose
/// keys to verify it with. Never trust it on its own.
pub fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    use base64::Engine;
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthError::invalid("the token is not a JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| AuthError::invalid("the token's payload is not base64url"))?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::invalid("the token's payload is not JSON"))?;
    claims["iss"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| AuthError::invalid("the token has no `iss`"))
}
