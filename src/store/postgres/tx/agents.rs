//! An agent's rows in the PostgreSQL engine: registered, its status changed, stepped up, updated.

use time::OffsetDateTime;

use super::{PostgresTx, corrupt, settle};
use crate::model::{Agent, AgentStatus, unix};
use crate::store::rows::parse_col;
use crate::store::sql::json_opt;
use crate::store::{StoreError, StoreResult};

pub(super) async fn insert_agent(tx: &mut PostgresTx, a: &Agent) -> StoreResult<()> {
    let insert = sqlx::query(
        "INSERT INTO agents (id, team, sponsor, risk_tier, environment, purpose, labels, \
         status, auth_method, jwks, created_at, updated_at, last_used_at, last_review_at, \
         delegation, federated_issuer, federated_subject, may_assert_users, max_ttl_secs) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19)",
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
    .bind(a.max_ttl_secs.map(|n| i64::try_from(n).unwrap_or(i64::MAX)));
    let mut sp = sqlx::Connection::begin(tx.conn()).await?;
    let done = insert.execute(&mut *sp).await.map_err(StoreError::from);
    settle(sp, done).await.map_err(|e| match e {
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
    tx: &mut PostgresTx,
    id: &str,
    from: &[AgentStatus],
    to: AgentStatus,
    now: OffsetDateTime,
) -> StoreResult<Option<AgentStatus>> {
    // The row stays locked until commit: a concurrent change on another
    // replica, or a task open, waits and then sees this one. Not `FOR
    // UPDATE`: no key changes, so a lease's foreign-key check (`FOR KEY
    // SHARE`) does not wait for it, which would deadlock with the kill
    // switch ending that lease's task next.
    let Some(row) = sqlx::query("SELECT status FROM agents WHERE id = $1 FOR NO KEY UPDATE")
        .bind(id)
        .fetch_optional(tx.conn())
        .await?
    else {
        return Ok(None);
    };
    let was: AgentStatus = parse_col(&row, "status")?;
    if !from.contains(&was) {
        return Ok(None);
    }
    let suspended_from = (to == AgentStatus::Suspended).then_some(was.as_str());
    sqlx::query(
        "UPDATE agents SET status = $1, suspended_from = $2, updated_at = $3 WHERE id = $4",
    )
    .bind(to.as_str())
    .bind(suspended_from)
    .bind(unix(now))
    .bind(id)
    .execute(tx.conn())
    .await?;
    Ok(Some(was))
}

pub(super) async fn set_step_up(
    tx: &mut PostgresTx,
    id: &str,
    step_up: Option<&crate::model::StepUp>,
    replacing: Option<&crate::model::StepUp>,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE agents SET step_up = $1 WHERE id = $2 AND ($3::text IS NULL OR step_up = $3)",
    )
    .bind(json_opt(step_up)?)
    .bind(id)
    .bind(json_opt(replacing)?)
    .execute(tx.conn())
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn update_agent(tx: &mut PostgresTx, a: &Agent) -> StoreResult<()> {
    sqlx::query(
        "UPDATE agents SET team = $1, sponsor = $2, risk_tier = $3, environment = $4, \
         purpose = $5, labels = $6, jwks = $7, last_review_at = $8, updated_at = $9, \
         delegation = $10, federated_issuer = $11, federated_subject = $12, \
         may_assert_users = $13, max_ttl_secs = $14, keys_rotated_at = $15, \
         owner_changed_at = $16 WHERE id = $17",
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
    .execute(tx.conn())
    .await?;
    Ok(())
}
