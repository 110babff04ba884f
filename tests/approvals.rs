//! Approvals through the real server: sensitive scopes wait for humans, who
//! decide by signed Slack clicks or the API, under quorum and separation of
//! duties; every refusal is a clear error and an audit event. Slack's hosted
//! API cannot run here, so `common::slack` stands in for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::config::sha256_hex;
use common::slack::{SlackFake, click_body, post_click};
use common::{Setup, TestAgent, TestBroker, eventually, unix_now};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

pub(super) const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
pub(super) const BOT_TOKEN: &str = "xoxb-test-bot-token";
pub(super) const WEBHOOK_SECRET: &str = "whsec-test";

/// Approvers beyond the harness's own: `alice` and `bob` (team payments),
/// `carol` (team other), `owner` (the test agents' sponsor), and `dave`
/// (team payments, admin and approver both).
pub(super) struct Approvers {
    pub(super) alice: String,
    pub(super) bob: String,
    pub(super) carol: String,
    pub(super) owner: String,
    pub(super) dave: String,
}

impl Approvers {
    fn new() -> Self {
        let t = |n: &str| format!("kgop-{n}-{}", uuid::Uuid::new_v4().simple());
        Self {
            alice: t("alice"),
            bob: t("bob"),
            carol: t("carol"),
            owner: t("owner"),
            dave: t("dave"),
        }
    }

    fn toml(&self) -> String {
        let op = |name: &str, token: &str, extra: &str| {
            let roles = if name == "dave" {
                r#"["admin", "approver"]"#
            } else {
                r#"["approver"]"#
            };
            format!(
                "[[operators]]\nname = \"{name}\"\nroles = {roles}\ntoken_sha256 = \"{}\"\n{extra}\n",
                sha256_hex(token)
            )
        };
        [
            op(
                "alice",
                &self.alice,
                "team = \"payments\"\nslack_user_id = \"UALICE\"",
            ),
            op(
                "bob",
                &self.bob,
                "team = \"payments\"\nslack_user_id = \"UBOB\"\nemail = \"bob@keygate.test\"",
            ),
            op(
                "carol",
                &self.carol,
                "team = \"other\"\nslack_user_id = \"UCAROL\"",
            ),
            op(
                "owner",
                &self.owner,
                "email = \"owner@keygate.test\"\nslack_user_id = \"UOWNER\"",
            ),
            op("dave", &self.dave, "team = \"payments\""),
        ]
        .concat()
    }
}

pub(super) const SCOPES: &str = r##"
[[scopes]]
name = "x509-svid"
provider = "ca"
max_ttl_secs = 3600
params = { kind = "x509_svid" }

[[scopes]]
name = "payments-ca"
provider = "ca"
max_ttl_secs = 600
sensitive = true
approver_teams = ["payments"]
slack_channel = "#payments-approvals"
params = { kind = "x509_svid" }

[[scopes]]
name = "any-approver"
provider = "ca"
max_ttl_secs = 600
sensitive = true
params = { kind = "x509_svid" }

[[scopes]]
name = "sensitive-jwt"
provider = "ca"
max_ttl_secs = 600
sensitive = true
params = { kind = "jwt_svid", audiences = ["https://payments.keygate.test"] }

[[scopes]]
name = "two-approvers"
provider = "ca"
max_ttl_secs = 600
sensitive = true
approvals = 2
params = { kind = "x509_svid" }
"##;

pub(super) const PERMIT_ALL_CA: &str = r#"
@id("test-permit-all-ca")
permit (principal, action == Keygate::Action::"request_credential", resource)
when { resource.provider == "ca" && principal.risk_tier <= 2 };
"#;

pub(super) struct World {
    pub(super) b: TestBroker,
    pub(super) slack: SlackFake,
    pub(super) ap: Approvers,
}

pub(super) async fn world(extra: &str) -> World {
    world_with(extra, &[]).await
}

pub(super) async fn world_with(extra: &str, policies: &[(&str, &str)]) -> World {
    let slack = SlackFake::start(BOT_TOKEN).await;
    let ap = Approvers::new();
    let config = format!(
        r##"{ops}
[notify]
retry_base_ms = 100
retry_max_secs = 1

[notify.slack]
bot_token = "env:KG_TEST_SLACK_BOT"
signing_secret = "env:KG_TEST_SLACK_SIGNING"
default_channel = "#approvals"
api_url = "{api}"

[[notify.webhooks]]
name = "bus"
url = "{hook}"
secret = "env:KG_TEST_WEBHOOK"
{extra}
"##,
        ops = ap.toml(),
        api = slack.api_url(),
        hook = slack.webhook_url(),
    );
    let b = TestBroker::start_with(Setup {
        policies: std::iter::once(("permit.cedar", PERMIT_ALL_CA))
            .chain(policies.iter().copied())
            .map(|(n, p)| (n.to_owned(), p.to_owned()))
            .collect(),
        scopes: Some(SCOPES.into()),
        extra_config: config,
        env: vec![
            ("KG_TEST_SLACK_BOT".into(), BOT_TOKEN.into()),
            ("KG_TEST_SLACK_SIGNING".into(), SIGNING_SECRET.into()),
            ("KG_TEST_WEBHOOK".into(), WEBHOOK_SECRET.into()),
        ],
        ..Setup::default()
    })
    .await;
    World { b, slack, ap }
}

/// Asks for a sensitive scope; asserts 202 and returns the approval id.
pub(super) async fn ask(b: &TestBroker, session: &str, scope: &str) -> String {
    let body = b
        .post(
            "/v1/credentials",
            Some(session),
            &json!({ "scope": scope, "ttl": 300, "justification": "pay invoice 42" }),
        )
        .await
        .expect(202);
    assert_eq!(body["status"], "pending", "{body}");
    body["approval_id"].as_str().unwrap().to_owned()
}

pub(super) async fn approval(b: &TestBroker, id: &str) -> Value {
    b.admin_get(&format!("/v1/approvals/{id}")).await
}

/// The approval's Slack notification once its delivery is recorded
/// (`what`: what the wait is for, in a timeout's message).
pub(super) async fn slack_delivered(b: &TestBroker, id: &str, what: &str) -> Value {
    eventually(what, || async {
        let a = approval(b, id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == "slack" && n["delivered_at"].is_string())
            .cloned()
    })
    .await
}

pub(super) async fn decide(b: &TestBroker, token: &str, id: &str, decision: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(token),
        &json!({ "decision": decision, "reason": format!("{decision} in test") }),
    )
    .await
}

pub(super) async fn redeem(b: &TestBroker, session: &str, id: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/redeem"),
        Some(session),
        &json!({}),
    )
    .await
}

/// Audit events of `action` that mention the approval.
pub(super) async fn audited(b: &TestBroker, action: &str, approval: &str) -> Vec<Value> {
    b.audit(&format!("action={action}"))
        .await
        .into_iter()
        .filter(|e| e["details"]["approval"] == approval)
        .collect()
}

#[tokio::test]
async fn sensitive_scope_waits_for_a_signed_slack_click_then_redeems_once() {
    let w = world("").await;
    let (b, slack) = (&w.b, &w.slack);
    // Slack is down for the first two posts: the request is retried, not lost.
    slack.fail_next_posts(2);
    let (agent, s) = b.agent_with_task("appr", "platform").await;
    let id = ask(b, &s.token, "payments-ca").await;
    assert!(b.leases(&format!("agent={}", agent.id)).await.is_empty());

    let posted = eventually("the Slack request message", || async {
        slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.body["channel"] == "#payments-approvals")
    })
    .await;
    let text = posted.body.to_string();
    assert!(
        text.contains(&id) && text.contains("keygate_approve") && text.contains("pay invoice 42"),
        "{text}"
    );
    let n = slack_delivered(b, &id, "delivery recorded after retries").await;
    assert!(n["attempts"].as_u64().unwrap() >= 3, "{n}");

    // The agent sees pending, cannot redeem yet, and long-polls.
    let mine = b
        .get(&format!("/v1/approvals/{id}"), Some(&s.token))
        .await
        .expect(200);
    assert_eq!(mine["status"], "pending");
    let early = redeem(b, &s.token, &id).await;
    assert_eq!(early.status, 409, "{}", early.text);
    assert!(early.text.contains("still pending"), "{}", early.text);
    let poll = {
        let http = b.http.clone();
        let url = b.url(&format!("/v1/approvals/{id}?wait=30"));
        let token = s.token.clone();
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };

    // The poll is in flight: the server holds it rather than answering
    // `pending` at once.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before any decision"
    );

    // Alice (team payments, mapped Slack user) approves with a signed click.
    let body = click_body("UALICE", "keygate_approve", &id, &slack.response_url(1));
    let r = post_click(b, &body, Some(SIGNING_SECRET), unix_now()).await;
    let v = r.expect(200);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["status"], "approved");
    // It wakes on the decision, far sooner than its 30 s wait.
    let woke = tokio::time::timeout(std::time::Duration::from_secs(5), poll)
        .await
        .expect("the long-poll did not wake on the decision");
    assert_eq!(woke.unwrap()["status"], "approved");
    let reply = eventually("the response_url update", || async {
        slack.calls("/actions/1").into_iter().next()
    })
    .await;
    assert_eq!(reply.body["replace_original"], true);
    let reply_text = reply.body["text"].as_str().unwrap();
    assert!(
        reply_text.contains("approved") && reply_text.contains("alice"),
        "{reply_text}"
    );
    eventually("the request message closed with chat.update", || async {
        slack.calls("/api/chat.update").into_iter().next()
    })
    .await;

    // Only the asking task may redeem: not another agent, not another task.
    let (_, other) = b.agent_with_task("appr", "platform").await;
    let r = redeem(b, &other.token, &id).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("another agent or task"), "{}", r.text);
    let second_task = b.token(&agent).await;
    let r = redeem(b, &second_task.token, &id).await;
    assert_eq!(r.status, 403, "{}", r.text);

    let cred = redeem(b, &s.token, &id).await.expect(201);
    assert!(cred["credential"]["certificate"].is_string(), "{cred}");
    let lease = cred["lease_id"].as_str().unwrap();
    assert_eq!(b.lease_state(lease).await, "active");
    let twice = redeem(b, &s.token, &id).await;
    assert_eq!(twice.status, 409, "{}", twice.text);
    assert!(twice.text.contains("redeemed already"), "{}", twice.text);

    // Evidence: the request, Alice's Slack decision, the approval, the
    // redemption's lease; the three refused redemptions.
    assert_eq!(audited(b, "approval.requested", &id).await.len(), 1);
    let d = audited(b, "approval.decision", &id).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["actor"], "operator:alice");
    assert_eq!(d[0]["details"]["channel"], "slack");
    assert_eq!(audited(b, "approval.approved", &id).await.len(), 1);
    let redeemed = audited(b, "credential.redeemed", &id).await;
    assert_eq!(redeemed[0]["lease"], lease);
    let refused = audited(b, "approval.redeem", &id).await;
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused.iter().all(|e| e["outcome"] == "failure"));

    // The webhook got signed events for the request and the decision.
    let hooks = slack.calls("/hook");
    let kinds: Vec<&str> = hooks
        .iter()
        .map(|c| c.body["type"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"approval.requested") && kinds.contains(&"approval.decided"),
        "{kinds:?}"
    );
    for h in &hooks {
        let ts = h.headers["keygate-timestamp"].to_str().unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&h.raw);
        let want = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(h.headers["keygate-signature"].to_str().unwrap(), want);
    }
    // No secret reached the log or audit.
    let log = w.b.log();
    for secret in [SIGNING_SECRET, BOT_TOKEN, WEBHOOK_SECRET] {
        assert!(!log.contains(secret));
        assert!(
            !b.audit("")
                .await
                .iter()
                .any(|e| e.to_string().contains(secret))
        );
    }
}

#[tokio::test]
async fn quorum_separation_of_duties_double_votes_and_denial() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (_, s) = b.agent_with_task("appr", "platform").await;

    // One approval needed, and the sponsor may not be the only one.
    let id = ask(b, &s.token, "any-approver").await;
    let r = decide(b, &ap.owner, &id, "approve").await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("separation of duties"), "{}", r.text);
    // A non-approver role cannot decide at all.
    let r = decide(b, &b.ops.admin, &id, "approve").await;
    assert_eq!(r.status, 403);
    let v = decide(b, &ap.carol, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved");
    let late = decide(b, &ap.alice, &id, "approve").await;
    assert_eq!(late.status, 409, "{}", late.text);

    // Two needed: the sponsor may be one of them; nobody votes twice.
    let id = ask(b, &s.token, "two-approvers").await;
    let v = decide(b, &ap.owner, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "pending");
    let twice = decide(b, &ap.owner, &id, "approve").await;
    assert_eq!(twice.status, 409);
    assert!(twice.text.contains("already decided"), "{}", twice.text);
    let v = decide(b, &ap.bob, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved");
    assert_eq!(v["decisions"].as_array().unwrap().len(), 2);
    redeem(b, &s.token, &id).await.expect(201);

    // A denial by any eligible approver ends the request.
    let id = ask(b, &s.token, "two-approvers").await;
    decide(b, &ap.alice, &id, "approve").await.expect(200);
    let v = decide(b, &ap.bob, &id, "deny").await.expect(200);
    assert_eq!(v["state"], "denied");
    let r = redeem(b, &s.token, &id).await;
    assert_eq!(r.status, 409);
    assert!(r.text.contains("denied"), "{}", r.text);

    // The CLI lists and decides too.
    let id = ask(b, &s.token, "any-approver").await;
    let out = b.cli(&["approvals", "list"], Some(&ap.alice)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = b
        .cli(
            &["approvals", "deny", &id, "--reason", "not today"],
            Some(&ap.alice),
        )
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(approval(b, &id).await["state"], "denied");

    let refusals: Vec<Value> = b
        .audit("action=approval.decision")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "failure")
        .collect();
    assert_eq!(refusals.len(), 4, "{refusals:?}");
}

#[tokio::test]
async fn approvals_expire_and_end_with_their_task() {
    let w = world("[approvals]\nexpiry_secs = 2\n").await;
    let (b, ap) = (&w.b, &w.ap);
    let (_, s) = b.agent_with_task("appr", "platform").await;
    let id = ask(b, &s.token, "payments-ca").await;
    eventually("the approval expires", || async {
        (approval(b, &id).await["state"] == "expired").then_some(())
    })
    .await;
    let r = decide(b, &ap.alice, &id, "approve").await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.text.contains("expired"), "{}", r.text);
    assert_eq!(audited(b, "approval.expired", &id).await.len(), 1);

    let w2 = world("").await;
    let b2 = &w2.b;
    let (_, s2) = b2.agent_with_task("appr", "platform").await;
    let id = ask(b2, &s2.token, "payments-ca").await;
    b2.complete(&s2.token).await.expect(200);
    eventually("the approval is cancelled with its task", || async {
        (approval(b2, &id).await["state"] == "cancelled").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_redeem_the_provider_refuses_does_not_spend_the_approval() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (_, s) = b.agent_with_task("appr", "platform").await;
    // The audience is outside the scope's allow-list: the CA refuses at issue.
    let id = b
        .post(
            "/v1/credentials",
            Some(&s.token),
            &json!({
                "scope": "sensitive-jwt", "ttl": 300, "justification": "settle",
                "params": { "audience": "https://elsewhere.test" },
            }),
        )
        .await
        .expect(202)["approval_id"]
        .as_str()
        .unwrap()
        .to_owned();
    decide(b, &ap.carol, &id, "approve").await.expect(200);
    let r = redeem(b, &s.token, &id).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let a = approval(b, &id).await;
    assert_eq!(a["state"], "approved");
    assert_eq!(a["redeemed_at"], Value::Null, "{a}");
    assert_eq!(
        audited(b, "approval.redemption_released", &id).await.len(),
        1
    );
}

/// An approval never outlives its task (a 2-minute task gets an approval
/// that expires with it, however long `approvals` would wait), and policy
/// is asked again at redeem: a grant the active policy no longer permits
/// yields nothing.
#[tokio::test]
async fn an_approval_ends_with_its_task_and_redeem_asks_policy_again() {
    let w = world("").await;
    let b = &w.b;
    let agent = TestAgent::new("appr-short", "ES256");
    b.register(&agent, "platform").await;
    let before = time::OffsetDateTime::now_utc();
    let s = b.token_ttl(&agent, Some(120)).await;
    let id = ask(b, &s.token, "payments-ca").await;
    let a = approval(b, &id).await;
    let expires = common::rfc3339(&a["expires_at"]);
    assert!(
        expires <= before + time::Duration::seconds(125),
        "the approval outlives its 2-minute task: {a}"
    );

    // Granted, then the policy that permitted it is withdrawn.
    let s2 = b.token_ttl(&agent, Some(3600)).await;
    let id = ask(b, &s2.token, "payments-ca").await;
    decide(b, &w.ap.alice, &id, "approve").await.expect(200);
    let forbid = r#"@id("freeze-payments")
forbid (principal, action, resource == Keygate::Scope::"payments-ca");"#;
    std::fs::write(b.dir.join("policies/freeze.cedar"), forbid).unwrap();
    b.post("/v1/policy/reload", Some(&b.ops.admin), &json!({}))
        .await
        .expect(200);
    let r = redeem(b, &s2.token, &id).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("freeze-payments"), "{}", r.text);
    assert!(b.leases(&format!("agent={}", agent.id)).await.is_empty());
}

/// Without `approvals` on the scope, the quorum follows the agent's risk
/// tier (default 1, 1, 2); `sponsor_may_approve_alone = true` lets the
/// sponsor be the only approver.
#[tokio::test]
async fn quorum_follows_the_risk_tier_and_the_sponsor_may_be_allowed_alone() {
    const TIER3: &str = r#"@id("test-permit-tier-3")
permit (principal, action == Keygate::Action::"request_credential", resource == Keygate::Scope::"any-approver")
when { principal.risk_tier == 3 };"#;
    let w = world_with(
        "[approvals]\nsponsor_may_approve_alone = true\n",
        &[("tier3.cedar", TIER3)],
    )
    .await;
    let (b, ap) = (&w.b, &w.ap);

    // Tier 2: one approval, and it may be the sponsor's.
    let (_, s) = b.agent_with_task("appr", "platform").await;
    let id = ask(b, &s.token, "any-approver").await;
    assert_eq!(approval(b, &id).await["required"], 1);
    let v = decide(b, &ap.owner, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");

    // Tier 3: two approvals.
    let agent = TestAgent::new("tier3", "ES256");
    let mut spec = agent.spec("platform");
    spec["risk_tier"] = json!(3);
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let s3 = b.token(&agent).await;
    let id = ask(b, &s3.token, "any-approver").await;
    assert_eq!(approval(b, &id).await["required"], 2);
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "pending", "{v}");
    let v = decide(b, &ap.bob, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved", "{v}");
}
