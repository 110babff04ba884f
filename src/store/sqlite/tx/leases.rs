//! A lease's life in the SQLite engine: written ahead, issued, renewed, queued for revocation, finished; expiry and orphans.

use time::OffsetDateTime;

use super::super::batch::push_lease_inserts;
use super::{SqliteTx, corrupt};
use crate::model::{Lease, LeaseState, Revocability, unix};
use crate::store::rows::lease_from_row;
use crate::store::sql::push_selector;
use crate::store::{LeaseInsert, LeaseSelector, StoreError, StoreResult};
use sqlx::{QueryBuilder, Row, Sqlite};

pub(super) async fn insert_lease(tx: &mut SqliteTx, l: &Lease) -> StoreResult<LeaseInsert> {
    // One trip, usually the transaction's first: it opens the savepoint
    // (`WriteTx::trip`) and writes the lease with the batcher's statement.
    let mut trip = tx.tx.trip();
    push_lease_inserts(&mut trip.q, [l])?;
    let r = trip.q.build().fetch_optional(&mut tx.tx.state.conn).await;
    let row = trip.done(&mut tx.tx, r).await?;
    Ok(match row {
        None => LeaseInsert::TaskEnded,
        Some(r) => LeaseInsert::Written {
            excluded: Some(r.try_get::<bool, _>("excluded")?),
        },
    })
}

pub(super) async fn live_lease_count(
    tx: &mut SqliteTx,
    agent: &str,
    scope: Option<&str>,
    now: OffsetDateTime,
) -> StoreResult<u64> {
    // The one writer runs this transaction alone: nothing lands between
    // this count and the insert that follows it.
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM leases WHERE agent_id = ? AND state IN ('pending', 'active') \
         AND expires_at > ? AND (? IS NULL OR scope = ?)",
    )
    .bind(agent)
    .bind(unix(now))
    .bind(scope)
    .bind(scope)
    .fetch_one(tx.tx.conn().await?)
    .await?;
    Ok(n.max(0) as u64)
}

pub(super) async fn record_issued(
    tx: &mut SqliteTx,
    id: &str,
    handle: &serde_json::Value,
    revocability: Revocability,
    expires_at: OffsetDateTime,
) -> StoreResult<Option<LeaseState>> {
    let row = sqlx::query(
        "UPDATE leases SET handle = ?, revocability = ?, expires_at = ?, \
         state = CASE WHEN state = 'pending' THEN 'active' ELSE state END \
         WHERE id = ? AND state IN ('pending', 'revoking') RETURNING state",
    )
    .bind(serde_json::to_string(handle).map_err(corrupt)?)
    .bind(revocability.as_str())
    .bind(unix(expires_at))
    .bind(id)
    .fetch_optional(tx.tx.conn().await?)
    .await?;
    row.map(|r| crate::store::rows::parse_col::<LeaseState>(&r, "state"))
        .transpose()
}

pub(super) async fn renew_lease(
    tx: &mut SqliteTx,
    id: &str,
    expires_at: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query("UPDATE leases SET expires_at = ? WHERE id = ? AND state = 'active'")
        .bind(unix(expires_at))
        .bind(id)
        .execute(tx.tx.conn().await?)
        .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn mark_failed(
    tx: &mut SqliteTx,
    id: &str,
    error: &str,
    now: OffsetDateTime,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE leases SET state = 'failed', last_error = ?, ended_at = ? \
         WHERE id = ? AND state = 'pending'",
    )
    .bind(error)
    .bind(unix(now))
    .bind(id)
    .execute(tx.tx.conn().await?)
    .await?;
    Ok(())
}

pub(super) async fn queue_revocations(
    tx: &mut SqliteTx,
    sel: &LeaseSelector,
    reason: &str,
    revocation_id: Option<&str>,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    let mut earlier = Vec::new();
    // Leases of the selection already being revoked count towards an
    // emergency revocation's progress too: one queued without a revocation
    // (a task's end, a delegated task ending with its parent) takes its id;
    // one an earlier revocation queued keeps that id and counts for both.
    // Read before this call queues more, so only those are walked.
    if let Some(rid) = revocation_id {
        let mut q2 = QueryBuilder::<Sqlite>::new("UPDATE leases SET revocation_id = ");
        q2.push_bind(rid.to_owned())
            .push(" WHERE state = 'revoking' AND revocation_id IS NULL");
        if push_revocation_selection(&mut q2, sel)? {
            q2.push(" RETURNING id");
            for r in q2.build().fetch_all(tx.tx.conn().await?).await? {
                earlier.push(r.try_get::<String, _>("id")?);
            }
            let mut q3 = QueryBuilder::<Sqlite>::new(
                "INSERT INTO revocation_overlaps (revocation_id, lease_id) SELECT ",
            );
            q3.push_bind(rid.to_owned())
                .push(", id FROM leases WHERE state = 'revoking' AND revocation_id != ")
                .push_bind(rid.to_owned());
            push_revocation_selection(&mut q3, sel)?;
            q3.push(" ON CONFLICT DO NOTHING RETURNING lease_id");
            for r in q3.build().fetch_all(tx.tx.conn().await?).await? {
                earlier.push(r.try_get::<String, _>("lease_id")?);
            }
        }
    }
    let mut q = QueryBuilder::<Sqlite>::new(
        "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
         next_attempt_at = ",
    );
    q.push_bind(unix(now))
        .push(", end_reason = ")
        .push_bind(reason.to_owned())
        .push(", revocation_id = COALESCE(")
        .push_bind(revocation_id.map(str::to_owned))
        .push(", revocation_id) WHERE ");
    // Where ids, tasks or an agent's scope are named, they pick the rows and the state is only
    // checked (`+state`): SQLite, without statistics, would otherwise walk
    // every live lease through the state index and test each against the
    // list.
    let named = matches!(
        sel,
        LeaseSelector::Tasks(_)
            | LeaseSelector::Leases(_)
            | LeaseSelector::AgentScope { .. }
            | LeaseSelector::DelegatedScope { .. }
    );
    q.push(if named { "+state" } else { "state" })
        .push(" IN ('pending', 'active')");
    match sel {
        LeaseSelector::Lease(id) => {
            q.push(" AND id = ").push_bind(id.clone());
        }
        LeaseSelector::Task(t) => {
            q.push(" AND task_id = ").push_bind(t.clone());
        }
        LeaseSelector::AgentScope { agent, scope } => {
            q.push(" AND agent_id = ")
                .push_bind(agent.clone())
                .push(" AND scope = ")
                .push_bind(scope.clone());
        }
        LeaseSelector::DelegatedScope { delegator, scope } => {
            q.push(" AND scope = ")
                .push_bind(scope.clone())
                .push(
                    " AND task_id IN (SELECT id FROM tasks WHERE state = 'open' \
                     AND EXISTS (SELECT 1 FROM json_each(tasks.chain) WHERE value = ",
                )
                .push_bind(delegator.clone())
                .push("))");
        }
        LeaseSelector::Tasks(ts) => {
            q.push(" AND task_id IN (SELECT value FROM json_each(")
                .push_bind(serde_json::to_string(ts).map_err(corrupt)?)
                .push("))");
        }
        LeaseSelector::Leases(ids) => {
            q.push(" AND id IN (SELECT value FROM json_each(")
                .push_bind(serde_json::to_string(ids).map_err(corrupt)?)
                .push("))");
        }
        LeaseSelector::Emergency(s) => push_selector(&mut q, s, "agent_id"),
    }
    q.push(" RETURNING id");
    let rows = q.build().fetch_all(tx.tx.conn().await?).await?;
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    ids.extend(earlier);
    Ok(ids)
}

/// Narrows `q` to the leases an emergency revocation's selection names (its
/// selector, or the tasks it ended); false for other selections.
fn push_revocation_selection(
    q: &mut QueryBuilder<Sqlite>,
    sel: &LeaseSelector,
) -> StoreResult<bool> {
    match sel {
        LeaseSelector::Emergency(s) => push_selector(q, s, "agent_id"),
        LeaseSelector::Tasks(ts) => {
            q.push(" AND task_id IN (SELECT value FROM json_each(")
                .push_bind(serde_json::to_string(ts).map_err(corrupt)?)
                .push("))");
        }
        _ => return Ok(false),
    }
    Ok(true)
}

pub(super) async fn finish_revocation(
    tx: &mut SqliteTx,
    id: &str,
    state: LeaseState,
    lives_until: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE leases SET state = ?, ended_at = ?, last_error = NULL, next_attempt_at = NULL, \
         expires_at = COALESCE(?, expires_at) WHERE id = ? AND state = 'revoking'",
    )
    .bind(state.as_str())
    .bind(unix(now))
    .bind(lives_until.map(unix))
    .bind(id)
    .execute(tx.tx.conn().await?)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn finish_revocations(
    tx: &mut SqliteTx,
    ids: &[String],
    state: LeaseState,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // By id (the primary key); `+state` keeps SQLite off the state index.
    let rows = sqlx::query(
        "UPDATE leases SET state = ?, ended_at = ?, last_error = NULL, next_attempt_at = NULL \
         WHERE id IN (SELECT value FROM json_each(?)) AND +state = 'revoking' RETURNING id",
    )
    .bind(state.as_str())
    .bind(unix(now))
    .bind(serde_json::to_string(ids).map_err(corrupt)?)
    .fetch_all(tx.tx.conn().await?)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("id").map_err(Into::into))
        .collect()
}

pub(super) async fn revocation_failed(
    tx: &mut SqliteTx,
    id: &str,
    error: &str,
    next_attempt_at: OffsetDateTime,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE leases SET attempts = attempts + 1, last_error = ?, next_attempt_at = ? \
         WHERE id = ? AND state = 'revoking'",
    )
    .bind(error)
    .bind(unix(next_attempt_at))
    .bind(id)
    .execute(tx.tx.conn().await?)
    .await?;
    Ok(())
}

pub(super) async fn queue_expired(
    tx: &mut SqliteTx,
    ids: &[String],
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
         next_attempt_at = ?, end_reason = 'ttl reached; its provider acts at expiry' \
         WHERE id IN (SELECT value FROM json_each(?)) AND +state = 'active' \
         AND expires_at <= ? RETURNING id",
    )
    .bind(unix(now))
    .bind(serde_json::to_string(ids).map_err(corrupt)?)
    .bind(unix(now))
    .fetch_all(tx.tx.conn().await?)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
        .collect()
}

pub(super) async fn expire_leases(
    tx: &mut SqliteTx,
    now: OffsetDateTime,
) -> StoreResult<Vec<Lease>> {
    let rows = sqlx::query(
        "UPDATE leases SET state = 'expired', ended_at = ?, \
         end_reason = COALESCE(end_reason, 'expired') \
         WHERE state IN ('active', 'expiring') AND expires_at <= ? RETURNING *",
    )
    .bind(unix(now))
    .bind(unix(now))
    .fetch_all(tx.tx.conn().await?)
    .await?;
    rows.iter().map(lease_from_row).collect()
}

pub(super) async fn queue_orphans(
    tx: &mut SqliteTx,
    before: OffsetDateTime,
    boot_id: &str,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    let rows = sqlx::query(
        "UPDATE leases SET state = 'revoking', next_attempt_at = ?, \
         end_reason = 'orphaned: issue did not complete' \
         WHERE state = 'pending' AND (created_at < ? OR boot_id IS NOT ?) RETURNING id",
    )
    .bind(unix(now))
    .bind(unix(before))
    .bind(boot_id)
    .fetch_all(tx.tx.conn().await?)
    .await?;
    rows.iter()
        .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
        .collect()
}
