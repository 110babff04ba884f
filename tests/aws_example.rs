//! `config/examples/aws.toml` works as shipped: the broker starts on it and,
//! pointed at a moto server instead of AWS, the demo agent gets every AWS
//! scope it defines. (moto's limits: see `aws_sts.rs`.)
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::aws::Moto;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A demo-agent client assertion for the example's issuer.
fn assertion(repo: &Path) -> String {
    let pem = std::fs::read(repo.join("examples/keys/demo-agent.pem")).unwrap();
    let now = common::unix_now();
    let claims = json!({
        "iss": "demo-agent", "sub": "demo-agent", "aud": "http://127.0.0.1:8470/oauth/token",
        "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
    });
    let key = EncodingKey::from_ec_pem(&pem).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap()
}

#[tokio::test]
async fn the_aws_example_config_serves_its_scopes() {
    let moto = Moto::start().await;
    moto.create_role("keygate-reports").await;
    for (name, value) in [
        ("example/reports/api-key", "key-1"),
        ("example/reports/db-readonly", "db-1"),
    ] {
        moto.create_secret(name, value).await;
    }
    // The example, as shipped, with its endpoint line switched on.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("keygate-example-{}", uuid::Uuid::new_v4()));
    copy_dir(&repo.join("config/policies"), &dir.join("config/policies"));
    copy_dir(&repo.join("config/agents"), &dir.join("config/agents"));
    let example = std::fs::read_to_string(repo.join("config/examples/aws.toml")).unwrap();
    let commented = "# endpoint_url = \"http://127.0.0.1:5000\"";
    assert!(
        example.contains(commented),
        "the example's endpoint line moved"
    );
    let example = example.replace(commented, &format!("endpoint_url = \"{}\"", moto.url));
    std::fs::write(dir.join("aws.toml"), example).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "--config", "aws.toml", "--listen", "127.0.0.1:0"])
        .envs(Moto::broker_env())
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("keygate listening on ") {
                return a.trim().to_owned();
            }
        }
        panic!("keygate exited without serving the example config");
    })
    .await
    .expect("keygate to start on the example config");

    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "demo-agent"),
        ("client_assertion_type", common::JWT_BEARER),
        ("client_assertion", &assertion(repo)),
        ("task", "example config test"),
        ("ttl", "3600"),
    ];
    let token: Value = http
        .post(url("/oauth/token"))
        .form(&form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = token["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{token}"));
    for (scope, field) in [
        ("reports-read", "session_token"),
        ("reports-api-key", "value"),
        ("reports-db-readonly", "value"),
    ] {
        let resp = http
            .post(url("/v1/credentials"))
            .bearer_auth(session)
            .json(&json!({ "scope": scope, "ttl": 900 }))
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status.as_u16(), 201, "{scope}: {body}");
        assert!(body["credential"][field].is_string(), "{scope}: {body}");
    }
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}
