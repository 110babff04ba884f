//! A lease's life in the PostgreSQL engine: written ahead, issued, renewed, queued for revocation, finished; expiry and orphans.

use time::OffsetDateTime;

use super::{PostgresTx, corrupt};
use crate::model::{Lease, LeaseState, Revocability, unix};
use crate::store::rows::{lease_from_row, parse_col};
use crate::store::sql::{json_opt, push_selector};
use crate::store::{LeaseInsert, LeaseSelector, StoreResult};
use sqlx::{Postgres, QueryBuilder};

/// A lease's insert, only while its task is open. FOR SHARE: the task
/// cannot be ended until the writing transaction ends, and one ended
/// meanwhile is seen ended (READ COMMITTED re-checks a locked row), so a
/// lease never lands on an ended task.
macro_rules! insert_lease_sql {
    () => {
        "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, \
         expires_at, boot_id, source, handle, revocability) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 \
         WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $3 AND state = 'open' FOR SHARE)"
    };
}

/// `sql` with a lease's columns bound as `$1`..`$12` of
/// [`insert_lease_sql`].
fn bind_lease<'q>(
    sql: &'static str,
    l: &'q Lease,
) -> StoreResult<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>> {
    Ok(sqlx::query(sql)
        .bind(&l.id)
        .bind(&l.agent_id)
        .bind(&l.task_id)
        .bind(&l.scope)
        .bind(&l.provider)
        .bind(l.state.as_str())
        .bind(unix(l.created_at))
        .bind(unix(l.expires_at))
        .bind(&l.boot_id)
        .bind(&l.source)
        .bind(json_opt(l.handle.as_ref())?)
        .bind(l.revocability.map(|r| r.as_str())))
}

/// What a lease's insert did: an exclusion committed by a concurrent writer
/// may not see the lease yet, so the caller reads the agent once it commits.
fn inserted(rows: u64) -> LeaseInsert {
    if rows == 1 {
        LeaseInsert::Written { excluded: None }
    } else {
        LeaseInsert::TaskEnded
    }
}

pub(super) async fn insert_lease(tx: &mut PostgresTx, l: &Lease) -> StoreResult<LeaseInsert> {
    let done = bind_lease(insert_lease_sql!(), l)?
        .execute(tx.conn())
        .await?;
    Ok(inserted(done.rows_affected()))
}

/// A lease and its staged events (`staged`, the JSON of
/// `store/postgres/chain.rs`) written in one statement, committed alone:
/// one round trip instead of a transaction's four (begin, the lease, the
/// events, commit). The events are written only with the lease.
pub(in crate::store::postgres) async fn insert_lease_staged(
    db: &sqlx::PgPool,
    l: &Lease,
    staged: String,
) -> StoreResult<LeaseInsert> {
    let written: i64 = bind_lease(
        concat!(
            "WITH l AS (",
            insert_lease_sql!(),
            " RETURNING 1), e AS (INSERT INTO audit_pending (events) SELECT $13 FROM l) \
             SELECT count(*) FROM l"
        ),
        l,
    )?
    .bind(staged)
    .fetch_one(db)
    .await
    .and_then(|r| sqlx::Row::try_get(&r, 0))?;
    Ok(inserted(written.max(0) as u64))
}

/// The advisory lock class that serialises one agent's usage-limit checks
/// (the key is the agent id's hash); it differs from the replica liveness
/// class (19271).
const USAGE_LIMIT_LOCK_CLASS: i32 = 19273;

pub(super) async fn live_lease_count(
    tx: &mut PostgresTx,
    agent: &str,
    scope: Option<&str>,
    now: OffsetDateTime,
) -> StoreResult<u64> {
    // Held until commit: a concurrent request of the same agent counts
    // after this one's lease is in.
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(USAGE_LIMIT_LOCK_CLASS)
        .bind(agent)
        .execute(tx.conn())
        .await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM leases WHERE agent_id = $1 AND state IN ('pending', 'active') \
         AND expires_at > $2 AND ($3::text IS NULL OR scope = $3)",
    )
    .bind(agent)
    .bind(unix(now))
    .bind(scope)
    .fetch_one(tx.conn())
    .await?;
    Ok(n.max(0) as u64)
}

pub(super) async fn record_issued(
    tx: &mut PostgresTx,
    id: &str,
    handle: &serde_json::Value,
    revocability: Revocability,
    expires_at: OffsetDateTime,
) -> StoreResult<Option<LeaseState>> {
    let row = sqlx::query(
        "UPDATE leases SET handle = $1, revocability = $2, expires_at = $3, \
         state = CASE WHEN state = 'pending' THEN 'active' ELSE state END \
         WHERE id = $4 AND state IN ('pending', 'revoking') RETURNING state",
    )
    .bind(serde_json::to_string(handle).map_err(corrupt)?)
    .bind(revocability.as_str())
    .bind(unix(expires_at))
    .bind(id)
    .fetch_optional(tx.conn())
    .await?;
    row.map(|r| parse_col::<LeaseState>(&r, "state"))
        .transpose()
}

pub(super) async fn renew_lease(
    tx: &mut PostgresTx,
    id: &str,
    expires_at: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query("UPDATE leases SET expires_at = $1 WHERE id = $2 AND state = 'active'")
        .bind(unix(expires_at))
        .bind(id)
        .execute(tx.conn())
        .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn mark_failed(
    tx: &mut PostgresTx,
    id: &str,
    error: &str,
    now: OffsetDateTime,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE leases SET state = 'failed', last_error = $1, ended_at = $2 \
         WHERE id = $3 AND state = 'pending'",
    )
    .bind(error)
    .bind(unix(now))
    .bind(id)
    .execute(tx.conn())
    .await?;
    Ok(())
}

pub(super) async fn queue_revocations(
    tx: &mut PostgresTx,
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
        let mut q2 = QueryBuilder::<Postgres>::new("UPDATE leases SET revocation_id = ");
        q2.push_bind(rid.to_owned())
            .push(" WHERE state = 'revoking' AND revocation_id IS NULL");
        if push_revocation_selection(&mut q2, sel) {
            q2.push(" RETURNING id");
            let rows = q2.build().fetch_all(tx.conn()).await?;
            earlier.extend(PostgresTx::ids(&rows)?);
            let mut q3 = QueryBuilder::<Postgres>::new(
                "INSERT INTO revocation_overlaps (revocation_id, lease_id) SELECT ",
            );
            q3.push_bind(rid.to_owned())
                .push(", id FROM leases WHERE state = 'revoking' AND revocation_id <> ")
                .push_bind(rid.to_owned());
            push_revocation_selection(&mut q3, sel);
            q3.push(" ON CONFLICT DO NOTHING RETURNING lease_id AS id");
            let rows = q3.build().fetch_all(tx.conn()).await?;
            earlier.extend(PostgresTx::ids(&rows)?);
        }
    }
    let mut q = QueryBuilder::<Postgres>::new(
        "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
         next_attempt_at = ",
    );
    q.push_bind(unix(now))
        .push(", end_reason = ")
        .push_bind(reason.to_owned())
        .push(", revocation_id = COALESCE(")
        .push_bind(revocation_id.map(str::to_owned))
        .push(", revocation_id) WHERE state IN ('pending', 'active')");
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
                     AND jsonb_exists(chain::jsonb, ",
                )
                .push_bind(delegator.clone())
                .push("))");
        }
        LeaseSelector::Tasks(ts) => {
            q.push(" AND task_id = ANY(")
                .push_bind(ts.clone())
                .push(")");
        }
        LeaseSelector::Leases(ids) => {
            q.push(" AND id = ANY(").push_bind(ids.clone()).push(")");
        }
        LeaseSelector::Emergency(s) => push_selector(&mut q, s, "agent_id"),
    }
    q.push(" RETURNING id");
    let rows = q.build().fetch_all(tx.conn()).await?;
    let mut ids = PostgresTx::ids(&rows)?;
    ids.extend(earlier);
    Ok(ids)
}

/// Narrows `q` to the leases an emergency revocation's selection names (its
/// selector, or the tasks it ended); false for other selections.
fn push_revocation_selection(q: &mut QueryBuilder<Postgres>, sel: &LeaseSelector) -> bool {
    match sel {
        LeaseSelector::Emergency(s) => push_selector(q, s, "agent_id"),
        LeaseSelector::Tasks(ts) => {
            q.push(" AND task_id = ANY(")
                .push_bind(ts.clone())
                .push(")");
        }
        _ => return false,
    }
    true
}

pub(super) async fn finish_revocation(
    tx: &mut PostgresTx,
    id: &str,
    state: LeaseState,
    lives_until: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE leases SET state = $1, ended_at = $2, last_error = NULL, \
         next_attempt_at = NULL, expires_at = COALESCE($3, expires_at), \
         claimed_by = NULL, claim_until = NULL WHERE id = $4 AND state = 'revoking'",
    )
    .bind(state.as_str())
    .bind(unix(now))
    .bind(lives_until.map(unix))
    .bind(id)
    .execute(tx.conn())
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn finish_revocations(
    tx: &mut PostgresTx,
    ids: &[String],
    state: LeaseState,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "UPDATE leases SET state = $1, ended_at = $2, last_error = NULL, \
         next_attempt_at = NULL, claimed_by = NULL, claim_until = NULL \
         WHERE id = ANY($3) AND state = 'revoking' RETURNING id",
    )
    .bind(state.as_str())
    .bind(unix(now))
    .bind(ids)
    .fetch_all(tx.conn())
    .await?;
    PostgresTx::ids(&rows)
}

pub(super) async fn revocation_failed(
    tx: &mut PostgresTx,
    id: &str,
    error: &str,
    next_attempt_at: OffsetDateTime,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE leases SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, \
         claimed_by = NULL, claim_until = NULL WHERE id = $3 AND state = 'revoking'",
    )
    .bind(error)
    .bind(unix(next_attempt_at))
    .bind(id)
    .execute(tx.conn())
    .await?;
    Ok(())
}

pub(super) async fn queue_expired(
    tx: &mut PostgresTx,
    ids: &[String],
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
         next_attempt_at = $1, end_reason = 'ttl reached; its provider acts at expiry' \
         WHERE id = ANY($2) AND state = 'active' AND expires_at <= $1 RETURNING id",
    )
    .bind(unix(now))
    .bind(ids)
    .fetch_all(tx.conn())
    .await?;
    PostgresTx::ids(&rows)
}

pub(super) async fn expire_leases(
    tx: &mut PostgresTx,
    now: OffsetDateTime,
) -> StoreResult<Vec<Lease>> {
    let rows = sqlx::query(
        "UPDATE leases SET state = 'expired', ended_at = $1, \
         end_reason = COALESCE(end_reason, 'expired') \
         WHERE state IN ('active', 'expiring') AND expires_at <= $1 RETURNING *",
    )
    .bind(unix(now))
    .fetch_all(tx.conn())
    .await?;
    rows.iter().map(lease_from_row).collect()
}

pub(super) async fn queue_orphans(
    tx: &mut PostgresTx,
    before: OffsetDateTime,
    _boot_id: &str,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    // Another boot's pending lease is an orphan only once that replica
    // is dead (its lock is gone): a live one may be issuing it now.
    let rows = sqlx::query(concat!(
        "UPDATE leases SET state = 'revoking', next_attempt_at = $1, \
         end_reason = 'orphaned: issue did not complete' \
         WHERE state = 'pending' AND (created_at < $2 OR boot_id IS NULL OR boot_id NOT IN (",
        crate::store::postgres::replicas::live_boots!(),
        ")) RETURNING id"
    ))
    .bind(unix(now))
    .bind(unix(before))
    .fetch_all(tx.conn())
    .await?;
    PostgresTx::ids(&rows)
}
