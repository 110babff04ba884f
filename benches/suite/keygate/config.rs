//! The configs the benchmark runs Keygate with: the main instance (SQLite),
//! the same on PostgreSQL for replicas, and fresh instances with and
//! without continuous validation's detectors.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde_json::json;

use super::{ISSUER, Keygate, LOAD_AGENT, REVOKE_AGENT, SECOPS_SHA256};
use crate::openbao::Anchor;

impl Keygate {
    /// Writes the config: CA scopes (JWT- and X.509-SVID), a vault `token`
    /// scope through `anchor`'s AppRole, two agents sharing one key, a
    /// permit for their team, and the demo secops operator.
    pub fn configure(
        dir: &Path,
        anchor: &Anchor,
        key: SecretString,
        public: keygate::identity::PublicKey,
    ) -> Self {
        let d = dir.display();
        for sub in ["policies", "agents"] {
            std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
        }
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/keygate.cedarschema"),
            dir.join("policies/keygate.cedarschema"),
        )
        .expect("schema");
        std::fs::write(
            dir.join("policies/bench.cedar"),
            r#"@id("bench") permit (principal in Keygate::Team::"bench", action == Keygate::Action::"request_credential", resource) when { ["ca", "vault"].contains(resource.provider) };"#,
        )
        .expect("policy");
        for id in [LOAD_AGENT, REVOKE_AGENT] {
            let agent = json!({
                "id": id, "team": "bench", "sponsor": "bench@example.com",
                "risk_tier": 1, "environment": "test", "purpose": "load benchmark",
                "jwks": { "keys": [public.jwk] },
            });
            std::fs::write(
                dir.join(format!("agents/{id}.toml")),
                toml::to_string(&agent).expect("toml"),
            )
            .expect("agent");
        }
        std::fs::write(dir.join("secret-id"), &anchor.secret_id).expect("secret id");
        let cfg = format!(
            r#"
[server]
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
[server.connections]
max_connections = 4096
[limits]
# The load comes from one address and a few agents: limits off (0).
per_address_per_minute = 0
per_client_per_minute = 0
per_agent_per_minute = 0
[store]
url = "sqlite://{d}/keygate.db"
[sessions]
signing_key_file = "{d}/session.pem"
max_ttl_secs = 14400
[policy]
dir = "{d}/policies"
[registry]
seed_dir = "{d}/agents"
[[operators]]
name = "bench-secops"
roles = ["secops"]
token_sha256 = "{SECOPS_SHA256}"
[providers.ca]
kind = "local-ca"
trust_domain = "bench.example.org"
key_file = "{d}/ca/key.pem"
cert_file = "{d}/ca/cert.pem"
jwt_key_file = "{d}/ca/jwt.pem"
revocation_file = "{d}/ca/revoked.jsonl"
[providers.vault]
kind = "vault"
address = "{addr}"
token_role = "keygate-agent"
auth = {{ method = "approle", role_id = "{role_id}", secret_id_file = "{d}/secret-id" }}
[[scopes]]
name = "jwt-svid"
provider = "ca"
max_ttl_secs = 3600
params = {{ kind = "jwt_svid" }}
[[scopes]]
name = "x509-svid"
provider = "ca"
max_ttl_secs = 3600
params = {{ kind = "x509_svid" }}
[[scopes]]
name = "vault-token"
provider = "vault"
max_ttl_secs = 3600
params = {{ kind = "token", policies = ["agent-reader"] }}
"#,
            addr = anchor.addr,
            role_id = anchor.role_id,
        );
        std::fs::write(dir.join("keygate.toml"), cfg).expect("config");
        Self {
            dir: dir.to_owned(),
            key,
            kid: public.kid,
            http: reqwest::Client::new(),
        }
    }

    /// The same config on a PostgreSQL store (`url`, its password in a
    /// file beside): the config file for every replica.
    pub fn configure_postgres(&self, url: &str, password: &str) -> PathBuf {
        let sqlite = format!("url = \"sqlite://{}/keygate.db\"", self.dir.display());
        let cfg = std::fs::read_to_string(self.dir.join("keygate.toml")).expect("config");
        assert!(cfg.contains(&sqlite), "the config's store line changed");
        let pw = self.dir.join("pg-password");
        std::fs::write(&pw, password).expect("password file");
        let cfg = cfg.replacen(
            &sqlite,
            &format!("url = \"{url}\"\npassword = \"file:{}\"", pw.display()),
            1,
        );
        let path = self.dir.join("keygate-pg.toml");
        std::fs::write(&path, cfg).expect("config");
        path
    }

    /// The same config on a fresh store and revocation file of its own (it
    /// runs beside the main instance), with continuous validation on —
    /// five detectors (counting, novelty, the learned hourly rate), none of
    /// which fires under this load —
    /// or not, so the two are measured alike.
    pub fn configure_detectors(&self, on: bool) -> PathBuf {
        let name = if on { "detect" } else { "plain" };
        let d = self.dir.display();
        let cfg = std::fs::read_to_string(self.dir.join("keygate.toml")).expect("config");
        let store = format!("url = \"sqlite://{d}/keygate.db\"");
        let revoked = format!("revocation_file = \"{d}/ca/revoked.jsonl\"");
        assert!(
            cfg.contains(&store) && cfg.contains(&revoked),
            "the config changed"
        );
        let cfg = cfg
            .replacen(
                &store,
                &format!("url = \"sqlite://{d}/keygate-{name}.db\""),
                1,
            )
            .replacen(
                &revoked,
                &format!("revocation_file = \"{d}/ca/revoked-{name}.jsonl\""),
                1,
            );
        let detectors = r#"
[validation]
warm_up_observations = 20
[[detectors]]
name = "denials"
signal = "denials"
threshold = 1000
window_secs = 300
severity = "high"
action = "suspend"
[[detectors]]
name = "requests"
signal = "credential_requests"
threshold = 100000000
window_secs = 60
severity = "low"
action = "record"
[[detectors]]
name = "new-network"
signal = "new_source_network"
severity = "medium"
action = "alert"
[[detectors]]
name = "new-scope"
signal = "new_scope"
severity = "low"
action = "record"
[[detectors]]
name = "rate"
signal = "request_rate_baseline"
threshold = 1000
severity = "high"
action = "step_up"
"#;
        // Top-level tables must come before the first `[[scopes]]`.
        let cfg = if on {
            cfg.replacen("[[scopes]]", &format!("{detectors}\n[[scopes]]"), 1)
        } else {
            cfg
        };
        let path = self.dir.join(format!("keygate-{name}.toml"));
        std::fs::write(&path, cfg).expect("config");
        path
    }
}
