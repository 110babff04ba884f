//! Continuous validation's learned baseline and its responses, through the
//! real server: a normal agent's week (played on validation's test clock)
//! raises nothing, a night burst is caught by what the agent learned, and
//! what it learned survives a restart; a policy change that widens an
//! agent's usage resets its baseline and raises nothing; `step_up` sends
//! every request to a human until an operator resolves the incident, and
//! `alert`s reach SecOps over Slack and the signed webhook, committed with
//! the incident.

use std::path::PathBuf;

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::common;
use crate::validation::{ask, client_from, detectors_of, incidents, open_task};
use common::slack::SlackFake;
use common::{Setup, TestAgent, TestBroker, eventually};

/// 2025-12-01 00:00 UTC, a Monday.
const MONDAY: i64 = 1_764_547_200;

/// Only `x509-svid`, for any agent: `jwt-svid` is the widening to come.
const X509_ONLY: &str = r#"
@id("x509-only")
permit (principal, action == Keygate::Action::"request_credential", resource)
when { resource == Keygate::Scope::"x509-svid" };
"#;

const WIDER: &str = r#"
@id("jwt-too")
permit (principal, action == Keygate::Action::"request_credential", resource)
when { resource == Keygate::Scope::"jwt-svid" };
"#;

/// The time continuous validation sees (a debug build reads this file).
struct Clock(PathBuf);

impl Clock {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("keygate-clock-{}", uuid::Uuid::new_v4())))
    }

    fn set(&self, unix: i64) {
        std::fs::write(&self.0, unix.to_string()).unwrap();
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_normal_week_raises_nothing_a_burst_is_judged_by_what_was_learned_and_a_policy_change_resets_it()
 {
    let clock = Clock::new();
    clock.set(MONDAY);
    let mut b = TestBroker::start_with(Setup {
        policies: vec![("x509-only.cedar".into(), X509_ONLY.into())],
        extra_config: r#"
[validation]
warm_up_observations = 3
baseline_min_samples = 1

[[detectors]]
name = "rate"
signal = "request_rate_baseline"
threshold = 4
severity = "high"
action = "record"

[[detectors]]
name = "new-scope"
signal = "new_scope"
severity = "low"
action = "record"

[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "low"
action = "record"

[[detectors]]
name = "requests"
signal = "credential_requests"
threshold = 20
window_secs = 300
severity = "medium"
action = "record"
"#
        .into(),
        env: vec![(
            "KEYGATE_TEST_VALIDATION_CLOCK".into(),
            clock.0.display().to_string(),
        )],
        ..Setup::default()
    })
    .await;
    let http = reqwest::Client::new();
    let (a, c) = (
        TestAgent::new("steady-a", "ES256"),
        TestAgent::new("steady-b", "ES256"),
    );
    b.register(&a, "platform").await;
    b.register(&c, "platform").await;
    let ta = open_task(&b, &http, &a).await;
    let tc = open_task(&b, &http, &c).await;

    // A week of office hours: five or six certificates an hour, weekdays
    // 9 to 17, and one some nights.
    for day in 0..7i64 {
        for hour in 0..24i64 {
            clock.set(MONDAY + day * 86_400 + hour * 3600);
            let n = match (day, hour) {
                (0..=4, 9..=16) => 5 + (day + hour) % 2,
                (_, 2) if day % 3 == 0 => 1,
                _ => 0,
            };
            for _ in 0..n {
                assert_eq!(ask(&b, &http, &ta, "x509-svid").await, 201);
                assert_eq!(ask(&b, &http, &tc, "x509-svid").await, 201);
            }
        }
    }
    assert!(
        incidents(&b, &a).await.is_empty(),
        "a normal week raised something"
    );
    assert!(incidents(&b, &c).await.is_empty());

    // What they learned is saved at a graceful stop and read back.
    b.stop_gracefully().await;
    b.start_again().await;

    // Tuesday 03:00 of the next week, agent A: fifteen certificates where
    // it learned to ask for none. Judged against its hour of the week, at
    // the request that makes it a burst.
    clock.set(MONDAY + 8 * 86_400 + 3 * 3600);
    for _ in 0..15 {
        assert_eq!(ask(&b, &http, &ta, "x509-svid").await, 201);
    }
    let list = incidents(&b, &a).await;
    assert_eq!(detectors_of(&list), ["rate"], "{list:?}");
    let ev = &list[0]["evidence"]["baseline"];
    assert_eq!(ev["basis"], "hour_of_week", "{ev}");
    assert_eq!(ev["observed"], 5, "fired at the fifth request: {ev}");
    assert_eq!(ev["baseline_mean"], 0.0, "{ev}");

    // The policy widens: B may now have JWTs, and uses them heavily at a
    // time it never worked. A legitimate change is learned, not flagged.
    std::fs::write(b.dir.join("policies/jwt-too.cedar"), WIDER).unwrap();
    let r = b
        .admin_post("/v1/policy/reload", &json!({}))
        .await
        .expect(200);
    assert!(r["held"].is_null(), "{r}");
    clock.set(MONDAY + 9 * 86_400 + 3 * 3600);
    for _ in 0..15 {
        assert_eq!(ask(&b, &http, &tc, "jwt-svid").await, 201);
    }
    assert!(
        incidents(&b, &c).await.is_empty(),
        "{:?}",
        incidents(&b, &c).await
    );
}

const BOT_TOKEN: &str = "xoxb-validation-test-bot";
const SIGNING_SECRET: &str = "validation-test-signing-secret";
const WEBHOOK_SECRET: &str = "validation-test-webhook-secret";

#[tokio::test]
async fn step_up_needs_a_human_until_resolved_and_alerts_reach_secops_with_the_incident() {
    let slack = SlackFake::start(BOT_TOKEN).await;
    let b = TestBroker::start_with(Setup {
        extra_config: format!(
            r##"
[notify]
retry_base_ms = 100
retry_max_secs = 1

[notify.slack]
bot_token = "env:KG_TEST_SLACK_BOT"
signing_secret = "env:KG_TEST_SLACK_SIGNING"
default_channel = "#approvals"
incident_channel = "#secops"
api_url = "{api}"

[[notify.webhooks]]
name = "bus"
url = "{hook}"
secret = "env:KG_TEST_WEBHOOK"

[validation]
warm_up_observations = 2

[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "high"
action = "step_up"

[[detectors]]
name = "scopes"
signal = "distinct_scopes"
threshold = 1
window_secs = 60
severity = "low"
action = "record"

[[detectors]]
name = "waiting"
signal = "approval_requests"
threshold = 1
window_secs = 60
severity = "low"
action = "record"

[[detectors]]
name = "x509-burst"
signal = "credential_requests"
scope = "x509-svid"
threshold = 3
window_secs = 60
severity = "medium"
action = "step_up"
"##,
            api = slack.api_url(),
            hook = slack.webhook_url(),
        ),
        env: vec![
            ("KG_TEST_SLACK_BOT".into(), BOT_TOKEN.into()),
            ("KG_TEST_SLACK_SIGNING".into(), SIGNING_SECRET.into()),
            ("KG_TEST_WEBHOOK".into(), WEBHOOK_SECRET.into()),
        ],
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("stepped", "ES256");
    b.register(&agent, "platform").await;
    let home = reqwest::Client::new();
    let t = open_task(&b, &home, &agent).await;
    assert_eq!(ask(&b, &home, &t, "x509-svid").await, 201);
    // Two scopes in a minute: a `record` incident, which alerts nobody.
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 201);

    // A task from a network it was never seen on: stepped up.
    let away = client_from("127.1.0.9");
    let t2 = open_task(&b, &away, &agent).await;
    let list = incidents(&b, &agent).await;
    assert_eq!(detectors_of(&list), ["new-network", "scopes"], "{list:?}");
    let step = list
        .iter()
        .find(|i| i["detector"] == "new-network")
        .unwrap();
    let recorded = list.iter().find(|i| i["detector"] == "scopes").unwrap();
    let incident = step["id"].as_str().unwrap().to_owned();
    let shown = b
        .get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
        .await
        .expect(200);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["step_up"]["incident"], incident, "{shown}");
    assert_eq!(shown["step_up"]["scopes"], "all");

    // Every request now waits for a human, from either task; a request
    // without any reason is refused with a clear error, not lost.
    let pending = b
        .post(
            "/v1/credentials",
            Some(&t),
            &json!({ "scope": "x509-svid", "ttl": 300, "justification": "rotating the mTLS cert" }),
        )
        .await
        .expect(202);
    assert_eq!(pending["status"], "pending", "{pending}");
    let approval = pending["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(ask(&b, &away, &t2, "x509-svid").await, 202);
    let shown = b.admin_get(&format!("/v1/approvals/{approval}")).await;
    assert_eq!(shown["request"]["step_up"], incident, "{shown}");
    let r = b
        .post(
            &format!("/v1/approvals/{approval}/decision"),
            Some(&b.ops.approver),
            &json!({ "decision": "approve", "reason": "checked with the team" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let issued = b
        .post(
            &format!("/v1/approvals/{approval}/redeem"),
            Some(&t),
            &json!({}),
        )
        .await
        .expect(201);
    assert!(issued["lease_id"].is_string(), "{issued}");

    // SecOps heard of the step-up on its channel and on the webhook, with
    // the evidence; the `record` incident reached no one.
    let posted = eventually("the incident posted to #secops", || async {
        slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.body["channel"] == "#secops")
    })
    .await;
    let text = posted.body["text"].as_str().unwrap();
    assert!(
        text.contains(&incident) && text.contains(&agent.id),
        "{text}"
    );
    assert!(text.contains("need an approval"), "{text}");
    let hook = eventually("the incident on the webhook", || async {
        slack
            .calls("/hook")
            .into_iter()
            .find(|c| c.body["type"] == "incident.opened")
    })
    .await;
    assert_eq!(hook.body["incident"]["id"], incident);
    assert_eq!(hook.body["incident"]["evidence"]["network"], "127.1.0.0/24");
    let ts = hook.headers["keygate-timestamp"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&hook.raw);
    let want = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(hook.headers["keygate-signature"].to_str().unwrap(), want);
    let recorded_id = recorded["id"].as_str().unwrap();
    let everything: Vec<Value> = slack
        .calls("/api/chat.postMessage")
        .into_iter()
        .chain(slack.calls("/hook"))
        .map(|c| c.body)
        .collect();
    assert!(
        !everything
            .iter()
            .any(|m| m.to_string().contains(recorded_id)),
        "a `record` incident was announced"
    );

    // Resolving the `record` incident lifts nothing; resolving the step-up
    // lifts it, and the next request is granted at once.
    let resolve = |id: String| {
        let b = &b;
        async move {
            let out = b
                .cli(
                    &[
                        "incidents",
                        "resolve",
                        &id,
                        "--reason",
                        "checked: a new office",
                    ],
                    Some(&b.ops.secops),
                )
                .await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    resolve(recorded_id.to_owned()).await;
    // The fourth x509-svid in a minute: a second step-up incident, which
    // now holds the agent's step-up.
    assert_eq!(ask(&b, &home, &t, "x509-svid").await, 202);
    let step_up_of = || async {
        b.get(&format!("/v1/agents/{}", agent.id), Some(&b.ops.admin))
            .await
            .expect(200)["step_up"]
            .clone()
    };
    let burst = step_up_of().await["incident"].as_str().unwrap().to_owned();
    assert_ne!(burst, incident);
    // Resolving the newer leaves the older one holding it: still a human.
    resolve(burst.clone()).await;
    assert_eq!(step_up_of().await["incident"], incident.as_str());
    assert_eq!(ask(&b, &home, &t, "jwt-svid").await, 202);
    // Resolving the last one lifts it.
    resolve(incident.clone()).await;
    assert!(step_up_of().await.is_null());
    assert_eq!(ask(&b, &home, &t, "x509-svid").await, 201);
    let lifted = b.audit("action=incident.resolved").await;
    assert_eq!(
        lifted
            .iter()
            .map(|e| e["details"]["step_up_lifted"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [false, false, true]
    );
    assert_eq!(lifted[1]["details"]["step_up_held_by"], incident.as_str());
    // The auditor's evidence pack carries both, with who resolved them.
    let day = time::OffsetDateTime::now_utc().date();
    let pack = b
        .get(
            &format!("/v1/evidence?from={day}&to={day}"),
            Some(&b.ops.auditor),
        )
        .await
        .expect(200);
    // Two requests waited for a human (the second passed the threshold of
    // one), and x509-svid alone was asked for a fourth time in a minute.
    assert_eq!(
        detectors_of(&incidents(&b, &agent).await),
        ["new-network", "scopes", "waiting", "x509-burst"]
    );
    assert_eq!(
        pack["summary"]["incidents_opened"], 4,
        "{}",
        pack["summary"]
    );
    assert_eq!(pack["summary"]["incidents_resolved"], 3);
    let row = pack["reviews"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == incident.as_str())
        .unwrap();
    assert_eq!(row["kind"], "incident");
    assert_eq!(row["action"], "step_up");
    assert_eq!(row["decided_by"], "operator:test-secops");
    assert_eq!(row["close_reason"], "checked: a new office");
    // No secret reached the log or the audit trail.
    let log = b.log();
    let audit = b.audit("").await;
    for secret in [SIGNING_SECRET, BOT_TOKEN, WEBHOOK_SECRET] {
        assert!(!log.contains(secret));
        assert!(!audit.iter().any(|e| e.to_string().contains(secret)));
    }
}
