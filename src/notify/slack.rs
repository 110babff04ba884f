//! Slack: Block Kit approval messages through the Web API, and the checks
//! an interaction request must pass before Keygate believes it.
//!
//! Interactions are signed with the app's signing secret (v0: HMAC-SHA256 of
//! `v0:{timestamp}:{raw body}`), compared in constant time, and refused when
//! older than five minutes or seen before.

use hmac::{Hmac, Mac};
use keygate_provider_api::SecretResolver;
use secrecy::ExposeSecret;
use sha2::Sha256;

use super::{Attempt, when};
use crate::config::SlackConfig;
use crate::model::{Approval, ApprovalKind, ApprovalState};

/// The oldest interaction request accepted (Slack's documented window).
pub const MAX_AGE_SECS: i64 = 300;
pub const APPROVE_ACTION: &str = "keygate_approve";
pub const DENY_ACTION: &str = "keygate_deny";

/// Why an interaction request was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing `X-Slack-Request-Timestamp` or `X-Slack-Signature` header")]
    Missing,
    #[error("the request timestamp is not a number")]
    BadTimestamp,
    #[error(
        "the request is older than 5 minutes (or from the future): refused as a possible replay"
    )]
    Stale,
    #[error("the signature does not match the signing secret")]
    Mismatch,
}

/// Checks a Slack v0 signature over the raw body.
pub fn verify(
    signing_secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), SignatureError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let ts_num: i64 = ts
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    if now_unix
        .checked_sub(ts_num)
        .is_none_or(|age| age.abs() > MAX_AGE_SECS)
    {
        return Err(SignatureError::Stale);
    }
    let given = sig
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Mismatch)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(signing_secret).map_err(|_| SignatureError::Mismatch)?;
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// Signs a body as Slack does (for tests and tooling).
pub fn sign(signing_secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(signing_secret) else {
        return String::new();
    };
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// The longest agent- or operator-supplied text put in a message.
pub(crate) const MAX_FREE_TEXT: usize = 500;

/// Text from outside (an agent's justification, a reason) made inert in
/// Slack mrkdwn: `&`, `<` and `>` escaped as Slack documents, so `<!channel>`
/// and `<https://…|disguised>` links show as typed; cut to `max` characters.
pub fn escape_mrkdwn(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn summary(a: &Approval) -> String {
    match a.kind {
        ApprovalKind::Credential => format!(
            "*{}* asks for *{}* (ttl {}s) in task `{}`",
            a.agent_id,
            a.scope.as_deref().unwrap_or("?"),
            a.request["ttl"].as_u64().unwrap_or_default(),
            a.task_id.as_deref().unwrap_or("?"),
        ),
        ApprovalKind::Provisioning => format!(
            "Provisioning change for agent *{}*: {}",
            a.agent_id,
            a.request["change"].as_str().unwrap_or("?")
        ),
    }
}

/// The text after an approval's outcome, and who decided last.
pub fn outcome_text(a: &Approval, by: Option<&str>) -> String {
    let approvals = a.approvals().count();
    match a.state {
        ApprovalState::Pending => format!(
            "{} — approved by {} so far ({approvals} of {} needed)",
            summary(a),
            by.unwrap_or("?"),
            a.required
        ),
        ApprovalState::Approved => format!(
            ":white_check_mark: {} — *approved* ({approvals} of {}), last by {}",
            summary(a),
            a.required,
            by.map(str::to_owned).unwrap_or_else(|| {
                a.approvals()
                    .last()
                    .map(|d| d.operator.clone())
                    .unwrap_or_default()
            })
        ),
        ApprovalState::Denied => format!(
            ":x: {} — *denied*: {}",
            summary(a),
            escape_mrkdwn(a.end_reason.as_deref().unwrap_or(""), MAX_FREE_TEXT)
        ),
        other => format!(
            ":hourglass: {} — *{other}*: {}",
            summary(a),
            escape_mrkdwn(a.end_reason.as_deref().unwrap_or(""), MAX_FREE_TEXT)
        ),
    }
}

pub(crate) fn section(text: String) -> serde_json::Value {
    serde_json::json!({ "type": "section", "text": { "type": "mrkdwn", "text": text } })
}

/// Blocks for a message whose buttons are gone: the outcome only.
pub fn closed_blocks(a: &Approval, by: Option<&str>) -> serde_json::Value {
    serde_json::json!([section(outcome_text(a, by))])
}

/// `chat.postMessage` body announcing a pending approval.
pub fn request_message(a: &Approval, channel: &str, public_url: &str) -> serde_json::Value {
    let incidents: Vec<String> = a
        .step_up_incidents()
        .iter()
        .map(|i| escape_mrkdwn(i, 64))
        .collect();
    let step_up = if incidents.is_empty() {
        String::new()
    } else {
        format!(
            "\n*Step-up:* incident `{}` holds: this agent's requests need a human until it is resolved",
            incidents.join("`, `")
        )
    };
    let details = format!(
        "*Justification:* {}\n*Approvals needed:* {}{}\n*Expires:* {}\n*Request:* `{}`{step_up}",
        escape_mrkdwn(&a.justification, MAX_FREE_TEXT),
        a.required,
        if a.approver_teams.is_empty() {
            String::new()
        } else {
            format!(" (teams: {})", a.approver_teams.join(", "))
        },
        when(a.expires_at),
        a.id
    );
    // The console's page, where a person signed in decides it (the API's
    // URL would answer a browser 401).
    let link = format!("{public_url}/ui/approvals/{}", a.id);
    let actions = if a.confirm_in_api {
        serde_json::json!([{
            "type": "button",
            "action_id": "keygate_open",
            "text": { "type": "plain_text", "text": "Review in Keygate" },
            "url": link,
        }])
    } else {
        serde_json::json!([
            {
                "type": "button", "action_id": APPROVE_ACTION, "style": "primary",
                "text": { "type": "plain_text", "text": "Approve" }, "value": a.id,
            },
            {
                "type": "button", "action_id": DENY_ACTION, "style": "danger",
                "text": { "type": "plain_text", "text": "Deny" }, "value": a.id,
                "confirm": {
                    "title": { "type": "plain_text", "text": "Deny this request?" },
                    "text": { "type": "plain_text", "text": "The agent will not receive the credential." },
                    "confirm": { "type": "plain_text", "text": "Deny" },
                    "deny": { "type": "plain_text", "text": "Cancel" },
                },
            },
        ])
    };
    let mut blocks = vec![
        section(format!(":lock: *Approval needed* — {}", summary(a))),
        section(details),
        serde_json::json!({ "type": "actions", "block_id": "keygate_approval", "elements": actions }),
    ];
    if a.confirm_in_api {
        blocks.push(serde_json::json!({
            "type": "context",
            "elements": [{ "type": "mrkdwn", "text": format!(
                "This request must be decided in Keygate: `keygate approvals approve {}`", a.id
            ) }],
        }));
    }
    serde_json::json!({
        "channel": channel,
        "text": format!("Approval needed: {}", summary(a)),
        "blocks": blocks,
        "unfurl_links": false,
    })
}

/// `chat.update` body closing a posted request.
pub fn update_message(a: &Approval, receipt: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "channel": receipt["channel"],
        "ts": receipt["ts"],
        "text": outcome_text(a, None),
        "blocks": closed_blocks(a, None),
    })
}

/// `chat.postMessage`; the receipt is the message's channel and ts.
pub async fn post_message(
    http: &reqwest::Client,
    secrets: &SecretResolver,
    slack: &SlackConfig,
    message: &serde_json::Value,
) -> Result<serde_json::Value, Attempt> {
    let answer = call(http, secrets, slack, "chat.postMessage", message).await?;
    Ok(serde_json::json!({ "channel": answer["channel"], "ts": answer["ts"] }))
}

/// Calls a Slack Web API method with the bot token. Slack answers 200 with
/// `ok: false` for most errors, and 429 with `Retry-After` when limiting.
pub async fn call(
    http: &reqwest::Client,
    secrets: &SecretResolver,
    slack: &SlackConfig,
    method: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, Attempt> {
    let token = secrets
        .resolve(&slack.bot_token)
        .await
        .map_err(|e| Attempt::Retry(format!("Slack bot token: {e}")))?;
    let url = format!("{}/{method}", slack.api_url.trim_end_matches('/'));
    let resp = http
        .post(&url)
        .bearer_auth(token.expose_secret())
        .json(body)
        .send()
        .await
        .map_err(|e| Attempt::Retry(format!("Slack {method}: {}", e.without_url())))?;
    let status = resp.status();
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        // Slack's Web API rate limit: wait what `Retry-After` says.
        let after = retry_after(resp.headers());
        return Err(Attempt::RetryAfter(
            format!(
                "Slack {method}: rate limited (HTTP 429), retry after {}s",
                after.as_secs()
            ),
            after,
        ));
    }
    if !status.is_success() {
        return Err(Attempt::Retry(format!("Slack {method}: HTTP {status}")));
    }
    let answer: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| Attempt::Retry(format!("Slack {method}: unreadable answer: {e}")))?;
    if answer["ok"] == serde_json::Value::Bool(true) {
        return Ok(answer);
    }
    let error = answer["error"]
        .as_str()
        .unwrap_or("unknown_error")
        .to_owned();
    // Errors that retrying cannot fix.
    const FATAL: &[&str] = &[
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_blocks",
        "invalid_auth",
        "account_inactive",
        "token_revoked",
        "missing_scope",
        "message_not_found",
        "cant_update_message",
    ];
    let msg = format!("Slack {method}: {error}");
    if FATAL.contains(&error.as_str()) {
        Err(Attempt::GiveUp(msg))
    } else {
        Err(Attempt::Retry(msg))
    }
}

/// A `Retry-After` in seconds (capped at an hour; 1 s when absent or
/// unreadable).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> std::time::Duration {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    std::time::Duration::from_secs(secs.clamp(1, 3600))
}

/// Posts an answer to a click's `response_url`.
pub async fn respond(
    http: &reqwest::Client,
    payload: &serde_json::Value,
) -> Result<serde_json::Value, Attempt> {
    let url = payload["response_url"]
        .as_str()
        .ok_or_else(|| Attempt::GiveUp("no response_url".into()))?;
    let resp = http
        .post(url)
        .json(&payload["body"])
        .send()
        .await
        .map_err(|e| Attempt::Retry(format!("Slack response_url: {}", e.without_url())))?;
    match resp.status() {
        s if s.is_success() => Ok(serde_json::json!({ "status": s.as_u16() })),
        s if s.is_client_error() && s.as_u16() != 429 => Err(Attempt::GiveUp(format!(
            "Slack response_url: HTTP {s} (expired or used up)"
        ))),
        s => Err(Attempt::Retry(format!("Slack response_url: HTTP {s}"))),
    }
}

/// What Keygate reads from a `block_actions` interaction payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    pub user_id: String,
    pub action_id: String,
    /// The button's value: the approval's or the review item's id.
    pub value: String,
    pub response_url: Option<String>,
}

/// Parses the `payload` form field of an interaction request.
pub fn parse_click(payload: &str) -> Result<Click, String> {
    let v: serde_json::Value = serde_json::from_str(payload).map_err(|e| {
        format!(
            "`payload` is not JSON: {}",
            crate::limits::clip_message(&e.to_string())
        )
    })?;
    if v["type"] != "block_actions" {
        return Err(format!(
            "unsupported interaction type `{}` (Keygate handles block_actions)",
            crate::limits::claimed_label(v["type"].as_str().unwrap_or("?"))
        ));
    }
    let user_id = v["user"]["id"]
        .as_str()
        .ok_or("the payload names no user")?
        .to_owned();
    let action = v["actions"]
        .as_array()
        .and_then(|a| a.first())
        .ok_or("the payload has no action")?;
    Ok(Click {
        user_id,
        action_id: action["action_id"].as_str().unwrap_or_default().to_owned(),
        value: action["value"].as_str().unwrap_or_default().to_owned(),
        response_url: v["response_url"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn outside_text_cannot_mention_or_link() {
        let s = escape_mrkdwn("<!here> <https://x.test|ok> & done", 100);
        assert_eq!(s, "&lt;!here&gt; &lt;https://x.test|ok&gt; &amp; done");
        let long = escape_mrkdwn(&"a".repeat(2000), 500);
        assert_eq!(long.chars().count(), 501);
        assert!(long.ends_with('…'));
    }

    /// Slack's own worked example ("Verifying requests from Slack"): if the
    /// base string or encoding drifted, every real click would fail.
    #[test]
    fn slacks_documented_signature_example_verifies() {
        let secret = b"8f742231b10e8888abcd99yyyzzz85a5";
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let want = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert_eq!(sign(secret, 1_531_420_618, body), want);
        assert_eq!(
            verify(secret, Some("1531420618"), Some(want), body, 1_531_420_618),
            Ok(())
        );
    }

    #[test]
    fn signature_round_trip_and_rejections() {
        let body = b"payload=%7B%7D";
        let sig = sign(b"secret", 1000, body);
        assert_eq!(
            verify(b"secret", Some("1000"), Some(&sig), body, 1010),
            Ok(())
        );
        assert_eq!(
            verify(b"other", Some("1000"), Some(&sig), body, 1010),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"secret", Some("1000"), Some(&sig), b"payload=x", 1010),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"secret", Some("1000"), Some(&sig), body, 1000 + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(b"secret", None, Some(&sig), body, 1000),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify(b"secret", Some("1000"), Some("v0=zz"), body, 1000),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn parses_a_block_actions_click() {
        let p = r#"{"type":"block_actions","user":{"id":"U1"},"response_url":"https://hooks.slack.com/x",
                   "actions":[{"action_id":"keygate_approve","value":"ap_1"}]}"#;
        let c = parse_click(p).unwrap();
        assert_eq!(c.user_id, "U1");
        assert_eq!(c.action_id, APPROVE_ACTION);
        assert_eq!(c.value, "ap_1");
        assert!(parse_click(r#"{"type":"view_submission"}"#).is_err());
    }
}
