//! Console pages over plain HTTP, where what matters is what they list:
//! every pending approval however many were decided since, every live
//! credential (expiring ones, old ones), and the kill switch's
//! confirmation naming everything the switch revokes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::approvals::{ask, decide, world};
use crate::common;
use common::console::ConsoleClient;
use common::{Setup, TestAgent, TestBroker};
use serde_json::json;

/// The console lists every pending approval, however many were decided
/// since the oldest was asked (it read the newest 200 of any state).
#[tokio::test]
async fn the_console_lists_an_old_pending_approval_behind_many_decided() {
    let w = world("").await;
    let (b, ap) = (&w.b, &w.ap);
    let (_, s) = b.agent_with_task("behind", "platform").await;
    let old = ask(b, &s.token, "any-approver").await;
    let (_, busy) = b.agent_with_task("busy", "platform").await;
    for _ in 0..210 {
        let id = ask(b, &busy.token, "any-approver").await;
        decide(b, &ap.alice, &id, "deny").await.expect(200);
    }
    let console = ConsoleClient::sign_in(b, &ap.alice).await;
    let (status, page) = console.page(b, "/ui/approvals").await;
    assert_eq!(status, 200, "{page}");
    let (waiting, decided) = page.split_once("Recently decided").unwrap();
    assert!(
        waiting.contains(&old),
        "the old pending approval is not listed"
    );
    assert!(!decided.contains(&old));
}

/// What is live is listed whatever else there is: a credential that
/// cannot be revoked (`expiring`) on the Leases page and the agent's page,
/// and an old live credential behind many newer released ones.
#[tokio::test]
async fn every_live_credential_is_listed_expiring_and_old_ones_too() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let (agent, s) = b.agent_with_task("livelist", "platform").await;
    let token = s.token;
    let old = b.x509(&token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stuck = b.x509(&token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Released, but its backend could not end it (as an AWS session).
    b.store_exec(
        "UPDATE leases SET state = 'expiring' WHERE id = ?",
        &[&stuck],
    )
    .await
    .unwrap();
    for _ in 0..120 {
        let id = b.x509(&token, Some(600)).await["lease_id"]
            .as_str()
            .unwrap()
            .to_owned();
        b.call(
            reqwest::Method::DELETE,
            &format!("/v1/credentials/{id}"),
            Some(&token),
            None,
        )
        .await
        .expect(200);
    }
    let console = ConsoleClient::sign_in(&b, &b.ops.secops).await;
    let (status, page) = console.page(&b, "/ui/leases").await;
    assert_eq!(status, 200, "{page}");
    let expiring = page.split("<h2>Expiring</h2>").nth(1).unwrap();
    assert!(
        expiring.contains(&stuck),
        "the expiring credential is not listed"
    );
    let (status, page) = console.page(&b, &format!("/ui/agents/{}", agent.id)).await;
    assert_eq!(status, 200, "{page}");
    let live = page.split("Live credentials").nth(1).unwrap();
    assert!(live.contains(&old), "the old live credential is hidden");
    assert!(live.contains(&stuck), "the expiring credential is hidden");
}

/// The kill switch's confirmation names everything the switch revokes: on
/// an orchestrator, the credentials its sub-agent holds in the task it
/// delegated too, and that agent.
#[tokio::test]
async fn the_kill_switch_preview_names_what_the_delegated_tasks_hold() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let sub = TestAgent::new("kp-sub", "ES256");
    b.register(&sub, "platform").await;
    let orch = TestAgent::new("kp-orch", "ES256");
    let mut spec = orch.spec("platform");
    spec["delegation"] = json!({ "max_depth": 1, "targets": [sub.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let parent = b.token(&orch).await;
    let own = b.x509(&parent.token, Some(300)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let child = b.exchange(&parent.token, &sub, None, None).await;
    assert_eq!(child.status, 200, "{}", child.text);
    let child = child.json()["access_token"].as_str().unwrap().to_owned();
    let delegated = b.x509(&child, Some(300)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let console = ConsoleClient::sign_in(&b, &b.ops.secops).await;
    let (status, page) = console
        .submit(
            &b,
            "/ui/kill",
            "/ui/kill",
            &[("by", "agent"), ("target", &orch.id), ("reason", "preview")],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains(&own) && page.contains(&delegated), "{page}");
    assert!(page.contains("2 live credentials"), "{page}");
    assert!(
        page.contains("2 agents") && page.contains(&sub.id),
        "{page}"
    );
    assert!(page.contains("2 open tasks"), "{page}");
    // A preview changes nothing.
    assert_eq!(b.lease_state(&delegated).await, "active");
    b.get("/v1/session", Some(&child)).await.expect(200);
}
