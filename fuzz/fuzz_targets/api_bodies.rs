//! The JSON and form bodies of the HTTP API, through the parsers the
//! handlers use: agent registration and updates, revocations, approval
//! decisions, and the token endpoint's form. An error may not quote a large
//! input back.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::bounded;
use keygate::broker::{AgentSpec, AgentUpdate, DecisionRequest, RevocationRequest, TokenRequest};
use keygate::server::{parse_json, parse_query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let check = |e: keygate::server::ApiError| bounded(&e.message, data.len());
    if let Err(e) = parse_json::<AgentSpec>(data) {
        check(e);
    }
    if let Err(e) = parse_json::<AgentUpdate>(data) {
        check(e);
    }
    if let Err(e) = parse_json::<RevocationRequest>(data) {
        check(e);
    }
    if let Err(e) = parse_json::<DecisionRequest>(data) {
        check(e);
    }
    // The token endpoint's form (axum's Form is serde_urlencoded), with the
    // clipping its error message gets.
    if let Err(e) = serde_urlencoded::from_bytes::<TokenRequest>(data) {
        bounded(&keygate::limits::clip_message(&e.to_string()), data.len());
    }
    let _ = parse_query::<DecisionRequest>(Some(&String::from_utf8_lossy(data)));
});
