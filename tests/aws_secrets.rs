//! The AWS provider's `secret` scopes through Keygate's HTTP API, against a
//! moto server: brokered reads, rotation when the lease ends, and Keygate's
//! own `aws-sm:` secret references.
//!
//! moto keeps secret versions and stages faithfully for GetSecretValue,
//! PutSecretValue and DescribeSecret. Its RotateSecret needs no rotation
//! Lambda and makes a new (empty) version current at once, where AWS would
//! run the secret's rotation function and finish later: the RotateSecret
//! test shows only that Keygate asks for the rotation and confirms once the
//! new version is current, not that a real rotation function ran.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aws_sdk_secretsmanager::primitives::Blob;
use common::aws::Moto;
use common::{TestAgent, TestBroker, eventually};
use keygate_provider_api::{ProviderError, SecretRef, SecretResolver};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::Value;

const SCOPES: &str = r#"
[[scopes]]
name = "plain"
provider = "aws"
max_ttl_secs = 600
params = { kind = "secret", secret_id = "plain" }

[[scopes]]
name = "blob"
provider = "aws"
max_ttl_secs = 600
params = { kind = "secret", secret_id = "blob" }

[[scopes]]
name = "owned"
provider = "aws"
max_ttl_secs = 600
params = { kind = "secret", secret_id = "owned", rotate_on_release = true, keygate_owns_value = true }

[[scopes]]
name = "rotated"
provider = "aws"
max_ttl_secs = 600
params = { kind = "secret", secret_id = "rotated", rotate_on_release = true }
"#;

/// The secret's current value and version id.
async fn current(moto: &Moto, name: &str) -> (String, String) {
    let out = moto
        .secrets()
        .get_secret_value()
        .secret_id(name)
        .send()
        .await
        .unwrap();
    (
        out.secret_string().unwrap_or_default().to_owned(),
        out.version_id().unwrap().to_owned(),
    )
}

/// The version id holding `AWSCURRENT`, from the secret's metadata (moto's
/// rotation without a Lambda leaves that version without a value).
async fn current_version(moto: &Moto, name: &str) -> Option<String> {
    let out = moto
        .secrets()
        .describe_secret()
        .secret_id(name)
        .send()
        .await
        .unwrap();
    out.version_ids_to_stages()?
        .iter()
        .find(|(_, stages)| stages.iter().any(|s| s == "AWSCURRENT"))
        .map(|(v, _)| v.clone())
}

async fn start(moto: &Moto) -> (TestBroker, common::Session) {
    let b = TestBroker::start_with(moto.setup(SCOPES)).await;
    let agent = TestAgent::new("reader", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    (b, s)
}

async fn release(b: &TestBroker, session: &str, cred: &Value) -> Value {
    let path = format!("/v1/credentials/{}", cred["lease_id"].as_str().unwrap());
    b.call(Method::DELETE, &path, Some(session), None)
        .await
        .expect(200)
}

#[tokio::test]
async fn brokered_reads_have_nothing_to_revoke() {
    let moto = Moto::start().await;
    moto.create_secret("plain", "db-password-1").await;
    moto.secrets()
        .create_secret()
        .name("blob")
        .secret_binary(Blob::new(vec![0u8, 159, 146, 150]))
        .send()
        .await
        .unwrap();
    let (b, s) = start(&moto).await;

    let cred = b
        .credential(&s.token, "plain", None, None)
        .await
        .expect(201);
    assert_eq!(cred["revocation"], "not_applicable", "{cred}");
    let c = &cred["credential"];
    assert_eq!(
        (c["value"].as_str(), c["encoding"].as_str()),
        (Some("db-password-1"), Some("text"))
    );
    let (_, version) = current(&moto, "plain").await;
    assert_eq!(c["version_id"], version.as_str());
    assert!(
        c["secret_arn"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:secretsmanager:us-east-1:123456789012:secret:plain")
    );
    let blob = b.credential(&s.token, "blob", None, None).await.expect(201);
    assert_eq!(
        (
            blob["credential"]["value"].as_str(),
            blob["credential"]["encoding"].as_str()
        ),
        (Some("AJ+Slg=="), Some("base64"))
    );

    let released = release(&b, &s.token, &cred).await;
    assert_eq!(
        (released["state"].as_str(), released["revocation"].as_str()),
        (Some("revoked"), Some("not_applicable")),
        "{released}"
    );
    assert!(
        released["note"]
            .as_str()
            .unwrap()
            .starts_with("nothing to revoke"),
        "{released}"
    );
    assert_eq!(
        current(&moto, "plain").await.0,
        "db-password-1",
        "a plain read rotates nothing"
    );
    let ev = b.audit("action=lease.revoked").await;
    assert_eq!(ev[0]["details"]["result"], "nothing to revoke", "{ev:?}");
    // The value itself is nowhere in the broker's records.
    b.assert_kept_nowhere(&["db-password-1"], cred["lease_id"].as_str().unwrap())
        .await;
}

#[tokio::test]
async fn keygate_owned_values_are_replaced_when_the_lease_ends() {
    let moto = Moto::start().await;
    moto.create_secret("owned", "initial-value").await;
    let (b, s) = start(&moto).await;

    let cred = b
        .credential(&s.token, "owned", None, None)
        .await
        .expect(201);
    assert_eq!(cred["revocation"], "revocable");
    assert_eq!(cred["credential"]["value"], "initial-value");
    let released = release(&b, &s.token, &cred).await;
    assert_eq!(released["state"], "revoked", "{released}");
    let (value, version) = current(&moto, "owned").await;
    assert_ne!(
        value, "initial-value",
        "the value the agent saw is no longer current"
    );
    assert!(value.len() >= 43, "a fresh random value: {value}");
    assert_eq!(
        version,
        cred["lease_id"].as_str().unwrap(),
        "the lease id names the new version"
    );

    // Two reads of the new value in one task: completing it rotates again,
    // once the second lease finds the value already replaced.
    let a = b
        .credential(&s.token, "owned", None, None)
        .await
        .expect(201);
    let c = b
        .credential(&s.token, "owned", None, None)
        .await
        .expect(201);
    assert_eq!(a["credential"]["value"], value.as_str());
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(
        (
            done["leases"]["found"].as_u64(),
            done["leases"]["revoked"].as_u64()
        ),
        (Some(2), Some(2)),
        "{done}"
    );
    let (after, version) = current(&moto, "owned").await;
    assert_ne!(after, value);
    assert!(
        version == a["lease_id"] || version == c["lease_id"],
        "{version}"
    );
    assert!(!b.log().contains(&after) && !b.log().contains(&value));
}

#[tokio::test]
async fn rotate_secret_is_confirmed_once_the_new_version_is_current() {
    let moto = Moto::start().await;
    moto.create_secret("rotated", "managed-value").await;
    let (b, s) = start(&moto).await;

    let cred = b
        .credential(&s.token, "rotated", None, None)
        .await
        .expect(201);
    let lease = cred["lease_id"].as_str().unwrap().to_owned();
    release(&b, &s.token, &cred).await;
    // The first attempt only starts the rotation; a retry confirms it.
    let state = eventually("the rotation to be confirmed", || {
        let b = &b;
        let lease = lease.clone();
        async move {
            let state = b.lease_state(&lease).await;
            (state != "revoking").then_some(state)
        }
    })
    .await;
    assert_eq!(state, "revoked");
    assert_eq!(
        current_version(&moto, "rotated").await.as_deref(),
        Some(lease.as_str())
    );
    let failed = b.audit("action=lease.revoked").await;
    let waits: Vec<&Value> = failed
        .iter()
        .filter(|e| e["outcome"] != "success")
        .collect();
    assert!(
        waits.iter().all(|e| e["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("waiting for its new version")),
        "{failed:?}"
    );
    assert!(
        !waits.is_empty(),
        "the first attempt reports the wait: {failed:?}"
    );
}

#[tokio::test]
async fn aws_sm_references_read_the_current_value() {
    let moto = Moto::start().await;
    moto.create_secret("keygate/vault-approle-secret-id", "first")
        .await;
    let resolver = SecretResolver::new().with_source(std::sync::Arc::new(
        keygate_provider_aws::SecretsManagerSource::from_client(moto.secrets()),
    ));
    let r: SecretRef = "aws-sm:keygate/vault-approle-secret-id".parse().unwrap();
    assert_eq!(resolver.resolve(&r).await.unwrap().expose_secret(), "first");
    // Read at the point of use: a rotated value is picked up.
    moto.secrets()
        .put_secret_value()
        .secret_id("keygate/vault-approle-secret-id")
        .secret_string("second")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resolver.resolve(&r).await.unwrap().expose_secret(),
        "second"
    );
    let missing: SecretRef = "aws-sm:no-such-secret".parse().unwrap();
    let err = resolver.resolve(&missing).await.unwrap_err();
    assert!(matches!(err, ProviderError::Refused(_)), "{err}");
    assert!(
        err.to_string().contains("ResourceNotFoundException"),
        "{err}"
    );
}

/// Slack's signing secret by `aws-sm:` reference: the hook verifies clicks
/// with it (a forged click is 401, a signed one is read), where before the
/// notifier had no `aws-sm` source and every click got 500.
#[tokio::test]
async fn slack_secrets_resolve_through_aws_secrets_manager() {
    use hmac::{Hmac, Mac};
    let moto = Moto::start().await;
    moto.create_secret("keygate/slack-signing", "slack-signing-secret-value")
        .await;
    moto.create_secret("keygate/slack-bot", "xoxb-from-secrets-manager")
        .await;
    let mut setup = moto.setup(SCOPES);
    setup.extra_config.push_str(
        r##"
[notify.slack]
bot_token = "aws-sm:keygate/slack-bot"
signing_secret = "aws-sm:keygate/slack-signing"
default_channel = "#approvals"
api_url = "http://127.0.0.1:1/api"
"##,
    );
    let b = TestBroker::start_with(setup).await;
    let body = "payload=%7B%22type%22%3A%22block_actions%22%7D";
    let ts = common::unix_now();
    let sign = |secret: &str| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("v0:{ts}:{body}").as_bytes());
        format!("v0={}", hex::encode(mac.finalize().into_bytes()))
    };
    let post = |sig: String| {
        b.http
            .post(b.url("/v1/hooks/slack/interactions"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sig)
            .body(body)
            .send()
    };
    let forged = post(sign("not-the-secret")).await.unwrap();
    assert_eq!(forged.status(), 401);
    let signed = post(sign("slack-signing-secret-value")).await.unwrap();
    let status = signed.status();
    let text = signed.text().await.unwrap();
    assert_ne!(status, 500, "{text}");
    assert_ne!(status, 401, "the signature checks out: {text}");
    assert!(!b.log().contains("slack-signing-secret-value"));
}

/// A secret read with `rotate_on_release` whose lease simply runs out is
/// rotated then too (it goes through the revocation queue at its TTL), so
/// the value the agent saw does not stay current forever.
#[tokio::test]
async fn a_rotating_secret_is_rotated_when_its_lease_runs_out() {
    let moto = Moto::start().await;
    moto.create_secret("owned", "value-at-read").await;
    let (b, s) = start(&moto).await;
    let cred = b
        .credential(&s.token, "owned", Some(2), None)
        .await
        .expect(201);
    let lease = cred["lease_id"].as_str().unwrap().to_owned();
    eventually("the lease to end through the queue", || async {
        (b.lease_state(&lease).await == "revoked").then_some(())
    })
    .await;
    let (value, _) = current(&moto, "owned").await;
    assert_ne!(
        value, "value-at-read",
        "the value the agent saw is no longer current"
    );
    let ev = b.audit("action=lease.ttl_reached").await;
    assert!(ev.iter().any(|e| e["lease"] == lease.as_str()), "{ev:?}");
}
