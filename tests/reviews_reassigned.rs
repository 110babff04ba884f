//! Review items as the agent changes under them: a review in one campaign
//! closes the agent's items in others, a retired agent's items are
//! cancelled before anything escalates, and a sponsor named during a
//! campaign reviews the agent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use crate::reviews::decide;

use common::TestAgent;
use common::governance::{SPONSOR, campaign_due, item_of, start, sweep};
use serde_json::json;

/// Two campaigns, `first` and `second`, due in a week: their answers.
async fn two_campaigns(b: &common::TestBroker) -> (serde_json::Value, serde_json::Value) {
    let campaign = |name: &str| {
        let body = json!({ "name": name, "due_days": 7 });
        async move { b.admin_post("/v1/reviews", &body).await.expect(201) }
    };
    (campaign("first").await, campaign("second").await)
}

/// A review in one campaign is the agent's review: its items still open
/// in other campaigns (an automatic one, an older one) close with it, as
/// cancelled, so none of them later goes overdue on an agent just
/// attested; a campaign counts them apart from the decided.
#[tokio::test]
async fn attesting_an_agent_closes_its_items_in_other_campaigns() {
    let (b, people) =
        start("[[lifecycle]]\nname = \"strict\"\noverdue_action = \"suspend\"\ngrace_days = 0\n")
            .await;
    let agent = TestAgent::new("rv-twice", "ES256");
    b.register(&agent, "platform").await;
    let (first, second) = two_campaigns(&b).await;
    let item = item_of(&second, &agent.id)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    decide(&b, &people.olga, &item, json!({ "decision": "attest" }))
        .await
        .expect(200);
    let view = b.admin_get("/v1/reviews/first").await;
    assert_eq!(
        (&view["open"], &view["decided"], &view["cancelled"]),
        (&json!(0), &json!(0), &json!(1)),
        "{view}"
    );
    let cancelled = b.audit("action=review.cancelled").await;
    assert!(
        cancelled[0]["reason"].as_str().unwrap().contains(&item),
        "{cancelled:?}"
    );

    // Long past the first campaign's due date: nothing escalates, nothing
    // is suspended.
    let cid = first["campaign"]["id"].as_str().unwrap();
    campaign_due(&b, cid, 10).await;
    assert_eq!(sweep(&b).await["escalated"], 0);
    let a = b.admin_get(&format!("/v1/agents/{}", agent.id)).await;
    assert_eq!(a["status"], "active", "{a}");
}

/// Attesting an agent's items in two campaigns at the same moment: one
/// attestation stands and cancels the other item, the other is told its
/// item changed (409) — never a failure of the store. On PostgreSQL each
/// decision locks its item and then the other's; without one order for
/// those locks the two would lock them crosswise and one would die as a
/// deadlock. Raced for several agents, since the crosswise order needs
/// both to have locked their own item first.
#[tokio::test]
async fn attesting_an_agent_in_two_campaigns_at_once_keeps_one_attestation() {
    let (b, people) = start("").await;
    let agents: Vec<TestAgent> = (0..6)
        .map(|n| TestAgent::new(&format!("rv-race-{n}"), "ES256"))
        .collect();
    for a in &agents {
        b.register(a, "platform").await;
    }
    let (first, second) = two_campaigns(&b).await;
    for a in &agents {
        let id = |c: &serde_json::Value| item_of(c, &a.id)["id"].as_str().unwrap().to_owned();
        let (one, two) = (id(&first), id(&second));
        let attest = json!({ "decision": "attest" });
        let (r1, r2) = tokio::join!(
            decide(&b, &people.olga, &one, attest.clone()),
            decide(&b, &people.olga, &two, attest.clone())
        );
        let mut codes = [r1.status.as_u16(), r2.status.as_u16()];
        codes.sort_unstable();
        assert_eq!(codes, [200, 409], "{}: {} / {}", a.id, r1.text, r2.text);
    }
    let (v1, v2) = (
        b.admin_get("/v1/reviews/first").await,
        b.admin_get("/v1/reviews/second").await,
    );
    assert!(!b.log().contains("collided"), "{}", b.log());
    for (what, n) in [("decided", 6), ("cancelled", 6), ("open", 0)] {
        assert_eq!(
            v1[what].as_u64().unwrap() + v2[what].as_u64().unwrap(),
            n,
            "{what}: {v1} {v2}"
        );
    }
}

/// An overdue item of an agent decommissioned meanwhile is cancelled by
/// the sweep, not escalated to anyone.
#[tokio::test]
async fn an_overdue_item_of_a_retired_agent_is_cancelled_not_escalated() {
    let (b, _people) = start("").await;
    let agent = TestAgent::new("rv-gone", "ES256");
    b.register(&agent, "platform").await;
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "gone", "due_days": 7 }))
        .await
        .expect(201);
    b.admin_post(
        &format!("/v1/agents/{}/decommission", agent.id),
        &json!({ "reason": "retired" }),
    )
    .await
    .expect(200);
    let cid = started["campaign"]["id"].as_str().unwrap();
    campaign_due(&b, cid, 1).await;
    assert_eq!(sweep(&b).await["escalated"], 0);
    assert!(b.audit("action=review.escalated").await.is_empty());
    let view = b.admin_get("/v1/reviews/gone").await;
    assert_eq!(view["cancelled"], 1, "{view}");
}

/// An item is the reviewer's as the agent is now: a sponsor named after
/// the campaign began reviews it (and sees it, once the sweep reassigns
/// it), as the one it was opened for no longer does.
#[tokio::test]
async fn a_sponsor_named_during_a_campaign_reviews_the_agent() {
    let (b, people) = start("").await;
    let agent = TestAgent::new("rv-handover", "ES256");
    let mut spec = agent.spec("platform");
    spec["sponsor"] = json!("root2@keygate.test");
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let started = b
        .admin_post("/v1/reviews", &json!({ "name": "handover", "due_days": 7 }))
        .await
        .expect(201);
    let item = item_of(&started, &agent.id);
    assert_eq!(item["reviewer"], "root2@keygate.test");
    let item = item["id"].as_str().unwrap().to_owned();
    b.patch_agent(&agent.id, &json!({ "sponsor": SPONSOR }))
        .await
        .expect(200);

    sweep(&b).await;
    let now = b.admin_get(&format!("/v1/reviews/items/{item}")).await;
    assert_eq!(now["reviewer"], SPONSOR, "{now}");
    let moved = b.audit("action=review.reassigned").await;
    assert_eq!(moved[0]["details"]["to"], SPONSOR, "{moved:?}");
    decide(&b, &people.olga, &item, json!({ "decision": "attest" }))
        .await
        .expect(200);
}
