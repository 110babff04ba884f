//! Review reminders: an access review item announced to its reviewer (in
//! Slack, with Attest and Retire buttons that pass the same signature and
//! replay checks as approval clicks, and as a signed webhook), its
//! escalation to the team lead once overdue, and its outcome. Rows go
//! through the same durable outbox as approval notifications.

use std::sync::Arc;

use serde_json::{Value, json};

use super::slack::{self, MAX_FREE_TEXT, escape_mrkdwn, section};
use super::{About, Attempt, Notifier, SLACK, when};
use crate::governance::reviews::{Campaign, ReviewItem, ReviewState};
use crate::model::Notification;
use crate::store::Store;

/// Slack button: the reviewer attests the agent still needs its access.
pub const ATTEST_ACTION: &str = "keygate_review_attest";
/// Slack button: the reviewer retires (decommissions) the agent.
pub const RETIRE_ACTION: &str = "keygate_review_retire";

/// The webhook body for a review event, shaped like an approval's (`type`,
/// the subject, `links`); never secret.
fn webhook_event(
    item: &ReviewItem,
    campaign: &Campaign,
    event: &str,
    escalated_to: Option<&str>,
    public_url: &str,
) -> Value {
    json!({
        "type": event,
        "review_item": {
            "id": item.id,
            "campaign": campaign.name,
            "campaign_id": campaign.id,
            "agent": item.agent_id,
            "reviewer": item.reviewer,
            "state": item.state.as_str(),
            "due_at": when(campaign.due_at),
            "escalated_to": escalated_to,
        },
        "links": {
            "item": format!("{public_url}/v1/reviews/items/{}", item.id),
            "decision": format!("{public_url}/v1/reviews/items/{}/decision", item.id),
        },
    })
}

/// One line on the item: agent, campaign, due date.
fn summary(item: &ReviewItem, campaign: &Campaign) -> String {
    format!(
        "agent *{}* (campaign *{}*, due {})",
        item.agent_id,
        escape_mrkdwn(&campaign.name, 64),
        campaign.due_at.date()
    )
}

/// What the reviewer is shown: the snapshot's reachable scopes with their
/// last use, and its open issues.
fn details(item: &ReviewItem) -> String {
    let scopes: Vec<String> = item.snapshot["permitted_scopes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let last = s["last_used_at"]
                .as_str()
                .map_or("never used".to_owned(), |t| {
                    format!("last used {}", t.get(..10).unwrap_or(t))
                });
            format!("`{}` ({last})", s["scope"].as_str().unwrap_or("?"))
        })
        .collect();
    let issues: Vec<&str> = item.snapshot["issues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["kind"].as_str())
        .collect();
    format!(
        "*May reach:* {}\n*Open issues:* {}\n*Reviewer:* {} ({} attestation(s) needed)\n*Item:* `{}`",
        escape_mrkdwn(&scopes.join(", "), MAX_FREE_TEXT),
        if issues.is_empty() {
            "none".to_owned()
        } else {
            issues.join(", ")
        },
        escape_mrkdwn(&item.reviewer, 128),
        item.attestations,
        item.id
    )
}

fn buttons(item: &ReviewItem) -> Value {
    json!({
        "type": "actions",
        "block_id": "keygate_review",
        "elements": [
            {
                "type": "button", "action_id": ATTEST_ACTION, "style": "primary",
                "text": { "type": "plain_text", "text": "Attest" }, "value": item.id,
            },
            {
                "type": "button", "action_id": RETIRE_ACTION, "style": "danger",
                "text": { "type": "plain_text", "text": "Retire" }, "value": item.id,
                "confirm": {
                    "title": { "type": "plain_text", "text": "Retire this agent?" },
                    "text": { "type": "plain_text", "text": "It is decommissioned and every credential it holds is revoked." },
                    "confirm": { "type": "plain_text", "text": "Retire" },
                    "deny": { "type": "plain_text", "text": "Cancel" },
                },
            },
        ],
    })
}

/// The item's state in words, and who decided.
pub fn outcome_text(item: &ReviewItem, campaign: &Campaign) -> String {
    let by: Vec<&str> = item.decisions.iter().map(|d| d.by.as_str()).collect();
    let by = escape_mrkdwn(&by.join(", "), 256);
    match item.state {
        ReviewState::Open => format!(
            ":clipboard: Access review of {} — {} of {} attestation(s) so far, by {by}",
            summary(item, campaign),
            item.decisions.len(),
            item.attestations
        ),
        ReviewState::Attested => format!(
            ":white_check_mark: Access review of {} — *attested* by {by}",
            summary(item, campaign)
        ),
        ReviewState::Narrowed => format!(
            ":scissors: Access review of {} — *narrowed* by {by}",
            summary(item, campaign)
        ),
        ReviewState::Retired => format!(
            ":wastebasket: Access review of {} — *retired* by {by}",
            summary(item, campaign)
        ),
        ReviewState::Cancelled => format!(
            ":hourglass: Access review of {} — *cancelled* (the agent was decommissioned)",
            summary(item, campaign)
        ),
    }
}

/// `chat.postMessage` body asking the reviewer (or, `escalated`, the team
/// lead) to decide.
fn request_message(
    item: &ReviewItem,
    campaign: &Campaign,
    channel: &str,
    escalated_to: Option<&str>,
) -> Value {
    let head = match escalated_to {
        Some(lead) => format!(
            ":rotating_light: *Overdue access review*, escalated to {} — {}",
            escape_mrkdwn(lead, 128),
            summary(item, campaign)
        ),
        None => format!(":clipboard: *Access review* — {}", summary(item, campaign)),
    };
    json!({
        "channel": channel,
        "text": format!("Access review: {}", item.agent_id),
        "blocks": [
            section(head),
            section(details(item)),
            buttons(item),
            {
                "type": "context",
                "elements": [{ "type": "mrkdwn", "text": format!(
                    "To remove some scopes only: `keygate reviews decide {} narrow --scope <scope>`", item.id
                ) }],
            },
        ],
        "unfurl_links": false,
    })
}

impl Notifier {
    fn review_rows(
        &self,
        item: &ReviewItem,
        campaign: &Campaign,
        event: &str,
        slack_to: Option<&str>,
        escalated_to: Option<&str>,
    ) -> Vec<Notification> {
        let about = About::Review(&item.id);
        let mut rows: Vec<Notification> = self
            .cfg
            .webhooks
            .iter()
            .map(|h| {
                let body = webhook_event(
                    item,
                    campaign,
                    &format!("review.{}", event.trim_start_matches("review_")),
                    escalated_to,
                    &self.public_url,
                );
                self.row(about, &format!("webhook:{}", h.name), event, body)
            })
            .collect();
        if let Some(slack) = &self.cfg.slack {
            let channel = slack_to.unwrap_or(&slack.default_channel);
            rows.push(self.row(
                about,
                SLACK,
                event,
                json!({ "channel": channel, "escalated_to": escalated_to }),
            ));
        }
        rows
    }

    /// Rows asking `item`'s reviewer to decide it; `slack_to` is the
    /// reviewer's Slack user id when known (a direct message), else the
    /// default channel.
    pub fn review_requested(
        &self,
        item: &ReviewItem,
        campaign: &Campaign,
        slack_to: Option<&str>,
    ) -> Vec<Notification> {
        self.review_rows(item, campaign, "review_requested", slack_to, None)
    }

    /// Rows escalating an overdue item to `lead` (the team's lead, if the
    /// directory names one).
    pub fn review_escalated(
        &self,
        item: &ReviewItem,
        campaign: &Campaign,
        lead: Option<&str>,
        slack_to: Option<&str>,
    ) -> Vec<Notification> {
        self.review_rows(item, campaign, "review_escalated", slack_to, lead)
    }

    /// Rows announcing that an item was decided (the Slack request message
    /// is updated to the outcome).
    pub fn review_decided(&self, item: &ReviewItem, campaign: &Campaign) -> Vec<Notification> {
        self.review_rows(item, campaign, "review_decided", None, None)
    }

    /// A row answering one Slack click on a review message.
    pub fn review_reply(&self, item_id: &str, payload: Value) -> Notification {
        self.row(About::Review(item_id), SLACK, "reply", payload)
    }

    /// Delivers one Slack row about a review item.
    pub(super) async fn deliver_review(
        &self,
        store: &Arc<dyn Store>,
        slack: &crate::config::SlackConfig,
        n: &Notification,
        item_id: &str,
    ) -> Result<Value, Attempt> {
        if n.event == "reply" {
            return slack::respond(&self.http, &n.payload).await;
        }
        let retry = |e: crate::store::StoreError| Attempt::Retry(e.to_string());
        let item = store
            .review_item(item_id)
            .await
            .map_err(retry)?
            .ok_or_else(|| Attempt::GiveUp(format!("no review item `{item_id}`")))?;
        let campaign = store
            .review_campaigns()
            .await
            .map_err(retry)?
            .into_iter()
            .find(|c| c.id == item.campaign_id)
            .ok_or_else(|| Attempt::GiveUp(format!("no campaign `{}`", item.campaign_id)))?;
        match n.event.as_str() {
            "review_requested" | "review_escalated" => {
                if item.state != ReviewState::Open {
                    return Err(Attempt::GiveUp(format!(
                        "review item is {} before it was announced",
                        item.state.as_str()
                    )));
                }
                let channel = n.payload["channel"]
                    .as_str()
                    .unwrap_or(&slack.default_channel);
                let lead = n.payload["escalated_to"].as_str();
                let escalated = (n.event == "review_escalated")
                    .then_some(lead.unwrap_or("nobody (no team lead in the directory)"));
                let message = request_message(&item, &campaign, channel, escalated);
                slack::post_message(&self.http, &self.secrets, slack, &message).await
            }
            "review_decided" => {
                let Some(receipt) = store
                    .notification_receipt(item_id, SLACK)
                    .await
                    .map_err(retry)?
                else {
                    return Ok(json!({ "skipped": "the request was never posted" }));
                };
                let text = outcome_text(&item, &campaign);
                let update = json!({
                    "channel": receipt["channel"],
                    "ts": receipt["ts"],
                    "text": text,
                    "blocks": [section(text.clone())],
                });
                slack::call(&self.http, &self.secrets, slack, "chat.update", &update).await
            }
            other => Err(Attempt::GiveUp(format!("unknown Slack event `{other}`"))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn item() -> (ReviewItem, Campaign) {
        let t = crate::model::now();
        let item = ReviewItem {
            id: "ri_1".into(),
            campaign_id: "rv_1".into(),
            agent_id: "agent-1".into(),
            reviewer: "<!channel>@example.com".into(),
            attestations: 1,
            snapshot: json!({
                "permitted_scopes": [{ "scope": "x509-svid", "last_used_at": "2026-11-30T10:00:00Z" }],
                "issues": [{ "kind": "unused_scope" }],
            }),
            state: ReviewState::Open,
            decisions: Vec::new(),
            decided_at: None,
            escalated_at: None,
        };
        let campaign = Campaign {
            id: "rv_1".into(),
            name: "2026-Q4".into(),
            team: None,
            created_at: t,
            created_by: "operator:admin".into(),
            due_at: t,
        };
        (item, campaign)
    }

    /// The message carries both buttons with the item id, and text from
    /// outside (the reviewer's address here) cannot mention a channel.
    #[test]
    fn the_request_has_attest_and_retire_and_nothing_from_outside_is_live() {
        let (item, campaign) = item();
        let m = request_message(&item, &campaign, "C1", None);
        let s = m.to_string();
        assert!(
            s.contains(ATTEST_ACTION) && s.contains(RETIRE_ACTION),
            "{s}"
        );
        assert_eq!(m["blocks"][2]["elements"][0]["value"], "ri_1");
        assert!(!s.contains("<!channel>"), "{s}");
        assert!(s.contains("`x509-svid` (last used 2026-11-30)"), "{s}");
        let escalated = request_message(&item, &campaign, "C1", Some("lead@example.com"));
        assert!(escalated.to_string().contains("Overdue access review"));
    }
}
