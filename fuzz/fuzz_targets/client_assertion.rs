//! Client assertions (RFC 7523 `private_key_jwt`) and the unverified issuer
//! read that routes federation JWTs. Mode byte: even = the raw token; odd =
//! `<header json>\n<claims json>`, signed with the agent's key, so the
//! claim checks behind the signature are fuzzed too.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::{AGENT, AUD, NOW, bounded, key, signed, two};
use keygate::identity::{unverified_issuer, verify_client_assertion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let (header, claims) = two(rest);
        signed(header, claims)
    };
    if let Err(e) = verify_client_assertion(&token, AGENT, &key().jwks, &[AUD], NOW) {
        bounded(&e.to_string(), token.len());
    }
    if let Err(e) = unverified_issuer(&token) {
        bounded(&e.to_string(), token.len());
    }
    let _ = jsonwebtoken::decode_header(&token);
});
