//! Shared by the load benchmarks: a Keygate config and server, agent
//! tasks, a fixed-duration load loop with latencies, percentiles and the
//! JSON report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)] // each bench uses a different part

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;

pub const ISSUER: &str = "http://keygate.bench";
pub const AGENT: &str = "bench-agent";

/// A running `keygate serve`; killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config in `dir`: the built-in CA with a `jwt-svid` scope, the
/// bench agent (team `bench`, public key `jwk`), a permit for the bench team
/// on `providers` (Cedar set literal entries, e.g. `"ca"`), plus `extra`
/// TOML (more providers and scopes).
pub fn write_config(dir: &Path, jwk: &serde_json::Value, providers: &[&str], extra: &str) {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::create_dir_all(dir.join("agents")).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/keygate.cedarschema"),
        dir.join("policies/keygate.cedarschema"),
    )
    .unwrap();
    let set = providers
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        dir.join("policies/bench.cedar"),
        format!(
            r#"@id("bench") permit (principal in Keygate::Team::"bench", action == Keygate::Action::"request_credential", resource) when {{ [{set}].contains(resource.provider) }};"#
        ),
    )
    .unwrap();
    let agent = serde_json::json!({
        "id": AGENT, "team": "bench", "sponsor": "bench@example.com",
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
{extra}
"#
    );
    std::fs::write(dir.join("keygate.toml"), cfg).unwrap();
}

/// Starts the release binary on the config in `dir`.
pub fn start(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config"])
        .arg(dir.join("keygate.toml"))
        .env("RUST_LOG", "warn,rustify=off,vaultrs=warn")
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

/// Opens a task for the bench agent; returns its session token.
pub async fn open_task(
    http: &reqwest::Client,
    base: &str,
    key: &SecretString,
    kid: &str,
) -> String {
    let assertion = keygate::identity::sign_client_assertion(
        key,
        "ES256",
        Some(kid),
        AGENT,
        &format!("{ISSUER}/oauth/token"),
        60,
    )
    .unwrap();
    let resp: serde_json::Value = http
        .post(format!("{base}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", AGENT),
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

/// Runs `clients` loops calling `op(client index)` for a 2 s warm-up plus
/// `secs`; returns the sorted latencies of the measured calls.
pub async fn load<F, Fut>(clients: usize, secs: u64, op: F) -> Vec<Duration>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let warm = Instant::now() + Duration::from_secs(2);
    let end = warm + Duration::from_secs(secs);
    let mut handles = Vec::new();
    for i in 0..clients {
        let op = Arc::clone(&op);
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                op(i).await;
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

/// The `p` quantile of sorted latencies, in milliseconds.
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Rate, p50 and p99 of one measured run, as JSON.
pub fn summary(lat: &[Duration], secs: u64) -> serde_json::Value {
    serde_json::json!({
        "requests": lat.len(), "seconds": secs,
        "per_sec": lat.len() as f64 / secs as f64,
        "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99),
    })
}

/// `BENCH_SECS` (default 10).
pub fn bench_secs() -> u64 {
    std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Writes `target/bench/<name>.json`.
pub fn write_report(name: &str, report: &serde_json::Value) {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .unwrap();
}

/// A fresh temp dir for one bench run.
pub fn temp_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
}
