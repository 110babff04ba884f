//! Governance in the SQLite engine: findings, and per-scope use read from
//! the leases table (no write per request).

use sqlx::{QueryBuilder, Sqlite, SqliteExecutor};
use time::OffsetDateTime;

use crate::governance::{Finding, ScopeUsage};
use crate::model::unix;
use crate::store::rows::{finding_from_row, usage_from_rows};
use crate::store::{StoreError, StoreResult};

pub(super) async fn scope_usage(
    db: impl SqliteExecutor<'_>,
    agent_id: &str,
) -> StoreResult<Vec<ScopeUsage>> {
    // One read: per scope and source, the last use; folded per scope below.
    let rows = sqlx::query(
        "SELECT scope, source, MAX(created_at) AS last_at, COUNT(*) AS n FROM leases \
         WHERE agent_id = ? AND state != 'failed' GROUP BY scope, source \
         ORDER BY scope, last_at DESC",
    )
    .bind(agent_id)
    .fetch_all(db)
    .await?;
    usage_from_rows(&rows)
}

pub(super) async fn list(
    db: impl SqliteExecutor<'_>,
    agent_id: Option<&str>,
    open_only: bool,
) -> StoreResult<Vec<Finding>> {
    let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM findings WHERE 1=1");
    if let Some(a) = agent_id {
        q.push(" AND agent_id = ").push_bind(a.to_owned());
    }
    if open_only {
        q.push(" AND closed_at IS NULL");
    }
    q.push(" ORDER BY opened_at, id LIMIT 10000");
    q.build()
        .fetch_all(db)
        .await?
        .iter()
        .map(finding_from_row)
        .collect()
}

/// Inserts `f` unless the agent has an open finding of that kind and
/// subject, whose detail and deadline it then brings up to date; whether it
/// was inserted.
pub(super) async fn open(db: &mut sqlx::SqliteConnection, f: &Finding) -> StoreResult<bool> {
    let refreshed = sqlx::query(
        "UPDATE findings SET detail = ?, action_due_at = ? \
         WHERE agent_id = ? AND kind = ? AND subject = ? AND closed_at IS NULL",
    )
    .bind(&f.detail)
    .bind(f.action_due_at.map(unix))
    .bind(&f.agent_id)
    .bind(&f.kind)
    .bind(&f.subject)
    .execute(&mut *db)
    .await?;
    if refreshed.rows_affected() > 0 {
        return Ok(false);
    }
    let action = f
        .action
        .map(|a| serde_json::to_value(a).map(|v| v.as_str().unwrap_or_default().to_owned()))
        .transpose()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let done = sqlx::query(
        "INSERT INTO findings (id, agent_id, kind, subject, detail, opened_at, action_due_at, action) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&f.id)
    .bind(&f.agent_id)
    .bind(&f.kind)
    .bind(&f.subject)
    .bind(&f.detail)
    .bind(unix(f.opened_at))
    .bind(f.action_due_at.map(unix))
    .bind(action)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn close(
    db: impl SqliteExecutor<'_>,
    id: &str,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE findings SET closed_at = ?, close_reason = ? WHERE id = ? AND closed_at IS NULL",
    )
    .bind(unix(now))
    .bind(reason)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn acted(
    db: impl SqliteExecutor<'_>,
    id: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE findings SET acted_at = ? WHERE id = ? AND acted_at IS NULL AND closed_at IS NULL",
    )
    .bind(unix(now))
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
