//! Policy test cases: a policy change reviewed like code. A cases file
//! (TOML) lists requests and the decision each must get; `keygate policy
//! test DIR --cases FILE` runs them against the policy files in DIR, with
//! no broker running.
//!
//! ```toml
//! [[case]]
//! name = "platform agents get X.509-SVIDs"
//! agent = { team = "platform", risk_tier = 2, environment = "dev" }
//! scope = { name = "x509-svid", provider = "ca", max_ttl = 3600 }
//! ttl = 600
//! task = "nightly report"          # the task's description
//! at = "2026-12-01T10:00:00Z"      # optional: when (default: now)
//! action = "request_credential"    # or "auto_approve", "request_credential_for_user"
//! user = { id = "alice", issuer = "corp", groups = ["finance"] }   # for the user action
//! expect = "deny"                  # "allow" or "deny"
//! policy = "tier3-short-ttl"       # optional: a policy id that must be among the deciders
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    AUTO_APPROVE, PolicyEngine, REQUEST_CREDENTIAL, REQUEST_FOR_USER, RequestFacts, ScopeFacts,
};
use crate::model::{Agent, AgentStatus, AuthMethod, Environment, UserContext};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    #[serde(rename = "case", default)]
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub agent: CaseAgent,
    pub scope: CaseScope,
    #[serde(default = "default_action")]
    pub action: String,
    pub ttl: u64,
    #[serde(default)]
    pub task: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub at: Option<time::OffsetDateTime>,
    #[serde(default)]
    pub user: Option<UserContext>,
    #[serde(default)]
    pub chain: Vec<String>,
    pub expect: Expect,
    /// A policy id that must be among those that decided.
    #[serde(default)]
    pub policy: Option<String>,
}

fn default_action() -> String {
    REQUEST_CREDENTIAL.to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseAgent {
    #[serde(default = "default_agent")]
    pub id: String,
    pub team: String,
    #[serde(default)]
    pub sponsor: String,
    pub risk_tier: u8,
    pub environment: Environment,
    #[serde(default)]
    pub purpose: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_agent() -> String {
    "test-agent".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseScope {
    pub name: String,
    pub provider: String,
    #[serde(default)]
    pub sensitive: bool,
    pub max_ttl: u64,
}

/// One case's outcome.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// `None` when it passed; otherwise what went wrong, readably.
    pub failure: Option<String>,
}

/// Runs every case against `engine`.
pub fn run(engine: &PolicyEngine, file: &CasesFile) -> Vec<Outcome> {
    file.cases.iter().map(|c| run_one(engine, c)).collect()
}

fn run_one(engine: &PolicyEngine, c: &Case) -> Outcome {
    let now = crate::model::now();
    let agent = Agent {
        id: c.agent.id.clone(),
        team: c.agent.team.clone(),
        sponsor: c.agent.sponsor.clone(),
        risk_tier: c.agent.risk_tier,
        environment: c.agent.environment,
        purpose: c.agent.purpose.clone(),
        labels: c.agent.labels.clone(),
        status: AgentStatus::Active,
        auth_method: AuthMethod::PrivateKeyJwt,
        jwks: serde_json::json!({ "keys": [] }),
        created_at: now,
        updated_at: now,
        last_used_at: None,
        last_review_at: None,
        delegation: Default::default(),
        federated: None,
        may_assert_users: false,
        suspended_from: None,
        step_up: None,
        excluded_scopes: Default::default(),
        max_ttl_secs: None,
        keys_rotated_at: None,
        owner_changed_at: None,
    };
    let scope = ScopeFacts {
        name: &c.scope.name,
        provider: &c.scope.provider,
        sensitive: c.scope.sensitive,
        max_ttl_secs: c.scope.max_ttl,
    };
    let req = RequestFacts {
        task_id: "tk_policy_test",
        task_description: &c.task,
        requested_ttl_secs: c.ttl,
        now: c.at.unwrap_or(now),
        chain: &c.chain,
    };
    let decided = match c.action.as_str() {
        REQUEST_CREDENTIAL => engine.decide(&agent, &scope, &req),
        AUTO_APPROVE => engine.auto_approve(&agent, &scope, &req),
        REQUEST_FOR_USER => match &c.user {
            Some(u) => engine.decide_for_user(&agent, u, &scope, &req),
            None => {
                return Outcome {
                    name: c.name.clone(),
                    failure: Some(format!("action `{REQUEST_FOR_USER}` needs `user`")),
                };
            }
        },
        other => {
            return Outcome {
                name: c.name.clone(),
                failure: Some(format!(
                    "unknown action `{other}` (use {REQUEST_CREDENTIAL}, {AUTO_APPROVE} or {REQUEST_FOR_USER})"
                )),
            };
        }
    };
    let failure = match decided {
        Err(e) => Some(format!("cannot evaluate: {e}")),
        Ok(d) => {
            let got = if d.allow { Expect::Allow } else { Expect::Deny };
            let by = if d.policy_ids.is_empty() {
                "no policy matched (deny by default)".to_owned()
            } else {
                format!("decided by {}", d.policy_ids.join(", "))
            };
            if got != c.expect {
                Some(format!(
                    "expected {}, got {} ({by})",
                    word(c.expect),
                    word(got)
                ))
            } else if let Some(p) = &c.policy
                && !d.policy_ids.iter().any(|id| id == p)
            {
                Some(format!(
                    "{} as expected, but not by `{p}` ({by})",
                    word(got)
                ))
            } else {
                None
            }
        }
    };
    Outcome {
        name: c.name.clone(),
        failure,
    }
}

fn word(e: Expect) -> &'static str {
    match e {
        Expect::Allow => "allow",
        Expect::Deny => "deny",
    }
}
