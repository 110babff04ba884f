//! The audit chain in the PostgreSQL engine, extended off the request path.
//!
//! A transaction writes its events, unchained, as one row of
//! `audit_pending` with its change: durable at the same commit, and no lock
//! shared between replicas on the way. The [`Chain`] then moves pending rows
//! into `audit_events` in batches, in the order they were staged (a change
//! made after another's was visible is staged after it), under
//! the chain's advisory lock: one lock, one head read and one commit for
//! many transactions' events instead of one each. Before, every transaction
//! with events held that lock from its head read to its commit, and the
//! lock serialised the whole engine (at 32 clients, most backends sampled
//! were waiting for it).
//!
//! With no lock to take, the two writes every request makes (a lease with
//! its events, a task opened with its assertion's `jti` and its events) are
//! each one statement committed alone, not a transaction of four to seven
//! round trips.
//!
//! Each replica runs one chainer, woken by its own commits and every second
//! (for rows another replica, or a crash, left). Every read of the log
//! chains what is pending first, so a read never misses the event of a
//! change committed before it began.

use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};
use tokio::sync::{Mutex, Notify};

use super::AUDIT_CHAIN_LOCK;
use super::tx::corrupt;
use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::model::{Lease, Task};
use crate::store::{
    JtiUse, LeaseInsert, Store, StoreError, StoreResult, TaskOpen, insert_lease_alone,
    open_task_alone,
};

/// How many pending transactions one pass chains in one commit.
const PASS_ROWS: i64 = 512;
/// How often a chainer looks for rows nobody woke it for.
const SWEEP: Duration = Duration::from_secs(1);

pub(super) struct Chain {
    pool: PgPool,
    wake: Arc<Notify>,
    /// One pass at a time in this replica; replicas serialise on the
    /// chain's advisory lock.
    pass: Mutex<()>,
}

impl Chain {
    /// A chain over `pool`, with its chainer running until the store is
    /// dropped.
    pub(super) fn start(pool: PgPool) -> Arc<Self> {
        let chain = Arc::new(Self {
            pool,
            wake: Arc::new(Notify::new()),
            pass: Mutex::new(()),
        });
        let wake = chain.wake.clone();
        let weak: Weak<Self> = Arc::downgrade(&chain);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let _ = tokio::time::timeout(SWEEP, wake.notified()).await;
                let Some(chain) = weak.upgrade() else { return };
                match chain.chain_pending().await {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "chaining staged audit events failed; retrying every second (they are kept, and every read of the log chains them first)");
                    }
                    Err(_) => {}
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("chaining staged audit events works again");
                    }
                    Ok(()) => {}
                }
            }
        });
        chain
    }

    /// Tells the chainer a commit left events to chain.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Chains every pending event committed before this call (and no
    /// more: under constant writes a read still ends).
    pub(super) async fn chain_pending(&self) -> StoreResult<()> {
        let _pass = self.pass.lock().await;
        // By the key's index: rows chained and not yet vacuumed cost
        // nothing here.
        let last: Option<i64> =
            sqlx::query_scalar("SELECT id FROM audit_pending ORDER BY id DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        let Some(last) = last else { return Ok(()) };
        while self.pass_once(last).await? == PASS_ROWS {}
        Ok(())
    }

    /// One batch (of rows up to `last`) chained in one transaction; how
    /// many pending rows it took.
    async fn pass_once(&self, last: i64) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_CHAIN_LOCK)
            .execute(&mut *tx)
            .await?;
        // Taken after the lock: this statement's snapshot sees every pass
        // before it, so no row is chained twice.
        let mut rows: Vec<(i64, String)> = sqlx::query(
            "DELETE FROM audit_pending WHERE id IN \
             (SELECT id FROM audit_pending WHERE id <= $1 ORDER BY id LIMIT $2) \
             RETURNING id, events",
        )
        .bind(last)
        .bind(PASS_ROWS)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok::<_, sqlx::Error>((r.try_get("id")?, r.try_get("events")?)))
        .collect::<Result<_, _>>()?;
        rows.sort_unstable_by_key(|(id, _)| *id);
        let mut events = Vec::new();
        for (id, text) in &rows {
            let staged: Vec<AuditEvent> = serde_json::from_str(text).map_err(|e| {
                StoreError::Corrupt(format!("pending audit events {id} cannot be read: {e}"))
            })?;
            events.extend(staged);
        }
        append(&mut tx, events).await?;
        tx.commit().await?;
        Ok(rows.len() as i64)
    }
}

/// Chains `events` after the current head and inserts them; the caller
/// holds the chain's lock.
async fn append(conn: &mut PgConnection, mut events: Vec<AuditEvent>) -> StoreResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await?;
    let (mut seq, mut hash) = match head {
        Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let mut rows = Vec::with_capacity(events.len());
    for mut ev in events.drain(..) {
        without_nul(&mut ev);
        ev.chain_after(seq, &hash);
        seq = ev.seq;
        hash.clone_from(&ev.hash);
        let policy_ids = serde_json::to_string(&ev.policy_ids).map_err(corrupt)?;
        let details = serde_json::to_string(&ev.details).map_err(corrupt)?;
        rows.push((ev, policy_ids, details));
    }
    // 17 binds a row: 1,000 rows stay well under the 65,535 limit.
    for chunk in rows.chunks(1000) {
        let mut q = QueryBuilder::<Postgres>::new(
            "INSERT INTO audit_events (seq, at_ms, actor, action, agent, task, scope, lease, \
             decision, policy_ids, policy_hash, outcome, reason, details, prev_hash, hash, \
             on_behalf_of) ",
        );
        q.push_values(chunk, |mut b, (ev, policy_ids, details)| {
            b.push_bind(ev.seq)
                .push_bind(ev.at_ms)
                .push_bind(ev.actor.clone())
                .push_bind(ev.action.clone())
                .push_bind(ev.agent.clone())
                .push_bind(ev.task.clone())
                .push_bind(ev.scope.clone())
                .push_bind(ev.lease.clone())
                .push_bind(ev.decision.clone())
                .push_bind(policy_ids.clone())
                .push_bind(ev.policy_hash.clone())
                .push_bind(ev.outcome.clone())
                .push_bind(ev.reason.clone())
                .push_bind(details.clone())
                .push_bind(ev.prev_hash.clone())
                .push_bind(ev.hash.clone())
                .push_bind(ev.on_behalf_of.clone());
        });
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// A transaction's events as one pending row holds them.
pub(super) fn staged(events: &[AuditEvent]) -> StoreResult<String> {
    serde_json::to_string(events).map_err(corrupt)
}

/// PostgreSQL's text cannot hold a NUL character, which an event's plain
/// text fields may carry (a refused token request names the client id it
/// was given, `%00` included) and JSON carries as `\u0000`: such an event,
/// inserted as it is, would be refused by every pass that took its row and
/// stop the chain. Its NULs are kept as U+FFFD, before it is hashed.
/// (`details` and `policy_ids` are stored as JSON text, NUL escaped.)
fn without_nul(ev: &mut AuditEvent) {
    fn text(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{fffd}");
        }
    }
    for s in [&mut ev.actor, &mut ev.action, &mut ev.outcome] {
        text(s);
    }
    for s in [
        &mut ev.agent,
        &mut ev.task,
        &mut ev.scope,
        &mut ev.lease,
        &mut ev.decision,
        &mut ev.policy_hash,
        &mut ev.reason,
        &mut ev.on_behalf_of,
    ]
    .into_iter()
    .flatten()
    {
        text(s);
    }
}

/// Writes a transaction's events (`staged`), unchained, as one pending row
/// in that transaction.
pub(super) async fn stage(conn: &mut PgConnection, staged: String) -> StoreResult<()> {
    sqlx::query("INSERT INTO audit_pending (events) VALUES ($1)")
        .bind(staged)
        .execute(conn)
        .await?;
    Ok(())
}

/// [`crate::store::Store::insert_lease_audited`]: the lease and its events
/// in one statement, committed alone, then the chainer woken.
pub(super) async fn insert_lease_audited(
    store: &super::PostgresStore,
    lease: &Lease,
    mut events: Vec<AuditEvent>,
) -> StoreResult<LeaseInsert> {
    if events.is_empty() {
        return insert_lease_alone(store.begin().await?, lease, events).await;
    }
    for ev in &mut events {
        store.users.name_user(&store.write, ev).await?;
    }
    let done = super::tx::insert_lease_staged(&store.write, lease, staged(&events)?).await?;
    if done.written() {
        store.chain.wake();
    }
    Ok(done)
}

/// [`crate::store::Store::open_task_recorded`]: the task, its `jti` and its
/// events in one statement, committed alone, then the chainer woken.
pub(super) async fn open_task_recorded(
    store: &super::PostgresStore,
    jti: &JtiUse,
    task: &Task,
    mut events: Vec<AuditEvent>,
) -> StoreResult<TaskOpen> {
    if events.is_empty() {
        return open_task_alone(store.begin().await?, jti, task, events).await;
    }
    // The task's own events name its user before the task is written.
    store
        .users
        .learn(&task.id, task.on_behalf_of.as_ref().map(|u| u.id.clone()));
    for ev in &mut events {
        store.users.name_user(&store.write, ev).await?;
    }
    let done = super::tx::open_task_staged(&store.write, jti, task, staged(&events)?).await?;
    if done == TaskOpen::Opened {
        store.chain.wake();
    }
    Ok(done)
}
