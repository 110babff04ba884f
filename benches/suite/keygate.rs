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
use crate::openbao::{Anchor, Timing};

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
    /// Writes the config: CA scopes (JWT- and X.509-SVID), a vault `token`
    /// scope through `anchor`'s AppRole, two agents sharing one key, a
    /// permit for their team, and the demo secops operator.
    pub fn configure(
        dir: &Path,
        anchor: &Anchor,
        key: SecretString,
        public: keygate::identity::PublicKey,
    ) -> Self {
        let d = dir.display();
        for sub in ["policies", "agents"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/keygate.cedarschema"),
            dir.join("policies/keygate.cedarschema"),
        )
        .expect("schema");
        std::fs::write(
            dir.join("policies/bench.cedar"),
            r#"@id("bench") permit (principal in Keygate::Team::"bench", action == Keygate::Action::"request_credential", resource) when { ["ca", "vault"].contains(resource.provider) };"#,
        )
        .expect("policy");
        for id in [LOAD_AGENT, REVOKE_AGENT] {
            let agent = json!({
                "id": id, "team": "bench", "sponsor": "bench@example.com",
                "risk_tier": 1, "environment": "test", "purpose": "load benchmark",
                "jwks": { "keys": [public.jwk] },
            });
            std::fs::write(
                dir.join(format!("agents/{id}.toml")),
                toml::to_string(&agent).expect("toml"),
            )
            .expect("agent");
        }
        std::fs::write(dir.join("secret-id"), &anchor.secret_id).expect("secret id");
        let cfg = format!(
            r#"
[server]
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
[server.connections]
max_connections = 4096
[limits]
# The load comes from one address and a few agents: limits off (0).
per_address_per_minute = 0
per_client_per_minute = 0
per_agent_per_minute = 0
[store]
url = "sqlite://{d}/keygate.db"
[sessions]
signing_key_file = "{d}/session.pem"
max_ttl_secs = 14400
[policy]
dir = "{d}/policies"
[registry]
seed_dir = "{d}/agents"
[[operators]]
name = "bench-secops"
roles = ["secops"]
token_sha256 = "{SECOPS_SHA256}"
[providers.ca]
kind = "local-ca"
trust_domain = "bench.example.org"
key_file = "{d}/ca/key.pem"
cert_file = "{d}/ca/cert.pem"
jwt_key_file = "{d}/ca/jwt.pem"
revocation_file = "{d}/ca/revoked.jsonl"
[providers.vault]
kind = "vault"
address = "{addr}"
token_role = "keygate-agent"
auth = {{ method = "approle", role_id = "{role_id}", secret_id_file = "{d}/secret-id" }}
[[scopes]]
name = "jwt-svid"
provider = "ca"
max_ttl_secs = 3600
params = {{ kind = "jwt_svid" }}
[[scopes]]
name = "x509-svid"
provider = "ca"
max_ttl_secs = 3600
params = {{ kind = "x509_svid" }}
[[scopes]]
name = "vault-token"
provider = "vault"
max_ttl_secs = 3600
params = {{ kind = "token", policies = ["agent-reader"] }}
"#,
            addr = anchor.addr,
            role_id = anchor.role_id,
        );
        std::fs::write(dir.join("keygate.toml"), cfg).expect("config");
        Self {
            dir: dir.to_owned(),
            key,
            kid: public.kid,
            http: reqwest::Client::new(),
        }
    }

    /// The same config on a PostgreSQL store (`url`, its password in a
    /// file beside): the config file for every replica.
    pub fn configure_postgres(&self, url: &str, password: &str) -> PathBuf {
        let sqlite = format!("url = \"sqlite://{}/keygate.db\"", self.dir.display());
        let cfg = std::fs::read_to_string(self.dir.join("keygate.toml")).expect("config");
        assert!(cfg.contains(&sqlite), "the config's store line changed");
        let pw = self.dir.join("pg-password");
        std::fs::write(&pw, password).expect("password file");
        let cfg = cfg.replacen(
            &sqlite,
            &format!("url = \"{url}\"\npassword = \"file:{}\"", pw.display()),
            1,
        );
        let path = self.dir.join("keygate-pg.toml");
        std::fs::write(&path, cfg).expect("config");
        path
    }

    /// The same config on a fresh store and revocation file of its own (it
    /// runs beside the main instance), with continuous validation on —
    /// four detectors of each kind, none of which fires under this load —
    /// or not, so the two are measured alike.
    pub fn configure_detectors(&self, on: bool) -> PathBuf {
        let name = if on { "detect" } else { "plain" };
        let d = self.dir.display();
        let cfg = std::fs::read_to_string(self.dir.join("keygate.toml")).expect("config");
        let store = format!("url = \"sqlite://{d}/keygate.db\"");
        let revoked = format!("revocation_file = \"{d}/ca/revoked.jsonl\"");
        assert!(
            cfg.contains(&store) && cfg.contains(&revoked),
            "the config changed"
        );
        let cfg = cfg
            .replacen(
                &store,
                &format!("url = \"sqlite://{d}/keygate-{name}.db\""),
                1,
            )
            .replacen(
                &revoked,
                &format!("revocation_file = \"{d}/ca/revoked-{name}.jsonl\""),
                1,
            );
        let detectors = r#"
[validation]
warm_up_observations = 20
[[detectors]]
name = "denials"
signal = "denials"
threshold = 1000
window_secs = 300
severity = "high"
action = "suspend"
[[detectors]]
name = "requests"
signal = "credential_requests"
threshold = 100000000
window_secs = 60
severity = "low"
action = "record"
[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "medium"
action = "alert"
[[detectors]]
name = "new-scope"
signal = "new_scope"
severity = "low"
action = "record"
"#;
        // Top-level tables must come before the first `[[scopes]]`.
        let cfg = if on {
            cfg.replacen("[[scopes]]", &format!("{detectors}\n[[scopes]]"), 1)
        } else {
            cfg
        };
        let path = self.dir.join(format!("keygate-{name}.toml"));
        std::fs::write(&path, cfg).expect("config");
        path
    }

    /// Starts the release binary; returns it once `/readyz` answers 200,
    /// and how long that took from the spawn.
    pub async fn start(&self) -> (Server, Duration) {
        self.start_config(&self.dir.join("keygate.toml")).await
    }

    /// [`Keygate::start`] on another config file (another replica).
    pub async fn start_config(&self, config: &Path) -> (Server, Duration) {
        let t0 = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,rustify=off,vaultrs=warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start keygate");
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
            tokio::time::sleep(Duration::from_millis(5)).await;
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
        let (h, base, key, kid) = (
            self.http.clone(),
            base.to_owned(),
            Arc::new(self.key.clone()),
            self.kid.clone(),
        );
        load::timed(clients, t.warm, t.secs, move |_| {
            let req = token_request(
                &h,
                &base,
                LOAD_AGENT,
                &Self::assertion(&key, &kid, LOAD_AGENT),
            );
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
            tokio::time::sleep(Duration::from_millis(5)).await;
            progress = self
                .http
                .get(format!("{base}/v1/revocations/{id}"))
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
