//! Governance endpoints: an agent's compliance record, findings, the
//! maturity score, running the governance sweep now; and the policy set:
//! what is active, what a candidate would change, reloading it.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::auth::Operator;
use super::error::parse_query;
use super::{ApiError, AppState};
use crate::config::Role;

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

/// `GET /v1/agents/{id}/compliance`: effective lifecycle policy, permitted
/// scopes with their last use, open issues, maturity.
pub async fn agent_compliance(
    State(b): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let agent = b.agent(&id).await?;
    Ok(Json(b.compliance(&agent).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingsQuery {
    agent: Option<String>,
    /// Only findings not closed yet.
    #[serde(default)]
    open: bool,
}

/// `GET /v1/registry`: seed 000's registry table, one row per agent.
pub async fn registry(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let agents = b.store.list_agents(None, None).await?;
    Ok(Json(b.registry_rows(&agents).await?))
}

/// `GET /v1/findings?agent=&open=true`.
pub async fn findings(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let f: FindingsQuery = parse_query(q.as_deref())?;
    Ok(Json(b.store.findings(f.agent.as_deref(), f.open).await?))
}

/// `GET /v1/maturity`: every agent's level and the estate's.
pub async fn maturity(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.maturity().await?))
}

/// `POST /v1/governance/sweep` (admin): one sweep now.
pub async fn sweep(State(b): State<AppState>, op: Operator) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    Ok(Json(b.governance_sweep().await?))
}

/// `GET /v1/policy`: the active set's content hash and size.
pub async fn policy(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let p = b.policy.current();
    Ok(Json(serde_json::json!({
        "hash": p.hash(), "policies": p.len(), "dir": b.config.policy.dir,
        "on_change": b.config.policy.on_change,
    })))
}

/// `POST /v1/policy/diff` (admin): `{"files": {name: content}}` → who gains
/// and loses what, and the live leases the candidate would not permit.
pub async fn policy_diff(
    State(b): State<AppState>,
    op: Operator,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let files: crate::broker::PolicyFiles = super::error::parse_json(&body)?;
    if files.files.is_none() {
        return Err(ApiError::bad_request(
            "`files` is required: the candidate set as {\"file.cedar\": \"content\", ...}",
        ));
    }
    Ok(Json(b.policy_diff(&files).await?))
}

/// `POST /v1/policy/reload` (admin): the policy directory again (or the
/// body's `files`), active at once; what it revoked or would revoke.
pub async fn policy_reload(
    State(b): State<AppState>,
    op: Operator,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    let files: crate::broker::PolicyFiles = if body.is_empty() {
        crate::broker::PolicyFiles::default()
    } else {
        super::error::parse_json(&body)?
    };
    let r = b.reload_policy(&op.actor(), &files).await?;
    let status = if r.held.is_some() {
        axum::http::StatusCode::ACCEPTED
    } else {
        axum::http::StatusCode::OK
    };
    Ok((status, Json(r)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceQuery {
    from: String,
    to: String,
}

/// `2026-10-01` (a day: its start, or for `to` the end of it) or an RFC
/// 3339 instant.
fn instant(s: &str, end_of_day: bool, name: &str) -> Result<time::OffsetDateTime, ApiError> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let day = time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]"))
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{name}` must be a day (2026-10-01) or an RFC 3339 instant"
            ))
        })?;
    let start = day.midnight().assume_utc();
    Ok(if end_of_day {
        start + time::Duration::days(1)
    } else {
        start
    })
}

/// `GET /v1/evidence?from=&to=` (auditor, admin): the evidence pack for the
/// period as JSON (`keygate evidence` writes it as files).
pub async fn evidence(
    State(b): State<AppState>,
    op: Operator,
    RawQuery(q): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Auditor, Role::Admin])?;
    let q: EvidenceQuery = parse_query(q.as_deref())?;
    let (from, to) = (
        instant(&q.from, false, "from")?,
        instant(&q.to, true, "to")?,
    );
    if from >= to {
        return Err(ApiError::bad_request("`from` must be before `to`"));
    }
    Ok(Json(b.evidence(from, to).await?))
}
