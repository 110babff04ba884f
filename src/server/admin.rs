//! Operator endpoints: registry, leases, revocations, audit.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Operator;
use super::error::{parse_json, parse_query};
use super::openapi::OPERATOR;
use super::{ApiError, AppState};
use crate::broker::{
    AgentSpec, AgentUpdate, LiftRequest, Registered, RevocationReport, RevocationRequest,
};
use crate::config::Role;
use crate::model::{Agent, AgentStatus, FenceFilter, FenceRecord, Lease, LeaseFilter, LeaseState};
use crate::store::AuditFilter;

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

/// `POST /v1/agents` (admin).
#[utoipa::path(post, path = "/v1/agents", tag = OPERATOR,
    summary = "Register an agent (admin); held for provisioning approval when required",
    request_body = AgentSpec,
    responses(
        (status = 201, description = "The agent", body = Agent),
        (status = 202, description = "The agent, `pending`, with the approval it waits for", body = Registered),
    ))]
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
#[utoipa::path(patch, path = "/v1/agents/{id}", tag = OPERATOR,
    summary = "Change an agent (admin); a widening change waits for provisioning approval when required",
    params(("id" = String, Path, description = "The agent")),
    request_body = AgentUpdate,
    responses(
        (status = 200, description = "The agent", body = Agent),
        (status = 202, description = "The change waits for approval", body = Registered),
    ))]
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
#[utoipa::path(get, path = "/v1/agents", tag = OPERATOR,
    summary = "Agents by id (admin, secops, auditor)",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000"),
        ("cursor" = Option<String>, Query, description = "`Keygate-Next-Cursor` of the previous page"),
    ),
    responses((status = 200, description = "A page", body = Vec<Agent>)))]
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
#[utoipa::path(get, path = "/v1/agents/{id}", tag = OPERATOR,
    params(("id" = String, Path, description = "The agent")),
    responses((status = 200, description = "The agent", body = Agent)))]
pub async fn show_agent(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.agent(&id).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    reason: Option<String>,
}

/// `POST /v1/agents/{id}/{suspend|resume|decommission}`.
#[utoipa::path(post, path = "/v1/agents/{id}/{action}", tag = OPERATOR,
    summary = "Suspend (admin, secops), resume or decommission (admin) an agent; suspend and decommission revoke its leases",
    params(
        ("id" = String, Path, description = "The agent"),
        ("action" = String, Path, description = "`suspend`, `resume` or `decommission`"),
    ),
    request_body(content = Option<ActionBody>, description = "Optional: `{\"reason\"}`"),
    responses((status = 200, description = "The agent", body = Agent)))]
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
#[utoipa::path(get, path = "/v1/leases", tag = OPERATOR,
    summary = "Leases, newest first (admin, secops, auditor); never a credential",
    params(
        ("agent" = Option<String>, Query),
        ("task" = Option<String>, Query),
        ("state" = Option<LeaseState>, Query),
        ("provider" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000"),
        ("cursor" = Option<String>, Query, description = "`Keygate-Next-Cursor` of the previous page"),
    ),
    responses((status = 200, description = "A page", body = Vec<Lease>)))]
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
#[utoipa::path(post, path = "/v1/revocations", tag = OPERATOR,
    summary = "The kill switch (secops, admin): end the selected tasks and revoke their leases",
    request_body = RevocationRequest,
    responses((status = 200, description = "What it found and did", body = RevocationReport)))]
pub async fn revoke(
    State(b): State<AppState>,
    op: Operator,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Secops, Role::Admin])?;
    let req: RevocationRequest = parse_json(&body)?;
    Ok(Json(b.revoke(&op.name, req).await?))
}

/// `GET /v1/revocations/{id}?wait=` query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressQuery {
    /// Seconds to wait for every lease to be settled (default 0, at most 60).
    #[serde(default, deserialize_with = "wait_seconds")]
    wait: u64,
}

/// A `wait` that is not a whole number says what it takes (`parse_query`
/// puts it in its error).
fn wait_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let w = String::deserialize(d)?;
    w.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "`wait` is a whole number of seconds (0 to {}), not `{w}`",
            crate::broker::MAX_WAIT
        ))
    })
}

/// `GET /v1/revocations/{id}?wait=`.
#[utoipa::path(get, path = "/v1/revocations/{id}", tag = OPERATOR,
    summary = "A revocation and how far it has got",
    params(
        ("id" = String, Path, description = "The revocation"),
        ("wait" = Option<u64>, Query, description = "Answer once every lease is settled or after this many seconds (default 0: at once; at most 60)"),
    ),
    responses((status = 200, description = "Its progress", body = RevocationReport)))]
pub async fn revocation(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let q: ProgressQuery = parse_query(q.as_deref())?;
    Ok(Json(b.revocation_status(&id, q.wait).await?))
}

/// `GET /v1/fences?revocation=&provider=&active=true&limit=&cursor=`, oldest first.
#[utoipa::path(get, path = "/v1/fences", tag = OPERATOR,
    summary = "Fences emergency revocations put up, oldest first",
    params(
        ("revocation" = Option<String>, Query),
        ("provider" = Option<String>, Query),
        ("active" = Option<bool>, Query, description = "Only fences not lifted yet"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 1000"),
        ("cursor" = Option<String>, Query, description = "`Keygate-Next-Cursor` of the previous page"),
    ),
    responses((status = 200, description = "A page", body = Vec<FenceRecord>)))]
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
#[utoipa::path(post, path = "/v1/fences/{id}/lift", tag = OPERATOR,
    summary = "Lift a fence (secops, admin)",
    params(("id" = String, Path, description = "The fence")),
    request_body = LiftRequest,
    responses((status = 200, description = "The fence, lifted", body = FenceRecord)))]
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
#[utoipa::path(get, path = "/v1/audit", tag = OPERATOR,
    summary = "The audit log (auditor, admin) as JSON lines in `seq` order; `x-next-after` gives the next page's `after`",
    params(
        ("after" = Option<i64>, Query, description = "Events after this `seq`"),
        ("agent" = Option<String>, Query),
        ("task" = Option<String>, Query),
        ("action" = Option<String>, Query),
        ("limit" = Option<u32>, Query, description = "1 to 10000, default 1000"),
    ),
    responses((status = 200, description = "One event per line", content_type = "application/x-ndjson", body = String)))]
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
