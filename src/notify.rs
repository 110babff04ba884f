//! Approval, review and incident notifications: Slack messages and signed
//! webhooks, delivered from a durable outbox.
//!
//! Rows are written in the same commit as the approval change they announce
//! ([`Notifier::requested`], [`Notifier::decided`], [`Notifier::reply`]); the
//! worker ([`Notifier::run`]) delivers them, retrying with backoff, so a
//! channel outage delays a message but never loses the request behind it.

mod incidents;
pub mod reviews;
pub mod slack;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use keygate_provider_api::SecretResolver;
use time::OffsetDateTime;

use crate::config::{NotifyConfig, ScopeConfig};
use crate::model::{Approval, ApprovalState, Notification, new_id, now};
use crate::store::{Delivery, Store};

/// The Slack channel name in the outbox.
pub const SLACK: &str = "slack";

/// A `response_url` to answer one Slack click on.
#[derive(Debug, Clone)]
pub struct Reply {
    pub response_url: String,
}

impl Reply {
    /// The clicker alone sees why Keygate refused the click.
    pub fn refused(&self, why: &str) -> serde_json::Value {
        serde_json::json!({
            "response_url": self.response_url,
            "body": {
                "response_type": "ephemeral",
                "replace_original": false,
                "text": format!(":no_entry: Keygate refused this decision: {why}"),
            },
        })
    }

    /// The message is replaced by the outcome so far and who decided.
    pub fn decided(&self, a: &Approval, operator: &str) -> serde_json::Value {
        serde_json::json!({
            "response_url": self.response_url,
            "body": {
                "replace_original": true,
                "text": slack::outcome_text(a, Some(operator)),
                "blocks": slack::closed_blocks(a, Some(operator)),
            },
        })
    }
}

/// What an outbox row is about.
#[derive(Debug, Clone, Copy)]
enum About<'a> {
    Approval(&'a str),
    Review(&'a str),
    Incident(&'a str),
}

/// Builds outbox rows and delivers them.
pub struct Notifier {
    cfg: NotifyConfig,
    public_url: String,
    http: reqwest::Client,
    secrets: SecretResolver,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("slack", &self.cfg.slack.is_some())
            .field("webhooks", &self.cfg.webhooks.len())
            .finish()
    }
}

impl Notifier {
    pub fn new(
        cfg: NotifyConfig,
        public_url: String,
        secrets: SecretResolver,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            cfg,
            public_url,
            http,
            secrets,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Whether a Slack app is configured.
    pub fn slack(&self) -> Option<&crate::config::SlackConfig> {
        self.cfg.slack.as_ref()
    }

    pub fn secrets(&self) -> &SecretResolver {
        &self.secrets
    }

    /// Wakes the delivery worker (new rows were committed).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn row(
        &self,
        about: About<'_>,
        channel: &str,
        event: &str,
        payload: serde_json::Value,
    ) -> Notification {
        let t = now();
        let (mut approval_id, mut review_item_id, mut incident_id) = (None, None, None);
        match about {
            About::Approval(id) => approval_id = Some(id.to_owned()),
            About::Review(id) => review_item_id = Some(id.to_owned()),
            About::Incident(id) => incident_id = Some(id.to_owned()),
        }
        Notification {
            id: new_id("nt"),
            approval_id,
            review_item_id,
            incident_id,
            channel: channel.to_owned(),
            event: event.to_owned(),
            payload,
            created_at: t,
            attempts: 0,
            next_attempt_at: Some(t),
            last_error: None,
            delivered_at: None,
        }
    }

    fn webhook_rows(&self, a: &Approval, event: &str) -> Vec<Notification> {
        self.cfg
            .webhooks
            .iter()
            .map(|h| {
                let payload = webhook::event(a, event, &self.public_url);
                self.row(
                    About::Approval(&a.id),
                    &format!("webhook:{}", h.name),
                    event,
                    payload,
                )
            })
            .collect()
    }

    /// Rows announcing a new approval.
    pub fn requested(&self, a: &Approval, scope: Option<&ScopeConfig>) -> Vec<Notification> {
        let mut rows = self.webhook_rows(a, "approval.requested");
        if let Some(slack) = &self.cfg.slack {
            let channel = scope
                .and_then(|s| s.slack_channel.clone())
                .unwrap_or_else(|| slack.default_channel.clone());
            rows.push(self.row(
                About::Approval(&a.id),
                SLACK,
                "requested",
                serde_json::json!({ "channel": channel }),
            ));
        }
        rows
    }

    /// Rows announcing that an approval ended (approved, denied, expired, cancelled).
    pub fn decided(&self, a: &Approval) -> Vec<Notification> {
        let mut rows = self.webhook_rows(a, "approval.decided");
        if self.cfg.slack.is_some() {
            rows.push(self.row(
                About::Approval(&a.id),
                SLACK,
                "decided",
                serde_json::json!({}),
            ));
        }
        rows
    }

    /// A row answering one Slack click through its `response_url`.
    pub fn reply(&self, approval_id: &str, payload: serde_json::Value) -> Notification {
        self.row(About::Approval(approval_id), SLACK, "reply", payload)
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.cfg.retry_base_ms.max(1);
        let ms = base.saturating_mul(1u64 << attempts.min(20));
        Duration::from_millis(ms).min(Duration::from_secs(self.cfg.retry_max_secs.max(1)))
    }

    /// Delivers due notifications until the process ends.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, boot_id: String) {
        loop {
            match self.deliver_due(&store, &boot_id).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "notification pass failed"),
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
        }
    }

    /// One pass over the due notifications, claimed for this process
    /// (`boot_id`) so no other replica sends them too. Returns how many
    /// were attempted.
    pub async fn deliver_due(
        &self,
        store: &Arc<dyn Store>,
        boot_id: &str,
    ) -> crate::store::StoreResult<usize> {
        let t = now();
        // Long enough for a batch's attempts; a dead replica's claim is
        // void at once anyway.
        let due = store
            .claim_notifications(t, boot_id, t + Duration::from_secs(300), 32)
            .await?;
        for n in &due {
            let outcome = match self.deliver(store, n).await {
                Ok(receipt) => Delivery::Delivered(receipt),
                Err(Attempt::GiveUp(error)) => {
                    tracing::warn!(notification = %n.id, approval = ?n.approval_id, review_item = ?n.review_item_id, channel = %n.channel, error = %error, "notification given up");
                    Delivery::Failed {
                        error,
                        retry_at: None,
                    }
                }
                Err(Attempt::Retry(error)) => self.failed(n, t, error, Duration::ZERO),
                Err(Attempt::RetryAfter(error, after)) => self.failed(n, t, error, after),
            };
            let mut tx = store.begin().await?;
            tx.notification_attempted(&n.id, &outcome, boot_id, now())
                .await?;
            tx.commit().await?;
        }
        Ok(due.len())
    }

    /// A failed attempt worth retrying: after the backoff, and not before
    /// what the channel asked (`after`); given up once stale.
    fn failed(
        &self,
        n: &Notification,
        t: OffsetDateTime,
        error: String,
        after: Duration,
    ) -> Delivery {
        let due = OffsetDateTime::now_utc() + self.backoff(n.attempts).max(after);
        // Kept in whole seconds: rounded up, so a channel's `Retry-After`
        // is never cut short by the truncation (it was, by up to a second).
        let retry_at =
            crate::model::from_unix(due.unix_timestamp() + i64::from(due.nanosecond() > 0));
        let stale = t - n.created_at > self.give_up_after(&n.event);
        tracing::warn!(notification = %n.id, approval = ?n.approval_id, review_item = ?n.review_item_id, channel = %n.channel, attempts = n.attempts + 1, error = %error, "notification not delivered");
        Delivery::Failed {
            error,
            retry_at: (!stale).then_some(retry_at),
        }
    }

    /// How long a notification is worth retrying: a Slack `response_url`
    /// lives 30 minutes; other events a day.
    fn give_up_after(&self, event: &str) -> time::Duration {
        if event == "reply" {
            time::Duration::minutes(30)
        } else {
            time::Duration::days(1)
        }
    }

    async fn deliver(
        &self,
        store: &Arc<dyn Store>,
        n: &Notification,
    ) -> Result<serde_json::Value, Attempt> {
        if let Some(name) = n.channel.strip_prefix("webhook:") {
            let hook = self
                .cfg
                .webhooks
                .iter()
                .find(|h| h.name == name)
                .ok_or_else(|| {
                    Attempt::GiveUp(format!("webhook `{name}` is no longer configured"))
                })?;
            return webhook::send(&self.http, &self.secrets, hook, &n.payload, &n.id).await;
        }
        if n.channel != SLACK {
            return Err(Attempt::GiveUp(format!("unknown channel `{}`", n.channel)));
        }
        let slack = self
            .cfg
            .slack
            .as_ref()
            .ok_or_else(|| Attempt::GiveUp("Slack is no longer configured".into()))?;
        let approval_id = match (&n.approval_id, &n.review_item_id, &n.incident_id) {
            (Some(a), _, _) => a,
            (None, Some(item), _) => return self.deliver_review(store, slack, n, item).await,
            (None, None, Some(_)) => {
                return slack::post_message(&self.http, &self.secrets, slack, &n.payload).await;
            }
            (None, None, None) => {
                return Err(Attempt::GiveUp("a notification about nothing".into()));
            }
        };
        let approval = store
            .get_approval(approval_id)
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?
            .ok_or_else(|| Attempt::GiveUp(format!("no approval `{approval_id}`")))?;
        match n.event.as_str() {
            "requested" => {
                if approval.state != ApprovalState::Pending {
                    return Err(Attempt::GiveUp(format!(
                        "approval is {} before it was announced",
                        approval.state
                    )));
                }
                let channel = n.payload["channel"]
                    .as_str()
                    .unwrap_or(&slack.default_channel);
                let message = slack::request_message(&approval, channel, &self.public_url);
                slack::post_message(&self.http, &self.secrets, slack, &message).await
            }
            "decided" => {
                let Some(receipt) = store
                    .notification_receipt(approval_id, SLACK)
                    .await
                    .map_err(|e| Attempt::Retry(e.to_string()))?
                else {
                    return Ok(serde_json::json!({ "skipped": "the request was never posted" }));
                };
                let update = slack::update_message(&approval, &receipt);
                slack::call(&self.http, &self.secrets, slack, "chat.update", &update).await
            }
            "reply" => slack::respond(&self.http, &n.payload).await,
            other => Err(Attempt::GiveUp(format!("unknown Slack event `{other}`"))),
        }
    }
}

/// Why one delivery attempt failed.
#[derive(Debug)]
pub enum Attempt {
    /// Worth trying again later.
    Retry(String),
    /// The channel said when (HTTP 429 with `Retry-After`): not before.
    RetryAfter(String, Duration),
    /// Will never succeed.
    GiveUp(String),
}

/// An approval's expiry as RFC 3339, for messages.
pub(crate) fn when(t: OffsetDateTime) -> String {
    crate::model::rfc3339(t)
}
