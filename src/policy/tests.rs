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

fn decide_with_chain(
    e: &PolicyEngine,
    a: &Agent,
    sf: &ScopeFacts<'_>,
    chain: &[String],
) -> Result<PolicyDecision, PolicyError> {
    let rf = RequestFacts {
        task_id: "tk_1",
        task_description: "job",
        requested_ttl_secs: 60,
        now: crate::model::now(),
        chain,
    };
    e.decide(a, sf, &rf)
}

const CA: ScopeFacts<'static> = ScopeFacts {
    name: "s",
    provider: "ca",
    sensitive: false,
    max_ttl_secs: 3600,
};

// The entities kept between decisions are reused only while every fact
// they carry is unchanged: each change below flips the decision.
#[test]
fn a_changed_agent_or_scope_is_decided_on_what_it_is_now() {
    let e = engine(
        r#"
@id("labelled")
permit (principal in Keygate::Team::"a", action == Keygate::Action::"request_credential", resource)
when { resource.provider == "ca" && principal.hasTag("data") && principal.getTag("data") == "pii"
       && principal.status == "active" && principal.risk_tier < 3 && principal.sponsor == "s@example.com"
       && principal.purpose == "test" && principal.environment == "dev" && resource.max_ttl >= 60
       && !resource.sensitive };
"#,
    );
    let a = agent("a", 1);
    let allowed = |a: &Agent, sf: &ScopeFacts<'_>| decide_with_chain(&e, a, sf, &[]).unwrap().allow;
    assert!(allowed(&a, &CA));
    let changes: [fn(&mut Agent); 8] = [
        |a| a.team = "b".into(),
        |a| {
            a.labels.insert("data".into(), "public".into());
        },
        |a| a.labels.clear(),
        |a| a.status = AgentStatus::Suspended,
        |a| a.risk_tier = 3,
        |a| a.sponsor = "t@example.com".into(),
        |a| a.purpose = "other".into(),
        |a| a.environment = Environment::Prod,
    ];
    for change in changes {
        let mut changed = a.clone();
        change(&mut changed);
        assert!(
            !allowed(&changed, &CA),
            "a changed agent was decided as before"
        );
        // And back: the original facts are allowed again.
        assert!(allowed(&a, &CA));
    }
    for sf in [
        ScopeFacts {
            provider: "vault",
            ..CA
        },
        ScopeFacts {
            sensitive: true,
            ..CA
        },
        ScopeFacts {
            max_ttl_secs: 30,
            ..CA
        },
    ] {
        assert!(!allowed(&a, &sf), "a changed scope was decided as before");
        assert!(allowed(&a, &CA));
    }
    // Another agent of another team, same id shape, same scope.
    let mut other = agent("b", 1);
    other.id = "a2".into();
    assert!(!allowed(&other, &CA));
    assert!(allowed(&a, &CA));
}

// The schema's check of a request is skipped only for requests of a shape
// that passed it: an empty chain conforms to any set, a non-empty chain of
// agent ids does not conform to a set of numbers.
#[test]
fn a_request_the_schema_refuses_is_refused_every_time() {
    let schema = include_str!("../../config/policies/keygate.cedarschema")
        .replace("chain: Set<String>", "chain: Set<Long>");
    let files = BTreeMap::from([
        ("keygate.cedarschema".to_owned(), schema),
        ("p.cedar".to_owned(), PERMIT_FORBID.to_owned()),
    ]);
    let e = PolicyEngine::from_files(&files).unwrap();
    let a = agent("a", 1);
    let delegated = ["root".to_owned()];
    for _ in 0..3 {
        assert!(decide_with_chain(&e, &a, &CA, &[]).unwrap().allow);
        assert!(matches!(
            decide_with_chain(&e, &a, &CA, &delegated),
            Err(PolicyError::Request(_))
        ));
    }
    // With the schema's own declaration, both shapes pass, every time.
    let e = engine(PERMIT_FORBID);
    for _ in 0..3 {
        assert!(decide_with_chain(&e, &a, &CA, &[]).unwrap().allow);
        assert!(decide_with_chain(&e, &a, &CA, &delegated).unwrap().allow);
    }
}

// More agents than are kept: each is still decided on its own facts.
#[test]
fn more_agents_than_are_kept_are_each_decided_on_their_own() {
    let e = engine(PERMIT_FORBID);
    for i in 0..(prepared::MAX_AGENTS + 50) {
        let mut a = agent(if i % 2 == 0 { "a" } else { "b" }, 1);
        a.id = format!("a{i}");
        assert_eq!(decide(&e, &a, "s", 60).allow, i % 2 == 0, "agent {i}");
    }
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
