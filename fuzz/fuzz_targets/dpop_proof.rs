//! DPoP proofs (RFC 9449), with and without an access token to bind. Mode
//! byte as in `client_assertion`: odd signs the fuzzed header and claims,
//! where a header `"jwk": "$KEY"` becomes the signing key's public JWK (the
//! fuzzer cannot guess it), so the checks behind the signature run too.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::{HTU, NOW, bounded, signed, two};
use keygate::identity::dpop;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let proof = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let (header, claims) = two(rest);
        let header = match serde_json::from_slice::<serde_json::Value>(header) {
            Ok(mut h) if h["jwk"] == "$KEY" => {
                h["jwk"] = common::key().jwk.clone();
                h.to_string().into_bytes()
            }
            _ => header.to_vec(),
        };
        signed(&header, claims)
    };
    for token in [None, Some("a-token")] {
        if let Err(e) = dpop::verify_proof(&proof, "POST", HTU, token, NOW) {
            bounded(&e.to_string(), proof.len());
        }
    }
});
