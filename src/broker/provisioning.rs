//! Provisioning: the approvals that hold a new agent identity, or a change
//! to one, until approvers sign off; applying or settling them on decision;
//! and what policy lets an agent reach (at any time), which says whether a
//! change widens it.

use super::approvals::approval_event;
use super::{Broker, BrokerError, BrokerResult};
use crate::audit::Actor;
use crate::model::{Agent, AgentStatus, Approval, ApprovalKind, ApprovalState, new_id, now};
use crate::store::StoreTx;

impl Broker {
    /// Applies (or settles) a provisioning change once its approval ends,
    /// conditional on the agent's state now: a registration activates only
    /// a `pending` agent, and nothing applies to a decommissioned one.
    pub(super) async fn apply_provisioning(
        &self,
        tx: &mut dyn StoreTx,
        a: &Approval,
        state: ApprovalState,
        actor: &Actor,
    ) -> BrokerResult<()> {
        let t = now();
        let change = a.request["change"].as_str().unwrap_or_default();
        let not_pending = || {
            BrokerError::Conflict(format!(
                "agent `{}` is no longer pending; its registration approval cannot apply",
                a.agent_id
            ))
        };
        match (change, state) {
            ("register", ApprovalState::Approved) => {
                tx.set_agent_status(&a.agent_id, &[AgentStatus::Pending], AgentStatus::Active, t)
                    .await?
                    .ok_or_else(not_pending)?;
                tx.audit(
                    approval_event(actor, "agent.active", a)
                        .reason("provisioning approved".to_owned()),
                )
                .await?;
                // Changes asked while it was pending apply only to a pending
                // agent: cancelled now, not left to be refused when granted.
                self.cancel_provisioning(
                    tx,
                    actor,
                    &a.agent_id,
                    "asked while the agent was pending; it is active now: ask again",
                )
                .await?;
            }
            ("register", ApprovalState::Denied) => {
                tx.set_agent_status(
                    &a.agent_id,
                    &[AgentStatus::Pending],
                    AgentStatus::Decommissioned,
                    t,
                )
                .await?
                .ok_or_else(not_pending)?;
                // Like any decommission: whatever it holds ends now, and
                // its other changes waiting for approval are cancelled.
                let (tasks, leases) = self
                    .end_agent_work(tx, &a.agent_id, "provisioning denied", t)
                    .await?;
                self.cancel_provisioning(
                    tx,
                    actor,
                    &a.agent_id,
                    "the agent's registration was denied",
                )
                .await?;
                tx.audit(
                    approval_event(actor, "agent.decommissioned", a)
                        .reason("provisioning denied".to_owned())
                        .details(serde_json::json!({
                            "tasks_ended": tasks.len(), "leases_queued": leases.len(),
                        })),
                )
                .await?;
                if !leases.is_empty() {
                    self.leases.wake();
                }
            }
            ("update", ApprovalState::Approved) => {
                // Applied to the agent as it is now, so judged as it is now:
                // in the state it was asked in, and widening it no further
                // than the approvers saw (changes applied meanwhile, each
                // harmless alone, may make this one reach more).
                let mut agent = self.agent_as_asked(a).await?;
                let update: super::agents::AgentUpdate =
                    serde_json::from_value(a.request["update"].clone())
                        .map_err(|e| BrokerError::Internal(format!("stored change: {e}")))?;
                let before = agent.clone();
                update.apply(&mut agent)?;
                // A sponsor who left since the change was asked is no
                // sponsor to name now.
                if agent.sponsor != before.sponsor {
                    self.check_sponsor(&agent.sponsor)
                        .await
                        .map_err(|e| BrokerError::Conflict(format!("{e}; ask again")))?;
                }
                let probe = |x: &Agent| {
                    self.reachable_scopes(&Agent {
                        status: AgentStatus::Active,
                        ..x.clone()
                    })
                };
                let was = probe(&before);
                let seen = &a.request["widened_scopes"];
                let unseen: Vec<String> = probe(&agent)
                    .into_iter()
                    .filter(|s| !was.contains(s))
                    .filter(|s| !seen.as_array().is_some_and(|v| v.iter().any(|w| w == s)))
                    .collect();
                if !unseen.is_empty() {
                    return Err(BrokerError::Conflict(format!(
                        "agent `{}` changed since this change was asked: it would now also reach {}, which the approvers were not shown; ask again",
                        a.agent_id,
                        unseen.join(", ")
                    )));
                }
                agent.updated_at = t;
                super::agents::unchanged_since(tx, &before).await?;
                tx.update_agent(&agent).await?;
                tx.audit(
                    approval_event(actor, "agent.updated", a).details(serde_json::json!({
                        "approval": a.id, "update": a.request["update"],
                        "widened_scopes": a.request["widened_scopes"],
                        "ownership": super::agents::ownership_change(&before, &agent),
                    })),
                )
                .await?;
            }
            ("include", ApprovalState::Approved) => {
                // Not on an agent suspended (or decommissioned) since.
                self.agent_as_asked(a).await?;
                let scope = a.request["scope"].as_str().unwrap_or_default();
                let reason = a.request["reason"].as_str().unwrap_or_default();
                // Lifted meanwhile by other means: nothing left to do.
                self.lift_exclusion(tx, actor, &a.agent_id, scope, reason, Some(&a.id))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The agent's provisioning approval still waiting whose request `same`
    /// recognises (a change asked again is answered with it).
    pub(crate) async fn waiting_provisioning(
        &self,
        agent_id: &str,
        same: impl Fn(&serde_json::Value) -> bool,
    ) -> BrokerResult<Option<Approval>> {
        Ok(self
            .store
            .list_approvals(&crate::model::ApprovalFilter {
                kind: Some(ApprovalKind::Provisioning),
                state: Some(ApprovalState::Pending),
                agent: Some(agent_id.to_owned()),
                ..Default::default()
            })
            .await?
            .into_iter()
            .find(|a| same(&a.request)))
    }

    /// The agent held change `a` is for, if it is still in the state the
    /// change was asked in (and not decommissioned): else 409, ask again.
    async fn agent_as_asked(&self, a: &Approval) -> BrokerResult<Agent> {
        let Some(agent) = self.store.get_agent(&a.agent_id).await? else {
            return Err(BrokerError::NotFound(format!("no agent `{}`", a.agent_id)));
        };
        if agent.status == AgentStatus::Decommissioned {
            return Err(BrokerError::Conflict(format!(
                "agent `{}` is decommissioned; the change cannot apply",
                a.agent_id
            )));
        }
        if let Some(asked) = a.request["status"].as_str()
            && asked != agent.status.as_str()
        {
            return Err(BrokerError::Conflict(format!(
                "agent `{}` is {} now, not {asked} as when this change was asked; ask again",
                a.agent_id, agent.status
            )));
        }
        Ok(agent)
    }

    /// Cancels the agent's open provisioning approvals (it left `pending`, or
    /// was decommissioned): each is audited and announced. Returns their ids.
    pub(crate) async fn cancel_provisioning(
        &self,
        tx: &mut dyn StoreTx,
        actor: &Actor,
        agent_id: &str,
        reason: &str,
    ) -> BrokerResult<Vec<String>> {
        let open = self
            .store
            .list_approvals(&crate::model::ApprovalFilter {
                state: Some(ApprovalState::Pending),
                kind: Some(ApprovalKind::Provisioning),
                agent: Some(agent_id.to_owned()),
                limit: None,
                cursor: None,
            })
            .await?;
        let mut cancelled = Vec::new();
        for a in open {
            // A held policy set is anchored on an agent but is the whole
            // set's: it stays for the approvers (and `keygate apply`).
            if a.request["change"] != "policy"
                && self.cancel_approval(tx, actor, &a, reason).await?
            {
                cancelled.push(a.id);
            }
        }
        Ok(cancelled)
    }

    /// Cancels approval `a` if it is still pending, audited and announced;
    /// whether it was.
    pub(crate) async fn cancel_approval(
        &self,
        tx: &mut dyn StoreTx,
        actor: &Actor,
        a: &crate::model::Approval,
        reason: &str,
    ) -> BrokerResult<bool> {
        if !tx
            .finish_approval(&a.id, ApprovalState::Cancelled, reason, now())
            .await?
        {
            return Ok(false);
        }
        let Some(after) = tx.approval(&a.id).await? else {
            return Ok(false);
        };
        tx.audit(approval_event(actor, "approval.cancelled", &after).reason(reason.to_owned()))
            .await?;
        for n in self.notifier.decided(&after) {
            tx.insert_notification(&n).await?;
        }
        Ok(true)
    }

    /// Scopes policy lets `agent` reach at some time: probed with the
    /// shortest and the longest TTL the scope allows, at every instant that
    /// [`crate::policy::PolicyEngine::probe_instants`] names, so the answer
    /// does not depend on the hour or weekday it is asked at.
    pub(crate) fn reachable_scopes(&self, agent: &Agent) -> Vec<String> {
        self.reachable_scopes_under(&self.policy.current(), agent)
    }

    /// [`Self::reachable_scopes`] under a given policy set.
    pub(crate) fn reachable_scopes_under(
        &self,
        policy: &crate::policy::PolicyEngine,
        agent: &Agent,
    ) -> Vec<String> {
        let instants = policy.probe_instants(now());
        self.config
            .scopes
            .iter()
            .filter(|c| {
                let facts = super::credentials::scope_facts(c);
                let ttls = [c.max_ttl_secs.min(60), c.max_ttl_secs];
                instants.iter().any(|&at| {
                    ttls.iter().any(|&ttl| {
                        policy
                            .decide(
                                agent,
                                &facts,
                                &crate::policy::RequestFacts {
                                    task_id: "provisioning-review",
                                    task_description: "provisioning review",
                                    requested_ttl_secs: ttl,
                                    now: at,
                                    chain: &[],
                                },
                            )
                            .is_ok_and(|d| d.allow)
                    })
                })
            })
            .map(|c| c.name.clone())
            .collect()
    }

    /// Opens a provisioning approval for a new agent or a widening change.
    pub(crate) async fn open_provisioning_approval(
        &self,
        tx: &mut dyn StoreTx,
        requester: &Actor,
        agent: &Agent,
        request: serde_json::Value,
        justification: String,
    ) -> BrokerResult<Approval> {
        let cfg = &self.config.provisioning;
        let t = now();
        let approval = Approval {
            id: new_id("ap"),
            kind: ApprovalKind::Provisioning,
            state: ApprovalState::Pending,
            requester: requester.render(),
            agent_id: agent.id.clone(),
            task_id: None,
            scope: None,
            request,
            justification,
            required: cfg.approvals,
            approver_teams: cfg.approver_teams.clone(),
            sponsor: agent.sponsor.clone(),
            sponsor_alone: cfg.sponsor_may_approve_alone,
            confirm_in_api: false,
            created_at: t,
            expires_at: t + time::Duration::seconds(cfg.expiry_secs as i64),
            decided_at: None,
            end_reason: None,
            redeemed_at: None,
            lease_id: None,
            decisions: Vec::new(),
        };
        self.insert_approval(tx, &approval, None).await?;
        Ok(approval)
    }
}
