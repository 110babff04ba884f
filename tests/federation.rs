//! Workload identity federation against a real OIDC issuer (npm
//! `oauth2-mock-server`): a Kubernetes-style service-account token opens a
//! task for the one agent bound to its subject; everything else is refused
//! with a precise `invalid_grant` and audited.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::oidc::{OidcIssuer, kid_of};
use common::{Resp, Setup, TestAgent, TestBroker, eventually, unix_now};
use serde_json::{Value, json};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const AUDIENCE: &str = "https://keygate.test";
const SUBJECT: &str = "system:serviceaccount:agents:reporter";

async fn start() -> (TestBroker, OidcIssuer, TestAgent) {
    let oidc = OidcIssuer::start().await;
    let b = TestBroker::start_with(Setup {
        extra_config: format!(
            r#"
[[federation.issuers]]
name = "k8s"
issuer = "{}"
audience = "{AUDIENCE}"
algorithms = ["RS256"]
required_claims = {{ "kubernetes.io/namespace" = "agents" }}
"#,
            oidc.issuer
        ),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("reporter", "ES256");
    let mut spec = agent.spec("platform");
    spec["jwks"] = json!({ "keys": [] });
    spec["federated"] = json!({ "issuer": "k8s", "subject": SUBJECT });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    (b, oidc, agent)
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "kubernetes.io/namespace": "agents",
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

async fn exchange(b: &TestBroker, token: &str) -> Resp {
    b.token_form(&[
        ("grant_type", GRANT),
        ("assertion", token),
        ("task", "nightly report"),
    ])
    .await
}

fn refused(r: &Resp, fragment: &str) {
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    assert!(r.text.contains(fragment), "want `{fragment}` in {}", r.text);
}

#[tokio::test]
async fn a_service_account_token_opens_a_task_for_its_bound_agent() {
    let (b, oidc, agent) = start().await;
    let v = exchange(&b, &oidc.mint(&claims(json!({}))).await)
        .await
        .expect(200);
    let session = v["access_token"].as_str().unwrap();
    let who = b.get("/v1/session", Some(session)).await.expect(200);
    assert_eq!(who["agent"], agent.id.as_str());
    b.x509(session, Some(300)).await;
    let opened = b.audit("action=task.opened").await;
    let ev = opened.last().unwrap();
    assert_eq!(ev["details"]["method"], "jwt_bearer");
    assert_eq!(ev["details"]["subject"], SUBJECT);

    // The same token twice is a replay (it carries a jti): a bad grant
    // (RFC 7523 §3.1), not a bad client.
    let once = oidc.mint(&claims(json!({}))).await;
    exchange(&b, &once).await.expect(200);
    let r = exchange(&b, &once).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);

    // One subject binds one agent.
    let twin = TestAgent::new("twin", "ES256");
    let mut spec = twin.spec("platform");
    spec["federated"] = json!({ "issuer": "k8s", "subject": SUBJECT });
    let r = b.admin_post("/v1/agents", &spec).await;
    assert_eq!(r.status, 409, "{}", r.text);
    let mut spec = twin.spec("platform");
    spec["federated"] = json!({ "issuer": "nowhere", "subject": "x" });
    let r = b.admin_post("/v1/agents", &spec).await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test]
async fn foreign_wrong_expired_and_unbound_tokens_are_refused_and_audited() {
    let (b, mut oidc, _agent) = start().await;
    let now = unix_now();
    let cases = [
        (
            claims(json!({ "iss": "https://evil.example" })),
            "is not trusted",
        ),
        (
            claims(json!({ "aud": "https://someone-else" })),
            "`aud` does not name",
        ),
        (
            claims(json!({ "exp": now - 120, "iat": now - 600, "nbf": now - 600 })),
            "expired",
        ),
        (
            claims(json!({ "kubernetes.io/namespace": "default" })),
            "kubernetes.io/namespace",
        ),
        (
            claims(json!({ "sub": "system:serviceaccount:agents:intruder" })),
            "no agent is bound",
        ),
        (
            claims(json!({ "nbf": now + 600 })),
            "not valid yet (`nbf` in the future)",
        ),
    ];
    for (c, why) in &cases {
        let r = exchange(&b, &oidc.mint(c).await).await;
        refused(&r, why);
    }
    // An algorithm the issuer is not configured for (it is RS256-only):
    // refused before any key is looked at, whoever signed it.
    let signer = common::TestAgent::new("not-the-issuer", "ES256");
    let es256 = signer.sign(&claims(json!({ "iss": oidc.issuer })));
    let r = exchange(&b, &es256).await;
    refused(&r, "`alg` ES256 is not allowed for issuer `k8s`");
    // A kid the issuer never published.
    let forged = b
        .http
        .post(format!("{}/token", oidc.issuer))
        .form(&[
            ("grant_type", "client_credentials"),
            ("claims", &claims(json!({})).to_string()),
            ("kid", "no-such-key"),
        ])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let r = exchange(&b, forged["access_token"].as_str().unwrap()).await;
    refused(&r, "no key `no-such-key`");
    let failures: Vec<Value> = b
        .audit("action=auth.token")
        .await
        .into_iter()
        .filter(|e| e["outcome"] == "failure")
        .collect();
    assert_eq!(failures.len(), cases.len() + 2, "{failures:?}");

    // Key rotation: a token signed by a key published after Keygate cached
    // the JWKS is accepted once Keygate refreshes on the unknown kid.
    let new_kid = oidc.rotate().await;
    let rotated = eventually("a token signed with the new key", || async {
        let t = oidc.mint(&claims(json!({}))).await;
        (kid_of(&t) == new_kid).then_some(t)
    })
    .await;
    let v = eventually("the rotated key accepted", || {
        let t = rotated.clone();
        let b = &b;
        async move {
            let r = exchange(b, &t).await;
            (r.status == 200).then(|| r.json())
        }
    })
    .await;
    assert!(v["access_token"].is_string());
}

/// A JWKS endpoint that misbehaves: `stuck` never answers, `broken` answers
/// 500 (counting requests), `endless` streams a body that never ends.
async fn bad_jwks(kind: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            match kind {
                "stuck" => held.push(s),
                "broken" => {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                }
                _ => {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf).await;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await;
                        let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
                        while s.write_all(chunk.as_bytes()).await.is_ok() {}
                    });
                }
            }
        }
    });
    (url, hits)
}

#[tokio::test]
async fn a_slow_or_broken_issuer_delays_no_other_and_is_not_hammered() {
    let oidc = OidcIssuer::start().await;
    let (stuck, _) = bad_jwks("stuck").await;
    let (broken, broken_hits) = bad_jwks("broken").await;
    let (endless, _) = bad_jwks("endless").await;
    let issuer = |name: &str, jwks: &str| {
        format!(
            "[[federation.issuers]]\nname = \"{name}\"\nissuer = \"https://{name}.test\"\njwks_url = \"{jwks}\"\naudience = \"{AUDIENCE}\"\nalgorithms = [\"ES256\"]\n"
        )
    };
    let b = TestBroker::start_with(Setup {
        extra_config: format!(
            "[[federation.issuers]]\nname = \"k8s\"\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\nalgorithms = [\"RS256\"]\n{}{}{}",
            oidc.issuer,
            issuer("stuck", &stuck),
            issuer("broken", &broken),
            issuer("endless", &endless),
        ),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("fed", "ES256");
    let mut spec = agent.spec("platform");
    spec["jwks"] = json!({ "keys": [] });
    spec["federated"] = json!({ "issuer": "k8s", "subject": SUBJECT });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    // The good issuer's keys are cached by a first login.
    exchange(&b, &oidc.mint(&claims(json!({}))).await)
        .await
        .expect(200);
    let signer = TestAgent::new("issuer-key", "ES256");
    let foreign = |name: &str| {
        signer.sign(&json!({
            "iss": format!("https://{name}.test"), "sub": "x", "aud": AUDIENCE,
            "exp": unix_now() + 300, "jti": uuid::Uuid::new_v4().to_string(),
        }))
    };

    // A login through the stuck issuer waits on its fetch…
    let (http, url) = (b.http.clone(), b.url("/oauth/token"));
    let stuck_token = foreign("stuck");
    let waiting = tokio::spawn(async move {
        http.post(url)
            .form(&[("grant_type", GRANT), ("assertion", stuck_token.as_str())])
            .send()
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // …while another issuer's logins go through at once.
    let quick = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    let fresh = oidc.mint(&claims(json!({}))).await;
    let r = quick
        .post(b.url("/oauth/token"))
        .form(&[("grant_type", GRANT), ("assertion", fresh.as_str())])
        .send()
        .await
        .expect("not held up by the stuck issuer");
    assert_eq!(r.status(), 200);

    // A broken issuer: "try again" (503), and it is asked once per floor.
    for _ in 0..3 {
        let r = exchange(&b, &foreign("broken")).await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.json()["error"], "temporarily_unavailable", "{}", r.text);
    }
    assert_eq!(
        broken_hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "failures are cached for the refresh floor"
    );

    // An endless JWKS is cut off at the cap while it streams.
    let r = quick
        .post(b.url("/oauth/token"))
        .form(&[
            ("grant_type", GRANT),
            ("assertion", foreign("endless").as_str()),
        ])
        .send()
        .await
        .expect("answered, not stuck reading");
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("larger than"));
    waiting.abort();
}

/// A federated sub-agent (no key of its own) acts in a delegation with its
/// workload token as `actor_token`.
#[tokio::test]
async fn a_federated_sub_agent_takes_a_delegated_task_with_its_workload_token() {
    let (b, oidc, fed) = start().await;
    let orchestrator = TestAgent::new("orch", "ES256");
    let mut spec = orchestrator.spec("platform");
    spec["delegation"] = json!({ "max_depth": 1, "targets": [fed.id] });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let parent = b.token(&orchestrator).await;
    let workload = oidc.mint(&claims(json!({}))).await;
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", parent.token.as_str()),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("actor_token", workload.as_str()),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("scope", "x509-svid"),
    ];
    let v = b.token_form(&form).await.expect(200);
    let child = v["access_token"].as_str().unwrap();
    let who = b.get("/v1/session", Some(child)).await.expect(200);
    assert_eq!(who["agent"], fed.id.as_str());
    assert_eq!(who["task"]["parent_task_id"], parent.task_id.as_str());
    b.x509(child, Some(60)).await;
    // The same workload token again is a replay.
    let r = b.token_form(&form).await;
    assert_eq!(r.status, 401, "{}", r.text);
}

/// A JWKS endpoint serving whatever `keys` holds, counting its fetches.
async fn counting_jwks(
    keys: std::sync::Arc<std::sync::Mutex<Value>>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = keys.lock().unwrap().to_string();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

/// The README's cache promise: fetched keys are reused, an unknown `kid`
/// refreshes at most once per floor however many arrive, and a rotated key
/// is picked up by the next refresh after the floor.
#[tokio::test]
async fn keys_are_cached_and_unknown_kids_refresh_at_most_once_per_floor() {
    use std::sync::atomic::Ordering::SeqCst;
    let old = TestAgent::new("issuer-old", "ES256");
    let new = TestAgent::new("issuer-new", "ES256");
    let served = std::sync::Arc::new(std::sync::Mutex::new(json!({ "keys": [old.jwk] })));
    let (jwks, hits) = counting_jwks(served.clone()).await;
    let b = TestBroker::start_with(Setup {
        extra_config: format!(
            "[[federation.issuers]]\nname = \"ci\"\nissuer = \"https://ci.test\"\njwks_url = \"{jwks}\"\naudience = \"{AUDIENCE}\"\nalgorithms = [\"ES256\"]\n"
        ),
        ..Setup::permissive()
    })
    .await;
    let agent = TestAgent::new("built", "ES256");
    let mut spec = agent.spec("platform");
    spec["jwks"] = json!({ "keys": [] });
    spec["federated"] = json!({ "issuer": "ci", "subject": "pipeline" });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    let token = |signer: &TestAgent, kid: &str| {
        let mut h = signer.header();
        h.kid = Some(kid.to_owned());
        signer.sign_with(
            &h,
            &json!({
                "iss": "https://ci.test", "sub": "pipeline", "aud": AUDIENCE,
                "exp": unix_now() + 300, "jti": uuid::Uuid::new_v4().to_string(),
            }),
        )
    };
    assert_eq!(hits.load(SeqCst), 0, "nothing is fetched before a login");

    // Fetched once, then served from the cache.
    for _ in 0..3 {
        exchange(&b, &token(&old, &old.kid)).await.expect(200);
    }
    assert_eq!(hits.load(SeqCst), 1, "the JWKS is cached");

    // A flood of unknown kids, past the floor since that fetch: one
    // refresh, every one refused.
    tokio::time::sleep(keygate::identity::JWKS_REFRESH_FLOOR).await;
    for n in 0..10 {
        let r = exchange(&b, &token(&old, &format!("bogus-{n}"))).await;
        refused(&r, "bogus");
    }
    assert_eq!(hits.load(SeqCst), 2, "one refresh per floor");
    // The known key still works meanwhile, without a fetch.
    exchange(&b, &token(&old, &old.kid)).await.expect(200);
    assert_eq!(hits.load(SeqCst), 2);

    // The issuer rotates. Within the floor the new kid is not fetched for…
    *served.lock().unwrap() = json!({ "keys": [old.jwk, new.jwk] });
    let r = exchange(&b, &token(&new, &new.kid)).await;
    refused(&r, &new.kid);
    assert_eq!(hits.load(SeqCst), 2);
    // …after it, the next login with the new kid refreshes and gets in.
    tokio::time::sleep(keygate::identity::JWKS_REFRESH_FLOOR).await;
    exchange(&b, &token(&new, &new.kid)).await.expect(200);
    assert_eq!(hits.load(SeqCst), 3);
    exchange(&b, &token(&new, &new.kid)).await.expect(200);
    assert_eq!(hits.load(SeqCst), 3, "the rotated set is cached too");
}

/// Each issuer's `ca_file` vouches for that issuer only: a JWKS endpoint
/// presenting a certificate of another issuer's private CA (someone who
/// holds one, in the middle) is not trusted for this issuer's keys.
#[tokio::test]
async fn one_issuers_ca_file_does_not_vouch_for_another_issuer() {
    let dir = std::env::temp_dir().join(format!("keygate-fedca-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = common::https::TestPki::new("issuer a private ca");
    let b_ca = common::https::TestPki::new("issuer b private ca");
    std::fs::write(dir.join("a.pem"), &a.ca_pem).unwrap();
    std::fs::write(dir.join("b.pem"), &b_ca.ca_pem).unwrap();
    // One JWKS endpoint with issuer A's certificate, holding the key that
    // signs both issuers' tokens below.
    let (key_pem, public) = keygate::identity::generate_agent_key("ES256").unwrap();
    let jwks = json!({ "keys": [public.jwk] });
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_url = format!("https://{}/jwks", tcp.local_addr().unwrap());
    let _server = common::https::serve(tcp, app, a.server_config());
    let issuer = |name: &str, ca: &str| {
        format!(
            "[[federation.issuers]]\nname = \"{name}\"\nissuer = \"https://{name}.issuer.test\"\naudience = \"{AUDIENCE}\"\nalgorithms = [\"ES256\"]\njwks_url = \"{jwks_url}\"\nca_file = \"{}\"\n",
            dir.join(ca).display()
        )
    };
    let b = TestBroker::start_with(Setup {
        extra_config: format!("{}{}", issuer("a", "a.pem"), issuer("b", "b.pem")),
        ..Setup::permissive()
    })
    .await;
    let token_of = |iss: &str, sub: &str| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(public.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(
            secrecy::ExposeSecret::expose_secret(&key_pem).as_bytes(),
        )
        .unwrap();
        let c = claims(json!({
            "iss": format!("https://{iss}.issuer.test"), "sub": sub,
            "iat": unix_now(), "exp": unix_now() + 300,
        }));
        jsonwebtoken::encode(&header, &c, &key).unwrap()
    };
    for (name, iss) in [("fed-a", "a"), ("fed-b", "b")] {
        let agent = TestAgent::new(name, "ES256");
        let mut spec = agent.spec("platform");
        spec["jwks"] = json!({ "keys": [] });
        spec["federated"] = json!({ "issuer": iss, "subject": format!("{name}-workload") });
        b.admin_post("/v1/agents", &spec).await.expect(201);
    }

    // Issuer A's own CA vouches for its endpoint: its token opens a task.
    let r = exchange(&b, &token_of("a", "fed-a-workload")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Issuer B's CA does not sign that endpoint's certificate: B's keys
    // cannot be had there, so nothing is opened, retryably.
    let r = exchange(&b, &token_of("b", "fed-b-workload")).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["error"], "temporarily_unavailable", "{}", r.text);
    assert!(
        r.text.contains("issuer `b`: keys unavailable"),
        "{}",
        r.text
    );
    let _ = std::fs::remove_dir_all(&dir);
}
