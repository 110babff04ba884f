//! Governance endpoints: an agent's compliance record, findings, the
//! maturity score, running the governance sweep now; and the policy set:
//! what is active, what a candidate would change, reloading it.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::auth::Operator;
use super::error::parse_query;
use super::openapi::OPERATOR;
use super::{ApiError, AppState};
use crate::config::Role;

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

/// `GET /v1/agents/{id}/compliance`: effective lifecycle policy, permitted
/// scopes with their last use, open issues, maturity.
#[utoipa::path(get, path = "/v1/agents/{id}/compliance", tag = OPERATOR,
    summary = "An agent's effective lifecycle policy, permitted scopes with their last use, open issues, maturity (admin, secops, auditor)",
    params(("id" = String, Path, description = "The agent")),
    responses((status = 200, description = "The compliance record", body = crate::governance::sweep::AgentCompliance)))]
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
#[utoipa::path(get, path = "/v1/registry", tag = OPERATOR,
    summary = "Seed 000's registry table, one row per agent (admin, secops, auditor)",
    responses((status = 200, description = "One row per agent", body = Vec<crate::governance::evidence::RegistryRow>)))]
pub async fn registry(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let agents = b.store.list_agents(None, None).await?;
    Ok(Json(b.registry_rows(&agents).await?))
}

/// `GET /v1/findings?agent=&open=true`.
#[utoipa::path(get, path = "/v1/findings", tag = OPERATOR,
    summary = "Governance findings (admin, secops, auditor)",
    params(("agent" = Option<String>, Query), ("open" = Option<bool>, Query, description = "Only findings not closed yet")),
    responses((status = 200, description = "The findings", body = Vec<crate::governance::Finding>)))]
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
#[utoipa::path(get, path = "/v1/maturity", tag = OPERATOR,
    summary = "Every agent's maturity level and the estate's (admin, secops, auditor)",
    responses((status = 200, description = "Levels with the criteria each needs", body = crate::governance::sweep::MaturityReport)))]
pub async fn maturity(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    Ok(Json(b.maturity().await?))
}

/// `POST /v1/governance/sweep` (admin): one sweep now.
#[utoipa::path(post, path = "/v1/governance/sweep", tag = OPERATOR,
    summary = "Run one governance sweep now (admin)",
    responses((status = 200, description = "What the sweep found, acted on and closed", body = crate::governance::sweep::SweepReport)))]
pub async fn sweep(State(b): State<AppState>, op: Operator) -> Result<impl IntoResponse, ApiError> {
    op.require(&[Role::Admin])?;
    Ok(Json(b.governance_sweep().await?))
}

/// The active policy set.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct PolicyInfo {
    /// The set's content hash (what `keygate policy` and the audit log name).
    pub hash: String,
    /// How many policies it holds.
    pub policies: usize,
    /// The directory it is read from.
    pub dir: String,
    /// What a reload does to live leases the new set no longer permits.
    pub on_change: crate::broker::OnChange,
}

/// `GET /v1/policy`: the active set's content hash and size.
#[utoipa::path(get, path = "/v1/policy", tag = OPERATOR,
    summary = "The active policy set: content hash, size, directory, on_change (admin, secops, auditor)",
    responses((status = 200, description = "The active set", body = PolicyInfo)))]
pub async fn policy(
    State(b): State<AppState>,
    op: Operator,
) -> Result<impl IntoResponse, ApiError> {
    op.require(READERS)?;
    let p = b.policy.current();
    Ok(Json(PolicyInfo {
        hash: p.hash().to_owned(),
        policies: p.len(),
        dir: b.config.policy.dir.display().to_string(),
        on_change: b.config.policy.on_change,
    }))
}

/// `POST /v1/policy/diff` (admin): `{"files": {name: content}}` → who gains
/// and loses what, and the live leases the candidate would not permit.
#[utoipa::path(post, path = "/v1/policy/diff", tag = OPERATOR,
    summary = "What a candidate policy set would change: who gains and loses what, live leases it would not permit (admin)",
    request_body = crate::broker::PolicyFiles,
    responses((status = 200, description = "The diff", body = crate::broker::PolicyDiff)))]
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
#[utoipa::path(post, path = "/v1/policy/reload", tag = OPERATOR,
    summary = "Reload the policy directory (or the body's `files`), active at once; a widening set may be held for approval (admin)",
    request_body(content = Option<crate::broker::PolicyFiles>, description = "Optional: without `files`, the policy directory"),
    responses(
        (status = 200, description = "Active; what it revoked or would revoke", body = crate::broker::PolicyReload),
        (status = 202, description = "Held for approval", body = crate::broker::PolicyReload),
    ))]
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
    crate::governance::evidence::parse_instant(s, end_of_day).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{name}` must be a day (2026-10-01) or an RFC 3339 instant"
        ))
    })
}

/// `GET /v1/evidence?from=&to=` (auditor, admin): the evidence pack for the
/// period as JSON (`keygate evidence` writes it as files).
#[utoipa::path(get, path = "/v1/evidence", tag = OPERATOR,
    summary = "The auditor's evidence pack for a period, as JSON (auditor, admin)",
    params(
        ("from" = String, Query, description = "A day (`2026-10-01`) or an RFC 3339 instant"),
        ("to" = String, Query, description = "A day (its end) or an RFC 3339 instant"),
    ),
    responses((status = 200, description = "The evidence pack", body = crate::governance::evidence::EvidencePack)))]
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
