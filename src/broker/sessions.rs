//! The token endpoint's logic: authenticate an agent, open a task, sign its
//! session token; and checking that token on every later call.

mod grants;

use serde::{Deserialize, Serialize};

use super::Broker;
use super::users::UserTokenUse;
use crate::audit::{Actor, AuditEvent};
use crate::identity::{AssertionClaims, SessionClaims, verify_client_assertion};
use crate::model::{Agent, AgentStatus, Task, TaskState, new_id, now, unix};
use crate::store::{JtiUse, TaskOpen};

/// The assertion type RFC 7523 registers for `private_key_jwt`.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// What a request presented with its session token, for sender checks.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    /// `Bearer` or `DPoP`.
    pub scheme: &'a str,
    pub token: &'a str,
    /// The `DPoP` header.
    pub proof: Option<&'a str>,
    /// The mTLS client certificate (DER).
    pub cert: Option<&'a [u8]>,
    pub method: &'a str,
    pub path: &'a str,
}

/// The federated issuer name agents bind SPIFFE IDs under (mTLS).
pub const SPIFFE_ISSUER: &str = "spiffe";
/// RFC 7523 §2.1's grant type: a federated workload identity token.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8693's grant type, for delegation to a sub-agent.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of Keygate's session tokens.
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 token type of a JWT (the sub-agent's client assertion).
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

/// Only active agents open tasks (not pending, suspended or decommissioned).
pub(super) fn ensure_active(agent: &Agent) -> Result<(), OAuthError> {
    if agent.status == AgentStatus::Active {
        Ok(())
    } else {
        Err(OAuthError::new(
            "invalid_client",
            format!("agent is {}", agent.status),
        ))
    }
}

/// `ttl` capped by the agent's own `max_ttl_secs`.
pub(super) fn capped(agent: &Agent, ttl: time::Duration) -> time::Duration {
    let secs = u64::try_from(ttl.whole_seconds()).unwrap_or(0);
    time::Duration::seconds(i64::try_from(agent.cap_ttl(secs)).unwrap_or(i64::MAX))
}

/// A task an agent opens for itself (not delegated).
pub(super) fn root_task(agent: &Agent, description: String, ttl: time::Duration) -> Task {
    let t = now();
    Task {
        id: new_id("tk"),
        agent_id: agent.id.clone(),
        description,
        state: TaskState::Open,
        opened_at: t,
        expires_at: t + capped(agent, ttl),
        ended_at: None,
        end_reason: None,
        parent_task_id: None,
        depth: 0,
        delegation_budget: agent.delegation.max_depth,
        scopes: None,
        chain: Vec::new(),
        on_behalf_of: None,
    }
}

/// A store failure at the token endpoint: logged, answered generically.
pub(super) fn internal(e: &dyn std::fmt::Display) -> OAuthError {
    tracing::error!(error = %e, "token endpoint failed");
    OAuthError::new("server_error", "the broker could not complete the request")
}

/// `POST /oauth/token` form fields.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
    /// What the task is for, recorded on the task and in audit.
    pub task: Option<String>,
    /// Requested session lifetime in seconds, capped by config.
    pub ttl: Option<String>,
    /// Space-separated scopes (token exchange: what the sub-agent may hold).
    pub scope: Option<String>,
    /// Token exchange (RFC 8693): the delegating task's session token.
    pub subject_token: Option<String>,
    pub subject_token_type: Option<String>,
    /// Token exchange: the sub-agent's own client assertion.
    pub actor_token: Option<String>,
    pub actor_token_type: Option<String>,
    /// JWT bearer grant: the token from a trusted issuer.
    pub assertion: Option<String>,
    /// The user the task acts for: their ID token from a users' issuer…
    pub user_token: Option<String>,
    /// …or their id, from an agent allowed to assert users.
    pub on_behalf_of: Option<String>,
    /// The verified DPoP proof of the request (from its `DPoP` header).
    #[serde(skip)]
    pub dpop: Option<crate::identity::dpop::Proof>,
    /// The client certificate of an mTLS connection (DER), verified against
    /// the trust bundle by the TLS layer.
    #[serde(skip)]
    pub client_cert: Option<std::sync::Arc<Vec<u8>>>,
    /// Where the request came from (for counting failures per source).
    #[serde(skip)]
    pub source: Option<std::net::IpAddr>,
}

/// A successful token response (RFC 6749 §5.1 plus `task_id`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub task_id: String,
    /// Set on token exchange (RFC 8693 §2.2.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_token_type: Option<&'static str>,
}

/// An RFC 6749 §5.2 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            description: description.into(),
        }
    }
}

/// A federated token that failed: `invalid_grant` when the token is bad,
/// `temporarily_unavailable` (503, retry) when its issuer's keys cannot be
/// had right now — the token may be fine.
pub(super) fn federation_error(e: &crate::identity::AuthError, prefix: &str) -> OAuthError {
    match e {
        crate::identity::AuthError::Unavailable(m) => {
            OAuthError::new("temporarily_unavailable", format!("{prefix}{m}"))
        }
        other => OAuthError::new("invalid_grant", format!("{prefix}{other}")),
    }
}

/// A verified session: the agent and its open task.
#[derive(Debug, Clone)]
pub struct Session {
    pub agent: Agent,
    pub task: Task,
    /// The DPoP key the token is bound to (its RFC 7638 thumbprint).
    pub jkt: Option<String>,
    /// The client certificate the token is bound to (`x5t#S256`, RFC 8705).
    pub x5t: Option<String>,
    /// The address this request came from (set by the HTTP layer), kept
    /// with each credential it mints for per-scope usage.
    pub source: Option<std::net::IpAddr>,
    /// [`Broker::agents_changed`] before the agent was read.
    pub agents_seen: u64,
}

impl Broker {
    /// Handles `grant_type=client_credentials` with a client assertion. Every
    /// outcome is audited; failures with the client id the caller claimed.
    pub async fn token(
        &self,
        req: TokenRequest,
        dpop: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        let claimed = req.client_id.clone();
        let source = req.source;
        let mut req = req;
        let result = match dpop.map(|p| self.token_dpop(p)).transpose() {
            Ok(proof) => {
                req.dpop = proof;
                self.try_token(req).await
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok((resp, agent)) => {
                self.metrics.auth("success");
                tracing::info!(agent = %agent, task = %resp.task_id, "task opened");
                self.observe(agent, crate::validation::Observation::TaskOpened { source })
                    .await;
            }
            Err(e) => {
                self.record_auth_failure(source, claimed.clone(), e).await;
                // Only for registered agents: made-up client ids must not
                // grow what continuous validation keeps.
                if self.validation.enabled()
                    && let Some(c) = &claimed
                    && matches!(self.store.get_agent(c).await, Ok(Some(_)))
                {
                    self.observe(c, crate::validation::Observation::AuthFailure { source })
                        .await;
                }
            }
        }
        result.map(|(r, _)| r)
    }

    async fn try_token(&self, req: TokenRequest) -> Result<(TokenResponse, String), OAuthError> {
        match req.grant_type.as_deref() {
            Some("client_credentials") => self.client_credentials(req).await,
            Some(TOKEN_EXCHANGE) => self.token_exchange(req).await,
            Some(JWT_BEARER_GRANT) => self.federated(req).await,
            Some(other) => Err(OAuthError::new(
                "unsupported_grant_type",
                format!(
                    "grant_type `{other}` is not supported (use client_credentials, {JWT_BEARER_GRANT} with a trusted issuer's token, or {TOKEN_EXCHANGE} to delegate)"
                ),
            )),
            None => Err(OAuthError::new(
                "invalid_request",
                "`grant_type` is required",
            )),
        }
    }

    /// A client assertion, verified against the agent's registered keys.
    pub(super) async fn authenticate(
        &self,
        client_id: &str,
        assertion: &str,
    ) -> Result<(Agent, AssertionClaims), OAuthError> {
        let agent = self
            .store
            .agent_to_authenticate(client_id)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| OAuthError::new("invalid_client", "unknown client"))?;
        let audiences = [
            self.config.server.issuer.as_str(),
            &self.config.token_endpoint(),
        ];
        let claims =
            verify_client_assertion(assertion, &agent.id, &agent.jwks, &audiences, unix(now()))
                .map_err(|e| OAuthError::new("invalid_client", e.to_string()))?;
        ensure_active(&agent)?;
        Ok((agent, claims))
    }

    /// Opens a task the agent starts for itself (not delegated), for the
    /// user the request names if any; `method` says how it authenticated.
    async fn open_own_task(
        &self,
        agent: &Agent,
        claims: &AssertionClaims,
        req: &TokenRequest,
        mut details: serde_json::Value,
        x5t: Option<String>,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let ttl = self.session_ttl(req.ttl.as_deref())?;
        let mut task = root_task(agent, req.task.clone().unwrap_or_default(), ttl);
        let user = self.user_context(agent, req).await?;
        let mut spent = None;
        if let Some(u) = user {
            // A task acting for a user never outlives the token that vouched.
            if let Some(proof) = &u.token {
                task.expires_at = task.expires_at.min(crate::model::from_unix(proof.exp));
                spent = Some(proof.clone());
            }
            task.on_behalf_of = Some(u.context);
        }
        details["description"] = task.description.clone().into();
        details["expires_at"] = unix(task.expires_at).into();
        self.open_task_bound(
            agent,
            claims,
            task,
            "task.opened",
            details,
            req.dpop.as_ref(),
            x5t,
            spent,
        )
        .await
    }

    /// Records the assertion's `jti`, writes the task and its audit event,
    /// and signs the session token.
    pub(super) async fn open_task(
        &self,
        agent: &Agent,
        claims: &AssertionClaims,
        task: Task,
        action: &str,
        details: serde_json::Value,
        dpop: Option<&crate::identity::dpop::Proof>,
    ) -> Result<(TokenResponse, String), OAuthError> {
        self.open_task_bound(agent, claims, task, action, details, dpop, None, None)
            .await
    }

    /// [`Self::open_task`], optionally binding the token to a client
    /// certificate thumbprint.
    #[allow(clippy::too_many_arguments)]
    async fn open_task_bound(
        &self,
        agent: &Agent,
        claims: &AssertionClaims,
        task: Task,
        action: &str,
        details: serde_json::Value,
        dpop: Option<&crate::identity::dpop::Proof>,
        x5t: Option<String>,
        user_token: Option<UserTokenUse>,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let t = task.opened_at;
        // A replayed grant (a federated token) is `invalid_grant` (RFC 7523
        // §3.1); a replayed client assertion is client authentication
        // failing (§3.2).
        let replayed = if details["method"] == "jwt_bearer" {
            "invalid_grant"
        } else {
            "invalid_client"
        };
        let event = AuditEvent::new(&Actor::Agent(agent.id.clone()), action)
            .agent(&agent.id)
            .task(&task.id)
            .details(details);
        let jti = JtiUse {
            agent_id: agent.id.clone(),
            jti: claims.jti.clone().unwrap_or_default(),
            expires_at: crate::model::from_unix(claims.exp),
        };
        let opened = if user_token.is_none() && dpop.is_none() {
            // One assertion id to record: the store may batch the open
            // with other requests' (SQLite does).
            self.store
                .open_task_recorded(&jti, &task, vec![event])
                .await
                .map_err(|e| internal(&e))?
        } else {
            self.open_task_proofs(&jti, &task, event, dpop, user_token.as_ref())
                .await?
        };
        match opened {
            TaskOpen::Opened => {}
            TaskOpen::Replayed => {
                return Err(OAuthError::new(
                    replayed,
                    "the assertion was already used (`jti` replayed)",
                ));
            }
            // A suspension, the kill switch or the parent's end committed
            // after the agent (or the parent) was read: no task outlives it.
            TaskOpen::Overtaken if task.parent_task_id.is_some() => {
                return Err(OAuthError::new(
                    "invalid_grant",
                    "the delegating task ended, or the agent stopped being active, while the task was being opened; no task was opened",
                ));
            }
            TaskOpen::Overtaken => {
                return Err(OAuthError::new(
                    "invalid_client",
                    "the agent stopped being active while the task was being opened; no task was opened",
                ));
            }
        }
        // `act` nests the delegators, nearest first (RFC 8693 §4.1).
        let act = task
            .chain
            .iter()
            .fold(None, |inner: Option<serde_json::Value>, who| {
                let mut a = serde_json::json!({ "sub": who });
                if let Some(i) = inner {
                    a["act"] = i;
                }
                Some(a)
            });
        let session = SessionClaims {
            iss: self.config.server.issuer.clone(),
            sub: agent.id.clone(),
            aud: self.config.server.issuer.clone(),
            iat: unix(t),
            exp: unix(task.expires_at),
            jti: new_id("st"),
            task_id: task.id.clone(),
            act,
            cnf: match (dpop, &x5t) {
                (None, None) => None,
                (d, x) => {
                    let mut c = serde_json::json!({});
                    if let Some(p) = d {
                        c["jkt"] = p.jkt.clone().into();
                    }
                    if let Some(t) = x {
                        c["x5t#S256"] = t.clone().into();
                    }
                    Some(c)
                }
            },
        };
        let token = self.signer.sign(&session).map_err(|e| internal(&e))?;
        Ok((
            TokenResponse {
                access_token: token,
                token_type: if dpop.is_some() { "DPoP" } else { "Bearer" },
                expires_in: (task.expires_at - t).whole_seconds(),
                task_id: task.id,
                issued_token_type: task.parent_task_id.as_ref().map(|_| TOKEN_TYPE_ACCESS),
            },
            agent.id.clone(),
        ))
    }

    pub(super) fn session_ttl(&self, raw: Option<&str>) -> Result<time::Duration, OAuthError> {
        let s = &self.config.sessions;
        let secs = match raw.filter(|r| !r.is_empty()) {
            None => s.default_ttl_secs,
            Some(r) => match r.parse::<u64>() {
                Ok(n) if n > 0 => n.min(s.max_ttl_secs),
                _ => {
                    return Err(OAuthError::new(
                        "invalid_request",
                        "`ttl` must be a positive number of seconds",
                    ));
                }
            },
        };
        Ok(time::Duration::seconds(
            i64::try_from(secs).unwrap_or(i64::MAX),
        ))
    }

    /// Appends one audit event in its own transaction.
    pub(crate) async fn audit_alone(&self, ev: AuditEvent) -> Result<(), crate::store::StoreError> {
        let mut tx = self.store.begin().await?;
        tx.audit(ev).await?;
        tx.commit().await
    }
}

impl Broker {
    /// Verifies the DPoP proof sent to the token endpoint.
    fn token_dpop(&self, proof: &str) -> Result<crate::identity::dpop::Proof, OAuthError> {
        crate::identity::dpop::verify_proof(
            proof,
            "POST",
            &self.config.token_endpoint(),
            None,
            unix(now()),
        )
        .map_err(|e| OAuthError::new("invalid_dpop_proof", e.to_string()))
    }
}

impl Broker {
    /// A task open that also spends a DPoP proof's or a user token's id:
    /// every id recorded, the task written, in one transaction. `false`:
    /// the assertion's own id was seen before.
    async fn open_task_proofs(
        &self,
        jti: &JtiUse,
        task: &Task,
        event: AuditEvent,
        dpop: Option<&crate::identity::dpop::Proof>,
        user_token: Option<&UserTokenUse>,
    ) -> Result<TaskOpen, OAuthError> {
        let mut tx = self.store.begin().await.map_err(|e| internal(&e))?;
        if let Some(u) = user_token
            && !tx
                .record_jti(
                    &format!("user:{}", u.issuer),
                    &u.jti,
                    crate::model::from_unix(u.exp),
                )
                .await
                .map_err(|e| internal(&e))?
        {
            return Err(OAuthError::new(
                "invalid_grant",
                "user_token: it was already used to open a task (replayed)",
            ));
        }
        if let Some(p) = dpop
            && !tx
                .record_jti(
                    &format!("dpop:{}", p.jkt),
                    &p.jti,
                    crate::model::from_unix(p.iat + 2 * crate::identity::dpop::MAX_SKEW_SECS),
                )
                .await
                .map_err(|e| internal(&e))?
        {
            return Err(OAuthError::new(
                "invalid_dpop_proof",
                "the DPoP proof was already used (`jti` replayed)",
            ));
        }
        // The rest as any open, in this same transaction.
        crate::store::open_task_alone(tx, jti, task, vec![event])
            .await
            .map_err(|e| internal(&e))
    }
}
