//! Governance tests' harness: a people directory with a sponsor who signs
//! in as an operator, sweeps, compliance records, and moving dates in the
//! store (time passes without sleeping).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

use super::config::sha256_hex;
use super::{Setup, TestBroker};

pub const DAY: i64 = 86_400;
pub const SPONSOR: &str = "owner@keygate.test";

/// A sponsor who signs in as operator `olga` (no role but her email), a
/// second admin, and a directory where `lead@keygate.test` leads `platform`.
pub struct People {
    pub olga: String,
    pub root2: String,
}

impl People {
    pub fn new() -> Self {
        let t = |n: &str| format!("kgop-{n}-{}", uuid::Uuid::new_v4().simple());
        Self {
            olga: t("olga"),
            root2: t("root2"),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            r#"
[[operators]]
name = "olga"
roles = ["auditor"]
email = "{SPONSOR}"
slack_user_id = "UOLGA"
token_sha256 = "{}"

[[operators]]
name = "root2"
roles = ["admin"]
email = "root2@keygate.test"
slack_user_id = "UROOT2"
token_sha256 = "{}"

[[people]]
email = "{SPONSOR}"
name = "Olga Owner"
team = "platform"

[[people]]
email = "lead@keygate.test"
name = "Lee Lead"
team = "platform"
lead = true

[[people]]
email = "next@keygate.test"
name = "Nia Next"
team = "platform"
"#,
            sha256_hex(&self.olga),
            sha256_hex(&self.root2)
        )
    }
}

pub async fn start(extra: &str) -> (TestBroker, People) {
    start_env(extra, Vec::new()).await
}

/// [`start`] with environment variables for the server (secrets by `env:`).
pub async fn start_env(extra: &str, env: Vec<(String, String)>) -> (TestBroker, People) {
    let people = People::new();
    let mut setup = Setup::permissive();
    setup.extra_config = format!("{}\n{extra}", people.toml());
    setup.env = env;
    (TestBroker::start_with(setup).await, people)
}

pub async fn sweep(b: &TestBroker) -> Value {
    b.post("/v1/governance/sweep", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200)
}

pub async fn compliance(b: &TestBroker, agent: &str) -> Value {
    b.get(
        &format!("/v1/agents/{agent}/compliance"),
        Some(&b.ops.auditor),
    )
    .await
    .expect(200)
}

pub fn issue<'a>(c: &'a Value, kind: &str) -> Option<&'a Value> {
    c["issues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["kind"] == kind)
}

pub async fn exec(b: &TestBroker, sql: &'static str, binds: &[&str]) {
    b.store_exec(sql, binds).await.unwrap();
}

/// Moves campaign `id`'s due date to `days_ago` days before now.
pub async fn campaign_due(b: &TestBroker, id: &str, days_ago: i64) {
    let at = (super::unix_now() - days_ago * DAY).to_string();
    exec(
        b,
        "UPDATE review_campaigns SET due_at = ? WHERE id = ?",
        &[&at, id],
    )
    .await;
}

/// The item of `agent` in a started campaign.
pub fn item_of<'a>(started: &'a Value, agent: &str) -> &'a Value {
    started["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["agent_id"] == agent)
        .unwrap_or_else(|| panic!("no item for {agent}: {started}"))
}
