//! Tasks in the PostgreSQL engine: opened, ended (with their delegated tasks and live leases), and the assertion ids that may not be replayed.

use sqlx::{Postgres, QueryBuilder, Row};
use time::OffsetDateTime;

use super::{PostgresTx, corrupt};
use crate::model::{Task, TaskState, unix};
use crate::store::sql::{json_opt, push_task_selector};
use crate::store::{JtiUse, StoreResult, TaskOpen, TaskSelector};

pub(super) async fn insert_task(tx: &mut PostgresTx, t: &Task) -> StoreResult<bool> {
    // The agent's row, and the parent task's, locked: a suspension (or the
    // parent's end) committing meanwhile either waits for this transaction,
    // and its end of the agent's tasks, a later statement, sees this one;
    // or this one waits for it and reads what it wrote (read committed
    // locks the newest version). The agent's row in the mode the open's
    // `last_used_at` update takes next: two opens sharing it and each then
    // waiting to update it would deadlock.
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM agents WHERE id = $1 FOR NO KEY UPDATE")
            .bind(&t.agent_id)
            .fetch_optional(tx.conn())
            .await?;
    if status.as_deref() != Some("active") {
        return Ok(false);
    }
    if let Some(parent) = &t.parent_task_id {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1 FOR SHARE")
                .bind(parent)
                .fetch_optional(tx.conn())
                .await?;
        if state.as_deref() != Some("open") {
            return Ok(false);
        }
    }
    sqlx::query(
        "INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at, \
         parent_task_id, depth, delegation_budget, scopes, chain, on_behalf_of) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&t.id)
    .bind(&t.agent_id)
    .bind(&t.description)
    .bind(t.state.as_str())
    .bind(unix(t.opened_at))
    .bind(unix(t.expires_at))
    .bind(&t.parent_task_id)
    .bind(i64::from(t.depth))
    .bind(i64::from(t.delegation_budget))
    .bind(json_opt(t.scopes.as_ref())?)
    .bind(serde_json::to_string(&t.chain).map_err(corrupt)?)
    .bind(json_opt(t.on_behalf_of.as_ref())?)
    .execute(tx.conn())
    .await?;
    tx.users
        .learn(&t.id, t.on_behalf_of.as_ref().map(|u| u.id.clone()));
    Ok(true)
}

pub(super) async fn end_tasks(
    tx: &mut PostgresTx,
    sel: &TaskSelector,
    state: TaskState,
    reason: &str,
    now: OffsetDateTime,
) -> StoreResult<Vec<String>> {
    // Every open task this ends, with the tasks delegated below them,
    // locked first and in one order (their ids): a task tree ended from two
    // sides at once (its root completed while a kill switch by team or by
    // provider reaches a sub-agent's task first in its own scan order)
    // would otherwise lock the two crosswise, and one would fail as a
    // deadlock: the kill switch, usually.
    let mut lock = QueryBuilder::<Postgres>::new(
        "WITH RECURSIVE tree(id) AS (SELECT id FROM tasks WHERE state = 'open'",
    );
    push_task_selector(&mut lock, sel);
    lock.push(
        " UNION SELECT t.id FROM tasks t JOIN tree ON t.parent_task_id = tree.id \
         WHERE t.state = 'open') \
         SELECT id FROM tasks WHERE id IN (SELECT id FROM tree) ORDER BY id FOR NO KEY UPDATE",
    );
    lock.build().execute(tx.conn()).await?;
    let mut q = QueryBuilder::<Postgres>::new("UPDATE tasks SET state = ");
    q.push_bind(state.as_str())
        .push(", ended_at = ")
        .push_bind(unix(now))
        .push(", end_reason = ")
        .push_bind(reason.to_owned())
        .push(" WHERE state = 'open'");
    push_task_selector(&mut q, sel);
    q.push(" RETURNING id");
    let rows = q.build().fetch_all(tx.conn()).await?;
    let mut ended = PostgresTx::ids(&rows)?;
    // Delegated tasks end with their parent, level by level, and their
    // leases are queued for revocation in the same commit.
    let mut level = ended.clone();
    while !level.is_empty() {
        let rows = sqlx::query(
            "UPDATE tasks SET state = 'revoked', ended_at = $1, \
             end_reason = 'the parent task ended' WHERE state = 'open' \
             AND parent_task_id = ANY($2) RETURNING id",
        )
        .bind(unix(now))
        .bind(&level)
        .fetch_all(tx.conn())
        .await?;
        let children = PostgresTx::ids(&rows)?;
        if children.is_empty() {
            break;
        }
        sqlx::query(
            "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
             next_attempt_at = $1, end_reason = 'the parent task ended' \
             WHERE state IN ('pending', 'active') AND task_id = ANY($2)",
        )
        .bind(unix(now))
        .bind(&children)
        .execute(tx.conn())
        .await?;
        ended.extend(children.iter().cloned());
        level = children;
    }
    Ok(ended)
}

pub(super) async fn record_jti(
    tx: &mut PostgresTx,
    agent_id: &str,
    jti: &str,
    expires_at: OffsetDateTime,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT INTO assertion_jtis (agent_id, jti, expires_at) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(agent_id)
    .bind(jti)
    .bind(unix(expires_at))
    .execute(tx.conn())
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A task opened in one statement, committed alone, with its assertion's
/// `jti` and its staged events (`staged`, the JSON of
/// `store/postgres/chain.rs`): one round trip instead of a transaction's
/// seven. What [`insert_task`] and [`record_jti`] check holds here too, in
/// the same order: the agent's row locked and active, the parent's locked
/// and open (a suspension or the parent's end committing meanwhile is
/// waited for and read as it ends), then the `jti`, recorded only with the
/// task.
pub(in crate::store::postgres) async fn open_task_staged(
    db: &sqlx::PgPool,
    jti: &JtiUse,
    t: &Task,
    staged: String,
) -> StoreResult<TaskOpen> {
    let row = sqlx::query(
        "WITH a AS (SELECT 1 FROM agents WHERE id = $2 AND status = 'active' \
                    FOR NO KEY UPDATE), \
              p AS (SELECT 1 FROM tasks WHERE id = $7 AND state = 'open' FOR SHARE), \
              ok AS (SELECT EXISTS (SELECT 1 FROM a) \
                     AND ($7::text IS NULL OR EXISTS (SELECT 1 FROM p)) AS ok), \
              j AS (INSERT INTO assertion_jtis (agent_id, jti, expires_at) \
                    SELECT $16, $13, $14 FROM ok WHERE ok.ok \
                    ON CONFLICT DO NOTHING RETURNING 1), \
              t AS (INSERT INTO tasks (id, agent_id, description, state, opened_at, \
                    expires_at, parent_task_id, depth, delegation_budget, scopes, chain, \
                    on_behalf_of) \
                    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM j), \
              u AS (UPDATE agents SET last_used_at = $5 \
                    WHERE id = $2 AND EXISTS (SELECT 1 FROM j)), \
              e AS (INSERT INTO audit_pending (events) SELECT $15 FROM j) \
         SELECT (SELECT count(*) FROM j) AS opened, (SELECT ok FROM ok) AS ok",
    )
    .bind(&t.id)
    .bind(&t.agent_id)
    .bind(&t.description)
    .bind(t.state.as_str())
    .bind(unix(t.opened_at))
    .bind(unix(t.expires_at))
    .bind(&t.parent_task_id)
    .bind(i64::from(t.depth))
    .bind(i64::from(t.delegation_budget))
    .bind(json_opt(t.scopes.as_ref())?)
    .bind(serde_json::to_string(&t.chain).map_err(corrupt)?)
    .bind(json_opt(t.on_behalf_of.as_ref())?)
    .bind(&jti.jti)
    .bind(unix(jti.expires_at))
    .bind(staged)
    .bind(&jti.agent_id)
    .fetch_one(db)
    .await?;
    let opened: i64 = row.try_get("opened")?;
    let ok: bool = row.try_get("ok")?;
    // As in a transaction of its own (`open_task_alone`): the agent and the
    // parent judged first, then the `jti`.
    Ok(if opened == 1 {
        TaskOpen::Opened
    } else if ok {
        TaskOpen::Replayed
    } else {
        TaskOpen::Overtaken
    })
}
