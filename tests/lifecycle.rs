//! Policy, governance and the agent side: `keygate exec`, approvals, agents as code, the evidence pack, lifecycle findings, people, policy reloads and cases, provisioning, reviews, revocation continuous validation (its detectors and its responses) and the web console (in a real browser, and its pages over plain HTTP).
//!
//! One test binary per group of suites (each `mod` is one file under
//! `tests/`): every binary links the whole broker, so fewer binaries link
//! faster and take less disk. Run one suite with `cargo test --test lifecycle <module>::`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod agent_exec;
mod agent_exec_lifetime;
mod agent_moves;
mod approval_notifications;
mod approval_policy;
mod approvals;
mod approvals_restarts;
mod approvals_separation;
mod ascode;
mod console;
mod console_pages;
mod evidence;
mod governance;
mod people;
mod policy_and_roles;
mod policy_cases;
mod policy_reload;
mod policy_reload_races;
mod policy_restart;
mod provisioning;
mod review_reminders;
mod reviews;
mod reviews_reassigned;
mod revocation;
mod revocation_at_scale;
mod validation;
mod validation_responses;
mod validation_step_ups;
