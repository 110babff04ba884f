//! Real test peers: OpenBao (`bao`, dev mode or durable with init/unseal and
//! restarts) here, and a throwaway PostgreSQL cluster (`postgres.rs`). Both
//! listen on 127.0.0.1 only and die with their handle. A missing binary fails the test with the
//! command that installs it.
//!
//! Self-contained (std, tokio, reqwest, serde_json) so the benchmarks can
//! include it too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

pub use super::postgres::Postgres;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// How long a peer may take to come up.
const PEER_DEADLINE: Duration = Duration::from_secs(60);

/// The root token of every test OpenBao.
pub const ROOT_TOKEN: &str = "root";

/// Finds a binary on PATH (or in PostgreSQL's versioned folders), or fails
/// the test naming the installer.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed: run `scripts/install-peers` (it installs OpenBao and PostgreSQL)")
        })
}

/// A free TCP port on 127.0.0.1 whose successor is free too (a dev OpenBao
/// also binds PORT+1 as its cluster port).
pub fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of ports on 127.0.0.1");
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How an OpenBao keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `bao server -dev`: in memory, unsealed, root token `root`.
    Dev,
    /// Raft storage (OpenBao 2 has no file storage): survives a restart,
    /// initialised and unsealed by API, durable like Keygate's SQLite.
    Raft,
    /// A dev server on https (`-dev-tls`): its own CA, written to
    /// [`Bao::ca_file`].
    DevTls,
}

impl Storage {
    pub fn is_dev(self) -> bool {
        matches!(self, Self::Dev | Self::DevTls)
    }
}

/// A running OpenBao.
pub struct Bao {
    pub addr: String,
    pub port: u16,
    pub root: String,
    pub storage: Storage,
    dir: PathBuf,
    child: Option<Child>,
    unseal_key: Option<String>,
    http: reqwest::Client,
}

impl Bao {
    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// A dev server: in memory, ready in well under a second.
    pub async fn dev() -> Self {
        Self::start(Storage::Dev).await
    }

    /// A server whose state survives [`Bao::stop`] + [`Bao::restart`].
    pub async fn start(storage: Storage) -> Self {
        // A free port can be taken between choosing it and OpenBao binding it
        // (other tests start peers at the same time): choose again then.
        for _ in 0..4 {
            let mut bao = Self::prepare(storage);
            if bao.try_spawn().await {
                if !storage.is_dev() {
                    bao.init().await;
                    bao.unseal().await;
                }
                return bao;
            }
        }
        panic!("openbao could not bind a free port in four tries");
    }

    fn prepare(storage: Storage) -> Self {
        let port = free_port_pair();
        let scheme = if storage == Storage::DevTls {
            "https"
        } else {
            "http"
        };
        let bao = Self {
            addr: format!("{scheme}://127.0.0.1:{port}"),
            port,
            root: ROOT_TOKEN.into(),
            storage,
            dir: temp_dir("keygate-bao"),
            child: None,
            unseal_key: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        if !storage.is_dev() {
            bao.write_config();
        }
        bao
    }

    fn write_config(&self) {
        let (d, p) = (self.dir.display(), self.port);
        let storage = format!(
            "storage \"raft\" {{\n  path = \"{d}/raft\"\n  node_id = \"n1\"\n}}\ncluster_addr = \"http://127.0.0.1:{}\"",
            p + 1
        );
        std::fs::create_dir_all(self.dir.join("raft")).unwrap();
        let hcl = format!(
            "{storage}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{p}\"\n  cluster_address = \"127.0.0.1:{}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{p}\"\nui = false\n",
            p + 1
        );
        std::fs::write(self.dir.join("bao.hcl"), hcl).unwrap();
    }

    async fn spawn(&mut self) {
        assert!(
            self.try_spawn().await,
            "openbao's port was taken; its log:\n{}",
            self.log()
        );
    }

    /// Starts OpenBao; `false` when its port was taken meanwhile.
    async fn try_spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "openbao is already running");
        let bao = require_binary("bao");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("bao.log"))
            .unwrap();
        let mut cmd = Command::new(bao);
        cmd.arg("server");
        if self.storage.is_dev() {
            cmd.args(["-dev", "-dev-root-token-id", ROOT_TOKEN])
                .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port));
            if self.storage == Storage::DevTls {
                cmd.arg("-dev-tls")
                    .arg(format!("-dev-tls-cert-dir={}", self.dir.display()));
            }
        } else {
            cmd.arg(format!("-config={}", self.dir.join("bao.hcl").display()));
        }
        let child = cmd
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawning bao");
        self.child = Some(child);
        if self.storage == Storage::DevTls {
            self.trust_own_ca().await;
        }
        // Dev servers answer 200 once ready; durable ones 501/503 until
        // initialised and unsealed: any answer means the API is up.
        self.wait_health(|s| s != 0).await
    }

    /// Polls `sys/health` until `ok(status)` (0 = no answer). `false` when
    /// OpenBao exited because its port was taken.
    async fn wait_health(&mut self, ok: impl Fn(u16) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + PEER_DEADLINE;
        loop {
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                let log = self.log();
                if log.contains("address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("openbao exited ({exit}); its log:\n{log}");
            }
            let status = match self
                .http
                .get(format!("{}/v1/sys/health", self.addr))
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            if ok(status) {
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "openbao did not become ready (health {status}); its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The CA a `DevTls` server wrote (it signs the server's certificate).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("vault-ca.pem")
    }

    /// Waits for a `DevTls` server's CA and trusts it from then on.
    async fn trust_own_ca(&mut self) {
        let deadline = tokio::time::Instant::now() + PEER_DEADLINE;
        let pem = loop {
            match std::fs::read(self.ca_file()) {
                Ok(pem) if pem.ends_with(b"-----END CERTIFICATE-----\n") => break pem,
                _ => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "openbao wrote no CA; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
            .build()
            .unwrap();
    }

    async fn init(&mut self) {
        let v = self
            .raw(
                "PUT",
                "sys/init",
                None,
                Some(json!({ "secret_shares": 1, "secret_threshold": 1 })),
            )
            .await;
        self.unseal_key = Some(v["keys_base64"][0].as_str().unwrap().to_owned());
        self.root = v["root_token"].as_str().unwrap().to_owned();
    }

    /// Seals a durable server (`sys/seal`): it answers 503 "Vault is
    /// sealed" until [`Bao::unseal`].
    pub async fn seal(&mut self) {
        self.api("PUT", "sys/seal", None).await;
        assert!(self.wait_health(|s| s == 503).await);
    }

    pub async fn unseal(&mut self) {
        let key = self.unseal_key.clone().expect("an unseal key");
        self.raw("PUT", "sys/unseal", None, Some(json!({ "key": key })))
            .await;
        assert!(self.wait_health(|s| s == 200).await);
    }

    /// Kills the server (its state stays on disk for durable storage).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
        // The port must be closed before the test relies on the outage.
        let deadline = tokio::time::Instant::now() + PEER_DEADLINE;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "openbao did not stop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped durable server again on the same port and unseals it.
    pub async fn restart(&mut self) {
        assert!(!self.storage.is_dev(), "a dev server loses its state");
        self.spawn().await;
        self.unseal().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bao.log")).unwrap_or_default()
    }

    /// One API call as root; panics unless 2xx. Returns the JSON body
    /// (`Null` for 204).
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let root = self.root.clone();
        self.raw(method, path, Some(&root), body).await
    }

    /// One API call as root: status and body, whatever the status.
    pub async fn try_api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request(method, path, Some(&self.root.clone()), body)
            .await
    }

    /// One API call with `token`: status and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.request_in(None, method, path, token, body).await
    }

    /// One API call with `token` in `namespace` (`X-Vault-Namespace`).
    pub async fn request_in(
        &self,
        namespace: Option<&str>,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, format!("{}/v1/{path}", self.addr));
        if let Some(ns) = namespace {
            rb = rb.header("X-Vault-Namespace", ns);
        }
        if let Some(t) = token {
            rb = rb.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (status, v) = self.request(method, path, token, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("keeping the openbao dir: {}", self.dir.display());
        }
    }
}

/// How the npm-based stand-ins get installed.
pub const NODE_INSTALL_HINT: &str = "run `scripts/install-peers` (it installs node's oauth2-mock-server@8.2.3 into tests/azure/node_modules with `npm ci`)";

/// Starts a node script from `tests/azure/` (where `oauth2-mock-server` is
/// installed); a missing node or package fails the test with the command
/// that installs it.
pub fn spawn_node(
    script: &str,
    args: &[&std::path::Path],
    stdin: std::process::Stdio,
) -> tokio::process::Child {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if !repo
        .join("tests/azure/node_modules/oauth2-mock-server/package.json")
        .is_file()
    {
        panic!("oauth2-mock-server is not installed: {NODE_INSTALL_HINT}");
    }
    match tokio::process::Command::new("node")
        .arg(repo.join("tests/azure").join(script))
        .args(args)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("node is not installed: {NODE_INSTALL_HINT}; it needs node 20.19+")
        }
        Err(e) => panic!("cannot start node: {e}"),
    }
}
