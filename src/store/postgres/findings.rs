//! Governance in the PostgreSQL engine: findings, and per-scope use read from
//! the leases table (no write per request).

use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use time::OffsetDateTime;

use crate::governance::{Finding, ScopeUsage};
use crate::model::unix;
use crate::store::rows::{finding_from_row, usage_from_rows};
use crate::store::{StoreError, StoreResult};

pub(super) async fn scope_usage(
    db: impl PgExecutor<'_>,
    agent_id: &str,
) -> StoreResult<Vec<ScopeUsage>> {
    // One read: per scope and source, the last use; folded per scope below.
    // The alias is `last_at`, not SQLite's `last`: LAST is a (non-reserved)
    // keyword in PostgreSQL (NULLS LAST), best not used as a name. The fold
    // only needs each scope's rows adjacent, which ORDER BY scope gives under
    // any collation.
    let rows = sqlx::query(
        "SELECT scope, source, MAX(created_at) AS last_at, COUNT(*) AS n FROM leases \
         WHERE agent_id = $1 AND state <> 'failed' GROUP BY scope, source \
         ORDER BY scope, last_at DESC",
    )
    .bind(agent_id)
    .fetch_all(db)
    .await?;
    usage_from_rows(&rows)
}

pub(super) async fn list(
    db: impl PgExecutor<'_>,
    agent_id: Option<&str>,
    open_only: bool,
) -> StoreResult<Vec<Finding>> {
    let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM findings WHERE 1=1");
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

/// Brings the agent's open finding of `f`'s kind and subject up to date
/// (detail and deadline); how many rows it touched (0 or 1).
async fn refresh(db: &mut PgConnection, f: &Finding) -> StoreResult<u64> {
    let done = sqlx::query(
        "UPDATE findings SET detail = $1, action_due_at = $2 \
         WHERE agent_id = $3 AND kind = $4 AND subject = $5 AND closed_at IS NULL",
    )
    .bind(&f.detail)
    .bind(f.action_due_at.map(unix))
    .bind(&f.agent_id)
    .bind(&f.kind)
    .bind(&f.subject)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Inserts `f` unless the agent has an open finding of that kind and
/// subject, whose detail and deadline it then brings up to date; whether it
/// was inserted.
pub(super) async fn open(db: &mut PgConnection, f: &Finding) -> StoreResult<bool> {
    if refresh(&mut *db, f).await? > 0 {
        return Ok(false);
    }
    let action = f
        .action
        .map(|a| serde_json::to_value(a).map(|v| v.as_str().unwrap_or_default().to_owned()))
        .transpose()
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // No conflict target: like SQLite's, it skips a row that collides with
    // the partial unique index findings_open (or the primary key).
    let done = sqlx::query(
        "INSERT INTO findings (id, agent_id, kind, subject, detail, opened_at, action_due_at, action) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&f.id)
    .bind(&f.agent_id)
    .bind(&f.kind)
    .bind(&f.subject)
    .bind(&f.detail)
    .bind(unix(f.opened_at))
    .bind(f.action_due_at.map(unix))
    .bind(action)
    .execute(&mut *db)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(true);
    }
    // Not inserted although the UPDATE above found no open finding: another
    // transaction (another replica) committed the same finding in between,
    // which SQLite's single writer rules out. This statement sees that row
    // (read committed), so bring it up to date as promised.
    refresh(db, f).await?;
    Ok(false)
}

pub(super) async fn close(
    db: impl PgExecutor<'_>,
    id: &str,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE findings SET closed_at = $1, close_reason = $2 \
         WHERE id = $3 AND closed_at IS NULL",
    )
    .bind(unix(now))
    .bind(reason)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn acted(
    db: impl PgExecutor<'_>,
    id: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE findings SET acted_at = $1 \
         WHERE id = $2 AND acted_at IS NULL AND closed_at IS NULL",
    )
    .bind(unix(now))
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
