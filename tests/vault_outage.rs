//! Revocation survives OpenBao outages and Keygate crashes: leases wait in
//! the durable queue with their error, and are revoked once OpenBao is back
//! (a durable server: file storage, initialised and unsealed by API).
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::peers::Storage;
use common::vault::{VaultPeers, broker_setup};
use common::{Session, TestAgent, TestBroker, eventually};
use serde_json::Value;

/// One credential of each revocable kind; returns (db user, db password,
/// token, serial).
pub(crate) async fn mint(b: &TestBroker, s: &Session) -> (String, String, String, String) {
    let db = b
        .credential(&s.token, "vault-db", Some(300), None)
        .await
        .expect(201);
    let tok = b
        .credential(&s.token, "vault-token", Some(300), None)
        .await
        .expect(201);
    let pki = b
        .credential(&s.token, "vault-pki", Some(300), None)
        .await
        .expect(201);
    let field = |v: &Value, k: &str| v["credential"][k].as_str().unwrap().to_owned();
    (
        field(&db, "username"),
        field(&db, "password"),
        field(&tok, "token"),
        field(&pki, "serial"),
    )
}

/// Waits until every lease of the task is `state`; returns them.
async fn all_leases(
    b: &TestBroker,
    task: &str,
    state: &'static str,
    with_error: bool,
) -> Vec<Value> {
    eventually(&format!("every lease {state}"), || async {
        let leases = b.leases(&format!("task={task}")).await;
        let ok = leases.len() == 3
            && leases
                .iter()
                .all(|l| l["state"] == state && (!with_error || l["last_error"].is_string()));
        ok.then_some(leases)
    })
    .await
}

/// Nothing Keygate minted is alive in OpenBao or PostgreSQL any more.
pub(crate) async fn nothing_left(peers: &VaultPeers, creds: &(String, String, String, String)) {
    let (user, pw, token, serial) = creds;
    assert!(
        peers.live_keygate_tokens().await.is_empty(),
        "a keygate token is still live"
    );
    assert!(
        peers.live_db_leases().await.is_empty(),
        "a database lease is still live"
    );
    assert!(!peers.token_works(token).await);
    assert!(
        !peers.pg.can_login(user, pw).await,
        "the database user still logs in"
    );
    assert!(peers.cert_revoked(serial).await);
}

#[tokio::test]
async fn revocations_wait_out_an_outage() {
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("outage", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;
    assert!(peers.pg.can_login(&creds.0, &creds.1).await);

    peers.bao.stop().await;
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["state"], "completed");
    assert_eq!(done["leases"]["pending"], 3, "{done}");
    let waiting = all_leases(&b, &s.task_id, "revoking", true).await;
    for l in &waiting {
        let err = l["last_error"].as_str().unwrap();
        // Vault is down: its port refuses connections.
        assert!(
            err.contains("backend not reached") || err.contains("backend unavailable"),
            "{err}"
        );
    }
    // While Vault is down the credentials still work: that is the outage.
    assert!(peers.pg.can_login(&creds.0, &creds.1).await);

    peers.bao.restart().await;
    let revoked = all_leases(&b, &s.task_id, "revoked", false).await;
    assert!(revoked.iter().all(|l| l["attempts"].as_u64().unwrap() >= 1));
    nothing_left(&peers, &creds).await;
}

#[tokio::test]
async fn the_queue_resumes_after_a_keygate_crash() {
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let mut b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("crash", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;

    peers.bao.stop().await;
    b.complete(&s.token).await.expect(200);
    all_leases(&b, &s.task_id, "revoking", true).await;
    // kill -9 while Vault is down, and start again: Keygate must come up
    // without Vault and keep the queue.
    b.restart().await;
    let still = all_leases(&b, &s.task_id, "revoking", true).await;
    assert!(still.iter().all(|l| l["attempts"].as_u64().unwrap() >= 1));

    peers.bao.restart().await;
    all_leases(&b, &s.task_id, "revoked", false).await;
    nothing_left(&peers, &creds).await;
}

/// A Vault that answers every request 503 after reading it.
async fn failing_vault() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let body = r#"{"errors":["Vault is sealed"]}"#;
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    addr
}

/// An issue whose request never reached Vault minted nothing: the lease is
/// `failed` at once. One that reached a failing Vault may have minted: it is
/// queued for revocation with the reason visible from the start.
#[tokio::test]
async fn an_issue_that_never_reached_vault_is_failed_not_revoking() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let failing = failing_vault().await;
    let provider = |name: &str, addr: &str| {
        format!(
            "[providers.{name}]\nkind = \"vault\"\naddress = \"{addr}\"\nrequest_timeout_secs = 3\nauth = {{ method = \"token\", token_env = \"KG_TEST_VAULT_TOKEN\" }}\n"
        )
    };
    let scopes = |name: &str| {
        format!(
            "[[scopes]]\nname = \"{name}-token\"\nprovider = \"{name}\"\nmax_ttl_secs = 600\nparams = {{ kind = \"token\", policies = [\"agent-reader\"] }}\n"
        )
    };
    let b = TestBroker::start_with(common::Setup {
        policies: vec![
            common::config::permit_provider("gone"),
            common::config::permit_provider("sealed"),
        ],
        extra_config: format!(
            "{}{}",
            provider("gone", &closed),
            provider("sealed", &failing)
        ),
        scopes: Some(format!("{}{}", scopes("gone"), scopes("sealed"))),
        env: vec![("KG_TEST_VAULT_TOKEN".into(), "s.not-a-real-token".into())],
        ..common::Setup::default()
    })
    .await;
    let agent = TestAgent::new("unreached", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;

    let r = b.credential(&s.token, "gone-token", Some(60), None).await;
    assert_eq!(r.status, 502, "{}", r.text);
    let leases = b.leases(&format!("task={}", s.task_id)).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["state"], "failed", "{leases:?}");
    assert!(
        leases[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("not reached")
    );

    let r = b.credential(&s.token, "sealed-token", Some(60), None).await;
    assert_eq!(r.status, 502, "{}", r.text);
    let sealed: Vec<Value> = b
        .leases(&format!("task={}", s.task_id))
        .await
        .into_iter()
        .filter(|l| l["scope"] == "sealed-token")
        .collect();
    assert_eq!(sealed[0]["state"], "revoking", "{sealed:?}");
    let reason = sealed[0]["end_reason"].as_str().unwrap();
    assert!(reason.contains("Vault is sealed"), "{reason}");
}

/// OpenBao keeps accessor entries whose token is gone (they answer 403 even
/// to root until `auth/token/tidy`); such a state cannot be produced on
/// demand in a real server, so this small stand-in serves exactly the token
/// API calls the orphan search makes, with one stale entry among the others.
async fn vault_with_a_stale_accessor(
    lease: String,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use axum::body::Bytes;
    use axum::http::{Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    let revoked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = revoked.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let (seen, lease) = (seen.clone(), lease.clone());
        async move {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let accessor = body["accessor"].as_str().unwrap_or_default().to_owned();
            let ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
            match (method.as_str(), uri.path()) {
                ("GET", "/v1/auth/token/lookup-self") => ok(serde_json::json!({
                    "data": { "accessor": "own", "path": "auth/token/create", "ttl": 0, "renewable": false }
                })),
                ("LIST", "/v1/auth/token/accessors") | ("GET", "/v1/auth/token/accessors") => {
                    ok(serde_json::json!({ "data": { "keys": ["stale", "minted", "unrelated"] } }))
                }
                ("POST", "/v1/auth/token/lookup-accessor") => match accessor.as_str() {
                    "stale" => (
                        StatusCode::FORBIDDEN,
                        axum::Json(serde_json::json!({ "errors": ["permission denied"] })),
                    )
                        .into_response(),
                    "minted" => ok(serde_json::json!({
                        "data": { "path": "auth/token/create", "meta": { "keygate_lease": lease } }
                    })),
                    _ => ok(serde_json::json!({ "data": { "path": "auth/token/create", "meta": null } })),
                },
                ("POST", "/v1/auth/token/revoke-accessor") => {
                    seen.lock().unwrap().push(accessor);
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, revoked)
}

#[tokio::test]
async fn a_stale_accessor_does_not_stop_the_orphan_search() {
    let mut b = TestBroker::prepare(common::Setup::default());
    let minted = format!("ls_minted{}", common::unix_now());
    let never = format!("ls_never{}", common::unix_now());
    let (addr, revoked) = vault_with_a_stale_accessor(minted.clone()).await;
    let mut toml = std::fs::read_to_string(b.dir.join("keygate.toml")).unwrap();
    toml.push_str(&format!(
        "\n[providers.vault]\nkind = \"vault\"\naddress = \"{addr}\"\nrequest_timeout_secs = 3\nauth = {{ method = \"token\", token_env = \"KG_TEST_VAULT_TOKEN\" }}\n\n[[scopes]]\nname = \"vault-token\"\nprovider = \"vault\"\nmax_ttl_secs = 600\nparams = {{ kind = \"token\", policies = [\"agent-reader\"] }}\n"
    ));
    std::fs::write(b.dir.join("keygate.toml"), toml).unwrap();
    b.env.push(("KG_TEST_VAULT_TOKEN".into(), "s.test".into()));
    b.start_again().await;
    let agent = TestAgent::new("orphans", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    b.kill().await;
    // Two leases a crashed process left pending: one whose token exists.
    for id in [&minted, &never] {
        b.store_exec(
            "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, expires_at, boot_id) \
             VALUES (?, ?, ?, 'vault-token', 'vault', 'pending', ?, ?, 'boot_crashed')",
            &[
                id,
                &agent.id,
                &s.task_id,
                &common::unix_now().to_string(),
                &(common::unix_now() + 600).to_string(),
            ],
        )
        .await
        .unwrap();
    }
    b.restart().await;
    eventually("both orphans resolved", || async {
        let done =
            b.lease_state(&minted).await == "revoked" && b.lease_state(&never).await == "revoked";
        done.then_some(())
    })
    .await;
    assert_eq!(*revoked.lock().unwrap(), vec!["minted".to_owned()]);
    let events = b.audit("action=lease.revoked").await;
    let never_event = events
        .iter()
        .find(|e| e["lease"] == never.as_str())
        .unwrap();
    assert!(
        never_event["details"]["result"]
            .as_str()
            .unwrap()
            .contains("never issued"),
        "{never_event}"
    );
}

/// Database credentials minted by a process that died before it heard the
/// answer cannot be found (Vault's leases name no Keygate lease): the lease
/// says how long they may live — the role's max_ttl — not its own expiry.
#[tokio::test]
async fn an_orphaned_database_lease_records_how_long_its_user_may_live() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let mut b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("dborphan", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    b.kill().await;
    let lease_id = format!("ls_dborphan{}", common::unix_now());
    b.store_exec(
        "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, expires_at, boot_id) \
         VALUES (?, ?, ?, 'vault-db', 'vault', 'pending', ?, ?, 'boot_crashed')",
        &[
            &lease_id,
            &agent.id,
            &s.task_id,
            &common::unix_now().to_string(),
            &(common::unix_now() + 300).to_string(),
        ],
    )
    .await
    .unwrap();
    b.restart().await;
    let lease = eventually("the orphan resolved", || async {
        let l = b.leases(&format!("task={}", s.task_id)).await;
        l.into_iter()
            .find(|l| l["id"] == lease_id.as_str() && l["state"] == "expiring")
    })
    .await;
    // The role's max_ttl is 2 h: far past the lease's own 5 minutes.
    let until = common::rfc3339(&lease["expires_at"]);
    let left = (until - time::OffsetDateTime::now_utc()).whole_seconds();
    assert!((7000..=7300).contains(&left), "{lease}");
    let ev = b.audit("action=lease.revoked").await;
    let ev = ev.iter().find(|e| e["lease"] == lease_id.as_str()).unwrap();
    assert_eq!(ev["details"]["expires_at"], until.unix_timestamp(), "{ev}");
}

/// Database credentials whose Vault lease can be neither shortened to the
/// Keygate lease nor revoked at once (Keygate's Vault policy lacks both
/// paths) are a live database user: the lease keeps Vault's lease and stays
/// queued until Vault takes the revocation, never `failed` and forgotten.
#[tokio::test]
async fn a_database_user_that_cannot_be_shortened_or_revoked_stays_queued() {
    use common::bao_setup::KEYGATE_POLICY;
    let peers = VaultPeers::start(Storage::Dev).await;
    let b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("dbstuck", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let set_policy = |policy: String| {
        let bao = &peers.bao;
        async move {
            bao.api(
                "PUT",
                "sys/policies/acl/keygate",
                Some(serde_json::json!({ "policy": policy })),
            )
            .await;
        }
    };
    // Vault's `default` policy allows renewing: deny it outright.
    let crippled: String = KEYGATE_POLICY
        .lines()
        .filter(|l| !l.contains("sys/leases/"))
        .chain([
            r#"path "sys/leases/renew" { capabilities = ["deny"] }"#,
            r#"path "sys/leases/revoke" { capabilities = ["deny"] }"#,
        ])
        .collect::<Vec<_>>()
        .join("\n");
    set_policy(crippled).await;

    // The role's default_ttl (1 h) is longer than the 300 s asked for.
    let r = b.credential(&s.token, "vault-db", Some(300), None).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(r.text.contains("being revoked"), "{}", r.text);
    assert!(!r.text.contains("password"), "{}", r.text);
    assert_eq!(
        peers.live_db_leases().await.len(),
        1,
        "vault holds the user"
    );
    let lease = eventually("the lease queued with its error", || async {
        let l = b.leases(&format!("task={}", s.task_id)).await;
        l.into_iter()
            .find(|l| l["state"] == "revoking" && l["last_error"].is_string())
    })
    .await;
    assert!(
        lease["end_reason"]
            .as_str()
            .unwrap()
            .contains("past the lease"),
        "{lease}"
    );

    // Once Vault lets Keygate revoke, the queue finishes the job.
    set_policy(KEYGATE_POLICY.to_owned()).await;
    eventually("the lease revoked", || async {
        let l = b.leases(&format!("task={}", s.task_id)).await;
        (l.len() == 1 && l[0]["state"] == "revoked").then_some(())
    })
    .await;
    assert!(peers.live_db_leases().await.is_empty(), "the user lives on");
}

/// A gateway in front of OpenBao, as a load balancer is: it passes requests
/// through while `refuse` is 0, and otherwise answers each one itself with
/// that status (a 5xx, or a 429 with `Retry-After` as rate-limit quotas do).
async fn gateway(upstream: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicU16>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering::SeqCst;
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(0));
    let mode = refuse.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, mut headers: HeaderMap, body: Bytes| {
            let (mode, http, upstream) = (mode.clone(), http.clone(), upstream.clone());
            async move {
                let status = mode.load(SeqCst);
                if status == 429 {
                    let errors = serde_json::json!({ "errors": ["rate limit quota exceeded"] });
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "1")],
                        axum::Json(errors),
                    )
                        .into_response();
                }
                if status != 0 {
                    let errors = serde_json::json!({ "errors": ["upstream connect error"] });
                    return (StatusCode::from_u16(status).unwrap(), axum::Json(errors))
                        .into_response();
                }
                headers.remove("host");
                let r = http
                    .request(method, format!("{upstream}{uri}"))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status();
                let headers = r.headers().clone();
                let bytes = r.bytes().await.unwrap();
                let mut resp = (status, bytes).into_response();
                if let Some(ct) = headers.get("content-type") {
                    resp.headers_mut().insert("content-type", ct.clone());
                }
                resp
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, refuse)
}

/// Waits until every lease of the task has been retried with an error that
/// contains `want`.
async fn all_failing_with(b: &TestBroker, task: &str, want: &str) {
    eventually(&format!("every lease retried with `{want}`"), || async {
        let leases = b.leases(&format!("task={task}")).await;
        let ok = leases.len() == 3
            && leases.iter().all(|l| {
                l["state"] == "revoking"
                    && l["last_error"].as_str().is_some_and(|e| e.contains(want))
            });
        ok.then_some(())
    })
    .await;
}

/// Revocation meets every way a Vault says "not now": a 5xx from a gateway,
/// a 429 from a rate limit, and a sealed Vault. Each leaves the leases
/// queued with that error, the credentials alive (that is the outage), and
/// once Vault answers again every one is revoked.
#[tokio::test]
async fn revocation_waits_out_5xx_429_and_a_sealed_vault() {
    use std::sync::atomic::Ordering::SeqCst;
    let mut peers = VaultPeers::start(Storage::Raft).await;
    let (gw, refuse) = gateway(peers.bao.addr.clone()).await;
    let mut setup = broker_setup(&peers);
    setup.scopes = setup.scopes.map(|s| s.replace(&peers.bao.addr, &gw));
    let b = TestBroker::start_with(setup).await;
    let agent = TestAgent::new("refused", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let creds = mint(&b, &s).await;

    refuse.store(500, SeqCst);
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["leases"]["pending"], 3, "{done}");
    all_failing_with(&b, &s.task_id, "vault answered 500").await;
    refuse.store(429, SeqCst);
    all_failing_with(&b, &s.task_id, "vault answered 429").await;
    refuse.store(0, SeqCst);
    peers.bao.seal().await;
    all_failing_with(&b, &s.task_id, "Vault is sealed").await;
    assert!(
        peers.pg.can_login(&creds.0, &creds.1).await,
        "nothing was revoked while Vault refused"
    );

    peers.bao.unseal().await;
    all_leases(&b, &s.task_id, "revoked", false).await;
    nothing_left(&peers, &creds).await;
}
