//! The AWS provider against moto.
//!
//! One test binary per group of suites (each `mod` is one file under
//! `tests/`): every binary links the whole broker, so fewer binaries link
//! faster and take less disk. Run one suite with `cargo test --test aws <module>::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod aws_credential_process;
mod aws_example;
mod aws_fences;
mod aws_secrets;
mod aws_session_fences;
mod aws_sts;
