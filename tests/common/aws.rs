//! The AWS test peer: a moto server per test, SDK clients that talk to it
//! as an administrator would, and a broker configured with an `aws`
//! provider pointing at it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;

use aws_credential_types::Credentials;
use aws_sdk_iam::config::{BehaviorVersion, Region};
use tokio::process::{Child, Command};

use super::{Setup, eventually};

/// moto's account id.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";
/// The version `scripts/install-peers` installs.
const INSTALL_HINT: &str = "moto_server is not installed: run `scripts/install-peers` (it runs `pip install 'moto[server]==5.2.5'`)";

/// A role ARN in moto's account.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// A running `moto_server` on a free port; killed on drop.
pub struct Moto {
    pub url: String,
    _child: Child,
}

impl Moto {
    /// Starts moto and waits until it answers. A missing `moto_server` fails
    /// the test with the command that installs it.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(e) => panic!("cannot start moto_server: {e}"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually("moto_server to answer", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited at start ({status})");
            }
            let probe = http.get(format!("{url}/moto-api/")).send();
            async move { probe.await.ok().map(|_| ()) }
        })
        .await;
        Self { url, _child: child }
    }

    fn creds() -> Credentials {
        Credentials::from_keys("testing", "testing", None)
    }

    pub fn iam(&self) -> aws_sdk_iam::Client {
        let conf = aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(Self::creds())
            .build();
        aws_sdk_iam::Client::from_conf(conf)
    }

    pub fn secrets(&self) -> aws_sdk_secretsmanager::Client {
        let conf = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
            .region(aws_sdk_secretsmanager::config::Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(Self::creds())
            .build();
        aws_sdk_secretsmanager::Client::from_conf(conf)
    }

    /// The AWS provider in this process, on this server, with the dummy
    /// credentials (for the conformance kit).
    pub fn provider(&self) -> keygate_provider_aws::AwsProvider {
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(Self::creds()),
            )
            .build();
        let cfg: keygate_provider_aws::AwsConfig = serde_json::from_value(serde_json::json!({
            "region": REGION, "endpoint_url": self.url,
        }))
        .unwrap();
        keygate_provider_aws::AwsProvider::with_sdk_config(cfg, &sdk).unwrap()
    }

    /// An STS client signing with the given (e.g. Keygate-issued) credentials.
    pub fn sts_as(&self, creds: Credentials) -> aws_sdk_sts::Client {
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(REGION))
            .endpoint_url(&self.url)
            .credentials_provider(creds)
            .build();
        aws_sdk_sts::Client::from_conf(conf)
    }

    /// Creates a Secrets Manager secret with a string value.
    pub async fn create_secret(&self, name: &str, value: &str) {
        self.secrets()
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .unwrap();
    }

    /// Creates a role anyone may assume (moto does not check trust anyway).
    pub async fn create_role(&self, name: &str) {
        let trust = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{ "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{ACCOUNT}:root") }, "Action": ["sts:AssumeRole", "sts:SetSourceIdentity", "sts:TagSession"] }],
        });
        self.iam()
            .create_role()
            .role_name(name)
            .assume_role_policy_document(trust.to_string())
            .send()
            .await
            .unwrap();
    }

    /// A role's inline policy, decoded (IAM returns it URL-encoded), or
    /// `None` when the role has no policy of that name.
    pub async fn role_policy(&self, role: &str, name: &str) -> Option<serde_json::Value> {
        match self
            .iam()
            .get_role_policy()
            .role_name(role)
            .policy_name(name)
            .send()
            .await
        {
            Ok(out) => {
                let doc = urlencoding::decode(out.policy_document()).unwrap();
                Some(serde_json::from_str(&doc).unwrap())
            }
            Err(e) => {
                use aws_sdk_iam::error::ProvideErrorMetadata;
                assert_eq!(e.code(), Some("NoSuchEntity"), "{e:?}");
                None
            }
        }
    }

    /// The `[providers.aws]` table pointing at this server.
    pub fn provider_toml(&self) -> String {
        format!(
            "[providers.aws]\nkind = \"aws\"\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\n",
            self.url
        )
    }

    /// Dummy static credentials for the broker, through the standard chain's
    /// environment step, with shared config files and instance metadata
    /// switched off so nothing on the machine leaks in.
    pub fn broker_env() -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_CONFIG_FILE", "/nonexistent/keygate-test-aws-config"),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/keygate-test-aws-credentials",
            ),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// A broker with the `aws` provider on this server, `scopes`, and a
    /// policy permitting every `aws` scope.
    pub fn setup(&self, scopes: &str) -> Setup {
        Setup {
            policies: vec![super::config::permit_provider("aws")],
            scopes: Some(scopes.to_owned()),
            extra_config: self.provider_toml(),
            env: Self::broker_env(),
            ..Setup::default()
        }
    }
}
