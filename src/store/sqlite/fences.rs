//! Fences in the SQLite engine.

use sqlx::{QueryBuilder, Sqlite, SqliteExecutor};
use time::OffsetDateTime;

use crate::model::{FenceFilter, FenceRecord, unix};
use crate::store::rows::fence_from_row;
use crate::store::{StoreError, StoreResult};

pub(super) async fn get(db: impl SqliteExecutor<'_>, id: &str) -> StoreResult<Option<FenceRecord>> {
    sqlx::query("SELECT * FROM fences WHERE id = ?")
        .bind(id)
        .fetch_optional(db)
        .await?
        .map(|r| fence_from_row(&r))
        .transpose()
}

pub(super) async fn list(
    db: impl SqliteExecutor<'_>,
    f: &FenceFilter,
) -> StoreResult<Vec<FenceRecord>> {
    let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM fences WHERE 1=1");
    if let Some(r) = &f.revocation {
        q.push(" AND revocation_id = ").push_bind(r.clone());
    }
    if let Some(p) = &f.provider {
        q.push(" AND provider = ").push_bind(p.clone());
    }
    if f.active {
        q.push(" AND lifted_at IS NULL");
    }
    if let Some(t) = f.moot_at {
        q.push(" AND expires_at <= ").push_bind(unix(t));
    }
    if let Some(c) = &f.cursor {
        let c = crate::model::Cursor::parse(c).map_err(StoreError::Invalid)?;
        q.push(" AND (created_at > ")
            .push_bind(c.created_at)
            .push(" OR (created_at = ")
            .push_bind(c.created_at)
            .push(" AND id > ")
            .push_bind(c.id)
            .push("))");
    }
    q.push(" ORDER BY created_at, id LIMIT ")
        .push_bind(f.limit.map_or(-1, i64::from));
    q.build()
        .fetch_all(db)
        .await?
        .iter()
        .map(fence_from_row)
        .collect()
}

pub(super) async fn insert(db: impl SqliteExecutor<'_>, f: &FenceRecord) -> StoreResult<()> {
    let handle =
        serde_json::to_string(&f.handle).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO fences (id, revocation_id, provider, target, name, agent, description, \
         handle, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&f.id)
    .bind(&f.revocation_id)
    .bind(&f.provider)
    .bind(&f.target)
    .bind(&f.name)
    .bind(&f.agent)
    .bind(&f.description)
    .bind(handle)
    .bind(unix(f.created_at))
    .bind(f.expires_at.map(unix))
    .execute(db)
    .await?;
    Ok(())
}

pub(super) async fn lift(
    db: impl SqliteExecutor<'_>,
    id: &str,
    by: &str,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE fences SET lifted_at = ?, lifted_by = ?, lift_reason = ? \
         WHERE id = ? AND lifted_at IS NULL",
    )
    .bind(unix(now))
    .bind(by)
    .bind(reason)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
