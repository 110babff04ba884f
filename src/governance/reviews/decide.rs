//! Deciding a review item: who may, what each decision does (`attest`,
//! `narrow`, `retire`), how many distinct decisions an item needs (two at
//! tier 3 or under review separation, a narrowing counted as one), and the
//! record of each.

use super::{DecisionRequest, ReviewDecision, ReviewItem, ReviewState, Reviewer, Verdict};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerError, BrokerResult};
use crate::model::{AgentStatus, now};

impl Broker {
    /// Records one reviewer's decision and carries it out once it stands.
    pub async fn decide_review(
        &self,
        who: &Reviewer,
        item_id: &str,
        req: DecisionRequest,
    ) -> BrokerResult<ReviewItem> {
        let actor = Actor::Operator(who.operator.clone());
        // Checked here, not only at the API's bearer token: a Slack click
        // carries no token, and a departed person's clicks no longer count.
        if let Some(d) = self.operator_departure(&who.operator).await? {
            return Err(BrokerError::Forbidden(format!(
                "operator `{}` departed on {}; their decisions no longer count",
                who.operator,
                d.departed_at.date()
            )));
        }
        let people = self.directory().await?;
        let email = people.operator(&who.operator).map(|p| p.email.clone());
        let item = self.review_item(item_id).await?;
        if item.state != ReviewState::Open {
            return Err(BrokerError::Conflict(format!(
                "review item `{item_id}` is {} already",
                item.state.as_str()
            )));
        }
        // Assigned as the agent is now, not as it was when the campaign
        // began: a sponsor named since reviews it, one who left (or was
        // replaced) no longer does, and the lead stands in for a departed one.
        let agent = self.agent(&item.agent_id).await?;
        let reviewer = super::reviewer_of(&people, &agent);
        let assigned = email.as_deref().map(crate::governance::people::normalize)
            == Some(crate::governance::people::normalize(&reviewer));
        if !who.any_item && !assigned {
            return Err(BrokerError::Forbidden(format!(
                "review item `{item_id}` is assigned to `{reviewer}`; operator `{}` may decide it only with the admin or approver role",
                who.operator
            )));
        }
        if agent.status == AgentStatus::Decommissioned {
            return Err(BrokerError::Conflict(format!(
                "agent `{}` was decommissioned meanwhile; the sweep cancels its review item",
                agent.id
            )));
        }
        // Two attestations if the agent needs them now (its tier raised, or
        // separation turned on, since the campaign began), never fewer than
        // the item was opened with.
        let mut item = item;
        let two = agent.risk_tier >= 3 || self.config.governance.review_separation;
        item.attestations = item.attestations.max(if two { 2 } else { 1 });
        let is_sponsor = email.as_deref().is_some_and(|e| {
            crate::governance::people::normalize(e)
                == crate::governance::people::normalize(&agent.sponsor)
        });
        let decision = ReviewDecision {
            by: who.operator.clone(),
            email: email.clone(),
            decision: req.decision,
            scopes: req.scopes.clone(),
            note: crate::limits::clip_message(req.note.trim()),
            at: now(),
        };
        match req.decision {
            Verdict::Attest => {
                if !req.scopes.is_empty() {
                    return Err(BrokerError::InvalidRequest(
                        "`scopes` goes with `narrow`, not `attest`".into(),
                    ));
                }
                if item.decisions.iter().any(|d| d.by == who.operator) {
                    return Err(BrokerError::Conflict(format!(
                        "operator `{}` has attested review item `{item_id}` already; a second reviewer must",
                        who.operator
                    )));
                }
                let attested = item.decisions.len() + 1;
                // A scope an earlier reviewer took away stays taken: the
                // item closes narrowed.
                let closed = if item.decisions.iter().any(|d| d.decision == Verdict::Narrow) {
                    ReviewState::Narrowed
                } else {
                    ReviewState::Attested
                };
                let done = (attested >= usize::from(item.attestations)).then_some(closed);
                self.record_review_decision(&actor, &item, decision, done, is_sponsor)
                    .await
            }
            Verdict::Narrow => {
                let permitted: Vec<String> = item.snapshot["permitted_scopes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["scope"].as_str().map(str::to_owned))
                    .collect();
                if req.scopes.is_empty() {
                    return Err(BrokerError::InvalidRequest(
                        "`narrow` needs `scopes`: the scopes to take away".into(),
                    ));
                }
                if let Some(s) = req.scopes.iter().find(|s| !permitted.contains(s)) {
                    return Err(BrokerError::InvalidRequest(format!(
                        "`{}` is not among the scopes under review ({})",
                        crate::limits::claimed_label(s),
                        permitted.join(", ")
                    )));
                }
                if item.decisions.iter().any(|d| d.by == who.operator) {
                    return Err(BrokerError::Conflict(format!(
                        "operator `{}` has decided on review item `{item_id}` already; a second reviewer must",
                        who.operator
                    )));
                }
                let reason = format!(
                    "review `{}`: narrowed by {}",
                    item.campaign_id, who.operator
                );
                for s in &req.scopes {
                    self.exclude_scope(&actor, &item.agent_id, s, &reason)
                        .await?;
                }
                // The scopes go at once; the review itself is one decision
                // of those the item needs (two at tier 3: a sponsor never
                // reviews alone).
                let decided = item.decisions.len() + 1;
                let done =
                    (decided >= usize::from(item.attestations)).then_some(ReviewState::Narrowed);
                self.record_review_decision(&actor, &item, decision, done, is_sponsor)
                    .await
            }
            Verdict::Retire => {
                if !req.scopes.is_empty() {
                    return Err(BrokerError::InvalidRequest(
                        "`scopes` goes with `narrow`, not `retire`".into(),
                    ));
                }
                let item = self
                    .record_review_decision(
                        &actor,
                        &item,
                        decision,
                        Some(ReviewState::Retired),
                        is_sponsor,
                    )
                    .await?;
                if agent.status != AgentStatus::Decommissioned {
                    self.set_agent_status(
                        &actor,
                        &item.agent_id,
                        AgentStatus::Decommissioned,
                        &format!("retired in review item `{}`", item.id),
                    )
                    .await?;
                }
                Ok(item)
            }
        }
    }

    /// Appends `decision` and, with `done`, closes the item (an attest or a
    /// narrow also counts as the agent's review: `last_review_at`).
    async fn record_review_decision(
        &self,
        actor: &Actor,
        item: &ReviewItem,
        decision: ReviewDecision,
        done: Option<ReviewState>,
        is_sponsor: bool,
    ) -> BrokerResult<ReviewItem> {
        // The agent's other open items (another campaign, an automatic
        // one): a review that closes this one is their review too.
        let others: Vec<ReviewItem> = match done {
            Some(ReviewState::Attested | ReviewState::Narrowed) => self
                .store
                .review_items(&super::ReviewFilter {
                    agent_id: Some(item.agent_id.clone()),
                    open_only: true,
                    ..super::ReviewFilter::default()
                })
                .await?
                .into_iter()
                .filter(|i| i.id != item.id)
                .collect(),
            _ => Vec::new(),
        };
        let campaigns = match done {
            Some(_) => self.store.review_campaigns().await?,
            None => Vec::new(),
        };
        let mut tx = self.store.begin().await?;
        // The agent first, so decisions on its items take their locks in
        // one order (PostgreSQL): two closing items of one agent in two
        // campaigns at once, each cancelling the other's, would otherwise
        // lock them crosswise and one would fail as a deadlock. The second
        // waits here, then finds its item cancelled.
        tx.agent(&item.agent_id).await?;
        let mut cur = tx
            .review_item(&item.id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no review item `{}`", item.id)))?;
        if cur.state != ReviewState::Open || cur.decisions != item.decisions {
            return Err(BrokerError::Conflict(format!(
                "review item `{}` changed while deciding; read it again",
                item.id
            )));
        }
        let t = decision.at;
        cur.attestations = cur.attestations.max(item.attestations);
        cur.decisions.push(decision.clone());
        let action = match done {
            Some(state) => {
                cur.state = state;
                cur.decided_at = Some(t);
                if matches!(state, ReviewState::Attested | ReviewState::Narrowed) {
                    tx.mark_reviewed(&cur.agent_id, t).await?;
                    let why = format!("reviewed in item `{}`", cur.id);
                    for other in others {
                        self.cancel_review_item(&mut *tx, actor, &other.id, &why, &campaigns, t)
                            .await?;
                    }
                }
                format!("review.{}", state.as_str())
            }
            None => "review.attestation_recorded".to_owned(),
        };
        if !tx.save_review_item(&cur).await? {
            return Err(BrokerError::Conflict(format!(
                "review item `{}` changed while deciding; read it again",
                item.id
            )));
        }
        if done.is_some()
            && let Some(c) = campaigns.iter().find(|c| c.id == cur.campaign_id)
        {
            for n in self.notifier.review_decided(&cur, c) {
                tx.insert_notification(&n).await?;
            }
        }
        let mut ev = AuditEvent::new(actor, &action)
            .agent(&cur.agent_id)
            .details(serde_json::json!({
                "campaign": cur.campaign_id, "item": cur.id, "decision": decision.decision,
                "scopes": decision.scopes, "note": decision.note, "sponsor": is_sponsor,
                "attested_by": cur.decisions.iter().filter(|d| d.decision == Verdict::Attest)
                    .map(|d| &d.by).collect::<Vec<_>>(),
                "attestations_needed": cur.attestations,
            }));
        if done.is_none() {
            ev = ev.reason(format!(
                "{} of {} attestations: another reviewer must attest",
                cur.decisions.len(),
                cur.attestations
            ));
        }
        tx.audit(ev).await?;
        tx.commit().await?;
        if done.is_some() {
            self.notifier.wake();
        }
        Ok(cur)
    }

    /// Cancels open review item `id` in `tx`, as the store has it there (one
    /// decided meanwhile stays decided), telling its Slack message and
    /// webhooks, audited with `reason`. Whether it was cancelled.
    pub(crate) async fn cancel_review_item(
        &self,
        tx: &mut dyn crate::store::StoreTx,
        actor: &Actor,
        id: &str,
        reason: &str,
        campaigns: &[super::Campaign],
        at: time::OffsetDateTime,
    ) -> BrokerResult<bool> {
        let Some(mut i) = tx.review_item(id).await? else {
            return Ok(false);
        };
        i.state = ReviewState::Cancelled;
        i.decided_at = Some(at);
        if !tx.save_review_item(&i).await? {
            return Ok(false);
        }
        if let Some(c) = campaigns.iter().find(|c| c.id == i.campaign_id) {
            for n in self.notifier.review_decided(&i, c) {
                tx.insert_notification(&n).await?;
            }
        }
        tx.audit(
            AuditEvent::new(actor, "review.cancelled")
                .agent(&i.agent_id)
                .reason(reason.to_owned())
                .details(serde_json::json!({ "campaign": i.campaign_id, "item": i.id })),
        )
        .await?;
        Ok(true)
    }
}
