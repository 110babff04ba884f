//! Deciding an approval: one approver's decision, counted towards the quorum
//! only while whoever gave each earlier one still may decide, against the
//! bar as the agent is now (a risk tier raised meanwhile), under separation
//! of duties; a granted provisioning change or policy set applied with it.

use super::{DecisionChannel, DecisionRequest, approval_event};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerError, BrokerResult};
use crate::config::{OperatorConfig, Role};
use crate::model::{
    Approval, ApprovalDecision, ApprovalKind, ApprovalState, TaskState, Verdict, now,
};
use crate::notify::Reply;

impl Broker {
    /// Records one approver's decision. Refusals are audited and returned
    /// as errors; `reply` is a Slack `response_url` answer queued with it.
    pub async fn decide_approval(
        &self,
        operator: &str,
        id: &str,
        req: DecisionRequest,
        channel: DecisionChannel,
        reply: Option<Reply>,
    ) -> BrokerResult<Approval> {
        let actor = Actor::Operator(operator.to_owned());
        match self
            .try_decide(operator, id, &req, channel, reply.clone())
            .await
        {
            Ok(a) => {
                self.approvals_changed.notify_waiters();
                self.notifier.wake();
                Ok(a)
            }
            Err(e) => {
                let mut ev = AuditEvent::new(&actor, "approval.decision")
                    .details(serde_json::json!({
                        "approval": id, "decision": req.decision,
                        "channel": channel.as_str(),
                    }))
                    .failure(e.to_string());
                if let Ok(Some(a)) = self.store.get_approval(id).await {
                    ev.agent = Some(a.agent_id);
                    ev.task = a.task_id;
                    ev.scope = a.scope;
                }
                let mut tx = self.store.begin().await?;
                tx.audit(ev).await?;
                if let Some(r) = reply {
                    tx.insert_notification(&self.notifier.reply(id, r.refused(&e.to_string())))
                        .await?;
                }
                tx.commit().await?;
                self.notifier.wake();
                Err(e)
            }
        }
    }

    /// The quorum and whether Slack may decide, for credential approval `a`
    /// with the risk tiers of its agent and, in a delegated task, of every
    /// delegator as they are now: never lower than when it was asked (a
    /// scope's own `approvals` stands as set).
    async fn approval_bar_now(&self, a: &Approval) -> BrokerResult<(u32, bool)> {
        let agent = match a.kind {
            ApprovalKind::Credential => self.store.get_agent(&a.agent_id).await?,
            ApprovalKind::Provisioning => None,
        };
        let Some(agent) = agent else {
            return Ok((a.required, a.confirm_in_api));
        };
        let mut tiers = vec![agent.risk_tier];
        tiers.extend(self.delegators_now(a).await?.iter().map(|d| d.risk_tier));
        let top = tiers.iter().copied().max().unwrap_or(agent.risk_tier);
        let cfg = &self.config.approvals;
        let tier = usize::from(top.clamp(1, 3)) - 1;
        let explicit = a
            .scope
            .as_deref()
            .and_then(|s| self.config.scopes.iter().find(|c| c.name == s))
            .and_then(|c| c.approvals);
        let required = match explicit {
            Some(_) => a.required,
            None => a.required.max(cfg.quorum_by_tier[tier]),
        };
        let confirm =
            a.confirm_in_api || tiers.iter().any(|t| cfg.confirm_in_api_tiers.contains(t));
        Ok((required, confirm))
    }

    /// The delegators of credential approval `a`'s task, as they are now
    /// (none for a task the agent opened itself).
    async fn delegators_now(&self, a: &Approval) -> BrokerResult<Vec<crate::model::Agent>> {
        let task = match (&a.kind, a.task_id.as_deref()) {
            (ApprovalKind::Credential, Some(id)) => self.store.get_task(id).await?,
            _ => None,
        };
        let mut out = Vec::new();
        for id in task.iter().flat_map(|t| &t.chain) {
            if let Some(d) = self.store.get_agent(id).await? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Whether `operator`'s earlier approval of `a` still counts towards
    /// its quorum: still configured, still an approver (of one of its
    /// teams, where it names some), not departed.
    async fn approval_still_counts(&self, operator: &str, a: &Approval) -> BrokerResult<bool> {
        let Ok(op) = self.operator_config(operator) else {
            return Ok(false);
        };
        if !op.roles.contains(&Role::Approver)
            || (!a.approver_teams.is_empty()
                && !op
                    .team
                    .as_ref()
                    .is_some_and(|t| a.approver_teams.contains(t)))
        {
            return Ok(false);
        }
        Ok(self.operator_departure(operator).await?.is_none())
    }

    async fn try_decide(
        &self,
        operator: &str,
        id: &str,
        req: &DecisionRequest,
        channel: DecisionChannel,
        reply: Option<Reply>,
    ) -> BrokerResult<Approval> {
        let op = self.operator_config(operator)?;
        if let Some(d) = self.operator_departure(operator).await? {
            return Err(BrokerError::Forbidden(format!(
                "operator `{operator}` departed on {}; their decisions no longer count",
                d.departed_at.date()
            )));
        }
        if !op.roles.contains(&Role::Approver) {
            return Err(BrokerError::Forbidden(format!(
                "operator `{operator}` is not an approver"
            )));
        }
        // A policy set that could not become active is never recorded as
        // approved: one its approvers would grant over a base that moved
        // on, or under which agents changed since gain what they were not
        // shown, is cancelled instead (reload again for a fresh one). Asked
        // before the transaction: the diff probes every agent.
        // Only by an approver who may decide it (not its requester, of its
        // teams where it names some).
        let read = self.store.get_approval(id).await?;
        if req.decision == Verdict::Approve
            && let Some(a) = &read
            && a.state == ApprovalState::Pending
            && a.kind == ApprovalKind::Provisioning
            && a.request["change"] == "policy"
            && a.requester != format!("operator:{operator}")
            && (a.approver_teams.is_empty()
                || op
                    .team
                    .as_ref()
                    .is_some_and(|t| a.approver_teams.contains(t)))
            && let Some(why) = self.policy_grant_refusal(a).await?
        {
            let mut tx = self.store.begin().await?;
            let actor = Actor::Operator(operator.to_owned());
            let cancelled = self
                .cancel_approval(&mut *tx, &actor, a, &format!("not granted: {why}"))
                .await?;
            tx.commit().await?;
            self.notifier.wake();
            return Err(BrokerError::Conflict(if cancelled {
                format!(
                    "approval `{id}` cannot be granted: {why}; it is cancelled and nothing changed: reload again for a fresh approval"
                )
            } else {
                format!("approval `{id}` was decided meanwhile; read it again")
            }));
        }
        let t = now();
        // A provisioning approval's agent first (PostgreSQL): a suspension
        // or a decommission locks the agent and then cancels its
        // approvals, and a grant locks the agent to apply it; taking the
        // approval first would lock the two crosswise.
        let agent_first = read
            .filter(|a| a.kind == ApprovalKind::Provisioning)
            .map(|a| a.agent_id);
        let mut tx = self.store.begin().await?;
        if let Some(agent) = &agent_first {
            tx.agent(agent).await?;
        }
        let a = tx
            .approval(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no approval `{id}`")))?;
        if a.state != ApprovalState::Pending {
            return Err(BrokerError::Conflict(format!(
                "approval `{id}` is {}; it takes no more decisions",
                a.state
            )));
        }
        if a.expires_at <= t {
            return Err(BrokerError::Conflict(format!(
                "approval `{id}` expired at {}; it takes no more decisions",
                crate::model::rfc3339(a.expires_at)
            )));
        }
        // A credential approval lives only as long as its task: one whose
        // task ended (completed, expired, killed) is cancelled by the next
        // reaper pass and takes no decision meanwhile.
        if a.kind == ApprovalKind::Credential
            && let Some(task_id) = &a.task_id
            && let Some(task) = self.store.get_task(task_id).await?
            && (task.state != TaskState::Open || task.expires_at <= t)
        {
            return Err(BrokerError::Conflict(format!(
                "approval `{id}` is for task `{task_id}`, which has ended; it takes no more decisions"
            )));
        }
        if !a.approver_teams.is_empty()
            && !op
                .team
                .as_ref()
                .is_some_and(|t| a.approver_teams.contains(t))
        {
            return Err(BrokerError::Forbidden(format!(
                "operator `{operator}` may not decide this approval: it is for approvers of team(s) {}",
                a.approver_teams.join(", ")
            )));
        }
        if a.requester == format!("operator:{operator}") {
            return Err(BrokerError::Forbidden(format!(
                "operator `{operator}` asked for this change and cannot also decide it"
            )));
        }
        // The bar as the agent is now: a risk tier raised while the request
        // waited raises its quorum and may send it to the CLI/API.
        let (required, confirm_in_api) = self.approval_bar_now(&a).await?;
        if channel == DecisionChannel::Slack && confirm_in_api {
            return Err(BrokerError::Forbidden(format!(
                "approval `{id}` must be decided in Keygate, not in Slack: `keygate approvals approve {id}` or POST /v1/approvals/{id}/decision"
            )));
        }
        if let Some(d) = a.decisions.iter().find(|d| d.operator == operator) {
            return Err(BrokerError::Conflict(format!(
                "operator `{operator}` already decided ({}) on approval `{id}`; nobody decides twice",
                d.decision
            )));
        }
        // Earlier approvals count only while whoever gave them still may:
        // one who departed, lost the approver role or left the approving
        // teams since no longer makes up the quorum.
        let mut counted = Vec::new();
        for d in a.approvals() {
            if self.approval_still_counts(&d.operator, &a).await? {
                counted.push(d.operator.as_str());
            }
        }
        let approvals = counted.len() as u32 + 1;
        let quorum = approvals >= required;
        if req.decision == Verdict::Approve && quorum && !a.sponsor_alone {
            // The sponsor when it was asked and the sponsor now: a sponsor
            // named meanwhile answers for the agent just the same; so do the
            // sponsor a held change would name, a delegated request's
            // delegators' and those of every agent a policy set widens.
            let now_sponsor = self.store.get_agent(&a.agent_id).await?.map(|g| g.sponsor);
            let delegators_now: Vec<String> = self
                .delegators_now(&a)
                .await?
                .into_iter()
                .map(|d| d.sponsor)
                .collect();
            // A policy set's widened agents, as they are now.
            let mut widened_now = Vec::new();
            for w in a.request["widened"].as_array().into_iter().flatten() {
                if let Some(id) = w["agent"].as_str()
                    && let Some(g) = self.store.get_agent(id).await?
                {
                    widened_now.push(g.sponsor);
                }
            }
            let incoming = a.request["update"]["sponsor"].as_str();
            let listed = ["delegator_sponsors", "widened_sponsors"]
                .into_iter()
                .filter_map(|k| a.request[k].as_array())
                .flatten()
                .filter_map(|v| v.as_str());
            let sponsors: Vec<&str> = [Some(a.sponsor.as_str()), now_sponsor.as_deref(), incoming]
                .into_iter()
                .flatten()
                .chain(listed)
                .chain(widened_now.iter().map(String::as_str))
                .chain(delegators_now.iter().map(String::as_str))
                .collect();
            let sponsor_of = |o: &OperatorConfig| sponsors.iter().any(|s| Self::is_sponsor(o, s));
            let others = counted.iter().any(|d| {
                self.operator_config(d)
                    .map(|o| !sponsor_of(o))
                    .unwrap_or(true)
            });
            if sponsor_of(op) && !others {
                return Err(BrokerError::Forbidden(format!(
                    "separation of duties: `{operator}` sponsors agent `{}` and cannot be the only approver of its request",
                    a.agent_id
                )));
            }
        }
        let decision = ApprovalDecision {
            operator: operator.to_owned(),
            decision: req.decision,
            channel: channel.as_str().to_owned(),
            reason: req.reason.clone().filter(|r| !r.trim().is_empty()),
            at: t,
        };
        if (required, confirm_in_api) != (a.required, a.confirm_in_api) {
            tx.raise_approval_bar(id, required, confirm_in_api).await?;
        }
        if !tx.add_decision(id, &decision).await? {
            return Err(BrokerError::Conflict(format!(
                "operator `{operator}` already decided on approval `{id}`"
            )));
        }
        let actor = Actor::Operator(operator.to_owned());
        tx.audit(
            approval_event(&actor, "approval.decision", &a)
                .details(serde_json::json!({
                    "approval": id, "decision": req.decision, "channel": channel.as_str(),
                    "approvals": approvals, "required": required,
                }))
                .reason(decision.reason.clone().unwrap_or_default()),
        )
        .await?;
        let outcome = match req.decision {
            Verdict::Deny => Some((
                ApprovalState::Denied,
                format!(
                    "denied by {operator}{}",
                    decision
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            )),
            Verdict::Approve if quorum => Some((
                ApprovalState::Approved,
                format!("approved by {approvals} of {required} required"),
            )),
            Verdict::Approve => None,
        };
        if let Some((state, reason)) = &outcome {
            tx.finish_approval(id, *state, reason, t).await?;
            tx.audit(
                approval_event(&actor, &format!("approval.{state}"), &a).reason(reason.clone()),
            )
            .await?;
            if a.kind == ApprovalKind::Provisioning {
                self.apply_provisioning(&mut *tx, &a, *state, &actor)
                    .await?;
            }
        }
        let after = tx
            .approval(id)
            .await?
            .ok_or_else(|| BrokerError::Internal(format!("approval `{id}` vanished")))?;
        if outcome.is_some() {
            for n in self.notifier.decided(&after) {
                tx.insert_notification(&n).await?;
            }
        }
        if let Some(r) = reply {
            tx.insert_notification(&self.notifier.reply(id, r.decided(&after, operator)))
                .await?;
        }
        tx.commit().await?;
        if after.kind == ApprovalKind::Credential && after.state == ApprovalState::Denied {
            self.observe(
                &after.agent_id,
                crate::validation::Observation::ApprovalDenied,
            )
            .await;
        }
        if after.kind == ApprovalKind::Provisioning
            && after.state == ApprovalState::Approved
            && after.request["change"] == "policy"
        {
            // The set it held becomes active now (or the refusal says why).
            self.apply_approved_policy(&after).await.map_err(|e| {
                BrokerError::Conflict(format!(
                    "approval `{id}` is granted, but its policy set was not made active: {e}"
                ))
            })?;
        }
        if after.kind == ApprovalKind::Provisioning
            && after.state == ApprovalState::Approved
            && after.request["change"] == "include"
        {
            // An exclusion lifted: the scope is the agent's again, learned.
            self.validation.relearn(Some(&after.agent_id));
        }
        if after.kind == ApprovalKind::Provisioning
            && after.state == ApprovalState::Approved
            && after.request["change"] == "update"
        {
            // As a change made at once does (agents.rs): what the agent uses
            // from now on is learned, and what it holds is judged again on
            // its new attributes.
            self.validation.relearn(Some(&after.agent_id));
            // The decision and the change are committed: a failure here is
            // the store's, logged, and not reported as a refused decision.
            if let Err(e) = self.recheck_agent(&actor, &after.agent_id).await {
                tracing::error!(approval = %id, agent = %after.agent_id, error = %e, "judging again what the agent holds after its change was granted failed");
            }
        }
        Ok(after)
    }
}
