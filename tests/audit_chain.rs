//! The hash-chained audit log: an intact chain verifies, from the database
//! file and through the server; an altered or deleted row is found.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{TestAgent, TestBroker};
use keygate::audit::{AuditEvent, GENESIS_HASH, verify_chain};

/// Some history: registrations, a task with credentials, a refusal.
async fn activity(b: &TestBroker) {
    let agent = TestAgent::new("audited", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    b.x509(&s.token, Some(120)).await;
    b.jwt_svid(&s.token, Some(120)).await;
    b.complete(&s.token).await.expect(200);
    let r = b.token_with_assertion(&agent.id, "not.a.jwt").await;
    assert_eq!(r.status, 401);
}

async fn api_events(b: &TestBroker) -> Vec<AuditEvent> {
    b.audit("")
        .await
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

/// Runs `keygate audit verify` from the db file and through the server;
/// returns (exit ok, stdout + stderr) for each.
async fn verify_both(b: &TestBroker) -> [(bool, String); 2] {
    let mut offline = vec!["audit".to_owned(), "verify".to_owned()];
    offline.extend(b.store_args());
    let offline: Vec<&str> = offline.iter().map(String::as_str).collect();
    let outs = [
        b.cli(&offline, None).await,
        b.cli(&["audit", "verify"], Some(&b.ops.auditor)).await,
    ];
    outs.map(|o| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    })
}

#[tokio::test]
async fn an_intact_chain_verifies() {
    let b = TestBroker::start().await;
    activity(&b).await;
    let events = api_events(&b).await;
    assert!(events.len() >= 8, "{} events", events.len());
    let (n, head) = verify_chain(&events, 0, GENESIS_HASH.into()).unwrap();
    assert_eq!(n, events.last().unwrap().seq);
    for (ok, text) in verify_both(&b).await {
        assert!(ok, "{text}");
        assert!(text.contains("audit chain intact"), "{text}");
        // Later events may have been appended; the head we saw is a prefix.
        assert!(text.contains("events, head "), "{text}");
    }
    assert_eq!(head.len(), 64);

    // Without an operator token the server refuses, and the CLI says so.
    let o = b.cli(&["audit", "verify"], None).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("401") && !err.contains("chain broken"),
        "{err}"
    );
}

#[tokio::test]
async fn an_altered_row_is_the_reported_break() {
    let b = TestBroker::start().await;
    activity(&b).await;
    let before = api_events(&b).await;
    let target = before[before.len() / 2].seq;

    // The schema refuses edits outright.
    let seq = target.to_string();
    let why = b
        .store_exec(
            "UPDATE audit_events SET reason = 'edited' WHERE seq = ?",
            &[&seq],
        )
        .await
        .unwrap_err();
    assert!(why.contains("audit events are append-only"), "{why}");
    let why = b
        .store_exec("DELETE FROM audit_events WHERE seq = ?", &[&seq])
        .await
        .unwrap_err();
    assert!(why.contains("audit events are append-only"), "{why}");
    assert_eq!(api_events(&b).await[..before.len()], before[..]);

    // An attacker with write access lifts the guards and rewrites history.
    b.lift_audit_guards().await;
    let done = b
        .store_exec(
            "UPDATE audit_events SET reason = 'nothing to see here' WHERE seq = ?",
            &[&seq],
        )
        .await
        .unwrap();
    assert_eq!(done, 1);
    // The broker keeps appending after the edit; the break stays put.
    activity(&b).await;

    let broken = verify_chain(&api_events(&b).await, 0, GENESIS_HASH.into()).unwrap_err();
    assert_eq!(broken.seq, target);
    let want = format!("audit chain broken at event {target}:");
    for (ok, text) in verify_both(&b).await {
        assert!(!ok, "verify must fail: {text}");
        assert!(text.contains(&want), "{text}");
    }
    // The file check does not need the server.
    let mut b = b;
    b.kill().await;
    let mut offline = vec!["audit".to_owned(), "verify".to_owned()];
    offline.extend(b.store_args());
    let offline: Vec<&str> = offline.iter().map(String::as_str).collect();
    let o = b.cli(&offline, None).await;
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&want));
}

#[tokio::test]
async fn a_deleted_row_breaks_the_chain_at_the_next() {
    let b = TestBroker::start().await;
    activity(&b).await;
    let events = api_events(&b).await;
    let target = events[events.len() / 2].seq;
    b.lift_audit_guards().await;
    let done = b
        .store_exec(
            "DELETE FROM audit_events WHERE seq = ?",
            &[&target.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(done, 1);
    let want = format!("audit chain broken at event {}:", target + 1);
    for (ok, text) in verify_both(&b).await {
        assert!(!ok, "{text}");
        assert!(text.contains(&want), "{text}");
    }
}
