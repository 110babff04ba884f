//! A shipped example config (`config/examples/*.toml`) run as a user would:
//! from a copy of the repository's policies and agents, with the example's
//! own relative paths, and the demo agent as the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{JWT_BEARER, unix_now};

/// A broker serving an example config; killed, and its dir removed, on drop.
pub struct ExampleBroker {
    dir: PathBuf,
    addr: String,
    http: reqwest::Client,
    _child: Child,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// The example `name` (e.g. `aws.toml`) as shipped.
pub fn example_text(name: &str) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(repo.join("config/examples").join(name)).unwrap()
}

/// Replaces `line` in an example, failing the test if the example no
/// longer has it (the test would silently run something else).
pub fn switch_line(example: &str, line: &str, with: &str) -> String {
    assert!(example.contains(line), "the example's line `{line}` moved");
    example.replace(line, with)
}

impl ExampleBroker {
    /// Serves `text` as `name` in a fresh dir with the repository's
    /// policies and agents, with `env`.
    pub async fn start(name: &str, text: &str, env: Vec<(String, String)>) -> Self {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("keygate-example-{}", uuid::Uuid::new_v4()));
        copy_dir(&repo.join("config/policies"), &dir.join("config/policies"));
        copy_dir(&repo.join("config/agents"), &dir.join("config/agents"));
        std::fs::write(dir.join(name), text).unwrap();
        let mut child = super::serve_command(Path::new(name), &dir)
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), super::listening_addr(&mut lines))
            .await
            .expect("keygate to start on the example config")
            .expect("keygate exited without serving the example config")
            .to_string();
        Self {
            dir,
            addr,
            http: reqwest::Client::new(),
            _child: child,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<address>`, as `KEYGATE_SERVER` takes it.
    pub fn server(&self) -> String {
        self.url("")
    }

    /// Runs a shipped example binary (`examples/<name>.rs`, built by
    /// `cargo build --examples`, which the README's test command runs)
    /// against this broker, from the repository root as the README does.
    pub async fn run_example(&self, name: &str, env: &[(&str, &str)]) -> std::process::Output {
        let bin = std::env::current_exe()
            .unwrap()
            .parent()
            .and_then(Path::parent)
            .unwrap()
            .join("examples")
            .join(name);
        // `cargo test --examples` builds them as test harnesses; the
        // runnable ones come from `cargo build --examples`.
        assert!(
            bin.exists(),
            "example `{name}` is not built at {}: run `cargo build --examples` first (scripts/test does)",
            bin.display()
        );
        Command::new(bin)
            .env("KEYGATE_SERVER", self.server())
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .await
            .unwrap()
    }

    /// Opens a task as the demo agent (its committed demo key); returns the
    /// session token.
    pub async fn demo_session(&self) -> String {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let pem = std::fs::read(repo.join("examples/keys/demo-agent.pem")).unwrap();
        let now = unix_now();
        let claims = json!({
            "iss": "demo-agent", "sub": "demo-agent", "aud": "http://127.0.0.1:8470/oauth/token",
            "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let key = EncodingKey::from_ec_pem(&pem).unwrap();
        let assertion =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "demo-agent"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
            ("task", "example config test"),
            ("ttl", "3600"),
        ];
        let token: Value = self
            .http
            .post(self.url("/oauth/token"))
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{token}"))
            .to_owned()
    }

    /// `POST /v1/tasks/complete`; asserts 200.
    pub async fn complete(&self, session: &str) -> Value {
        let resp = self
            .http
            .post(self.url("/v1/tasks/complete"))
            .bearer_auth(session)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.json().await.unwrap()
    }

    /// `POST /v1/credentials` for `scope` with `ttl`; asserts 201.
    pub async fn credential(&self, session: &str, scope: &str, ttl: u64) -> Value {
        let resp = self
            .http
            .post(self.url("/v1/credentials"))
            .bearer_auth(session)
            .json(&json!({ "scope": scope, "ttl": ttl }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status.as_u16(), 201, "{scope}: {body}");
        body
    }
}

impl Drop for ExampleBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
