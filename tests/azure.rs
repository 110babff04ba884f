//! The Azure provider against the Entra token endpoint stand-in and the Graph fake.
//!
//! One test binary per group of suites (each `mod` is one file under
//! `tests/`): every binary links the whole broker, so fewer binaries link
//! faster and take less disk. Run one suite with `cargo test --test azure <module>::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod azure_conformance;
mod azure_example;
mod azure_flow;
mod azure_recovery;
