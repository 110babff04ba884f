//! Approval endpoints: list and read (operators, and agents for their own),
//! decide (approvers), redeem (the agent's task), and Slack's interactivity
//! hook.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::agent::issued_body;
use super::auth::{AgentSession, Caller, Operator};
use super::error::{parse_json, parse_query};
use super::openapi::{AGENT, OPERATOR, PUBLIC};
use super::{ApiError, AppState};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{DecisionChannel, DecisionRequest};
use crate::config::Role;
use crate::governance::reviews::Verdict as ReviewVerdict;
use crate::model::{Approval, ApprovalFilter, ApprovalState, Verdict, now};
use crate::notify::{Reply, reviews, slack};

/// Operators who may read approvals.
const READERS: &[Role] = &[Role::Approver, Role::Admin, Role::Secops, Role::Auditor];

/// What an agent sees of its own approval: no approver names or reasons.
#[derive(Serialize, ToSchema)]
pub struct AgentApprovalView {
    pub approval_id: String,
    pub status: ApprovalState,
    pub scope: Option<String>,
    pub task_id: Option<String>,
    /// Approvals needed.
    pub required: u32,
    /// Approvals so far.
    pub approvals: usize,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    pub redeemed: bool,
    /// Why it ended, once it has.
    pub reason: Option<String>,
    /// What to do next (the 202 of `POST /v1/credentials`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

pub fn agent_view(a: &Approval) -> AgentApprovalView {
    AgentApprovalView {
        approval_id: a.id.clone(),
        status: a.state,
        scope: a.scope.clone(),
        task_id: a.task_id.clone(),
        required: a.required,
        approvals: a.approvals().count(),
        expires_at: a.expires_at,
        redeemed: a.redeemed_at.is_some(),
        reason: a.end_reason.clone(),
        message: None,
    }
}

/// `GET /v1/approvals?state=&kind=&agent=&limit=`.
#[utoipa::path(get, path = "/v1/approvals", operation_id = "list_approvals", tag = OPERATOR,
    summary = "Approvals, newest first (approver, admin, secops, auditor)",
    params(
        ("state" = Option<ApprovalState>, Query, description = "Only in this state"),
        ("kind" = Option<crate::model::ApprovalKind>, Query, description = "`credential` or `provisioning`"),
        ("agent" = Option<String>, Query, description = "Only this agent's"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000"),
        ("cursor" = Option<String>, Query, description = "`Keygate-Next-Cursor` of the previous page"),
    ),
    responses((status = 200, description = "A page (`Keygate-Next-Cursor` and `Link` name the next)", body = Vec<Approval>)))]
pub async fn list(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let f: ApprovalFilter = parse_query(q.as_deref())?;
    let list = b.store.list_approvals(&f).await?;
    let next = super::next_cursor(&list, f.limit, |a| (a.created_at, &a.id));
    Ok(super::paged(
        Json(list),
        "/v1/approvals",
        q.as_deref(),
        next,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Long-poll: wait up to this many seconds for a decision.
    wait: Option<u64>,
}

/// `GET /v1/approvals/{id}[?wait=30]`: operators see the whole record and
/// its notifications; an agent sees its own approvals' status.
#[utoipa::path(get, path = "/v1/approvals/{id}", operation_id = "show_approval", tag = AGENT,
    summary = "An approval: an agent sees its own (below); an operator (approver, admin, secops, auditor) the whole `Approval` with its `notifications`",
    params(
        ("id" = String, Path, description = "The approval"),
        ("wait" = Option<u64>, Query, description = "Long-poll: answer as soon as it is decided, or after this many seconds (at most `approvals.max_wait_secs`)"),
    ),
    responses((status = 200, description = "Its status", body = AgentApprovalView)),
    security(("session" = []), ("operator" = [])))]
pub async fn show(
    State(b): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let q: ShowQuery = parse_query(q.as_deref())?;
    let wait = Duration::from_secs(q.wait.unwrap_or(0));
    match caller {
        Caller::Operator(op) => {
            op.require(READERS)?;
            let a = b.await_approval(b.approval(&id).await?, wait).await?;
            let mut notifications = b.store.notifications(&id).await?;
            // A Slack `response_url` is a capability to post into the
            // channel: no reader role gets to see it.
            for n in &mut notifications {
                redact_response_urls(&mut n.payload);
            }
            let mut body =
                serde_json::to_value(&a).map_err(|e| ApiError::bad_request(e.to_string()))?;
            body["notifications"] = json!(notifications);
            Ok(Json(body).into_response())
        }
        Caller::Agent(s) => {
            let a = b
                .await_approval(b.agent_approval(&s, &id).await?, wait)
                .await?;
            Ok(Json(agent_view(&a)).into_response())
        }
    }
}

/// `POST /v1/approvals/{id}/decision` (approver): `{"decision", "reason"}`.
#[utoipa::path(post, path = "/v1/approvals/{id}/decision", operation_id = "decide_approval", tag = OPERATOR,
    summary = "Approve or deny (approver; separation of duties applies)",
    params(("id" = String, Path, description = "The approval")),
    request_body = DecisionRequest,
    responses((status = 200, description = "The approval after the decision", body = Approval)))]
pub async fn decide(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    // The broker checks the approver role, so a refusal is audited like
    // every other refused decision.
    let req: DecisionRequest = parse_json(&body)?;
    Ok(Json(
        b.decide_approval(&op.name, &id, req, DecisionChannel::Api, None)
            .await?,
    ))
}

/// `POST /v1/approvals/{id}/redeem`: the approved credential, once.
#[utoipa::path(post, path = "/v1/approvals/{id}/redeem", operation_id = "redeem_approval", tag = AGENT,
    summary = "The approved credential, once, in the task that asked (policy is asked again)",
    params(("id" = String, Path, description = "The approval")),
    responses((status = 201, description = "The credential", body = super::agent::IssuedBody)))]
pub async fn redeem(
    State(b): State<AppState>,
    AgentSession(s): AgentSession,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    b.check_agent_rate(&s.agent.id)?;
    let issued = b.redeem_approval(&s, &id).await?;
    Ok(issued_body(&issued))
}

/// A refusal Slack's user should see; the HTTP answer still says 200 so
/// Slack does not show a generic failure, and the reason goes to the clicker
/// through `response_url`.
pub(super) fn slack_answer(ok: bool, code: &str, message: &str) -> Response {
    (
        StatusCode::OK,
        Json(json!({ "ok": ok, "error": (!ok).then_some(code), "message": message })),
    )
        .into_response()
}

/// `POST /v1/hooks/slack/interactions`: an Approve or Deny click, or an
/// Attest or Retire click on an access review reminder.
///
/// Unsigned, badly signed, stale or replayed requests get 401 and an audit
/// event; an authentic click from someone who may not decide gets 200 with
/// `ok: false` and an ephemeral explanation in Slack.
#[utoipa::path(post, path = "/v1/hooks/slack/interactions", tag = PUBLIC,
    summary = "Slack's interactivity hook (signed with the app's signing secret, v0)",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "Slack's `payload` form field"),
    responses((status = 200, description = "`{ok, error, message}`: a refused click still answers 200, explained in Slack", body = Object)))]
pub async fn slack_interaction(
    State(b): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(cfg) = b.notifier.slack() else {
        return Err(ApiError::not_found(
            "Slack is not configured on this broker",
        ));
    };
    let reject = |why: String| {
        let b = b.clone();
        async move {
            let ev = AuditEvent::new(&Actor::Unauthenticated(Some("slack".into())), "hook.slack")
                .failure(why.clone());
            b.audit_alone(ev).await?;
            Err::<Response, ApiError>(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_signature",
                why,
            ))
        }
    };
    let secret = b
        .notifier
        .secrets()
        .resolve(&cfg.signing_secret)
        .await
        .map_err(|e| crate::broker::BrokerError::Internal(format!("Slack signing secret: {e}")))?;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let signature = header("x-slack-signature");
    if let Err(e) = slack::verify(
        secrecy::ExposeSecret::expose_secret(&secret).as_bytes(),
        header("x-slack-request-timestamp"),
        signature,
        &body,
        now().unix_timestamp(),
    ) {
        return reject(e.to_string()).await;
    }
    // A valid signature is unique to its timestamp and body: seen twice is a
    // replay. Keyed on the MAC's bytes, so a re-spelling of its hex (upper
    // case) is the same request.
    let mac = signature
        .and_then(|s| s.strip_prefix("v0="))
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    let digest = hex::encode(Sha256::digest(&mac));
    let mut tx = b.store.begin().await?;
    let fresh = tx
        .record_replay(
            &digest,
            now() + time::Duration::seconds(2 * slack::MAX_AGE_SECS),
        )
        .await?;
    tx.commit().await?;
    if !fresh {
        return reject("this exact request was received before: refused as a replay".into()).await;
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a form: {e}")))?;
    let Some((_, payload)) = form.iter().find(|(k, _)| k == "payload") else {
        return Err(ApiError::bad_request("the form has no `payload` field"));
    };
    let click = slack::parse_click(payload).map_err(ApiError::bad_request)?;
    let reply = click
        .response_url
        .as_deref()
        .filter(|u| response_url_ok(u))
        .map(|u| Reply {
            response_url: u.to_owned(),
        });
    let verdict = match click.action_id.as_str() {
        slack::APPROVE_ACTION => Verdict::Approve,
        slack::DENY_ACTION => Verdict::Deny,
        reviews::ATTEST_ACTION => {
            return super::reviews::slack_click(&b, &click, reply, ReviewVerdict::Attest).await;
        }
        reviews::RETIRE_ACTION => {
            return super::reviews::slack_click(&b, &click, reply, ReviewVerdict::Retire).await;
        }
        other => {
            return Ok(slack_answer(
                false,
                "unknown_action",
                &format!("action `{other}` is not a Keygate decision"),
            ));
        }
    };
    let Some(operator) = b
        .config
        .operators
        .iter()
        .find(|o| o.slack_user_id.as_deref() == Some(click.user_id.as_str()))
    else {
        let why = format!(
            "Slack user `{}` is not mapped to a Keygate operator",
            click.user_id
        );
        let mut tx = b.store.begin().await?;
        tx.audit(
            AuditEvent::new(
                &Actor::Unauthenticated(Some(format!("slack:{}", click.user_id))),
                "approval.decision",
            )
            .details(json!({ "approval": click.value, "channel": "slack" }))
            .failure(why.clone()),
        )
        .await?;
        if let Some(r) = &reply {
            tx.insert_notification(&b.notifier.reply(&click.value, r.refused(&why)))
                .await?;
        }
        tx.commit().await?;
        b.notifier.wake();
        return Ok(slack_answer(false, "unknown_user", &why));
    };
    let req = DecisionRequest {
        decision: verdict,
        reason: Some(format!("{verdict} in Slack")),
    };
    match b
        .decide_approval(
            &operator.name,
            &click.value,
            req,
            DecisionChannel::Slack,
            reply,
        )
        .await
    {
        Ok(a) => Ok((
            StatusCode::OK,
            Json(json!({ "ok": true, "approval_id": a.id, "status": a.state })),
        )
            .into_response()),
        Err(e) => {
            let e = ApiError::from(e);
            Ok(slack_answer(false, e.code, &e.message))
        }
    }
}

/// Slack's `response_url`s are https; plain http only to this machine (tests).
fn response_url_ok(u: &str) -> bool {
    match url::Url::parse(u) {
        Ok(url) => {
            url.scheme() == "https"
                || (url.scheme() == "http"
                    && matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
        }
        Err(_) => false,
    }
}

/// Replaces every `response_url` in a notification payload, at any depth.
pub(super) fn redact_response_urls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if k == "response_url" {
                    *child = json!("[redacted]");
                } else {
                    redact_response_urls(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_response_urls),
        _ => {}
    }
}
