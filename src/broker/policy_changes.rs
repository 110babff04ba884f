//! Policy changes: previewing a candidate set (who gains and loses which
//! scopes, whatever the hour, and which live leases it would no longer
//! permit), and revoking what the active set (reloaded: `policy_reload.rs`)
//! or an agent's new attributes no longer permit — each lease judged on the
//! facts of its original request (agent, scope, ttl, task, user, delegators,
//! time of issue).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::credentials::scope_facts;
use super::{Broker, BrokerError, BrokerResult};
use crate::audit::{Actor, AuditEvent};
use crate::model::{AgentStatus, Lease, LeaseState, Selector, Task, now};
use crate::policy::{PolicyEngine, RequestFacts};
use crate::store::LeaseSelector;

/// What a policy set changes for one agent.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentDiff {
    pub agent: String,
    pub gained: Vec<String>,
    pub lost: Vec<String>,
    /// What it may reach under the new set (empty: nothing at all).
    pub reaches: Vec<String>,
}

/// A live lease a policy set does not permit.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NotPermitted {
    pub lease: String,
    pub agent: String,
    pub scope: String,
    pub task: String,
}

/// The difference between the active set and another.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PolicyDiff {
    pub from_hash: String,
    pub to_hash: String,
    /// Agents whose reach changes (those unchanged are left out).
    pub agents: Vec<AgentDiff>,
    /// Live leases the new set would not permit.
    pub leases_not_permitted: Vec<NotPermitted>,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PolicyReload {
    #[serde(flatten)]
    pub diff: PolicyDiff,
    /// `revoke` or `report` (`policy.on_change`).
    pub on_change: OnChange,
    /// Leases queued for revocation (empty in `report` mode).
    pub revoked: Vec<String>,
    /// Open tasks ended because their agent may reach no scope any more.
    pub tasks_ended: Vec<String>,
    /// The set widens some agent's reach under `[provisioning]
    /// require_approval`: it waits for this approval and is not active yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<crate::model::Approval>,
}

/// `[policy] on_change`: what happens to live leases the new set no longer
/// permits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnChange {
    /// Queue them for revocation (the default).
    #[default]
    Revoke,
    /// List them only.
    Report,
}

/// `POST /v1/policy/diff` and `/reload` bodies: a candidate set as
/// `{file name: content}`; reload without one reads the policy directory.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFiles {
    #[serde(default)]
    pub files: Option<BTreeMap<String, String>>,
}

impl Broker {
    fn candidate(&self, files: Option<&BTreeMap<String, String>>) -> BrokerResult<PolicyEngine> {
        self.candidate_files(files).map(|(engine, _)| engine)
    }

    /// The candidate set and the files it was built from.
    pub(super) fn candidate_files(
        &self,
        files: Option<&BTreeMap<String, String>>,
    ) -> BrokerResult<(PolicyEngine, BTreeMap<String, String>)> {
        let invalid = |e: crate::policy::PolicyError| {
            BrokerError::InvalidRequest(format!(
                "the policy set is not valid, nothing changed: {e}"
            ))
        };
        let files = match files {
            Some(f) => f.clone(),
            None => PolicyEngine::read_dir(&self.config.policy.dir).map_err(invalid)?,
        };
        Ok((PolicyEngine::from_files(&files).map_err(invalid)?, files))
    }

    /// The difference `candidate` would make.
    pub async fn policy_diff(&self, files: &PolicyFiles) -> BrokerResult<PolicyDiff> {
        let candidate = self.candidate(files.files.as_ref())?;
        self.diff_against(&self.policy.current(), &candidate).await
    }

    pub(super) async fn diff_against(
        &self,
        old: &PolicyEngine,
        new: &PolicyEngine,
    ) -> BrokerResult<PolicyDiff> {
        let mut agents = Vec::new();
        for a in self.store.list_agents(None, None).await? {
            if a.status == AgentStatus::Decommissioned {
                continue;
            }
            let before = self.reachable_scopes_under(old, &a);
            let after = self.reachable_scopes_under(new, &a);
            let gained: Vec<String> = after
                .iter()
                .filter(|s| !before.contains(s))
                .cloned()
                .collect();
            let lost: Vec<String> = before
                .iter()
                .filter(|s| !after.contains(s))
                .cloned()
                .collect();
            if !gained.is_empty() || !lost.is_empty() {
                agents.push(AgentDiff {
                    agent: a.id,
                    gained,
                    lost,
                    reaches: after,
                });
            }
        }
        Ok(PolicyDiff {
            from_hash: old.hash().to_owned(),
            to_hash: new.hash().to_owned(),
            agents,
            leases_not_permitted: self.not_permitted(new, &Selector::All).await?,
        })
    }

    /// Live leases of `selector` that `policy` does not permit on the facts
    /// of their original request.
    pub(crate) async fn not_permitted(
        &self,
        policy: &PolicyEngine,
        selector: &Selector,
    ) -> BrokerResult<Vec<NotPermitted>> {
        let mut agents = HashMap::new();
        let mut out = Vec::new();
        // Leases already on their way out are not judged again.
        let leases: Vec<Lease> = self
            .store
            .live_leases(selector)
            .await?
            .into_iter()
            .filter(|l| matches!(l.state, LeaseState::Active | LeaseState::Pending))
            .collect();
        // Their tasks and decisions in two reads, not two per task: under
        // load every read waits its turn for a connection.
        let task_ids: Vec<String> = leases
            .iter()
            .map(|l| l.task_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let tasks: HashMap<String, Option<Task>> = self
            .store
            .tasks(&task_ids)
            .await?
            .into_iter()
            .map(|t| (t.id.clone(), Some(t)))
            .collect();
        let decided_ttls = self.decided_ttls(&task_ids).await?;
        for l in leases {
            if !agents.contains_key(&l.agent_id) {
                let a = self.store.get_agent(&l.agent_id).await?;
                agents.insert(l.agent_id.clone(), a);
            }
            let (Some(Some(task)), Some(Some(agent))) =
                (tasks.get(&l.task_id), agents.get(&l.agent_id))
            else {
                continue;
            };
            let ttl = decided_ttls.get(&l.id).copied();
            if !self.still_permitted(policy, agent, task, &l, ttl).await? {
                out.push(NotPermitted {
                    lease: l.id.clone(),
                    agent: l.agent_id.clone(),
                    scope: l.scope.clone(),
                    task: l.task_id.clone(),
                });
            }
        }
        Ok(out)
    }

    /// The ttl policy judged for each lease of a task, from the audit log
    /// (the lease's own expiry may since have moved: the backend's clock,
    /// a renewal).
    async fn decided_ttls(&self, task_ids: &[String]) -> BrokerResult<HashMap<String, u64>> {
        let mut out = HashMap::new();
        let events = self
            .store
            .audit_of_tasks(task_ids, &["credential.requested", "credential.redeemed"])
            .await?;
        for e in events {
            if let (Some(lease), Some(ttl)) = (e.lease, e.details["ttl"].as_u64()) {
                out.insert(lease, ttl);
            }
        }
        Ok(out)
    }

    pub(super) async fn still_permitted(
        &self,
        policy: &PolicyEngine,
        agent: &crate::model::Agent,
        task: &Task,
        l: &Lease,
        decided_ttl: Option<u64>,
    ) -> BrokerResult<bool> {
        // A scope removed from config cannot be judged here; its leases are
        // the reaper's and the operator's, not policy's.
        let Some(scope_cfg) = self.config.scopes.iter().find(|c| c.name == l.scope) else {
            return Ok(true);
        };
        let facts = RequestFacts {
            task_id: &task.id,
            task_description: &task.description,
            requested_ttl_secs: decided_ttl
                .unwrap_or_else(|| (l.expires_at - l.created_at).whole_seconds().max(1) as u64),
            now: l.created_at,
            chain: &task.chain,
        };
        let scope = scope_facts(scope_cfg);
        let internal = |e: crate::policy::PolicyError| BrokerError::Internal(e.to_string());
        if !policy
            .decide(agent, &scope, &facts)
            .map_err(internal)?
            .allow
        {
            return Ok(false);
        }
        if let Some(u) = &task.on_behalf_of
            && !policy
                .decide_for_user(agent, u, &scope, &facts)
                .map_err(internal)?
                .allow
        {
            return Ok(false);
        }
        for (i, id) in task.chain.iter().enumerate() {
            let above = RequestFacts {
                chain: &task.chain[..i],
                ..facts.clone()
            };
            let permitted = match self.store.get_agent(id).await? {
                Some(d) => policy.decide(&d, &scope, &above).map_err(internal)?.allow,
                None => false,
            };
            if !permitted {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Broker {
    /// After an agent's attributes changed: its live leases the active set
    /// no longer permits are queued for revocation (`policy.on_change =
    /// "revoke"`) or only reported in the audit log (`"report"`).
    pub(crate) async fn recheck_agent(
        &self,
        actor: &Actor,
        agent_id: &str,
    ) -> BrokerResult<Vec<String>> {
        // Before the scan: a credential request that read the agent before
        // the change and writes its lease after the scan judges it again.
        self.agents_changed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let policy = self.policy.current();
        let gone = self
            .not_permitted(&policy, &Selector::Agent(agent_id.to_owned()))
            .await?;
        // An agent left with no scope at all loses its open tasks even when
        // it holds no lease the change forbids (none at all, say): its
        // session tokens must stop working as the README says.
        let agent = self.agent(agent_id).await?;
        let nothing_left = self.reachable_scopes_under(&policy, &agent).is_empty();
        let revoking = self.config.policy.on_change == OnChange::Revoke;
        if gone.is_empty() && !(nothing_left && revoking) {
            return Ok(Vec::new());
        }
        let reason = format!(
            "agent `{agent_id}` changed; policy {} no longer permits it",
            short(policy.hash())
        );
        let mut tx = self.store.begin().await?;
        let revoked = match self.config.policy.on_change {
            OnChange::Revoke => {
                let t = now();
                let mut revoked =
                    queue_not_permitted(&mut *tx, actor, &gone, &reason, policy.hash(), t).await?;
                if nothing_left {
                    let (_, leases) = self
                        .end_when_nothing_left(&mut *tx, actor, agent_id, &reason, t)
                        .await?;
                    revoked.extend(leases);
                }
                revoked
            }
            OnChange::Report => {
                tx.audit(
                    AuditEvent::new(actor, "agent.leases_not_permitted")
                        .agent(agent_id)
                        .reason(reason)
                        .details(serde_json::json!({ "leases": gone })),
                )
                .await?;
                Vec::new()
            }
        };
        tx.commit().await?;
        if !revoked.is_empty() {
            self.leases.wake();
            let cause = format!("policy-{}", short(policy.hash()));
            self.fence_sessions(actor, &cause, &revoked).await;
        }
        Ok(revoked)
    }
}

impl Broker {
    /// An agent that may reach no scope at all has nothing left to do: its
    /// open tasks end (their tokens stop working) and any lease left goes
    /// to the revocation queue, audited as `agent.tasks_ended_by_policy`.
    pub(super) async fn end_when_nothing_left(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        actor: &Actor,
        agent_id: &str,
        reason: &str,
        t: time::OffsetDateTime,
    ) -> BrokerResult<(Vec<String>, Vec<String>)> {
        let why = format!("{reason}: the agent may reach no scope");
        let (tasks, leases) = self.end_agent_work(tx, agent_id, &why, t).await?;
        if !tasks.is_empty() || !leases.is_empty() {
            tx.audit(
                AuditEvent::new(actor, "agent.tasks_ended_by_policy")
                    .agent(agent_id)
                    .reason(why)
                    .details(serde_json::json!({ "tasks": tasks, "leases": leases })),
            )
            .await?;
        }
        Ok((tasks, leases))
    }
}

/// Queues each lease for revocation with an audit event naming the change.
pub(super) async fn queue_not_permitted(
    tx: &mut dyn crate::store::StoreTx,
    actor: &Actor,
    leases: &[NotPermitted],
    reason: &str,
    policy_hash: &str,
    t: time::OffsetDateTime,
) -> BrokerResult<Vec<String>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    // One statement for the lot (a reload under load may end thousands).
    let ids = leases.iter().map(|n| n.lease.clone()).collect();
    let queued: std::collections::HashSet<String> = tx
        .queue_revocations(&LeaseSelector::Leases(ids), reason, None, t)
        .await?
        .into_iter()
        .collect();
    let mut revoked = Vec::new();
    for n in leases.iter().filter(|n| queued.contains(&n.lease)) {
        tx.audit(
            AuditEvent::new(actor, "lease.policy_revoked")
                .agent(&n.agent)
                .task(&n.task)
                .scope(&n.scope)
                .lease(&n.lease)
                .reason(reason.to_owned())
                .details(serde_json::json!({ "policy_hash": policy_hash })),
        )
        .await?;
        revoked.push(n.lease.clone());
    }
    Ok(revoked)
}

pub(super) fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}
