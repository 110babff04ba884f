//! Test agents: key pairs, registration bodies and signed client assertions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::{token_endpoint, unix_now};

/// A test agent with a fresh key pair.
#[derive(Debug, Clone)]
pub struct TestAgent {
    pub id: String,
    pub alg: Algorithm,
    /// PKCS#8 PEM of the private key.
    pub pem: String,
    pub kid: String,
    pub jwk: Value,
}

impl TestAgent {
    /// `alg` is `ES256` or `EdDSA`; the id gets a random suffix.
    pub fn new(prefix: &str, alg: &str) -> Self {
        let id = format!(
            "{prefix}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let (pem, public) = keygate::identity::generate_agent_key(alg).unwrap();
        Self {
            id,
            alg: if alg == "EdDSA" {
                Algorithm::EdDSA
            } else {
                Algorithm::ES256
            },
            pem: pem.expose_secret().to_owned(),
            kid: public.kid,
            jwk: public.jwk,
        }
    }

    /// The registration body: risk tier 2, `dev`.
    pub fn spec(&self, team: &str) -> Value {
        json!({
            "id": self.id,
            "team": team,
            "sponsor": "owner@keygate.test",
            "risk_tier": 2,
            "environment": "dev",
            "purpose": "integration test agent",
            "labels": { "suite": "it" },
            "auth_method": "private_key_jwt",
            "jwks": { "keys": [self.jwk] },
        })
    }

    /// Valid assertion claims for the token endpoint.
    pub fn claims(&self) -> Value {
        let now = unix_now();
        json!({
            "iss": self.id, "sub": self.id, "aud": token_endpoint(),
            "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    pub fn encoding_key(&self) -> EncodingKey {
        match self.alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(self.pem.as_bytes()).unwrap(),
        }
    }

    /// The header this agent signs with: its algorithm and `kid`.
    pub fn header(&self) -> Header {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        h
    }

    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with(&self.header(), claims)
    }

    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding_key()).unwrap()
    }

    /// A fresh, valid client assertion.
    pub fn assertion(&self) -> String {
        self.sign(&self.claims())
    }
}
