//! Access reviews, the people directory, registry exclusions and agents as
//! code (plan, apply) over HTTP.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use super::auth::Operator;
use super::error::parse_json;
use super::openapi::OPERATOR;
use super::{ApiError, AppState};
use crate::config::Role;
use crate::governance::reviews::{DecisionRequest, Reviewer, Verdict};

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor, Role::Approver];

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    name: String,
    #[serde(default)]
    team: Option<String>,
    /// Days until the items are due (default `governance.review_due_days`).
    #[serde(default)]
    due_days: Option<u32>,
}

/// `POST /v1/reviews` (admin): starts a campaign.
#[utoipa::path(post, path = "/v1/reviews", operation_id = "start_review", tag = OPERATOR,
    summary = "Start an access review campaign (admin)",
    request_body = StartBody,
    responses((status = 201, description = "The campaign and its items", body = crate::governance::reviews::Started)))]
pub async fn start(
    State(b): State<AppState>,
    op: Operator,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let s: StartBody = parse_json(&body)?;
    let started = b
        .start_review(&op.actor(), &s.name, s.team, s.due_days)
        .await?;
    Ok((StatusCode::CREATED, Json(started)))
}

/// `GET /v1/reviews`: every campaign with its counts.
#[utoipa::path(get, path = "/v1/reviews", operation_id = "list_reviews", tag = OPERATOR,
    summary = "Every campaign with its counts (admin, secops, auditor, approver)",
    responses((status = 200, description = "The campaigns", body = Vec<crate::governance::reviews::CampaignView>)))]
pub async fn list(State(b): State<AppState>, op: Operator) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.review_campaigns().await?))
}

/// `GET /v1/reviews/{id or name}`: a campaign and its items.
#[utoipa::path(get, path = "/v1/reviews/{key}", operation_id = "show_review", tag = OPERATOR,
    summary = "A campaign and its items",
    params(("key" = String, Path, description = "The campaign's id or name")),
    responses((status = 200, description = "The campaign", body = crate::governance::reviews::CampaignView)))]
pub async fn show(
    State(b): State<AppState>,
    op: Operator,
    Path(key): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.review_campaign(&key).await?))
}

/// `GET /v1/reviews/items/{id}`: one item, its snapshot and decisions. Any
/// operator: a reviewer may hold no role but their email.
#[utoipa::path(get, path = "/v1/reviews/items/{id}", operation_id = "show_review_item", tag = OPERATOR,
    summary = "One review item, its snapshot and decisions (any operator: a reviewer may hold no role but their email)",
    params(("id" = String, Path, description = "The item")),
    responses((status = 200, description = "The item", body = crate::governance::reviews::ReviewItem)))]
pub async fn item(
    State(b): State<AppState>,
    _op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let item = b.review_item(&id).await?;
    // Its reminders and whether they were delivered (no `response_url`).
    let mut notifications = b.store.notifications(&item.id).await?;
    for n in &mut notifications {
        super::approvals::redact_response_urls(&mut n.payload);
    }
    let mut body = serde_json::to_value(&item).map_err(|e| ApiError::bad_request(e.to_string()))?;
    body["notifications"] = serde_json::json!(notifications);
    Ok(Json(body))
}

/// `POST /v1/reviews/items/{id}/decision`: `{"decision": "attest" |
/// "narrow" | "retire", "scopes": [...], "note": "..."}`. The assigned
/// reviewer (by email) may decide; admins and approvers may decide any item.
#[utoipa::path(post, path = "/v1/reviews/items/{id}/decision", operation_id = "decide_review_item", tag = OPERATOR,
    summary = "Attest, narrow or retire (the assigned reviewer, admins, approvers)",
    params(("id" = String, Path, description = "The item")),
    request_body = DecisionRequest,
    responses((status = 200, description = "The item after the decision", body = crate::governance::reviews::ReviewItem)))]
pub async fn decide(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let req: DecisionRequest = parse_json(&body)?;
    let who = Reviewer {
        operator: op.name.clone(),
        any_item: op
            .roles
            .iter()
            .any(|r| matches!(r, Role::Admin | Role::Approver)),
    };
    Ok(Json(b.decide_review(&who, &id, req).await?))
}

/// `GET /v1/people`: the directory with who left and when.
#[utoipa::path(get, path = "/v1/people", tag = OPERATOR,
    summary = "The people directory with who left and when",
    responses((status = 200, description = "The people", body = Vec<crate::governance::people::Person>)))]
pub async fn people(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let d = b.directory().await?;
    Ok(Json(d.all().cloned().collect::<Vec<_>>()))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExcludeBody {
    scope: String,
    reason: String,
}

fn optional_reason(body: &[u8]) -> Result<ReasonBody, ApiError> {
    if body.is_empty() {
        Ok(ReasonBody::default())
    } else {
        parse_json(body)
    }
}

/// `POST /v1/people/{email}/depart` (admin): the person left; their agents
/// need a new sponsor and their operator token stops working.
#[utoipa::path(post, path = "/v1/people/{email}/depart", tag = OPERATOR,
    summary = "Record that a person left: their agents need a new sponsor, their operator token stops working (admin)",
    params(("email" = String, Path, description = "The person")),
    request_body(content = Option<ReasonBody>, description = "Optional"),
    responses((status = 200, description = "The person, departed", body = crate::governance::people::Person)))]
pub async fn depart(
    State(b): State<AppState>,
    op: Operator,
    Path(email): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let r = optional_reason(&body)?;
    Ok(Json(b.depart_person(&op.actor(), &email, &r.reason).await?))
}

/// `POST /v1/agents/{id}/exclusions` (admin): `{"scope", "reason"}`.
#[utoipa::path(post, path = "/v1/agents/{id}/exclusions", tag = OPERATOR,
    summary = "Deny an agent a scope whatever policy says (admin)",
    params(("id" = String, Path, description = "The agent")),
    request_body = ExcludeBody,
    responses((status = 200, description = "The agent", body = crate::model::Agent)))]
pub async fn exclude(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let e: ExcludeBody = parse_json(&body)?;
    b.exclude_scope(&op.actor(), &id, &e.scope, &e.reason)
        .await?;
    Ok(Json(b.agent(&id).await?))
}

/// `DELETE /v1/agents/{id}/exclusions/{scope}` (admin): lifts it.
#[utoipa::path(delete, path = "/v1/agents/{id}/exclusions/{scope}", tag = OPERATOR,
    summary = "Lift an exclusion (admin)",
    params(("id" = String, Path, description = "The agent"), ("scope" = String, Path, description = "The scope")),
    request_body(content = Option<ReasonBody>, description = "Optional"),
    responses((status = 200, description = "The agent", body = crate::model::Agent),
        (status = 202, description = "Held for provisioning approval (`require_approval`): the agent as it is and the approval")))]
pub async fn include(
    State(b): State<AppState>,
    op: Operator,
    Path((id, scope)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let r = optional_reason(&body)?;
    let reason = if r.reason.trim().is_empty() {
        format!("lifted by {}", op.name)
    } else {
        r.reason
    };
    let held = b.include_scope(&op.actor(), &id, &scope, &reason).await?;
    let agent = b.agent(&id).await?;
    Ok(match held {
        None => (StatusCode::OK, Json(serde_json::json!(agent))),
        Some(approval) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "agent": agent, "approval": approval, "widened_scopes": [scope],
            })),
        ),
    })
}

/// `POST /v1/ascode/plan` (admin, auditor): what applying the agent files
/// would change; changes nothing.
#[utoipa::path(post, path = "/v1/ascode/plan", tag = OPERATOR,
    summary = "What applying the agent files would change; changes nothing (admin, auditor)",
    request_body = crate::ascode::apply::PlanRequest,
    responses((status = 200, description = "The plan", body = crate::ascode::apply::Plan)))]
pub async fn ascode_plan(
    State(b): State<AppState>,
    op: Operator,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin, Role::Auditor])?;
    let req: crate::ascode::apply::PlanRequest = parse_json(&body)?;
    Ok(Json(b.plan_agents(&req).await?))
}

/// `POST /v1/ascode/apply` (admin): makes the registry and the generated
/// policies match the agent files.
#[utoipa::path(post, path = "/v1/ascode/apply", tag = OPERATOR,
    summary = "Make the registry and the generated policies match the agent files (admin)",
    request_body = crate::ascode::apply::PlanRequest,
    responses((status = 200, description = "What was applied", body = crate::ascode::apply::Applied)))]
pub async fn ascode_apply(
    State(b): State<AppState>,
    op: Operator,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let req: crate::ascode::apply::PlanRequest = parse_json(&body)?;
    Ok(Json(b.apply_agents(&op.actor(), &req).await?))
}

/// An authentic Attest or Retire click on a review reminder (the signature
/// and replay checks are done): decided as the operator the Slack user maps
/// to, with the same rules as over HTTP. A refusal is audited and explained
/// to the clicker alone; a decision replaces the message with the outcome.
pub(super) async fn slack_click(
    b: &AppState,
    click: &crate::notify::slack::Click,
    reply: Option<crate::notify::Reply>,
    decision: Verdict,
) -> Result<axum::response::Response, ApiError> {
    use crate::audit::{Actor, AuditEvent};
    let item_id = click.value.as_str();
    let operator = b
        .config
        .operators
        .iter()
        .find(|o| o.slack_user_id.as_deref() == Some(click.user_id.as_str()));
    let outcome = match operator {
        None => Err((
            Actor::Unauthenticated(Some(format!("slack:{}", click.user_id))),
            "unknown_user".to_owned(),
            format!(
                "Slack user `{}` is not mapped to a Keygate operator",
                click.user_id
            ),
        )),
        Some(op) => {
            let who = Reviewer {
                operator: op.name.clone(),
                any_item: op
                    .roles
                    .iter()
                    .any(|r| matches!(r, Role::Admin | Role::Approver)),
            };
            let req = DecisionRequest {
                decision,
                scopes: Vec::new(),
                note: "in Slack".into(),
            };
            b.decide_review(&who, item_id, req).await.map_err(|e| {
                let e = ApiError::from(e);
                (
                    Actor::Operator(op.name.clone()),
                    e.code.to_owned(),
                    e.message,
                )
            })
        }
    };
    // Answers go through the outbox only for an item that exists.
    let known = b.store.review_item(item_id).await?.is_some();
    let mut tx = b.store.begin().await?;
    let answer = match outcome {
        Ok(item) => {
            if let (Some(r), Some(c)) = (
                &reply,
                b.store
                    .review_campaigns()
                    .await?
                    .into_iter()
                    .find(|c| c.id == item.campaign_id),
            ) {
                let text = crate::notify::reviews::outcome_text(&item, &c);
                let body = serde_json::json!({
                    "response_url": r.response_url,
                    "body": {
                        "replace_original": true,
                        "text": text,
                        "blocks": [crate::notify::slack::section(text.clone())],
                    },
                });
                tx.insert_notification(&b.notifier.review_reply(item_id, body))
                    .await?;
            }
            (
                StatusCode::OK,
                Json(serde_json::json!({
                    "ok": true, "review_item": item.id, "status": item.state.as_str(),
                })),
            )
                .into_response()
        }
        Err((actor, code, why)) => {
            tx.audit(
                AuditEvent::new(&actor, "review.decision_refused")
                    .details(serde_json::json!({
                        "item": crate::limits::claimed_label(item_id),
                        "decision": decision, "channel": "slack",
                    }))
                    .failure(why.clone()),
            )
            .await?;
            if let Some(r) = reply.as_ref().filter(|_| known) {
                tx.insert_notification(&b.notifier.review_reply(item_id, r.refused(&why)))
                    .await?;
            }
            super::approvals::slack_answer(false, &code, &why)
        }
    };
    tx.commit().await?;
    b.notifier.wake();
    Ok(answer)
}
