//! What a run prints and writes: the table of ratios, CPU per request,
//! the kill switch and restart rows, issue 20's goals, and
//! `target/bench/suite.json`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::floor;
use crate::keygate;
use crate::load::Stats;
use crate::{FASTEST, JWT_LOGIN};

/// One issuance comparison at one concurrency.
pub struct Pair {
    pub keygate: String,
    pub openbao: &'static str,
    pub k: Stats,
    pub o: Stats,
}

/// Context switches per request, as printed.
fn switches(s: &Stats) -> String {
    s.switches_per_req
        .map_or("—".to_owned(), |x| format!("{x:.1}"))
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(f64::MIN_POSITIVE)
}

pub fn print_and_collect(
    pairs: &[Pair],
    revocations: &[(usize, keygate::KillSwitch, Option<Duration>)],
    restarts: &[Value],
    floor: &floor::Floor,
    secs: u64,
) -> Value {
    println!();
    println!(
        "Keygate / OpenBao, same run, same machine ({} cores); {secs} s measured after a 2 s warm-up",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<26} {:<22} {:>4} | {:>8} {:>7} {:>7} | {:>8} {:>7} {:>7} | {:>6} {:>6} {:>6}",
        "keygate",
        "openbao",
        "clts",
        "kg /s",
        "p50 ms",
        "p99 ms",
        "bao /s",
        "p50 ms",
        "p99 ms",
        "rate×",
        "p50×",
        "p99×"
    );
    let mut rows = Vec::new();
    for p in pairs {
        let (r, m, t) = (
            ratio(p.k.per_sec, p.o.per_sec),
            ratio(p.k.p50_ms, p.o.p50_ms),
            ratio(p.k.p99_ms, p.o.p99_ms),
        );
        println!(
            "{:<26} {:<22} {:>4} | {:>8.0} {:>7.2} {:>7.2} | {:>8.0} {:>7.2} {:>7.2} | {:>6.2} {:>6.2} {:>6.2}",
            p.keygate,
            p.openbao,
            p.k.clients,
            p.k.per_sec,
            p.k.p50_ms,
            p.k.p99_ms,
            p.o.per_sec,
            p.o.p50_ms,
            p.o.p99_ms,
            r,
            m,
            t
        );
        rows.push(json!({
            "keygate": p.keygate, "openbao": p.openbao, "clients": p.k.clients,
            "keygate_stats": p.k, "openbao_stats": p.o,
            "rate_ratio": r, "p50_ratio": m, "p99_ratio": t,
        }));
    }
    // CPU per request of each server process over the same windows: the
    // cost a request puts on the machine, whatever the load generator (on
    // the same two cores) leaves them.
    println!();
    println!(
        "crypto floor, one core: x509-svid {:.0} µs, jwt-svid {:.0} µs, task open {:.0} µs \
         (key generation, signature, session-token verification; benches/suite/floor.rs)",
        floor.x509_svid_us, floor.jwt_svid_us, floor.task_open_us
    );
    println!(
        "one durable SQLite commit of one row, alone (sqlx, WAL, synchronous=FULL): \
         {:.0} µs of wall time, {:.0} µs of CPU (not in the goal)",
        floor.commit.wall_us, floor.commit.cpu_us
    );
    println!(
        "{:<26} {:<22} {:>4} | {:>10} {:>10} | {:>6} | {:>7} | {:>7} {:>7} | {:>7} {:>7}",
        "CPU per request (server)",
        "",
        "clts",
        "kg ms/req",
        "bao ms/req",
        "cpu×",
        "×floor",
        "kg idle",
        "bao idle",
        "kg csw",
        "bao csw"
    );
    for p in pairs {
        if let (Some(k), Some(o)) = (p.k.cpu_ms_per_req, p.o.cpu_ms_per_req) {
            let over_floor = floor_of(floor, &p.keygate).map(|f| k * 1000.0 / f);
            println!(
                "{:<26} {:<22} {:>4} | {:>10.3} {:>10.3} | {:>6.2} | {:>7} | {:>6.0}% {:>6.0}% | {:>7} {:>7}",
                p.keygate,
                p.openbao,
                p.k.clients,
                k,
                o,
                ratio(k, o),
                over_floor.map_or("—".to_owned(), |x| format!("{x:.1}")),
                p.k.idle_share.unwrap_or(0.0) * 100.0,
                p.o.idle_share.unwrap_or(0.0) * 100.0,
                switches(&p.k),
                switches(&p.o),
            );
        }
    }
    println!();
    println!(
        "{:<34} | {:>12} {:>14} {:>12} | {:>14} | {:>6}",
        "emergency revocation",
        "kg answered",
        "kg all revoked",
        "kg tokens",
        "bao revoke-pfx",
        "time×"
    );
    let mut revs = Vec::new();
    for (n, k, o) in revocations {
        let o = o.map(|o| o.as_secs_f64());
        let r = o.map(|o| ratio(k.all_revoked.as_secs_f64(), o));
        println!(
            "{:<34} | {:>10.3} s {:>12.3} s {:>10.3} s | {:>14} | {:>6}",
            format!("{n} live leases (kill switch)"),
            k.answered.as_secs_f64(),
            k.all_revoked.as_secs_f64(),
            k.tokens_rejected.as_secs_f64(),
            o.map_or("(not run)".to_owned(), |o| format!("{o:.3} s")),
            r.map_or("—".to_owned(), |r| format!("{r:.3}")),
        );
        revs.push(json!({
            "leases": n,
            "keygate_answered_s": k.answered.as_secs_f64(),
            "keygate_all_revoked_s": k.all_revoked.as_secs_f64(),
            "keygate_all_session_tokens_refused_s": k.tokens_rejected.as_secs_f64(),
            "openbao_revoke_prefix_s": o,
            "time_ratio": r,
        }));
    }
    println!();
    println!(
        "{:<34} | {:>10} {:>10} {:>12} {:>10} | {:>14}",
        "keygate restart (no openbao row)",
        "ready",
        "RSS ready",
        "RSS loaded",
        "peak RSS",
        "creds/s after"
    );
    for r in restarts {
        println!(
            "{:<34} | {:>7.0} ms {:>6.1} MiB {:>8.1} MiB {:>6.1} MiB | {:>14.0}",
            format!("{} live leases", r["live_leases"]),
            r["ready_ms"].as_f64().unwrap_or(0.0),
            r["rss_ready_mib"].as_f64().unwrap_or(0.0),
            r["rss_after_load_mib"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0),
            r["load_after_restart"]["per_sec"].as_f64().unwrap_or(0.0),
        );
    }
    let goals = print_goals(pairs, revocations, floor);
    json!({
        "machine": machine(),
        "crypto_floor_us": floor,
        "goals": goals,
        "keygate_store": "sqlite wal synchronous=full, group commit (rows `postgres`: PostgreSQL, fsync on, synchronous_commit on)",
        "openbao_storage": "raft",
        "measured_secs": secs, "warm_up_secs": 2,
        "issuance": rows, "revocation": revs, "restart": restarts,
    })
}

/// The crypto floor of a Keygate series, in µs (local-CA rows only).
fn floor_of(floor: &floor::Floor, series: &str) -> Option<f64> {
    match series {
        "credentials jwt-svid" => Some(floor.jwt_svid_us),
        "credentials x509-svid" => Some(floor.x509_svid_us),
        "oauth/token (task open)" => Some(floor.task_open_us),
        _ => None,
    }
}

/// Issue 20's goals, each with the figure measured and whether it holds.
fn print_goals(
    pairs: &[Pair],
    revocations: &[(usize, keygate::KillSwitch, Option<Duration>)],
    floor: &floor::Floor,
) -> Vec<Value> {
    let mut goals = Vec::new();
    let mut goal = |what: String, measured: String, holds: bool| {
        goals.push(json!({ "goal": what, "measured": measured, "holds": holds }));
    };
    let local = |p: &&Pair| {
        (p.keygate == "credentials jwt-svid" || p.keygate == "credentials x509-svid")
            && p.openbao == FASTEST
    };
    for p in pairs.iter().filter(local) {
        let c = p.k.clients;
        if c >= 32 {
            let r = ratio(p.k.per_sec, p.o.per_sec);
            goal(
                format!(
                    "{} at {c} clients: rate ≥ 5× OpenBao's fastest path",
                    p.keygate
                ),
                format!("{r:.2}×"),
                r >= 5.0,
            );
            let t = ratio(p.k.p99_ms, p.o.p99_ms);
            goal(
                format!("{} at {c} clients: p99 ≤ 0.2× OpenBao's", p.keygate),
                format!("{t:.2}×"),
                t <= 0.2,
            );
        } else {
            let t = ratio(p.k.p50_ms, p.o.p50_ms);
            goal(
                format!("{} at {c} clients: p50 ≤ 0.2× OpenBao's", p.keygate),
                format!("{t:.2}×"),
                t <= 0.2,
            );
        }
    }
    for p in pairs
        .iter()
        .filter(|p| p.openbao == FASTEST || p.openbao == JWT_LOGIN)
    {
        if let (Some(k), Some(f)) = (p.k.cpu_ms_per_req, floor_of(floor, &p.keygate)) {
            let x = k * 1000.0 / f;
            goal(
                format!(
                    "{} at {} clients: CPU per request ≤ 3× the crypto floor",
                    p.keygate, p.k.clients
                ),
                format!("{x:.1}× ({:.0} µs vs {f:.0} µs)", k * 1000.0),
                x <= 3.0,
            );
        }
    }
    for p in pairs.iter().filter(|p| p.openbao == JWT_LOGIN) {
        let r = ratio(p.k.per_sec, p.o.per_sec);
        goal(
            format!(
                "task open at {} clients: rate ≥ 5× auth/jwt/login",
                p.k.clients
            ),
            format!("{r:.2}×"),
            r >= 5.0,
        );
    }
    for (n, k, _) in revocations.iter().filter(|(n, _, _)| *n >= 100_000) {
        let t = k.all_revoked.as_secs_f64();
        goal(
            format!("kill switch over {n} live leases: all confirmed revoked < 10 s"),
            format!("{t:.2} s"),
            t < 10.0,
        );
    }
    println!();
    println!(
        "issue 20's goals (durability unchanged: a credential is returned only after its lease is on disk)"
    );
    for g in &goals {
        println!(
            "  [{}] {:<80} {}",
            if g["holds"] == true { "holds" } else { "  no " },
            g["goal"].as_str().unwrap_or_default(),
            g["measured"].as_str().unwrap_or_default()
        );
    }
    goals
}

/// What the run ran on.
fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "os": std::env::consts::OS,
    })
}

pub fn write_report(report: &Value) {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("suite.json");
    std::fs::write(&path, serde_json::to_string_pretty(report).unwrap()).unwrap();
    println!("\nraw figures: {}", path.display());
}
