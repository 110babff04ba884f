//! Tasks in the SQLite engine: opened, ended (with their delegated tasks and live leases), and the assertion ids that may not be replayed.

use sqlx::{QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use super::super::batch::push_task_insert;
use super::{SqliteTx, corrupt};
use crate::model::{Task, TaskState, unix};
use crate::store::sql::push_task_selector;
use crate::store::{StoreResult, TaskSelector};

pub(super) async fn insert_task(tx: &mut SqliteTx, t: &Task) -> StoreResult<bool> {
    // Its outcome decides the open: a trip of its own (the batch checks
    // the same in its statement, batch.rs).
    let mut q = QueryBuilder::new("");
    push_task_insert(&mut q, t)?;
    let written = q
        .build()
        .execute(tx.tx.conn().await?)
        .await?
        .rows_affected()
        == 1;
    if written {
        tx.tx
            .state
            .remember_user(&t.id, t.on_behalf_of.as_ref().map(|u| u.id.clone()));
    }
    Ok(written)
}

pub(super) async fn end_tasks(
    tx: &mut SqliteTx,
    sel: &TaskSelector,
    state: TaskState,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    let mut q = QueryBuilder::<Sqlite>::new("UPDATE tasks SET state = ");
    q.push_bind(state.as_str())
        .push(", ended_at = ")
        .push_bind(unix(now))
        .push(", end_reason = ")
        .push_bind(reason.to_owned())
        .push(" WHERE state = 'open'");
    push_task_selector(&mut q, sel);
    q.push(" RETURNING id");
    let rows = q.build().fetch_all(tx.tx.conn().await?).await?;
    let mut ended: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    // Delegated tasks end with their parent, level by level, and their
    // leases are queued for revocation in the same commit.
    loop {
        let children: Vec<String> = sqlx::query(
            "UPDATE tasks SET state = 'revoked', ended_at = ?, \
             end_reason = 'the parent task ended' WHERE state = 'open' AND parent_task_id IN \
             (SELECT id FROM tasks WHERE state != 'open') RETURNING id",
        )
        .bind(unix(now))
        .fetch_all(tx.tx.conn().await?)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
        if children.is_empty() {
            break;
        }
        sqlx::query(
            "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
             next_attempt_at = ?, end_reason = 'the parent task ended' \
             WHERE +state IN ('pending', 'active') AND task_id IN (SELECT value FROM json_each(?))",
        )
        .bind(unix(now))
        .bind(serde_json::to_string(&children).map_err(corrupt)?)
        .execute(tx.tx.conn().await?)
        .await?;
        ended.extend(children);
    }
    Ok(ended)
}

pub(super) async fn record_jti(
    tx: &mut SqliteTx,
    agent_id: &str,
    jti: &str,
    expires_at: OffsetDateTime,
) -> StoreResult<bool> {
    // One trip opens the savepoint, if this is the transaction's first
    // statement, and records the jti (a row back: it was fresh).
    let mut trip = tx.tx.trip();
    trip.q
        .push("INSERT INTO assertion_jtis (agent_id, jti, expires_at) VALUES (")
        .push_bind(agent_id.to_owned())
        .push(", ")
        .push_bind(jti.to_owned())
        .push(", ")
        .push_bind(unix(expires_at))
        .push(") ON CONFLICT DO NOTHING RETURNING 1");
    let r = trip.q.build().fetch_optional(&mut tx.tx.state.conn).await;
    Ok(trip.done(&mut tx.tx, r).await?.is_some())
}
