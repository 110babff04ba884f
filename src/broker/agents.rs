//! The agent registry: register, suspend, resume, decommission.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult};
use crate::audit::{Actor, AuditEvent};
use crate::identity::validate_public_jwks;
use crate::model::{
    Agent, AgentStatus, AuthMethod, Delegation, Environment, FederatedSubject, Selector, TaskState,
    now,
};
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
    /// Sub-agents it may delegate to (RFC 8693), and how deep.
    #[serde(default)]
    pub delegation: Delegation,
    /// A workload identity (a subject of a `[[federation.issuers]]` entry)
    /// it authenticates with instead of, or besides, its keys.
    #[serde(default)]
    pub federated: Option<FederatedSubject>,
    /// May name the user it acts for without the user's ID token.
    #[serde(default)]
    pub may_assert_users: bool,
}

/// The deepest delegation chain an agent may start.
const MAX_DELEGATION_DEPTH: u8 = 8;

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
        if self.delegation.max_depth > MAX_DELEGATION_DEPTH {
            return bad(format!(
                "`delegation.max_depth` must be at most {MAX_DELEGATION_DEPTH}"
            ));
        }
        if let Some(t) = self.delegation.targets.iter().find(|t| !valid_id(t)) {
            return bad(format!("`delegation.targets`: `{t}` is not an agent id"));
        }
        if self.delegation.targets.contains(&self.id) {
            return bad("`delegation.targets`: an agent cannot delegate to itself".into());
        }
        if let Some(f) = &self.federated
            && (f.issuer.trim().is_empty() || f.subject.trim().is_empty())
        {
            return bad("`federated` needs an `issuer` and a `subject`".into());
        }
        let no_keys = self.jwks["keys"].as_array().is_some_and(Vec::is_empty);
        if self.federated.is_some() && no_keys {
            // A federated agent may hold no key of its own.
            return Ok(());
        }
        validate_public_jwks(&self.jwks)
            .map_err(|m| BrokerError::InvalidRequest(format!("`jwks`: {m}")))
    }
}

/// A change to an agent's attributes; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sponsor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_tier: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub last_review_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
}

impl AgentUpdate {
    /// Applies the change to `agent`, checking the result as registration does.
    pub fn apply(&self, agent: &mut Agent) -> BrokerResult<()> {
        let spec = AgentSpec {
            id: agent.id.clone(),
            team: self.team.clone().unwrap_or_else(|| agent.team.clone()),
            sponsor: self
                .sponsor
                .clone()
                .unwrap_or_else(|| agent.sponsor.clone()),
            risk_tier: self.risk_tier.unwrap_or(agent.risk_tier),
            environment: self.environment.unwrap_or(agent.environment),
            purpose: self
                .purpose
                .clone()
                .unwrap_or_else(|| agent.purpose.clone()),
            labels: self.labels.clone().unwrap_or_else(|| agent.labels.clone()),
            auth_method: agent.auth_method,
            jwks: self.jwks.clone().unwrap_or_else(|| agent.jwks.clone()),
            last_review_at: self.last_review_at.or(agent.last_review_at),
            delegation: self
                .delegation
                .clone()
                .unwrap_or_else(|| agent.delegation.clone()),
            federated: agent.federated.clone(),
            may_assert_users: agent.may_assert_users,
        };
        spec.validate()?;
        agent.team = spec.team;
        agent.sponsor = spec.sponsor;
        agent.risk_tier = spec.risk_tier;
        agent.environment = spec.environment;
        agent.purpose = spec.purpose;
        agent.labels = spec.labels;
        agent.jwks = spec.jwks;
        agent.last_review_at = spec.last_review_at;
        agent.delegation = spec.delegation;
        Ok(())
    }
}

/// What registering or changing an agent came to.
#[derive(Debug, serde::Serialize)]
pub struct Registered {
    pub agent: Agent,
    /// Set when the change waits for provisioning approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::model::Approval>,
    /// Scopes the change would make reachable (a change waiting for approval).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub widened_scopes: Vec<String>,
}

impl Broker {
    /// Registers an agent. With `provisioning.require_approval` it starts
    /// `pending` until its provisioning approval is met; otherwise `active`.
    pub async fn register_agent(&self, actor: &Actor, spec: AgentSpec) -> BrokerResult<Registered> {
        spec.validate()?;
        if let Some(f) = &spec.federated
            && f.issuer == super::sessions::SPIFFE_ISSUER
        {
            let Some(tls) = &self.config.server.tls else {
                return Err(BrokerError::InvalidRequest(
                    "`federated.issuer = \"spiffe\"` needs the mTLS listener ([server.tls])".into(),
                ));
            };
            if !f
                .subject
                .starts_with(&format!("spiffe://{}/", tls.trust_domain))
            {
                return Err(BrokerError::InvalidRequest(format!(
                    "`federated.subject` must be a SPIFFE ID in trust domain `{}`",
                    tls.trust_domain
                )));
            }
        } else if let Some(f) = &spec.federated
            && !self.federation.knows(&f.issuer)
        {
            return Err(BrokerError::InvalidRequest(format!(
                "`federated.issuer`: no trusted issuer `{}` under [[federation.issuers]]",
                f.issuer
            )));
        }
        let t = now();
        let held = self.config.provisioning.require_approval;
        let agent = Agent {
            id: spec.id,
            team: spec.team,
            sponsor: spec.sponsor,
            risk_tier: spec.risk_tier,
            environment: spec.environment,
            purpose: spec.purpose,
            labels: spec.labels,
            status: if held {
                AgentStatus::Pending
            } else {
                AgentStatus::Active
            },
            auth_method: spec.auth_method,
            jwks: spec.jwks,
            created_at: t,
            updated_at: t,
            last_used_at: None,
            last_review_at: spec.last_review_at,
            delegation: spec.delegation,
            federated: spec.federated,
            may_assert_users: spec.may_assert_users,
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
        let approval = if held {
            let reachable = self.reachable_scopes(&Agent {
                status: AgentStatus::Active,
                ..agent.clone()
            });
            Some(
                self.open_provisioning_approval(
                    &mut *tx,
                    actor,
                    &agent,
                    serde_json::json!({
                        "change": "register",
                        "agent": {
                            "team": agent.team, "sponsor": agent.sponsor,
                            "risk_tier": agent.risk_tier, "environment": agent.environment,
                            "purpose": agent.purpose, "labels": agent.labels,
                        },
                        "reachable_scopes": reachable,
                    }),
                    format!("new agent identity: {}", agent.purpose),
                )
                .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        if approval.is_some() {
            self.notifier.wake();
        }
        Ok(Registered {
            agent,
            approval,
            widened_scopes: Vec::new(),
        })
    }

    /// Changes an agent's attributes. A change that makes more scopes
    /// reachable waits for provisioning approval when config requires it.
    pub async fn update_agent(
        &self,
        actor: &Actor,
        id: &str,
        update: AgentUpdate,
    ) -> BrokerResult<Registered> {
        let before = self.agent(id).await?;
        if before.status == AgentStatus::Decommissioned {
            return Err(BrokerError::Conflict(format!(
                "agent `{id}` is decommissioned; its record is kept as evidence and cannot change"
            )));
        }
        let mut after = before.clone();
        update.apply(&mut after)?;
        after.updated_at = now();
        let probe = |a: &Agent| {
            self.reachable_scopes(&Agent {
                status: AgentStatus::Active,
                ..a.clone()
            })
        };
        let was = probe(&before);
        let widened: Vec<String> = probe(&after)
            .into_iter()
            .filter(|s| !was.contains(s))
            .collect();
        let change =
            serde_json::to_value(&update).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut tx = self.store.begin().await?;
        if !widened.is_empty() && self.config.provisioning.require_approval {
            let approval = self
                .open_provisioning_approval(
                    &mut *tx,
                    actor,
                    &before,
                    serde_json::json!({
                        "change": "update", "update": change, "widened_scopes": widened,
                    }),
                    format!("widens agent `{id}` to: {}", widened.join(", ")),
                )
                .await?;
            tx.commit().await?;
            self.notifier.wake();
            return Ok(Registered {
                agent: before,
                approval: Some(approval),
                widened_scopes: widened,
            });
        }
        tx.update_agent(&after).await?;
        tx.audit(
            AuditEvent::new(actor, "agent.updated")
                .agent(id)
                .details(serde_json::json!({ "update": change, "widened_scopes": widened })),
        )
        .await?;
        tx.commit().await?;
        Ok(Registered {
            agent: after,
            approval: None,
            widened_scopes: Vec::new(),
        })
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
