//! The JSON and form bodies of the HTTP API: agent registration and
//! updates, revocations, approval decisions, and the token endpoint's form.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::bounded;
use keygate::broker::{AgentSpec, AgentUpdate, DecisionRequest, RevocationRequest, TokenRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = serde_json::from_slice::<AgentSpec>(data) {
        bounded(&e.to_string(), data.len());
    }
    let _ = serde_json::from_slice::<AgentUpdate>(data);
    let _ = serde_json::from_slice::<RevocationRequest>(data);
    let _ = serde_json::from_slice::<DecisionRequest>(data);
    let _ = serde_urlencoded::from_bytes::<TokenRequest>(data);
});
