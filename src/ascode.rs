//! Agents as code: agents declared in files (TOML or YAML, seed 001's
//! `agent_policy` block included), compiled to Cedar, planned and applied.
//!
//! - [`format`]: the files, the mapping table from actions, tools and data
//!   scopes to configured scopes, and their checks (file and line named);
//! - [`compile`]: one generated Cedar file per agent;
//! - [`apply`]: `keygate plan` and `keygate apply`.

pub mod apply;
pub mod compile;
pub mod format;
