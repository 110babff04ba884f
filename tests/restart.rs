//! Crashes (kill -9) and restarts on the same state, orphaned write-ahead
//! leases, and tasks that run out of time on their own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{TestAgent, TestBroker, eventually, serial_for_lease, unix_now};
use serde_json::{Value, json};

async fn doc(b: &TestBroker, name: &str) -> String {
    b.get(&format!("/v1/providers/ca/{name}"), None).await.text
}

#[tokio::test]
async fn a_crash_mid_task_loses_nothing() {
    let mut b = TestBroker::start().await;
    let agent = TestAgent::new("crash", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let x509 = b.x509(&s.token, Some(900)).await;
    let jwt = b.jwt_svid(&s.token, Some(600)).await;
    let released = b.x509(&s.token, Some(900)).await;
    let released_id = released["lease_id"].as_str().unwrap();
    b.call(
        reqwest::Method::DELETE,
        &format!("/v1/credentials/{released_id}"),
        Some(&s.token),
        None,
    )
    .await
    .expect(200);
    let session_jwks = b.get("/.well-known/jwks.json", None).await.expect(200);
    let (bundle, svid_jwks) = (doc(&b, "bundle.pem").await, doc(&b, "jwks.json").await);
    let old_addr = b.addr;

    b.restart().await;
    assert_ne!(b.addr, old_addr, "a new process on a new port");
    assert_eq!(
        b.log().matches("keygate ready").count(),
        2,
        "two boots in one log"
    );

    // Same keys: the old session token, certificate and JWT-SVID still verify.
    assert_eq!(
        b.get("/.well-known/jwks.json", None).await.expect(200),
        session_jwks
    );
    assert_eq!(doc(&b, "bundle.pem").await, bundle);
    assert_eq!(doc(&b, "jwks.json").await, svid_jwks);
    let who = b.get("/v1/session", Some(&s.token)).await.expect(200);
    assert_eq!(who["task"]["id"], s.task_id.as_str());
    assert_eq!(who["task"]["state"], "open");
    let cert = json!({ "x509_svid": x509["credential"]["certificate"] });
    let token = json!({ "jwt_svid": jwt["credential"]["token"], "audience": common::JWT_AUDIENCE });
    assert_eq!(b.verify(&cert).await["valid"], true);
    assert_eq!(b.verify(&token).await["valid"], true);
    for l in [&x509, &jwt] {
        assert_eq!(
            b.lease_state(l["lease_id"].as_str().unwrap()).await,
            "active"
        );
    }
    // A revocation confirmed before the crash is still in force.
    assert_eq!(b.lease_state(released_id).await, "revoked");
    let released_cert = json!({ "x509_svid": released["credential"]["certificate"] });
    assert_eq!(b.verify(&released_cert).await["reason"], "revoked");
    // The task goes on: new credentials, then completion.
    b.x509(&s.token, Some(60)).await;
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(
        (
            done["leases"]["found"].as_u64(),
            done["leases"]["revoked"].as_u64()
        ),
        (Some(3), Some(3))
    );
    assert_eq!(b.verify(&cert).await["reason"], "revoked");
    assert_eq!(b.verify(&token).await["reason"], "revoked");
    assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 401);

    // And once more: the ended task stays ended across a crash.
    b.restart().await;
    assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 401);
    assert_eq!(b.verify(&cert).await["reason"], "revoked");
}

#[tokio::test]
async fn an_orphaned_pending_lease_is_revoked_after_restart() {
    let mut b = TestBroker::start().await;
    let agent = TestAgent::new("orphan", "ES256");
    b.register(&agent, "platform").await;
    b.kill().await;

    // As if the broker died between writing the lease and hearing back from
    // the provider: a pending lease without a handle, from a past boot.
    let now = unix_now();
    let (task_id, lease_id) = (format!("tk_orphan{now}"), format!("ls_orphan{now}"));
    let (before, after) = ((now - 600).to_string(), (now + 600).to_string());
    b.store_exec(
        "INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at) \
         VALUES (?, ?, 'crashed mid-issue', 'open', ?, ?)",
        &[&task_id, &agent.id, &before, &after],
    )
    .await
    .unwrap();
    b.store_exec(
        "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, expires_at) \
         VALUES (?, ?, ?, 'x509-svid', 'ca', 'pending', ?, ?)",
        &[&lease_id, &agent.id, &task_id, &before, &after],
    )
    .await
    .unwrap();

    b.restart().await;
    eventually("the orphan is revoked", || async {
        (b.lease_state(&lease_id).await == "revoked").then_some(())
    })
    .await;
    let serial = serial_for_lease(&lease_id);
    let revoked = b
        .get("/v1/providers/ca/revoked.json", None)
        .await
        .expect(200);
    let has = |list: &str, item: &str| revoked[list].as_array().unwrap().iter().any(|v| v == item);
    assert!(
        has("serials", &serial),
        "derived serial {serial} in {revoked}"
    );
    assert!(has("jtis", &lease_id), "lease id as jti in {revoked}");
    let orphaned = b.audit("action=lease.orphaned").await;
    assert_eq!(orphaned.len(), 1);
    assert_eq!(orphaned[0]["lease"], lease_id.as_str());
    let lease = b.leases(&format!("task={task_id}")).await;
    assert_eq!(lease[0]["end_reason"], "orphaned: issue did not complete");
}

#[tokio::test]
async fn a_task_ends_when_its_ttl_runs_out() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("short", "EdDSA");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(2)).await;
    let x509 = b.x509(&s.token, None).await;
    let jwt = b.jwt_svid(&s.token, None).await;
    let ids: Vec<String> = [&x509, &jwt]
        .iter()
        .map(|c| c["lease_id"].as_str().unwrap().to_owned())
        .collect();
    for c in [&x509, &jwt] {
        // A lease never outlives its task.
        let lease_end = common::rfc3339(&c["expires_at"]).unix_timestamp();
        assert!(lease_end <= unix_now() + 2, "{c}");
    }

    eventually("the session token dies with its task", || async {
        (b.get("/v1/session", Some(&s.token)).await.status == 401).then_some(())
    })
    .await;
    let states: Vec<String> = eventually("the reaper ends the leases", || async {
        let mut states = Vec::new();
        for id in &ids {
            states.push(b.lease_state(id).await);
        }
        states
            .iter()
            .all(|s| s == "revoked" || s == "expired")
            .then_some(states)
    })
    .await;
    assert_eq!(states.len(), 2);
    let expired = eventually("the task expiry is audited", || async {
        let evs: Vec<Value> = b.audit("action=task.expired").await;
        (!evs.is_empty()).then_some(evs)
    })
    .await;
    assert_eq!(expired[0]["task"], s.task_id.as_str());
    assert_eq!(
        b.credential(&s.token, "x509-svid", None, None).await.status,
        401
    );
    assert_eq!(b.complete(&s.token).await.status, 401);
}

#[tokio::test]
async fn leases_in_flight_at_a_crash_are_resolved_at_once_after_a_fast_restart() {
    let mut b = TestBroker::start().await;
    let agent = TestAgent::new("storm", "ES256");
    b.register(&agent, "platform").await;
    for round in 0..3 {
        // An issuing storm, killed mid-way.
        let s = b.token_ttl(&agent, Some(3600)).await;
        let mut storm = Vec::new();
        for _ in 0..16 {
            let (http, url, token) = (b.http.clone(), b.url("/v1/credentials"), s.token.clone());
            storm.push(tokio::spawn(async move {
                let _ = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&serde_json::json!({ "scope": "x509-svid", "ttl": 600 }))
                    .send()
                    .await;
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(15 * round)).await;
        b.kill().await;
        for h in storm {
            let _ = h.await;
        }
        // And one written in the very second the next process starts, as a
        // crash can leave it: whole-second clocks cannot tell it apart.
        let lease_id = format!("ls_samesecond{round}{}", unix_now());
        b.store_exec(
            "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, expires_at, boot_id) \
             VALUES (?, ?, ?, 'x509-svid', 'ca', 'pending', ?, ?, 'boot_crashed')",
            &[
                &lease_id,
                &agent.id,
                &s.task_id,
                &(unix_now() + 1).to_string(),
                &(unix_now() + 600).to_string(),
            ],
        )
        .await
        .unwrap();
        b.restart().await;
        // Well inside the age rule (issue timeout 5 s + 5 s): nothing of the
        // crashed process may still be pending, nor sit unrevoked.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
        loop {
            let stuck: Vec<_> = b
                .leases(&format!("agent={}", agent.id))
                .await
                .into_iter()
                .filter(|l| l["state"] == "pending" || l["state"] == "revoking")
                .collect();
            if stuck.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: still unresolved after restart: {stuck:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(b.lease_state(&lease_id).await, "revoked");
    }
}

/// Credentials and task opens racing (the SQLite engine writes them in
/// batches whose trip ends with the group's commit), killed mid-way:
/// whatever a client was given is there after the restart — each lease
/// returned is active, each task opened is open — and the audit chain is
/// unbroken.
#[tokio::test]
async fn a_crash_amid_racing_writes_keeps_everything_it_returned() {
    use std::sync::{Arc, Mutex};
    let mut b = TestBroker::start().await;
    let mut agents = Vec::new();
    let mut sessions = Vec::new();
    for i in 0..4 {
        let agent = TestAgent::new(&format!("race{i}"), "ES256");
        b.register(&agent, "platform").await;
        sessions.push(b.token_ttl(&agent, Some(3600)).await);
        agents.push(Arc::new(agent));
    }
    let leases = Arc::new(Mutex::new(Vec::<String>::new()));
    let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut racers = Vec::new();
    for i in 0..24 {
        let (http, url) = (b.http.clone(), b.url("/v1/credentials"));
        let token = sessions[i % sessions.len()].token.clone();
        let leases = Arc::clone(&leases);
        racers.push(tokio::spawn(async move {
            let body = if i % 2 == 0 {
                json!({ "scope": "x509-svid", "ttl": 600 })
            } else {
                json!({ "scope": "jwt-svid", "ttl": 600, "params": { "audience": common::JWT_AUDIENCE } })
            };
            // Until the server is gone (a refusal, such as a rate limit, is
            // not an answer to keep: try again).
            while let Ok(r) = http.post(&url).bearer_auth(&token).json(&body).send().await {
                if r.status() != 201 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                let Ok(v) = r.json::<Value>().await else { break };
                leases.lock().unwrap().push(v["lease_id"].as_str().unwrap().to_owned());
            }
        }));
    }
    for agent in &agents {
        let (http, url) = (b.http.clone(), b.url("/oauth/token"));
        let agent = Arc::clone(agent);
        let tokens = Arc::clone(&tokens);
        racers.push(tokio::spawn(async move {
            loop {
                let assertion = agent.assertion();
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", agent.id.as_str()),
                    ("client_assertion_type", common::JWT_BEARER),
                    ("client_assertion", assertion.as_str()),
                    ("task", "racing"),
                ];
                let Ok(r) = http.post(&url).form(&form).send().await else {
                    break;
                };
                if r.status() != 200 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                let Ok(v) = r.json::<Value>().await else {
                    break;
                };
                tokens
                    .lock()
                    .unwrap()
                    .push(v["access_token"].as_str().unwrap().to_owned());
            }
        }));
    }
    eventually("200 credentials returned", || {
        let n = leases.lock().unwrap().len();
        async move { (n >= 200).then_some(()) }
    })
    .await;
    b.kill().await;
    for r in racers {
        r.await.unwrap();
    }
    b.start_again().await;
    let returned = leases.lock().unwrap().clone();
    let states: std::collections::HashMap<String, String> = b
        .leases("limit=10000")
        .await
        .into_iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for id in &returned {
        assert_eq!(
            states.get(id).map(String::as_str),
            Some("active"),
            "lease {id} was returned"
        );
    }
    let opened = tokens.lock().unwrap().clone();
    assert!(!opened.is_empty(), "no task was opened while racing");
    for t in &opened {
        assert_eq!(
            b.get("/v1/session", Some(t)).await.status,
            200,
            "a task opened before the crash"
        );
    }
    let mut verify = vec!["audit".to_owned(), "verify".to_owned()];
    verify.extend(b.store_args());
    let verify: Vec<&str> = verify.iter().map(String::as_str).collect();
    let out = b.cli(&verify, None).await;
    assert!(
        out.status.success(),
        "the audit chain after the crash: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker whose PostgreSQL goes away answers `/readyz` 503 and requests
/// with a clear error, and recovers by itself when the database is back:
/// nothing it acknowledged is lost. (Its own cluster, to stop under it;
/// SQLite's store is a file the broker holds open, so only this engine can
/// show it.)
#[tokio::test]
async fn readyz_says_not_ready_while_the_database_is_gone_and_recovers() {
    use common::peers::Postgres;
    let pg = Postgres::start().await;
    let url = pg.create_database("keygate");
    let mut b = TestBroker::prepare(common::Setup::default());
    std::fs::write(b.dir.join("db-password"), &pg.password).unwrap();
    b.set_store_table(&format!(
        "url = \"{url}\"\npassword = \"file:{}\"",
        b.dir.join("db-password").display()
    ));
    b.start_again().await;
    let agent = TestAgent::new("readyz", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let kept = b.x509(&s.token, Some(600)).await["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(b.get("/readyz", None).await.status, 200);

    pg.halt();
    let down = eventually("/readyz to say not ready", || async {
        let r = b.get("/readyz", None).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(down.json()["error"], "not_ready", "{}", down.text);
    // Not "your token is invalid" (401): the token is fine, the store is
    // not there to say so; the agent keeps it and retries.
    let r = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"], "temporarily_unavailable", "{}", r.text);
    assert!(!r.text.contains(&pg.password), "{}", r.text);

    pg.resume();
    eventually("/readyz to say ready again", || async {
        (b.get("/readyz", None).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        b.lease_state(&kept).await,
        "active",
        "the lease is still there"
    );
    b.x509(&s.token, Some(60)).await;
    assert!(
        !b.log().contains(&pg.password),
        "the password reached the log"
    );
}
