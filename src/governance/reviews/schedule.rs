//! Reviews that start and escalate without an operator: the sweep's
//! automatic campaigns (`governance.schedule_reviews`, from each agent's
//! `review_every_days`) and the escalation of items past their due date.

use time::OffsetDateTime;

use super::{ReviewFilter, Started};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerResult};
use crate::model::AgentStatus;

impl Broker {
    /// The sweep's scheduling: every agent whose review is due within its
    /// lifecycle's `remind_before_days` (or overdue), that may reach a scope
    /// and has no open review item, goes into an automatic campaign
    /// `auto-<date>-<time>` (actor `system`). Returns it, if one was needed.
    pub(crate) async fn schedule_reviews(
        &self,
        agents: &[crate::model::Agent],
        t: OffsetDateTime,
    ) -> BrokerResult<Option<Started>> {
        let open: std::collections::BTreeSet<String> = self
            .store
            .review_items(&ReviewFilter {
                open_only: true,
                ..ReviewFilter::default()
            })
            .await?
            .into_iter()
            .map(|i| i.agent_id)
            .collect();
        let due: Vec<String> = agents
            .iter()
            .filter(|a| matches!(a.status, AgentStatus::Active | AgentStatus::Suspended))
            .filter(|a| !open.contains(&a.id))
            .filter(|a| {
                let p = crate::config::lifecycle::effective(&self.config.lifecycle, a);
                let remind = time::Duration::days(i64::from(p.remind_before_days));
                crate::governance::compliance::next_review_due(a, &p) - remind <= t
            })
            .filter(|a| !self.reachable_scopes(a).is_empty())
            .map(|a| a.id.clone())
            .collect();
        if due.is_empty() {
            return Ok(None);
        }
        let name = format!(
            "auto-{}-{:02}{:02}{:02}",
            t.date(),
            t.hour(),
            t.minute(),
            t.second()
        );
        self.open_campaign(&Actor::System, &name, None, Some(&due), None)
            .await
            .map(Some)
    }

    /// Open items past their campaign's due date, not yet escalated: each is
    /// escalated to the agent's team lead (audited as `review.escalated`);
    /// the overdue item is a compliance issue with the lifecycle's
    /// `overdue_action`.
    pub(crate) async fn escalate_reviews(&self, t: OffsetDateTime) -> BrokerResult<usize> {
        let campaigns = self.store.review_campaigns().await?;
        let open = self
            .store
            .review_items(&ReviewFilter {
                open_only: true,
                ..ReviewFilter::default()
            })
            .await?;
        let people = self.directory().await?;
        let mut n = 0;
        for mut i in open {
            let Some(c) = campaigns.iter().find(|c| c.id == i.campaign_id) else {
                continue;
            };
            let agent = self.store.get_agent(&i.agent_id).await?;
            // Whoever reviews the agent now (a sponsor named or departed
            // since the campaign began): the item is theirs to see.
            let was = i.reviewer.clone();
            if let Some(a) = &agent {
                i.reviewer = super::reviewer_of(&people, a);
            }
            if i.escalated_at.is_some() || c.due_at > t {
                if i.reviewer != was {
                    let mut tx = self.store.begin().await?;
                    // As the store has it now: only its reviewer changes
                    // (decided meanwhile: nothing to reassign).
                    let Some(mut fresh) = tx.review_item(&i.id).await? else {
                        continue;
                    };
                    fresh.reviewer = i.reviewer.clone();
                    if !tx.save_review_item(&fresh).await? {
                        continue;
                    }
                    tx.audit(
                        AuditEvent::new(&Actor::System, "review.reassigned")
                            .agent(&i.agent_id)
                            .details(serde_json::json!({
                                "campaign": c.id, "item": i.id, "from": was, "to": i.reviewer,
                            })),
                    )
                    .await?;
                    tx.commit().await?;
                }
                continue;
            }
            // To the lead of the agent's team now (it may have moved since
            // the campaign began).
            let team = match &agent {
                Some(a) => a.team.clone(),
                None => i.snapshot["team"].as_str().unwrap_or_default().to_owned(),
            };
            let lead = people.team_lead(&team).map(|p| p.email.clone());
            let mut tx = self.store.begin().await?;
            // As the store has it now (an attestation may have landed since
            // the list was read): only its reviewer and escalation change.
            let Some(mut fresh) = tx.review_item(&i.id).await? else {
                continue;
            };
            if fresh.state != super::ReviewState::Open || fresh.escalated_at.is_some() {
                continue;
            }
            fresh.reviewer = i.reviewer.clone();
            fresh.escalated_at = Some(t);
            let i = fresh;
            if !tx.save_review_item(&i).await? {
                continue;
            }
            tx.audit(
                AuditEvent::new(&Actor::System, "review.escalated")
                    .agent(&i.agent_id)
                    .reason(format!(
                        "review item of campaign `{}` was due on {}",
                        c.name,
                        c.due_at.date()
                    ))
                    .details(serde_json::json!({
                        "campaign": c.id, "item": i.id, "reviewer": i.reviewer,
                        "escalated_to": lead, "team": team,
                    })),
            )
            .await?;
            let slack_to = lead.as_deref().and_then(|l| self.slack_user_of(l));
            for row in self
                .notifier
                .review_escalated(&i, c, lead.as_deref(), slack_to.as_deref())
            {
                tx.insert_notification(&row).await?;
            }
            tx.commit().await?;
            self.notifier.wake();
            n += 1;
        }
        Ok(n)
    }
}
