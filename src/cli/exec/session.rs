//! The agent's side of the API, as `keygate exec` and `keygate
//! credential-process` speak it: open a task (`private_key_jwt`, or a
//! workload identity token), ask for credentials (waiting out an approval),
//! renew them, complete the task. The session token is a secret: it never
//! reaches a log line or an error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// How the agent proves who it is.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The broker.
    #[arg(long, env = "KEYGATE_SERVER", default_value = "http://127.0.0.1:8470")]
    pub server: String,
    /// The agent's id (its `client_id`).
    #[arg(long, env = "KEYGATE_AGENT")]
    pub agent: String,
    /// The agent's private key (PKCS#8 PEM) for `private_key_jwt`.
    #[arg(
        long,
        env = "KEYGATE_AGENT_KEY_FILE",
        required_unless_present = "federated_token_file"
    )]
    pub key_file: Option<PathBuf>,
    /// The key's algorithm.
    #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
    pub alg: String,
    /// A token from a trusted issuer instead of a key (Kubernetes or CI
    /// workload identity), read afresh at every task open.
    #[arg(long, conflicts_with = "key_file")]
    pub federated_token_file: Option<PathBuf>,
}

/// An open task.
pub struct Session {
    http: reqwest::Client,
    server: String,
    token: SecretString,
    pub task_id: String,
    /// Seconds the session lives from its opening.
    pub expires_in: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("server", &self.server)
            .field("task_id", &self.task_id)
            .finish_non_exhaustive()
    }
}

/// What a credential request came to.
pub enum Asked {
    /// 201: the credential response (`lease_id`, `expires_at`, `credential`…).
    Issued(Value),
    /// 202: it waits for approvers.
    Pending { approval_id: String },
}

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// A refusal by the broker, with its stable error code.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {status} {code}: {message}")]
pub struct Refused {
    pub what: String,
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// The body of a refusal as the broker wrote it (`error`, `message`).
async fn refusal(resp: reqwest::Response, what: &str) -> anyhow::Error {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let text = |k: &str| body[k].as_str().map(str::to_owned);
    anyhow::Error::new(Refused {
        what: what.to_owned(),
        status,
        code: text("error").unwrap_or_else(|| "error".into()),
        message: text("message")
            .or_else(|| text("error_description"))
            .unwrap_or_default(),
    })
}

impl Session {
    /// Opens a task for `args.agent` lasting `ttl` seconds (the broker's
    /// default when `None`).
    pub async fn open(args: &AgentArgs, task: &str, ttl: Option<u64>) -> anyhow::Result<Self> {
        let http = client()?;
        let server = args.server.trim_end_matches('/').to_owned();
        let mut form: Vec<(&str, String)> = vec![("task", task.to_owned())];
        if let Some(t) = ttl {
            form.push(("ttl", t.to_string()));
        }
        if let Some(path) = &args.federated_token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading `{}`", path.display()))?;
            form.push(("grant_type", crate::broker::JWT_BEARER_GRANT.to_owned()));
            form.push(("assertion", token.trim().to_owned()));
        } else {
            let path = args.key_file.as_ref().context("give --key-file")?;
            let key = SecretString::from(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading `{}`", path.display()))?,
            );
            // The assertion's audience is the token endpoint the broker
            // announces (RFC 8414).
            let meta: Value = http
                .get(format!("{server}/.well-known/oauth-authorization-server"))
                .send()
                .await
                .with_context(|| format!("cannot reach the broker at {server}"))?
                .json()
                .await
                .context("the broker's metadata is not JSON")?;
            let audience = meta["token_endpoint"]
                .as_str()
                .context("the broker announces no token_endpoint")?;
            let assertion = crate::identity::sign_client_assertion(
                &key,
                &args.alg,
                None,
                &args.agent,
                audience,
                60,
            )
            .map_err(|e| anyhow::anyhow!("signing the client assertion: {e}"))?;
            form.push(("grant_type", "client_credentials".to_owned()));
            form.push(("client_id", args.agent.clone()));
            form.push((
                "client_assertion_type",
                crate::broker::JWT_BEARER_ASSERTION.to_owned(),
            ));
            form.push(("client_assertion", assertion));
        }
        let resp = http
            .post(format!("{server}/oauth/token"))
            .form(&form)
            .send()
            .await
            .with_context(|| format!("cannot reach the broker at {server}"))?;
        if !resp.status().is_success() {
            return Err(refusal(resp, "opening the task").await);
        }
        let v: Value = resp.json().await?;
        Ok(Self {
            http,
            server,
            token: SecretString::from(
                v["access_token"]
                    .as_str()
                    .context("no access_token in the answer")?
                    .to_owned(),
            ),
            task_id: v["task_id"].as_str().unwrap_or_default().to_owned(),
            expires_in: v["expires_in"].as_u64().unwrap_or(0),
        })
    }

    /// A session known from before (`credential-process`'s cache).
    pub fn resume(server: &str, token: SecretString, task_id: String) -> anyhow::Result<Self> {
        Ok(Self {
            http: client()?,
            server: server.trim_end_matches('/').to_owned(),
            token,
            task_id,
            expires_in: 0,
        })
    }

    /// The session token, for whoever must hold it (a cache file, a child
    /// that asked for it).
    pub fn token(&self) -> &SecretString {
        &self.token
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.server))
            .bearer_auth(self.token.expose_secret())
    }

    /// Asks for `scope` for `ttl` seconds (the scope's default when `None`).
    pub async fn ask(&self, scope: &str, ttl: Option<u64>) -> anyhow::Result<Asked> {
        let mut body = json!({ "scope": scope });
        if let Some(t) = ttl {
            body["ttl"] = t.into();
        }
        let resp = self.post("/v1/credentials").json(&body).send().await?;
        match resp.status().as_u16() {
            201 => Ok(Asked::Issued(resp.json().await?)),
            202 => {
                let v: Value = resp.json().await?;
                Ok(Asked::Pending {
                    approval_id: v["approval_id"]
                        .as_str()
                        .context("no approval_id in the answer")?
                        .to_owned(),
                })
            }
            _ => Err(refusal(resp, &format!("scope `{scope}`")).await),
        }
    }

    /// Asks for `scope`; a sensitive one waits (up to `wait`) for the
    /// approvers, saying on stderr which approval to decide, and is then
    /// redeemed.
    pub async fn credential(
        &self,
        scope: &str,
        ttl: Option<u64>,
        wait: Duration,
    ) -> anyhow::Result<Value> {
        let approval_id = match self.ask(scope, ttl).await? {
            Asked::Issued(v) => return Ok(v),
            Asked::Pending { approval_id } => approval_id,
        };
        eprintln!(
            "keygate: scope `{scope}` waits for approval {approval_id} (up to {} s)",
            wait.as_secs()
        );
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!("approval {approval_id} for scope `{scope}` was not decided in time");
            }
            let poll = left.as_secs().clamp(1, 30);
            let resp = self
                .http
                .get(format!(
                    "{}/v1/approvals/{approval_id}?wait={poll}",
                    self.server
                ))
                .bearer_auth(self.token.expose_secret())
                .send()
                .await?;
            if !resp.status().is_success() {
                return Err(refusal(resp, &format!("approval {approval_id}")).await);
            }
            let v: Value = resp.json().await?;
            match v["status"].as_str().unwrap_or_default() {
                "pending" => continue,
                "approved" => break,
                other => bail!("approval {approval_id} for scope `{scope}` ended {other}"),
            }
        }
        let resp = self
            .post(&format!("/v1/approvals/{approval_id}/redeem"))
            .send()
            .await?;
        if resp.status().as_u16() != 201 && !resp.status().is_success() {
            return Err(refusal(resp, &format!("redeeming approval {approval_id}")).await);
        }
        Ok(resp.json().await?)
    }

    /// Renews a lease for `increment` seconds; `Ok(None)` when its backend
    /// cannot renew it (then it must be issued again).
    pub async fn renew(&self, lease_id: &str, increment: u64) -> anyhow::Result<Option<Value>> {
        let resp = self
            .post(&format!("/v1/credentials/{lease_id}/renew"))
            .json(&json!({ "increment": increment }))
            .send()
            .await?;
        if resp.status().is_success() {
            return Ok(Some(resp.json().await?));
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if body["error"] == "not_renewable" {
            return Ok(None);
        }
        bail!(
            "renewing lease {lease_id}: {status} {}",
            body["message"].as_str().unwrap_or_default()
        )
    }

    /// Completes the task: the broker revokes every credential of it.
    pub async fn complete(&self) -> anyhow::Result<()> {
        let resp = self
            .post("/v1/tasks/complete")
            .json(&json!({}))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(refusal(resp, "completing the task").await);
        }
        Ok(())
    }
}
