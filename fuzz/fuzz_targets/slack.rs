//! Slack interaction requests: the signature check over timestamp,
//! signature and body, the form body, and the `payload` JSON of a click.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::{NOW, bounded};
use keygate::notify::slack;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Err(e) = slack::parse_click(&s) {
        bounded(&e, s.len());
    }
    let sig = slack::sign(SECRET, NOW, data);
    let now = NOW.to_string();
    let _ = slack::verify(SECRET, Some(&now), Some(&sig), data, NOW);
    let _ = slack::verify(SECRET, Some(&s), Some(&sig), data, NOW);
    let _ = slack::verify(SECRET, Some(&now), Some(&s), data, NOW);
    if let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(data)
        && let Some((_, payload)) = form.iter().find(|(k, _)| k == "payload")
        && let Err(e) = slack::parse_click(payload)
    {
        bounded(&e, payload.len());
    }
});
