//! The provider conformance suite against a real OpenBao (and PostgreSQL for
//! the database engine), plus what only the Vault provider does: orphans
//! found by metadata, renewal capped by the broker's limit, and Keygate's own
//! token renewed and replaced.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::bao_setup::{AGENT_POLICY, configure_approle};
use common::peers::Storage;
use common::vault::{DB_ROLE, KV_PATH, SPIFFE_TD, VaultPeers, write_secret};
use keygate_provider_api::{
    IssueRequest, Provider, RenewRequest, RevokeHandle, RevokeOutcome, RevokeRequest, ScopeSpec,
    SecretResolver,
};
use keygate_provider_testkit::{Case, Check, run, test_agent};
use keygate_provider_vault::{VaultConfig, VaultProvider};
use serde_json::{Value, json};
use time::OffsetDateTime;

fn provider(peers: &VaultPeers) -> VaultProvider {
    let cfg: VaultConfig = serde_json::from_value(peers.provider_json()).unwrap();
    VaultProvider::open(cfg, SecretResolver::new()).unwrap()
}

fn scope(name: &str, params: Value) -> ScopeSpec {
    ScopeSpec {
        name: name.into(),
        max_ttl: Duration::from_secs(600),
        params,
    }
}

fn case(scope: ScopeSpec, never_issued: Value) -> Case {
    Case {
        scope,
        request_params: Value::Null,
        ttl: Duration::from_secs(120),
        never_issued: Some(RevokeHandle(never_issued)),
    }
}

struct TokenCheck<'a>(&'a VaultPeers);

impl Check for TokenCheck<'_> {
    async fn works(&self, c: &Value) -> Result<bool, String> {
        Ok(self
            .0
            .token_works(c["token"].as_str().ok_or("no token")?)
            .await)
    }

    async fn backend_ttl(&self, c: &Value) -> Option<Duration> {
        let (s, v) = self
            .0
            .bao
            .request("GET", "auth/token/lookup-self", c["token"].as_str(), None)
            .await;
        (s == 200).then(|| Duration::from_secs(v["data"]["ttl"].as_u64().unwrap()))
    }
}

struct DbCheck<'a>(&'a VaultPeers);

impl Check for DbCheck<'_> {
    async fn works(&self, c: &Value) -> Result<bool, String> {
        let user = c["username"].as_str().ok_or("no username")?;
        let pw = c["password"].as_str().ok_or("no password")?;
        Ok(self.0.pg.can_login(user, pw).await)
    }

    /// Vault's own ttl of the live database lease (the kit holds one at a
    /// time when it asks).
    async fn backend_ttl(&self, _c: &Value) -> Option<Duration> {
        let ttls = self.0.db_lease_ttls().await;
        ttls.iter().max().map(|t| Duration::from_secs(*t))
    }
}

struct PkiCheck<'a>(&'a VaultPeers);

impl Check for PkiCheck<'_> {
    /// A relying party's view: not on Vault's revocation list.
    async fn works(&self, c: &Value) -> Result<bool, String> {
        Ok(!self
            .0
            .cert_revoked(c["serial"].as_str().ok_or("no serial")?)
            .await)
    }
}

struct KvCheck<'a>(&'a VaultPeers);

impl Check for KvCheck<'_> {
    async fn works(&self, c: &Value) -> Result<bool, String> {
        Ok(c["data"] == self.0.kv_values)
    }
}

#[tokio::test]
async fn every_scope_kind_conforms() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let p = provider(&peers);
    let token = case(
        scope(
            "vault-token",
            json!({ "kind": "token", "policies": [AGENT_POLICY] }),
        ),
        json!({ "kind": "token", "accessor": "never-issued-accessor" }),
    );
    let db = case(
        scope("vault-db", json!({ "kind": "database", "role": DB_ROLE })),
        json!({ "kind": "database", "lease_id": format!("database/creds/{DB_ROLE}/never-issued") }),
    );
    let pki = case(
        scope(
            "vault-pki",
            json!({ "kind": "pki", "role": "agent", "trust_domain": SPIFFE_TD }),
        ),
        json!({ "kind": "pki", "mount": "pki", "serial": "11:22:33:44" }),
    );
    let kv = case(
        scope("vault-kv", json!({ "kind": "kv", "path": KV_PATH })),
        json!({ "kind": "kv" }),
    );
    let mut failures = Vec::new();
    let reports = [
        ("token", run(&p, &token, &TokenCheck(&peers)).await),
        ("database", run(&p, &db, &DbCheck(&peers)).await),
        ("pki", run(&p, &pki, &PkiCheck(&peers)).await),
        ("kv", run(&p, &kv, &KvCheck(&peers)).await),
    ];
    for (kind, r) in reports {
        assert!(
            r.secrets_checked > 0 || !r.failed.is_empty(),
            "{kind}: no secret was checked"
        );
        failures.extend(r.failed.iter().map(|f| format!("{kind}: {f}")));
    }
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
    assert!(peers.live_keygate_tokens().await.is_empty());
    assert!(peers.live_db_leases().await.is_empty());
}

fn issue_req(scope: ScopeSpec, ttl: u64) -> IssueRequest {
    let lease_id = format!("ls_vault_{}", uuid::Uuid::new_v4().simple());
    IssueRequest {
        lease_id,
        task_id: "tk_vault_test".into(),
        agent: test_agent(),
        scope,
        ttl: Duration::from_secs(ttl),
        expires_at: OffsetDateTime::now_utc() + Duration::from_secs(ttl),
        request_params: Value::Null,
    }
}

fn orphan(req: &IssueRequest) -> RevokeRequest {
    RevokeRequest {
        lease_id: req.lease_id.clone(),
        scope: req.scope.clone(),
        handle: None,
        expires_at: req.expires_at,
    }
}

#[tokio::test]
async fn orphans_are_found_or_bounded() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let p = provider(&peers);
    // A token is found by its `keygate_lease` metadata and revoked.
    let req = issue_req(
        scope("t", json!({ "kind": "token", "policies": [AGENT_POLICY] })),
        120,
    );
    let issued = p.issue(&req).await.unwrap();
    let token = issued.credential.expose_to_agent()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = p.issue(&issue_req(req.scope.clone(), 120)).await.unwrap();
    let other_token = other.credential.expose_to_agent()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        p.revoke(&orphan(&req)).await.unwrap(),
        RevokeOutcome::Revoked
    );
    assert!(
        !peers.token_works(&token).await,
        "the orphan's token still works"
    );
    assert!(
        peers.token_works(&other_token).await,
        "another lease's token was revoked"
    );
    assert_eq!(
        p.revoke(&orphan(&req)).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
    // A certificate lives until the lease's expiry (it was asked for no more).
    let req = issue_req(
        scope(
            "c",
            json!({ "kind": "pki", "role": "agent", "trust_domain": SPIFFE_TD }),
        ),
        120,
    );
    assert_eq!(
        p.revoke(&orphan(&req)).await.unwrap(),
        RevokeOutcome::LivesUntil(req.expires_at)
    );
    // Database credentials are bounded by the role's max_ttl (2h).
    let req = issue_req(
        scope("d", json!({ "kind": "database", "role": DB_ROLE })),
        120,
    );
    let before = OffsetDateTime::now_utc();
    match p.revoke(&orphan(&req)).await.unwrap() {
        RevokeOutcome::LivesUntil(t) => {
            let bound = (t - before).whole_seconds();
            assert!((7199..=7300).contains(&bound), "bounded by {bound}s");
        }
        other => panic!("database orphan: {other:?}"),
    }
    // Without a max_ttl there is no honest bound: an error keeps it visible.
    peers.bao.api("POST", "database/roles/unbounded", Some(json!({
        "db_name": "pg", "default_ttl": "1h",
        "creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}';"],
    }))).await;
    let req = issue_req(
        scope("u", json!({ "kind": "database", "role": "unbounded" })),
        120,
    );
    let err = p.revoke(&orphan(&req)).await.unwrap_err().to_string();
    assert!(err.contains("no max_ttl"), "{err}");
}

#[tokio::test]
async fn renewal_is_capped_by_the_broker_limit() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let p = provider(&peers);
    for params in [
        json!({ "kind": "token", "policies": [AGENT_POLICY] }),
        json!({ "kind": "database", "role": DB_ROLE }),
    ] {
        let req = issue_req(scope("r", params.clone()), 60);
        let issued = p.issue(&req).await.unwrap();
        let not_after = OffsetDateTime::now_utc() + Duration::from_secs(300);
        let renew = |secs: u64| RenewRequest {
            lease_id: req.lease_id.clone(),
            scope: req.scope.clone(),
            handle: issued.handle.clone(),
            increment: Duration::from_secs(secs),
            not_after,
        };
        let r = p.renew(&renew(200)).await.unwrap();
        let left = (r.expires_at - OffsetDateTime::now_utc()).whole_seconds();
        assert!((190..=200).contains(&left), "{params}: renewed to {left}s");
        let r = p.renew(&renew(3600)).await.unwrap();
        assert!(
            r.expires_at <= not_after,
            "{params}: renewal passed the cap"
        );
        assert!(
            (not_after - r.expires_at).whole_seconds() <= 5,
            "{params}: {r:?}"
        );
        if params["kind"] == "token" {
            let token = issued.credential.expose_to_agent()["token"]
                .as_str()
                .unwrap()
                .to_owned();
            let (_, v) = peers
                .bao
                .request("GET", "auth/token/lookup-self", Some(&token), None)
                .await;
            assert!(
                v["data"]["ttl"].as_i64().unwrap() <= 300,
                "vault's own ttl: {v}"
            );
        }
        p.revoke(&RevokeRequest {
            lease_id: req.lease_id.clone(),
            scope: req.scope.clone(),
            handle: Some(issued.handle),
            expires_at: r.expires_at,
        })
        .await
        .unwrap();
    }
    // Certificates and reads cannot be renewed: the broker says not_renewable.
    let req = issue_req(scope("k", json!({ "kind": "kv", "path": KV_PATH })), 60);
    let issued = p.issue(&req).await.unwrap();
    let err = p
        .renew(&RenewRequest {
            lease_id: req.lease_id,
            scope: req.scope,
            handle: issued.handle,
            increment: Duration::from_secs(60),
            not_after: req.expires_at + Duration::from_secs(60),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, keygate_provider_api::ProviderError::Unsupported(_)),
        "{err}"
    );
}

/// Keygate's own token: renewed before it expires, replaced by a fresh
/// AppRole login when it is revoked behind Keygate's back.
#[tokio::test]
async fn keygate_keeps_its_own_token_alive() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let (role_id, secret_id) = configure_approle(&peers.bao, "short", "6s").await;
    let file = peers.secret_id_file.with_file_name("short-secret-id");
    write_secret(&file, &secret_id);
    let mut cfg = peers.provider_json();
    cfg["auth"]["role_id"] = role_id.into();
    cfg["auth"]["secret_id_file"] = json!(file);
    let p =
        VaultProvider::open(serde_json::from_value(cfg).unwrap(), SecretResolver::new()).unwrap();
    let scope = scope("t", json!({ "kind": "token", "policies": [AGENT_POLICY] }));
    p.issue(&issue_req(scope.clone(), 30)).await.unwrap();
    // Calls keep working past the first token's 6 s TTL.
    let mut accessors = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        p.issue(&issue_req(scope.clone(), 30)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Revoke Keygate's token behind its back: the next call logs in again.
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for (a, m) in peers.live_tokens().await {
        if m["meta"]["role_name"] == "short" {
            // Alive past its 6 s TTL, and created at the first call: it was
            // renewed, not replaced.
            let age = now - m["creation_time"].as_i64().unwrap();
            assert!(
                age >= 9,
                "keygate's token is {age}s old: replaced, not renewed"
            );
            accessors.insert(a.clone());
            peers
                .bao
                .api(
                    "POST",
                    "auth/token/revoke-accessor",
                    Some(json!({ "accessor": a })),
                )
                .await;
        }
    }
    assert_eq!(
        accessors.len(),
        1,
        "keygate's live approle tokens: {accessors:?}"
    );
    let issued = p.issue(&issue_req(scope, 30)).await.unwrap();
    let token = issued.credential.expose_to_agent()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(peers.token_works(&token).await);
}

#[tokio::test]
async fn a_token_from_a_file_works_too() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let file = peers.secret_id_file.with_file_name("vault-token");
    write_secret(&file, &peers.bao.root);
    let cfg =
        json!({ "address": peers.bao.addr, "auth": { "method": "token", "token_file": file } });
    let p =
        VaultProvider::open(serde_json::from_value(cfg).unwrap(), SecretResolver::new()).unwrap();
    let req = issue_req(scope("k", json!({ "kind": "kv", "path": KV_PATH })), 60);
    let issued = p.issue(&req).await.unwrap();
    assert_eq!(
        issued.credential.expose_to_agent()["data"]["password"],
        peers.kv_values["password"]
    );
    // A bad token is a refusal that names no secret.
    write_secret(&file, "not-a-real-token");
    let cfg =
        json!({ "address": peers.bao.addr, "auth": { "method": "token", "token_file": file } });
    let p =
        VaultProvider::open(serde_json::from_value(cfg).unwrap(), SecretResolver::new()).unwrap();
    let err = p.issue(&req).await.unwrap_err().to_string();
    assert!(
        err.contains("login was refused") && !err.contains("not-a-real-token"),
        "{err}"
    );
}
