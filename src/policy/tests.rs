#![expect(clippy::unwrap_used, reason = "a failed setup fails the test")]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::model::{AgentStatus, AuthMethod, Environment};

fn agent(team: &str, tier: u8) -> Agent {
    let now = crate::model::now();
    Agent {
        id: "a1".into(),
        team: team.into(),
        sponsor: "s@example.com".into(),
        risk_tier: tier,
        environment: Environment::Dev,
        purpose: "test".into(),
        labels: BTreeMap::from([("data".to_owned(), "pii".to_owned())]),
        status: AgentStatus::Active,
        auth_method: AuthMethod::PrivateKeyJwt,
        jwks: serde_json::json!({"keys": []}),
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
    }
}

fn engine(policies: &str) -> PolicyEngine {
    let schema = include_str!("../../config/policies/keygate.cedarschema");
    let files = BTreeMap::from([
        ("keygate.cedarschema".to_owned(), schema.to_owned()),
        ("p.cedar".to_owned(), policies.to_owned()),
    ]);
    PolicyEngine::from_files(&files).unwrap()
}

fn decide(e: &PolicyEngine, a: &Agent, scope: &str, ttl: u64) -> PolicyDecision {
    let sf = ScopeFacts {
        name: scope,
        provider: "ca",
        sensitive: false,
        max_ttl_secs: 3600,
    };
    let rf = RequestFacts {
        task_id: "tk_1",
        task_description: "job",
        requested_ttl_secs: ttl,
        now: crate::model::now(),
        chain: &[],
    };
    e.decide(a, &sf, &rf).unwrap()
}

const PERMIT_FORBID: &str = r#"
@id("team-a")
permit (principal in Keygate::Team::"a", action == Keygate::Action::"request_credential", resource)
when { resource.provider == "ca" && principal.hasTag("data") && principal.getTag("data") == "pii" };
@id("short")
forbid (principal, action, resource) when { context.ttl > 600 };
"#;

#[test]
fn empty_policy_set_denies_with_no_policy_ids() {
    let e = engine("");
    let d = decide(&e, &agent("a", 1), "s", 60);
    assert!(!d.allow);
    assert!(d.policy_ids.is_empty());
}

#[test]
fn permit_and_forbid_report_their_ids() {
    let e = engine(PERMIT_FORBID);
    let ok = decide(&e, &agent("a", 1), "s", 60);
    assert_eq!((ok.allow, ok.policy_ids), (true, vec!["team-a".to_owned()]));
    let forbidden = decide(&e, &agent("a", 1), "s", 601);
    assert_eq!(
        (forbidden.allow, forbidden.policy_ids),
        (false, vec!["short".to_owned()])
    );
    let other_team = decide(&e, &agent("b", 1), "s", 60);
    assert!(!other_team.allow && other_team.policy_ids.is_empty());
}

#[test]
fn schema_rejects_a_misspelt_attribute() {
    let schema = include_str!("../../config/policies/keygate.cedarschema");
    let files = BTreeMap::from([
        ("keygate.cedarschema".to_owned(), schema.to_owned()),
        (
            "p.cedar".to_owned(),
            "permit (principal, action, resource) when { principal.tema == \"a\" };".to_owned(),
        ),
    ]);
    assert!(matches!(
        PolicyEngine::from_files(&files),
        Err(PolicyError::Validation(_))
    ));
}

#[test]
fn hash_changes_with_content() {
    let a = engine(PERMIT_FORBID);
    let b = engine("");
    assert_ne!(a.hash(), b.hash());
    assert_eq!(a.hash(), engine(PERMIT_FORBID).hash());
}

#[test]
fn example_policies_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
    let e = PolicyEngine::load(&dir).unwrap();
    assert!(e.len() >= 3);
}

proptest! {
    // The engine agrees with a simple model of the policies above: allowed
    // exactly when team is `a`, the tag matches, and the ttl is at most 600.
    #[test]
    fn decisions_match_the_model(team in prop::sample::select(vec!["a", "b"]), ttl in 0u64..1200, tier in 1u8..=3) {
        let e = engine(PERMIT_FORBID);
        let d = decide(&e, &agent(team, tier), "s", ttl);
        prop_assert_eq!(d.allow, team == "a" && ttl <= 600);
    }
}
