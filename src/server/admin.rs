//! Operator endpoints: registry, leases, revocations, audit.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Operator;
use super::error::{parse_json, parse_query};
use super::{ApiError, AppState};
use crate::broker::{AgentSpec, AgentUpdate, LiftRequest, Registered, RevocationRequest};
use crate::config::Role;
use crate::model::{AgentStatus, FenceFilter, LeaseFilter};
use crate::store::AuditFilter;

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

/// `POST /v1/agents` (admin).
pub async fn register(
    State(b): State<AppState>,
    op: Operator,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let spec: AgentSpec = parse_json(&body)?;
    let done = b.register_agent(&op.actor(), spec).await?;
    Ok(held_or(done, StatusCode::CREATED))
}

/// 202 with the agent and its approval when a change waits for sign-off;
/// otherwise `status` with the agent.
fn held_or(done: Registered, status: StatusCode) -> Response {
    if done.approval.is_some() {
        (StatusCode::ACCEPTED, Json(serde_json::json!(done))).into_response()
    } else {
        (status, Json(done.agent)).into_response()
    }
}

/// `PATCH /v1/agents/{id}` (admin): change attributes. A change that makes
/// more scopes reachable waits for provisioning approval when required.
pub async fn update_agent(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    op.require(&[Role::Admin])?;
    let update: AgentUpdate = parse_json(&body)?;
    let done = b.update_agent(&op.actor(), &id, update).await?;
    Ok(held_or(done, StatusCode::OK))
}

/// A page of a list ordered by id.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdPage {
    limit: Option<u32>,
    cursor: Option<String>,
}

/// `GET /v1/agents?limit=&cursor=`, ordered by id.
pub async fn list_agents(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let p: IdPage = parse_query(q.as_deref())?;
    let size = crate::model::page_size(p.limit);
    let agents = b.store.list_agents(p.cursor.as_deref(), Some(size)).await?;
    let next = (agents.len() == size as usize)
        .then(|| agents.last().map(|a| a.id.clone()))
        .flatten();
    Ok(super::paged(Json(agents), "/v1/agents", q.as_deref(), next))
}

/// `GET /v1/agents/{id}`.
pub async fn show_agent(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.agent(&id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    reason: Option<String>,
}

/// `POST /v1/agents/{id}/{suspend|resume|decommission}`.
pub async fn agent_action(
    State(b): State<AppState>,
    op: Operator,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let (to, roles): (AgentStatus, &[Role]) = match action.as_str() {
        "suspend" => (AgentStatus::Suspended, &[Role::Admin, Role::Secops]),
        "resume" => (AgentStatus::Active, &[Role::Admin]),
        "decommission" => (AgentStatus::Decommissioned, &[Role::Admin]),
        other => {
            return Err(ApiError::not_found(format!(
                "no agent action `{other}` (use suspend, resume or decommission)"
            )));
        }
    };
    op.require(roles)?;
    // The body is optional: `{"reason": "..."}` or nothing.
    let parsed: ActionBody = if body.is_empty() {
        ActionBody::default()
    } else {
        parse_json(&body)?
    };
    let reason = parsed
        .reason
        .unwrap_or_else(|| format!("{action} by {}", op.name));
    Ok(Json(
        b.set_agent_status(&op.actor(), &id, to, &reason).await?,
    ))
}

/// `GET /v1/leases?agent=&task=&state=&provider=&limit=`.
pub async fn list_leases(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let f: LeaseFilter = parse_query(q.as_deref())?;
    let leases = b.store.list_leases(&f).await?;
    let next = super::next_cursor(&leases, f.limit, |l| (l.created_at, &l.id));
    Ok(super::paged(Json(leases), "/v1/leases", q.as_deref(), next))
}

/// `POST /v1/revocations` (secops, admin).
pub async fn revoke(
    State(b): State<AppState>,
    op: Operator,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Secops, Role::Admin])?;
    let req: RevocationRequest = parse_json(&body)?;
    Ok(Json(b.revoke(&op.name, req).await?))
}

/// `GET /v1/revocations/{id}`.
pub async fn revocation(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.revocation_status(&id).await?))
}

/// `GET /v1/fences?revocation=&provider=&active=true&limit=&cursor=`, oldest first.
pub async fn list_fences(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let mut f: FenceFilter = parse_query(q.as_deref())?;
    f.limit = Some(crate::model::page_size(f.limit));
    let fences = b.fences(&f).await?;
    let next = super::next_cursor(&fences, f.limit, |f| (f.created_at, &f.id));
    Ok(super::paged(Json(fences), "/v1/fences", q.as_deref(), next))
}

/// `POST /v1/fences/{id}/lift` (secops, admin): `{"reason": "..."}`.
pub async fn lift_fence(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Secops, Role::Admin])?;
    let req: LiftRequest = parse_json(&body)?;
    Ok(Json(b.lift_fence(&op.name, &id, req).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    after: i64,
    agent: Option<String>,
    task: Option<String>,
    action: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/audit`: JSON lines in `seq` order, one page at a time. The
/// `x-next-after` header gives the `after` value for the next page.
pub async fn audit(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    op.require(&[Role::Auditor, Role::Admin])?;
    let q: AuditQuery = parse_query(q.as_deref())?;
    let filter = AuditFilter {
        after_seq: q.after,
        agent: q.agent,
        task: q.task,
        action: q.action,
        limit: q.limit.unwrap_or(1000).clamp(1, 10_000),
    };
    let events = b.store.audit_events(&filter).await?;
    let mut body = String::new();
    for ev in &events {
        body.push_str(
            &serde_json::to_string(ev).map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
        body.push('\n');
    }
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if let Some(last) = events.last()
        && let Ok(v) = HeaderValue::from_str(&last.seq.to_string())
    {
        h.insert("x-next-after", v);
    }
    Ok(resp)
}
