//! A real OIDC issuer for federation tests: `oauth2-mock-server` under node
//! (`tests/azure/oidc-issuer.mjs`), with discovery and a JWKS, minting tokens
//! with whatever claims a test asks for, and rotating its keys on demand.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

pub struct OidcIssuer {
    pub issuer: String,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    http: reqwest::Client,
    _child: Child,
}

impl OidcIssuer {
    pub async fn start() -> Self {
        let mut child = super::peers::spawn_node("oidc-issuer.mjs", &[], Stdio::piped());
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let v = next_json(&mut stdout).await;
        Self {
            issuer: v["issuer"].as_str().unwrap().to_owned(),
            stdin,
            stdout,
            http: reqwest::Client::new(),
            _child: child,
        }
    }

    /// A token signed by the issuer's current keys, with `claims` merged in.
    pub async fn mint(&self, claims: &Value) -> String {
        let v: Value = self
            .http
            .post(format!("{}/token", self.issuer))
            .form(&[
                ("grant_type", "client_credentials"),
                ("claims", &claims.to_string()),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["access_token"].as_str().unwrap().to_owned()
    }

    /// Adds a key; returns its kid.
    pub async fn rotate(&mut self) -> String {
        self.stdin.write_all(b"rotate\n").await.unwrap();
        self.stdin.flush().await.unwrap();
        let v = next_json(&mut self.stdout).await;
        v["kid"].as_str().unwrap().to_owned()
    }
}

async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the OIDC issuer to answer")
        .unwrap()
        .unwrap_or_else(|| panic!("the OIDC issuer exited (see its stderr above)"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("OIDC issuer said `{line}`: {e}"))
}

/// The `kid` in a JWT's header.
pub fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}
