//! The SecOps kill switch: emergency revocation by agent and by team.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Session, Setup, TestAgent, TestBroker};
use serde_json::{Value, json};

/// An agent with its open tasks and their leases (`(lease id, credential)`).
struct Busy {
    agent: TestAgent,
    tasks: Vec<Session>,
    leases: Vec<(String, Value)>,
}

/// Registers an agent and opens `tasks` tasks, each with an X.509-SVID and a
/// JWT-SVID.
async fn busy(b: &TestBroker, prefix: &str, team: &str, tasks: usize) -> Busy {
    let agent = TestAgent::new(
        prefix,
        if tasks.is_multiple_of(2) {
            "ES256"
        } else {
            "EdDSA"
        },
    );
    b.register(&agent, team).await;
    let mut out = Busy {
        agent,
        tasks: Vec::new(),
        leases: Vec::new(),
    };
    for _ in 0..tasks {
        let s = b.token(&out.agent).await;
        for cred in [
            b.x509(&s.token, Some(600)).await,
            b.jwt_svid(&s.token, Some(600)).await,
        ] {
            out.leases
                .push((cred["lease_id"].as_str().unwrap().to_owned(), cred));
        }
        out.tasks.push(s);
    }
    out
}

/// What a relying party says about a credential now.
async fn still_valid(b: &TestBroker, cred: &Value) -> bool {
    let c = &cred["credential"];
    let presented = match c["certificate"].as_str() {
        Some(cert) => json!({ "x509_svid": cert }),
        None => json!({ "jwt_svid": c["token"], "audience": common::JWT_AUDIENCE }),
    };
    let v = b.verify(&presented).await;
    assert!(v["valid"] == true || v["reason"] == "revoked", "{v}");
    v["valid"] == true
}

/// Asserts every task token of `who` gets `status` and every lease is in
/// `state` (and its credential valid iff the lease is active).
async fn assert_agent(b: &TestBroker, who: &Busy, status: u16, state: &str) {
    for s in &who.tasks {
        let r = b.get("/v1/session", Some(&s.token)).await;
        assert_eq!(r.status.as_u16(), status, "{}: {}", who.agent.id, r.text);
    }
    for (id, cred) in &who.leases {
        assert_eq!(
            b.lease_state(id).await,
            state,
            "lease {id} of {}",
            who.agent.id
        );
        assert_eq!(
            still_valid(b, cred).await,
            state == "active",
            "credential of {id}"
        );
    }
}

#[tokio::test]
async fn revocation_by_agent_then_by_team() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let red1 = busy(&b, "red-one", "red", 2).await;
    let red2 = busy(&b, "red-two", "red", 1).await;
    let blue = busy(&b, "blue-one", "blue", 1).await;

    // By agent.
    let secops = Some(b.ops.secops.as_str());
    let body = json!({ "agent": red1.agent.id, "reason": "key leaked in a log" });
    let rv = b.post("/v1/revocations", secops, &body).await.expect(200);
    assert_eq!(rv["selector"], json!({ "agent": red1.agent.id }));
    assert_eq!(rv["tasks_ended"], 2);
    assert_eq!(
        (rv["found"].as_u64(), rv["revoked"].as_u64()),
        (Some(4), Some(4)),
        "{rv}"
    );
    assert_eq!(
        (rv["expiring"].as_u64(), rv["pending"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(rv["agents_suspended"], 0);
    assert_agent(&b, &red1, 401, "revoked").await;
    assert_agent(&b, &red2, 200, "active").await;
    assert_agent(&b, &blue, 200, "active").await;
    let id = rv["revocation_id"].as_str().unwrap();
    let status = b.admin_get(&format!("/v1/revocations/{id}")).await;
    assert_eq!(
        (status["found"].as_u64(), status["revoked"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(status["tasks_ended"], 2);
    let ev = b.audit("action=revocation.emergency").await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["actor"], "operator:test-secops");
    assert_eq!(ev[0]["reason"], "key leaked in a log");
    // Not suspended: red1 may open a new task (no leases in it).
    let fresh = b.token(&red1.agent).await;

    // By team, suspending its agents.
    let body = json!({ "team": "red", "reason": "team compromised", "suspend": true });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.admin), &body)
        .await
        .expect(200);
    assert_eq!(
        rv["tasks_ended"], 2,
        "red2's task and red1's fresh one: {rv}"
    );
    assert_eq!(
        (rv["found"].as_u64(), rv["revoked"].as_u64()),
        (Some(2), Some(2)),
        "{rv}"
    );
    assert_eq!(rv["pending"], 0);
    assert_eq!(rv["agents_suspended"], 2);
    assert_agent(&b, &red2, 401, "revoked").await;
    assert_agent(&b, &red1, 401, "revoked").await;
    assert_eq!(b.get("/v1/session", Some(&fresh.token)).await.status, 401);
    assert_agent(&b, &blue, 200, "active").await;
    for a in [&red1.agent, &red2.agent] {
        assert_eq!(
            b.admin_get(&format!("/v1/agents/{}", a.id)).await["status"],
            "suspended"
        );
        let r = b.token_with_assertion(&a.id, &a.assertion()).await;
        assert_eq!(
            (r.status.as_u16(), r.error().as_str()),
            (401, "invalid_client")
        );
    }
    assert_eq!(
        b.admin_get(&format!("/v1/agents/{}", blue.agent.id)).await["status"],
        "active"
    );
    // The untouched team keeps working.
    b.x509(&blue.tasks[0].token, Some(60)).await;
}

#[tokio::test]
async fn revocation_requests_are_checked() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let who = busy(&b, "checked", "green", 1).await;
    let secops = Some(b.ops.secops.as_str());
    let id = who.agent.id.as_str();
    for (body, status) in [
        (json!({ "agent": id }), 400),
        (json!({ "agent": id, "reason": "   " }), 400),
        (json!({ "reason": "no selector" }), 400),
        (
            json!({ "agent": id, "team": "green", "reason": "two selectors" }),
            400,
        ),
        (json!({ "all": true, "reason": "x", "suspend": true }), 400),
        (json!({ "agent": "no-such-agent", "reason": "x" }), 404),
        (
            json!({ "provider": "no-such-provider", "reason": "x" }),
            404,
        ),
        (json!({ "agent": id, "reason": "x", "extra": 1 }), 400),
    ] {
        let r = b.post("/v1/revocations", secops, &body).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.text);
    }
    // Nothing was revoked by the refused requests.
    assert_agent(&b, &who, 200, "active").await;
    assert!(b.audit("action=revocation.emergency").await.is_empty());

    // By provider: every live lease of the CA, and the tasks holding them.
    let rv = b
        .post(
            "/v1/revocations",
            secops,
            &json!({ "provider": "ca", "reason": "ca rotation" }),
        )
        .await
        .expect(200);
    assert_eq!(
        (rv["found"].as_u64(), rv["revoked"].as_u64()),
        (Some(2), Some(2)),
        "{rv}"
    );
    assert_eq!(rv["tasks_ended"], 1);
    assert_agent(&b, &who, 401, "revoked").await;
}

#[tokio::test]
async fn a_kill_switch_by_provider_revokes_every_lease_of_the_tasks_it_ends() {
    // Two CAs: a task holding a lease of each, hit by provider `ca2` alone.
    let mut setup = Setup::permissive();
    setup.extra_config = r#"
[providers.ca2]
kind = "local-ca"
trust_domain = "keygate.test"
key_file = "ca2/ca-key.pem"
cert_file = "ca2/ca-cert.pem"
jwt_key_file = "ca2/jwt-svid-key.pem"
revocation_file = "ca2/revocations.jsonl"
"#
    .into();
    setup.scopes = Some(format!(
        "{}\n[[scopes]]\nname = \"x509-b\"\nprovider = \"ca2\"\nmax_ttl_secs = 600\nparams = {{ kind = \"x509_svid\" }}\n",
        common::DEFAULT_SCOPES
    ));
    setup.policies.push((
        "ca2.cedar".into(),
        r#"permit (principal, action == Keygate::Action::"request_credential", resource == Keygate::Scope::"x509-b");"#.into(),
    ));
    let b = TestBroker::start_with(setup).await;
    let agent = TestAgent::new("two-cas", "ES256");
    b.register(&agent, "violet").await;
    let s = b.token(&agent).await;
    let a = b.x509(&s.token, Some(600)).await;
    let other = b
        .credential(&s.token, "x509-b", Some(600), None)
        .await
        .expect(201);
    let rv = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "provider": "ca2", "reason": "ca2 key compromised" }),
        )
        .await
        .expect(200);
    assert_eq!(rv["tasks_ended"], 1, "{rv}");
    assert_eq!(
        (
            rv["found"].as_u64(),
            rv["revoked"].as_u64(),
            rv["pending"].as_u64()
        ),
        (Some(2), Some(2), Some(0)),
        "the ended task's `ca` lease is revoked too: {rv}"
    );
    for l in [&a, &other] {
        assert_eq!(
            b.lease_state(l["lease_id"].as_str().unwrap()).await,
            "revoked"
        );
    }
    assert!(!still_valid(&b, &a).await);
    assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 401);
}

/// `{"all": true}` ends every open task and revokes every lease of every
/// team at once; the agents stay active (no `suspend` with `all`), so each
/// can open a new task after.
#[tokio::test]
async fn the_kill_switch_for_all_ends_every_task_of_every_team() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let platform = busy(&b, "all-a", "platform", 2).await;
    let finance = busy(&b, "all-b", "finance", 1).await;
    let rv = b
        .post(
            "/v1/revocations",
            Some(&b.ops.secops),
            &json!({ "all": true, "reason": "credential store breach" }),
        )
        .await
        .expect(200);
    assert_eq!(rv["selector"], "all", "{rv}");
    assert_eq!(rv["tasks_ended"], 3, "{rv}");
    assert_eq!(rv["agents_suspended"], 0, "{rv}");
    for who in [&platform, &finance] {
        assert_agent(&b, who, 401, "revoked").await;
        b.token(&who.agent).await;
    }
    let audited = b.audit("action=revocation.emergency").await;
    assert_eq!(
        audited[0]["reason"], "credential store breach",
        "{audited:?}"
    );
}

/// Suspending an agent revokes what it holds and ends its tasks:
/// introspection (the `introspector` role, as a resource server calls it)
/// says `active: false` for its old token; a resumed agent's old token stays
/// dead, a new one works; decommissioning does the same for good. Roles
/// without introspection are refused.
#[tokio::test]
async fn suspend_and_decommission_revoke_and_introspection_says_inactive() {
    let rs_token = format!("kgop-rs-{}", uuid::Uuid::new_v4().simple());
    let setup = Setup {
        extra_config: format!(
            "[[operators]]\nname = \"orders-api\"\nroles = [\"introspector\"]\ntoken_sha256 = \"{}\"\n",
            common::config::sha256_hex(&rs_token)
        ),
        ..Setup::default()
    };
    let b = TestBroker::start_with(setup).await;
    let introspect = |bearer: String, token: String| {
        let b = &b;
        async move {
            let resp = b
                .http
                .post(b.url("/oauth/introspect"))
                .bearer_auth(bearer)
                .form(&[("token", token)])
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let who = busy(&b, "susp", "platform", 1).await;
    let token = who.tasks[0].token.clone();
    let (status, v) = introspect(rs_token.clone(), token.clone()).await;
    assert_eq!((status, &v["active"]), (200, &json!(true)), "{v}");
    assert_eq!(v["sub"], who.agent.id.as_str(), "{v}");
    // An auditor may read the audit log, not introspect tokens.
    assert_eq!(
        introspect(b.ops.auditor.clone(), token.clone()).await.0,
        403
    );

    let path = |action: &str| format!("/v1/agents/{}/{action}", who.agent.id);
    b.admin_post(&path("suspend"), &json!({ "reason": "incident" }))
        .await
        .expect(200);
    assert_agent(&b, &who, 401, "revoked").await;
    let (_, v) = introspect(rs_token.clone(), token.clone()).await;
    assert_eq!(v, json!({ "active": false }));
    let refused = b
        .token_with_assertion(&who.agent.id, &who.agent.assertion())
        .await;
    assert_eq!(refused.status, 401, "{}", refused.text);

    b.admin_post(&path("resume"), &json!({ "reason": "cleared" }))
        .await
        .expect(200);
    assert_eq!(
        introspect(rs_token.clone(), token).await.1,
        json!({ "active": false })
    );
    let fresh = b.token(&who.agent).await;
    let cred = b.x509(&fresh.token, Some(600)).await;
    assert_eq!(
        introspect(rs_token.clone(), fresh.token.clone()).await.1["active"],
        true
    );

    b.admin_post(&path("decommission"), &json!({ "reason": "retired" }))
        .await
        .expect(200);
    assert_eq!(
        b.lease_state(cred["lease_id"].as_str().unwrap()).await,
        "revoked"
    );
    assert!(!still_valid(&b, &cred).await);
    assert_eq!(
        introspect(rs_token, fresh.token).await.1,
        json!({ "active": false })
    );
    let refused = b
        .token_with_assertion(&who.agent.id, &who.agent.assertion())
        .await;
    assert_eq!(refused.status, 401, "{}", refused.text);
}

/// The kill switch with `suspend`, and a suspension, while the agent opens
/// tasks and mints credentials as fast as it can: each request either
/// lands first and is ended with the rest, or is refused. After the agent
/// is resumed no task token from before works (a task opened after the
/// suspension, from an agent read before it, would come back to life) and
/// every credential minted is revoked. Several rounds, the suspension
/// falling at different points of the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_credentials_racing_a_suspension_do_not_outlive_it() {
    use std::time::Duration;
    // As many task opens as the race needs (the per-client limit's burst
    // is 60).
    let b = TestBroker::start_with(Setup {
        extra_config: "[limits]\nper_client_per_minute = 0\n".into(),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("racer", "ES256");
    b.register(&agent, "red").await;
    let (mut opened, mut refused_opens) = (Vec::new(), 0);
    let mut minted: Vec<(String, Value)> = Vec::new();
    for round in 0..10u64 {
        let s = b.token(&agent).await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..24 {
            let (http, url) = (b.http.clone(), b.url("/oauth/token"));
            let form = [
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", agent.id.clone()),
                ("client_assertion_type", common::JWT_BEARER.to_owned()),
                ("client_assertion", agent.assertion()),
                ("task", format!("race {round}")),
            ];
            set.spawn(async move {
                let r = http.post(url).form(&form).send().await.unwrap();
                (true, r.status().as_u16(), r.json::<Value>().await.unwrap())
            });
            let (http, url) = (b.http.clone(), b.url("/v1/credentials"));
            let body = if i % 2 == 0 {
                json!({ "scope": "x509-svid", "ttl": 600 })
            } else {
                json!({ "scope": "jwt-svid", "ttl": 600, "params": { "audience": common::JWT_AUDIENCE } })
            };
            let token = s.token.clone();
            set.spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (false, r.status().as_u16(), r.json::<Value>().await.unwrap())
            });
        }
        tokio::time::sleep(Duration::from_millis(3 * round)).await;
        let stopped = if round % 2 == 0 {
            let body = json!({ "agent": agent.id, "reason": "race", "suspend": true });
            b.post("/v1/revocations", Some(&b.ops.secops), &body).await
        } else {
            let path = format!("/v1/agents/{}/suspend", agent.id);
            b.admin_post(&path, &json!({ "reason": "race" })).await
        };
        stopped.expect(200);
        for (open, status, v) in set.join_all().await {
            match (open, status) {
                (true, 200) => opened.push(v["access_token"].as_str().unwrap().to_owned()),
                (false, 201) => minted.push((v["lease_id"].as_str().unwrap().to_owned(), v)),
                (true, 401) => refused_opens += 1,
                // The task found ended at the lease write.
                (false, 401 | 403 | 409) => {}
                _ => panic!("round {round}: {status} {v}"),
            }
        }
        let path = format!("/v1/agents/{}/resume", agent.id);
        b.admin_post(&path, &json!({ "reason": "cleared" }))
            .await
            .expect(200);
    }
    assert_eq!(opened.len() + refused_opens, 10 * 24, "every open answered");
    assert!(
        !minted.is_empty(),
        "the suspension never fell inside the race: nothing minted before it"
    );
    for token in &opened {
        let r = b.get("/v1/session", Some(token)).await;
        assert_eq!(
            r.status, 401,
            "a task from before the suspension lives: {}",
            r.text
        );
    }
    for (id, cred) in &minted {
        assert_eq!(b.lease_state(id).await, "revoked", "lease {id}");
        assert!(!still_valid(&b, cred).await, "credential of {id}");
    }
    // The resumed agent works.
    let s = b.token(&agent).await;
    b.x509(&s.token, Some(60)).await;
}
