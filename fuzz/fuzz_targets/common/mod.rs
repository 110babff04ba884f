//! What the targets share: a fixed agent key, a signer for fuzzed headers
//! and claims, and the rule that an error never echoes a large input.
#![allow(dead_code)]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::ExposeSecret;

pub const AUD: &str = "https://keygate.test/oauth/token";
pub const HTU: &str = "https://keygate.test/oauth/token";
pub const AGENT: &str = "fuzz-agent";

pub struct Key {
    pub encoding: jsonwebtoken::EncodingKey,
    pub jwk: serde_json::Value,
    pub jwks: serde_json::Value,
}

/// One ES256 key for the whole run.
pub fn key() -> &'static Key {
    static KEY: OnceLock<Key> = OnceLock::new();
    KEY.get_or_init(|| {
        let (pem, public) = keygate::identity::generate_agent_key("ES256").expect("key");
        let encoding =
            jsonwebtoken::EncodingKey::from_ec_pem(pem.expose_secret().as_bytes()).expect("pem");
        let jwks = serde_json::json!({ "keys": [public.jwk.clone()] });
        Key {
            encoding,
            jwk: public.jwk,
            jwks,
        }
    })
}

/// A compact JWS over exactly these header and claims bytes, correctly
/// signed: the fuzzer reaches the checks behind the signature.
pub fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &key().encoding,
        jsonwebtoken::Algorithm::ES256,
    )
    .expect("sign");
    format!("{message}.{sig}")
}

/// Splits fuzz input into two parts at the first newline.
pub fn two(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// A fixed "now", so runs are reproducible.
pub const NOW: i64 = 1_790_000_000;

/// An error may say what is wrong, not repeat a large input.
pub fn bounded(err: &str, input_len: usize) {
    assert!(
        err.len() < 600 || err.len() < input_len / 2,
        "an error of {} bytes for {input_len} bytes of input",
        err.len()
    );
}
