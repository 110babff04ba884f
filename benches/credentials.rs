//! Load benchmark: credentials per second through `POST /v1/credentials`
//! (local-ca JWT-SVIDs) against the real `keygate` binary with its durable
//! SQLite store (WAL, synchronous=FULL).
//!
//! Run with: scripts/bench   (or: cargo bench --bench credentials)
//! Env: BENCH_SECS (measured seconds per level, default 10),
//!      BENCH_CONCURRENCY (comma list, default "1,8,32").
//! Writes raw figures to target/bench/credentials.json.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{bench_secs, load, open_task, pct, start, temp_dir, write_config, write_report};

#[tokio::main]
async fn main() {
    let secs = bench_secs();
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = temp_dir("keygate-bench");
    let (key, public) = keygate::identity::generate_agent_key("ES256").unwrap();
    write_config(&dir, &public.jwk, &["ca"], "");
    let server = start(&dir);
    let http = reqwest::Client::new();
    let mut rows = Vec::new();
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9}",
        "concurrency", "requests", "creds/s", "p50 ms", "p99 ms"
    );
    for c in levels {
        let mut tokens = Vec::new();
        for _ in 0..c {
            tokens.push(open_task(&http, &server.base, &key, &public.kid).await);
        }
        let (tokens, h, url) = (
            Arc::new(tokens),
            http.clone(),
            format!("{}/v1/credentials", server.base),
        );
        let body = serde_json::json!({ "scope": "jwt-svid", "ttl": 600, "params": { "audience": "bench" } });
        let lat = load(c, secs, move |i| {
            let req = h.post(&url).bearer_auth(&tokens[i]).json(&body);
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 201, "credential request failed");
                let _ = r.bytes().await;
            }
        })
        .await;
        let rps = lat.len() as f64 / secs as f64;
        let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
        println!("{c:>11} {:>9} {rps:>10.1} {p50:>9.2} {p99:>9.2}", lat.len());
        rows.push(serde_json::json!({
            "concurrency": c, "requests": lat.len(), "seconds": secs,
            "creds_per_sec": rps, "p50_ms": p50, "p99_ms": p99,
        }));
    }
    drop(server);
    let report = serde_json::json!({ "benchmark": "post_v1_credentials_local_ca_jwt_svid", "store": "sqlite wal synchronous=full", "levels": rows });
    write_report("credentials", &report);
    let _ = std::fs::remove_dir_all(&dir);
}
