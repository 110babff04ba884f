//! Property test against the real binary: random sequences of issue,
//! release, complete, emergency revocation, crash-restart and waiting.
//!
//! Invariants, checked after every step from `GET /v1/leases`:
//! - a lease once seen `revoked` is never seen in another state;
//! - a lease whose release, task completion or revocation was answered is
//!   never seen `active` or `pending` again;
//! - no lease disappears.
//!
//! And at the end, once the reaper has run: no lease is live past its
//! expiry, and every revoked, unexpired credential is refused by the CA.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Session, TestAgent, TestBroker, rfc3339, unix_now};
use proptest::prelude::*;
use serde_json::{Value, json};

const AGENTS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    /// A credential for `agent`; opens a task first if it has none (a
    /// 2-second one when `short_task`).
    Issue {
        agent: usize,
        jwt: bool,
        ttl: u64,
        short_task: bool,
    },
    Release {
        pick: usize,
    },
    Complete {
        agent: usize,
    },
    /// Emergency revocation of one agent, or of the whole team.
    Revoke {
        agent: Option<usize>,
    },
    Restart,
    Wait,
}

/// Steps, weighted: `crashy` favours restarts and revocations.
fn op(crashy: bool) -> impl Strategy<Value = Op> {
    let rare = if crashy { 3 } else { 1 };
    prop_oneof![
        5 => (0..AGENTS, any::<bool>(), prop_oneof![Just(1u64), Just(2), Just(600)], proptest::bool::weighted(0.2))
            .prop_map(|(agent, jwt, ttl, short_task)| Op::Issue { agent, jwt, ttl, short_task }),
        2 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (0..AGENTS).prop_map(|agent| Op::Complete { agent }),
        rare => proptest::option::of(0..AGENTS).prop_map(|agent| Op::Revoke { agent }),
        rare => Just(Op::Restart),
        1 => Just(Op::Wait),
    ]
}

struct Known {
    id: String,
    agent: usize,
    token: String,
    task: String,
    cred: Value,
}

#[derive(Default)]
struct Model {
    agents: Vec<TestAgent>,
    sessions: Vec<Option<Session>>,
    leases: Vec<Known>,
    /// Leases the broker has answered for as ended.
    dead: HashSet<String>,
    revoked: HashSet<String>,
}

impl Model {
    /// Checks the invariants on the broker's current view.
    async fn observe(&mut self, b: &TestBroker, step: &str) -> HashMap<String, Value> {
        let all: HashMap<String, Value> = b
            .leases("limit=10000")
            .await
            .into_iter()
            .map(|l| (l["id"].as_str().unwrap().to_owned(), l))
            .collect();
        for k in &self.leases {
            assert!(all.contains_key(&k.id), "{step}: lease {} vanished", k.id);
        }
        for (id, l) in &all {
            let state = l["state"].as_str().unwrap();
            if self.revoked.contains(id) {
                assert_eq!(
                    state, "revoked",
                    "{step}: revoked lease {id} came back: {l}"
                );
            }
            if state == "revoked" {
                self.revoked.insert(id.clone());
            }
            if self.dead.contains(id) {
                assert!(
                    !matches!(state, "active" | "pending"),
                    "{step}: ended lease {id} is live: {l}"
                );
            }
        }
        all
    }

    async fn session(&mut self, b: &TestBroker, agent: usize, short: bool) -> Session {
        if let Some(s) = &self.sessions[agent] {
            return s.clone();
        }
        let s = b
            .token_ttl(&self.agents[agent], Some(if short { 2 } else { 600 }))
            .await;
        self.sessions[agent] = Some(s.clone());
        s
    }

    async fn apply(&mut self, b: &mut TestBroker, op: &Op) {
        match *op {
            Op::Issue {
                agent,
                jwt,
                ttl,
                short_task,
            } => {
                for _ in 0..2 {
                    let s = self.session(b, agent, short_task).await;
                    let (scope, params) = if jwt {
                        (
                            "jwt-svid",
                            Some(json!({ "audience": common::JWT_AUDIENCE })),
                        )
                    } else {
                        ("x509-svid", None)
                    };
                    let r = b.credential(&s.token, scope, Some(ttl), params).await;
                    match r.status.as_u16() {
                        201 => {
                            let cred = r.json();
                            self.leases.push(Known {
                                id: cred["lease_id"].as_str().unwrap().to_owned(),
                                agent,
                                token: s.token.clone(),
                                task: s.task_id.clone(),
                                cred,
                            });
                            return;
                        }
                        // The task ended (revoked or out of time): open another.
                        401 | 409 => self.sessions[agent] = None,
                        // A 1-2 s lease can run out before the CA issues (its
                        // times are whole seconds): refused, nothing minted.
                        400 if ttl <= 2 && r.text.contains("already expired") => return,
                        _ => panic!("issue failed: {}", r.text),
                    }
                }
                panic!("no credential even from a fresh task");
            }
            Op::Release { pick } => {
                if self.leases.is_empty() {
                    return;
                }
                let k = &self.leases[pick % self.leases.len()];
                let path = format!("/v1/credentials/{}", k.id);
                let r = b
                    .call(reqwest::Method::DELETE, &path, Some(&k.token), None)
                    .await;
                match r.status.as_u16() {
                    200 => {
                        let state = r.json()["state"].as_str().unwrap().to_owned();
                        assert!(
                            !matches!(state.as_str(), "active" | "pending"),
                            "released: {}",
                            r.text
                        );
                        self.dead.insert(k.id.clone());
                    }
                    401 => {} // its task has ended
                    _ => panic!("release failed: {}", r.text),
                }
            }
            Op::Complete { agent } => {
                let Some(s) = self.sessions[agent].take() else {
                    return;
                };
                let r = b.complete(&s.token).await;
                match r.status.as_u16() {
                    200 => {
                        let ended = self.leases.iter().filter(|k| k.task == s.task_id);
                        self.dead.extend(ended.map(|k| k.id.clone()));
                    }
                    401 => {}
                    _ => panic!("complete failed: {}", r.text),
                }
            }
            Op::Revoke { agent } => {
                let body = match agent {
                    Some(i) => json!({ "agent": self.agents[i].id, "reason": "proptest" }),
                    None => json!({ "team": "platform", "reason": "proptest" }),
                };
                let rv = b
                    .post("/v1/revocations", Some(&b.ops.secops), &body)
                    .await
                    .expect(200);
                assert_eq!(rv["expiring"], 0);
                let hit = |a: usize| agent.is_none_or(|i| i == a);
                for a in (0..AGENTS).filter(|&a| hit(a)) {
                    self.sessions[a] = None;
                }
                let ended = self.leases.iter().filter(|k| hit(k.agent));
                self.dead.extend(ended.map(|k| k.id.clone()));
            }
            Op::Restart => b.restart().await,
            Op::Wait => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Live states a lease must have left once it expires and the reaper runs.
fn is_terminal(state: &str) -> bool {
    matches!(state, "revoked" | "expired" | "failed")
}

async fn run(ops: Vec<Op>) {
    let mut b = TestBroker::start().await;
    let mut m = Model::default();
    for i in 0..AGENTS {
        let agent = TestAgent::new(&format!("prop{i}"), if i == 0 { "ES256" } else { "EdDSA" });
        b.register(&agent, "platform").await;
        m.agents.push(agent);
        m.sessions.push(None);
    }
    for (n, op) in ops.iter().enumerate() {
        m.apply(&mut b, op).await;
        m.observe(&b, &format!("after step {n} {op:?}")).await;
    }

    // Wait (by polling) until every short lease has expired and the reaper
    // has dealt with it; a long one (600 s) must still be unexpired here.
    let latest_short = m
        .leases
        .iter()
        .map(|k| rfc3339(&k.cred["expires_at"]).unix_timestamp())
        .filter(|&e| e < unix_now() + 60)
        .max()
        .unwrap_or(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let snapshot = loop {
        if unix_now() > latest_short {
            let all = m.observe(&b, "final").await;
            let now = unix_now();
            let overdue: Vec<&Value> = all
                .values()
                .filter(|l| rfc3339(&l["expires_at"]).unix_timestamp() <= now)
                .filter(|l| !is_terminal(l["state"].as_str().unwrap()))
                .collect();
            if overdue.is_empty() {
                break all;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "leases live past their expiry: {overdue:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // A lease the broker calls revoked is refused by the CA while it would
    // otherwise still be valid.
    for k in &m.leases {
        let l = &snapshot[&k.id];
        if l["state"] != "revoked" || rfc3339(&l["expires_at"]).unix_timestamp() <= unix_now() + 5 {
            continue;
        }
        let c = &k.cred["credential"];
        let presented = match c["certificate"].as_str() {
            Some(cert) => json!({ "x509_svid": cert }),
            None => json!({ "jwt_svid": c["token"], "audience": common::JWT_AUDIENCE }),
        };
        let v = b.verify(&presented).await;
        assert_eq!(
            v["reason"], "revoked",
            "lease {} is revoked but its credential: {v}",
            k.id
        );
    }
}

fn run_case(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(ops));
}

// Two mixes of steps, as two tests so the harness runs them side by side;
// each case is a fresh broker, so few cases keep the suite quick.
proptest! {
    #![proptest_config(ProptestConfig {
        cases: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn leases_end_and_stay_ended(ops in proptest::collection::vec(op(false), 1..12)) {
        run_case(ops);
    }

    #[test]
    fn leases_end_and_stay_ended_across_crashes(ops in proptest::collection::vec(op(true), 1..12)) {
        run_case(ops);
    }
}
