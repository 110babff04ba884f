//! The Azure test peers: a test CA (rcgen) in a temp dir, the Entra token
//! endpoint stand-in (`oauth2-mock-server` under node, started from
//! `tests/azure/token-server.mjs`) and the Graph fake (`graph_fake.rs`),
//! both over HTTPS on 127.0.0.1, and a broker configured with an `azure`
//! provider pointing at them. A missing node or package fails the test with
//! the command that installs it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio_rustls::rustls;

use super::Setup;
pub use super::graph_fake::{GraphFake, Password};

/// The test tenant.
pub const TENANT: &str = "8e1f3a52-6c1d-4b8e-9f10-3c5a0d2b7e41";
/// Keygate's own app registration (its Graph identity).
pub const KEYGATE_CLIENT: &str = "0b6a1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d";
/// Keygate's identity when it authenticates with workload identity.
pub const KEYGATE_WI_CLIENT: &str = "1d2e3f4a-5b6c-4d7e-8f90-a1b2c3d4e5f7";
/// The app registration `app_password` scopes add passwords to.
pub const APP_OBJECT: &str = "5d7e3f10-2b4c-4d6e-9f80-a1b2c3d4e5f6";
/// Its client id.
pub const APP_CLIENT: &str = "c3f1a9e2-7b6d-4e5f-8a9b-0c1d2e3f4a5b";
/// The app an `access_token` scope gets tokens as.
pub const READER_CLIENT: &str = "9a8b7c6d-5e4f-4321-8fed-cba987654321";
/// The resource its tokens are for.
pub const RESOURCE: &str = "https://management.azure.com";
/// The environment variables the broker reads the two apps' secrets from.
pub const KEYGATE_SECRET_ENV: &str = "KEYGATE_TEST_AZURE_GRAPH_SECRET";
pub const READER_SECRET_ENV: &str = "KEYGATE_TEST_AZURE_READER_SECRET";
/// How long the reader app's tokens live (the token server's setting).
pub const READER_TOKEN_SECS: u64 = 1200;
/// The federated identity credential on [`KEYGATE_WI_CLIENT`]: the
/// workload issuer and subject Entra trusts, and the audience Entra
/// requires of every federated assertion.
pub const WI_ISSUER: &str = "https://oidc.cluster.test";
pub const WI_SUBJECT: &str = "system:serviceaccount:keygate:broker";
pub const WI_AUDIENCE: &str = "api://AzureADTokenExchange";

/// The Entra token endpoint stand-in; killed on drop.
pub struct TokenServer {
    pub port: u16,
    pub issuer: String,
    _child: Child,
}

impl TokenServer {
    /// The authority host Keygate is configured with.
    pub fn authority(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/{TENANT}/discovery/v2.0/keys", self.authority())
    }

    async fn start(config: &Path) -> Self {
        let mut child = super::peers::spawn_node("token-server.mjs", &[config], Stdio::null());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the token server to print its port")
            .unwrap()
            .unwrap_or_else(|| panic!("the token server exited at start (see its stderr above)"));
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("token server said `{line}`: {e}"));
        Self {
            port: v["port"].as_u64().unwrap() as u16,
            issuer: v["issuer"].as_str().unwrap().to_owned(),
            _child: child,
        }
    }
}

/// The two stand-ins and everything Keygate needs to reach them.
pub struct AzurePeers {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    pub token: TokenServer,
    pub graph: GraphFake,
    /// Keygate's own client secret (the token server's record of it).
    pub keygate_secret: String,
    /// The reader app's client secret.
    pub reader_secret: String,
    /// A client that trusts the test CA.
    pub http: reqwest::Client,
    /// The workload issuer's signing key (PKCS#8 PEM, ES256) and `kid`.
    wi_key: (String, String),
}

impl Drop for AzurePeers {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl AzurePeers {
    /// Starts both stand-ins with [`APP_OBJECT`] registered in Graph.
    pub async fn start() -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir =
            std::env::temp_dir().join(format!("keygate-azure-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = super::https::TestPki::new("keygate azure test ca");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        std::fs::write(dir.join("server.pem"), &pki.server_cert_pem).unwrap();
        std::fs::write(dir.join("server-key.pem"), &pki.server_key_pem).unwrap();
        let (wi_pem, wi_public) = keygate::identity::generate_agent_key("ES256").unwrap();
        let keygate_secret = format!("kg~{}", uuid::Uuid::new_v4().simple());
        let reader_secret = format!("rd~{}", uuid::Uuid::new_v4().simple());
        let config = json!({
            "key": dir.join("server-key.pem"),
            "cert": dir.join("server.pem"),
            "tenant": TENANT,
            "clients": {
                KEYGATE_CLIENT: { "secret": keygate_secret, "lifetime": 3600 },
                KEYGATE_WI_CLIENT: {
                    "secret": null, "lifetime": 3600,
                    "federated": {
                        "issuer": WI_ISSUER, "subject": WI_SUBJECT,
                        "audience": WI_AUDIENCE, "jwk": wi_public.jwk,
                    },
                },
                READER_CLIENT: { "secret": reader_secret, "lifetime": READER_TOKEN_SECS },
            },
        });
        std::fs::write(dir.join("keygate-secret"), &keygate_secret).unwrap();
        std::fs::write(dir.join("reader-secret"), &reader_secret).unwrap();
        let config_file = dir.join("token-server.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let token = TokenServer::start(&config_file).await;
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(pki.ca_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let tls = pki.server_config();
        let graph = GraphFake::start(tls, &http, &token.jwks_url(), &token.issuer).await;
        graph.add_app(APP_OBJECT);
        Self {
            dir,
            ca_file,
            token,
            graph,
            keygate_secret,
            reader_secret,
            http,
            wi_key: (
                secrecy::ExposeSecret::expose_secret(&wi_pem).to_owned(),
                wi_public.kid,
            ),
        }
    }

    /// A workload token from the federation issuer Entra trusts for
    /// [`KEYGATE_WI_CLIENT`], for `subject`, expiring in `exp_in` seconds
    /// (negative: already expired) — what a projected service-account
    /// token file holds.
    pub fn workload_token(&self, subject: &str, exp_in: i64) -> String {
        let now = super::unix_now();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.wi_key.1.clone());
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.wi_key.0.as_bytes()).unwrap();
        let claims = json!({
            "iss": WI_ISSUER, "sub": subject, "aud": [WI_AUDIENCE],
            "iat": now, "nbf": now, "exp": now + exp_in,
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// The `[providers.azure]` tables pointing at the stand-ins, Keygate
    /// authenticating with its client secret from [`KEYGATE_SECRET_ENV`].
    pub fn provider_toml(&self, sweep_secs: u64) -> String {
        format!(
            r#"[providers.azure]
kind = "azure"
tenant_id = "{TENANT}"
authority_host = "{authority}"
graph_endpoint = "{graph}"
ca_file = "{ca}"
sweep_interval_secs = {sweep_secs}

[providers.azure.auth]
method = "client_secret"
client_id = "{KEYGATE_CLIENT}"
client_secret = "env:{KEYGATE_SECRET_ENV}"
"#,
            authority = self.token.authority(),
            graph = self.graph.url,
            ca = self.ca_file.display(),
        )
    }

    /// The secrets as the broker's environment holds them.
    pub fn broker_env(&self) -> Vec<(String, String)> {
        vec![
            (KEYGATE_SECRET_ENV.to_owned(), self.keygate_secret.clone()),
            (READER_SECRET_ENV.to_owned(), self.reader_secret.clone()),
        ]
    }

    /// A broker with the `azure` provider on the stand-ins, `scopes`, and
    /// a policy permitting every `azure` scope.
    pub fn setup(&self, scopes: &str) -> Setup {
        Setup {
            policies: vec![super::config::permit_provider("azure")],
            scopes: Some(scopes.to_owned()),
            extra_config: self.provider_toml(300),
            env: self.broker_env(),
            ..Setup::default()
        }
    }

    /// A `file:` reference to one of the secrets (`keygate-secret`,
    /// `reader-secret`), for providers built in-process.
    pub fn secret_ref(&self, name: &str) -> String {
        format!("file:{}", self.dir.join(name).display())
    }

    /// The provider settings as JSON, for building the provider in-process
    /// (secrets by `file:` reference: a test cannot set the environment).
    pub fn provider_json(&self) -> Value {
        json!({
            "tenant_id": TENANT,
            "authority_host": self.token.authority(),
            "graph_endpoint": self.graph.url,
            "ca_file": self.ca_file,
            "auth": {
                "method": "client_secret",
                "client_id": KEYGATE_CLIENT,
                "client_secret": self.secret_ref("keygate-secret"),
            },
        })
    }

    /// Keygate-named passwords of [`APP_OBJECT`].
    pub fn keygate_passwords(&self) -> Vec<Password> {
        self.graph
            .passwords(APP_OBJECT)
            .into_iter()
            .filter(|p| {
                p.display_name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("keygate:"))
            })
            .collect()
    }
}

/// An `app_password` scope on [`APP_OBJECT`] and an `access_token` scope
/// for [`RESOURCE`] as [`READER_CLIENT`].
pub fn scopes(max_passwords: u32) -> String {
    format!(
        r#"
[[scopes]]
name = "deploy-app"
provider = "azure"
max_ttl_secs = 900
params = {{ kind = "app_password", application_object_id = "{APP_OBJECT}", client_id = "{APP_CLIENT}", max_passwords = {max_passwords} }}

[[scopes]]
name = "arm-reader"
provider = "azure"
max_ttl_secs = 3600
params = {{ kind = "access_token", resource = "{RESOURCE}", client_id = "{READER_CLIENT}", client_secret = "env:{READER_SECRET_ENV}" }}
"#
    )
}
