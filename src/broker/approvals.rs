//! Approvals: open a request for human sign-off, record decisions with their
//! quorum and separation-of-duties rules, redeem an approved credential once.
//!
//! Every path, refusals included, leaves an audit event; the notification
//! outbox rows are written in the same commit as the approval they announce.
//! Deciding (quorum, separation of duties, the bar as the agent is now):
//! `approvals/decide.rs`; redeeming an approved credential:
//! `approvals/redeem.rs`.

mod decide;
mod redeem;

use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;

use super::credentials::CredentialAsk;
use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::{OperatorConfig, ScopeConfig};
use crate::model::{Approval, ApprovalKind, ApprovalState, Verdict, new_id, now};
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
    /// any scope while incidents' step-ups (`step_ups`) hold.
    pub(crate) async fn open_credential_approval(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        ttl: u64,
        ask: CredentialAsk,
        decided: AuditEvent,
        step_ups: &[crate::model::StepUp],
    ) -> BrokerResult<Approval> {
        let justification = ask
            .justification
            .as_deref()
            .map(str::trim)
            .filter(|j| !j.is_empty())
            .unwrap_or(s.task.description.trim())
            .to_owned();
        let incidents: Vec<&str> = step_ups.iter().map(|u| u.incident.as_str()).collect();
        if justification.is_empty() {
            let why = match incidents.as_slice() {
                [] => "is sensitive".to_owned(),
                all => format!(
                    "needs an approval while incident `{}` holds",
                    all.join("`, `")
                ),
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
        if let Some(first) = incidents.first() {
            // Approvers see why a scope that needs no approval asks for one:
            // every incident whose step-up holds on the agent or a delegator
            // (`step_up`: the first, as approvals asked before named one).
            request["step_up"] = serde_json::json!(first);
            request["step_ups"] = serde_json::json!(incidents);
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
