//! The benchmark suite: Keygate beside OpenBao, in one run on one machine.
//!
//! Starts OpenBao 2 with raft storage (durable) and the release `keygate`
//! binary on its default store (SQLite, WAL, synchronous=FULL), both on
//! loopback, and drives each with the same Rust load generator:
//!
//! 1. issuance at each concurrency level: Keygate `POST /v1/credentials`
//!    (local-ca JWT-SVID, X.509-SVID, and a Vault `token` scope minted by
//!    the same OpenBao) against OpenBao `auth/token/create`, twice: its
//!    fastest path (root token, minimal body: the anchor of the speed
//!    goals) and the path Keygate's provider takes (an AppRole token and
//!    Keygate's body, with `meta` and `explicit_max_ttl`); Keygate
//!    `/oauth/token` (a task opened with a private_key_jwt assertion)
//!    against OpenBao `auth/jwt/login` with a JWT signed by the same key;
//!    and a request that does no work on either side (`/healthz`,
//!    `sys/health`: what an HTTP request alone costs each server);
//! 2. emergency revocation of N live leases: Keygate's kill switch on one
//!    agent (until every lease is confirmed revoked, and until every
//!    session token of the agent is refused) against OpenBao
//!    `sys/leases/revoke-prefix` over N tokens;
//! 3. Keygate's restart-to-ready time and memory with 100k and 1M live
//!    leases in its store;
//! 4. X.509-SVID issuance with the store on PostgreSQL (fsync on), one
//!    replica and then two on the same database, against the same OpenBao
//!    fastest path.
//!
//! Prints one table of ratios (Keygate / OpenBao) and writes the raw
//! figures to `target/bench/suite.json`.
//!
//! Run with: scripts/bench
//! Env: BENCH_SECS (measured seconds per run, default 10; 2 s warm-up
//!      before each), BENCH_CONCURRENCY (default "1,8,32,128"),
//!      BENCH_ROUNDS (measured windows per series, default 2: the systems'
//!      order alternates between them and the medians are reported),
//!      BENCH_REVOKE (leases per kill switch, default "1000,10000,100000"),
//!      BENCH_REVOKE_OPENBAO_MAX (largest revoke-prefix run, default 10000),
//!      BENCH_STORE (live leases for the restart, default "100000,1000000"),
//!      BENCH_REPLICAS (replicas on PostgreSQL, default "1,2"; empty: skip),
//!      BENCH_PG_CONCURRENCY (clients for those runs, default "32"),
//!      BENCH_DETECTORS (clients for the detectors-on run beside the same
//!      without, default "32"; empty: skip), BENCH_KEYGATE_WORKERS
//!      (Keygate's runtime threads, `TOKIO_WORKER_THREADS`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../tests/common/bao_setup.rs"]
mod bao_setup;
mod floor;
mod keygate;
mod load;
mod openbao;
#[path = "../../tests/common/peers.rs"]
mod peers;
#[path = "../../tests/common/postgres.rs"]
mod postgres;
mod report;

use std::time::Duration;

use serde_json::json;

use crate::keygate::Keygate;
use crate::load::Stats;
use crate::openbao::{Anchor, Timing};
use crate::peers::{Bao, Storage};
use crate::report::Pair;

fn list(var: &str, default: &str) -> Vec<usize> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .collect()
}

/// Keygate's issuance series: (label, bench scope).
const KEYGATE_SERIES: [(&str, &str); 3] = [
    ("credentials jwt-svid", "jwt-svid"),
    ("credentials x509-svid", "x509-svid"),
    ("credentials vault token", "vault-token"),
];
const FASTEST: &str = "token/create root,min";
const APPROLE: &str = "token/create approle";
const JWT_LOGIN: &str = "auth/jwt/login";
/// A request that does no work, on either side.
const NOOP: &str = "no-op request (healthz)";
const HEALTH: &str = "sys/health";

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let timing = Timing {
        warm: Duration::from_secs(2),
        secs: Duration::from_secs(secs),
    };
    let levels = list("BENCH_CONCURRENCY", "1,8,32,128");
    let rounds = list("BENCH_ROUNDS", "2")
        .first()
        .copied()
        .unwrap_or(2)
        .max(1);
    let revoke_sizes = list("BENCH_REVOKE", "1000,10000,100000");
    // OpenBao's revoke-prefix takes about 11 ms a token here (111 s for
    // 10,000): larger kill switches run on Keygate alone.
    let bao_revoke_max = list("BENCH_REVOKE_OPENBAO_MAX", "10000")
        .first()
        .copied()
        .unwrap_or(10_000);
    let mut store_sizes = list("BENCH_STORE", "100000,1000000");
    store_sizes.sort_unstable();

    eprintln!("starting OpenBao (raft) and Keygate (SQLite)…");
    let bao = Bao::start(Storage::Raft).await;
    let dir = std::env::temp_dir().join(format!("keygate-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("measuring the crypto floor on one core…");
    let floor = floor::measure(&dir).await;
    let (key, public) = ::keygate::identity::generate_agent_key("ES256").unwrap();
    let anchor = Anchor::configure(&bao, &key).await;
    let kg = Keygate::configure(&dir, &anchor, key, public);
    let (server, _) = kg.start().await;
    let http = reqwest::Client::new();

    let mut pairs = Vec::new();
    // OpenBao's fastest path at each level: the anchor of the replica rows.
    let mut fastest_at = std::collections::BTreeMap::new();
    for &c in &levels {
        // BENCH_ROUNDS windows of every series, the systems' order
        // alternating between rounds (OpenBao first, then Keygate first),
        // so warm-up and background work favour neither; medians kept.
        let mut runs: std::collections::BTreeMap<&str, Vec<Stats>> = Default::default();
        for round in 0..rounds {
            eprintln!("issuance at {c} clients, window {} of {rounds}…", round + 1);
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for keygate_side in order {
                if keygate_side {
                    load::watch(Some(server.pid()));
                    for (series, scope) in KEYGATE_SERIES {
                        let k = kg.credentials(&server.base, scope, c, timing).await;
                        runs.entry(series).or_default().push(k);
                    }
                    let k = kg.task_opens(&server.base, c, timing).await;
                    runs.entry("oauth/token (task open)").or_default().push(k);
                    let url = format!("{}/healthz", server.base);
                    let k = load::get(&http, url, c, timing.warm, timing.secs).await;
                    runs.entry(NOOP).or_default().push(k);
                } else {
                    // Two anchors, both kept: OpenBao's fastest path (root
                    // token, minimal body) and the path Keygate's own vault
                    // provider takes (AppRole token, Keygate's body).
                    load::watch(bao.pid());
                    let o = anchor.token_create_root(&http, c, timing).await;
                    runs.entry(FASTEST).or_default().push(o);
                    let o = anchor.token_create(&http, c, timing).await;
                    runs.entry(APPROLE).or_default().push(o);
                    let o = anchor.jwt_login(&http, &kg.key, c, timing).await;
                    runs.entry(JWT_LOGIN).or_default().push(o);
                    let url = format!("{}/v1/sys/health", bao.addr);
                    let o = load::get(&http, url, c, timing.warm, timing.secs).await;
                    runs.entry(HEALTH).or_default().push(o);
                }
            }
        }
        load::watch(None);
        let m = |series: &str| load::median(&runs[series]);
        let (fastest, approle) = (m(FASTEST), m(APPROLE));
        for (series, _) in KEYGATE_SERIES {
            let k = m(series);
            for (anchor, o) in [(FASTEST, &fastest), (APPROLE, &approle)] {
                pairs.push(Pair {
                    keygate: series.to_owned(),
                    openbao: anchor,
                    k: k.clone(),
                    o: o.clone(),
                });
            }
        }
        fastest_at.insert(c, fastest);
        pairs.push(Pair {
            keygate: "oauth/token (task open)".to_owned(),
            openbao: JWT_LOGIN,
            k: m("oauth/token (task open)"),
            o: m(JWT_LOGIN),
        });
        // What a request costs that does no work: no goal, the fixed cost
        // of an HTTP request on this machine for each server.
        pairs.push(Pair {
            keygate: NOOP.to_owned(),
            openbao: HEALTH,
            k: m(NOOP),
            o: m(HEALTH),
        });
    }

    // Continuous validation's cost: X.509-SVIDs with five detectors on,
    // against the same without, each on a fresh store, back to back
    // (BENCH_DETECTORS levels).
    for &c in &list("BENCH_DETECTORS", "32") {
        eprintln!("x509-svid without and with detectors at {c} clients…");
        // Alternated twice, the better run of each kept: this VM's
        // run-to-run noise (±10% between two 8 s runs) is larger than
        // the cost being measured.
        let mut best: [Option<Stats>; 2] = [None, None];
        for on in [false, true, false, true] {
            let (instance, _) = kg.start_config(&kg.configure_detectors(on)).await;
            let run = kg.credentials(&instance.base, "x509-svid", c, timing).await;
            instance.stop();
            let slot = &mut best[usize::from(on)];
            if slot.as_ref().is_none_or(|b| run.per_sec > b.per_sec) {
                *slot = Some(run);
            }
        }
        let [Some(off), Some(on)] = best else {
            continue;
        };
        pairs.push(Pair {
            keygate: "x509 + 5 detectors".to_owned(),
            openbao: "keygate x509, none",
            k: on,
            o: off,
        });
    }

    let mut revocations = Vec::new();
    for &n in &revoke_sizes {
        eprintln!("kill switch over {n} leases…");
        let k = kg.kill_switch(&server.base, n, 8).await;
        let o = if n <= bao_revoke_max {
            eprintln!("revoke-prefix over {n} tokens…");
            Some(anchor.revoke_prefix(&http, n).await)
        } else {
            None
        };
        revocations.push((n, k, o));
    }
    server.stop();

    let mut restarts = Vec::new();
    let mut seeded = kg.live_leases().await as usize;
    for (batch, &target) in store_sizes.iter().enumerate() {
        if target > seeded {
            eprintln!("seeding to {target} live leases…");
            kg.seed_leases(target - seeded, batch).await;
            seeded = target;
        }
        let live = kg.live_leases().await;
        let (server, ready) = kg.start().await;
        let (rss_ready, _) = server.rss_mib();
        let load = kg
            .credentials(
                &server.base,
                "jwt-svid",
                32,
                Timing {
                    warm: Duration::ZERO,
                    secs: Duration::from_secs(3),
                },
            )
            .await;
        let (rss_load, peak) = server.rss_mib();
        server.stop();
        restarts.push(json!({
            "live_leases": live, "ready_ms": ready.as_secs_f64() * 1000.0,
            "rss_ready_mib": rss_ready, "rss_after_load_mib": rss_load, "peak_rss_mib": peak,
            "load_after_restart": load,
        }));
    }

    // Several replicas on one PostgreSQL (durable: fsync on, synchronous
    // commits) beside the same OpenBao: X.509-SVIDs at the levels of
    // BENCH_PG_CONCURRENCY, one replica and then two.
    let replica_counts = list("BENCH_REPLICAS", "1,2");
    if !replica_counts.is_empty() {
        eprintln!("starting a durable PostgreSQL…");
        let pg = peers::Postgres::start_durable();
        for &c in &list("BENCH_PG_CONCURRENCY", "32") {
            for &n in &replica_counts {
                let db = format!("bench_{n}_{c}");
                let url = pg.create_database(&db);
                let config = kg.configure_postgres(&url, &pg.password);
                let mut servers = Vec::new();
                for _ in 0..n {
                    servers.push(kg.start_config(&config).await.0);
                }
                let bases: Vec<String> = servers.iter().map(|s| s.base.clone()).collect();
                eprintln!("x509-svid on PostgreSQL, {n} replica(s), {c} clients…");
                let k = kg.credentials_spread(&bases, "x509-svid", c, timing).await;
                for s in servers {
                    s.stop();
                }
                let o = match fastest_at.get(&c) {
                    Some(o) => o.clone(),
                    None => anchor.token_create_root(&http, c, timing).await,
                };
                pairs.push(Pair {
                    keygate: format!("x509 postgres ×{n} replica"),
                    openbao: "token/create root,min",
                    k,
                    o,
                });
            }
        }
    }

    let report = report::print_and_collect(&pairs, &revocations, &restarts, &floor, secs);
    report::write_report(&report);
    drop(bao);
    let _ = std::fs::remove_dir_all(&dir);
}
