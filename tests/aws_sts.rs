//! The AWS provider's `assume_role` scopes through Keygate's HTTP API, against
//! a moto server.
//!
//! What moto can and cannot show (moto 5.2):
//! - It returns real-looking STS credentials whose GetCallerIdentity names
//!   the assumed role and the session name, and it honours DurationSeconds
//!   in the expiry: those are checked here as sent.
//! - It does not echo SourceIdentity or session tags, does not enforce
//!   session policies, and validates almost nothing (it accepts a 60 s
//!   duration, non-JSON policies, bad names). So AWS's limits are checked by
//!   Keygate itself, and these tests check Keygate's refusals, never that
//!   AWS would enforce something.
//! - Agent ids are restricted at registration to `[a-z0-9._-]{2,64}`, which
//!   is always a valid SourceIdentity; the free-text agent fields (team,
//!   sponsor) are what can break AWS's tag alphabet, so that is what is
//!   tested here.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use aws_credential_types::Credentials;
use common::aws::{Moto, role_arn};
use common::{TestAgent, TestBroker, rfc3339, start_refused, unix_now};
use reqwest::Method;
use serde_json::{Value, json};

fn scopes() -> String {
    format!(
        r#"
[[scopes]]
name = "reports"
provider = "aws"
max_ttl_secs = 3600
params = {{ kind = "assume_role", role_arn = "{}", session_policy = '{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}}]}}', policy_arns = ["arn:aws:iam::aws:policy/ReadOnlyAccess"], session_tags = {{ cost-center = "42" }} }}
"#,
        role_arn("reports")
    )
}

/// The secret parts of an issued STS credential, as an SDK would use them.
fn sdk_creds(cred: &Value) -> Credentials {
    let c = &cred["credential"];
    Credentials::new(
        c["access_key_id"].as_str().unwrap(),
        c["secret_access_key"].as_str().unwrap(),
        Some(c["session_token"].as_str().unwrap().to_owned()),
        None,
        "keygate-test",
    )
}

async fn caller_arn(moto: &Moto, cred: &Value) -> String {
    let who = moto
        .sts_as(sdk_creds(cred))
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    who.arn().unwrap().to_owned()
}

#[tokio::test]
async fn assume_role_as_sent_and_release_says_it_lives_until_expiry() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let agent = TestAgent::new("reporter", "ES256");
    b.register(&agent, "platform").await;
    // Tasks last 600 s by default in tests; STS needs 900 s at least.
    let s = b.token_ttl(&agent, Some(3600)).await;

    let before = unix_now();
    let cred = b
        .credential(&s.token, "reports", Some(900), None)
        .await
        .expect(201);
    assert_eq!(cred["revocation"], "expires_at", "{cred}");
    let c = &cred["credential"];
    // The session is named after the task and lasts the granted ttl.
    let expected = format!(
        "arn:aws:sts::123456789012:assumed-role/reports/{}",
        s.task_id
    );
    assert_eq!(c["assumed_role_arn"], expected);
    assert_eq!(caller_arn(&moto, &cred).await, expected);
    let expiry = rfc3339(&c["expiration"]).unix_timestamp();
    assert!(
        (before + 895..=unix_now() + 905).contains(&expiry),
        "{cred}"
    );
    assert_eq!(rfc3339(&cred["expires_at"]).unix_timestamp(), expiry);
    assert_eq!(c["region"], "us-east-1");

    // Secrets never reach the store, the log or the audit trail.
    let secret = c["secret_access_key"].as_str().unwrap().to_owned();
    let token = c["session_token"].as_str().unwrap().to_owned();
    let lease = cred["lease_id"].as_str().unwrap();
    let released = b
        .call(
            Method::DELETE,
            &format!("/v1/credentials/{lease}"),
            Some(&s.token),
            None,
        )
        .await
        .expect(200);
    assert_eq!(released["state"], "expiring", "{released}");
    assert_eq!(released["revocation"], "expires_at");
    assert_eq!(rfc3339(&released["lives_until"]).unix_timestamp(), expiry);
    let note = released["note"].as_str().unwrap();
    assert!(
        note.contains("cannot revoke") && note.contains("valid until"),
        "{note}"
    );
    // Honestly so: the released credentials still work until they expire.
    assert_eq!(caller_arn(&moto, &cred).await, expected);

    // Completing the task lists what outlives it.
    let second = b
        .credential(&s.token, "reports", None, None)
        .await
        .expect(201);
    let done = b.complete(&s.token).await.expect(200);
    assert_eq!(
        (
            done["leases"]["found"].as_u64(),
            done["leases"]["expiring"].as_u64()
        ),
        (Some(1), Some(1)),
        "{done}"
    );
    assert_eq!(done["lives_until"][0]["lease_id"], second["lease_id"]);
    assert_eq!(done["lives_until"][0]["scope"], "reports");
    assert!(done["note"].as_str().unwrap().contains("cannot revoke"));
    let revoked = b.audit("action=lease.revoked").await;
    assert_eq!(revoked.len(), 2);
    for ev in &revoked {
        assert_eq!(ev["details"]["state"], "expiring", "{ev}");
        assert!(
            ev["details"]["result"]
                .as_str()
                .unwrap()
                .contains("lives until")
        );
    }

    b.assert_kept_nowhere(&[&secret, &token], lease).await;
}

#[tokio::test]
async fn aws_limits_are_checked_before_calling_aws() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;

    // A lease shorter than STS's 900 s minimum is refused, not stretched.
    let agent = TestAgent::new("short", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let r = b.credential(&s.token, "reports", Some(600), None).await;
    let body = r.expect(400);
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("at least 900 s") && msg.contains("600 s"),
        "{msg}"
    );
    // A task with less than 900 s left cannot get one either.
    let brief = b.token_ttl(&agent, Some(300)).await;
    let r = b.credential(&brief.token, "reports", None, None).await;
    assert!(
        r.expect(400)["message"]
            .as_str()
            .unwrap()
            .contains("at least 900 s")
    );
    let failed = b.leases(&format!("agent={}&state=failed", agent.id)).await;
    assert_eq!(
        failed.len(),
        2,
        "refusals leave failed leases, nothing to revoke"
    );

    // Request params are refused rather than ignored.
    let r = b
        .credential(
            &s.token,
            "reports",
            Some(900),
            Some(json!({"duration": 60})),
        )
        .await;
    assert!(
        r.expect(400)["message"]
            .as_str()
            .unwrap()
            .contains("no request params")
    );

    // A team name outside AWS's tag alphabet cannot become a session tag.
    let odd = TestAgent::new("odd-team", "ES256");
    b.register(&odd, "red team!").await;
    let s = b.token_ttl(&odd, Some(3600)).await;
    let r = b.credential(&s.token, "reports", Some(900), None).await;
    let msg = r.expect(400)["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("session tag `team`") && msg.contains("`red team!`"),
        "{msg}"
    );
}

#[tokio::test]
async fn scopes_aws_would_reject_stop_the_broker_at_start() {
    let moto = Moto::start().await;
    let role = role_arn("reports");
    let arns: Vec<String> = (0..11)
        .map(|i| format!("\"arn:aws:iam::123456789012:policy/p{i}\""))
        .collect();
    let tags: Vec<String> = (0..46).map(|i| format!("t{i} = \"v\"")).collect();
    let statements: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"Effect":"Allow","Action":"s3:GetObject","Resource":"arn:aws:s3:::bucket-{i}/*"}}"#))
        .collect();
    let big_policy = format!(
        r#"{{"Version":"2012-10-17","Statement":[{}]}}"#,
        statements.join(",")
    );
    let cases = [
        (format!("max_ttl_secs = 600\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\" }}"), "at least 900 s"),
        (format!("max_ttl_secs = 7200\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\" }}"), "`max_session_secs`"),
        (format!("max_ttl_secs = 900\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\", max_session_secs = 50000 }}"), "`max_session_secs` must be between"),
        (format!("max_ttl_secs = 900\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\", session_policy = '{{\"Statement\": [' }}"), "not valid json"),
        (format!("max_ttl_secs = 900\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\", session_policy = '{big_policy}' }}"), "aws allows 2048"),
        (format!("max_ttl_secs = 900\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\", policy_arns = [{}] }}", arns.join(",")), "aws allows 10"),
        (format!("max_ttl_secs = 900\nparams = {{ kind = \"assume_role\", role_arn = \"{role}\", session_tags = {{ {} }} }}", tags.join(", ")), "aws allows 50"),
        ("max_ttl_secs = 900\nparams = { kind = \"assume_role\", role_arn = \"arn:aws:iam::123456789012:user/bob\" }".to_owned(), "not an iam role arn"),
        ("max_ttl_secs = 900\nparams = { kind = \"secret\", secret_id = \"x\", keygate_owns_value = true }".to_owned(), "`keygate_owns_value`"),
    ];
    for (scope, needle) in cases {
        let toml = format!("[[scopes]]\nname = \"bad\"\nprovider = \"aws\"\n{scope}\n");
        let out = start_refused(moto.setup(&toml)).await;
        assert!(
            out.contains("scope `bad`") && out.contains(needle),
            "{scope}\n---\n{out}"
        );
    }
}

/// The conformance kit against moto, as for every provider: an
/// `assume_role` session (it cannot be revoked: it must say until when it
/// lives), a plain secret read (nothing to revoke) and a secret Keygate
/// owns and rotates when the lease ends (revocable: the value read stops
/// being current).
#[tokio::test]
async fn the_aws_provider_passes_the_conformance_kit() {
    use keygate_provider_api::{RevokeHandle, ScopeSpec};
    use keygate_provider_testkit::{Case, Check, run};
    use std::time::Duration;

    struct Session<'a>(&'a Moto);
    impl Check for Session<'_> {
        /// Works: GetCallerIdentity with it names the assumed role (moto
        /// maps the session's key to it; a key it never issued does not).
        async fn works(&self, c: &Value) -> Result<bool, String> {
            let creds = sdk_creds(&json!({ "credential": c }));
            let who = self.0.sts_as(creds).get_caller_identity().send().await;
            Ok(who.is_ok_and(|w| {
                w.arn()
                    .is_some_and(|a| a.contains(":assumed-role/reports/"))
            }))
        }
    }
    struct Secret<'a>(&'a Moto, &'a str);
    impl Check for Secret<'_> {
        /// Works: the value read is still the secret's current value.
        async fn works(&self, c: &Value) -> Result<bool, String> {
            let out = self
                .0
                .secrets()
                .get_secret_value()
                .secret_id(self.1)
                .send()
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok(out.secret_string() == c["value"].as_str())
        }
    }

    let moto = Moto::start().await;
    moto.create_role("reports").await;
    moto.create_secret("plain", "plain-value-1").await;
    moto.create_secret("owned", "owned-value-1").await;
    let p = moto.provider();
    let scope = |name: &str, params: Value| ScopeSpec {
        name: name.into(),
        max_ttl: Duration::from_secs(3600),
        params,
    };
    let case = |scope: ScopeSpec, never: Value| Case {
        scope,
        request_params: Value::Null,
        ttl: Duration::from_secs(900),
        never_issued: Some(RevokeHandle(never)),
    };
    let session = case(
        scope(
            "reports",
            json!({ "kind": "assume_role", "role_arn": role_arn("reports") }),
        ),
        json!({ "kind": "assume_role", "role_arn": role_arn("reports"), "expires_at": 1 }),
    );
    let plain = case(
        scope("plain", json!({ "kind": "secret", "secret_id": "plain" })),
        json!({ "kind": "secret", "secret_id": "plain", "version_id": "never-issued", "rotation": "none" }),
    );
    let owned = case(
        scope(
            "owned",
            json!({ "kind": "secret", "secret_id": "owned", "rotate_on_release": true, "keygate_owns_value": true }),
        ),
        json!({ "kind": "secret", "secret_id": "owned", "version_id": "never-issued", "rotation": "keygate" }),
    );
    let mut failures = Vec::new();
    for (kind, r) in [
        ("assume_role", run(&p, &session, &Session(&moto)).await),
        (
            "secret read",
            run(&p, &plain, &Secret(&moto, "plain")).await,
        ),
        (
            "owned secret",
            run(&p, &owned, &Secret(&moto, "owned")).await,
        ),
    ] {
        assert!(
            r.passed.len() >= 8,
            "{kind}: too few checks ran: {:?}",
            r.passed
        );
        failures.extend(r.failed.iter().map(|f| format!("{kind}: {f}")));
    }
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
}
