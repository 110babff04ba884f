//! The Vault / OpenBao provider against a real OpenBao and PostgreSQL.
//!
//! One test binary per group of suites (each `mod` is one file under
//! `tests/`): every binary links the whole broker, so fewer binaries link
//! faster and take less disk. Run one suite with `cargo test --test vault <module>::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod vault_conformance;
mod vault_crash;
mod vault_flow;
mod vault_kill_switch;
mod vault_outage;
