//! Incidents continuous validation opened: list, read, resolve.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::auth::Operator;
use super::error::{parse_json, parse_query};
use super::openapi::OPERATOR;
use super::{ApiError, AppState};
use crate::config::Role;
use crate::validation::{Incident, IncidentState};

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentsQuery {
    agent: Option<String>,
    /// Only incidents not resolved yet.
    #[serde(default)]
    open: bool,
}

/// `GET /v1/incidents?agent=&open=true`, newest first.
#[utoipa::path(get, path = "/v1/incidents", operation_id = "list_incidents", tag = OPERATOR,
    summary = "Incidents continuous validation opened, newest first (admin, secops, auditor)",
    params(
        ("agent" = Option<String>, Query, description = "Only this agent's"),
        ("open" = Option<bool>, Query, description = "Only those not resolved yet"),
    ),
    responses((status = 200, description = "The incidents", body = Vec<Incident>)))]
pub async fn list(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let q: IncidentsQuery = parse_query(q.as_deref())?;
    let mut list = b.incidents(q.agent.as_deref()).await?;
    if q.open {
        list.retain(|i| i.state == IncidentState::Open);
    }
    Ok(Json(list))
}

/// `GET /v1/incidents/{id}`.
#[utoipa::path(get, path = "/v1/incidents/{id}", operation_id = "show_incident", tag = OPERATOR,
    params(("id" = String, Path, description = "The incident")),
    responses((status = 200, description = "The incident", body = Incident)))]
pub async fn show(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.incident(&id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// Why (recorded in the audit log).
    reason: String,
}

/// `POST /v1/incidents/{id}/resolve` (secops, admin).
#[utoipa::path(post, path = "/v1/incidents/{id}/resolve", operation_id = "resolve_incident", tag = OPERATOR,
    summary = "Close an incident (secops, admin); a suspended agent stays suspended until resumed",
    params(("id" = String, Path, description = "The incident")),
    request_body = ResolveBody,
    responses((status = 200, description = "The incident, resolved", body = Incident)))]
pub async fn resolve(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Secops, Role::Admin])?;
    let req: ResolveBody = parse_json(&body)?;
    Ok(Json(
        b.resolve_incident(&op.actor(), &id, &req.reason).await?,
    ))
}
