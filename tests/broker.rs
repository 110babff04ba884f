//! The broker's own doors: OAuth grants and their refusals, federation, mTLS, DPoP, delegation, on-behalf-of, rate limits, the audit chain, restarts and crashes, several replicas on one database, the store contract, startup and leaks.
//!
//! One test binary per group of suites (each `mod` is one file under
//! `tests/`): every binary links the whole broker, so fewer binaries link
//! faster and take less disk. Run one suite with `cargo test --test broker <module>::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod audit_chain;
mod connections;
mod delegation;
mod delegation_ends;
mod dpop;
mod federation;
mod flow;
mod fuzz;
mod lease_properties;
mod mtls;
mod mtls_revocation;
mod oauth_rejections;
mod on_behalf_of;
mod openapi;
mod pagination;
mod rate_limits;
mod replica_claims;
mod replicas;
mod restart;
mod secrets_never_leak;
mod startup;
mod store_contract;
mod store_contract_chain;
mod store_contract_pool;
mod store_contract_reads;
mod store_contract_tasks;
mod store_migrate;
mod store_reads;

/// With `autotests = false`, a suite file no binary lists would never run:
/// every `tests/*.rs` is a binary's root or a `mod` of exactly one.
#[test]
fn every_suite_file_is_in_exactly_one_binary() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let roots = ["broker", "lifecycle", "vault", "aws", "azure"];
    let listed: Vec<String> = roots
        .iter()
        .flat_map(|r| {
            std::fs::read_to_string(dir.join(format!("{r}.rs")))
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned))
                .filter(|m| m != "common")
                .collect::<Vec<_>>()
        })
        .collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some(module) = name.strip_suffix(".rs") else {
            continue;
        };
        if roots.contains(&module) {
            continue;
        }
        let n = listed.iter().filter(|m| *m == module).count();
        assert_eq!(n, 1, "tests/{name} is listed by {n} test binaries (want 1)");
    }
}
