//! Incident alerts: what continuous validation opened with `alert`,
//! `step_up` or `suspend`, announced to SecOps over the signed webhooks and
//! Slack. An incident does not change once opened, so each row carries its
//! whole message.

use serde_json::{Value, json};

use super::slack::{escape_mrkdwn, section};
use super::{About, Notifier, SLACK};
use crate::model::Notification;
use crate::validation::Incident;

/// A serde enum's wire name (`high`, `suspend`).
fn name<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl Notifier {
    /// Rows announcing an incident: the webhook event and a Slack message.
    pub fn incident_opened(&self, i: &Incident) -> Vec<Notification> {
        let link = format!("{}/v1/incidents/{}", self.public_url, i.id);
        // Its audit sequence is not known before the event is written.
        let mut body = serde_json::to_value(i).unwrap_or(Value::Null);
        if let Some(o) = body.as_object_mut() {
            o.remove("opened_seq");
        }
        let mut rows: Vec<Notification> = self
            .cfg
            .webhooks
            .iter()
            .map(|h| {
                let payload = json!({
                    "type": "incident.opened",
                    "incident": body,
                    "links": { "incident": link, "resolve": format!("{link}/resolve") },
                });
                self.row(
                    About::Incident(&i.id),
                    &format!("webhook:{}", h.name),
                    "incident.opened",
                    payload,
                )
            })
            .collect();
        if let Some(slack) = &self.cfg.slack {
            let channel = slack
                .incident_channel
                .clone()
                .unwrap_or_else(|| slack.default_channel.clone());
            rows.push(self.row(
                About::Incident(&i.id),
                SLACK,
                "incident_opened",
                message(i, &channel, &link),
            ));
        }
        rows
    }
}

/// The Slack message: what fired, on whom, what was done, the evidence.
fn message(i: &Incident, channel: &str, link: &str) -> Value {
    let done = match name(i.action).as_str() {
        "suspend" => "the agent was suspended and its credentials revoked",
        "step_up" => "the agent's credential requests now need an approval",
        _ => "nothing was done to the agent",
    };
    let text = format!(
        ":rotating_light: Keygate incident `{}` ({} severity): detector `{}` ({}) fired for agent *{}*; {done}.",
        i.id,
        name(i.severity),
        escape_mrkdwn(&i.detector, 64),
        name(i.signal),
        escape_mrkdwn(&i.agent, 128),
    );
    let evidence = escape_mrkdwn(&i.evidence.to_string(), 1_500);
    json!({
        "channel": channel,
        "text": text,
        "blocks": [
            section(text.clone()),
            section(format!("Evidence: ```{evidence}```")),
            section(format!(
                "<{link}|Open the incident>; close it with `keygate incidents resolve {} --reason …`",
                i.id
            )),
        ],
    })
}
