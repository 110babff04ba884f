//! Approval notifications through the real server: what Slack and
//! webhooks receive, which clicks count, how deliveries are retried, limited and kept across a
//! crash, and that nothing a message carries can act. Split from
//! `approvals.rs`, whose world and helpers these tests share.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use super::approvals::*;
use common::slack::{click_body, post_click, slack_signature};
use common::{eventually, unix_now};
use serde_json::{Value, json};

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
    let n = slack_delivered(b, &id, "the request is posted after the rate limit").await;
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
    let n = slack_delivered(&w.b, &id, "the message is sent after the restart").await;
    assert!(n["attempts"].as_u64().unwrap() >= 2, "{n}");
    let a = approval(&w.b, &id).await;
    assert_eq!(a["state"], "pending", "{a}");
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
