//! OpenBao configured for Keygate through its HTTP API: the database engine
//! on a throwaway PostgreSQL, PKI with a SPIFFE role, KV v2, and an AppRole
//! for Keygate with a policy allowing exactly what the provider needs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::bao_setup::configure_approle;
use super::peers::{Bao, Postgres, Storage};

pub const SPIFFE_TD: &str = "example.org";
pub const KV_PATH: &str = "team/db";
pub const DB_ROLE: &str = "app";

/// A configured OpenBao + PostgreSQL pair, and Keygate's AppRole login.
pub struct VaultPeers {
    pub bao: Bao,
    pub pg: Postgres,
    pub role_id: String,
    /// Holds the AppRole secret id (mode 0600), as Keygate's config names it.
    pub secret_id_file: PathBuf,
    /// The values stored at `secret/team/db`.
    pub kv_values: Value,
    dir: PathBuf,
}

impl VaultPeers {
    pub async fn start(storage: Storage) -> Self {
        let (bao, pg) = tokio::join!(Bao::start(storage), Postgres::start());
        let dir =
            std::env::temp_dir().join(format!("keygate-approle-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Typed values, and a key named like one of Keygate's own fields.
        let kv_values = json!({
            "password": format!("kv-pw-{}", uuid::Uuid::new_v4().simple()),
            "api_key": format!("kv-key-{}", uuid::Uuid::new_v4().simple()),
            "port": 5432,
            "replicas": { "primary": "db-1", "count": 2 },
            "expires_at": "never-trust-this",
        });
        configure_engines(&bao, &pg, &kv_values).await;
        let (role_id, secret_id) = configure_approle(&bao, "keygate", "1h").await;
        let secret_id_file = dir.join("secret-id");
        write_secret(&secret_id_file, &secret_id);
        Self {
            bao,
            pg,
            role_id,
            secret_id_file,
            kv_values,
            dir,
        }
    }

    /// The `[providers.vault]` table for Keygate's config.
    pub fn provider_toml(&self, name: &str) -> String {
        format!(
            "[providers.{name}]\nkind = \"vault\"\naddress = \"{}\"\nmax_concurrent_revocations = 4\nrequest_timeout_secs = 3\ntoken_role = \"keygate-agent\"\nauth = {{ method = \"approle\", role_id = \"{}\", secret_id_file = \"{}\" }}\n",
            self.bao.addr,
            self.role_id,
            self.secret_id_file.display()
        )
    }

    /// The provider as a JSON config value (for opening it in-process).
    pub fn provider_json(&self) -> Value {
        json!({
            "address": self.bao.addr,
            "request_timeout_secs": 3,
            "token_role": super::bao_setup::TOKEN_ROLE,
            "auth": {
                "method": "approle",
                "role_id": self.role_id,
                "secret_id_file": self.secret_id_file,
            },
        })
    }

    /// Whether `token` still works (`auth/token/lookup-self`).
    pub async fn token_works(&self, token: &str) -> bool {
        self.bao
            .request("GET", "auth/token/lookup-self", Some(token), None)
            .await
            .0
            == 200
    }

    /// `(accessor, lookup data)` of every live token in OpenBao.
    pub async fn live_tokens(&self) -> Vec<(String, Value)> {
        let (status, v) = self.bao.try_api("LIST", "auth/token/accessors", None).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "{v}");
        let mut out = Vec::new();
        for a in v["data"]["keys"].as_array().unwrap() {
            let (s, meta) = self
                .bao
                .try_api(
                    "POST",
                    "auth/token/lookup-accessor",
                    Some(json!({ "accessor": a })),
                )
                .await;
            if s == 200 {
                out.push((a.as_str().unwrap().to_owned(), meta["data"].clone()));
            }
        }
        out
    }

    /// The `keygate_lease` metadata of every live token Keygate minted.
    pub async fn live_keygate_tokens(&self) -> Vec<String> {
        self.live_tokens()
            .await
            .into_iter()
            .filter_map(|(_, d)| d["meta"]["keygate_lease"].as_str().map(str::to_owned))
            .collect()
    }

    /// Live Vault leases of the database role.
    pub async fn live_db_leases(&self) -> Vec<String> {
        let path = format!("sys/leases/lookup/database/creds/{DB_ROLE}/");
        let (status, v) = self.bao.try_api("LIST", &path, None).await;
        if status == 404 {
            return Vec::new();
        }
        assert_eq!(status, 200, "{v}");
        v["data"]["keys"]
            .as_array()
            .map(|a| a.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    }

    /// The remaining ttl Vault itself gives each live database lease
    /// (`sys/leases/lookup`), in seconds.
    pub async fn db_lease_ttls(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for key in self.live_db_leases().await {
            let id = format!("database/creds/{DB_ROLE}/{key}");
            let v = self
                .bao
                .api(
                    "PUT",
                    "sys/leases/lookup",
                    Some(serde_json::json!({ "lease_id": id })),
                )
                .await;
            out.push(v["data"]["ttl"].as_u64().unwrap_or_else(|| panic!("{v}")));
        }
        out
    }

    /// Whether Vault lists the certificate `serial` as revoked.
    pub async fn cert_revoked(&self, serial: &str) -> bool {
        let v = self
            .bao
            .api("GET", &format!("pki/cert/{serial}"), None)
            .await;
        v["data"]["revocation_time"].as_i64().unwrap_or(0) > 0
    }
}

impl Drop for VaultPeers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn write_secret(path: &Path, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, value).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn configure_engines(bao: &Bao, pg: &Postgres, kv: &Value) {
    bao.api(
        "POST",
        "sys/mounts/database",
        Some(json!({ "type": "database" })),
    )
    .await;
    bao.api(
        "POST",
        "database/config/pg",
        Some(json!({
            "plugin_name": "postgresql-database-plugin",
            "allowed_roles": "*",
            "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable", pg.port),
            "username": "postgres",
            "password": pg.password,
        })),
    )
    .await;
    bao.api(
        "POST",
        &format!("database/roles/{DB_ROLE}"),
        Some(json!({
            "db_name": "pg",
            "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"],
            "default_ttl": "1h",
            "max_ttl": "2h",
        })),
    )
    .await;
    bao.api(
        "POST",
        "sys/mounts/pki",
        Some(json!({ "type": "pki", "config": { "max_lease_ttl": "87600h" } })),
    )
    .await;
    bao.api(
        "POST",
        "pki/root/generate/internal",
        Some(json!({ "common_name": "keygate-test-root", "ttl": "87600h" })),
    )
    .await;
    bao.api(
        "POST",
        "pki/roles/agent",
        Some(json!({
            "allowed_uri_sans": [format!("spiffe://{SPIFFE_TD}/agent/*")],
            "client_flag": true, "server_flag": false, "require_cn": false,
            "key_type": "ec", "key_bits": 256, "max_ttl": "2h",
        })),
    )
    .await;
    if !bao.storage.is_dev() {
        // A dev server mounts KV v2 at `secret/` by itself.
        bao.api(
            "POST",
            "sys/mounts/secret",
            Some(json!({ "type": "kv", "options": { "version": "2" } })),
        )
        .await;
    }
    // A freshly mounted KV v2 engine answers 400 ("upgrading from
    // non-versioned to versioned data") for a moment: wait for it.
    let path = format!("secret/data/{KV_PATH}");
    let body = json!({ "data": kv });
    super::eventually("the kv v2 mount to accept writes", || async {
        let (status, v) = bao.try_api("POST", &path, Some(body.clone())).await;
        match status {
            200..=299 => Some(()),
            400 if v.to_string().contains("pgrading") => None,
            _ => panic!("POST {path}: {status} {v}"),
        }
    })
    .await;
    super::bao_setup::keygate_footing(bao).await;
}

/// A broker config with the default CA scopes, a permit for vault scopes,
/// and the tables of `config/examples/vault.toml` pointed at these peers (so
/// the shipped example is what the tests run).
pub fn broker_setup(peers: &VaultPeers) -> super::Setup {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/vault.toml");
    let mut example: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
    let vault = example
        .get_mut("providers")
        .and_then(|p| p.get_mut("vault"))
        .and_then(toml::Value::as_table_mut)
        .expect("the example has [providers.vault]");
    vault.insert("address".into(), peers.bao.addr.clone().into());
    vault.insert("request_timeout_secs".into(), 3.into());
    let auth = vault
        .get_mut("auth")
        .and_then(toml::Value::as_table_mut)
        .unwrap();
    auth.insert("role_id".into(), peers.role_id.clone().into());
    auth.insert(
        "secret_id_file".into(),
        peers.secret_id_file.display().to_string().into(),
    );
    super::Setup {
        policies: vec![super::config::permit_provider("vault")],
        scopes: Some(format!(
            "{}\n{}",
            toml::to_string(&example).unwrap(),
            super::DEFAULT_SCOPES
        )),
        ..super::Setup::default()
    }
}
