//! Keygate's footing in an OpenBao, set up by API: the policy Keygate's own
//! token holds, the policy agents' tokens get, and an AppRole for Keygate.
//! Shared by the integration tests (`vault.rs`) and the benchmark suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use serde_json::json;

use super::peers::Bao;

/// The policy a `token` scope grants agents (Keygate's own token must hold
/// it too: Vault lets a token create children only with its own policies).
pub const AGENT_POLICY: &str = "agent-reader";
/// The token role agents' tokens are created against: orphans, so they live
/// exactly their lease whatever happens to Keygate's own login.
pub const TOKEN_ROLE: &str = "keygate-agent";
/// What Keygate needs: `auth/token/accessors` is a sudo path (orphan search).
pub const KEYGATE_POLICY: &str = r#"
path "auth/token/create" { capabilities = ["create", "update"] }
path "auth/token/create/keygate-agent" { capabilities = ["create", "update"] }
path "auth/token/roles/keygate-agent" { capabilities = ["read"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "auth/token/lookup-accessor" { capabilities = ["update"] }
path "auth/token/renew-accessor" { capabilities = ["update"] }
path "auth/token/accessors" { capabilities = ["list", "sudo"] }
path "database/creds/*" { capabilities = ["read"] }
path "database/roles/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "sys/leases/renew" { capabilities = ["update"] }
path "pki/issue/agent" { capabilities = ["create", "update"] }
path "pki/revoke" { capabilities = ["create", "update"] }
path "secret/data/team/*" { capabilities = ["read"] }
"#;

/// Writes both policies and enables AppRole auth.
pub async fn keygate_footing(bao: &Bao) {
    bao.api(
        "PUT",
        &format!("sys/policies/acl/{AGENT_POLICY}"),
        Some(json!({ "policy": "path \"secret/data/agent/*\" { capabilities = [\"read\"] }" })),
    )
    .await;
    bao.api(
        "PUT",
        "sys/policies/acl/keygate",
        Some(json!({ "policy": KEYGATE_POLICY })),
    )
    .await;
    bao.api(
        "POST",
        "sys/auth/approle",
        Some(json!({ "type": "approle" })),
    )
    .await;
    bao.api(
        "POST",
        &format!("auth/token/roles/{TOKEN_ROLE}"),
        Some(json!({
            "allowed_policies": [AGENT_POLICY],
            "orphan": true,
            "renewable": true,
        })),
    )
    .await;
}

/// Creates AppRole `name` with Keygate's policies; returns role id and a
/// fresh secret id.
pub async fn configure_approle(bao: &Bao, name: &str, token_ttl: &str) -> (String, String) {
    bao.api(
        "POST",
        &format!("auth/approle/role/{name}"),
        Some(json!({
            "token_policies": ["keygate", AGENT_POLICY],
            "token_ttl": token_ttl,
            "token_max_ttl": "24h",
        })),
    )
    .await;
    let role = bao
        .api("GET", &format!("auth/approle/role/{name}/role-id"), None)
        .await;
    let secret = bao
        .api(
            "POST",
            &format!("auth/approle/role/{name}/secret-id"),
            Some(json!({})),
        )
        .await;
    (
        role["data"]["role_id"].as_str().unwrap().to_owned(),
        secret["data"]["secret_id"].as_str().unwrap().to_owned(),
    )
}
