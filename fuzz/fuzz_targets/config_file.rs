//! The config file: TOML parsing and every check `Config::parse` runs.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use common::bounded;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = keygate::config::Config::parse(&text, std::path::Path::new("fuzz.toml")) {
        bounded(&e.to_string(), data.len());
    }
});
