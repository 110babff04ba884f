//! The token endpoint's logic: authenticate an agent, open a task, sign its
//! session token; and checking that token on every later call.

use serde::{Deserialize, Serialize};

use super::Broker;
use crate::audit::{Actor, AuditEvent};
use crate::identity::{SessionClaims, verify_client_assertion};
use crate::model::{Agent, AgentStatus, Task, TaskState, new_id, now, unix};

/// The assertion type RFC 7523 registers for `private_key_jwt`.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `POST /oauth/token` form fields.
#[derive(Debug, Default, Deserialize)]
pub struct TokenRequest {
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    pub client_assertion_type: Option<String>,
    pub client_assertion: Option<String>,
    /// What the task is for, recorded on the task and in audit.
    pub task: Option<String>,
    /// Requested session lifetime in seconds, capped by config.
    pub ttl: Option<String>,
    pub scope: Option<String>,
}

/// A successful token response (RFC 6749 §5.1 plus `task_id`).
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    pub task_id: String,
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

/// A verified session: the agent and its open task.
#[derive(Debug, Clone)]
pub struct Session {
    pub agent: Agent,
    pub task: Task,
}

impl Broker {
    /// Handles `grant_type=client_credentials` with a client assertion. Every
    /// outcome is audited; failures with the client id the caller claimed.
    pub async fn token(&self, req: TokenRequest) -> Result<TokenResponse, OAuthError> {
        let claimed = req.client_id.clone();
        let result = self.try_token(req).await;
        match &result {
            Ok((resp, agent)) => {
                self.metrics.auth("success");
                tracing::info!(agent = %agent, task = %resp.task_id, "task opened");
            }
            Err(e) => self.record_auth_failure(claimed, e).await,
        }
        result.map(|(r, _)| r)
    }

    /// Counts, logs and audits a failed token request, with the client id
    /// the caller claimed (if any).
    pub async fn record_auth_failure(&self, claimed: Option<String>, e: &OAuthError) {
        self.metrics.auth("failure");
        tracing::info!(client_id = ?claimed, error = e.error, reason = %e.description, "authentication failed");
        let mut ev = AuditEvent::new(&Actor::Unauthenticated(claimed.clone()), "auth.token")
            .failure(format!("{}: {}", e.error, e.description));
        if let Some(c) = &claimed {
            ev = ev.agent(c);
        }
        if let Err(err) = self.audit_alone(ev).await {
            tracing::error!(error = %err, "cannot audit an authentication failure");
        }
    }

    async fn try_token(&self, req: TokenRequest) -> Result<(TokenResponse, String), OAuthError> {
        match req.grant_type.as_deref() {
            Some("client_credentials") => {}
            Some(other) => {
                return Err(OAuthError::new(
                    "unsupported_grant_type",
                    format!("grant_type `{other}` is not supported (use client_credentials)"),
                ));
            }
            None => {
                return Err(OAuthError::new(
                    "invalid_request",
                    "`grant_type` is required",
                ));
            }
        }
        let client_id = req
            .client_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OAuthError::new("invalid_request", "`client_id` is required"))?;
        if req.client_assertion_type.as_deref() != Some(JWT_BEARER_ASSERTION) {
            return Err(OAuthError::new(
                "invalid_client",
                format!("`client_assertion_type` must be `{JWT_BEARER_ASSERTION}`"),
            ));
        }
        let assertion = req
            .client_assertion
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OAuthError::new("invalid_client", "`client_assertion` is required"))?;
        let ttl = self.session_ttl(req.ttl.as_deref())?;
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "token endpoint failed");
            OAuthError::new("server_error", "the broker could not complete the request")
        };
        let agent = self
            .store
            .get_agent(client_id)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| OAuthError::new("invalid_client", "unknown client"))?;
        let t = now();
        let audiences = [
            self.config.server.issuer.as_str(),
            &self.config.token_endpoint(),
        ];
        let audiences: Vec<&str> = audiences.to_vec();
        let claims =
            verify_client_assertion(assertion, &agent.id, &agent.jwks, &audiences, unix(t))
                .map_err(|e| OAuthError::new("invalid_client", e.to_string()))?;
        if agent.status != AgentStatus::Active {
            return Err(OAuthError::new(
                "invalid_client",
                format!("agent is {}", agent.status),
            ));
        }
        let task = Task {
            id: new_id("tk"),
            agent_id: agent.id.clone(),
            description: req.task.unwrap_or_default(),
            state: TaskState::Open,
            opened_at: t,
            expires_at: t + ttl,
            ended_at: None,
            end_reason: None,
        };
        let mut tx = self.store.begin().await.map_err(|e| internal(&e))?;
        let jti = claims.jti.unwrap_or_default();
        let fresh = tx
            .record_jti(&agent.id, &jti, crate::model::from_unix(claims.exp))
            .await
            .map_err(|e| internal(&e))?;
        if !fresh {
            return Err(OAuthError::new(
                "invalid_client",
                "the assertion was already used (`jti` replayed)",
            ));
        }
        tx.insert_task(&task).await.map_err(|e| internal(&e))?;
        tx.touch_agent(&agent.id, t)
            .await
            .map_err(|e| internal(&e))?;
        tx.audit(
            AuditEvent::new(&Actor::Agent(agent.id.clone()), "task.opened")
                .agent(&agent.id)
                .task(&task.id)
                .details(serde_json::json!({
                    "method": "private_key_jwt",
                    "description": task.description,
                    "expires_at": unix(task.expires_at),
                })),
        )
        .await
        .map_err(|e| internal(&e))?;
        tx.commit().await.map_err(|e| internal(&e))?;
        let session = SessionClaims {
            iss: self.config.server.issuer.clone(),
            sub: agent.id.clone(),
            aud: self.config.server.issuer.clone(),
            iat: unix(t),
            exp: unix(task.expires_at),
            jti: new_id("st"),
            task_id: task.id.clone(),
        };
        let token = self.signer.sign(&session).map_err(|e| internal(&e))?;
        Ok((
            TokenResponse {
                access_token: token,
                token_type: "Bearer",
                expires_in: ttl.whole_seconds(),
                task_id: task.id,
            },
            agent.id,
        ))
    }

    fn session_ttl(&self, raw: Option<&str>) -> Result<time::Duration, OAuthError> {
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

    /// Checks a session token: signature, then that its task is still open
    /// and its agent still active. Ended tasks fail here at once.
    pub async fn session(&self, token: &str) -> Result<Session, String> {
        let claims = self.signer.verify(token).map_err(|e| e.to_string())?;
        let task = self
            .store
            .get_task(&claims.task_id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "session lookup failed");
                "the session cannot be checked right now".to_owned()
            })?
            .ok_or("the session's task does not exist")?;
        if task.agent_id != claims.sub {
            return Err("the session token does not match its task".into());
        }
        if task.state != TaskState::Open || task.expires_at <= now() {
            return Err(format!("the task has ended ({})", task.state));
        }
        let agent = self
            .store
            .get_agent(&task.agent_id)
            .await
            .ok()
            .flatten()
            .ok_or("the session's agent does not exist")?;
        if agent.status != AgentStatus::Active {
            return Err(format!("agent is {}", agent.status));
        }
        Ok(Session { agent, task })
    }

    /// Appends one audit event in its own transaction.
    pub(crate) async fn audit_alone(&self, ev: AuditEvent) -> Result<(), crate::store::StoreError> {
        let mut tx = self.store.begin().await?;
        tx.audit(ev).await?;
        tx.commit().await
    }
}
