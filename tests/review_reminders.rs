//! Access review reminders through the real server: Slack messages (with
//! the test Slack stand-in) and signed webhooks, signed clicks that decide,
//! and escalations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::TestAgent;
use common::governance::{SPONSOR, campaign_due, item_of, sweep};
use serde_json::json;

const SIGNING: &str = "review-signing-secret";
const BOT: &str = "xoxb-review-bot";

/// Reviewers are reminded in Slack (a direct message when their operator
/// has a Slack id, with Attest and Retire buttons) and by a webhook; a
/// signed click decides as the mapped operator under the same rules, a
/// replayed or unmapped click is refused, and an overdue item is escalated
/// to the team lead in the default channel, where Retire works too.
#[tokio::test]
async fn reviewers_are_reminded_in_slack_and_decide_with_a_signed_click() {
    let slack = common::slack::SlackFake::start(BOT).await;
    let config = format!(
        r##"[notify]
retry_base_ms = 100
retry_max_secs = 1

[notify.slack]
bot_token = "env:KG_REVIEW_BOT"
signing_secret = "env:KG_REVIEW_SIGNING"
default_channel = "#reviews"
api_url = "{api}"

[[notify.webhooks]]
name = "bus"
url = "{hook}"
secret = "env:KG_REVIEW_HOOK"
"##,
        api = slack.api_url(),
        hook = slack.webhook_url(),
    );
    let env = [
        ("KG_REVIEW_BOT", BOT),
        ("KG_REVIEW_SIGNING", SIGNING),
        ("KG_REVIEW_HOOK", "whsec-review"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec();
    let (b, people) = common::governance::start_env(&config, env).await;
    let kept = TestAgent::new("rv-kept", "ES256");
    b.register(&kept, "platform").await;
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "q4-slack", "due_days": 7 }))
        .await
        .expect(201);
    let item = item_of(&started, &kept.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The sponsor (operator olga, Slack UOLGA) gets a direct message.
    let posted = common::eventually("the review reminder is posted", || async {
        slack
            .calls("/api/chat.postMessage")
            .into_iter()
            .find(|c| c.raw.windows(item.len()).any(|w| w == item.as_bytes()))
    })
    .await;
    assert_eq!(posted.body["channel"], "UOLGA", "{}", posted.body);
    let text = posted.body.to_string();
    assert!(
        text.contains("keygate_review_attest") && text.contains("keygate_review_retire"),
        "{text}"
    );
    let hook = common::eventually("the review webhook", || async {
        slack.calls("/hook").into_iter().find(|c| {
            c.body["type"] == "review.requested" && c.body["review_item"]["id"] == item.as_str()
        })
    })
    .await;
    assert_eq!(hook.body["review_item"]["reviewer"], SPONSOR);
    assert!(
        hook.headers.get("keygate-signature").is_some(),
        "signed: {:?}",
        hook.headers
    );

    // Someone Slack knows but Keygate does not: refused, audited, told.
    let now = common::unix_now();
    let stranger = common::slack::click_body(
        "USTRANGER",
        "keygate_review_attest",
        &item,
        &slack.response_url(1),
    );
    let r = common::slack::post_click(&b, &stranger, Some(SIGNING), now).await;
    let r = r.expect(200);
    assert_eq!(
        (r["ok"].as_bool(), r["error"].as_str()),
        (Some(false), Some("unknown_user")),
        "{r}"
    );
    let refused = b.audit("action=review.decision_refused").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    common::eventually("the stranger is told why", || async {
        slack.calls("/actions/1").into_iter().next()
    })
    .await;

    // The sponsor's click attests; the message becomes the outcome.
    let click = common::slack::click_body(
        "UOLGA",
        "keygate_review_attest",
        &item,
        &slack.response_url(2),
    );
    let r = common::slack::post_click(&b, &click, Some(SIGNING), now)
        .await
        .expect(200);
    assert_eq!(
        (r["ok"].as_bool(), r["status"].as_str()),
        (Some(true), Some("attested")),
        "{r}"
    );
    let decided = b.audit("action=review.attested").await;
    assert_eq!(decided[0]["actor"], "operator:olga", "{decided:?}");
    let answer = common::eventually("the click is answered", || async {
        slack.calls("/actions/2").into_iter().next()
    })
    .await;
    assert_eq!(answer.body["replace_original"], true, "{}", answer.body);
    assert!(
        answer.body["text"]
            .as_str()
            .unwrap()
            .contains("*attested* by olga"),
        "{}",
        answer.body
    );
    common::eventually("the reminder is updated to the outcome", || async {
        slack.calls("/api/chat.update").into_iter().find(|c| {
            c.body["ts"] == posted.body["ts"]
                || c.body["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("attested"))
        })
    })
    .await;
    // The same signed request again is a replay.
    common::slack::post_click(&b, &click, Some(SIGNING), now)
        .await
        .expect(401);
    // The item shows its reminders and that they were delivered.
    let shown = b.admin_get(&format!("/v1/reviews/items/{item}")).await;
    let delivered = shown["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["event"] == "review_requested" && n["delivered_at"].is_string())
        .count();
    assert_eq!(delivered, 2, "Slack and the webhook: {shown}");
    assert!(
        !shown.to_string().contains("/actions/"),
        "no response_url: {shown}"
    );

    // Another campaign, overdue: escalated to the lead in #reviews; an
    // admin's Retire there decommissions the agent.
    let late = TestAgent::new("rv-late", "ES256");
    b.register(&late, "platform").await;
    let started = b
        .admin_post(
            "/v1/reviews",
            &json!({ "name": "late-slack", "due_days": 7 }),
        )
        .await
        .expect(201);
    let late_item = item_of(&started, &late.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cid = started["campaign"]["id"].as_str().unwrap().to_owned();
    campaign_due(&b, &cid, 1).await;
    // Both agents are in it: both items escalate.
    assert_eq!(sweep(&b).await["escalated"], 2);
    let escalation = common::eventually("the escalation is posted", || async {
        slack.calls("/api/chat.postMessage").into_iter().find(|c| {
            c.body.to_string().contains("Overdue access review")
                && c.raw
                    .windows(late_item.len())
                    .any(|w| w == late_item.as_bytes())
        })
    })
    .await;
    assert_eq!(escalation.body["channel"], "#reviews");
    assert!(escalation.body.to_string().contains("lead@keygate.test"));
    let retire = common::slack::click_body(
        "UROOT2",
        "keygate_review_retire",
        &late_item,
        &slack.response_url(3),
    );
    let r = common::slack::post_click(&b, &retire, Some(SIGNING), common::unix_now())
        .await
        .expect(200);
    assert_eq!(r["status"], "retired", "{r}");
    let a = b.admin_get(&format!("/v1/agents/{}", late.id)).await;
    assert_eq!(a["status"], "decommissioned", "{a}");

    // Olga leaves. A reminder of hers still in Slack is clicked afterwards:
    // the click counts for nothing, as her approval clicks would not, and
    // the item stays open for whoever reviews in her place.
    let after = TestAgent::new("rv-after", "ES256");
    b.register(&after, "platform").await;
    let started = b
        .admin_post(
            "/v1/reviews",
            &json!({ "name": "after-departure", "due_days": 7 }),
        )
        .await
        .expect(201);
    let after_item = item_of(&started, &after.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.admin_post(
        &format!("/v1/people/{SPONSOR}/depart"),
        &json!({ "reason": "left the company" }),
    )
    .await
    .expect(200);
    let click = common::slack::click_body(
        "UOLGA",
        "keygate_review_attest",
        &after_item,
        &slack.response_url(4),
    );
    let r = common::slack::post_click(&b, &click, Some(SIGNING), common::unix_now())
        .await
        .expect(200);
    assert_eq!(r["ok"], false, "{r}");
    let refused = b.audit("action=review.decision_refused").await;
    assert!(
        refused
            .iter()
            .any(|e| e["actor"] == "operator:olga" && e.to_string().contains("departed")),
        "{refused:?}"
    );
    let shown = b
        .admin_get(&format!("/v1/reviews/items/{after_item}"))
        .await;
    assert_eq!(shown["state"], "open", "{shown}");
    drop(people);
}
