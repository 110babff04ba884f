//! The kill switch at scale: more leases than one pass of the revocation
//! queue, and a mass revocation cut short by a crash, each lease revoked
//! and recorded exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker, eventually};
use serde_json::{Value, json};

/// A kill switch over more leases than one pass of the revocation queue
/// claims (512) or records in one commit (256): every lease is revoked
/// once, with exactly one `lease.revoked` event each, the progress report
/// counts them all, and the audit chain still verifies.
#[tokio::test]
async fn a_kill_switch_over_many_leases_records_each_revocation_once() {
    const LEASES: usize = 600;
    let b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("many", "ES256");
    b.register(&agent, "red").await;
    let (_, ids) = mint_many(&b, &agent, LEASES).await;
    let body = json!({ "agent": agent.id, "reason": "mass test", "wait": 30 });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    assert_eq!(rv["found"].as_u64(), Some(LEASES as u64), "{rv}");
    assert_eq!(rv["revoked"].as_u64(), Some(LEASES as u64), "{rv}");
    assert_eq!(rv["pending"].as_u64(), Some(0), "{rv}");
    each_revoked_once(&b, &agent, &ids, false).await;
}

/// The process killed (-9) the moment the kill switch over 10,000 leases
/// answered, its revocations under way: after a restart no session works,
/// every lease is revoked, each recorded once, and the audit chain is whole.
#[tokio::test]
async fn a_kill_switch_cut_short_by_a_crash_finishes_after_the_restart() {
    const SEEDED: usize = 10_000;
    let mut b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("crashed", "ES256");
    b.register(&agent, "red").await;
    let (tokens, mut ids) = mint_many(&b, &agent, 30).await;
    // Many more live leases of one of its tasks, written while it is down.
    let task = b.token_ttl(&agent, Some(3600)).await;
    b.kill().await;
    ids.extend(seed_leases(&b, &agent, &task.task_id, SEEDED).await);
    b.start_again().await;

    // Answered at once (`wait` 0), not once the revocations are done.
    let body = json!({ "agent": agent.id, "reason": "crash test", "wait": 0 });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    assert_eq!(rv["found"].as_u64(), Some(ids.len() as u64), "{rv}");
    b.kill().await;
    let left = still_revoking(&b, &agent).await;
    assert!(
        left > 0,
        "the crash fell after every revocation: nothing to resume"
    );
    b.start_again().await;
    for t in tokens.iter().chain([&task.token]) {
        let r = b.credential(t, "x509-svid", Some(60), None).await;
        assert_eq!(r.status, 401, "{}", r.text);
    }
    eventually("every lease revoked after the restart", || async {
        (still_revoking(&b, &agent).await == 0).then_some(())
    })
    .await;
    each_revoked_once(&b, &agent, &ids, true).await;
}

/// `GET /v1/revocations/{id}?wait=` answers once every lease is settled:
/// a kill switch over 10,000 leases answered at once (`wait` 0) is still
/// under way when looked at without `wait`; a look waiting when the server
/// is stopped (SIGTERM) is answered then, with the progress so far, not
/// cut by the shutdown; after the restart the revocations resume, and a
/// look with `wait` answers the finished count, each lease revoked once.
/// A `wait` that is not a number, or a misspelt parameter, is refused with
/// a clear error rather than answered at once; a `wait` past 60 is held to
/// 60; an unknown revocation is a 404 at once, not after its wait.
#[tokio::test]
async fn a_look_at_a_revocation_can_wait_for_its_end() {
    const SEEDED: usize = 10_000;
    let mut b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("waited", "ES256");
    b.register(&agent, "red").await;
    let task = b.token_ttl(&agent, Some(3600)).await;
    b.kill().await;
    let ids = seed_leases(&b, &agent, &task.task_id, SEEDED).await;
    let ids: std::collections::BTreeSet<String> = ids.into_iter().collect();
    b.start_again().await;

    let body = json!({ "agent": agent.id, "reason": "waited for", "wait": 0 });
    let rv = b
        .post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    let id = rv["revocation_id"].as_str().unwrap();
    let path = format!("/v1/revocations/{id}");
    let now = b.get(&path, Some(&b.ops.auditor)).await.expect(200);
    assert!(
        now["pending"].as_u64().unwrap() > 0,
        "finished before it was looked at: nothing to wait for: {now}"
    );
    let waiting = {
        let (http, token) = (b.http.clone(), b.ops.auditor.clone());
        let url = b.url(&format!("{path}?wait=60"));
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(token).send().await;
            let r = r.expect("the look was answered, not cut by the shutdown");
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    b.stop_gracefully().await;
    let (status, seen) = waiting.await.unwrap();
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["found"].as_u64(), Some(SEEDED as u64), "{seen}");
    let settled = ["revoked", "expiring", "pending"].map(|k| seen[k].as_u64().unwrap());
    assert_eq!(settled.iter().sum::<u64>(), SEEDED as u64, "{seen}");
    // The stop did not wait for the look's end: leases were still queued
    // when the process exited, so the look answered before them.
    let left = still_revoking(&b, &agent).await;
    assert!(left > 0, "the stop waited for every revocation: {seen}");
    assert!(seen["pending"].as_u64().unwrap() >= left as u64, "{seen}");
    b.start_again().await;
    let done = b
        .get(&format!("{path}?wait=60"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(done["pending"].as_u64(), Some(0), "{done}");
    assert_eq!(done["found"].as_u64(), Some(SEEDED as u64), "{done}");
    assert_eq!(done["revoked"].as_u64(), Some(SEEDED as u64), "{done}");
    // Stopped mid-revocation: the CA may have listed a lease whose record
    // had not committed, as after a crash.
    each_revoked_once(&b, &agent, &ids, true).await;

    // A wait past the cap is held to it, not refused; nothing is left to
    // wait for here, so it answers at once.
    let capped = b
        .get(&format!("{path}?wait=3600"), Some(&b.ops.auditor))
        .await
        .expect(200);
    assert_eq!(capped["pending"].as_u64(), Some(0), "{capped}");
    // A revocation that does not exist is a 404 at once, not after the wait.
    let asked = std::time::Instant::now();
    let r = b
        .get("/v1/revocations/rv_none?wait=30", Some(&b.ops.auditor))
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.text.contains("no revocation `rv_none`"), "{}", r.text);
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(20),
        "an unknown revocation was waited on: {:?}",
        asked.elapsed()
    );

    for (bad, says) in [
        (
            "wait=soon",
            "`wait` is a whole number of seconds (0 to 60), not `soon`",
        ),
        (
            "wait=-1",
            "`wait` is a whole number of seconds (0 to 60), not `-1`",
        ),
        ("wiat=5", "the query is not valid: unknown field `wiat`"),
    ] {
        let r = b.get(&format!("{path}?{bad}"), Some(&b.ops.auditor)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert!(r.text.contains(says), "{bad}: {}", r.text);
    }
}

/// `keygate revoke` following a kill switch over 10,000 leases while the
/// broker is stopped (SIGTERM) mid-revocation and started again on the
/// same address: it looks again until the broker is back, where the
/// revocations resume, and returns once every lease is revoked, each once.
#[tokio::test]
async fn the_cli_follows_a_kill_switch_through_a_broker_restart() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    const SEEDED: usize = 10_000;
    let mut b = TestBroker::start_with(Setup::permissive()).await;
    b.listen = b.addr.to_string();
    let agent = TestAgent::new("followed", "ES256");
    b.register(&agent, "red").await;
    let task = b.token_ttl(&agent, Some(3600)).await;
    b.kill().await;
    let ids = seed_leases(&b, &agent, &task.task_id, SEEDED).await;
    let ids: std::collections::BTreeSet<String> = ids.into_iter().collect();
    b.start_again().await;

    let args = [
        "revoke",
        "--agent",
        &agent.id,
        "--reason",
        "followed",
        "--timeout",
        "120",
    ];
    let mut cli = b
        .cli_command(&args, Some(&b.ops.secops))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(cli.stderr.take().unwrap()).lines();
    let queued = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = said.next_line().await.unwrap() {
            if line.contains("live lease(s) queued") {
                return line;
            }
        }
        panic!("keygate revoke never said what it queued")
    })
    .await
    .unwrap();
    // What it says from here on is kept for a failure's message.
    let rest = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = said.next_line().await {
            all.push(line);
        }
        all
    });
    b.stop_gracefully().await;
    let left = still_revoking(&b, &agent).await;
    assert!(
        left > 0,
        "stopped after every revocation: nothing to follow ({queued})"
    );
    b.start_again().await;

    let mut out = String::new();
    cli.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let status = cli.wait().await.unwrap();
    let said = rest.await.unwrap();
    assert!(status.success(), "{status}: {said:?}\n{out}");
    let last: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(last["pending"].as_u64(), Some(0), "{last}");
    assert_eq!(last["revoked"].as_u64(), Some(SEEDED as u64), "{last}");
    // Stopped mid-revocation: the CA may have listed a lease whose record
    // had not committed, as after a crash.
    each_revoked_once(&b, &agent, &ids, true).await;
}

/// How many of `agent`'s leases are still queued for revocation.
async fn still_revoking(b: &TestBroker, agent: &TestAgent) -> i64 {
    let revoking = "SELECT count(*) FROM leases WHERE agent_id = ? AND state = 'revoking'";
    b.store_count(revoking, &[&agent.id]).await
}

/// Writes `n` live local-CA leases of `task` straight into the store of the
/// stopped broker `b`; their ids.
async fn seed_leases(b: &TestBroker, agent: &TestAgent, task: &str, n: usize) -> Vec<String> {
    let (now, until) = (common::unix_now(), common::unix_now() + 3600);
    let seed = match common::store::engine() {
        common::store::Engine::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {n}) \
             INSERT INTO leases (id, agent_id, task_id, scope, provider, state, revocability, \
             created_at, expires_at) SELECT printf('ls_seed_%05d', i), ?, ?, 'jwt-svid', 'ca', \
             'active', 'revocable', {now}, {until} FROM n"
        ),
        common::store::Engine::Postgres => format!(
            "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, revocability, \
             created_at, expires_at) SELECT 'ls_seed_' || lpad(i::text, 5, '0'), ?, ?, \
             'jwt-svid', 'ca', 'active', 'revocable', {now}, {until} \
             FROM generate_series(0, {n} - 1) AS i"
        ),
    };
    b.store_exec(&seed, &[&agent.id, task]).await.unwrap();
    (0..n).map(|i| format!("ls_seed_{i:05}")).collect()
}

/// `n` X.509-SVIDs for `agent` over three sessions: the sessions' tokens
/// and the leases' ids.
async fn mint_many(
    b: &TestBroker,
    agent: &TestAgent,
    n: usize,
) -> (Vec<String>, std::collections::BTreeSet<String>) {
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(b.token(agent).await.token);
    }
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..n {
        let cred = b.x509(&tokens[i % tokens.len()], Some(600)).await;
        ids.insert(cred["lease_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), n);
    (tokens, ids)
}

/// Every one of `ids` is revoked, with exactly one `lease.revoked` event
/// each (`crashed`: the CA may have listed it before a crash), and the
/// audit chain verifies.
async fn each_revoked_once(
    b: &TestBroker,
    agent: &TestAgent,
    ids: &std::collections::BTreeSet<String>,
    crashed: bool,
) {
    let revoked = b
        .store_count(
            "SELECT count(*) FROM leases WHERE agent_id = ? AND state = 'revoked'",
            &[&agent.id],
        )
        .await;
    assert_eq!(revoked, ids.len() as i64);
    let events = b
        .audit(&format!("action=lease.revoked&agent={}", agent.id))
        .await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for ev in &events {
        // After a crash, a lease the CA listed just before it, but whose
        // record did not commit, is found listed already when retried.
        let result = ev["details"]["result"].as_str().unwrap();
        let listed_before = [
            "already gone at the provider",
            "not found at the provider: never issued, or already gone",
        ];
        assert!(
            result == "revoked" || crashed && listed_before.contains(&result),
            "{ev}"
        );
        *seen
            .entry(ev["lease"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), ids.len(), "one event per lease");
    assert!(seen.values().all(|n| *n == 1), "a lease recorded twice");
    assert!(seen.keys().all(|id| ids.contains(id)));
    let out = b.cli(&["audit", "verify"], Some(&b.ops.auditor)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
