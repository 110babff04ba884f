//! Vault `token` scopes: issuance through Keygate beside OpenBao's own
//! `auth/token/create`, measured in the same run at the same concurrency.
//!
//! Starts OpenBao with raft storage (durable, like Keygate's SQLite),
//! initialised and unsealed by API, with an AppRole for Keygate, and the
//! release `keygate` binary with a vault `token` scope. Then, for a fixed
//! duration each: N clients create child tokens directly with the AppRole's
//! token (the same policies Keygate uses), and N agent tasks request the
//! vault token scope through `POST /v1/credentials`.
//!
//! Run with: scripts/bench vault_tokens   (or: cargo bench --bench vault_tokens)
//! Env: BENCH_SECS (measured seconds per side, default 10),
//!      BENCH_CLIENTS (default 32).
//! Writes raw figures to target/bench/vault_tokens.json.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../tests/common/peers.rs"]
mod peers;

use std::sync::Arc;
use std::time::Duration;

use common::{bench_secs, load, open_task, start, summary, temp_dir, write_config, write_report};
use peers::{Bao, Storage};
use secrecy::SecretString;
use serde_json::json;

const POLICY: &str = r#"
path "auth/token/create" { capabilities = ["create", "update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/renew-accessor" { capabilities = ["update"] }
"#;

/// Configures the AppRole; returns role id, a secret id, and a token from
/// an AppRole login (for the direct side).
async fn configure(bao: &Bao) -> (String, String, String) {
    bao.api(
        "PUT",
        "sys/policies/acl/keygate",
        Some(json!({ "policy": POLICY })),
    )
    .await;
    bao.api(
        "PUT",
        "sys/policies/acl/agent-reader",
        Some(json!({ "policy": "path \"secret/data/agent/*\" { capabilities = [\"read\"] }" })),
    )
    .await;
    bao.api(
        "POST",
        "sys/auth/approle",
        Some(json!({ "type": "approle" })),
    )
    .await;
    bao.api("POST", "auth/approle/role/keygate", Some(json!({
        "token_policies": ["keygate", "agent-reader"], "token_ttl": "2h", "token_max_ttl": "24h",
    }))).await;
    let role_id = bao
        .api("GET", "auth/approle/role/keygate/role-id", None)
        .await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = |v: serde_json::Value| v["data"]["secret_id"].as_str().unwrap().to_owned();
    let keygate_secret = secret(
        bao.api(
            "POST",
            "auth/approle/role/keygate/secret-id",
            Some(json!({})),
        )
        .await,
    );
    let direct_secret = secret(
        bao.api(
            "POST",
            "auth/approle/role/keygate/secret-id",
            Some(json!({})),
        )
        .await,
    );
    let (_, login) = bao
        .request(
            "POST",
            "auth/approle/login",
            None,
            Some(json!({ "role_id": role_id, "secret_id": direct_secret })),
        )
        .await;
    let token = login["auth"]["client_token"].as_str().unwrap().to_owned();
    (role_id, keygate_secret, token)
}

/// OpenBao directly: the same request Keygate makes, minus the broker.
async fn direct(addr: &str, token: String, clients: usize, secs: u64) -> Vec<Duration> {
    let (h, url) = (
        reqwest::Client::new(),
        format!("{addr}/v1/auth/token/create"),
    );
    load(clients, secs, move |i| {
        let body = json!({
            "policies": ["agent-reader"], "ttl": "600s", "explicit_max_ttl": "3600s", "renewable": true,
            "display_name": "keygate-bench-agent",
            "meta": { "agent": "bench-agent", "task": "tk_direct", "scope": "vault-token", "keygate_lease": format!("direct-{i}") },
        });
        let req = h.post(&url).header("X-Vault-Token", &token).json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "auth/token/create failed");
            let _ = r.bytes().await;
        }
    })
    .await
}

/// Through Keygate: one agent task per client, `POST /v1/credentials`.
async fn through_keygate(
    base: &str,
    key: &SecretString,
    kid: &str,
    clients: usize,
    secs: u64,
) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let mut tokens = Vec::new();
    for _ in 0..clients {
        tokens.push(open_task(&http, base, key, kid).await);
    }
    let (tokens, url) = (Arc::new(tokens), format!("{base}/v1/credentials"));
    let body = json!({ "scope": "vault-token", "ttl": 600 });
    load(clients, secs, move |i| {
        let req = http.post(&url).bearer_auth(&tokens[i]).json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 201, "credential request failed");
            let _ = r.bytes().await;
        }
    })
    .await
}

fn report(clients: usize, secs: u64, direct: &[Duration], keygate: &[Duration]) {
    let (d, k) = (summary(direct, secs), summary(keygate, secs));
    let ratio =
        k["per_sec"].as_f64().unwrap() / d["per_sec"].as_f64().unwrap().max(f64::MIN_POSITIVE);
    println!(
        "{:<34} {:>9} {:>10} {:>9} {:>9}",
        format!("{clients} clients, {secs} s"),
        "requests",
        "per s",
        "p50 ms",
        "p99 ms"
    );
    for (name, s) in [
        ("openbao auth/token/create", &d),
        ("keygate POST /v1/credentials", &k),
    ] {
        println!(
            "{name:<34} {:>9} {:>10.1} {:>9.2} {:>9.2}",
            s["requests"],
            s["per_sec"].as_f64().unwrap(),
            s["p50_ms"].as_f64().unwrap(),
            s["p99_ms"].as_f64().unwrap()
        );
    }
    println!("keygate / openbao rate: {ratio:.2}");
    write_report(
        "vault_tokens",
        &json!({
            "benchmark": "vault_token_scope_vs_openbao_token_create",
            "openbao_storage": "raft", "keygate_store": "sqlite wal synchronous=full",
            "clients": clients, "openbao_direct": d, "keygate": k, "keygate_over_openbao": ratio,
        }),
    );
}

#[tokio::main]
async fn main() {
    let secs = bench_secs();
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let bao = Bao::start(Storage::Raft).await;
    let (role_id, secret_id, direct_token) = configure(&bao).await;
    let dir = temp_dir("keygate-bench-vault");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret-id"), &secret_id).unwrap();
    let extra = format!(
        "[providers.vault]\nkind = \"vault\"\naddress = \"{}\"\nauth = {{ method = \"approle\", role_id = \"{role_id}\", secret_id_file = \"{}\" }}\n\n[[scopes]]\nname = \"vault-token\"\nprovider = \"vault\"\nmax_ttl_secs = 3600\nparams = {{ kind = \"token\", policies = [\"agent-reader\"] }}\n",
        bao.addr,
        dir.join("secret-id").display()
    );
    let (key, public) = keygate::identity::generate_agent_key("ES256").unwrap();
    write_config(&dir, &public.jwk, &["vault"], &extra);
    let server = start(&dir);
    let d = direct(&bao.addr, direct_token, clients, secs).await;
    let k = through_keygate(&server.base, &key, &public.kid, clients, secs).await;
    drop(server);
    report(clients, secs, &d, &k);
    let _ = std::fs::remove_dir_all(&dir);
}
