//! Generic webhooks: a signed JSON event per approval change. Decisions come
//! back through the API (`POST /v1/approvals/{id}/decision`).
//!
//! Each request carries `Keygate-Timestamp` (unix seconds), `Keygate-Event-Id`
//! (stable across retries, for de-duplication) and `Keygate-Signature:
//! v1=<hex HMAC-SHA256 of "{timestamp}.{raw body}" with the hook's secret>`.

use hmac::{Hmac, Mac};
use keygate_provider_api::SecretResolver;
use secrecy::ExposeSecret;
use sha2::Sha256;

use super::Attempt;
use crate::config::WebhookConfig;
use crate::model::Approval;

/// The event body: the approval as operators see it, and a link to it.
pub fn event(a: &Approval, kind: &str, public_url: &str) -> serde_json::Value {
    serde_json::json!({
        "type": kind,
        "approval": a,
        "links": {
            "approval": format!("{public_url}/v1/approvals/{}", a.id),
            "decision": format!("{public_url}/v1/approvals/{}/decision", a.id),
        },
    })
}

/// `v1=<hex>` over `{timestamp}.{body}`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub async fn send(
    http: &reqwest::Client,
    secrets: &SecretResolver,
    hook: &WebhookConfig,
    payload: &serde_json::Value,
    event_id: &str,
) -> Result<serde_json::Value, Attempt> {
    let key = secrets
        .resolve(&hook.secret)
        .await
        .map_err(|e| Attempt::Retry(format!("webhook `{}` secret: {e}", hook.name)))?;
    let body = serde_json::to_vec(payload).map_err(|e| Attempt::GiveUp(e.to_string()))?;
    let ts = time::OffsetDateTime::now_utc().unix_timestamp();
    let resp = http
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("keygate-timestamp", ts.to_string())
        .header("keygate-event-id", event_id)
        .header(
            "keygate-signature",
            signature(key.expose_secret().as_bytes(), ts, &body),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| Attempt::Retry(format!("webhook `{}`: {}", hook.name, e.without_url())))?;
    let status = resp.status();
    if status.is_success() {
        Ok(serde_json::json!({ "status": status.as_u16() }))
    } else if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let after = super::slack::retry_after(resp.headers());
        Err(Attempt::RetryAfter(
            format!(
                "webhook `{}`: HTTP 429, retry after {}s",
                hook.name,
                after.as_secs()
            ),
            after,
        ))
    } else {
        Err(Attempt::Retry(format!(
            "webhook `{}`: HTTP {status}",
            hook.name
        )))
    }
}
