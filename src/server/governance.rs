//! Governance endpoints: an agent's compliance record, findings, the
//! maturity score, and running the governance sweep now.

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
