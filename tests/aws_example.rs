//! `config/examples/aws.toml` works as shipped: the broker starts on it and,
//! pointed at a moto server instead of AWS, the demo agent gets every AWS
//! scope it defines. (moto's limits: see `aws_sts.rs`.)
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::aws::Moto;
use common::example::{ExampleBroker, example_text, switch_line};

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
    let example = switch_line(
        &example_text("aws.toml"),
        "# endpoint_url = \"http://127.0.0.1:5000\"",
        &format!("endpoint_url = \"{}\"", moto.url),
    );
    let b = ExampleBroker::start("aws.toml", &example, Moto::broker_env()).await;
    let session = b.demo_session().await;
    for (scope, field) in [
        ("reports-read", "session_token"),
        ("reports-api-key", "value"),
        ("reports-db-readonly", "value"),
    ] {
        let body = b.credential(&session, scope, 900).await;
        assert!(body["credential"][field].is_string(), "{scope}: {body}");
    }
}
