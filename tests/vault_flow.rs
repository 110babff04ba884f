//! Vault scopes through Keygate's HTTP API (the real binary, AppRole login
//! with a secret id file) against a real OpenBao and PostgreSQL. The
//! provider and scopes are those of `config/examples/vault.toml`.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::peers::Storage;
use common::vault::{VaultPeers, broker_setup};
use common::{TestAgent, TestBroker, rfc3339};
use reqwest::Method;
use serde_json::json;

async fn start() -> (VaultPeers, TestBroker, TestAgent) {
    let peers = VaultPeers::start(Storage::Dev).await;
    let b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("vault", "ES256");
    b.register(&agent, "platform").await;
    (peers, b, agent)
}

#[tokio::test]
async fn database_credentials_log_in_until_the_task_completes() {
    let (peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-db", Some(300), None)
        .await
        .expect(201);
    assert_eq!(cred["provider"], "vault");
    assert_eq!(cred["revocation"], "revocable");
    let user = cred["credential"]["username"].as_str().unwrap();
    let pw = cred["credential"]["password"].as_str().unwrap();
    assert!(
        peers.pg.can_login(user, pw).await,
        "fresh credentials do not log in"
    );
    assert_eq!(peers.live_db_leases().await.len(), 1);
    // The Vault lease was shortened to the Keygate lease (the role says
    // 1h): asked of Vault itself, not read from Keygate's answer.
    let left = (rfc3339(&cred["expires_at"]) - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!((290..=300).contains(&left), "{left}");
    let ttls = peers.db_lease_ttls().await;
    assert_eq!(ttls.len(), 1, "{ttls:?}");
    assert!((280..=300).contains(&ttls[0]), "Vault's own ttl: {ttls:?}");

    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["leases"]["revoked"], 1, "{done}");
    assert!(
        !peers.pg.can_login(user, pw).await,
        "credentials still log in after the task"
    );
    assert!(peers.live_db_leases().await.is_empty());
    assert!(
        !b.log().contains(pw),
        "the password reached the broker's log"
    );
}

#[tokio::test]
async fn a_token_works_until_released() {
    let (peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-token", Some(120), None)
        .await
        .expect(201);
    let token = cred["credential"]["token"].as_str().unwrap();
    let lease_id = cred["lease_id"].as_str().unwrap();
    let (status, me) = peers
        .bao
        .request("GET", "auth/token/lookup-self", Some(token), None)
        .await;
    assert_eq!(status, 200);
    assert!(
        me["data"]["policies"]
            .as_array()
            .unwrap()
            .contains(&json!("agent-reader")),
        "{me}"
    );
    assert_eq!(me["data"]["meta"]["agent"], agent.id.as_str());
    assert_eq!(me["data"]["meta"]["task"], s.task_id.as_str());
    assert_eq!(me["data"]["meta"]["scope"], "vault-token");
    assert_eq!(me["data"]["meta"]["keygate_lease"], lease_id);
    assert!(me["data"]["ttl"].as_u64().unwrap() <= 120);
    assert_eq!(me["data"]["explicit_max_ttl"], 900);

    let released = b
        .call(
            Method::DELETE,
            &format!("/v1/credentials/{lease_id}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
    assert_eq!(released["state"], "revoked");
    assert!(
        !peers.token_works(token).await,
        "lookup-self still works after revoke"
    );
    // The lease row keeps the accessor, never the token.
    let leases = b.leases(&format!("task={}", s.task_id)).await;
    assert!(!leases[0].to_string().contains(token));
}

/// A token's holder can extend it at Vault itself (`renew-self`, which the
/// `default` policy allows) past the lease Keygate recorded: at the lease's
/// TTL Keygate revokes it, so it lives its lease, not the extension.
/// The token's holder extends it at Vault itself, ten minutes past its lease.
async fn renew_at_vault(peers: &VaultPeers, token: &str) {
    let (status, renewed) = peers
        .bao
        .request(
            "POST",
            "auth/token/renew-self",
            Some(token),
            Some(json!({ "increment": "600s" })),
        )
        .await;
    assert_eq!(status, 200, "{renewed}");
    assert!(
        renewed["auth"]["lease_duration"].as_u64().unwrap() > 60,
        "{renewed}"
    );
}

/// Waits until lease `lease_id` of task `task` is revoked (at its TTL).
async fn revoked_at_ttl(b: &TestBroker, task: &str, lease_id: &str) {
    common::eventually("the lease revoked at its ttl", || async {
        let l = b.leases(&format!("task={task}")).await;
        let l = l.iter().find(|l| l["id"] == lease_id).unwrap();
        (l["state"] == "revoked").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_token_renewed_at_vault_by_its_holder_still_dies_with_its_lease() {
    let (peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-token", Some(3), None)
        .await
        .expect(201);
    let token = cred["credential"]["token"].as_str().unwrap();
    let lease_id = cred["lease_id"].as_str().unwrap().to_owned();
    renew_at_vault(&peers, token).await;
    revoked_at_ttl(&b, &s.task_id, &lease_id).await;
    assert!(
        !peers.token_works(token).await,
        "a token its holder renewed outlived its lease"
    );
}

/// A renewable token whose scope was made non-renewable in config before
/// its TTL (the broker restarted) still dies with its lease: what its
/// provider must do at the TTL is judged from what it was minted with (its
/// handle), not by today's config (a scope renamed or removed alike).
#[tokio::test]
async fn a_renewable_token_whose_scope_changed_in_config_still_dies_with_its_lease() {
    let (peers, mut b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-token", Some(3), None)
        .await
        .expect(201);
    let token = cred["credential"]["token"].as_str().unwrap().to_owned();
    let lease_id = cred["lease_id"].as_str().unwrap().to_owned();
    renew_at_vault(&peers, &token).await;
    let path = b.dir.join("keygate.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let scope = config["scopes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"].as_str() == Some("vault-token"))
        .unwrap();
    scope["params"]
        .as_table_mut()
        .unwrap()
        .insert("renewable".into(), false.into());
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    b.restart().await;
    revoked_at_ttl(&b, &s.task_id, &lease_id).await;
    assert!(
        !peers.token_works(&token).await,
        "a token its holder renewed outlived its lease"
    );
}

/// A database lease Vault extended without Keygate knowing (a renewal
/// whose answer was lost: a timeout, a gateway's 5xx after forwarding it)
/// is still revoked at the lease's TTL: the user does not outlive it.
#[tokio::test]
async fn a_database_lease_vault_extended_unseen_still_dies_with_its_lease() {
    let (peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-db", Some(3), None)
        .await
        .expect(201);
    let lease_id = cred["lease_id"].as_str().unwrap().to_owned();
    let (user, pw) = (
        cred["credential"]["username"].as_str().unwrap(),
        cred["credential"]["password"].as_str().unwrap(),
    );
    for key in peers.live_db_leases().await {
        let id = format!("database/creds/{}/{key}", common::vault::DB_ROLE);
        peers
            .bao
            .api(
                "PUT",
                "sys/leases/renew",
                Some(json!({ "lease_id": id, "increment": 600 })),
            )
            .await;
    }
    assert!(peers.db_lease_ttls().await.iter().all(|t| *t > 60));
    revoked_at_ttl(&b, &s.task_id, &lease_id).await;
    assert!(peers.live_db_leases().await.is_empty());
    assert!(
        !peers.pg.can_login(user, pw).await,
        "the user outlived its lease"
    );
}

#[tokio::test]
async fn renewal_is_capped_and_refused_where_impossible() {
    let (_peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cred = b
        .credential(&s.token, "vault-token", Some(60), None)
        .await
        .expect(201);
    let lease_id = cred["lease_id"].as_str().unwrap();
    let renew = |id: String, inc: u64| {
        let (b, t) = (&b, s.token.clone());
        async move {
            b.post(
                &format!("/v1/credentials/{id}/renew"),
                Some(&t),
                &json!({ "increment": inc }),
            )
            .await
        }
    };
    let r = renew(lease_id.into(), 300).await.expect(200);
    let left = (rfc3339(&r["expires_at"]) - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!((290..=300).contains(&left), "{r}");
    // Past the scope's max_ttl (from issue): capped, not refused.
    let r = renew(lease_id.into(), 100_000).await.expect(200);
    assert!(rfc3339(&r["expires_at"]) <= rfc3339(&r["not_after"]), "{r}");
    let lease = b.leases(&format!("task={}", s.task_id)).await;
    assert_eq!(rfc3339(&lease[0]["expires_at"]), rfc3339(&r["expires_at"]));
    assert_eq!(b.audit("action=lease.renewed").await.len(), 2);

    let pki = b
        .credential(&s.token, "vault-pki", Some(60), None)
        .await
        .expect(201);
    let no = renew(pki["lease_id"].as_str().unwrap().into(), 60).await;
    assert_eq!(
        (no.status.as_u16(), no.error()),
        (400, "not_renewable".into()),
        "{}",
        no.text
    );
    let svid = b.x509(&s.token, Some(60)).await;
    let no = renew(svid["lease_id"].as_str().unwrap().into(), 60).await;
    assert_eq!(no.error(), "not_renewable", "{}", no.text);
    assert_eq!(renew("ls_nope".into(), 60).await.status.as_u16(), 404);
    assert_eq!(renew(lease_id.into(), 0).await.status.as_u16(), 400);
}

#[tokio::test]
async fn pki_and_kv_through_the_broker() {
    let (peers, b, agent) = start().await;
    let s = b.token(&agent).await;
    let cert = b
        .credential(&s.token, "vault-pki", Some(120), None)
        .await
        .expect(201);
    assert_eq!(
        cert["credential"]["spiffe_id"],
        format!("spiffe://example.org/agent/{}", agent.id)
    );
    assert!(
        cert["credential"]["private_key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let serial = cert["credential"]["serial"].as_str().unwrap();

    let kv = b
        .credential(&s.token, "vault-kv", Some(120), None)
        .await
        .expect(201);
    assert_eq!(kv["revocation"], "not_applicable");
    let pw = peers.kv_values["password"].as_str().unwrap();
    // The secret's fields keep their JSON types, apart from Keygate's own.
    assert_eq!(kv["credential"]["data"], peers.kv_values);
    assert_eq!(kv["credential"]["data"]["port"], 5432);
    assert!(kv["credential"]["data"]["replicas"].is_object());
    assert_ne!(kv["credential"]["expires_at"], "never-trust-this");
    assert_eq!(kv["credential"]["expires_at"], kv["expires_at"]);
    // The value went to the agent only: not the store (with its WAL),
    // audit or log.
    b.assert_kept_nowhere(&[pw], kv["lease_id"].as_str().unwrap())
        .await;

    b.complete(&s.token).await.expect(200);
    assert!(
        peers.cert_revoked(serial).await,
        "the certificate is not on vault's crl"
    );
    let leases = b.leases(&format!("task={}", s.task_id)).await;
    let states: Vec<&str> = leases
        .iter()
        .map(|l| l["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["revoked", "revoked"], "{leases:?}");
    let kv_revoked = b
        .audit(&format!("action=lease.revoked&task={}", s.task_id))
        .await;
    assert!(
        kv_revoked
            .iter()
            .any(|e| e.to_string().contains("nothing to revoke")),
        "{kv_revoked:?}"
    );
}

/// Keygate's AppRole secret id by `aws-sm:` reference (a moto server here):
/// the login reads it through the same resolver as every other reference,
/// and a Vault scope issues. Before, only `secret_id_file`/`_env` existed.
#[cfg(feature = "aws")]
#[tokio::test]
async fn the_approle_secret_id_comes_from_aws_secrets_manager() {
    use common::aws::Moto;
    let (peers, moto) = tokio::join!(VaultPeers::start(Storage::Dev), Moto::start());
    let secret_id = std::fs::read_to_string(&peers.secret_id_file).unwrap();
    moto.create_secret("keygate/vault-approle", secret_id.trim())
        .await;
    let mut setup = broker_setup(&peers);
    let file_line = format!("secret_id_file = \"{}\"", peers.secret_id_file.display());
    let scopes = setup.scopes.take().unwrap();
    assert!(scopes.contains(&file_line), "{scopes}");
    // The file is gone: only Secrets Manager holds the secret id.
    std::fs::remove_file(&peers.secret_id_file).unwrap();
    setup.scopes = Some(scopes.replace(&file_line, "secret_id = \"aws-sm:keygate/vault-approle\""));
    setup.extra_config.push_str(&moto.provider_toml());
    setup.env.extend(Moto::broker_env());
    let b = TestBroker::start_with(setup).await;
    let agent = TestAgent::new("vaultsm", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(600)).await;
    let cred = b
        .credential(&s.token, "vault-token", Some(60), None)
        .await
        .expect(201);
    let token = cred["credential"]["token"].as_str().unwrap();
    assert!(peers.token_works(token).await);
    assert!(
        !b.log().contains(secret_id.trim()),
        "the secret id was logged"
    );
}

/// `address = "https://…"` with `ca_cert_file`, and `namespace`: tokens are
/// minted in the namespace, over TLS verified against that CA only, and
/// revoked there. Without the CA the same Vault is not trusted: the lease
/// fails at once, nothing minted.
#[tokio::test]
async fn https_with_a_ca_cert_file_and_a_namespace() {
    use common::peers::Bao;
    let bao = Bao::start(Storage::DevTls).await;
    assert!(bao.addr.starts_with("https://"));
    bao.api("POST", "sys/namespaces/team-a", Some(json!({})))
        .await;
    let provider = |name: &str, ca: Option<&std::path::Path>| {
        let ca = ca
            .map(|c| format!("ca_cert_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        format!(
            "[providers.{name}]\nkind = \"vault\"\naddress = \"{}\"\nnamespace = \"team-a\"\n{ca}request_timeout_secs = 3\nauth = {{ method = \"token\", token_env = \"KG_TEST_VAULT_TOKEN\" }}\n",
            bao.addr
        )
    };
    let scope = |name: &str| {
        format!(
            "[[scopes]]\nname = \"{name}-token\"\nprovider = \"{name}\"\nmax_ttl_secs = 600\nparams = {{ kind = \"token\", policies = [\"default\"] }}\n"
        )
    };
    let b = TestBroker::start_with(common::Setup {
        policies: vec![
            common::config::permit_provider("tenant"),
            common::config::permit_provider("untrusted"),
        ],
        extra_config: format!(
            "{}{}",
            provider("tenant", Some(&bao.ca_file())),
            provider("untrusted", None)
        ),
        scopes: Some(format!("{}{}", scope("tenant"), scope("untrusted"))),
        env: vec![("KG_TEST_VAULT_TOKEN".into(), bao.root.clone())],
        ..common::Setup::default()
    })
    .await;
    let agent = TestAgent::new("tenant", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;

    let cred = b
        .credential(&s.token, "tenant-token", Some(120), None)
        .await
        .expect(201);
    let token = cred["credential"]["token"].as_str().unwrap();
    let (status, me) = bao
        .request_in(
            Some("team-a"),
            "GET",
            "auth/token/lookup-self",
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 200, "the token lives in team-a: {me}");
    assert_eq!(me["data"]["namespace_path"], "team-a/", "{me}");
    let accessor = me["data"]["accessor"].as_str().unwrap().to_owned();
    let (_, root_accessors) = bao
        .request("LIST", "auth/token/accessors", Some(&bao.root), None)
        .await;
    assert!(
        !root_accessors.to_string().contains(&accessor),
        "minted in the root namespace too"
    );

    // The same Vault without its CA: refused before any request was sent.
    let r = b
        .credential(&s.token, "untrusted-token", Some(60), None)
        .await;
    assert_eq!(r.status, 502, "{}", r.text);
    let failed = b
        .leases(&format!("task={}", s.task_id))
        .await
        .into_iter()
        .find(|l| l["scope"] == "untrusted-token")
        .unwrap();
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("not reached"),
        "{failed}"
    );

    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["leases"]["revoked"], 1, "{done}");
    let (status, _) = bao
        .request_in(
            Some("team-a"),
            "GET",
            "auth/token/lookup-self",
            Some(token),
            None,
        )
        .await;
    assert_eq!(status, 403, "revoked in its namespace");
}

/// `keygate exec` hands a Vault token as `VAULT_TOKEN` and `VAULT_ADDR`; it
/// works while the command runs and dies when it exits.
#[tokio::test]
async fn keygate_exec_hands_a_vault_token_that_dies_with_the_command() {
    let (peers, b, agent) = start().await;
    let key = b.dir.join("agent.pem");
    std::fs::write(&key, &agent.pem).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["exec", "--server", &b.url(""), "--agent", &agent.id])
        .args(["--key-file", key.to_str().unwrap(), "--scope", "vault-token"])
        .args([
            "--",
            "sh",
            "-c",
            "printf '%s\\n%s\\n' \"$VAULT_TOKEN\" \"$VAULT_ADDR\" > vault.tmp && mv vault.tmp vault.txt; \
             while [ ! -f go ]; do sleep 0.1; done",
        ])
        .current_dir(&b.dir)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let file = b.dir.join("vault.txt");
    let text = common::eventually("the command to start", || async {
        std::fs::read_to_string(&file).ok()
    })
    .await;
    let mut lines = text.lines();
    let (token, addr) = (lines.next().unwrap().to_owned(), lines.next().unwrap());
    assert_eq!(addr, peers.bao.addr.as_str(), "VAULT_ADDR");
    assert!(
        peers.token_works(&token).await,
        "the token works while it runs"
    );
    std::fs::write(b.dir.join("go"), "").unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.success());
    common::eventually("the token revoked with the task", || async {
        (!peers.token_works(&token).await).then_some(())
    })
    .await;
}
