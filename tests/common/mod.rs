//! The integration harness: starts the real `keygate` binary on
//! `127.0.0.1:0` in a private temp dir, and speaks its HTTP API as agents and
//! operators would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)] // each test binary uses a different part of the harness

mod agent;
mod api;
pub mod at_rest;
pub mod aws;
pub mod azure;
pub mod bao_setup;
pub mod browser;
pub mod config;
pub mod console;
pub mod example;
pub mod governance;
mod graph_fake;
pub mod https;
pub mod oidc;
pub mod peers;
pub mod postgres;
pub mod slack;
pub mod store;
pub mod vault;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

pub use agent::TestAgent;
use config::config_toml;
pub use config::{DEFAULT_SCOPES, Operators, Setup};

/// The issuer every test config uses; assertions name it (or its token
/// endpoint) as `aud`.
pub const ISSUER: &str = "https://keygate.test";
pub const TRUST_DOMAIN: &str = "keygate.test";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const JWT_AUDIENCE: &str = "https://api.keygate.test";

/// How long any "eventually" condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

pub fn token_endpoint() -> String {
    format!("{ISSUER}/oauth/token")
}

pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Parses an RFC 3339 time from a JSON value.
pub fn rfc3339(v: &Value) -> time::OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("bad time `{s}`: {e}"))
}

/// The serial the local CA derives from a lease id (hex), mirrored here so a
/// test can find a certificate it never saw (an orphaned lease's).
pub fn serial_for_lease(lease_id: &str) -> String {
    let digest = Sha256::digest(format!("keygate-local-ca-serial:{lease_id}"));
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&digest[..16]);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    hex::encode(serial)
}

/// An HTTP answer: status and body text.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: StatusCode,
    pub text: String,
}

impl Resp {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The body's `error` code.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    /// Asserts the status and returns the JSON body.
    #[track_caller]
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected answer: {}",
            self.text
        );
        self.json()
    }
}

/// An agent's open task: its session token and task id.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: String,
    pub task_id: String,
}

/// A running broker in its own temp dir. Dropping it kills the server.
pub struct TestBroker {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub child: Option<Child>,
    pub http: reqwest::Client,
    pub ops: Operators,
    /// Environment variables the server runs with.
    pub env: Vec<(String, String)>,
    /// Where it listens (`127.0.0.1:0`: any free port).
    pub listen: String,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    /// Another replica's view of the first one's dir: it leaves the dir to
    /// that one.
    shares_dir: bool,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Self {
        let mut broker = Self::prepare(setup);
        broker.spawn().await;
        broker
    }

    /// Writes the dir, policies and config without starting the server.
    pub fn prepare(setup: Setup) -> Self {
        let dir = std::env::temp_dir().join(format!("keygate-it-{}", uuid::Uuid::new_v4()));
        let policy_dir = dir.join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        if setup.repo_policies {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies");
            for entry in std::fs::read_dir(repo).unwrap() {
                let path = entry.unwrap().path();
                std::fs::copy(&path, policy_dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in &setup.policies {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let ops = Operators::generate();
        let scopes = setup.scopes.as_deref().unwrap_or(DEFAULT_SCOPES);
        let toml = config_toml(&dir, &ops, &setup.extra_config, scopes);
        std::fs::write(dir.join("keygate.toml"), toml).unwrap();
        Self {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            ops,
            env: setup.env,
            listen: "127.0.0.1:0".into(),
            stdout: None,
            shares_dir: false,
        }
    }

    /// Another replica of this broker, not started yet: the same dir and
    /// config, so the same store, keys, policies and operators; its own
    /// process and port once started (its log lines go to the same log).
    pub fn replica(&self) -> Self {
        Self {
            dir: self.dir.clone(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
            http: self.http.clone(),
            ops: self.ops.clone(),
            env: self.env.clone(),
            listen: "127.0.0.1:0".into(),
            stdout: None,
            shares_dir: true,
        }
    }

    /// Starts the server on the existing dir and waits for its ready line.
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = serve_command_on(&self.dir.join("keygate.toml"), &self.dir, &self.listen)
            .env("RUST_LOG", "info,rustify=off,vaultrs=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawning the keygate binary");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(DEADLINE, listening_addr(&mut lines)).await;
        match ready {
            Ok(Some(addr)) => self.addr = addr,
            _ => {
                let _ = child.kill().await;
                panic!("keygate did not start; its log:\n{}", self.log());
            }
        }
        self.child = Some(child);
        self.stdout = Some(lines);
    }

    /// The rest of the next stdout line that starts with `prefix`.
    pub async fn stdout_line(&mut self, prefix: &str) -> String {
        let lines = self.stdout.as_mut().expect("the server is running");
        let found = tokio::time::timeout(DEADLINE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.trim().to_owned());
                }
            }
            None
        })
        .await;
        found
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("the server never printed `{prefix}`"))
    }

    /// Kills the server with SIGKILL (a crash) and waits for it to die.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
        self.stdout = None;
    }

    /// Starts the server on a dir made by [`TestBroker::prepare`] (after
    /// the test changed its config).
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// Stops the server as an operator would (SIGTERM) and waits for it.
    pub async fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().expect("a running server has a pid");
            let status = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .unwrap();
            assert!(status.success(), "kill -TERM {pid}");
            let exited = tokio::time::timeout(DEADLINE, child.wait()).await;
            assert!(exited.is_ok(), "keygate did not stop on SIGTERM");
        }
        self.stdout = None;
    }

    /// The running server's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("the server is running")
    }

    /// Crash and start again on the same dir (a new port).
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("keygate.db")
    }

    /// Everything the server wrote to stderr so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Runs the `keygate` CLI against this broker (`KEYGATE_SERVER`), with
    /// `KEYGATE_TOKEN` set to `token`.
    pub async fn cli(&self, args: &[&str], token: Option<&str>) -> std::process::Output {
        self.cli_command(args, token).output().await.unwrap()
    }

    /// The `keygate` CLI pointed at this broker, not started.
    pub fn cli_command(&self, args: &[&str], token: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
        cmd.args(args)
            .env("KEYGATE_SERVER", format!("http://{}", self.addr))
            .env_remove("KEYGATE_TOKEN")
            .current_dir(&self.dir);
        if let Some(t) = token {
            cmd.env("KEYGATE_TOKEN", t);
        }
        cmd
    }

    /// A direct connection to the broker's database, as someone with file
    /// access would have.
    pub async fn db(&self) -> sqlx::SqliteConnection {
        use sqlx::Connection;
        let url = format!("sqlite://{}", self.db_path().display());
        sqlx::SqliteConnection::connect(&url).await.unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if self.shares_dir {
            return;
        }
        if std::thread::panicking() {
            eprintln!("keeping the failed test's dir: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `keygate serve --config <config> --listen 127.0.0.1:0` run in `dir`,
/// killed when dropped: the one way the harness starts the broker.
pub fn serve_command(config: &Path, dir: &Path) -> Command {
    serve_command_on(config, dir, "127.0.0.1:0")
}

/// The same, listening on `listen`.
pub fn serve_command_on(config: &Path, dir: &Path, listen: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", listen])
        .current_dir(dir)
        .kill_on_drop(true);
    cmd
}

/// Reads the broker's stdout up to its ready line; the address it listens
/// on, or `None` when it exited first.
pub async fn listening_addr(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<SocketAddr> {
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(addr) = line.strip_prefix("keygate listening on ") {
            return Some(addr.trim().parse().unwrap());
        }
    }
    None
}

/// Runs `keygate serve` on `setup`'s config and expects it to refuse to
/// start; returns what it printed.
pub async fn start_refused(setup: Setup) -> String {
    let b = TestBroker::prepare(setup);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        serve_command(&b.dir.join("keygate.toml"), &b.dir)
            .envs(b.env.iter().map(|(k, v)| (k, v)))
            .output(),
    )
    .await
    .expect("keygate should refuse the config at once, not start")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "keygate started: {text}");
    text
}

/// Polls `f` until it returns `Some`, failing the test after a deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
