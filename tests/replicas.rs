//! Several replicas on one PostgreSQL database (whatever
//! `KEYGATE_TEST_STORE` says: replicas exist only there): any replica serves
//! any request, a kill switch on one is seen on all at once, background
//! work is done once, and replicas killed again and again under load lose
//! nothing any of them acknowledged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, Row};

use crate::common;
use common::{JWT_BEARER, Setup, TestAgent, TestBroker, eventually};

/// Three replicas of one broker on a fresh database of the binary's
/// cluster, and a direct connection string to that database.
async fn replicas(setup: Setup) -> ([TestBroker; 3], String) {
    let first = TestBroker::prepare(setup);
    let pg = common::store::cluster();
    let name = format!("kg_replicas_{}", uuid::Uuid::new_v4().simple());
    let url = pg.create_database(&name);
    std::fs::write(first.dir.join("replica-db-password"), &pg.password).unwrap();
    first.set_store_table(&format!(
        "url = \"{url}\"\npassword = \"file:{}\"",
        first.dir.join("replica-db-password").display()
    ));
    let direct = format!(
        "postgres://postgres:{}@127.0.0.1:{}/{name}",
        pg.password, pg.port
    );
    let (mut b, mut c) = (first.replica(), first.replica());
    let mut a = first;
    // All at once, on files none of them has created yet: they race to
    // create the schema, the CA's and the session keys, and must end up
    // sharing one of each.
    tokio::join!(a.start_again(), b.start_again(), c.start_again());
    ([a, b, c], direct)
}

async fn sql_i64(url: &str, sql: &'static str) -> i64 {
    let mut c = PgConnection::connect(url).await.unwrap();
    sqlx::query(sql)
        .fetch_one(&mut c)
        .await
        .unwrap()
        .try_get::<Option<i64>, _>(0)
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_switch_on_one_replica_is_seen_on_every_replica_at_once() {
    let (r, db) = replicas(Setup::default()).await;
    let agent = TestAgent::new("spread", "ES256");
    r[0].register(&agent, "platform").await;
    // Any replica serves any session: each task is opened on one replica
    // and its credential issued by the next.
    let mut sessions = Vec::new();
    let mut certs = Vec::new();
    for i in 0..3 {
        let s = r[i].token_ttl(&agent, Some(3600)).await;
        for _ in 0..4 {
            certs.push(r[(i + 1) % 3].x509(&s.token, Some(600)).await);
        }
        sessions.push(s);
    }
    for c in &certs {
        let v = r[2]
            .verify(&json!({ "x509_svid": c["credential"]["certificate"] }))
            .await;
        assert_eq!(v["valid"], true, "{v}");
    }

    let body = json!({ "agent": agent.id, "reason": "incident on replica 0" });
    r[0].post("/v1/revocations", Some(&r[0].ops.secops), &body)
        .await
        .expect(200);
    // The instant the call returned, every replica refuses every session.
    for b in &r {
        for s in &sessions {
            let resp = b.credential(&s.token, "x509-svid", Some(60), None).await;
            assert_eq!(resp.status, 401, "{}", resp.text);
        }
    }
    // The three replicas work the queue together; each lease is revoked
    // once, by one of them, and the CA never asked twice.
    eventually("every lease confirmed revoked", || async {
        let live = sql_i64(
            &db,
            "SELECT count(*) FROM leases WHERE state IN ('pending', 'active', 'revoking')",
        )
        .await;
        (live == 0).then_some(())
    })
    .await;
    let revoked = r[1]
        .audit(&format!("agent={}&action=lease.revoked", agent.id))
        .await;
    let ok: Vec<&Value> = revoked
        .iter()
        .filter(|e| e["outcome"] == "success")
        .collect();
    assert_eq!(ok.len(), certs.len(), "one confirmation per lease: {ok:?}");
    assert_eq!(
        sql_i64(&db, "SELECT sum(repeats)::bigint FROM ca_revocations").await,
        0,
        "a lease was revoked twice at the CA"
    );
    // Every replica refuses the certificates and serves the same list.
    let mut lists = Vec::new();
    for b in &r {
        for c in &certs {
            let v = b
                .verify(&json!({ "x509_svid": c["credential"]["certificate"] }))
                .await;
            assert_eq!(v["reason"], "revoked", "{v}");
        }
        lists.push(
            b.get("/v1/providers/ca/revoked.json", None)
                .await
                .expect(200),
        );
    }
    assert!(lists.windows(2).all(|w| w[0] == w[1]), "{lists:?}");
    for c in &certs {
        let serial = c["credential"]["serial"].as_str().unwrap().to_lowercase();
        assert!(
            lists[0]["serials"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s.as_str() == Some(serial.as_str())),
            "{serial} not listed: {}",
            lists[0]
        );
    }
    let crls: Vec<_> = {
        let mut v = Vec::new();
        for b in &r {
            v.push(b.get("/v1/providers/ca/crl.pem", None).await);
        }
        v
    };
    assert!(crls.iter().all(|c| c.status == 200), "crl fetch failed");
}

/// A session every replica has served (and remembers as verified) dies on
/// all of them when another suspends its agent, and stays dead after a
/// third resumes it; a token revoked (RFC 7009) at one is refused at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_every_replica_remembers_ends_everywhere_and_a_resume_does_not_revive_it() {
    let (r, _db) = replicas(Setup::default()).await;
    let agent = TestAgent::new("remembered", "ES256");
    r[0].register(&agent, "platform").await;
    let refused_everywhere = |token: String, when: &'static str| {
        let r = &r;
        async move {
            for (i, b) in r.iter().enumerate() {
                let resp = b.credential(&token, "x509-svid", Some(60), None).await;
                assert_eq!(resp.status, 401, "replica {i} {when}: {}", resp.text);
            }
        }
    };
    let s = r[0].token_ttl(&agent, Some(3600)).await;
    for b in &r {
        b.x509(&s.token, Some(60)).await;
    }
    let path = |what: &str| format!("/v1/agents/{}/{what}", agent.id);
    r[1].admin_post(&path("suspend"), &json!({ "reason": "on replica 1" }))
        .await
        .expect(200);
    refused_everywhere(s.token.clone(), "after the suspension").await;
    r[2].admin_post(&path("resume"), &json!({ "reason": "on replica 2" }))
        .await
        .expect(200);
    refused_everywhere(s.token.clone(), "after the resume").await;

    // A new session works everywhere until revoked at one replica.
    let s2 = r[1].token_ttl(&agent, Some(3600)).await;
    for b in &r {
        b.x509(&s2.token, Some(60)).await;
    }
    let revoked = r[0]
        .http
        .post(r[0].url("/oauth/revoke"))
        .bearer_auth(&s2.token)
        .form(&[("token", s2.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    refused_everywhere(s2.token.clone(), "after RFC 7009").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_one_sqlite_file_is_refused() {
    let mut a = TestBroker::prepare(Setup::default());
    a.set_store_table(&format!("url = \"sqlite://{}/own.db\"", a.dir.display()));
    a.start_again().await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        common::serve_command(&a.dir.join("keygate.toml"), &a.dir).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("another keygate process is serving from"),
        "{text}"
    );
    // The first goes on serving; once it is gone, a new one starts.
    assert_eq!(a.get("/readyz", None).await.status, 200);
    a.restart().await;
    assert_eq!(a.get("/readyz", None).await.status, 200);
}

/// What the load left behind: every lease id a replica returned.
#[derive(Default)]
struct Load {
    returned: Mutex<Vec<String>>,
    refused: AtomicUsize,
    stop: AtomicBool,
}

/// One agent's loop: open a task on one replica, take a credential from
/// another, complete the task on a third (or leave it to expire), until
/// told to stop. Replicas being killed answer nothing or 5xx: counted.
async fn agent_loop(
    agent: TestAgent,
    addrs: Arc<RwLock<Vec<SocketAddr>>>,
    load: Arc<Load>,
    seed: usize,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = |i: usize, path: &str| {
        let a = addrs.read().unwrap();
        format!("http://{}{path}", a[i % a.len()])
    };
    let mut n = seed;
    while !load.stop.load(Ordering::SeqCst) {
        n += 1;
        let assertion = agent.assertion();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
            ("task", "replica load"),
            ("ttl", "8"),
        ];
        let Ok(resp) = http.post(url(n, "/oauth/token")).form(&form).send().await else {
            load.refused.fetch_add(1, Ordering::SeqCst);
            continue;
        };
        if resp.status() != 200 {
            load.refused.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let token: Value = resp.json().await.unwrap();
        let token = token["access_token"].as_str().unwrap().to_owned();
        for k in 1..=2 {
            let Ok(resp) = http
                .post(url(n + k, "/v1/credentials"))
                .bearer_auth(&token)
                .json(&json!({ "scope": "x509-svid", "ttl": 60 }))
                .send()
                .await
            else {
                load.refused.fetch_add(1, Ordering::SeqCst);
                continue;
            };
            if resp.status() == 201 {
                let v: Value = resp.json().await.unwrap();
                let id = v["lease_id"].as_str().unwrap().to_owned();
                load.returned.lock().unwrap().push(id);
            } else {
                load.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Two tasks in three are completed; the third runs out its ttl.
        if !n.is_multiple_of(3) {
            let _ = http
                .post(url(n + 2, "/v1/tasks/complete"))
                .bearer_auth(&token)
                .json(&json!({}))
                .send()
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_killed_again_and_again_under_load_lose_nothing() {
    let (mut r, db) = replicas(Setup::default()).await;
    let addrs = Arc::new(RwLock::new(r.iter().map(|b| b.addr).collect::<Vec<_>>()));
    let load = Arc::new(Load::default());
    let mut agents = Vec::new();
    for i in 0..6 {
        let agent = TestAgent::new(&format!("load{i}"), "ES256");
        r[i % 3].register(&agent, "platform").await;
        agents.push(tokio::spawn(agent_loop(
            agent,
            Arc::clone(&addrs),
            Arc::clone(&load),
            i,
        )));
    }
    // Every 2 s one replica dies with SIGKILL and comes back at once (a
    // new boot, perhaps in the same second).
    let kills = 8;
    for k in 0..kills {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let i = k % 3;
        r[i].kill().await;
        r[i].start_again().await;
        addrs.write().unwrap()[i] = r[i].addr;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop.store(true, Ordering::SeqCst);
    for a in agents {
        a.await.unwrap();
    }
    let returned = load.returned.lock().unwrap().clone();
    assert!(
        returned.len() > 50,
        "too little load to mean anything: {} credentials, {} refusals",
        returned.len(),
        load.refused.load(Ordering::SeqCst)
    );

    // Every task ends (completed or expired) and every lease with it.
    eventually("every task ended and every lease settled", || async {
        let open = sql_i64(&db, "SELECT count(*) FROM tasks WHERE state = 'open'").await;
        let live = sql_i64(
            &db,
            "SELECT count(*) FROM leases WHERE state IN ('pending', 'active', 'revoking')",
        )
        .await;
        (open == 0 && live == 0).then_some(())
    })
    .await;
    let mut c = PgConnection::connect(&db).await.unwrap();
    let mut states = std::collections::BTreeMap::new();
    for id in &returned {
        let row = sqlx::query("SELECT state, ended_at, expires_at FROM leases WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut c)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("lease {id}, returned to an agent, is not in the store"));
        let state: String = row.get("state");
        assert!(
            state == "revoked" || state == "expired",
            "lease {id}, returned to an agent, is {state}"
        );
        states.insert(id.clone(), state);
        // Revoked while the certificate could still be used: the CA lists
        // it (after its expiry there is nothing to list).
        let (ended, expires): (Option<i64>, i64) = (row.get("ended_at"), row.get("expires_at"));
        if ended.is_some_and(|e| e < expires) {
            let serial = common::serial_for_lease(id);
            let listed =
                sqlx::query("SELECT 1 FROM ca_revocations WHERE kind = 'serial' AND key = $1")
                    .bind(&serial)
                    .fetch_optional(&mut c)
                    .await
                    .unwrap();
            assert!(
                listed.is_some(),
                "lease {id}: serial {serial} not revoked at the CA"
            );
        }
    }
    // Each lease's revocation is confirmed once in the audit log, whatever
    // replica confirmed it (a replica killed between the CA's answer and
    // its record leaves the lease to another, which asks the CA again —
    // harmless, counted in `repeats` — and still records it once).
    let events = r[0].audit("action=lease.revoked").await;
    let mut confirmed = std::collections::BTreeMap::<String, usize>::new();
    for e in events.iter().filter(|e| e["outcome"] == "success") {
        *confirmed
            .entry(e["lease"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    for (id, state) in &states {
        let want = usize::from(state == "revoked");
        assert_eq!(
            confirmed.get(id).copied().unwrap_or(0),
            want,
            "lease {id} ({state}): confirmations of its revocation"
        );
    }
    // One chain, written by every replica, verifies.
    let out = r[1]
        .cli(&["audit", "verify"], Some(&r[1].ops.auditor))
        .await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = r[0].log();
    assert!(!log.contains("panicked"), "a replica panicked:\n{log}");
}

async fn policy_hash(b: &TestBroker) -> String {
    b.get("/v1/policy", Some(&b.ops.auditor)).await.expect(200)["hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_reload_on_one_replica_is_every_replicas_within_a_second() {
    let (r, _db) = replicas(Setup::default()).await;
    let agent = TestAgent::new("narrowed", "ES256");
    r[0].register(&agent, "platform").await;
    let s = r[2].token_ttl(&agent, Some(3600)).await;
    let held = r[2].x509(&s.token, Some(600)).await;
    let before = policy_hash(&r[0]).await;
    for b in &r {
        assert_eq!(policy_hash(b).await, before);
    }

    // Only replica 0 is told: the platform team loses X.509-SVIDs.
    let shipped = std::fs::read_to_string(r[0].dir.join("policies/agents.cedar")).unwrap();
    let from = "  resource.provider == \"ca\" &&\n  !resource.sensitive &&";
    assert!(shipped.contains(from), "the shipped policy changed");
    let narrowed = shipped.replacen(
        from,
        "  resource == Keygate::Scope::\"jwt-svid\" &&\n  !resource.sensitive &&",
        1,
    );
    std::fs::write(r[0].dir.join("policies/agents.cedar"), narrowed).unwrap();
    r[0].post("/v1/policy/reload", Some(&r[0].ops.admin), &json!({}))
        .await
        .expect(200);
    let after = policy_hash(&r[0]).await;
    assert_ne!(after, before);
    // The others follow by themselves and refuse what the new set forbids.
    for b in &r[1..] {
        eventually("the replica to follow the new policy set", || async {
            (policy_hash(b).await == after).then_some(())
        })
        .await;
        let resp = b.credential(&s.token, "x509-svid", Some(60), None).await;
        assert_eq!(resp.status, 403, "{}", resp.text);
        b.jwt_svid(&s.token, Some(60)).await;
    }
    // What replica 2 issued under the old set is revoked.
    let id = held["lease_id"].as_str().unwrap();
    eventually("the old set's certificate revoked", || async {
        (r[1].lease_state(id).await == "revoked").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_wait_out_a_postgresql_restart_under_load_and_lose_nothing() {
    // A cluster of its own: this one is stopped under the replicas.
    let pg = common::peers::Postgres::start().await;
    let url = pg.create_database("keygate");
    let mut a = TestBroker::prepare(Setup::default());
    std::fs::write(a.dir.join("db-password"), &pg.password).unwrap();
    a.set_store_table(&format!(
        "url = \"{url}\"\npassword = \"file:{}\"",
        a.dir.join("db-password").display()
    ));
    let mut b = a.replica();
    tokio::join!(a.start_again(), b.start_again());
    let addrs = Arc::new(RwLock::new(vec![a.addr, b.addr]));
    let load = Arc::new(Load::default());
    let mut agents = Vec::new();
    for i in 0..4 {
        let agent = TestAgent::new(&format!("pgload{i}"), "ES256");
        a.register(&agent, "platform").await;
        agents.push(tokio::spawn(agent_loop(
            agent,
            Arc::clone(&addrs),
            Arc::clone(&load),
            i,
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.halt();
    for r in [&a, &b] {
        eventually("the replica to say not ready", || async {
            (r.get("/readyz", None).await.status == 503).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.resume();
    for r in [&a, &b] {
        eventually("the replica to be ready again", || async {
            (r.get("/readyz", None).await.status == 200).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop.store(true, Ordering::SeqCst);
    for t in agents {
        t.await.unwrap();
    }
    let returned = load.returned.lock().unwrap().clone();
    assert!(returned.len() > 10, "too little load: {}", returned.len());
    // Every credential acknowledged before, during or after the outage has
    // its lease, and every lease settles.
    let all = a.leases("limit=10000").await;
    for id in &returned {
        assert!(
            all.iter().any(|l| l["id"] == id.as_str()),
            "lease {id}, returned to an agent, is gone"
        );
    }
    eventually("every lease settled", || async {
        let live = a
            .leases("limit=10000")
            .await
            .into_iter()
            .filter(|l| ["pending", "active", "revoking"].contains(&l["state"].as_str().unwrap()))
            .count();
        (live == 0).then_some(())
    })
    .await;
    let out = a.cli(&["audit", "verify"], Some(&a.ops.auditor)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !a.log().contains(&pg.password),
        "the password reached the log"
    );
}

/// An agent changed through one replica is relearned on every replica
/// (continuous validation): the scope it uses next, through another
/// replica, is learned there, not flagged as new, as on the replica that
/// made the change. An agent nobody changed is still flagged there.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_changed_on_one_replica_is_relearned_on_the_others() {
    let (r, _) = replicas(Setup {
        extra_config: "[validation]\nwarm_up_observations = 3\n\n[[detectors]]\n\
            name = \"new-scope\"\nsignal = \"new_scope\"\nseverity = \"low\"\naction = \"record\"\n"
            .into(),
        ..Setup::permissive()
    })
    .await;
    let audience = Some(json!({ "audience": "https://api.keygate.test" }));
    let incidents = |agent: &TestAgent| {
        let path = format!("/v1/incidents?agent={}", agent.id);
        let r = &r;
        async move { r[1].get(&path, Some(&r[1].ops.secops)).await.expect(200) }
    };
    let mut sessions = Vec::new();
    for name in ["changed", "unchanged"] {
        let agent = TestAgent::new(name, "ES256");
        r[0].register(&agent, "platform").await;
        // Learned through replica 1: a task and two X.509-SVIDs.
        let s = r[1].token_ttl(&agent, Some(3600)).await;
        for _ in 0..2 {
            r[1].credential(&s.token, "x509-svid", Some(60), None)
                .await
                .expect(201);
        }
        sessions.push((agent, s.token));
    }
    let (changed, unchanged) = (&sessions[0], &sessions[1]);
    r[0].call(
        reqwest::Method::PATCH,
        &format!("/v1/agents/{}", changed.0.id),
        Some(&r[0].ops.admin),
        Some(&json!({ "purpose": "now also signs JWTs" })),
    )
    .await
    .expect(200);
    // The others look for such changes every second.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    for (_, token) in [changed, unchanged] {
        r[1].credential(token, "jwt-svid", Some(60), audience.clone())
            .await
            .expect(201);
    }
    assert_eq!(incidents(&changed.0).await, json!([]));
    let flagged = incidents(&unchanged.0).await;
    assert_eq!(flagged[0]["detector"], "new-scope", "{flagged}");
}
