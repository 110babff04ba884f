//! mTLS with SPIFFE X.509-SVIDs (RFC 8705 `tls_client_auth`) through the
//! real server's TLS listener: a client certificate chaining to the trust
//! bundle, in the trust domain, with one SPIFFE URI SAN, authenticates the
//! agent bound to that SPIFFE ID, and the session token only works over a
//! connection with that same certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TRUST_DOMAIN, TestAgent, TestBroker};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType, date_time_ymd,
};
use serde_json::{Value, json};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, uri: Option<&str>, expired: bool) -> (String, String) {
    leaf_with(ca, uri.into_iter().collect(), expired)
}

/// A leaf certificate with these URI SANs.
fn leaf_with(ca: &Ca, uris: Vec<&str>, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = uris
        .into_iter()
        .map(|u| SanType::URI(u.try_into().unwrap()))
        .collect();
    if expired {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    (
        p.signed_by(&key, &ca.issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

pub(super) struct World {
    pub(super) b: TestBroker,
    pub(super) mtls: String,
    ca: Ca,
    dir: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn start() -> World {
    start_trusting(None).await
}

/// With `client_ca`, client certificates must chain to that file instead of
/// the test CA (e.g. `ca/ca-cert.pem`: the broker's own local CA, relative
/// to its directory).
pub(super) async fn start_trusting(client_ca: Option<&str>) -> World {
    let ca = ca("keygate mtls test ca");
    let dir = std::env::temp_dir().join(format!("keygate-mtls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &ca.issuer)
        .unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("clients.pem"), &ca.pem).unwrap();
    let mut b = TestBroker::start_with(Setup {
        extra_config: format!(
            r#"
[server.tls]
listen = "127.0.0.1:0"
cert_file = "{d}/server.pem"
key_file = "{d}/server-key.pem"
client_ca_file = "{bundle}"
trust_domain = "{TRUST_DOMAIN}"
"#,
            d = dir.display(),
            bundle = client_ca
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{}/clients.pem", dir.display())),
        ),
        ..Setup::permissive()
    })
    .await;
    let addr = b.stdout_line("keygate mtls listening on ").await;
    World {
        b,
        mtls: format!("https://{addr}"),
        ca,
        dir,
    }
}

fn client(ca: &Ca, identity: Option<&(String, String)>) -> reqwest::Client {
    let mut c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap());
    if let Some((cert, key)) = identity {
        c = c.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    c.build().unwrap()
}

async fn register_spiffe(b: &TestBroker, agent: &TestAgent) -> String {
    let id = format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id);
    let mut spec = agent.spec("platform");
    spec["jwks"] = json!({ "keys": [] });
    spec["federated"] = json!({ "issuer": "spiffe", "subject": id });
    b.admin_post("/v1/agents", &spec).await.expect(201);
    id
}

pub(super) async fn token(
    c: &reqwest::Client,
    w: &World,
    client_id: &str,
) -> Result<(u16, Value), reqwest::Error> {
    let r = c
        .post(format!("{}/oauth/token", w.mtls))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
        ])
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await.unwrap_or_default()))
}

#[tokio::test]
async fn an_x509_svid_authenticates_its_agent_and_binds_the_token() {
    let w = start().await;
    let agent = TestAgent::new("svid", "ES256");
    let id = register_spiffe(&w.b, &agent).await;
    let good = leaf(&w.ca, Some(&id), false);
    let c = client(&w.ca, Some(&good));
    let (status, v) = token(&c, &w, &agent.id).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let t = v["access_token"].as_str().unwrap().to_owned();
    let opened = w.b.audit("action=task.opened").await;
    assert_eq!(
        opened.last().unwrap()["details"]["method"],
        "tls_client_auth"
    );

    // Over the same certificate: accepted, credentials flow.
    let r = c
        .get(format!("{}/v1/session", w.mtls))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/credentials", w.mtls))
        .bearer_auth(&t)
        .json(&json!({ "scope": "x509-svid", "ttl": 300 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // The token elsewhere: without a certificate, or with another one.
    let r = w.b.get("/v1/session", Some(&t)).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(
        r.text.contains("bound to a client certificate"),
        "{}",
        r.text
    );
    let other_agent = TestAgent::new("other", "ES256");
    let other_id = register_spiffe(&w.b, &other_agent).await;
    let other = client(&w.ca, Some(&leaf(&w.ca, Some(&other_id), false)));
    let r = other
        .get(format!("{}/v1/session", w.mtls))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A certificate for one agent cannot open another's task.
    let (status, v) = token(&c, &w, &other_agent.id).await.unwrap();
    assert_eq!(status, 401, "{v}");
}

#[tokio::test]
async fn wrong_trust_domain_no_san_expired_and_untrusted_certificates_fail() {
    let w = start().await;
    let agent = TestAgent::new("svid", "ES256");
    register_spiffe(&w.b, &agent).await;

    let foreign = leaf(
        &w.ca,
        Some(&format!("spiffe://other.test/agent/{}", agent.id)),
        false,
    );
    let (status, v) = token(&client(&w.ca, Some(&foreign)), &w, &agent.id)
        .await
        .unwrap();
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("trust domain"),
        "{v}"
    );

    let bare = leaf(&w.ca, None, false);
    let (status, v) = token(&client(&w.ca, Some(&bare)), &w, &agent.id)
        .await
        .unwrap();
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("spiffe://"),
        "{v}"
    );

    // Two SPIFFE IDs (the agent's and another's): which one is it? Refused.
    let own = format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id);
    let other = format!("spiffe://{TRUST_DOMAIN}/agent/someone-else");
    let two = leaf_with(&w.ca, vec![&own, &other], false);
    let (status, v) = token(&client(&w.ca, Some(&two)), &w, &agent.id)
        .await
        .unwrap();
    assert_eq!(status, 401, "{v}");
    assert!(
        v["error_description"]
            .as_str()
            .unwrap()
            .contains("exactly one spiffe:// URI SAN (found 2)"),
        "{v}"
    );

    // Discovery says the mTLS method and bound tokens are on (RFC 8705 §3.3).
    let meta =
        w.b.get("/.well-known/oauth-authorization-server", None)
            .await
            .expect(200);
    assert!(
        meta["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("tls_client_auth")),
        "{meta}"
    );
    assert_eq!(meta["tls_client_certificate_bound_access_tokens"], true);

    // The TLS layer refuses these before any request is read.
    let id = format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id);
    // The refusal is the handshake's (a TLS alert about the certificate),
    // not any transport error: a wrong port or a dead server would not do.
    let handshake_refused = |e: reqwest::Error, alert: &str| {
        let chain = format!("{e:?}");
        assert!(
            chain.contains(&format!("AlertReceived({alert})")),
            "not the `{alert}` alert: {chain}"
        );
    };
    let expired = leaf(&w.ca, Some(&id), true);
    handshake_refused(
        token(&client(&w.ca, Some(&expired)), &w, &agent.id)
            .await
            .unwrap_err(),
        "CertificateExpired",
    );
    let rogue_ca = ca("rogue");
    let rogue = leaf(&rogue_ca, Some(&id), false);
    handshake_refused(
        token(&client(&w.ca, Some(&rogue)), &w, &agent.id)
            .await
            .unwrap_err(),
        "UnknownCA",
    );

    // Without a certificate the mTLS listener still serves the other methods.
    let (status, v) = token(&client(&w.ca, None), &w, &agent.id).await.unwrap();
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_client");
}

/// Opens a task over mTLS with the X.509-SVID in `cred` (a local-CA credential).
pub(super) fn svid_client(w: &World, cred: &Value) -> reqwest::Client {
    let c = &cred["credential"];
    let identity = (
        c["certificate"].as_str().unwrap().to_owned(),
        c["private_key"].as_str().unwrap().to_owned(),
    );
    client(&w.ca, Some(&identity))
}

#[tokio::test]
async fn a_certificate_bound_token_is_not_exchanged_without_its_certificate() {
    let w = start().await;
    let orchestrator = TestAgent::new("bound", "ES256");
    let sub = TestAgent::new("sub", "ES256");
    w.b.register(&sub, "platform").await;
    let id = format!("spiffe://{TRUST_DOMAIN}/agent/{}", orchestrator.id);
    let mut spec = orchestrator.spec("platform");
    spec["jwks"] = json!({ "keys": [] });
    spec["federated"] = json!({ "issuer": "spiffe", "subject": id });
    spec["delegation"] = json!({ "max_depth": 1, "targets": [sub.id] });
    w.b.admin_post("/v1/agents", &spec).await.expect(201);
    let cert = leaf(&w.ca, Some(&id), false);
    let c = client(&w.ca, Some(&cert));
    let (status, v) = token(&c, &w, &orchestrator.id).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let bound = v["access_token"].as_str().unwrap().to_owned();
    // Introspection names the certificate (RFC 8705 §3.2).
    let i = w.b.introspect(&bound).await;
    assert_eq!(i["active"], true, "{i}");
    assert!(i["cnf"]["x5t#S256"].is_string(), "{i}");

    let exchange = |actor: String| {
        vec![
            (
                "grant_type".to_owned(),
                "urn:ietf:params:oauth:grant-type:token-exchange".to_owned(),
            ),
            ("subject_token".to_owned(), bound.clone()),
            (
                "subject_token_type".to_owned(),
                "urn:ietf:params:oauth:token-type:access_token".to_owned(),
            ),
            ("actor_token".to_owned(), actor),
            (
                "actor_token_type".to_owned(),
                "urn:ietf:params:oauth:token-type:jwt".to_owned(),
            ),
            ("scope".to_owned(), "x509-svid".to_owned()),
        ]
    };
    // On the plain listener, without the certificate: refused.
    let form = exchange(sub.assertion());
    let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = w.b.token_form(&pairs).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    assert!(r.text.contains("client certificate"), "{}", r.text);

    // Over mTLS with the certificate the token is bound to: delegated.
    let r = c
        .post(format!("{}/oauth/token", w.mtls))
        .form(&exchange(sub.assertion()))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn keygate_exec_authenticates_with_an_x509_svid_and_stays_on_it() {
    let w = start().await;
    let agent = TestAgent::new("exec-svid", "ES256");
    let id = register_spiffe(&w.b, &agent).await;
    let (cert, key) = leaf(&w.ca, Some(&id), false);
    std::fs::write(w.dir.join("agent.pem"), &cert).unwrap();
    std::fs::write(w.dir.join("agent-key.pem"), &key).unwrap();
    std::fs::write(w.dir.join("ca.pem"), &w.ca.pem).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("exec")
        .args(["--server", &w.mtls, "--agent", &agent.id])
        .arg("--client-cert")
        .arg(w.dir.join("agent.pem"))
        .arg("--client-key")
        .arg(w.dir.join("agent-key.pem"))
        .arg("--ca-file")
        .arg(w.dir.join("ca.pem"))
        .args(["--scope", "x509-svid", "--pass-session"])
        .args([
            "--",
            "sh",
            "-c",
            r#"printf %s "$KEYGATE_SESSION_TOKEN" > token.txt; test -s "$KEYGATE_X509_SVID_CERTIFICATE_FILE""#,
        ])
        .current_dir(&w.dir)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened = w.b.audit("action=task.opened").await;
    assert_eq!(
        opened.last().unwrap()["details"]["method"],
        "tls_client_auth"
    );
    // The task ended with the command (its completion went over the same
    // certificate), and its credential with it.
    let token = std::fs::read_to_string(w.dir.join("token.txt")).unwrap();
    let intro = w.b.introspect(&token).await;
    assert_eq!(intro["active"], false, "{intro}");
    let leases = w.b.leases(&format!("agent={}", agent.id)).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0]["state"], "revoked");
}
