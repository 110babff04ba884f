//! `keygate plan` and `keygate apply`: what the declared agents would
//! change in the registry and the generated policies (field by field, and
//! the scopes each agent gains and loses), and making it so through the same
//! paths as the API — registration, updates and policy reloads wait for
//! approval where config says so — every change audited with its source
//! file and content hash.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::compile;
use super::format::{self, Declared, MANAGED_LABEL};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{
    AgentUpdate, Broker, BrokerError, BrokerResult, PolicyFiles, PolicyReload, Registered,
};
use crate::model::{Agent, AgentStatus, now};
use crate::policy::PolicyEngine;

/// `POST /v1/ascode/plan` and `/apply`: the files of the agents directory
/// by name, and whether agents an earlier apply managed that are no longer
/// declared are decommissioned.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub prune: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldChange {
    pub field: &'static str,
    pub from: serde_json::Value,
    pub to: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentAction {
    Create,
    Update,
    Unchanged,
    /// Managed by an earlier apply, no longer declared: `--prune` retires it.
    Decommission,
    /// Managed by an earlier apply, no longer declared, kept (no `--prune`).
    Absent,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentPlan {
    pub agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub action: AgentAction,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<FieldChange>,
    /// Scopes it may reach after and not before (whatever the hour).
    pub gained: Vec<String>,
    pub lost: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PolicyPlan {
    pub file: String,
    /// `add`, `change` or `remove`.
    pub action: &'static str,
}

/// What would change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Plan {
    pub agents: Vec<AgentPlan>,
    pub policies: Vec<PolicyPlan>,
    /// Agents and policies that would change (0: nothing to do).
    pub changes: usize,
}

/// What an apply did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Applied {
    pub plan: Plan,
    /// Registrations and updates, with the approvals they wait for.
    pub registry: Vec<Registered>,
    /// The policy reload (held for approval when it widens under
    /// `require_approval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyReload>,
}

struct Prepared {
    plan: Plan,
    declared: Vec<Declared>,
    /// Generated policy files to write (`Some`) or delete (`None`).
    writes: BTreeMap<String, Option<String>>,
}

fn j<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn field_changes(a: &Agent, d: &Declared) -> Vec<FieldChange> {
    let s = &d.spec;
    let mut out = Vec::new();
    let mut cmp = |field, from: serde_json::Value, to: serde_json::Value| {
        if from != to {
            out.push(FieldChange { field, from, to });
        }
    };
    cmp("team", j(&a.team), j(&s.team));
    cmp("sponsor", j(&a.sponsor), j(&s.sponsor));
    cmp("risk_tier", j(&a.risk_tier), j(&s.risk_tier));
    cmp("environment", j(&a.environment), j(&s.environment));
    cmp("purpose", j(&a.purpose), j(&s.purpose));
    cmp("labels", j(&a.labels), j(&s.labels));
    cmp("jwks", j(&a.jwks), j(&s.jwks));
    cmp("delegation", j(&a.delegation), j(&s.delegation));
    cmp("federated", j(&a.federated), j(&s.federated));
    cmp(
        "may_assert_users",
        j(&a.may_assert_users),
        j(&s.may_assert_users),
    );
    cmp("max_ttl_secs", j(&a.max_ttl_secs), j(&s.max_ttl_secs));
    out
}

/// The agent a declaration would make (for the widening analysis).
fn as_agent(d: &Declared, before: Option<&Agent>) -> Agent {
    let s = &d.spec;
    let t = now();
    let base = before.cloned();
    Agent {
        id: s.id.clone(),
        team: s.team.clone(),
        sponsor: s.sponsor.clone(),
        risk_tier: s.risk_tier,
        environment: s.environment,
        purpose: s.purpose.clone(),
        labels: s.labels.clone(),
        status: AgentStatus::Active,
        auth_method: s.auth_method,
        jwks: s.jwks.clone(),
        created_at: base.as_ref().map_or(t, |a| a.created_at),
        updated_at: t,
        last_used_at: base.as_ref().and_then(|a| a.last_used_at),
        last_review_at: base.as_ref().and_then(|a| a.last_review_at),
        delegation: s.delegation.clone(),
        federated: s.federated.clone(),
        may_assert_users: s.may_assert_users,
        suspended_from: None,
        step_up: None,
        max_ttl_secs: s.max_ttl_secs,
        keys_rotated_at: base.as_ref().and_then(|a| a.keys_rotated_at),
        owner_changed_at: match &base {
            Some(a) if a.team != s.team || a.sponsor != s.sponsor => Some(t),
            Some(a) => a.owner_changed_at,
            None => None,
        },
        excluded_scopes: base.map(|a| a.excluded_scopes).unwrap_or_default(),
    }
}

impl Broker {
    async fn prepare(&self, req: &PlanRequest, seeding: bool) -> BrokerResult<Prepared> {
        let bad = |m: String| BrokerError::InvalidRequest(format!("{m}; nothing changed"));
        let scopes: BTreeSet<String> = self.config.scopes.iter().map(|s| s.name.clone()).collect();
        let mut mapping = format::mapping(&req.files).map_err(bad)?;
        if seeding {
            let dropped = mapping.retain_configured(&scopes);
            if !dropped.is_empty() {
                tracing::warn!(scopes = ?dropped, "the seed folder's mapping names scopes this config does not have; they are left out");
            }
        }
        let mut declared = format::declared(&req.files, &mapping, &scopes).map_err(bad)?;
        let registry = self.store.list_agents(None, None).await?;
        if seeding {
            // Seeds register what is absent; an agent retired since stays so.
            declared.retain(|d| {
                !registry
                    .iter()
                    .any(|a| a.id == d.spec.id && a.status == AgentStatus::Decommissioned)
            });
        }
        let ids: BTreeSet<&str> = declared.iter().map(|d| d.spec.id.as_str()).collect();
        let managed_absent: Vec<&Agent> = registry
            .iter()
            .filter(|a| {
                a.status != AgentStatus::Decommissioned
                    && a.labels.get(MANAGED_LABEL.0).map(String::as_str) == Some(MANAGED_LABEL.1)
                    && !ids.contains(a.id.as_str())
            })
            .collect();

        // The policy set as it would be: the directory with each declared
        // agent's generated file written (or removed), and pruned agents'
        // files removed.
        let on_disk = PolicyEngine::read_dir(&self.config.policy.dir)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut writes: BTreeMap<String, Option<String>> = BTreeMap::new();
        for d in &declared {
            let name = compile::file_name(&d.spec.id);
            let want = compile::cedar(d);
            if on_disk.get(&name) != want.as_ref() {
                writes.insert(name, want);
            }
        }
        if req.prune {
            for a in &managed_absent {
                let name = compile::file_name(&a.id);
                if on_disk.contains_key(&name) {
                    writes.insert(name, None);
                }
            }
        }
        let mut candidate_files = on_disk.clone();
        for (name, w) in &writes {
            match w {
                Some(text) => candidate_files.insert(name.clone(), text.clone()),
                None => candidate_files.remove(name),
            };
        }
        let candidate = PolicyEngine::from_files(&candidate_files)
            .map_err(|e| bad(format!("the generated policies do not validate: {e}")))?;
        let active = self.policy.current();

        let mut agents = Vec::new();
        for d in &declared {
            let before = registry.iter().find(|a| a.id == d.spec.id);
            if before.is_some_and(|a| a.status == AgentStatus::Decommissioned) {
                return Err(bad(format!(
                    "`{}` line {}: agent `{}` is decommissioned; its id cannot be declared again",
                    d.file, d.line, d.spec.id
                )));
            }
            let changes = before.map(|a| field_changes(a, d)).unwrap_or_default();
            if changes.iter().any(|c| c.field == "federated") {
                return Err(bad(format!(
                    "`{}` line {}: agent `{}`: `federated` cannot change; decommission it and declare a new agent",
                    d.file, d.line, d.spec.id
                )));
            }
            if let Some(a) = before
                && d.spec.max_ttl_secs.is_none()
                && a.max_ttl_secs.is_some()
            {
                return Err(bad(format!(
                    "`{}` line {}: agent `{}`: its `max_ttl_secs` cannot be removed, only changed",
                    d.file, d.line, d.spec.id
                )));
            }
            // What applying it would refuse is refused now, by file and
            // line, before anything changes: an apply never stops half
            // way (a departed sponsor, an unknown issuer, a bad key).
            let at = |e: BrokerError| {
                bad(format!(
                    "`{}` line {}: agent `{}`: {e}",
                    d.file, d.line, d.spec.id
                ))
            };
            match before {
                None => self.check_registration(&d.spec).await.map_err(at)?,
                Some(a) if !changes.is_empty() => {
                    let mut after = a.clone();
                    update_of(&d.spec).apply(&mut after).map_err(at)?;
                    if after.sponsor != a.sponsor {
                        self.check_sponsor(&after.sponsor).await.map_err(at)?;
                    }
                }
                Some(_) => {}
            }
            let was: Vec<String> = before
                .map(|a| {
                    self.reachable_scopes_under(
                        &active,
                        &Agent {
                            status: AgentStatus::Active,
                            ..a.clone()
                        },
                    )
                })
                .unwrap_or_default();
            let will = self.reachable_scopes_under(&candidate, &as_agent(d, before));
            let action = match (before, changes.is_empty()) {
                (None, _) => AgentAction::Create,
                (Some(_), false) => AgentAction::Update,
                (Some(_), true) => AgentAction::Unchanged,
            };
            let mut gained: Vec<String> =
                will.iter().filter(|s| !was.contains(s)).cloned().collect();
            let mut lost: Vec<String> = was.iter().filter(|s| !will.contains(s)).cloned().collect();
            gained.sort();
            lost.sort();
            agents.push(AgentPlan {
                agent: d.spec.id.clone(),
                file: Some(d.file.clone()),
                action,
                changes,
                gained,
                lost,
            });
        }
        for a in managed_absent {
            agents.push(AgentPlan {
                agent: a.id.clone(),
                file: None,
                action: if req.prune {
                    AgentAction::Decommission
                } else {
                    AgentAction::Absent
                },
                changes: Vec::new(),
                gained: Vec::new(),
                lost: if req.prune {
                    self.reachable_scopes_under(&active, a)
                } else {
                    Vec::new()
                },
            });
        }
        let policies: Vec<PolicyPlan> = writes
            .iter()
            .map(|(file, w)| PolicyPlan {
                file: file.clone(),
                action: match (w, on_disk.contains_key(file)) {
                    (None, _) => "remove",
                    (Some(_), true) => "change",
                    (Some(_), false) => "add",
                },
            })
            .collect();
        let changes = agents
            .iter()
            .filter(|a| {
                matches!(
                    a.action,
                    AgentAction::Create | AgentAction::Update | AgentAction::Decommission
                )
            })
            .count()
            + policies.len();
        Ok(Prepared {
            plan: Plan {
                agents,
                policies,
                changes,
            },
            declared,
            writes,
        })
    }

    /// What applying `req` would change; changes nothing.
    pub async fn plan_agents(&self, req: &PlanRequest) -> BrokerResult<Plan> {
        Ok(self.prepare(req, false).await?.plan)
    }

    /// Makes the registry and the generated policies match `req`.
    pub async fn apply_agents(&self, actor: &Actor, req: &PlanRequest) -> BrokerResult<Applied> {
        let p = self.prepare(req, false).await?;
        let mut registry = Vec::new();
        for a in &p.plan.agents {
            let declared = p.declared.iter().find(|d| d.spec.id == a.agent);
            let done = match (a.action, declared) {
                (AgentAction::Create, Some(d)) => {
                    Some(self.register_agent(actor, d.spec.clone()).await?)
                }
                (AgentAction::Update, Some(d)) => Some(
                    self.update_agent(actor, &d.spec.id, update_of(&d.spec))
                        .await?,
                ),
                (AgentAction::Decommission, _) => {
                    self.set_agent_status(
                        actor,
                        &a.agent,
                        AgentStatus::Decommissioned,
                        "no longer declared (keygate apply --prune)",
                    )
                    .await?;
                    None
                }
                _ => continue,
            };
            self.audit_alone(
                AuditEvent::new(actor, "ascode.applied")
                    .agent(&a.agent)
                    .details(serde_json::json!({
                        "action": a.action, "file": declared.map(|d| &d.file),
                        "sha256": declared.map(|d| &d.sha256),
                        "changes": a.changes.iter().map(|c| c.field).collect::<Vec<_>>(),
                        "held": done.as_ref().and_then(|r| r.approval.as_ref()).map(|x| &x.id),
                    })),
            )
            .await?;
            registry.extend(done);
        }
        let policy = self.write_generated(actor, &p.writes).await?;
        Ok(Applied {
            plan: p.plan,
            registry,
            policy,
        })
    }

    /// Writes (and deletes) generated policy files, then reloads the set.
    async fn write_generated(
        &self,
        actor: &Actor,
        writes: &BTreeMap<String, Option<String>>,
    ) -> BrokerResult<Option<PolicyReload>> {
        if writes.is_empty() {
            return Ok(None);
        }
        let dir = &self.config.policy.dir;
        for (name, w) in writes {
            let path = dir.join(name);
            let result = match w {
                Some(text) => std::fs::write(&path, text),
                None => std::fs::remove_file(&path),
            };
            result.map_err(|e| {
                BrokerError::Internal(format!("cannot write `{}`: {e}", path.display()))
            })?;
        }
        Ok(Some(
            self.reload_policy(actor, &PolicyFiles::default()).await?,
        ))
    }

    /// At start (`registry.seed_dir`): registers the declared agents that
    /// are not registered yet (changing none that are), and writes the
    /// generated policies of those declared. Returns how many it registered.
    pub async fn seed_declared(&self, files: BTreeMap<String, String>) -> BrokerResult<usize> {
        let p = self
            .prepare(
                &PlanRequest {
                    files,
                    prune: false,
                },
                true,
            )
            .await?;
        let mut n = 0;
        for a in p
            .plan
            .agents
            .iter()
            .filter(|a| a.action == AgentAction::Create)
        {
            if let Some(d) = p.declared.iter().find(|d| d.spec.id == a.agent) {
                self.register_agent(&Actor::System, d.spec.clone()).await?;
                n += 1;
            }
        }
        self.write_generated(&Actor::System, &p.writes).await?;
        Ok(n)
    }
}

/// The change that makes a registered agent what `s` declares.
fn update_of(s: &crate::broker::AgentSpec) -> AgentUpdate {
    AgentUpdate {
        team: Some(s.team.clone()),
        sponsor: Some(s.sponsor.clone()),
        risk_tier: Some(s.risk_tier),
        environment: Some(s.environment),
        purpose: Some(s.purpose.clone()),
        labels: Some(s.labels.clone()),
        jwks: Some(s.jwks.clone()),
        last_review_at: None,
        delegation: Some(s.delegation.clone()),
        may_assert_users: Some(s.may_assert_users),
        max_ttl_secs: s.max_ttl_secs,
    }
}
