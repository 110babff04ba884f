//! Approvals: open a request for human sign-off, record decisions with their
//! quorum and separation-of-duties rules, redeem an approved credential once.
//!
//! Every path, refusals included, leaves an audit event; the notification
//! outbox rows are written in the same commit as the approval they announce.
//! Redeeming an approved credential: `approvals/redeem.rs`.

mod redeem;

use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;

use super::credentials::CredentialAsk;
use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::{OperatorConfig, Role, ScopeConfig};
use crate::model::{
    Approval, ApprovalDecision, ApprovalKind, ApprovalState, TaskState, Verdict, new_id, now,
};
use crate::notify::Reply;
use crate::store::StoreTx;

/// An approver's decision as the API and Slack deliver it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    pub decision: Verdict,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionChannel {
    Api,
    Slack,
    /// The web console (a signed-in operator, like the API).
    Console,
}

impl DecisionChannel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Slack => "slack",
            Self::Console => "console",
        }
    }
}

/// The approval event a refusal or decision is audited under.
pub(super) fn approval_event(actor: &Actor, action: &str, a: &Approval) -> AuditEvent {
    let mut ev = AuditEvent::new(actor, action).agent(&a.agent_id);
    if let Some(t) = &a.task_id {
        ev = ev.task(t);
    }
    if let Some(s) = &a.scope {
        ev = ev.scope(s);
    }
    ev.details(serde_json::json!({ "approval": a.id, "kind": a.kind }))
}

impl Broker {
    /// The configured operator behind a name.
    fn operator_config(&self, name: &str) -> BrokerResult<&OperatorConfig> {
        self.config
            .operators
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| BrokerError::Forbidden(format!("no operator `{name}`")))
    }

    /// Whether an operator is the sponsor named on an approval.
    fn is_sponsor(op: &OperatorConfig, sponsor: &str) -> bool {
        op.name.eq_ignore_ascii_case(sponsor)
            || op
                .email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(sponsor))
    }

    /// Opens an approval for a sensitive scope that policy permits, or for
    /// any scope while an incident's step-up (`step_up`) holds.
    pub(crate) async fn open_credential_approval(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        ttl: u64,
        ask: CredentialAsk,
        decided: AuditEvent,
        step_up: Option<&crate::model::StepUp>,
    ) -> BrokerResult<Approval> {
        let justification = ask
            .justification
            .as_deref()
            .map(str::trim)
            .filter(|j| !j.is_empty())
            .unwrap_or(s.task.description.trim())
            .to_owned();
        let step_up = step_up.map(|u| u.incident.clone());
        if justification.is_empty() {
            let why = match &step_up {
                Some(incident) => format!("needs an approval while incident `{incident}` holds"),
                None => "is sensitive".to_owned(),
            };
            return Err(BrokerError::InvalidRequest(format!(
                "scope `{}` {why}: say why you need it in `justification` (or open the task with a description)",
                scope_cfg.name
            )));
        }
        // `ttl`: what would be granted (cut to what is left of the task, so
        // it shrinks every second); `asked_ttl`: what the agent asked.
        let mut request =
            serde_json::json!({ "ttl": ttl, "asked_ttl": ask.ttl, "params": ask.params });
        if let Some(incident) = step_up {
            // Approvers see why a scope that needs no approval asks for one.
            request["step_up"] = serde_json::json!(incident);
        }
        // In a delegated task the request is every delegator's too: the
        // highest tier on the chain sets the quorum and whether it must be
        // decided in Keygate, and no delegator's sponsor approves it alone.
        let mut tiers = vec![s.agent.risk_tier];
        let mut delegator_sponsors = Vec::new();
        for id in &s.task.chain {
            if let Some(d) = self.store.get_agent(id).await? {
                tiers.push(d.risk_tier);
                delegator_sponsors.push(d.sponsor);
            }
        }
        let top_tier = tiers.iter().copied().max().unwrap_or(s.agent.risk_tier);
        if !delegator_sponsors.is_empty() {
            request["delegator_sponsors"] = serde_json::json!(delegator_sponsors);
        }
        let waiting = self
            .store
            .list_approvals(&crate::model::ApprovalFilter {
                state: Some(ApprovalState::Pending),
                kind: Some(ApprovalKind::Credential),
                agent: Some(s.agent.id.clone()),
                limit: None,
                cursor: None,
            })
            .await?;
        // The same request asked again while it waits is the same request:
        // no second message to the approvers. Compared as asked: the TTL
        // cut to the task's time left differs from one second to the next.
        let as_asked = |r: &serde_json::Value| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("ttl");
            }
            r
        };
        let asked = as_asked(&request);
        if let Some(same) = waiting.iter().find(|a| {
            a.task_id.as_deref() == Some(s.task.id.as_str())
                && a.scope.as_deref() == Some(scope_cfg.name.as_str())
                && as_asked(&a.request) == asked
        }) {
            return Ok(same.clone());
        }
        let limits = &self.config.limits;
        let in_task = waiting
            .iter()
            .filter(|a| a.task_id.as_deref() == Some(s.task.id.as_str()))
            .count();
        let capped = |what: String| BrokerError::RateLimited {
            message: format!("{what}: wait for a decision before asking again"),
            retry_after_secs: 30,
        };
        if limits.max_pending_approvals_per_task > 0
            && in_task >= limits.max_pending_approvals_per_task as usize
        {
            return Err(capped(format!(
                "task `{}` already has {in_task} approvals waiting ([limits] max_pending_approvals_per_task)",
                s.task.id
            )));
        }
        if limits.max_pending_approvals_per_agent > 0
            && waiting.len() >= limits.max_pending_approvals_per_agent as usize
        {
            return Err(capped(format!(
                "agent `{}` already has {} approvals waiting ([limits] max_pending_approvals_per_agent)",
                s.agent.id,
                waiting.len()
            )));
        }
        let tier = usize::from(top_tier.clamp(1, 3)) - 1;
        let cfg = &self.config.approvals;
        let t = now();
        let expires_at =
            (t + time::Duration::seconds(cfg.expiry_secs as i64)).min(s.task.expires_at);
        let approval = Approval {
            id: new_id("ap"),
            kind: ApprovalKind::Credential,
            state: ApprovalState::Pending,
            requester: format!("agent:{}", s.agent.id),
            agent_id: s.agent.id.clone(),
            task_id: Some(s.task.id.clone()),
            scope: Some(scope_cfg.name.clone()),
            request,
            justification,
            required: scope_cfg.approvals.unwrap_or(cfg.quorum_by_tier[tier]),
            approver_teams: scope_cfg.approver_teams.clone(),
            sponsor: s.agent.sponsor.clone(),
            sponsor_alone: cfg.sponsor_may_approve_alone,
            confirm_in_api: tiers.iter().any(|t| cfg.confirm_in_api_tiers.contains(t)),
            created_at: t,
            expires_at,
            decided_at: None,
            end_reason: None,
            redeemed_at: None,
            lease_id: None,
            decisions: Vec::new(),
        };
        let mut tx = self.store.begin().await?;
        tx.audit(decided.details(serde_json::json!({
            "ttl": ttl, "approval": approval.id, "outcome": "approval_required",
        })))
        .await?;
        self.insert_approval(&mut *tx, &approval, Some(scope_cfg))
            .await?;
        tx.commit().await?;
        self.notifier.wake();
        Ok(approval)
    }

    /// Writes an approval, its `approval.requested` event and its outbox rows.
    pub(crate) async fn insert_approval(
        &self,
        tx: &mut dyn StoreTx,
        approval: &Approval,
        scope_cfg: Option<&ScopeConfig>,
    ) -> BrokerResult<()> {
        tx.insert_approval(approval).await?;
        let requester = Actor::from_rendered(&approval.requester);
        tx.audit(
            approval_event(&requester, "approval.requested", approval).details(serde_json::json!({
                "approval": approval.id,
                "kind": approval.kind,
                "required": approval.required,
                "approver_teams": approval.approver_teams,
                "expires_at": crate::model::unix(approval.expires_at),
                "justification": approval.justification,
                "request": approval.request,
            })),
        )
        .await?;
        for n in self.notifier.requested(approval, scope_cfg) {
            tx.insert_notification(&n).await?;
        }
        Ok(())
    }

    /// An approval as an operator sees it.
    pub async fn approval(&self, id: &str) -> BrokerResult<Approval> {
        self.store
            .get_approval(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no approval `{id}`")))
    }

    /// An approval of the session's own agent; others are "not found".
    pub async fn agent_approval(&self, s: &Session, id: &str) -> BrokerResult<Approval> {
        self.store
            .get_approval(id)
            .await?
            .filter(|a| a.agent_id == s.agent.id)
            .ok_or_else(|| BrokerError::NotFound(format!("no approval `{id}` for this agent")))
    }

    /// Waits up to `wait` for a pending approval to be decided (less if the
    /// server begins to stop), then returns it.
    pub async fn await_approval(&self, a: Approval, wait: Duration) -> BrokerResult<Approval> {
        let wait = wait.min(Duration::from_secs(self.config.approvals.max_wait_secs));
        let deadline = tokio::time::Instant::now() + wait;
        let mut current = a;
        while current.state == ApprovalState::Pending
            && tokio::time::Instant::now() < deadline
            && !self.stopping.has_begun()
        {
            let changed = self.approvals_changed.notified();
            // A decision, or the reaper's expiry, or the deadline, or the
            // server stopping.
            let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::timeout_at(until, changed) => {}
                () = self.stopping.begun() => {}
            }
            current = self.approval(&current.id).await?;
        }
        Ok(current)
    }

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
    /// with its agent's risk tier as it is now: never lower than when it was
    /// asked (a scope's own `approvals` stands as set).
    async fn approval_bar_now(&self, a: &Approval) -> BrokerResult<(u32, bool)> {
        let agent = match a.kind {
            ApprovalKind::Credential => self.store.get_agent(&a.agent_id).await?,
            ApprovalKind::Provisioning => None,
        };
        let Some(agent) = agent else {
            return Ok((a.required, a.confirm_in_api));
        };
        let cfg = &self.config.approvals;
        let tier = usize::from(agent.risk_tier.clamp(1, 3)) - 1;
        let explicit = a
            .scope
            .as_deref()
            .and_then(|s| self.config.scopes.iter().find(|c| c.name == s))
            .and_then(|c| c.approvals);
        let required = match explicit {
            Some(_) => a.required,
            None => a.required.max(cfg.quorum_by_tier[tier]),
        };
        let confirm = a.confirm_in_api || cfg.confirm_in_api_tiers.contains(&agent.risk_tier);
        Ok((required, confirm))
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
        let t = now();
        let mut tx = self.store.begin().await?;
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

    /// The reaper's part: pending approvals past expiry expire, those whose
    /// task ended are cancelled; each is audited and announced.
    pub async fn close_stale_approvals(&self) -> BrokerResult<usize> {
        let t: OffsetDateTime = now();
        let mut tx = self.store.begin().await?;
        let closed = tx.close_stale_approvals(t).await?;
        for a in &closed {
            tx.audit(
                approval_event(&Actor::System, &format!("approval.{}", a.state), a)
                    .reason(a.end_reason.clone().unwrap_or_default()),
            )
            .await?;
            for n in self.notifier.decided(a) {
                tx.insert_notification(&n).await?;
            }
        }
        tx.commit().await?;
        if !closed.is_empty() {
            self.approvals_changed.notify_waiters();
            self.notifier.wake();
        }
        Ok(closed.len())
    }
}
