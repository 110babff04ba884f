//! Load benchmark: credentials per second through `POST /v1/credentials`
//! (local-ca JWT-SVIDs) against the real `keygate` binary with its durable
//! SQLite store (WAL, synchronous=FULL).
//!
//! Run with: scripts/bench   (or: cargo bench --bench credentials)
//! Env: BENCH_SECS (measured seconds per level, default 10),
//!      BENCH_CONCURRENCY (comma list, default "1,8,32").
//! Writes raw figures to target/bench/credentials.json.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;

const ISSUER: &str = "http://keygate.bench";

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, jwk: &serde_json::Value) {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::create_dir_all(dir.join("agents")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/keygate.cedarschema"),
        dir.join("policies/keygate.cedarschema"),
    )
    .unwrap();
    std::fs::write(
        dir.join("policies/bench.cedar"),
        r#"@id("bench") permit (principal in Keygate::Team::"bench", action == Keygate::Action::"request_credential", resource) when { resource.provider == "ca" };"#,
    )
    .unwrap();
    let agent = serde_json::json!({
        "id": "bench-agent", "team": "bench", "sponsor": "bench@example.com",
        "risk_tier": 1, "environment": "test", "purpose": "load benchmark",
        "jwks": { "keys": [jwk] },
    });
    std::fs::write(
        dir.join("agents/bench.toml"),
        toml::to_string(&agent).unwrap(),
    )
    .unwrap();
    let cfg = format!(
        r#"
[server]
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
[store]
url = "sqlite://{d}/keygate.db"
[sessions]
signing_key_file = "{d}/session.pem"
max_ttl_secs = 14400
[policy]
dir = "{d}/policies"
[registry]
seed_dir = "{d}/agents"
[providers.ca]
kind = "local-ca"
trust_domain = "bench.example.org"
key_file = "{d}/ca/key.pem"
cert_file = "{d}/ca/cert.pem"
jwt_key_file = "{d}/ca/jwt.pem"
revocation_file = "{d}/ca/revoked.jsonl"
[[scopes]]
name = "jwt-svid"
provider = "ca"
max_ttl_secs = 3600
params = {{ kind = "jwt_svid" }}
"#
    );
    std::fs::write(dir.join("keygate.toml"), cfg).unwrap();
}

fn start(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(dir.join("keygate.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start keygate");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("keygate listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_owned();
    Server {
        child,
        base: format!("http://{addr}"),
    }
}

async fn open_task(http: &reqwest::Client, base: &str, key: &SecretString, kid: &str) -> String {
    let assertion = keygate::identity::sign_client_assertion(
        key,
        "ES256",
        Some(kid),
        "bench-agent",
        &format!("{ISSUER}/oauth/token"),
        60,
    )
    .unwrap();
    let resp: serde_json::Value = http
        .post(format!("{base}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "bench-agent"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
            ("ttl", "3600"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["access_token"].as_str().expect("token").to_owned()
}

/// Runs `clients` loops for warm-up + `secs`; returns measured latencies.
async fn level(
    base: &str,
    key: &SecretString,
    kid: &str,
    clients: usize,
    secs: u64,
) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let warm = Instant::now() + Duration::from_secs(2);
    let end = warm + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for _ in 0..clients {
        let token = open_task(&http, base, key, kid).await;
        let (http, url) = (http.clone(), format!("{base}/v1/credentials"));
        handles.push(tokio::spawn(async move {
            let body = serde_json::json!({ "scope": "jwt-svid", "ttl": 600, "params": { "audience": "bench" } });
            let mut lat = Vec::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = http.post(&url).bearer_auth(&token).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 201, "credential request failed");
                let _ = r.bytes().await;
                if t0 >= warm {
                    lat.push(t0.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    all
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = std::env::temp_dir().join(format!("keygate-bench-{}", uuid::Uuid::new_v4().simple()));
    let (key, public) = keygate::identity::generate_agent_key("ES256").unwrap();
    write_config(&dir, &public.jwk);
    let server = start(&dir);
    let key = Arc::new(key);
    let mut rows = Vec::new();
    println!(
        "{:>11} {:>9} {:>10} {:>9} {:>9}",
        "concurrency", "requests", "creds/s", "p50 ms", "p99 ms"
    );
    for c in levels {
        let lat = level(&server.base, &key, &public.kid, c, secs).await;
        let rps = lat.len() as f64 / secs as f64;
        let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
        println!("{c:>11} {:>9} {rps:>10.1} {p50:>9.2} {p99:>9.2}", lat.len());
        rows.push(serde_json::json!({
            "concurrency": c, "requests": lat.len(), "seconds": secs,
            "creds_per_sec": rps, "p50_ms": p50, "p99_ms": p99,
        }));
    }
    drop(server);
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let report = serde_json::json!({ "benchmark": "post_v1_credentials_local_ca_jwt_svid", "store": "sqlite wal synchronous=full", "levels": rows });
    std::fs::write(
        out.join("credentials.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
