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

pub use super::agent_update::AgentUpdate;
use super::agent_update::identity_changes;
pub(crate) use super::agent_update::ownership_change;

/// What a caller supplies to register an agent (HTTP body, CLI, seed file).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
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
    /// The longest any session or credential of the agent may live.
    #[serde(default)]
    pub max_ttl_secs: Option<u64>,
}

/// The deepest delegation chain an agent may start.
const MAX_DELEGATION_DEPTH: u8 = 8;

fn default_auth() -> AuthMethod {
    AuthMethod::PrivateKeyJwt
}

/// A review recorded with an agent (registered, or set in an update)
/// happened: not in the future (whole seconds, as the store keeps them).
pub(super) fn check_review_date(at: Option<time::OffsetDateTime>) -> BrokerResult<()> {
    if at.is_some_and(|at| at.unix_timestamp() > crate::model::now().unix_timestamp()) {
        return Err(BrokerError::InvalidRequest(
            "`last_review_at` is in the future: record a review that happened".into(),
        ));
    }
    Ok(())
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
    /// The checks registration makes, for callers that build specs
    /// themselves (`keygate plan`).
    pub fn check(&self) -> BrokerResult<()> {
        self.validate()?;
        check_review_date(self.last_review_at)
    }

    pub(super) fn validate(&self) -> BrokerResult<()> {
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
        if self.max_ttl_secs == Some(0) {
            return bad("`max_ttl_secs` must be at least 1 (omit it for no cap of its own)".into());
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

/// What registering or changing an agent came to.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
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
        self.check_registration(&spec).await?;
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
            suspended_from: None,
            step_up: None,
            excluded_scopes: Default::default(),
            max_ttl_secs: spec.max_ttl_secs,
            keys_rotated_at: None,
            owner_changed_at: None,
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
            Some(
                self.open_registration_approval(&mut *tx, actor, &agent)
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

    /// Everything registering `spec` checks before it writes anything (the
    /// spec itself, its review date, its sponsor, its federated identity):
    /// also what `keygate apply` checks before it changes anything.
    pub(crate) async fn check_registration(&self, spec: &AgentSpec) -> BrokerResult<()> {
        spec.validate()?;
        check_review_date(spec.last_review_at)?;
        self.check_sponsor(&spec.sponsor).await?;
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
        Ok(())
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
        if after.sponsor != before.sponsor {
            self.check_sponsor(&after.sponsor).await?;
        }
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
        let identity = identity_changes(&before, &after);
        let held = (!widened.is_empty() || !identity.is_empty())
            && self.config.provisioning.require_approval;
        // The same change asked again while it waits (an `apply` run
        // twice) is the same request, not a second one to decide.
        if held
            && let Some(waiting) = self
                .waiting_provisioning(id, |r| {
                    r["change"] == "update"
                        && r["update"] == change
                        && r["status"] == before.status.as_str()
                })
                .await?
        {
            return Ok(Registered {
                agent: before,
                approval: Some(waiting),
                widened_scopes: widened,
            });
        }
        let mut tx = self.store.begin().await?;
        if held {
            let mut what = Vec::new();
            if !widened.is_empty() {
                what.push(format!("widens it to: {}", widened.join(", ")));
            }
            if !identity.is_empty() {
                what.push(format!("changes its {}", identity.join(", ")));
            }
            let approval = self
                .open_provisioning_approval(
                    &mut *tx,
                    actor,
                    &before,
                    serde_json::json!({
                        "change": "update", "update": change, "widened_scopes": widened,
                        "identity_changes": identity, "status": before.status,
                    }),
                    format!("agent `{id}`: {}", what.join("; ")),
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
        unchanged_since(&mut *tx, &before).await?;
        tx.update_agent(&after).await?;
        tx.audit(
            AuditEvent::new(actor, "agent.updated")
                .agent(id)
                .details(serde_json::json!({
                    "update": change, "widened_scopes": widened,
                    "ownership": ownership_change(&before, &after),
                })),
        )
        .await?;
        tx.commit().await?;
        // A legitimate change: what the agent uses from now on is learned,
        // not flagged as new (continuous validation).
        self.validation.relearn(Some(id));
        // What the agent holds is judged again on its new attributes.
        self.recheck_agent(actor, id).await?;
        Ok(Registered {
            agent: after,
            approval: None,
            widened_scopes: Vec::new(),
        })
    }

    /// A sponsor must be an active person when the directory is configured.
    pub(crate) async fn check_sponsor(&self, sponsor: &str) -> BrokerResult<()> {
        use crate::governance::people::Standing;
        match self.directory().await?.standing(sponsor) {
            Standing::Active | Standing::Unknown => Ok(()),
            Standing::Departed(at) => Err(BrokerError::InvalidRequest(format!(
                "sponsor `{}` left on {}: name an active person",
                crate::limits::claimed_label(sponsor),
                at.date()
            ))),
            Standing::Gone => Err(BrokerError::InvalidRequest(format!(
                "sponsor `{}` is not an active person in the people directory (`[[people]]`)",
                crate::limits::claimed_label(sponsor)
            ))),
        }
    }

    pub async fn agent(&self, id: &str) -> BrokerResult<Agent> {
        self.store
            .get_agent(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no agent `{id}`")))
    }

    /// Moves an agent to `to`. Suspending or decommissioning ends its open
    /// tasks and queues every live lease for revocation, in the same commit.
    /// Resume (`to = active`) returns the agent to the state it was suspended
    /// from: an agent suspended while `pending` goes back to `pending` with a
    /// fresh provisioning approval, never to `active` on one admin's word.
    pub async fn set_agent_status(
        &self,
        actor: &Actor,
        id: &str,
        to: AgentStatus,
        reason: &str,
    ) -> BrokerResult<Agent> {
        let agent = self.agent(id).await?;
        let from: &[AgentStatus] = match to {
            AgentStatus::Suspended => &[AgentStatus::Active, AgentStatus::Pending],
            AgentStatus::Active => &[AgentStatus::Suspended],
            AgentStatus::Decommissioned => &[
                AgentStatus::Pending,
                AgentStatus::Active,
                AgentStatus::Suspended,
            ],
            AgentStatus::Pending => &[],
        };
        let conflict = |status: AgentStatus| {
            BrokerError::Conflict(format!("agent `{id}` is {status}; it cannot become {to}"))
        };
        if !from.contains(&agent.status) {
            return Err(conflict(agent.status));
        }
        // Resume goes back where suspend came from.
        let target = match to {
            AgentStatus::Active => agent.suspended_from.unwrap_or(AgentStatus::Active),
            other => other,
        };
        let t = now();
        let mut tx = self.store.begin().await?;
        if tx.set_agent_status(id, from, target, t).await?.is_none() {
            // Changed since it was read: decide again on what it is now.
            let current = self.agent(id).await?;
            return Err(conflict(current.status));
        }
        let (mut tasks, mut leases) = (Vec::new(), Vec::new());
        if matches!(target, AgentStatus::Suspended | AgentStatus::Decommissioned) {
            let why = format!("agent {to}: {reason}");
            (tasks, leases) = self.end_agent_work(&mut *tx, id, &why, t).await?;
        }
        // Leaving `pending` (or leaving for good) ends the provisioning
        // approvals still open: granting one later must not bring it back.
        let mut cancelled = Vec::new();
        if agent.status == AgentStatus::Pending || target == AgentStatus::Decommissioned {
            cancelled = self
                .cancel_provisioning(&mut *tx, actor, id, &format!("agent {to}: {reason}"))
                .await?;
        }
        let action = if to == AgentStatus::Active {
            "agent.resumed".to_owned()
        } else {
            format!("agent.{to}")
        };
        tx.audit(
            AuditEvent::new(actor, &action)
                .agent(id)
                .reason(reason)
                .details(serde_json::json!({
                    "from": agent.status, "to": target,
                    "tasks_ended": tasks.len(), "leases_queued": leases.len(),
                    "approvals_cancelled": cancelled,
                })),
        )
        .await?;
        let reopened = if target == AgentStatus::Pending {
            let mut pending = agent.clone();
            pending.status = AgentStatus::Pending;
            Some(
                self.open_registration_approval(&mut *tx, actor, &pending)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        if reopened.is_some() || !cancelled.is_empty() {
            self.notifier.wake();
            self.approvals_changed.notify_waiters();
        }
        self.leases.wake();
        if matches!(target, AgentStatus::Suspended | AgentStatus::Decommissioned) {
            // Sessions released earlier may still live (STS): fence them all,
            // and those of sub-agents in the delegated tasks that ended
            // with its own.
            let mut live: Vec<String> = self
                .store
                .live_leases(&Selector::Agent(id.to_owned()))
                .await?
                .into_iter()
                .map(|l| l.id)
                .collect();
            let below = self
                .uncovered_leases_of(&Selector::Agent(id.to_owned()), &tasks, Vec::new())
                .await?;
            for l in below {
                if !live.contains(&l) {
                    live.push(l);
                }
            }
            self.fence_sessions(actor, &format!("agent-{target}"), &live)
                .await;
        }
        self.await_revocations(&leases, Self::CONFIRM_WAIT).await;
        self.agent(id).await
    }

    /// Ends an agent's open tasks and queues every live lease for revocation
    /// (suspend, decommission, a denied registration). Returns (tasks, leases).
    pub(crate) async fn end_agent_work(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        id: &str,
        why: &str,
        t: OffsetDateTime,
    ) -> BrokerResult<(Vec<String>, Vec<String>)> {
        let sel = Selector::Agent(id.to_owned());
        let tasks = tx
            .end_tasks(
                &TaskSelector::Emergency(sel.clone()),
                TaskState::Revoked,
                why,
                t,
            )
            .await?;
        let leases = tx
            .queue_revocations(&LeaseSelector::Emergency(sel), why, None, t)
            .await?;
        Ok((tasks, leases))
    }

    /// The provisioning approval that a new (or returning) `pending` agent
    /// waits for.
    pub(crate) async fn open_registration_approval(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        actor: &Actor,
        agent: &Agent,
    ) -> BrokerResult<crate::model::Approval> {
        let reachable = self.reachable_scopes(&Agent {
            status: AgentStatus::Active,
            ..agent.clone()
        });
        self.open_provisioning_approval(
            tx,
            actor,
            agent,
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
        .await
    }
}

/// Registers every agent declared in `dir` (`*.toml`, `*.yaml`, the
/// agents-as-code format) that is not registered yet, and writes the
/// generated policies of those with an `agent_policy`.
pub async fn seed_agents(broker: &Broker, dir: &Path) -> anyhow::Result<usize> {
    let files = crate::ascode::format::read_folder(dir)
        .map_err(|e| anyhow::anyhow!("cannot read agent seed folder `{}`: {e}", dir.display()))?;
    broker
        .seed_declared(files)
        .await
        .map_err(|e| anyhow::anyhow!("agent seed folder `{}`: {e}", dir.display()))
}

/// Refuses (409) a rewrite decided on `before` when the agent changed since
/// it was read (another change, a review's attestation, a suspension):
/// written over, that change would be undone. Its last use is not a change.
pub(super) async fn unchanged_since(
    tx: &mut dyn crate::store::StoreTx,
    before: &Agent,
) -> BrokerResult<()> {
    let same = tx.agent(&before.id).await?.is_some_and(|mut now| {
        now.last_used_at = before.last_used_at;
        now == *before
    });
    if same {
        Ok(())
    } else {
        Err(BrokerError::Conflict(format!(
            "agent `{}` changed while this change was being made; read it again and retry",
            before.id
        )))
    }
}
