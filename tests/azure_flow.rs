//! The Azure provider through Keygate's HTTP API, against the Entra token
//! endpoint stand-in and the Graph fake (see `tests/common/azure.rs`):
//! app passwords added and removed with their leases, the scope's
//! `max_passwords`, access tokens that can only expire, Keygate's own
//! identity (client secret, workload identity) and refused configs.
//!
//! What the stand-ins cannot show: Entra's real token lifetimes and
//! replication delays, Graph's permission model (Application.ReadWrite.OwnedBy),
//! or whether a real resource accepts the token. They check what Keygate
//! sends, stores and reports, with Graph's documented shapes and a token
//! whose signature Graph verifies.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::azure::{
    APP_CLIENT, APP_OBJECT, AzurePeers, KEYGATE_WI_CLIENT, READER_TOKEN_SECS, RESOURCE, TENANT,
    scopes,
};
use common::{Session, TestBroker, rfc3339, start_refused, unix_now};
use reqwest::Method;
use serde_json::Value;

async fn release(b: &TestBroker, s: &Session, lease: &str) -> Value {
    b.call(
        Method::DELETE,
        &format!("/v1/credentials/{lease}"),
        Some(&s.token),
        None,
    )
    .await
    .expect(200)
}

#[tokio::test]
async fn app_passwords_live_and_die_with_their_leases() {
    let peers = AzurePeers::start().await;
    // A password someone else manages must survive everything below.
    let ci = peers.graph.add_password(
        APP_OBJECT,
        "CI deploy secret",
        time::OffsetDateTime::now_utc() + time::Duration::days(30),
    );
    let b = TestBroker::start_with(peers.setup(&scopes(5))).await;
    let (agent, s) = b.agent_with_task("deployer", "platform").await;

    let before = unix_now();
    let cred = b
        .credential(&s.token, "deploy-app", Some(600), None)
        .await
        .expect(201);
    assert_eq!(cred["revocation"], "revocable", "{cred}");
    assert!(cred.get("note").is_none(), "{cred}");
    let c = &cred["credential"];
    assert_eq!(c["client_id"], APP_CLIENT);
    assert_eq!(c["tenant_id"], TENANT);
    let secret = c["client_secret"].as_str().unwrap().to_owned();
    assert!(peers.graph.secret_works(APP_OBJECT, &secret));
    let lease = cred["lease_id"].as_str().unwrap().to_owned();
    let expiry = rfc3339(&cred["expires_at"]).unix_timestamp();
    assert!(
        (before + 599..=unix_now() + 600).contains(&expiry),
        "{cred}"
    );
    assert_eq!(rfc3339(&c["expires_at"]).unix_timestamp(), expiry);

    // Graph holds it under Keygate's name, ending with the lease.
    let ours = peers.keygate_passwords();
    assert_eq!(ours.len(), 1);
    assert_eq!(
        ours[0].display_name.as_deref(),
        Some(format!("keygate:{}:{}:{lease}", agent.id, s.task_id).as_str())
    );
    assert_eq!(ours[0].end.unix_timestamp(), expiry);

    // Release removes it, and the secret stops working.
    let released = release(&b, &s, &lease).await;
    assert_eq!(released["state"], "revoked", "{released}");
    assert!(peers.keygate_passwords().is_empty());
    assert!(!peers.graph.secret_works(APP_OBJECT, &secret));

    // So does ending the task.
    let second = b
        .credential(&s.token, "deploy-app", None, None)
        .await
        .expect(201);
    let second_secret = second["credential"]["client_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["leases"]["revoked"], 1, "{done}");
    assert!(peers.keygate_passwords().is_empty());
    assert!(!peers.graph.secret_works(APP_OBJECT, &second_secret));
    let others = peers.graph.passwords(APP_OBJECT);
    assert_eq!(others.len(), 1);
    assert_eq!(others[0].key_id, ci);

    // Every Graph call carried a token Graph accepted.
    let calls = peers.graph.calls();
    assert!(calls.iter().all(|c| c.status != 401), "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| c.path.ends_with("/addPassword") && c.status == 200)
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.path.ends_with("/removePassword") && c.status == 204)
            .count(),
        2
    );
    let revoked = b.audit("action=lease.revoked").await;
    assert_eq!(revoked.len(), 2);
    assert!(revoked.iter().all(|e| e["details"]["result"] == "revoked"));

    // No secret reaches the store, the log or the audit trail: the app
    // passwords and Keygate's own client secret alike.
    b.assert_kept_nowhere(&[&secret, &second_secret, &peers.keygate_secret], &lease)
        .await;
}

#[tokio::test]
async fn an_app_holds_at_most_max_passwords_keygate_passwords() {
    let peers = AzurePeers::start().await;
    let far = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    // Passwords that are not Keygate's do not count.
    peers
        .graph
        .add_password(APP_OBJECT, "CI deploy secret", far);
    let b = TestBroker::start_with(peers.setup(&scopes(2))).await;
    let (_, s) = b.agent_with_task("busy", "platform").await;
    let first = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(201);
    b.credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(201);
    let refused = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(502);
    assert_eq!(refused["error"], "provider_error");
    let msg = refused["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!(
            "application `{APP_OBJECT}` already holds 2 live keygate passwords"
        )) && msg.contains("scope `deploy-app` allows at most 2"),
        "{msg}"
    );
    // Nothing was added, and the refusal left a failed lease, not a queued one.
    assert_eq!(peers.keygate_passwords().len(), 2);
    assert_eq!(peers.graph.passwords(APP_OBJECT).len(), 3);
    let failed = b.leases(&format!("task={}&state=failed", s.task_id)).await;
    assert_eq!(failed.len(), 1);
    // A release makes room.
    release(&b, &s, first["lease_id"].as_str().unwrap()).await;
    b.credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(201);
}

#[tokio::test]
async fn access_tokens_cannot_be_revoked_and_say_so() {
    let peers = AzurePeers::start().await;
    let b = TestBroker::start_with(peers.setup(&scopes(5))).await;
    let (_, s) = b.agent_with_task("reader", "platform").await;

    // Entra gives the token its own lifetime (20 minutes here), longer than
    // the 5 minutes asked for: the lease keeps the real expiry and says so.
    let before = unix_now();
    let cred = b
        .credential(&s.token, "arm-reader", Some(300), None)
        .await
        .expect(201);
    assert_eq!(cred["revocation"], "expires_at", "{cred}");
    let c = &cred["credential"];
    assert_eq!(c["token_type"], "Bearer");
    assert_eq!(c["resource"], RESOURCE);
    let token = c["access_token"].as_str().unwrap().to_owned();
    assert!(peers.graph.token_valid_for(&token, RESOURCE));
    assert!(!peers.graph.token_valid_for(&token, &peers.graph.resource));
    let expiry = rfc3339(&cred["expires_at"]).unix_timestamp();
    let lifetime = READER_TOKEN_SECS as i64;
    assert!(
        (before + lifetime - 1..=unix_now() + lifetime + 1).contains(&expiry),
        "{cred}"
    );
    let note = cred["note"].as_str().unwrap();
    assert!(
        note.contains("cannot revoke") && note.contains("past the 300 s granted"),
        "{note}"
    );

    // Release cannot end it: it stays valid until Entra's expiry.
    let lease = cred["lease_id"].as_str().unwrap();
    let released = release(&b, &s, lease).await;
    assert_eq!(released["state"], "expiring", "{released}");
    assert_eq!(released["revocation"], "expires_at");
    assert_eq!(rfc3339(&released["lives_until"]).unix_timestamp(), expiry);
    assert!(peers.graph.token_valid_for(&token, RESOURCE));

    // A ttl longer than the token's: the lease ends with the token, no note.
    let long = b
        .credential(&s.token, "arm-reader", Some(1800), None)
        .await
        .expect(201);
    assert!(long.get("note").is_none(), "{long}");
    assert!(rfc3339(&long["expires_at"]).unix_timestamp() <= unix_now() + lifetime + 1);
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(
        done["lives_until"][0]["lease_id"], long["lease_id"],
        "{done}"
    );
    assert!(done["note"].as_str().unwrap().contains("cannot revoke"));

    let log = b.log();
    assert!(!log.contains(&token), "the access token is in the log");
}

#[tokio::test]
async fn a_token_longer_than_the_scope_allows_is_not_handed_over() {
    let peers = AzurePeers::start().await;
    // The same reader app, but a scope capped below Entra's token lifetime.
    let toml = scopes(5).replace("max_ttl_secs = 3600", "max_ttl_secs = 600");
    let b = TestBroker::start_with(peers.setup(&toml)).await;
    let (_, s) = b.agent_with_task("capped", "platform").await;
    let refused = b
        .credential(&s.token, "arm-reader", None, None)
        .await
        .expect(502);
    let msg = refused["message"].as_str().unwrap();
    assert!(
        msg.contains(" s, longer than scope `arm-reader` allows (600 s)")
            && msg.contains("`max_ttl_secs`"),
        "{msg}"
    );
    // Entra's 1200 s, give or take the second the answer straddled.
    let secs: u64 = msg
        .split("valid for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!((1198..=1202).contains(&secs), "{msg}");
}

/// Keygate as a workload identity: its federated token file holds a token
/// from the issuer Entra trusts for its app (the stand-in checks signature,
/// issuer, subject, audience and time range, as Entra does); a token Entra
/// would not match is a clear error that never echoes the token.
#[tokio::test]
async fn keygate_can_be_a_workload_identity() {
    use common::azure::WI_SUBJECT;
    let peers = AzurePeers::start().await;
    let broker = |name: &str, token: String| {
        let token_file = peers.dir.join(name);
        std::fs::write(&token_file, &token).unwrap();
        let mut setup = peers.setup(&scopes(5));
        let client_secret_auth = setup
            .extra_config
            .split("[providers.azure.auth]")
            .nth(1)
            .unwrap()
            .to_owned();
        setup.extra_config = setup.extra_config.replace(
            &client_secret_auth,
            &format!(
                "\nmethod = \"workload_identity\"\nclient_id = \"{KEYGATE_WI_CLIENT}\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ),
        );
        async move { (TestBroker::start_with(setup).await, token) }
    };
    let (b, _) = broker("federated-token", peers.workload_token(WI_SUBJECT, 3600)).await;
    let (_, s) = b.agent_with_task("wi", "platform").await;
    let cred = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(201);
    assert_eq!(peers.keygate_passwords().len(), 1);
    release(&b, &s, cred["lease_id"].as_str().unwrap()).await;
    assert!(peers.keygate_passwords().is_empty());

    for (file, token, code) in [
        (
            "other-subject",
            peers.workload_token("system:serviceaccount:other:app", 3600),
            "AADSTS70021",
        ),
        (
            "expired",
            peers.workload_token(WI_SUBJECT, -600),
            "AADSTS700024",
        ),
    ] {
        let (b, token) = broker(file, token).await;
        let (_, s) = b.agent_with_task("wi-refused", "platform").await;
        let r = b
            .credential(&s.token, "deploy-app", Some(300), None)
            .await
            .expect(502);
        let msg = r["message"].as_str().unwrap();
        assert!(msg.contains(code), "{file}: {msg}");
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !msg.contains(signature) && !b.log().contains(signature),
            "{msg}"
        );
        assert!(peers.keygate_passwords().is_empty());
    }
}

#[tokio::test]
async fn a_refused_keygate_secret_is_a_clear_error_without_the_secret() {
    let peers = AzurePeers::start().await;
    let mut setup = peers.setup(&scopes(5));
    let wrong = "wrong~secret-value-123";
    for (k, v) in setup.env.iter_mut() {
        if k == common::azure::KEYGATE_SECRET_ENV {
            *v = wrong.to_owned();
        }
    }
    let b = TestBroker::start_with(setup).await;
    let (_, s) = b.agent_with_task("refused", "platform").await;
    let r = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(502);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("keygate's own app") && msg.contains("AADSTS7000215"),
        "{msg}"
    );
    assert!(!msg.contains(wrong) && !b.log().contains(wrong), "{msg}");
    let failed = b.leases(&format!("task={}&state=failed", s.task_id)).await;
    assert_eq!(failed.len(), 1, "a refusal leaves nothing to revoke");
    assert!(peers.keygate_passwords().is_empty());
}

#[tokio::test]
async fn configs_azure_would_refuse_stop_the_broker_at_start() {
    let peers = AzurePeers::start().await;
    let good = peers.provider_toml(300);
    let authority = peers.token.authority();
    let http_authority = authority.replace("https://", "http://");
    let cases = [
        (
            good.replace(&authority, &http_authority),
            scopes(5),
            "`authority_host`",
            "must be an https url",
        ),
        (
            good.replace(
                &format!("tenant_id = \"{TENANT}\""),
                "tenant_id = \"contoso\"",
            ),
            scopes(5),
            "`tenant_id` `contoso`",
            "guid",
        ),
        (
            good.replace(
                &format!("\"env:{}\"", common::azure::KEYGATE_SECRET_ENV),
                "\"Zx8Q~pasted-secret\"",
            ),
            scopes(5),
            "secret reference is not valid",
            "env:NAME",
        ),
        (
            good.clone(),
            scopes(5).replace(APP_OBJECT, "deploy-app-registration"),
            "scope `deploy-app`",
            "`application_object_id` `deploy-app-registration` is not an object id",
        ),
        (
            good.clone(),
            scopes(5).replace(RESOURCE, &format!("{RESOURCE}/.default")),
            "scope `arm-reader`",
            "write the resource alone",
        ),
    ];
    for (provider, scopes, needle, detail) in cases {
        let mut setup = peers.setup(&scopes);
        setup.extra_config = provider;
        let out = start_refused(setup).await;
        assert!(
            out.contains(needle) && out.contains(detail),
            "{needle}\n---\n{out}"
        );
        assert!(!out.contains("pasted-secret"), "{out}");
    }
}

#[tokio::test]
async fn graph_refuses_a_token_for_another_audience() {
    let peers = AzurePeers::start().await;
    // Keygate asking Entra for the wrong resource: Graph's token check
    // (signature, issuer, audience) refuses it, and the error says so.
    let mut setup = peers.setup(&scopes(5));
    setup.extra_config = setup.extra_config.replace(
        "sweep_interval_secs = 300",
        &format!("sweep_interval_secs = 300\ngraph_scope = \"{RESOURCE}/.default\""),
    );
    let b = TestBroker::start_with(setup).await;
    let (_, s) = b.agent_with_task("misaimed", "platform").await;
    let r = b
        .credential(&s.token, "deploy-app", Some(300), None)
        .await
        .expect(502);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains(
            "backend refused: graph `get application` answered 401 InvalidAuthenticationToken"
        ) && msg.contains("InvalidAudience"),
        "{msg}"
    );
    assert!(peers.keygate_passwords().is_empty());
}
