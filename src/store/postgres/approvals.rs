//! Approvals, their decisions, the notification outbox and the hook replay
//! cache in the PostgreSQL engine.

use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder};
use time::OffsetDateTime;

use crate::model::{Approval, ApprovalDecision, ApprovalFilter, ApprovalState, Notification, unix};
use crate::store::rows::{approval_from_row, decision_from_row, json_col, notification_from_row};
use crate::store::{StoreError, StoreResult};

fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

async fn with_decisions(db: &mut PgConnection, mut a: Approval) -> StoreResult<Approval> {
    // `n` is the insertion order, as SQLite's rowid is: decisions made in
    // the same second stay in the order they were made.
    a.decisions =
        sqlx::query("SELECT * FROM approval_decisions WHERE approval_id = $1 ORDER BY at, n")
            .bind(&a.id)
            .fetch_all(&mut *db)
            .await?
            .iter()
            .map(decision_from_row)
            .collect::<StoreResult<_>>()?;
    Ok(a)
}

pub(super) async fn get(db: &mut PgConnection, id: &str) -> StoreResult<Option<Approval>> {
    let Some(row) = sqlx::query("SELECT * FROM approvals WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *db)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(with_decisions(db, approval_from_row(&row)?).await?))
}

pub(super) async fn list(db: &mut PgConnection, f: &ApprovalFilter) -> StoreResult<Vec<Approval>> {
    let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM approvals WHERE 1=1");
    if let Some(s) = f.state {
        q.push(" AND state = ").push_bind(s.as_str());
    }
    if let Some(k) = f.kind {
        q.push(" AND kind = ").push_bind(k.as_str());
    }
    if let Some(a) = &f.agent {
        q.push(" AND agent_id = ").push_bind(a.clone());
    }
    super::push_page(&mut q, f.cursor.as_deref(), f.limit)?;
    let rows = q.build().fetch_all(&mut *db).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(with_decisions(db, approval_from_row(r)?).await?);
    }
    Ok(out)
}

pub(super) async fn insert(db: impl PgExecutor<'_>, a: &Approval) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO approvals (id, kind, state, requester, agent_id, task_id, scope, request, \
         justification, required, approver_teams, sponsor, sponsor_alone, confirm_in_api, \
         created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(&a.id)
    .bind(a.kind.as_str())
    .bind(a.state.as_str())
    .bind(&a.requester)
    .bind(&a.agent_id)
    .bind(&a.task_id)
    .bind(&a.scope)
    .bind(to_json(&a.request)?)
    .bind(&a.justification)
    .bind(i64::from(a.required))
    .bind(to_json(&a.approver_teams)?)
    .bind(&a.sponsor)
    .bind(a.sponsor_alone)
    .bind(a.confirm_in_api)
    .bind(unix(a.created_at))
    .bind(unix(a.expires_at))
    .execute(db)
    .await?;
    Ok(())
}

pub(super) async fn add_decision(
    db: impl PgExecutor<'_>,
    approval_id: &str,
    d: &ApprovalDecision,
) -> StoreResult<bool> {
    // SQLite runs one writer at a time, so there the pending check and the
    // quorum count the caller makes next see every earlier decision. Under
    // READ COMMITTED they would not: two approvers deciding at once could
    // each miss the other's decision (and the quorum), or a decision could
    // land on an approval a concurrent transaction just finished. Locking
    // the approval row serialises its deciders and `finish`; after the wait
    // PostgreSQL re-checks `state = 'pending'` on the newest row version.
    // NO KEY UPDATE, not UPDATE, so foreign-key checks of rows that point
    // at the approval (notifications) do not queue behind it.
    let done = sqlx::query(
        "INSERT INTO approval_decisions (approval_id, operator, decision, channel, reason, at) \
         SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS \
         (SELECT 1 FROM approvals WHERE id = $1 AND state = 'pending' FOR NO KEY UPDATE) \
         ON CONFLICT DO NOTHING",
    )
    .bind(approval_id)
    .bind(&d.operator)
    .bind(d.decision.as_str())
    .bind(&d.channel)
    .bind(&d.reason)
    .bind(unix(d.at))
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn finish(
    db: impl PgExecutor<'_>,
    id: &str,
    state: ApprovalState,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE approvals SET state = $1, decided_at = $2, end_reason = $3 \
         WHERE id = $4 AND state = 'pending'",
    )
    .bind(state.as_str())
    .bind(unix(now))
    .bind(reason)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn redeem(
    db: impl PgExecutor<'_>,
    id: &str,
    lease_id: &str,
    now: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE approvals SET redeemed_at = $1, lease_id = $2 \
         WHERE id = $3 AND state = 'approved' AND redeemed_at IS NULL",
    )
    .bind(unix(now))
    .bind(lease_id)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn release_redemption(db: impl PgExecutor<'_>, id: &str) -> StoreResult<bool> {
    let done = sqlx::query(
        "UPDATE approvals SET redeemed_at = NULL, lease_id = NULL WHERE id = $1 AND lease_id IN \
         (SELECT id FROM leases WHERE state IN ('failed', 'revoking', 'revoked'))",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Pending approvals past their expiry, or whose task is no longer open,
/// close. Returns them in their new state.
pub(super) async fn close_stale(
    db: &mut PgConnection,
    now: OffsetDateTime,
) -> StoreResult<Vec<Approval>> {
    let rows = sqlx::query(
        "UPDATE approvals SET state = 'expired', decided_at = $1, \
         end_reason = 'no decision before the request expired' \
         WHERE state = 'pending' AND expires_at <= $1 RETURNING *",
    )
    .bind(unix(now))
    .fetch_all(&mut *db)
    .await?;
    let mut out: Vec<Approval> = rows
        .iter()
        .map(approval_from_row)
        .collect::<StoreResult<_>>()?;
    let rows = sqlx::query(
        "UPDATE approvals SET state = 'cancelled', decided_at = $1, \
         end_reason = 'the task ended before a decision' \
         WHERE state = 'pending' AND task_id IS NOT NULL AND task_id IN \
         (SELECT id FROM tasks WHERE state != 'open') RETURNING *",
    )
    .bind(unix(now))
    .fetch_all(&mut *db)
    .await?;
    for r in &rows {
        out.push(approval_from_row(r)?);
    }
    Ok(out)
}

pub(super) async fn insert_notification(
    db: impl PgExecutor<'_>,
    n: &Notification,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO notifications (id, approval_id, review_item_id, incident_id, channel, event, \
         payload, created_at, attempts, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9)",
    )
    .bind(&n.id)
    .bind(&n.approval_id)
    .bind(&n.review_item_id)
    .bind(&n.incident_id)
    .bind(&n.channel)
    .bind(&n.event)
    .bind(to_json(&n.payload)?)
    .bind(unix(n.created_at))
    .bind(n.next_attempt_at.map(unix))
    .execute(db)
    .await?;
    Ok(())
}

pub(super) async fn notifications_of(
    db: impl PgExecutor<'_>,
    subject: &str,
) -> StoreResult<Vec<Notification>> {
    sqlx::query(
        "SELECT * FROM notifications WHERE approval_id = $1 OR review_item_id = $1 OR incident_id = $1 \
         ORDER BY created_at, id",
    )
    .bind(subject)
    .fetch_all(db)
    .await?
    .iter()
    .map(notification_from_row)
    .collect()
}

/// Records a delivery attempt's outcome: delivered (with the channel's
/// receipt), failed (retry at `retry_at`), or given up (`retry_at` None and
/// an error).
pub(super) async fn notification_attempted(
    db: impl PgExecutor<'_>,
    id: &str,
    outcome: &crate::store::Delivery,
    boot_id: &str,
    now: OffsetDateTime,
) -> StoreResult<()> {
    use crate::store::Delivery;
    let (delivered, error, retry, receipt) = match outcome {
        Delivery::Delivered(receipt) => (Some(unix(now)), None, None, Some(to_json(receipt)?)),
        Delivery::Failed { error, retry_at } => {
            (None, Some(error.as_str()), retry_at.map(unix), None)
        }
    };
    // Never back to undelivered, and a failure only from the claim's
    // holder: a replica whose claim ran out mid-send (another claimed it
    // and is sending it, or delivered it) reporting a late failure would
    // free it for a third send.
    sqlx::query(
        "UPDATE notifications SET attempts = attempts + 1, delivered_at = $1, last_error = $2, \
         next_attempt_at = $3, receipt = COALESCE($4, receipt), claimed_by = NULL, \
         claim_until = NULL WHERE id = $5 AND delivered_at IS NULL \
         AND ($1::BIGINT IS NOT NULL OR claimed_by IS NULL OR claimed_by = $6)",
    )
    .bind(delivered)
    .bind(error)
    .bind(retry)
    .bind(receipt)
    .bind(id)
    .bind(boot_id)
    .execute(db)
    .await?;
    Ok(())
}

/// The receipt of the delivered request of an approval or review item on
/// `channel` (the Slack message's channel and ts), for follow-up updates.
pub(super) async fn receipt(
    db: impl PgExecutor<'_>,
    subject: &str,
    channel: &str,
) -> StoreResult<Option<serde_json::Value>> {
    let row = sqlx::query(
        "SELECT receipt FROM notifications WHERE (approval_id = $1 OR review_item_id = $1) \
         AND channel = $2 AND event IN ('requested', 'review_requested') \
         AND receipt IS NOT NULL ORDER BY created_at LIMIT 1",
    )
    .bind(subject)
    .bind(channel)
    .fetch_optional(db)
    .await?;
    row.map(|r| json_col(&r, "receipt")).transpose()
}

/// Records a signed inbound request's digest; `false` when it was seen
/// before (a replay).
pub(super) async fn record_replay(
    db: impl PgExecutor<'_>,
    digest: &str,
    expires_at: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO hook_replays (digest, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(digest)
    .bind(unix(expires_at))
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn prune_replays(db: impl PgExecutor<'_>, now: OffsetDateTime) -> StoreResult<()> {
    sqlx::query("DELETE FROM hook_replays WHERE expires_at < $1")
        .bind(unix(now))
        .execute(db)
        .await?;
    Ok(())
}
