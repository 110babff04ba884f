//! Start-up refuses a bad config before it writes anything, says which
//! setting is wrong, and never repeats a value that may be a secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::{Setup, TestAgent, TestBroker};

/// Runs `keygate serve` on the prepared dir; it must exit with an error.
/// Returns its stderr.
async fn refused(b: &TestBroker) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        common::serve_command(&b.dir.join("keygate.toml"), &b.dir)
            .env_remove("KG_TEST_MISSING_SECRET")
            .output(),
    )
    .await
    .expect("keygate exits")
    .unwrap();
    assert!(!out.status.success(), "keygate started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nothing of the broker's state was created.
fn nothing_written(b: &TestBroker) {
    for f in [
        "keygate.db",
        "session-signing-key.pem",
        "ca/ca-key.pem",
        "ca/ca-cert.pem",
    ] {
        assert!(!b.dir.join(f).exists(), "`{f}` was created");
    }
}

#[tokio::test]
async fn a_literal_secret_is_refused_before_any_side_effect() {
    let b = TestBroker::prepare(Setup {
        extra_config: r#"
[providers.vault]
kind = "vault"
address = "http://127.0.0.1:1"
auth = { method = "approle", role_id = "r", secret_id = "s3cr3t-literal-value" }
"#
        .into(),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(err.contains("never the secret itself"), "{err}");
    assert!(!err.contains("s3cr3t-literal-value"), "{err}");
    nothing_written(&b);
}

/// Two `[[federation.issuers]]` entries for one issuer URL: a token is
/// checked against one entry per issuer, so the second would silently never
/// be used; the start is refused, naming both.
#[tokio::test]
async fn two_federation_entries_for_one_issuer_are_refused() {
    let entry = |name: &str, audience: &str| {
        format!(
            "[[federation.issuers]]\nname = \"{name}\"\nissuer = \"https://idp.example.test\"\njwks_url = \"https://idp.example.test/jwks\"\naudience = \"{audience}\"\nalgorithms = [\"RS256\"]\n"
        )
    };
    let b = TestBroker::prepare(Setup {
        extra_config: format!(
            "{}\n{}",
            entry("workloads", "keygate"),
            entry("people", "console")
        ),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(
        err.contains("`workloads` and `people` both name issuer"),
        "{err}"
    );
    nothing_written(&b);
}

#[tokio::test]
async fn a_password_in_the_store_url_is_refused_without_being_repeated() {
    let b = TestBroker::prepare(Setup::default());
    b.set_store_table("url = \"postgres://keygate:pg-literal-pw-42@127.0.0.1:1/keygate\"");
    let err = refused(&b).await;
    assert!(err.contains("`store.password`"), "{err}");
    assert!(!err.contains("pg-literal-pw-42"), "{err}");
    nothing_written(&b);
}

#[tokio::test]
async fn a_parse_error_says_where_without_echoing_the_line() {
    let b = TestBroker::prepare(Setup {
        extra_config: "[notify.slack]\nbot_token = xoxb-1234-literal-token\n".into(),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(err.contains("line "), "{err}");
    assert!(!err.contains("xoxb-1234-literal-token"), "{err}");
    assert!(!err.contains("1234"), "{err}");
    nothing_written(&b);

    // A quoted value of the wrong type is not repeated either.
    let b = TestBroker::prepare(Setup {
        extra_config: "[limits]\nper_agent_per_minute = \"hunter2-password\"\n".into(),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains("line "), "{err}");
}

#[tokio::test]
async fn a_missing_secret_reference_stops_start_up_and_is_named() {
    let b = TestBroker::prepare(Setup {
        extra_config: r##"
[notify.slack]
bot_token = "env:KG_TEST_MISSING_SECRET"
signing_secret = "file:/nonexistent/keygate-signing-secret"
default_channel = "#approvals"
"##
        .into(),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(err.contains("notify.slack.bot_token"), "{err}");
    assert!(err.contains("env:KG_TEST_MISSING_SECRET"), "{err}");
    nothing_written(&b);
}

/// serde names an unknown enum value back ("unknown variant `…`"): a secret
/// pasted into `roles` is not repeated, the accepted values are (found by
/// the coverage-guided config fuzzer).
#[tokio::test]
async fn an_unknown_value_is_named_by_its_setting_not_repeated() {
    let b = TestBroker::prepare(Setup {
        extra_config: "[[operators]]\nname = \"pasted\"\nroles = [\"xoxb-5678-pasted-secret\"]\ntoken_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n".into(),
        ..Setup::default()
    });
    let err = refused(&b).await;
    assert!(err.contains("unknown variant `…`"), "{err}");
    assert!(err.contains("expected one of"), "{err}");
    assert!(
        !err.contains("5678") && !err.contains("pasted-secret"),
        "{err}"
    );
    nothing_written(&b);
}

/// The shipped `config/keygate.toml`, started as shipped (only the listen
/// address moved to a free port), serves the README's examples: the demo
/// agent's `cargo run --example agent` and `--example delegation` run
/// against it and succeed.
#[tokio::test]
async fn the_shipped_config_serves_the_readmes_examples() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/keygate.toml"),
    )
    .unwrap();
    let b = common::example::ExampleBroker::start("keygate.toml", &text, Vec::new()).await;
    for (example, says) in [
        ("agent", vec!["revoked"]),
        (
            "delegation",
            vec![
                "(delegated)",
                "outside its slice gets: 403",
                "token gets: 401",
            ],
        ),
    ] {
        let out = b.run_example(example, &[]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "example `{example}`: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for s in says {
            assert!(
                stdout.contains(s),
                "example `{example}` does not say `{s}`: {stdout}"
            );
        }
    }
}

/// `config/examples/postgres.toml`'s `[store]` serves two replicas: pointed
/// at a real PostgreSQL (its host, port, database and user swapped for the
/// harness cluster's, TLS off for a cluster without it), with its password
/// by the example's reference. A task opened on one is served by the other.
#[tokio::test]
async fn the_postgres_example_store_serves_two_replicas() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example: toml::Table = std::fs::read_to_string(repo.join("config/examples/postgres.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let store = example["store"].as_table().unwrap();
    let shipped_url = store["url"].as_str().unwrap();
    let reference = store["password"].as_str().unwrap();
    let env = reference
        .strip_prefix("env:")
        .expect("the example names its password by env: reference");
    let pg = common::store::cluster();
    let db = format!("kg_example_{}", uuid::Uuid::new_v4().simple());
    let url = pg.create_database(&db);
    let (_, query) = shipped_url.split_once('?').unwrap();
    assert!(query.contains("sslmode=verify-full"), "{shipped_url}");

    let mut b = TestBroker::prepare(Setup::default());
    b.set_store_table(&format!(
        "url = \"{url}?sslmode=disable\"\npassword = \"{reference}\""
    ));
    b.env.push((env.to_owned(), pg.password.clone()));
    b.start_again().await;
    let mut other = b.replica();
    other.start_again().await;
    let agent = TestAgent::new("on-postgres", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    other.x509(&s.token, Some(60)).await;
    other.complete(&s.token).await.expect(200);
    let r = b.credential(&s.token, "x509-svid", Some(60), None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert!(
        !b.dir.join("keygate.db").exists(),
        "the broker used SQLite, not the example's store"
    );
    assert!(
        !b.log().contains(&pg.password),
        "the password reached the log"
    );
    let out = b.cli(&["audit", "verify"], Some(&b.ops.auditor)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_bad_worker_count_is_refused_by_name_and_a_good_one_serves() {
    let b = TestBroker::prepare(Setup::default());
    let config = b.dir.join("keygate.toml");
    // Tokio itself would panic on these (exit 101, a backtrace hint).
    for bad in ["0", "two", "-1", "", "1.5"] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            common::serve_command(&config, &b.dir)
                .env("TOKIO_WORKER_THREADS", bad)
                .output(),
        )
        .await
        .expect("keygate exits")
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "`{bad}`: {err}");
        assert!(
            err.contains("TOKIO_WORKER_THREADS must be a whole number above 0"),
            "`{bad}`: {err}"
        );
        assert!(!err.contains("panicked"), "`{bad}`: {err}");
        nothing_written(&b);
    }
    // One thread, and more threads than cores: both serve.
    for good in ["1", "5"] {
        let mut child = common::serve_command(&config, &b.dir)
            .env("TOKIO_WORKER_THREADS", good)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
            child.stdout.take().unwrap(),
        ));
        let addr =
            tokio::time::timeout(Duration::from_secs(30), common::listening_addr(&mut lines))
                .await
                .expect("keygate starts")
                .unwrap_or_else(|| panic!("keygate with {good} worker threads exited"));
        let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        assert_eq!(r.status(), 200, "{good} worker threads");
        child.kill().await.unwrap();
    }
}

/// A broker whose agent holds a live X.509-SVID, stopped: its task and the
/// credential.
async fn stopped_holding_a_certificate(
    prefix: &str,
) -> (TestBroker, common::Session, serde_json::Value) {
    let mut b = TestBroker::start().await;
    let agent = TestAgent::new(prefix, "ES256");
    b.register(&agent, "platform").await;
    let s = b.token(&agent).await;
    let cred = b.x509(&s.token, Some(600)).await;
    b.stop_gracefully().await;
    (b, s, cred)
}

/// The config with the local CA `ca` renamed `ca2`, its scopes too.
fn ca_renamed(config: &str) -> String {
    config
        .replace("[providers.ca]", "[providers.ca2]")
        .replace(r#"provider = "ca""#, r#"provider = "ca2""#)
}

/// Provider names are the store's keys: a provider still holding live
/// credentials cannot be renamed (or removed) away, so none is left that
/// could be neither revoked nor checked. Once what it holds has ended,
/// the rename starts; on SQLite the CA's revocation list is its file, kept
/// across the rename, while on PostgreSQL it is kept by name, so a rename
/// still waits for the revoked credentials to expire.
#[tokio::test]
async fn a_provider_still_holding_credentials_is_not_renamed_away() {
    use common::store::{Engine, engine};
    let (mut b, s, cred) = stopped_holding_a_certificate("renamed").await;
    let cert = cred["credential"]["certificate"]
        .as_str()
        .unwrap()
        .to_owned();

    let config = b.dir.join("keygate.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let renamed = ca_renamed(&original);
    assert!(renamed.contains("[providers.ca2]") && !renamed.contains(r#"provider = "ca""#));
    std::fs::write(&config, &renamed).unwrap();
    let err = refused(&b).await;
    assert!(
        err.contains("provider `ca` is not configured, but the store holds 1 live lease(s)")
            && err.contains("under the same name")
            && err.contains("abandoned_providers"),
        "{err}"
    );

    // Back under its name, nothing was lost: the lease is there to end.
    std::fs::write(&config, &original).unwrap();
    b.start_again().await;
    b.complete(&s.token).await.expect(200);
    let lease = cred["lease_id"].as_str().unwrap();
    assert_eq!(b.lease_state(lease).await, "revoked");
    b.stop_gracefully().await;

    std::fs::write(&config, &renamed).unwrap();
    match engine() {
        Engine::Sqlite => {
            b.start_again().await;
            let v = b
                .post(
                    "/v1/providers/ca2/verify",
                    None,
                    &serde_json::json!({ "x509_svid": cert }),
                )
                .await
                .expect(200);
            assert_eq!(v["reason"], "revoked", "the renamed CA still lists it: {v}");
        }
        Engine::Postgres => {
            let err = refused(&b).await;
            assert!(
                err.contains("provider `ca` is not configured, but the store holds 1 revocation(s) its local CA still serves"),
                "{err}"
            );
        }
    }
}

/// A provider whose backend is gone for good can be given up: listed in
/// `[leases] abandoned_providers`, it no longer stops the start, and that
/// is audited; listing one still configured is refused.
#[tokio::test]
async fn a_provider_given_up_in_config_no_longer_stops_the_start() {
    let (mut b, _, _) = stopped_holding_a_certificate("abandoned").await;
    let config = b.dir.join("keygate.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    assert!(original.contains("[leases]\n"), "{original}");
    std::fs::write(
        &config,
        original.replace("[leases]\n", "[leases]\nabandoned_providers = [\"ca\"]\n"),
    )
    .unwrap();
    let err = refused(&b).await;
    assert!(err.contains("names `ca`, which is configured"), "{err}");

    let gone =
        ca_renamed(&original).replace("[leases]\n", "[leases]\nabandoned_providers = [\"ca\"]\n");
    std::fs::write(&config, gone).unwrap();
    b.start_again().await;
    let ev = b.audit("action=provider.abandoned").await;
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["details"]["provider"], "ca", "{ev:?}");
    assert_eq!(ev[0]["details"]["live_leases"], 1, "{ev:?}");
}
