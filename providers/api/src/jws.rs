//! Compact ES256 JWS (RFC 7515 §7.1) with a P-256 key parsed once.
//!
//! `jsonwebtoken::encode` parses the PKCS#8 key on every call, and aws-lc
//! checks a key it parses by signing and verifying with it (its pairwise
//! consistency test): three scalar multiplications before the signature
//! asked for. The broker signs a session token per task and a JWT-SVID per
//! credential with one long-lived key, so the key is parsed here once, when
//! it is loaded, and each token costs one signature. What is signed is what
//! `jsonwebtoken` would sign (base64url JSON header and claims); tokens are
//! verified with `jsonwebtoken` as before.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

/// Why a key could not be loaded or a token signed (never the key itself).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JwsError(&'static str);

/// An ES256 signing key, parsed and checked once.
pub struct Es256Signer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Es256Signer").finish_non_exhaustive()
    }
}

/// The protected header: ES256, with the key id and type given.
#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    typ: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

impl Es256Signer {
    /// Parses a PKCS#8 (DER) P-256 private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwsError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| JwsError("not a pkcs#8 p-256 private key"))?;
        Ok(Self {
            pair,
            rng: SystemRandom::new(),
        })
    }

    /// The compact serialization of `claims` signed with ES256, the header
    /// naming `kid` and `typ`.
    pub fn sign<T: Serialize + ?Sized>(
        &self,
        kid: Option<&str>,
        typ: Option<&str>,
        claims: &T,
    ) -> Result<String, JwsError> {
        let header = Header {
            alg: "ES256",
            typ,
            kid,
        };
        let header =
            serde_json::to_vec(&header).map_err(|_| JwsError("cannot serialize the header"))?;
        let claims =
            serde_json::to_vec(claims).map_err(|_| JwsError("cannot serialize the claims"))?;
        let mut jws = URL_SAFE_NO_PAD.encode(header);
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut jws);
        let signature = self
            .pair
            .sign(&self.rng, jws.as_bytes())
            .map_err(|_| JwsError("signing failed"))?;
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jws);
        Ok(jws)
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "a failed setup fails the test")]

    use aws_lc_rs::signature::KeyPair as _;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Claims {
        sub: String,
        exp: i64,
    }

    fn key() -> (Vec<u8>, DecodingKey) {
        let rng = SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref()).unwrap();
        let public = DecodingKey::from_ec_der(pair.public_key().as_ref());
        (der.as_ref().to_vec(), public)
    }

    // What it signs, jsonwebtoken verifies, with the header it names; a
    // token altered anywhere, or checked with another key, is refused.
    #[test]
    fn jsonwebtoken_verifies_what_it_signs_and_nothing_altered() {
        let (der, public) = key();
        let signer = Es256Signer::from_pkcs8(&der).unwrap();
        let claims = Claims {
            sub: "spiffe://example.org/a".into(),
            exp: 4_000_000_000,
        };
        let token = signer.sign(Some("k1"), Some("JWT"), &claims).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let mut v = Validation::new(Algorithm::ES256);
        v.set_required_spec_claims(&["exp"]);
        let decoded = jsonwebtoken::decode::<Claims>(&token, &public, &v).unwrap();
        assert_eq!(decoded.claims, claims);
        // Two signatures of the same claims differ (ECDSA's nonce), both valid.
        let again = signer.sign(Some("k1"), Some("JWT"), &claims).unwrap();
        assert_ne!(again, token);
        assert!(jsonwebtoken::decode::<Claims>(&again, &public, &v).is_ok());
        // Every character of the token matters.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).unwrap();
            if altered != token {
                assert!(
                    jsonwebtoken::decode::<Claims>(&altered, &public, &v).is_err(),
                    "altered at {i}"
                );
            }
        }
        let (_, other) = key();
        assert!(jsonwebtoken::decode::<Claims>(&token, &other, &v).is_err());
        // No key id and no type: neither is in the header.
        let bare = signer.sign(None, None, &claims).unwrap();
        let header = jsonwebtoken::decode_header(&bare).unwrap();
        assert_eq!((header.kid, header.typ), (None, None));
    }

    #[test]
    fn a_key_that_is_not_p256_pkcs8_is_refused_without_echoing_it() {
        let err = Es256Signer::from_pkcs8(b"-----BEGIN PRIVATE KEY----- secret").unwrap_err();
        assert!(!err.to_string().contains("secret"));
        let debug = format!("{:?}", Es256Signer::from_pkcs8(&key().0).unwrap());
        assert_eq!(debug, "Es256Signer { .. }");
    }
}
