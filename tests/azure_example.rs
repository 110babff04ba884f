//! `config/examples/azure.toml` works as shipped: the broker starts on it
//! and, pointed at the Entra and Graph stand-ins instead of Azure, the demo
//! agent gets both Azure scopes it defines; the app password is removed
//! when the task ends. (The stand-ins' limits: see `azure_flow.rs`.)
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::azure::{
    APP_CLIENT, APP_OBJECT, AzurePeers, KEYGATE_CLIENT, READER_CLIENT, RESOURCE, TENANT,
};
use common::example::{ExampleBroker, example_text, switch_line};

#[tokio::test]
async fn the_azure_example_config_serves_its_scopes() {
    let peers = AzurePeers::start().await;
    let mut example = example_text("azure.toml");
    // The stand-ins know the example's tenant and apps.
    for id in [
        TENANT,
        KEYGATE_CLIENT,
        APP_OBJECT,
        APP_CLIENT,
        READER_CLIENT,
    ] {
        assert!(example.contains(id), "the example no longer names `{id}`");
    }
    // As shipped, with its endpoint lines switched on.
    for (line, with) in [
        (
            "# authority_host = \"https://login.microsoftonline.us\"",
            format!("authority_host = \"{}\"", peers.token.authority()),
        ),
        (
            "# graph_endpoint = \"https://graph.microsoft.us/v1.0\"",
            format!("graph_endpoint = \"{}\"", peers.graph.url),
        ),
        (
            "# ca_file = \"config/azure-extra-roots.pem\"",
            format!("ca_file = \"{}\"", peers.ca_file.display()),
        ),
    ] {
        example = switch_line(&example, line, &with);
    }
    let env = vec![
        (
            "KEYGATE_AZURE_CLIENT_SECRET".to_owned(),
            peers.keygate_secret.clone(),
        ),
        (
            "ARM_READER_CLIENT_SECRET".to_owned(),
            peers.reader_secret.clone(),
        ),
    ];
    let b = ExampleBroker::start("azure.toml", &example, env).await;
    let session = b.demo_session().await;
    let password = b.credential(&session, "deploy-bot-secret", 900).await;
    let secret = password["credential"]["client_secret"].as_str().unwrap();
    assert!(peers.graph.secret_works(APP_OBJECT, secret));
    let token = b.credential(&session, "arm-reader-token", 900).await;
    assert_eq!(token["revocation"], "expires_at");
    let access = token["credential"]["access_token"].as_str().unwrap();
    assert!(peers.graph.token_valid_for(access, RESOURCE));
    b.complete(&session).await;
    assert!(!peers.graph.secret_works(APP_OBJECT, secret));
}
