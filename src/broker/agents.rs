//! The agent registry: register, suspend, resume, decommission.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult};
use crate::audit::{Actor, AuditEvent};
use crate::identity::validate_public_jwks;
use crate::model::{Agent, AgentStatus, AuthMethod, Environment, Selector, TaskState, now};
use crate::store::{LeaseSelector, TaskSelector};

/// What a caller supplies to register an agent (HTTP body, CLI, seed file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub id: String,
    pub team: String,
    pub sponsor: String,
    pub risk_tier: u8,
    pub environment: Environment,
    pub purpose: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_auth")]
    pub auth_method: AuthMethod,
    pub jwks: serde_json::Value,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_review_at: Option<OffsetDateTime>,
}

fn default_auth() -> AuthMethod {
    AuthMethod::PrivateKeyJwt
}

/// Agent ids become SPIFFE path segments and Cedar entity ids: keep them plain.
fn valid_id(id: &str) -> bool {
    (2..=64).contains(&id.len())
        && id
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

impl AgentSpec {
    fn validate(&self) -> BrokerResult<()> {
        let bad = |m: String| Err(BrokerError::InvalidRequest(m));
        if !valid_id(&self.id) {
            return bad(format!(
                "agent id `{}` must be 2-64 characters of a-z, 0-9, `-`, `.`, `_`, starting with a letter or digit",
                self.id
            ));
        }
        if self.team.trim().is_empty() || self.sponsor.trim().is_empty() {
            return bad("`team` and `sponsor` are required".into());
        }
        if !(1..=3).contains(&self.risk_tier) {
            return bad(format!(
                "`risk_tier` must be 1, 2 or 3, got {}",
                self.risk_tier
            ));
        }
        if self.purpose.trim().is_empty() {
            return bad("`purpose` is required: say what the agent is for".into());
        }
        validate_public_jwks(&self.jwks)
            .map_err(|m| BrokerError::InvalidRequest(format!("`jwks`: {m}")))
    }
}

impl Broker {
    /// Registers an agent. It starts `active` (provisioning approval is a later step).
    pub async fn register_agent(&self, actor: &Actor, spec: AgentSpec) -> BrokerResult<Agent> {
        spec.validate()?;
        let t = now();
        let agent = Agent {
            id: spec.id,
            team: spec.team,
            sponsor: spec.sponsor,
            risk_tier: spec.risk_tier,
            environment: spec.environment,
            purpose: spec.purpose,
            labels: spec.labels,
            status: AgentStatus::Active,
            auth_method: spec.auth_method,
            jwks: spec.jwks,
            created_at: t,
            updated_at: t,
            last_used_at: None,
            last_review_at: spec.last_review_at,
        };
        let mut tx = self.store.begin().await?;
        tx.insert_agent(&agent).await?;
        tx.audit(
            AuditEvent::new(actor, "agent.registered")
                .agent(&agent.id)
                .details(serde_json::json!({
                    "team": agent.team, "sponsor": agent.sponsor,
                    "risk_tier": agent.risk_tier, "environment": agent.environment,
                    "status": agent.status,
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(agent)
    }

    pub async fn agent(&self, id: &str) -> BrokerResult<Agent> {
        self.store
            .get_agent(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no agent `{id}`")))
    }

    /// Moves an agent to `to`. Suspending or decommissioning ends its open
    /// tasks and queues every live lease for revocation, in the same commit.
    pub async fn set_agent_status(
        &self,
        actor: &Actor,
        id: &str,
        to: AgentStatus,
        reason: &str,
    ) -> BrokerResult<Agent> {
        let agent = self.agent(id).await?;
        let allowed = matches!(
            (agent.status, to),
            (
                AgentStatus::Active | AgentStatus::Pending,
                AgentStatus::Suspended
            ) | (AgentStatus::Suspended, AgentStatus::Active)
                | (
                    AgentStatus::Pending | AgentStatus::Active | AgentStatus::Suspended,
                    AgentStatus::Decommissioned
                )
        );
        if !allowed {
            return Err(BrokerError::Conflict(format!(
                "agent `{id}` is {}; it cannot become {to}",
                agent.status
            )));
        }
        let t = now();
        let mut tx = self.store.begin().await?;
        tx.set_agent_status(id, to, t).await?;
        let (mut tasks, mut leases) = (Vec::new(), Vec::new());
        if to != AgentStatus::Active {
            let why = format!("agent {to}: {reason}");
            let sel = Selector::Agent(id.to_owned());
            tasks = tx
                .end_tasks(
                    &TaskSelector::Emergency(sel.clone()),
                    TaskState::Revoked,
                    &why,
                    t,
                )
                .await?;
            leases = tx
                .queue_revocations(&LeaseSelector::Emergency(sel), &why, None, t)
                .await?;
        }
        tx.audit(
            AuditEvent::new(actor, &format!("agent.{to}"))
                .agent(id)
                .reason(reason)
                .details(serde_json::json!({
                    "from": agent.status, "to": to,
                    "tasks_ended": tasks.len(), "leases_queued": leases.len(),
                })),
        )
        .await?;
        tx.commit().await?;
        self.leases.wake();
        self.await_revocations(&leases, Self::CONFIRM_WAIT).await;
        self.agent(id).await
    }
}

/// Registers every `*.toml` agent in `dir` that is not registered yet.
pub async fn seed_agents(broker: &Broker, dir: &Path) -> anyhow::Result<usize> {
    let mut added = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read agent seed folder `{}`: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)?;
        let spec: AgentSpec = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("agent file `{}`: {e}", path.display()))?;
        if broker.store.get_agent(&spec.id).await?.is_some() {
            continue;
        }
        broker
            .register_agent(&Actor::System, spec)
            .await
            .map_err(|e| anyhow::anyhow!("agent file `{}`: {e}", path.display()))?;
        added += 1;
    }
    Ok(added)
}
