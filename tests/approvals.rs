//! Approvals through the real server: sensitive scopes wait for humans, who
//! decide by signed Slack clicks or the API, under quorum and separation of
//! duties; every refusal is a clear error and an audit event. Slack's hosted
//! API cannot run here, so `common::slack` stands in for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::config::sha256_hex;
use common::slack::{SlackFake, click_body, post_click, slack_signature};
use common::{Setup, TestAgent, TestBroker, eventually, unix_now};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT_TOKEN: &str = "xoxb-test-bot-token";
const WEBHOOK_SECRET: &str = "whsec-test";

/// Approvers beyond the harness's own: `alice` and `bob` (team payments),
/// `carol` (team other), `owner` (the test agents' sponsor), and `dave`
/// (team payments, admin and approver both).
struct Approvers {
    alice: String,
    bob: String,
    carol: String,
    owner: String,
    dave: String,
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
                "team = \"payments\"\nslack_user_id = \"UBOB\"",
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

const SCOPES: &str = r##"
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

const PERMIT_ALL_CA: &str = r#"
@id("test-permit-all-ca")
permit (principal, action == Keygate::Action::"request_credential", resource)
when { resource.provider == "ca" && principal.risk_tier <= 2 };
"#;

struct World {
    b: TestBroker,
    slack: SlackFake,
    ap: Approvers,
}

async fn world(extra: &str) -> World {
    world_with(extra, &[]).await
}

async fn world_with(extra: &str, policies: &[(&str, &str)]) -> World {
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
async fn ask(b: &TestBroker, session: &str, scope: &str) -> String {
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

async fn approval(b: &TestBroker, id: &str) -> Value {
    b.admin_get(&format!("/v1/approvals/{id}")).await
}

async fn decide(b: &TestBroker, token: &str, id: &str, decision: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(token),
        &json!({ "decision": decision, "reason": format!("{decision} in test") }),
    )
    .await
}

async fn redeem(b: &TestBroker, session: &str, id: &str) -> common::Resp {
    b.post(
        &format!("/v1/approvals/{id}/redeem"),
        Some(session),
        &json!({}),
    )
    .await
}

/// Audit events of `action` that mention the approval.
async fn audited(b: &TestBroker, action: &str, approval: &str) -> Vec<Value> {
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
    let n = eventually("delivery recorded after retries", || async {
        let a = approval(b, &id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == "slack" && n["delivered_at"].is_string())
            .cloned()
    })
    .await;
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
async fn forged_stale_replayed_and_unmapped_clicks_are_refused_and_audited() {
    let w = world("").await;
    let b = &w.b;
    let (_, s) = b.agent_with_task("appr", "platform").await;
    let id = ask(b, &s.token, "payments-ca").await;
    let now = unix_now();
    let good = click_body("UALICE", "keygate_approve", &id, &w.slack.response_url(9));

    let unsigned = post_click(b, &good, None, now).await;
    assert_eq!(unsigned.status, 401, "{}", unsigned.text);
    let forged = post_click(b, &good, Some("not-the-signing-secret"), now).await;
    assert_eq!(forged.status, 401);
    assert!(
        forged.text.contains("signature does not match"),
        "{}",
        forged.text
    );
    let stale = post_click(b, &good, Some(SIGNING_SECRET), now - 400).await;
    assert_eq!(stale.status, 401);
    assert!(
        stale.text.contains("older than 5 minutes"),
        "{}",
        stale.text
    );
    // A body altered after signing.
    let sig = slack_signature(SIGNING_SECRET, now, &good);
    let tampered = click_body("UALICE", "keygate_deny", &id, &w.slack.response_url(9));
    let r = b
        .http
        .post(b.url("/v1/hooks/slack/interactions"))
        .header("x-slack-request-timestamp", now.to_string())
        .header("x-slack-signature", sig)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Authentic clicks from people who may not decide.
    let unknown = click_body("UNOBODY", "keygate_approve", &id, &w.slack.response_url(10));
    let v = post_click(b, &unknown, Some(SIGNING_SECRET), now)
        .await
        .expect(200);
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"], "unknown_user", "{v}");
    let carol = click_body("UCAROL", "keygate_approve", &id, &w.slack.response_url(11));
    let v = post_click(b, &carol, Some(SIGNING_SECRET), now)
        .await
        .expect(200);
    assert_eq!(v["error"], "forbidden", "{v}");
    assert!(v["message"].as_str().unwrap().contains("payments"), "{v}");
    let ephemeral = eventually("Carol sees why", || async {
        w.slack.calls("/actions/11").into_iter().next()
    })
    .await;
    assert_eq!(ephemeral.body["response_type"], "ephemeral");
    // The same signed request again is a replay.
    let replay = post_click(b, &carol, Some(SIGNING_SECRET), now).await;
    assert_eq!(replay.status, 401);
    assert!(replay.text.contains("replay"), "{}", replay.text);

    let a = approval(b, &id).await;
    assert_eq!(a["state"], "pending");
    assert_eq!(a["decisions"], json!([]));
    let hook_failures: Vec<Value> = b
        .audit("action=hook.slack")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "failure")
        .collect();
    assert_eq!(hook_failures.len(), 5, "{hook_failures:?}");
    let refused = audited(b, "approval.decision", &id).await;
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.iter().all(|e| e["outcome"] == "failure"));
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
async fn provisioning_approval_holds_new_agents_and_widening_changes() {
    let w = world(
        "[provisioning]\nrequire_approval = true\napprovals = 2\napprover_teams = [\"payments\"]\n",
    )
    .await;
    let (b, ap) = (&w.b, &w.ap);
    let agent = TestAgent::new("prov", "ES256");
    // Tier 3: the test policy lets it reach no scope.
    let mut spec = agent.spec("finance");
    spec["risk_tier"] = json!(3);
    let held = b.admin_post("/v1/agents", &spec).await.expect(202);
    assert_eq!(held["agent"]["status"], "pending");
    let id = held["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(held["approval"]["kind"], "provisioning");
    // A pending agent cannot open a task.
    let r = b.token_with_assertion(&agent.id, &agent.assertion()).await;
    assert_eq!(r.status, 401, "{}", r.text);
    // An admin without the approver role cannot approve; Carol is not in
    // the approving team.
    assert_eq!(decide(b, &b.ops.admin, &id, "approve").await.status, 403);
    let r = decide(b, &ap.carol, &id, "approve").await;
    assert_eq!(r.status, 403, "carol is not in payments: {}", r.text);
    decide(b, &ap.alice, &id, "approve").await.expect(200);
    let agent_url = format!("/v1/agents/{}", agent.id);
    assert_eq!(b.admin_get(&agent_url).await["status"], "pending");

    // Dave holds both roles and is in the team: only the requester rule
    // can stop him approving the agent he registered himself.
    let own = TestAgent::new("prov-own", "ES256");
    let mine = b
        .post("/v1/agents", Some(&ap.dave), &own.spec("finance"))
        .await
        .expect(202);
    let mine = mine["approval"]["id"].as_str().unwrap().to_owned();
    let r = decide(b, &ap.dave, &mine, "approve").await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.text
            .contains("asked for this change and cannot also decide it"),
        "{}",
        r.text
    );
    // ... while he may approve what someone else asked for.
    decide(b, &ap.dave, &id, "approve").await.expect(200);
    assert_eq!(b.admin_get(&agent_url).await["status"], "active");
    b.token(&agent).await;

    let patch = |body: Value| {
        let url = agent_url.clone();
        async move {
            b.call(
                reqwest::Method::PATCH,
                &url,
                Some(&b.ops.admin),
                Some(&body),
            )
            .await
        }
    };
    // A change that reaches no new scope applies at once.
    let r = patch(json!({ "purpose": "reconcile invoices" })).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["purpose"], "reconcile invoices");

    // Tier 2 makes every CA scope reachable: the change waits.
    let r = patch(json!({ "risk_tier": 2 })).await;
    let held = r.expect(202);
    let widened = held["widened_scopes"].as_array().unwrap();
    assert!(widened.contains(&json!("payments-ca")), "{held}");
    assert_eq!(held["agent"]["risk_tier"], 3);
    let change = held["approval"]["id"].as_str().unwrap().to_owned();
    assert_eq!(b.admin_get(&agent_url).await["risk_tier"], 3);
    decide(b, &ap.alice, &change, "approve").await.expect(200);
    decide(b, &ap.bob, &change, "approve").await.expect(200);
    assert_eq!(b.admin_get(&agent_url).await["risk_tier"], 2);

    // The provisioning records an auditor asks for.
    for a in [&id, &change] {
        assert_eq!(audited(b, "approval.requested", a).await.len(), 1);
        let want = if a == &id { 4 } else { 2 };
        assert_eq!(audited(b, "approval.decision", a).await.len(), want);
        assert_eq!(audited(b, "approval.approved", a).await.len(), 1);
    }
}

#[tokio::test]
async fn policy_can_auto_approve_and_tier_three_must_confirm_in_keygate() {
    const AUTO: &str = r#"
@id("auto-approve-short-any-approver")
permit (principal, action == Keygate::Action::"auto_approve", resource == Keygate::Scope::"any-approver")
when { context.ttl <= 60 };
"#;
    let w = world_with(
        "[approvals]\nconfirm_in_api_tiers = [2]\n",
        &[("auto.cedar", AUTO)],
    )
    .await;
    let (b, ap) = (&w.b, &w.ap);
    let (agent, s) = b.agent_with_task("appr", "platform").await;

    // Short enough: policy approves without a human, and says which policy.
    let cred = b
        .post(
            "/v1/credentials",
            Some(&s.token),
            &json!({ "scope": "any-approver", "ttl": 60, "justification": "quick check" }),
        )
        .await
        .expect(201);
    assert!(cred["lease_id"].is_string());
    let auto = b.audit("action=approval.auto_approved").await;
    assert_eq!(auto.len(), 1);
    assert_eq!(auto[0]["agent"], agent.id.as_str());
    assert_eq!(
        auto[0]["policy_ids"],
        json!(["auto-approve-short-any-approver"])
    );

    // Longer: a human decides, and for this tier not by a Slack click.
    let id = ask(b, &s.token, "any-approver").await;
    let posted = eventually("the Slack request message", || async {
        w.slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.body.to_string().contains(&id))
    })
    .await;
    let text = posted.body.to_string();
    assert!(
        text.contains("Review in Keygate") && !text.contains("keygate_approve"),
        "{text}"
    );
    let click = click_body("UALICE", "keygate_approve", &id, &w.slack.response_url(3));
    let v = post_click(b, &click, Some(SIGNING_SECRET), unix_now())
        .await
        .expect(200);
    assert_eq!(v["ok"], false);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("must be decided in Keygate"),
        "{v}"
    );
    let v = decide(b, &ap.alice, &id, "approve").await.expect(200);
    assert_eq!(v["state"], "approved");
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

#[tokio::test]
async fn slack_text_is_inert_replays_are_byte_keyed_and_response_urls_stay_hidden() {
    let w = world("").await;
    let b = &w.b;
    let (_, s) = b.agent_with_task("appr", "platform").await;
    // Agent-supplied text aimed at the approvers' channel.
    let body = b
        .post(
            "/v1/credentials",
            Some(&s.token),
            &json!({
                "scope": "payments-ca", "ttl": 300,
                "justification": "<!channel> urgent: see <https://evil.example|the invoice> & pay",
            }),
        )
        .await
        .expect(202);
    let id = body["approval_id"].as_str().unwrap().to_owned();
    let posted = eventually("the Slack request message", || async {
        w.slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.body.to_string().contains(&id))
    })
    .await;
    let text = posted.body.to_string();
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(!text.contains("<https://evil.example|"), "{text}");
    assert!(
        text.contains("&lt;!channel&gt;") && text.contains("&amp; pay"),
        "{text}"
    );

    // The same signed click with its MAC spelled in upper-case hex is a replay.
    let now = unix_now();
    let click = click_body("UCAROL", "keygate_approve", &id, &w.slack.response_url(21));
    let sig = slack_signature(SIGNING_SECRET, now, &click);
    let send = |sig: String| {
        let click = click.clone();
        async move {
            let r = b
                .http
                .post(b.url("/v1/hooks/slack/interactions"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-slack-request-timestamp", now.to_string())
                .header("x-slack-signature", sig)
                .body(click)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = send(sig.clone()).await;
    assert_eq!(status, 200, "{text}");
    let upper = format!("v0={}", sig.trim_start_matches("v0=").to_ascii_uppercase());
    let (status, text) = send(upper).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("replay"), "{text}");
    // A timestamp at the end of the range is refused, not an overflow.
    let r = b
        .http
        .post(b.url("/v1/hooks/slack/interactions"))
        .header("x-slack-request-timestamp", i64::MIN.to_string())
        .header(
            "x-slack-signature",
            slack_signature(SIGNING_SECRET, i64::MIN, &click),
        )
        .body(click.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Carol's refusal went back through her click's response_url; no reader
    // sees that URL (a capability to post into the channel).
    eventually("the ephemeral reply", || async {
        w.slack.calls("/actions/21").into_iter().next()
    })
    .await;
    for reader in [&b.ops.auditor, &b.ops.admin, &b.ops.approver] {
        let r = b.get(&format!("/v1/approvals/{id}"), Some(reader)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(!r.text.contains("/actions/21"), "{}", r.text);
        assert!(r.text.contains("[redacted]"), "{}", r.text);
    }
}

/// Slack as Slack answers: a rate-limited post (429 with `Retry-After`) is
/// retried no sooner than Slack asked; a justification far past Block
/// Kit's limits still makes a message the fake's validation accepts; a
/// `response_url` used up (five answers) is given up, visibly.
#[tokio::test]
async fn slack_rate_limits_block_kit_limits_and_used_up_response_urls() {
    let w = world("").await;
    let (b, slack) = (&w.b, &w.slack);
    slack.rate_limit_next(1, 3);
    let (_, s) = b.agent_with_task("appr", "platform").await;
    let body = json!({ "scope": "payments-ca", "ttl": 300, "justification": "x".repeat(10_000) });
    let held = b
        .post("/v1/credentials", Some(&s.token), &body)
        .await
        .expect(202);
    let id = held["approval_id"].as_str().unwrap().to_owned();
    let n = eventually("the request is posted after the rate limit", || async {
        let a = approval(b, &id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == "slack" && n["delivered_at"].is_string())
            .cloned()
    })
    .await;
    assert_eq!(n["attempts"], 2, "{n}");
    let posts = slack.calls("/api/chat.postMessage");
    let (first, second) = (&posts[0], &posts[posts.len() - 1]);
    let at = |c: &common::slack::Call| c.at;
    assert!(
        at(second) - at(first) >= std::time::Duration::from_millis(2900),
        "retried {:?} after a Retry-After of 3 s",
        at(second) - at(first)
    );
    let text = second.body.to_string();
    assert!(
        text.contains("xxx…"),
        "the justification is cut: {}",
        &text[..200]
    );

    // Six clicks on one message: the sixth answer finds the URL used up.
    let url = slack.response_url(9);
    // Distinct timestamps (one base: a second ticking over between two
    // clicks must not make two of them the same request, a replay).
    let base = unix_now();
    for i in 0..6 {
        let click = click_body("UCAROL", "keygate_approve", &id, &url);
        post_click(b, &click, Some(SIGNING_SECRET), base - i)
            .await
            .expect(200);
    }
    let gave_up = eventually("the sixth answer is given up", || async {
        let a = approval(b, &id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| {
                n["event"] == "reply"
                    && n["next_attempt_at"].is_null()
                    && n["delivered_at"].is_null()
                    && n["attempts"] == 1
            })
            .cloned()
    })
    .await;
    assert!(
        gave_up["last_error"]
            .as_str()
            .unwrap()
            .contains("expired or used up"),
        "{gave_up}"
    );
}

/// A webhook that fails is retried with the same `Keygate-Event-Id` (so a
/// receiver can drop duplicates) and a fresh signature; another agent
/// cannot read this agent's approval.
#[tokio::test]
async fn webhook_retries_keep_their_event_id_and_approvals_stay_private() {
    let w = world("").await;
    let (b, slack) = (&w.b, &w.slack);
    slack.fail_next_hooks(2);
    let (_, s) = b.agent_with_task("appr", "platform").await;
    let id = ask(b, &s.token, "payments-ca").await;
    let hooks = eventually("three deliveries of the request", || async {
        let calls: Vec<common::slack::Call> = slack
            .calls("/hook")
            .into_iter()
            .filter(|c| {
                c.body["approval"]["id"] == id.as_str() && c.body["type"] == "approval.requested"
            })
            .collect();
        (calls.len() >= 3).then_some(calls)
    })
    .await;
    let header =
        |c: &common::slack::Call, h: &str| c.headers.get(h).unwrap().to_str().unwrap().to_owned();
    let ids: std::collections::BTreeSet<String> = hooks
        .iter()
        .map(|c| header(c, "keygate-event-id"))
        .collect();
    assert_eq!(ids.len(), 1, "one event id across retries: {ids:?}");
    // The receiver has the third delivery before the broker records its
    // outcome: wait for the record.
    let delivered = eventually("the third delivery recorded", || async {
        approval(b, &id).await["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| {
                n["channel"] == "webhook:bus"
                    && n["event"] == "approval.requested"
                    && !n["delivered_at"].is_null()
            })
            .cloned()
    })
    .await;
    assert_eq!(delivered["attempts"], 3, "{delivered}");
    assert_eq!(
        ids.iter().next().unwrap(),
        delivered["id"].as_str().unwrap()
    );

    // Another agent's session cannot see it (nor learn that it exists).
    let (_, other) = b.agent_with_task("appr", "platform").await;
    let r = b
        .get(&format!("/v1/approvals/{id}"), Some(&other.token))
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(!r.text.contains("pay invoice"), "{}", r.text);
}

/// The outbox is in the store: a request whose Slack message could not be
/// sent before the broker was killed is sent by the next process.
#[tokio::test]
async fn the_notification_outbox_survives_a_crash() {
    let mut w = world("").await;
    w.slack.fail_next_posts(usize::MAX / 2);
    let (_, s) = w.b.agent_with_task("appr", "platform").await;
    let id = ask(&w.b, &s.token, "payments-ca").await;
    eventually("a first attempt failed", || async {
        let a = approval(&w.b, &id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == "slack" && n["attempts"].as_u64() >= Some(1))
            .cloned()
    })
    .await;
    w.b.kill().await;
    w.slack.fail_next_posts(0);
    w.b.start_again().await;
    // Every post failed before the kill: a delivery now is the new
    // process's, from the row the old one left.
    let n = eventually("the message is sent after the restart", || async {
        let a = approval(&w.b, &id).await;
        a["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["channel"] == "slack" && n["delivered_at"].is_string())
            .cloned()
    })
    .await;
    assert!(n["attempts"].as_u64().unwrap() >= 2, "{n}");
    let a = approval(&w.b, &id).await;
    assert_eq!(a["state"], "pending", "{a}");
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
