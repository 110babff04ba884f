//! An agent's rows in the SQLite engine: registered, its status changed, stepped up, updated.

use time::OffsetDateTime;

use super::{SqliteTx, corrupt};
use crate::model::{Agent, AgentStatus, unix};
use crate::store::sql::json_opt;
use crate::store::{StoreError, StoreResult};

pub(super) async fn insert_agent(tx: &mut SqliteTx, a: &Agent) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO agents (id, team, sponsor, risk_tier, environment, purpose, labels, \
         status, auth_method, jwks, created_at, updated_at, last_used_at, last_review_at, \
         delegation, federated_issuer, federated_subject, may_assert_users, max_ttl_secs) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&a.id)
    .bind(&a.team)
    .bind(&a.sponsor)
    .bind(i64::from(a.risk_tier))
    .bind(a.environment.as_str())
    .bind(&a.purpose)
    .bind(serde_json::to_string(&a.labels).map_err(corrupt)?)
    .bind(a.status.as_str())
    .bind(a.auth_method.as_str())
    .bind(serde_json::to_string(&a.jwks).map_err(corrupt)?)
    .bind(unix(a.created_at))
    .bind(unix(a.updated_at))
    .bind(a.last_used_at.map(unix))
    .bind(a.last_review_at.map(unix))
    .bind(serde_json::to_string(&a.delegation).map_err(corrupt)?)
    .bind(a.federated.as_ref().map(|f| f.issuer.clone()))
    .bind(a.federated.as_ref().map(|f| f.subject.clone()))
    .bind(a.may_assert_users)
    .bind(a.max_ttl_secs.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
    .execute(tx.tx.conn().await?)
    .await
    .map_err(|e| match StoreError::from(e) {
        StoreError::Conflict(m) if m.contains("federated") => StoreError::Conflict(format!(
            "an agent bound to that federated subject (agent `{}`)",
            a.id
        )),
        StoreError::Conflict(_) => StoreError::Conflict(format!("agent `{}`", a.id)),
        other => other,
    })?;
    Ok(())
}

pub(super) async fn set_agent_status(
    tx: &mut SqliteTx,
    id: &str,
    from: &[AgentStatus],
    to: AgentStatus,
    now: OffsetDateTime,
) -> StoreResult<Option<AgentStatus>> {
    // Read and write in one transaction on the one writer connection:
    // nothing changes the row in between.
    let Some(row) = sqlx::query("SELECT status FROM agents WHERE id = ?")
        .bind(id)
        .fetch_optional(tx.tx.conn().await?)
        .await?
    else {
        return Ok(None);
    };
    let was: AgentStatus = crate::store::rows::parse_col(&row, "status")?;
    if !from.contains(&was) {
        return Ok(None);
    }
    let suspended_from = (to == AgentStatus::Suspended).then_some(was.as_str());
    sqlx::query("UPDATE agents SET status = ?, suspended_from = ?, updated_at = ? WHERE id = ?")
        .bind(to.as_str())
        .bind(suspended_from)
        .bind(unix(now))
        .bind(id)
        .execute(tx.tx.conn().await?)
        .await?;
    Ok(Some(was))
}

pub(super) async fn set_step_up(
    tx: &mut SqliteTx,
    id: &str,
    step_up: Option<&crate::model::StepUp>,
    replacing: Option<&crate::model::StepUp>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE agents SET step_up = ?1 WHERE id = ?2 AND (?3 IS NULL OR step_up = ?3)",
    )
    .bind(json_opt(step_up)?)
    .bind(id)
    .bind(json_opt(replacing)?)
    .execute(tx.tx.conn().await?)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn update_agent(tx: &mut SqliteTx, a: &Agent) -> StoreResult<()> {
    sqlx::query(
        "UPDATE agents SET team = ?, sponsor = ?, risk_tier = ?, environment = ?, \
         purpose = ?, labels = ?, jwks = ?, last_review_at = ?, updated_at = ?, \
         delegation = ?, federated_issuer = ?, federated_subject = ?, may_assert_users = ?, \
         max_ttl_secs = ?, keys_rotated_at = ?, owner_changed_at = ? WHERE id = ?",
    )
    .bind(&a.team)
    .bind(&a.sponsor)
    .bind(i64::from(a.risk_tier))
    .bind(a.environment.as_str())
    .bind(&a.purpose)
    .bind(serde_json::to_string(&a.labels).map_err(corrupt)?)
    .bind(serde_json::to_string(&a.jwks).map_err(corrupt)?)
    .bind(a.last_review_at.map(unix))
    .bind(unix(a.updated_at))
    .bind(serde_json::to_string(&a.delegation).map_err(corrupt)?)
    .bind(a.federated.as_ref().map(|f| f.issuer.clone()))
    .bind(a.federated.as_ref().map(|f| f.subject.clone()))
    .bind(a.may_assert_users)
    .bind(a.max_ttl_secs.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
    .bind(a.keys_rotated_at.map(unix))
    .bind(a.owner_changed_at.map(unix))
    .bind(&a.id)
    .execute(tx.tx.conn().await?)
    .await?;
    Ok(())
}
