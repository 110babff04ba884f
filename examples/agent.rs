// Run with: cargo run --example agent   (with `cargo run -- serve` running)
//
// Plays the demo agent end to end: authenticates with private_key_jwt,
// obtains an X.509-SVID from the built-in CA, checks it, completes the task,
// and shows that the certificate is revoked and the session token is dead.
//
// Environment: KEYGATE_SERVER (default http://127.0.0.1:8470),
// AGENT_KEY (default examples/keys/demo-agent.pem), AGENT_ID (default demo-agent).

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("KEYGATE_SERVER").unwrap_or_else(|_| "http://127.0.0.1:8470".into());
    let key_path =
        std::env::var("AGENT_KEY").unwrap_or_else(|_| "examples/keys/demo-agent.pem".into());
    let agent = std::env::var("AGENT_ID").unwrap_or_else(|_| "demo-agent".into());
    let http = reqwest::Client::new();

    // 1. Discover the token endpoint (RFC 8414) and sign a client assertion.
    let meta: Value = http
        .get(format!("{server}/.well-known/oauth-authorization-server"))
        .send()
        .await
        .context("is the broker running? start it with `cargo run -- serve`")?
        .json()
        .await?;
    let token_endpoint = meta["token_endpoint"]
        .as_str()
        .context("no token_endpoint")?;
    let pem = std::fs::read(&key_path).with_context(|| format!("reading {key_path}"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": agent, "sub": agent, "aud": token_endpoint,
        "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
    });
    let assertion = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&pem)?,
    )?;

    // 2. Open a task.
    let resp = http
        .post(format!("{server}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", agent.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("task", "demo: fetch a workload certificate"),
            ("ttl", "600"),
        ])
        .send()
        .await?;
    let token: Value = check(resp).await?;
    let session = token["access_token"]
        .as_str()
        .context("no access_token")?
        .to_owned();
    println!(
        "task {} opened, session expires in {}s",
        token["task_id"], token["expires_in"]
    );

    // 3. Ask for an X.509-SVID.
    let resp = http
        .post(format!("{server}/v1/credentials"))
        .bearer_auth(&session)
        .json(&json!({ "scope": "x509-svid", "ttl": 300 }))
        .send()
        .await?;
    let cred: Value = check(resp).await?;
    let c = &cred["credential"];
    println!("lease {} until {}", cred["lease_id"], cred["expires_at"]);
    println!("  spiffe id: {}", c["spiffe_id"]);
    println!("  serial:    {}", c["serial"]);
    println!(
        "  private key: {} bytes (kept in memory, not shown)",
        c["private_key"].as_str().map_or(0, str::len)
    );
    let cert = c["certificate"].as_str().context("no certificate")?;
    let verify = |cert: String| {
        let http = http.clone();
        let url = format!("{server}/v1/providers/ca/verify");
        async move {
            let v: Value = http
                .post(url)
                .json(&json!({ "x509_svid": cert }))
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(v)
        }
    };
    println!("  relying party check: {}", verify(cert.to_owned()).await?);

    // 3b. With ASK_SENSITIVE=1, ask for the sensitive `payments-ca` scope: it
    //     waits for a human (`keygate approvals approve <id>` as an approver),
    //     then the task redeems it once.
    if std::env::var("ASK_SENSITIVE").is_ok() {
        let resp = http
            .post(format!("{server}/v1/credentials"))
            .bearer_auth(&session)
            .json(&json!({ "scope": "payments-ca", "ttl": 300, "justification": "demo: settle invoice 42" }))
            .send()
            .await?;
        let pending: Value = check(resp).await?;
        let id = pending["approval_id"].as_str().context("no approval_id")?;
        println!("approval {id} pending; as an approver run:");
        println!("  KEYGATE_TOKEN=dev-approver-token cargo run -- approvals approve {id}");
        let mut status = pending["status"].clone();
        for _ in 0..10 {
            let v: Value = check(
                http.get(format!("{server}/v1/approvals/{id}?wait=30"))
                    .bearer_auth(&session)
                    .send()
                    .await?,
            )
            .await?;
            status = v["status"].clone();
            if status != "pending" {
                break;
            }
        }
        if status == "approved" {
            let resp = http
                .post(format!("{server}/v1/approvals/{id}/redeem"))
                .bearer_auth(&session)
                .send()
                .await?;
            let cred: Value = check(resp).await?;
            println!(
                "approved: lease {} until {}",
                cred["lease_id"], cred["expires_at"]
            );
        } else {
            println!("approval ended {status}: no credential");
        }
    }

    // 4. Complete the task: every lease is revoked, the token stops working.
    let resp = http
        .post(format!("{server}/v1/tasks/complete"))
        .bearer_auth(&session)
        .send()
        .await?;
    println!("task completed: {}", check(resp).await?);
    println!(
        "  relying party check now: {}",
        verify(cert.to_owned()).await?
    );
    let after = http
        .post(format!("{server}/v1/credentials"))
        .bearer_auth(&session)
        .json(&json!({ "scope": "x509-svid" }))
        .send()
        .await?;
    println!("  the old session token now gets: {}", after.status());
    Ok(())
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}
