//! Approvals across the broker's stops and restarts: a long-poll in flight
//! when the broker is stopped is answered with what it has, and the
//! approval waits in the store for the broker to come back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::approvals::{approval, ask, decide, redeem, world};
use crate::common::TestBroker;
use serde_json::Value;

/// Spawns an agent's long-poll on approval `id`; its status and body.
fn long_poll(b: &TestBroker, session: &str, id: &str) -> tokio::task::JoinHandle<(u16, Value)> {
    let (http, token) = (b.http.clone(), session.to_owned());
    let url = b.url(&format!("/v1/approvals/{id}?wait=60"));
    tokio::spawn(async move {
        let r = http.get(url).bearer_auth(token).send().await;
        let r = r.expect("the long-poll was answered, not cut");
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    })
}

/// A long-poll in flight when the server is stopped (SIGTERM) is answered
/// then, with what it has (`pending`), rather than held through the
/// shutdown's drain and cut; after the restart the approval is still
/// pending, a new long-poll waits again, and a decision answers it.
#[tokio::test]
async fn a_long_poll_is_answered_when_the_server_stops_and_waits_again_after() {
    let mut w = world("").await;
    let (_, s) = w.b.agent_with_task("appr", "platform").await;
    let id = ask(&w.b, &s.token, "payments-ca").await;
    let poll = long_poll(&w.b, &s.token, &id);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before any decision"
    );

    w.b.stop_gracefully().await;
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "pending", "{body}");

    w.b.start_again().await;
    let (b, ap) = (&w.b, &w.ap);
    assert_eq!(approval(b, &id).await["state"], "pending");
    let poll = long_poll(b, &s.token, &id);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll answered before any decision"
    );
    decide(b, &ap.alice, &id, "approve").await.expect(200);
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "approved", "{body}");
    redeem(b, &s.token, &id).await.expect(201);
}
