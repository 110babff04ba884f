//! The anchor: OpenBao with raft storage (durable, like Keygate's SQLite),
//! set up by API the way a user would put it in front of agents: an
//! AppRole for Keygate (or a direct client), a JWT auth method that trusts
//! the agent's key, and a token role whose tokens can be mass-revoked by
//! prefix.

use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;

use crate::bao_setup::{self, AGENT_POLICY};
use crate::load::{self, Stats};
use crate::peers::Bao;

/// The token role whose tokens the revocation phase creates and revokes.
const REVOKE_ROLE: &str = "bench-revoke";

/// What the setup made.
pub struct Anchor {
    pub addr: String,
    root: String,
    /// Keygate's AppRole.
    pub role_id: String,
    pub secret_id: String,
    /// A token from a second AppRole login, for the direct clients.
    token: String,
}

/// The JWT auth role agents log in with.
const JWT_ROLE: &str = "agent";
/// The `aud` OpenBao's JWT role requires.
pub const JWT_AUDIENCE: &str = "openbao";

impl Anchor {
    /// Configures `bao`; `agent_key` is the PKCS#8 PEM of the agent key
    /// whose public half the JWT auth method trusts.
    pub async fn configure(bao: &Bao, agent_key: &SecretString) -> Self {
        use secrecy::ExposeSecret;
        bao_setup::keygate_footing(bao).await;
        // Keygate's AppRole, and another for the direct clients: a login of
        // Keygate's own role that Keygate did not make is a stale login to
        // it, which it revokes.
        let (role_id, secret_id) = bao_setup::configure_approle(bao, "keygate", "2h").await;
        let (direct_role, direct_secret) =
            bao_setup::configure_approle(bao, "bench-direct", "2h").await;
        let (_, login) = bao
            .request(
                "POST",
                "auth/approle/login",
                None,
                Some(json!({ "role_id": direct_role, "secret_id": direct_secret })),
            )
            .await;
        let token = login["auth"]["client_token"]
            .as_str()
            .expect("token")
            .to_owned();

        // JWT auth: the agent signs a JWT with its own key, as it signs its
        // client assertion for Keygate.
        let public = rcgen::KeyPair::from_pem(agent_key.expose_secret())
            .expect("agent key")
            .public_key_pem();
        bao.api("POST", "sys/auth/jwt", Some(json!({ "type": "jwt" })))
            .await;
        bao.api(
            "POST",
            "auth/jwt/config",
            Some(json!({ "jwt_validation_pubkeys": [public] })),
        )
        .await;
        bao.api(
            "POST",
            &format!("auth/jwt/role/{JWT_ROLE}"),
            Some(json!({
                "role_type": "jwt", "user_claim": "sub", "bound_audiences": [JWT_AUDIENCE],
                "token_policies": [AGENT_POLICY], "token_ttl": "1h",
            })),
        )
        .await;
        bao.api(
            "POST",
            &format!("auth/token/roles/{REVOKE_ROLE}"),
            Some(json!({ "allowed_policies": [AGENT_POLICY] })),
        )
        .await;
        Self {
            addr: bao.addr.clone(),
            root: bao.root.clone(),
            role_id,
            secret_id,
            token,
        }
    }

    /// OpenBao's fastest comparable path: `auth/token/create` with the root
    /// token and a minimal body (the agent's policy and a TTL). Root skips
    /// the policy checks a non-root parent pays for; this is the anchor the
    /// speed goals are measured against.
    pub async fn token_create_root(
        &self,
        http: &reqwest::Client,
        clients: usize,
        t: Timing,
    ) -> Stats {
        let (h, url, token) = (
            http.clone(),
            format!("{}/v1/auth/token/create", self.addr),
            self.root.clone(),
        );
        let body = json!({ "policies": [AGENT_POLICY], "ttl": "3600s" });
        load::timed(clients, t.warm, t.secs, move |_| {
            let req = h.post(&url).header("X-Vault-Token", &token).json(&body);
            async move {
                let r = req.send().await.expect("openbao unreachable");
                assert_eq!(r.status(), 200, "auth/token/create (root) failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// `auth/token/create` through a non-root AppRole token with the same
    /// body Keygate's vault provider sends (what Keygate itself pays).
    pub async fn token_create(&self, http: &reqwest::Client, clients: usize, t: Timing) -> Stats {
        let (h, url, token) = (
            http.clone(),
            format!("{}/v1/auth/token/create", self.addr),
            self.token.clone(),
        );
        load::timed(clients, t.warm, t.secs, move |i| {
            let body = json!({
                "policies": [AGENT_POLICY], "ttl": "3600s", "explicit_max_ttl": "3600s",
                "renewable": true, "display_name": "keygate-bench-agent",
                "meta": { "agent": "bench-agent", "task": "tk_direct", "scope": "vault-token",
                          "keygate_lease": format!("direct-{i}") },
            });
            let req = h.post(&url).header("X-Vault-Token", &token).json(&body);
            async move {
                let r = req.send().await.expect("openbao unreachable");
                assert_eq!(r.status(), 200, "auth/token/create failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// `auth/jwt/login` with a fresh JWT signed by the agent's key per call.
    pub async fn jwt_login(
        &self,
        http: &reqwest::Client,
        key: &SecretString,
        clients: usize,
        t: Timing,
    ) -> Stats {
        let (h, url) = (http.clone(), format!("{}/v1/auth/jwt/login", self.addr));
        let assertions = load::Assertions::new(key, None, crate::keygate::LOAD_AGENT, JWT_AUDIENCE);
        load::timed(clients, t.warm, t.secs, move |_| {
            let jwt = assertions.next();
            let req = h.post(&url).json(&json!({ "role": JWT_ROLE, "jwt": jwt }));
            async move {
                let r = req.send().await.expect("openbao unreachable");
                assert_eq!(r.status(), 200, "auth/jwt/login failed");
                let _ = r.bytes().await;
            }
        })
        .await
    }

    /// Creates `n` tokens under the revoke role, then times `revoke-prefix`
    /// over them and checks one is dead.
    pub async fn revoke_prefix(&self, http: &reqwest::Client, n: usize) -> Duration {
        let (h, url, root) = (
            http.clone(),
            format!("{}/v1/auth/token/create/{REVOKE_ROLE}", self.addr),
            self.root.clone(),
        );
        let tokens = load::fill(32, n, move |_| {
            let req = h
                .post(&url)
                .header("X-Vault-Token", &root)
                .json(&json!({ "policies": [AGENT_POLICY], "ttl": "3600s" }));
            async move {
                let r = req.send().await.expect("openbao unreachable");
                assert_eq!(r.status(), 200, "token create failed");
                let v: serde_json::Value = r.json().await.expect("json");
                v["auth"]["client_token"]
                    .as_str()
                    .expect("client_token")
                    .to_owned()
            }
        })
        .await;
        let lookup = |token: &str| {
            http.get(format!("{}/v1/auth/token/lookup-self", self.addr))
                .header("X-Vault-Token", token)
                .send()
        };
        let alive = lookup(&tokens[n - 1]).await.expect("lookup");
        assert_eq!(alive.status(), 200, "a fresh token must work");
        let t0 = Instant::now();
        let r = http
            .put(format!(
                "{}/v1/sys/leases/revoke-prefix/auth/token/create/{REVOKE_ROLE}",
                self.addr
            ))
            .header("X-Vault-Token", &self.root)
            .send()
            .await
            .expect("revoke-prefix");
        let took = t0.elapsed();
        assert!(r.status().is_success(), "revoke-prefix: {}", r.status());
        for t in [&tokens[0], &tokens[n / 2], &tokens[n - 1]] {
            let dead = lookup(t).await.expect("lookup");
            assert_eq!(dead.status(), 403, "a revoked token must be refused");
        }
        took
    }
}

/// Warm-up and measured time of a timed run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warm: Duration,
    pub secs: Duration,
}
