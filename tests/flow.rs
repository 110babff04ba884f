//! The whole agent flow against the real binary: register, authenticate,
//! obtain an SVID, check it as a relying party, complete, and see it revoked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{JWT_AUDIENCE, TRUST_DOMAIN, TestAgent, TestBroker, rfc3339};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Value, json};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Checks the SVID's shape: one SPIFFE URI SAN naming the agent, clientAuth,
/// and a lifetime within the lease. Returns the serial (hex).
fn check_x509_svid(cred: &Value, agent: &str) -> String {
    let pem = cred["credential"]["certificate"].as_str().unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let want = format!("spiffe://{TRUST_DOMAIN}/agent/{agent}");
    assert_eq!(uris, vec![want.as_str()], "exactly one URI SAN");
    assert_eq!(cred["credential"]["spiffe_id"], want);
    let eku = cert
        .extended_key_usage()
        .unwrap()
        .expect("an EKU extension");
    assert!(eku.value.client_auth, "clientAuth EKU");
    assert!(!cert.is_ca());
    let not_after = cert.validity().not_after.to_datetime();
    assert!(
        not_after <= rfc3339(&cred["expires_at"]),
        "certificate outlives its lease"
    );
    let serial = hex::encode(cert.raw_serial());
    assert_eq!(cred["credential"]["serial"], serial.as_str());
    let key = cred["credential"]["private_key"].as_str().unwrap();
    assert!(
        key.contains("PRIVATE KEY"),
        "the agent gets its private key"
    );
    serial
}

/// Serials (hex) in the CA's DER CRL.
async fn crl_serials(b: &TestBroker) -> Vec<String> {
    let der = b
        .http
        .get(b.url("/v1/providers/ca/crl.der"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    crl.iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect()
}

#[tokio::test]
async fn es256_agent_x509_svid_lifecycle() {
    let b = TestBroker::start().await;
    assert_eq!(b.get("/healthz", None).await.text, "ok");
    assert_eq!(b.get("/readyz", None).await.text, "ready");
    let meta = b
        .get("/.well-known/oauth-authorization-server", None)
        .await
        .expect(200);
    assert_eq!(meta["token_endpoint"], common::token_endpoint());

    let agent = TestAgent::new("flow", "ES256");
    let registered = b.register(&agent, "platform").await;
    assert_eq!(registered["status"], "active");
    assert_eq!(
        b.admin_get(&format!("/v1/agents/{}", agent.id)).await["id"],
        agent.id
    );

    let s = b.token(&agent).await;
    let who = b.get("/v1/session", Some(&s.token)).await.expect(200);
    assert_eq!(who["agent"], agent.id);
    assert_eq!(who["task"]["id"], s.task_id);

    // The session token verifies with the published JWKS under its kid.
    let jwks: JwkSet =
        serde_json::from_value(b.get("/.well-known/jwks.json", None).await.expect(200)).unwrap();
    let header = jsonwebtoken::decode_header(&s.token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("the token's kid is published");
    let mut v = Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[common::ISSUER]);
    v.set_issuer(&[common::ISSUER]);
    let claims =
        jsonwebtoken::decode::<Value>(&s.token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap();
    assert_eq!(claims.claims["sub"], agent.id);
    assert_eq!(claims.claims["task_id"], s.task_id);

    let cred = b.x509(&s.token, Some(300)).await;
    assert_eq!(cred["provider"], "ca");
    assert_eq!(cred["revocation"], "revocable");
    let serial = check_x509_svid(&cred, &agent.id);
    let cert = cred["credential"]["certificate"].as_str().unwrap();
    let lease_id = cred["lease_id"].as_str().unwrap();
    assert_eq!(b.lease_state(lease_id).await, "active");

    let ok = b.verify(&json!({ "x509_svid": cert })).await;
    assert_eq!(ok["valid"], true, "{ok}");
    assert_eq!(
        ok["subject"],
        format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id)
    );
    assert!(!crl_serials(&b).await.contains(&serial));

    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(done["task_id"], s.task_id);
    assert_eq!(done["state"], "completed");
    assert_eq!(
        done["leases"],
        json!({ "found": 1, "revoked": 1, "expiring": 0, "pending": 0 })
    );

    let after = b.verify(&json!({ "x509_svid": cert })).await;
    assert_eq!(after["valid"], false);
    assert_eq!(after["reason"], "revoked");
    assert!(
        crl_serials(&b).await.contains(&serial),
        "serial {serial} in the CRL"
    );
    assert_eq!(b.lease_state(lease_id).await, "revoked");

    let dead = b.get("/v1/session", Some(&s.token)).await;
    assert_eq!(dead.status, 401);
    assert_eq!(dead.error(), "invalid_token");
    let dead = b.credential(&s.token, "x509-svid", None, None).await;
    assert_eq!(dead.status, 401);
}

#[tokio::test]
async fn eddsa_agent_jwt_svid_lifecycle() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("flow-ed", "EdDSA");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;

    let cred = b.jwt_svid(&s.token, Some(120)).await;
    let c = &cred["credential"];
    let token = c["token"].as_str().unwrap();
    let lease_id = cred["lease_id"].as_str().unwrap();
    assert_eq!(c["jti"], lease_id);
    let spiffe = format!("spiffe://{TRUST_DOMAIN}/agent/{}", agent.id);
    assert_eq!(c["spiffe_id"], spiffe);

    // A relying party verifies it with the CA's published JWT-SVID keys.
    let jwks: JwkSet =
        serde_json::from_value(b.get("/v1/providers/ca/jwks.json", None).await.expect(200))
            .unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("kid published");
    let mut v = Validation::new(header.alg);
    v.set_audience(&[JWT_AUDIENCE]);
    let claims = jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], spiffe);
    assert!(claims["exp"].as_i64().unwrap() <= rfc3339(&cred["expires_at"]).unix_timestamp());

    let presented = json!({ "jwt_svid": token, "audience": JWT_AUDIENCE });
    let ok = b.verify(&presented).await;
    assert_eq!(ok["valid"], true, "{ok}");
    assert_eq!(ok["subject"], spiffe);
    let wrong_aud = b
        .verify(&json!({ "jwt_svid": token, "audience": "https://other.test" }))
        .await;
    assert_eq!(wrong_aud["valid"], false);

    // An audience outside the scope's allow-list is refused at issue.
    let refused = b
        .credential(
            &s.token,
            "jwt-svid",
            None,
            Some(json!({ "audience": "https://evil.test" })),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);

    b.complete(&s.token).await.expect(200);
    let after = b.verify(&presented).await;
    assert_eq!(after["valid"], false);
    assert_eq!(after["reason"], "revoked");
    let revoked = b
        .get("/v1/providers/ca/revoked.json", None)
        .await
        .expect(200);
    assert!(
        revoked["jtis"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j == lease_id),
        "{revoked}"
    );
    assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 401);
}

#[tokio::test]
async fn releasing_one_lease_revokes_only_it() {
    let b = TestBroker::start().await;
    let agent = TestAgent::new("release", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let first = b.x509(&s.token, Some(300)).await;
    let second = b.x509(&s.token, Some(300)).await;
    let first_id = first["lease_id"].as_str().unwrap();

    let released = b
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/credentials/{first_id}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
    assert_eq!(released["state"], "revoked");
    let cert = |c: &Value| json!({ "x509_svid": c["credential"]["certificate"] });
    assert_eq!(b.verify(&cert(&first)).await["reason"], "revoked");
    assert_eq!(b.verify(&cert(&second)).await["valid"], true);
    assert_eq!(b.get("/v1/session", Some(&s.token)).await.status, 200);

    // Another agent cannot release this agent's lease.
    let other = TestAgent::new("release-other", "ES256");
    b.register(&other, "platform").await;
    let os = b.token(&other).await;
    let second_id = second["lease_id"].as_str().unwrap();
    let stolen = b
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/credentials/{second_id}"),
            Some(&os.token),
            None,
        )
        .await;
    assert_eq!(stolen.status, 404);
    assert_eq!(b.lease_state(second_id).await, "active");

    let unknown = b.credential(&s.token, "no-such-scope", None, None).await;
    assert_eq!(unknown.status, 404);
    for i in 0..20 {
        let made_up = format!("made-up-scope-{i}");
        assert_eq!(
            b.credential(&s.token, &made_up, None, None).await.status,
            404
        );
    }
    let metrics = b.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    // Only configured scope names label series; the rest share one, and
    // the counts are what happened: 21 unknown, two certificates issued,
    // two tokens (one per task opened).
    assert!(!metrics.text.contains("made-up-scope"), "{}", metrics.text);
    assert!(!metrics.text.contains("no-such-scope"), "{}", metrics.text);
    let value = |series: &str| -> Option<f64> {
        metrics
            .text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    assert_eq!(
        value(r#"keygate_credentials_total{scope="(unknown)",outcome="error"}"#),
        Some(21.0),
        "{}",
        metrics.text
    );
    assert_eq!(
        value(r#"keygate_credentials_total{scope="x509-svid",outcome="issued"}"#),
        Some(2.0),
        "{}",
        metrics.text
    );
    assert_eq!(
        value(r#"keygate_authentications_total{outcome="success"}"#),
        Some(2.0),
        "{}",
        metrics.text
    );
    assert!(
        metrics.text.contains("# TYPE keygate_credentials counter"),
        "{}",
        metrics.text
    );

    // One JSON error contract, operator endpoints included: an oversized
    // body, a wrong method.
    let huge = json!({ "reason": "x".repeat(100_000) });
    let r = b
        .admin_post(&format!("/v1/agents/{}/suspend", other.id), &huge)
        .await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.json()["error"], "payload_too_large", "{}", r.text);
    let r = b
        .call(reqwest::Method::PUT, "/v1/leases", Some(&b.ops.admin), None)
        .await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert_eq!(r.json()["error"], "method_not_allowed", "{}", r.text);
    assert_eq!(
        b.admin_get(&format!("/v1/agents/{}", other.id)).await["status"],
        "active",
        "nothing changed"
    );
    // The log goes to a file here, not a terminal: no colour codes in it.
    let log = b.log();
    assert!(log.contains("request"), "the server logged");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file");
}

/// The README's operator walkthrough, command by command, as a newcomer
/// runs it: the `keygate` binary as a subprocess against a running broker,
/// each answer read.
#[tokio::test]
async fn the_readmes_operator_commands_do_what_it_says() {
    let b = TestBroker::start().await;
    let ok = |out: &std::process::Output, what: &str| -> (String, String) {
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "{what}: {stderr}");
        (stdout, stderr)
    };

    // keys generate: a 0600 private key, and the public JWKS on stdout.
    let out = b
        .cli(
            &[
                "keys",
                "generate",
                "--alg",
                "ES256",
                "--out",
                "my-agent.pem",
            ],
            None,
        )
        .await;
    let (jwks, _) = ok(&out, "keys generate");
    let jwks: Value = serde_json::from_str(&jwks).unwrap();
    let jwk = jwks["keys"][0].clone();
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256")),
        "{jwks}"
    );
    let pem_path = b.dir.join("my-agent.pem");
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    assert!(pem.contains("PRIVATE KEY"));
    assert!(
        !jwks.to_string().contains("\"d\""),
        "no private part in the JWKS"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pem_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // agents register --file: the generated key, in a definition file.
    let id = format!(
        "cli-agent-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let def = format!(
        "id = \"{id}\"\nteam = \"platform\"\nsponsor = \"owner@keygate.test\"\nrisk_tier = 2\nenvironment = \"dev\"\npurpose = \"cli test\"\nauth_method = \"private_key_jwt\"\njwks = {}\n",
        common::config::toml_inline(&jwks)
    );
    std::fs::write(b.dir.join("agent.toml"), def).unwrap();
    let admin = Some(b.ops.admin.as_str());
    ok(
        &b.cli(&["agents", "register", "--file", "agent.toml"], admin)
            .await,
        "agents register",
    );
    let (list, _) = ok(&b.cli(&["agents", "list"], admin).await, "agents list");
    assert!(list.contains(&id), "{list}");

    // The generated key signs in as the agent, and it gets a credential.
    let agent = TestAgent {
        id: id.clone(),
        alg: jsonwebtoken::Algorithm::ES256,
        pem,
        kid: jwk["kid"].as_str().unwrap().to_owned(),
        jwk,
    };
    let s = b.token(&agent).await;
    let cred = b.x509(&s.token, Some(300)).await;
    let lease = cred["lease_id"].as_str().unwrap();

    // A sensitive ask, approved and denied from the CLI.
    // (One pending approval per task and scope: the second ask is its own task.)
    let s2 = b.token(&agent).await;
    let ask = |token: String| {
        let b = &b;
        async move {
            let body = json!({ "scope": "payments-ca", "ttl": 300, "justification": "cli test" });
            let held = b
                .post("/v1/credentials", Some(&token), &body)
                .await
                .expect(202);
            held["approval_id"].as_str().unwrap().to_owned()
        }
    };
    let (first, second) = (ask(s.token.clone()).await, ask(s2.token.clone()).await);
    assert_ne!(first, second);
    let approver = Some(b.ops.approver.as_str());
    let (pending, _) = ok(
        &b.cli(&["approvals", "list"], approver).await,
        "approvals list",
    );
    assert!(
        pending.contains(&first) && pending.contains(&second),
        "{pending}"
    );
    let (approved, _) = ok(
        &b.cli(
            &["approvals", "approve", &first, "--reason", "ticket 17"],
            approver,
        )
        .await,
        "approvals approve",
    );
    assert!(approved.contains("approved"), "{approved}");
    let (denied, _) = ok(
        &b.cli(
            &[
                "approvals",
                "deny",
                &second,
                "--reason",
                "not during the freeze",
            ],
            approver,
        )
        .await,
        "approvals deny",
    );
    assert!(denied.contains("denied"), "{denied}");

    // agents suspend revokes its leases; leases list shows what is left.
    ok(
        &b.cli(
            &["agents", "suspend", &id, "--reason", "investigating"],
            admin,
        )
        .await,
        "agents suspend",
    );
    assert_eq!(b.lease_state(lease).await, "revoked");
    let (revoking, _) = ok(
        &b.cli(&["leases", "list", "--state", "revoking", "--all"], admin)
            .await,
        "leases list",
    );
    assert_eq!(serde_json::from_str::<Value>(&revoking).unwrap(), json!([]));

    // The kill switch by team, as secops.
    let (rv, _) = ok(
        &b.cli(
            &["revoke", "--team", "finance", "--reason", "incident 42"],
            Some(&b.ops.secops),
        )
        .await,
        "revoke --team",
    );
    assert_eq!(
        serde_json::from_str::<Value>(&rv).unwrap()["selector"]["team"],
        "finance"
    );

    // The auditor verifies the chain and tails the agent's events.
    let auditor = Some(b.ops.auditor.as_str());
    let (verified, _) = ok(&b.cli(&["audit", "verify"], auditor).await, "audit verify");
    assert!(verified.contains("audit chain intact"), "{verified}");
    let (tail, _) = ok(
        &b.cli(&["audit", "tail", "--agent", &id], auditor).await,
        "audit tail",
    );
    let actions: Vec<String> = tail
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for want in [
        "agent.registered",
        "lease.issued",
        "approval.requested",
        "agent.suspended",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "{want} not in {actions:?}"
        );
    }
    assert!(
        tail.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["agent"] == id.as_str()),
        "only this agent's events"
    );
}
