//! Keygate under test: the release binary on its default store (SQLite,
//! WAL, synchronous=FULL) with the built-in CA and a Vault provider in
//! front of the same OpenBao, and what the suite does to it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};

use crate::load::{self, Stats};
use crate::openbao::Timing;

mod config;

pub const ISSUER: &str = "http://keygate.bench";
/// The agent the load runs as.
pub const LOAD_AGENT: &str = "bench-agent";
/// The agent the kill switch hits (so it hits only the leases it should).
pub const REVOKE_AGENT: &str = "bench-revoke";
/// The demo secops token (`config/keygate.toml`).
const SECOPS_TOKEN: &str = "dev-secops-token";
const SECOPS_SHA256: &str = "6a3d311baeb16220a1b61029ec343bf4118a0a5200e8274fe55b5ba723276608";

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

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the graceful exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.child.wait();
    }

    /// Resident and peak resident memory in MiB, from /proc.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// The Keygate instance: its directory, agent key and server.
pub struct Keygate {
    pub dir: PathBuf,
    pub key: SecretString,
    kid: String,
    pub http: reqwest::Client,
}

impl Keygate {
    /// Starts the release binary; returns it once `/readyz` answers 200,
    /// and how long that took from the spawn.
    pub async fn start(&self) -> (Server, Duration) {
        self.start_config(&self.dir.join("keygate.toml")).await
    }

    /// [`Keygate::start`] on another config file (another replica).
    pub async fn start_config(&self, config: &Path) -> (Server, Duration) {
        let t0 = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.args(["serve", "--config"])
            .arg(config)
            // BENCH_LOG: Keygate's log filter for a run being diagnosed
            // (e.g. `warn,sqlx::query=debug` for every statement's time).
            .env(
                "RUST_LOG",
                std::env::var("BENCH_LOG")
                    .unwrap_or_else(|_| "warn,rustify=off,vaultrs=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // BENCH_KEYGATE_WORKERS: Keygate's runtime threads (its default:
        // one a core but one), for a run measuring their effect.
        if let Ok(n) = std::env::var("BENCH_KEYGATE_WORKERS") {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        let mut child = cmd.spawn().expect("start keygate");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read keygate's first line");
        let addr = line
            .trim()
            .strip_prefix("keygate listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from keygate: {line}"))
            .to_owned();
        let server = Server {
            child,
            base: format!("http://{addr}"),
        };
        loop {
            let ok = self
                .http
                .get(format!("{}/readyz", server.base))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "keygate never got ready"
            );
            // As a SecOps console would, not flat out: every 100 ms, more
            // often while the revocation is young (a 1,000-lease one is over
            // in about 0.25 s).
            let pause =
                (t0.elapsed() / 20).clamp(Duration::from_millis(5), Duration::from_millis(100));
            tokio::time::sleep(pause).await;
        }
        (server, t0.elapsed())
    }

    fn assertion(key: &SecretString, kid: &str, agent: &str) -> String {
        keygate::identity::sign_client_assertion(
            key,
            "ES256",
            Some(kid),
            agent,
            &format!("{ISSUER}/oauth/token"),
            60,
        )
        .expect("sign")
    }

    /// Opens a task for `agent`; returns its session token.
    pub async fn open_task(&self, base: &str, agent: &str) -> String {
        let r = token_request(
            &self.http,
            base,
            agent,
            &Self::assertion(&self.key, &self.kid, agent),
        )
        .send()
        .await
        .expect("keygate unreachable");
        assert_eq!(r.status(), 200, "task open failed");
        let v: Value = r.json().await.expect("json");
        v["access_token"].as_str().expect("access_token").to_owned()
    }

    /// `POST /v1/credentials` for `scope` from `clients` tasks of the load agent.
    pub async fn credentials(&self, base: &str, scope: &str, clients: usize, t: Timing) -> Stats {
        let mut tokens = Vec::new();
        for _ in 0..clients {
            tokens.push(self.open_task(base, LOAD_AGENT).await);
        }
        let (tokens, h, url) = (
            Arc::new(tokens),
            self.http.clone(),
            format!("{base}/v1/credentials"),
        );
        let body = credential_body(scope);
        load::timed(clients, t.warm, t.secs, move |i| {
            let req = h.post(&url).bearer_auth(&tokens[i]).json(&body);
            async move {
                let r = req.send().await.expect("keygate unreachable");
                assert_eq!(r.status(), 201, "credential request failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// [`Keygate::credentials`] with the clients spread over replicas:
    /// client `i` opens its task on, and asks, `bases[i % n]`.
    pub async fn credentials_spread(
        &self,
        bases: &[String],
        scope: &str,
        clients: usize,
        t: Timing,
    ) -> Stats {
        let mut targets = Vec::new();
        for i in 0..clients {
            let base = &bases[i % bases.len()];
            targets.push((
                format!("{base}/v1/credentials"),
                self.open_task(base, LOAD_AGENT).await,
            ));
        }
        let (targets, h) = (Arc::new(targets), self.http.clone());
        let body = credential_body(scope);
        load::timed(clients, t.warm, t.secs, move |i| {
            let (url, token) = &targets[i];
            let req = h.post(url).bearer_auth(token).json(&body);
            async move {
                let r = req.send().await.expect("keygate unreachable");
                assert_eq!(r.status(), 201, "credential request failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// `POST /oauth/token`: a task opened with a fresh private_key_jwt
    /// assertion per call.
    pub async fn task_opens(&self, base: &str, clients: usize, t: Timing) -> Stats {
        let (h, base) = (self.http.clone(), base.to_owned());
        let assertions = load::Assertions::new(
            &self.key,
            Some(&self.kid),
            LOAD_AGENT,
            &format!("{ISSUER}/oauth/token"),
        );
        load::timed(clients, t.warm, t.secs, move |_| {
            let req = token_request(&h, &base, LOAD_AGENT, &assertions.next());
            async move {
                let r = req.send().await.expect("keygate unreachable");
                assert_eq!(r.status(), 200, "task open failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// Gives the revoke agent `n` live X.509-SVID leases over `tasks`
    /// tasks, then hits the kill switch on it.
    pub async fn kill_switch(&self, base: &str, n: usize, tasks: usize) -> KillSwitch {
        let mut tokens = Vec::new();
        for _ in 0..tasks {
            tokens.push(self.open_task(base, REVOKE_AGENT).await);
        }
        let tokens = Arc::new(tokens);
        let (h, url, tk) = (
            self.http.clone(),
            format!("{base}/v1/credentials"),
            Arc::clone(&tokens),
        );
        let body = credential_body("x509-svid");
        load::fill(32, n, move |i| {
            let req = h.post(&url).bearer_auth(&tk[i % tk.len()]).json(&body);
            async move {
                let r = req.send().await.expect("keygate unreachable");
                assert_eq!(r.status(), 201, "credential request failed");
            }
        })
        .await;
        for t in tokens.iter() {
            assert_eq!(
                self.session_status(base, t).await,
                200,
                "a live task's token must work"
            );
        }

        let t0 = Instant::now();
        // Meanwhile: when has every session token of the agent been refused?
        let poller = {
            let (h, base, tokens) = (self.http.clone(), base.to_owned(), Arc::clone(&tokens));
            tokio::spawn(async move {
                let mut live: Vec<&String> = tokens.iter().collect();
                while !live.is_empty() {
                    let mut still = Vec::new();
                    for t in live {
                        if session_status(&h, &base, t).await != 401 {
                            still.push(t);
                        }
                    }
                    live = still;
                }
                t0.elapsed()
            })
        };
        let r = self
            .http
            .post(format!("{base}/v1/revocations"))
            .bearer_auth(SECOPS_TOKEN)
            .json(&json!({ "agent": REVOKE_AGENT, "reason": "benchmark kill switch", "wait": 0 }))
            .send()
            .await
            .expect("kill switch");
        assert_eq!(r.status(), 200, "kill switch refused");
        let answered = t0.elapsed();
        let report: Value = r.json().await.expect("json");
        let id = report["revocation_id"].as_str().expect("id").to_owned();
        let mut progress = report;
        while progress["pending"].as_u64() != Some(0) {
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "revocation stuck: {progress}"
            );
            // Answered once every lease is settled (Keygate looks every
            // 25 ms with one index seek), or after 60 s: polled instead,
            // each answer counted the revocation's 100,000 leases, a cost
            // the revocations being timed paid.
            progress = self
                .http
                .get(format!("{base}/v1/revocations/{id}?wait=60"))
                .bearer_auth(SECOPS_TOKEN)
                .send()
                .await
                .expect("progress")
                .json()
                .await
                .expect("json");
        }
        let all_revoked = t0.elapsed();
        assert_eq!(progress["found"].as_u64(), Some(n as u64), "{progress}");
        assert_eq!(progress["revoked"].as_u64(), Some(n as u64), "{progress}");
        let rejected = poller.await.expect("poller");
        KillSwitch {
            answered,
            all_revoked,
            tokens_rejected: rejected,
        }
    }

    async fn session_status(&self, base: &str, token: &str) -> u16 {
        session_status(&self.http, base, token).await
    }

    /// Adds `n` live (active, unexpired) leases to the stopped instance's
    /// store, 10,000 per task, straight into SQLite.
    pub async fn seed_leases(&self, n: usize, batch: usize) {
        use sqlx::ConnectOptions;
        let opts: sqlx::sqlite::SqliteConnectOptions =
            format!("sqlite://{}/keygate.db", self.dir.display())
                .parse()
                .expect("db url");
        let mut db = opts.connect().await.expect("open the store");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let until = now + 4 * 3600;
        let per_task = 10_000usize;
        let mut tx = sqlx::Connection::begin(&mut db).await.expect("begin");
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) \
             INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at) \
             SELECT printf('tk_seed%d_%05d', ?, i), ?, 'seeded by the benchmark', 'open', ?, ? FROM n",
        )
        .bind(n.div_ceil(per_task) as i64)
        .bind(batch as i64)
        .bind(LOAD_AGENT)
        .bind(now)
        .bind(until)
        .execute(&mut *tx)
        .await
        .expect("seed tasks");
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) \
             INSERT INTO leases (id, agent_id, task_id, scope, provider, state, revocability, \
             handle, created_at, expires_at) \
             SELECT printf('ls_seed%d_%08d', ?, i), ?, printf('tk_seed%d_%05d', ?, i / ?), \
             'jwt-svid', 'ca', 'active', 'revocable', NULL, ?, ? FROM n",
        )
        .bind(n as i64)
        .bind(batch as i64)
        .bind(LOAD_AGENT)
        .bind(batch as i64)
        .bind(per_task as i64)
        .bind(now)
        .bind(until)
        .execute(&mut *tx)
        .await
        .expect("seed leases");
        tx.commit().await.expect("commit the seed");
    }

    /// Live leases in the (stopped) store.
    pub async fn live_leases(&self) -> u64 {
        use sqlx::ConnectOptions;
        let opts: sqlx::sqlite::SqliteConnectOptions =
            format!("sqlite://{}/keygate.db", self.dir.display())
                .parse()
                .expect("db url");
        let mut db = opts.connect().await.expect("open the store");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM leases WHERE state = 'active'")
            .fetch_one(&mut db)
            .await
            .expect("count");
        n as u64
    }
}

/// What the kill switch took, from the request.
#[derive(Debug, Clone, Copy)]
pub struct KillSwitch {
    /// Until `POST /v1/revocations` answered.
    pub answered: Duration,
    /// Until every lease was confirmed revoked by its provider.
    pub all_revoked: Duration,
    /// Until every session token of the agent was refused.
    pub tokens_rejected: Duration,
}

fn credential_body(scope: &str) -> Value {
    match scope {
        "jwt-svid" => json!({ "scope": scope, "ttl": 3600, "params": { "audience": "bench" } }),
        _ => json!({ "scope": scope, "ttl": 3600 }),
    }
}

fn token_request(
    http: &reqwest::Client,
    base: &str,
    agent: &str,
    assertion: &str,
) -> reqwest::RequestBuilder {
    http.post(format!("{base}/oauth/token")).form(&[
        ("grant_type", "client_credentials"),
        ("client_id", agent),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
        ("ttl", "3600"),
    ])
}

async fn session_status(http: &reqwest::Client, base: &str, token: &str) -> u16 {
    http.get(format!("{base}/v1/session"))
        .bearer_auth(token)
        .send()
        .await
        .expect("keygate unreachable")
        .status()
        .as_u16()
}
