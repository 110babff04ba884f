//! Lease writes, batched: many credentials' leases in one trip.
//!
//! Issuing a credential writes its lease and two audit events, and nothing
//! of that transaction is read back but whether the lease was written (its
//! task still open) and whether the registry excludes its scope. So the
//! write need not be interactive: a request queues it as data, and one
//! batcher task takes every queued write at once, runs them in a single trip
//! to SQLite's thread (one multi-row `INSERT … RETURNING` for the leases,
//! then the events, chained in queue order, in one savepoint) and keeps that
//! savepoint in the open group. Each request then waits for the group's
//! fsync as any transaction does (`group.rs`): a lease is reported written
//! only once it is durable.
//!
//! Under load the writer no longer holds the connection for one trip per
//! credential, the cost that set the pace before; alone, a request pays one
//! task hand-off more than writing it itself.
//!
//! What the batch cannot settle is handed back, and the request writes its
//! lease in a transaction of its own, exactly as without the batcher: a
//! statement of the batch failed (nothing of the batch is kept), or some
//! member's task had ended (the events were chained through its lease, so
//! the savepoint is rolled back; those members learn their task ended, the
//! others write alone). A request cancelled before the batch runs is left
//! out of it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::{Mutex, Notify, oneshot, watch};

use super::group::{self, Outcome, PendingEvent, State, WriteTx};
use crate::audit::AuditEvent;
use crate::model::{Lease, unix};
use crate::store::sql::json_opt;
use crate::store::{LeaseInsert, StoreResult};

/// Most lease writes one trip carries (12 variables a lease and 17 an
/// event, well under SQLite's 32,766).
const MAX_BATCH: usize = 128;

/// Lease writes waiting for the batcher.
#[derive(Default)]
pub(super) struct Queue {
    items: std::sync::Mutex<Vec<Item>>,
    pub(super) wake: Notify,
}

struct Item {
    lease: Lease,
    events: Vec<AuditEvent>,
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    Written {
        excluded: bool,
        durable: watch::Receiver<Outcome>,
    },
    TaskEnded,
    /// Not settled by the batch: the request writes it alone.
    Alone,
}

impl Queue {
    fn items(&self) -> std::sync::MutexGuard<'_, Vec<Item>> {
        // A panic while holding it cannot leave the vector half-changed.
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl group::Writer {
    /// Writes `lease` (only while its task is open) and, if it was written,
    /// `events`, in the next batch; returns once durable. `None`: the batch
    /// could not settle it, the caller writes it alone.
    pub(super) async fn insert_lease_batched(
        &self,
        lease: &Lease,
        events: &[AuditEvent],
    ) -> StoreResult<Option<LeaseInsert>> {
        let (reply, answer) = oneshot::channel();
        self.batch.items().push(Item {
            lease: lease.clone(),
            events: events.to_vec(),
            reply,
        });
        self.batch.wake.notify_one();
        match answer.await {
            Ok(Reply::Written { excluded, durable }) => {
                group::durable(durable).await?;
                Ok(Some(LeaseInsert::Written {
                    excluded: Some(excluded),
                }))
            }
            Ok(Reply::TaskEnded) => Ok(Some(LeaseInsert::TaskEnded)),
            // Dropped unanswered: the store is closing.
            Ok(Reply::Alone) | Err(_) => Ok(None),
        }
    }
}

/// Runs the queued lease writes, a batch per hold of the connection.
pub(super) async fn batcher(state: Weak<Mutex<State>>, flush: Arc<Notify>, queue: Arc<Queue>) {
    loop {
        queue.wake.notified().await;
        while !queue.items().is_empty() {
            let Some(state) = state.upgrade() else {
                return;
            };
            // Whatever queued while the connection was busy joins this batch.
            let tx = group::begin_on(state, Arc::clone(&flush)).await;
            let items: Vec<Item> = {
                let mut q = queue.items();
                let n = q.len().min(MAX_BATCH);
                q.drain(..n).collect()
            };
            write(tx, items).await;
        }
    }
}

/// Writes one batch and answers its members.
async fn write(tx: WriteTx, mut items: Vec<Item>) {
    // Nobody waits for a cancelled request's credential: no lease for it.
    items.retain(|i| !i.reply.is_closed());
    if items.is_empty() {
        // Nothing touched the connection: nothing to keep.
        let _ = tx.commit().await;
        return;
    }
    let mut tx = tx;
    let written = match run(&mut tx, &mut items).await {
        Ok(written) => written,
        Err(e) => {
            tracing::warn!(error = %e, leases = items.len(), "a batch of lease writes failed; each is written alone");
            drop(tx);
            return answer_each(items, |_| Reply::Alone);
        }
    };
    if written.len() < items.len() {
        // Some task had ended: the batch's events were chained through its
        // lease, so none of the batch is kept (dropping it rolls back).
        drop(tx);
        return answer_each(items, |i| match written.get(&i.lease.id) {
            Some(_) => Reply::Alone,
            None => Reply::TaskEnded,
        });
    }
    match tx.keep() {
        Ok(durable) => answer_each(items, |i| Reply::Written {
            excluded: written.get(&i.lease.id).copied().unwrap_or(false),
            durable: durable.clone(),
        }),
        Err(_) => answer_each(items, |_| Reply::Alone),
    }
}

fn answer_each(items: Vec<Item>, reply: impl Fn(&Item) -> Reply) {
    for item in items {
        let r = reply(&item);
        // A request cancelled meanwhile does not need its answer.
        let _ = item.reply.send(r);
    }
}

/// One trip: the savepoint opens, the leases go in, and the events of
/// the batch, chained in order, follow. Returns each written lease and
/// whether its scope is excluded; the chain's head moves only when every
/// lease was written (the caller keeps the savepoint only then).
async fn run(tx: &mut WriteTx, items: &mut [Item]) -> StoreResult<HashMap<String, bool>> {
    let st = &*tx.state;
    let reads = st.head.is_none()
        || items
            .iter()
            .flat_map(|i| &i.events)
            .any(|ev| !st.knows_user(ev));
    if reads {
        // Reads for the chain run inside the savepoint (after a dropped
        // transaction's rows are rolled back), in a trip of their own.
        tx.begin_now().await?;
    }
    let st = &mut *tx.state;
    let mut head = st.chain_head().await?;
    let mut events = Vec::with_capacity(items.len() * 2);
    for item in items.iter_mut() {
        for mut ev in std::mem::take(&mut item.events) {
            st.name_user(&mut ev).await?;
            ev.chain_after(head.0, &head.1);
            head = (ev.seq, ev.hash.clone());
            events.push(PendingEvent::new(ev)?);
        }
    }
    let mut trip = tx.trip();
    push_lease_inserts(&mut trip.q, items.iter().map(|i| &i.lease))?;
    trip.q.push("; ");
    group::push_events(&mut trip.q, events);
    let r = trip.q.build().fetch_all(&mut tx.state.conn).await;
    let rows = trip.done(tx, r).await?;
    let mut written = HashMap::with_capacity(rows.len());
    for r in rows {
        written.insert(
            r.try_get::<String, _>("id")?,
            r.try_get::<bool, _>("excluded")?,
        );
    }
    if written.len() == items.len() {
        tx.state.head = Some(head);
    }
    Ok(written)
}

/// One statement writing `leases` (each with what was issued, for an
/// in-process provider), each only while its task is open; it returns the
/// id of each lease written and whether its agent's registry excludes its
/// scope. The one writer runs it alone, so an exclusion committed before
/// it is seen here, and one committed after it finds these leases when it
/// scans the agent's live leases.
pub(super) fn push_lease_inserts<'a>(
    q: &mut QueryBuilder<Sqlite>,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> StoreResult<()> {
    let rows = leases
        .into_iter()
        .map(|l| Ok((l, json_opt(l.handle.as_ref())?)))
        .collect::<StoreResult<Vec<_>>>()?;
    q.push(
        "INSERT INTO leases (id, agent_id, task_id, scope, provider, state, created_at, \
         expires_at, boot_id, source, handle, revocability) SELECT * FROM (",
    );
    q.push_values(rows, |mut v, (l, handle)| {
        v.push_bind(l.id.clone())
            .push_bind(l.agent_id.clone())
            .push_bind(l.task_id.clone())
            .push_bind(l.scope.clone())
            .push_bind(l.provider.clone())
            .push_bind(l.state.as_str())
            .push_bind(unix(l.created_at))
            .push_bind(unix(l.expires_at))
            .push_bind(l.boot_id.clone())
            .push_bind(l.source.clone())
            .push_bind(handle)
            .push_bind(l.revocability.map(|r| r.as_str()));
    });
    q.push(
        ") AS v WHERE EXISTS (SELECT 1 FROM tasks WHERE id = v.column3 AND state = 'open') \
         RETURNING id, EXISTS (SELECT 1 FROM agents, json_each(agents.excluded_scopes) AS x \
         WHERE agents.id = leases.agent_id AND x.key = leases.scope \
         AND json_extract(x.value, '$.lifted_at') IS NULL) AS excluded",
    );
    Ok(())
}
