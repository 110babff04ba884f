//! Governance, part two, in the PostgreSQL engine: departures from the people
//! directory, registry exclusions, review campaigns and their items.

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use time::OffsetDateTime;

use crate::governance::people::Departure;
use crate::governance::reviews::{Campaign, ReviewFilter, ReviewItem};
use crate::model::{Exclusion, unix};
use crate::store::rows::{campaign_from_row, item_from_row, json_col, time_col};
use crate::store::{StoreError, StoreResult};

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub(super) async fn departures(db: impl PgExecutor<'_>) -> StoreResult<Vec<Departure>> {
    sqlx::query("SELECT * FROM departures ORDER BY departed_at, email")
        .fetch_all(db)
        .await?
        .iter()
        .map(|r| {
            Ok(Departure {
                email: r.try_get("email")?,
                departed_at: time_col(r, "departed_at")?,
                actor: r.try_get("actor")?,
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}

pub(super) async fn record_departure(db: impl PgExecutor<'_>, d: &Departure) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO departures (email, departed_at, actor, reason) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&d.email)
    .bind(unix(d.departed_at))
    .bind(&d.actor)
    .bind(&d.reason)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn put_exclusion(
    db: &mut PgConnection,
    agent_id: &str,
    scope: &str,
    exclusion: &Exclusion,
) -> StoreResult<bool> {
    // FOR UPDATE: the map is read, changed here and written back, and
    // another replica's transaction could change it in between (SQLite's
    // single writer rules that out); the row lock holds it until commit.
    // Not FOR NO KEY UPDATE, although no key changes: FOR UPDATE also makes
    // a concurrent lease insert's foreign-key check on the agent wait for
    // this commit, so the read of the agent after that lease commits sees
    // the exclusion and revokes it. Without that wait a lease committed
    // between this scan of live leases and this commit stayed live in the
    // excluded scope (`policy_reload_races` caught it).
    let Some(row) = sqlx::query("SELECT excluded_scopes FROM agents WHERE id = $1 FOR UPDATE")
        .bind(agent_id)
        .fetch_optional(&mut *db)
        .await?
    else {
        return Ok(false);
    };
    let mut map: BTreeMap<String, Exclusion> = json_col(&row, "excluded_scopes")?;
    let standing = map.get(scope).is_some_and(|e| e.lifted_at.is_none());
    let changed = standing == exclusion.lifted_at.is_some();
    if changed {
        map.insert(scope.to_owned(), exclusion.clone());
        sqlx::query("UPDATE agents SET excluded_scopes = $1 WHERE id = $2")
            .bind(serde_json::to_string(&map).map_err(corrupt)?)
            .bind(agent_id)
            .execute(db)
            .await?;
    }
    Ok(changed)
}

pub(super) async fn mark_reviewed(
    db: impl PgExecutor<'_>,
    agent_id: &str,
    at: OffsetDateTime,
) -> StoreResult<()> {
    sqlx::query("UPDATE agents SET last_review_at = $1, updated_at = $1 WHERE id = $2")
        .bind(unix(at))
        .bind(agent_id)
        .execute(db)
        .await?;
    Ok(())
}

pub(super) async fn campaigns(db: impl PgExecutor<'_>) -> StoreResult<Vec<Campaign>> {
    sqlx::query("SELECT * FROM review_campaigns ORDER BY created_at DESC, id DESC")
        .fetch_all(db)
        .await?
        .iter()
        .map(campaign_from_row)
        .collect()
}

pub(super) async fn items(
    db: impl PgExecutor<'_>,
    f: &ReviewFilter,
) -> StoreResult<Vec<ReviewItem>> {
    let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM review_items WHERE 1=1");
    if let Some(c) = &f.campaign_id {
        q.push(" AND campaign_id = ").push_bind(c.clone());
    }
    if let Some(a) = &f.agent_id {
        q.push(" AND agent_id = ").push_bind(a.clone());
    }
    if f.open_only {
        q.push(" AND state = 'open'");
    }
    q.push(" ORDER BY agent_id, id LIMIT 100000");
    q.build()
        .fetch_all(db)
        .await?
        .iter()
        .map(item_from_row)
        .collect()
}

pub(super) async fn item(db: impl PgExecutor<'_>, id: &str) -> StoreResult<Option<ReviewItem>> {
    sqlx::query("SELECT * FROM review_items WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?
        .as_ref()
        .map(item_from_row)
        .transpose()
}

pub(super) async fn insert_campaign(db: impl PgExecutor<'_>, c: &Campaign) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO review_campaigns (id, name, team, created_at, created_by, due_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&c.id)
    .bind(&c.name)
    .bind(&c.team)
    .bind(unix(c.created_at))
    .bind(&c.created_by)
    .bind(unix(c.due_at))
    .execute(db)
    .await
    .map_err(|e| match StoreError::from(e) {
        StoreError::Conflict(_) => StoreError::Conflict(format!("review campaign `{}`", c.name)),
        other => other,
    })?;
    Ok(())
}

pub(super) async fn insert_item(db: impl PgExecutor<'_>, i: &ReviewItem) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO review_items (id, campaign_id, agent_id, reviewer, attestations, snapshot, \
         state, decisions, decided_at, escalated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&i.id)
    .bind(&i.campaign_id)
    .bind(&i.agent_id)
    .bind(&i.reviewer)
    .bind(i64::from(i.attestations))
    .bind(serde_json::to_string(&i.snapshot).map_err(corrupt)?)
    .bind(i.state.as_str())
    .bind(serde_json::to_string(&i.decisions).map_err(corrupt)?)
    .bind(i.decided_at.map(unix))
    .bind(i.escalated_at.map(unix))
    .execute(db)
    .await?;
    Ok(())
}

pub(super) async fn save_item(db: impl PgExecutor<'_>, i: &ReviewItem) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE review_items SET state = $1, decisions = $2, decided_at = $3, escalated_at = $4, \
         reviewer = $5 WHERE id = $6 AND state = 'open'",
    )
    .bind(i.state.as_str())
    .bind(serde_json::to_string(&i.decisions).map_err(corrupt)?)
    .bind(i.decided_at.map(unix))
    .bind(i.escalated_at.map(unix))
    .bind(&i.reviewer)
    .bind(&i.id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}
