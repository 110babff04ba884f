//! Delegation end to end (RFC 8693): `demo-agent` opens a task, hands
//! `demo-subagent` a narrower slice of it, the sub-agent obtains an
//! X.509-SVID in its own child task, and ending the parent task ends the
//! child and revokes its certificate.
//!
//! Start the broker (`scripts/serve`, fresh `./data`), then:
//! `cargo run --example delegation`.

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// A fresh client assertion for `agent`, signed with its demo key.
fn assertion(agent: &str, key: &str, token_endpoint: &str) -> anyhow::Result<String> {
    let pem = std::fs::read(key).with_context(|| format!("reading {key}"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({
        "iss": agent, "sub": agent, "aud": token_endpoint,
        "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
    });
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&pem)?,
    )?)
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("KEYGATE_SERVER").unwrap_or_else(|_| "http://127.0.0.1:8470".into());
    let http = reqwest::Client::new();
    let token_endpoint = format!("{server}/oauth/token");
    // Assertions name the broker as it names itself (RFC 8414 metadata),
    // which differs from `server` behind a proxy or on another port.
    let meta = check(
        http.get(format!("{server}/.well-known/oauth-authorization-server"))
            .send()
            .await
            .context("is the broker running? start it with `scripts/serve`")?,
    )
    .await?;
    let audience = meta["token_endpoint"]
        .as_str()
        .context("no token_endpoint in the broker's metadata")?
        .to_owned();

    // 1. The orchestrator opens its own task.
    let parent = check(
        http.post(&token_endpoint)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "demo-agent"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                (
                    "client_assertion",
                    &assertion("demo-agent", "examples/keys/demo-agent.pem", &audience)?,
                ),
                ("task", "demo: orchestrate a report"),
            ])
            .send()
            .await
            .context("is the broker running? start it with `scripts/serve`")?,
    )
    .await?;
    let parent_token = parent["access_token"].as_str().context("no token")?;
    println!("orchestrator task {}", parent["task_id"]);

    // 2. The sub-agent proves who it is and exchanges the parent's token for
    //    a child task limited to X.509-SVIDs.
    let child = check(
        http.post(&token_endpoint)
            .form(&[
                ("grant_type", EXCHANGE),
                ("subject_token", parent_token),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                ),
                (
                    "actor_token",
                    &assertion(
                        "demo-subagent",
                        "examples/keys/demo-subagent.pem",
                        &audience,
                    )?,
                ),
                ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("scope", "x509-svid"),
            ])
            .send()
            .await?,
    )
    .await?;
    let child_token = child["access_token"].as_str().context("no token")?;
    println!("sub-agent task {} (delegated)", child["task_id"]);

    // 3. The sub-agent works within its slice: an SVID yes, anything else no.
    let cred = check(
        http.post(format!("{server}/v1/credentials"))
            .bearer_auth(child_token)
            .json(&json!({ "scope": "x509-svid", "ttl": 300 }))
            .send()
            .await?,
    )
    .await?;
    println!(
        "sub-agent holds {} as {}",
        cred["lease_id"], cred["credential"]["spiffe_id"]
    );
    let wider = http
        .post(format!("{server}/v1/credentials"))
        .bearer_auth(child_token)
        .json(&json!({ "scope": "jwt-svid" }))
        .send()
        .await?;
    println!(
        "sub-agent asking outside its slice gets: {}",
        wider.status()
    );

    // 4. The orchestrator finishes: the child task ends with it.
    check(
        http.post(format!("{server}/v1/tasks/complete"))
            .bearer_auth(parent_token)
            .send()
            .await?,
    )
    .await?;
    let after = http
        .get(format!("{server}/v1/session"))
        .bearer_auth(child_token)
        .send()
        .await?;
    println!(
        "after the parent completes, the sub-agent's token gets: {}",
        after.status()
    );
    Ok(())
}
