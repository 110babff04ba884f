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
        required_unless_present_any = ["federated_token_file", "client_cert"]
    )]
    pub key_file: Option<PathBuf>,
    /// The key's algorithm.
    #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
    pub alg: String,
    /// A token from a trusted issuer instead of a key (Kubernetes or CI
    /// workload identity), read afresh at every task open.
    #[arg(long, conflicts_with_all = ["key_file", "client_cert"])]
    pub federated_token_file: Option<PathBuf>,
    /// A client certificate (PEM; an X.509-SVID) to authenticate with over
    /// the broker's mTLS listener (`tls_client_auth`) instead of a key; the
    /// session is bound to it, so every call presents it.
    #[arg(long, conflicts_with = "key_file", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8 PEM).
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// CA certificates (PEM) to trust for the broker's TLS certificate,
    /// besides the system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Bind the session token to a key made for this run and never written
    /// (DPoP, RFC 9449): every call carries a fresh proof, so the token
    /// alone, copied elsewhere, is refused.
    #[arg(long)]
    pub dpop: bool,
}

/// An open task.
pub struct Session {
    http: reqwest::Client,
    server: String,
    /// The broker's `issuer`: DPoP proofs name URLs under it.
    issuer: String,
    /// `Bearer`, or `DPoP` for a token bound to `dpop`.
    token_type: String,
    dpop: Option<crate::identity::dpop::ProofKey>,
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
            .field("token_type", &self.token_type)
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

/// The HTTP client, presenting the agent's certificate when it has one.
fn client_for(args: &AgentArgs) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(path) = &args.ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("`{}` holds no PEM certificate", path.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
        let mut pem =
            std::fs::read(cert).with_context(|| format!("reading `{}`", cert.display()))?;
        pem.extend(std::fs::read(key).with_context(|| format!("reading `{}`", key.display()))?);
        // Say which files, never what is in them.
        let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
            anyhow::anyhow!(
                "`{}` and `{}` are not a PEM certificate and its PKCS#8 key",
                cert.display(),
                key.display()
            )
        })?;
        b = b.identity(identity);
    }
    Ok(b.build()?)
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
        let http = client_for(args)?;
        let server = args.server.trim_end_matches('/').to_owned();
        // The assertion's audience is the token endpoint the broker
        // announces (RFC 8414), and DPoP proofs name URLs under its issuer.
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
            .context("the broker announces no token_endpoint")?
            .to_owned();
        let issuer = meta["issuer"]
            .as_str()
            .context("the broker announces no issuer")?
            .trim_end_matches('/')
            .to_owned();
        let dpop = if args.dpop {
            Some(
                crate::identity::dpop::ProofKey::generate()
                    .map_err(|e| anyhow::anyhow!("making the DPoP key: {e}"))?,
            )
        } else {
            None
        };
        let mut form: Vec<(&str, String)> = vec![("task", task.to_owned())];
        if let Some(t) = ttl {
            form.push(("ttl", t.to_string()));
        }
        if let Some(path) = &args.federated_token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading `{}`", path.display()))?;
            form.push(("grant_type", crate::broker::JWT_BEARER_GRANT.to_owned()));
            form.push(("assertion", token.trim().to_owned()));
        } else if args.client_cert.is_some() {
            // RFC 8705 `tls_client_auth`: the certificate is the proof.
            form.push(("grant_type", "client_credentials".to_owned()));
            form.push(("client_id", args.agent.clone()));
        } else {
            let path = args.key_file.as_ref().context("give --key-file")?;
            let key = SecretString::from(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading `{}`", path.display()))?,
            );
            let assertion = crate::identity::sign_client_assertion(
                &key,
                &args.alg,
                None,
                &args.agent,
                &audience,
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
        let mut req = http.post(format!("{server}/oauth/token")).form(&form);
        if let Some(k) = &dpop {
            let proof = k
                .proof("POST", &audience, None)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            req = req.header("DPoP", proof);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the broker at {server}"))?;
        if !resp.status().is_success() {
            return Err(refusal(resp, "opening the task").await);
        }
        let v: Value = resp.json().await?;
        let token_type = v["token_type"].as_str().unwrap_or("Bearer").to_owned();
        if dpop.is_some() && token_type != "DPoP" {
            bail!("the broker did not bind the session to the DPoP key (token_type {token_type})");
        }
        Ok(Self {
            http,
            server,
            issuer,
            token_type,
            dpop,
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

    /// A session known from before (`credential-process`'s cache), on the
    /// same connection settings (a certificate-bound one needs its
    /// certificate).
    pub fn resume(args: &AgentArgs, token: SecretString, task_id: String) -> anyhow::Result<Self> {
        let server = args.server.trim_end_matches('/').to_owned();
        Ok(Self {
            http: client_for(args)?,
            issuer: server.clone(),
            server,
            token_type: "Bearer".into(),
            dpop: None,
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

    /// A call with the session token, and a DPoP proof when it is bound.
    fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        let token = self.token.expose_secret();
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.server))
            .header(
                reqwest::header::AUTHORIZATION,
                format!("{} {token}", self.token_type),
            );
        if let Some(k) = &self.dpop {
            let url = format!("{}{path}", self.issuer);
            let proof = k
                .proof(method.as_str(), &url, Some(token))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            req = req.header("DPoP", proof);
        }
        Ok(req)
    }

    fn post(&self, path: &str) -> anyhow::Result<reqwest::RequestBuilder> {
        self.call(reqwest::Method::POST, path)
    }

    /// Asks for `scope` for `ttl` seconds (the scope's default when `None`).
    pub async fn ask(&self, scope: &str, ttl: Option<u64>) -> anyhow::Result<Asked> {
        let mut body = json!({ "scope": scope });
        if let Some(t) = ttl {
            body["ttl"] = t.into();
        }
        let resp = self.post("/v1/credentials")?.json(&body).send().await?;
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
        super::note!(
            "keygate: scope `{scope}` waits for approval {approval_id} (up to {} s)",
            wait.as_secs()
        );
        let deadline = tokio::time::Instant::now() + wait;
        // The last poll the broker did not answer, while none has since.
        let mut unanswered: Option<reqwest::Error> = None;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                if let Some(e) = unanswered {
                    return Err(anyhow::Error::new(e).context(format!(
                        "approval {approval_id} for scope `{scope}`: the broker was unreachable when the wait ran out"
                    )));
                }
                bail!("approval {approval_id} for scope `{scope}` was not decided in time");
            }
            let poll = left.as_secs().clamp(1, 30);
            let sent = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/approvals/{approval_id}?wait={poll}"),
                )?
                .send()
                .await;
            let resp = match sent {
                // The broker restarting (it answers a long-poll `pending`
                // as it stops, then refuses connections, or a kept-alive
                // one is found closed): the approval waits in its store,
                // so ask again until the deadline.
                Err(e) if crate::cli::client::Client::no_answer(&e) => {
                    unanswered = Some(e);
                    tokio::time::sleep(Duration::from_secs(1).min(left)).await;
                    continue;
                }
                sent => sent?,
            };
            unanswered = None;
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
            .post(&format!("/v1/approvals/{approval_id}/redeem"))?
            .send()
            .await?;
        if resp.status().as_u16() != 201 && !resp.status().is_success() {
            return Err(refusal(resp, &format!("redeeming approval {approval_id}")).await);
        }
        Ok(resp.json().await?)
    }

    /// Renews a lease for `increment` seconds; `Ok(None)` when it must be
    /// issued again instead: its backend cannot renew it, or it is no
    /// longer live (expired, released: 409, "request a new credential").
    pub async fn renew(&self, lease_id: &str, increment: u64) -> anyhow::Result<Option<Value>> {
        let resp = self
            .post(&format!("/v1/credentials/{lease_id}/renew"))?
            .json(&json!({ "increment": increment }))
            .send()
            .await?;
        if resp.status().is_success() {
            return Ok(Some(resp.json().await?));
        }
        let refused = refusal(resp, &format!("renewing lease {lease_id}")).await;
        match refused.downcast_ref::<Refused>() {
            Some(r) if r.code == "not_renewable" || r.status == 409 => Ok(None),
            _ => Err(refused),
        }
    }

    /// Releases (revokes) one credential before the task ends.
    pub async fn release(&self, lease_id: &str) -> anyhow::Result<()> {
        let resp = self
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/credentials/{lease_id}"),
            )?
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(refusal(resp, &format!("releasing lease {lease_id}")).await);
        }
        Ok(())
    }

    /// Completes the task: the broker revokes every credential of it.
    pub async fn complete(&self) -> anyhow::Result<()> {
        let resp = self
            .post("/v1/tasks/complete")?
            .json(&json!({}))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(refusal(resp, "completing the task").await);
        }
        Ok(())
    }
}
