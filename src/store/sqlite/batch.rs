//! Lease writes and task opens, batched: many requests' rows in one trip.
//!
//! Issuing a credential writes its lease and two audit events, and nothing
//! of that transaction is read back but whether the lease was written (its
//! task still open) and whether the registry excludes its scope. Opening a
//! task records the assertion's `jti`, writes the task, marks the agent used
//! and audits it, only while the agent is active and the parent task (if
//! any) open; only whether it was written is read back. So neither
//! write needs to be interactive: a request queues it as data, and one
//! batcher task takes every queued write at once and runs them in a single
//! trip to SQLite's thread, as one statement: a multi-row `INSERT` into a
//! temporary view whose triggers write each row where it belongs (the
//! `jti`s, the tasks and the agents' last use, the leases, then the
//! events, chained in queue order). With nothing else open on the
//! connection (alone, and usually under load) that statement runs in
//! autocommit: SQLite commits it, one fsync, before it returns. Otherwise
//! it runs in a savepoint of the open group and, in the same trip, commits
//! the group: the batch and every transaction kept in it before
//! (`group.rs`), one fsync, with no trip of its own for the commit. A lease
//! is reported written only once that commit is done: durable. Nothing
//! before the commit returns a row or ends a statement (each is a message
//! that wakes the batcher, and one before the fsync wakes it twice): the
//! statement commits only if every member went in, and which leases'
//! scopes the registry excludes is read after the commit, in the same
//! trip, on the one writer (nothing can land in between). Should that read
//! fail, the group is treated as failed although it committed, as when a
//! commit's outcome is unknown:
//! its members are refused (written alone, each finds its row already
//! there), a lease nobody received lives until its TTL; nothing is lost.
//!
//! Under load the writer no longer holds the connection for one trip per
//! credential, the cost that set the pace before; alone, a request pays one
//! task hand-off more than writing it itself, and one trip less than a
//! transaction committed by the flusher.
//!
//! What the batch cannot settle is handed back, and the request writes in
//! a transaction of its own, exactly as without the batcher: some member
//! was refused, a lease's task had ended, a `jti` had been seen, or a
//! task's agent was no longer active or its parent task no longer open (a
//! check in the trip stops it before the commit; the events were chained
//! through the refused member, so the savepoint is rolled back, and each
//! member writes alone, the refused learning it then: a `jti` used twice in
//! one batch is thus settled one at a time), or a statement of the batch failed
//! (nothing of the batch is kept). When the trip failed and cannot tell
//! whether before its commit or in it, the whole group is rolled back, as
//! when a commit fails: nobody is told a write landed that did not. A
//! request cancelled before the batch runs is left out of it. The agents of
//! a batch's opens are marked used at the latest open's time
//! (`last_used_at` is kept in seconds).

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use sqlx::Row as _;
use tokio::sync::{Mutex, Notify, oneshot, watch};

use super::group::{self, Outcome, PendingEvent, State, WriteTx};
use crate::audit::AuditEvent;
use crate::model::{Lease, Task, unix};
use crate::store::{JtiUse, LeaseInsert, StoreError, StoreResult, TaskOpen};

mod sql;
pub(super) use sql::{BATCH_ROWS, push_lease_inserts, push_task_insert};
use sql::{EXCLUDED, is_constraint, is_refusal, push_rows};

/// Most lease writes one trip carries (12 variables a lease and 17 an
/// event, well under SQLite's 32,766).
const MAX_BATCH: usize = 128;

/// Most agents whose `last_used_at` set by batches is remembered.
const KEEP_USED: usize = 50_000;

/// Lease writes waiting for the batcher.
#[derive(Default)]
pub(super) struct Queue {
    items: std::sync::Mutex<Vec<Item>>,
    pub(super) wake: Notify,
}

struct Item {
    write: Write,
    events: Vec<AuditEvent>,
    reply: oneshot::Sender<Reply>,
}

enum Write {
    Lease(Box<Lease>),
    Open(Box<(JtiUse, Task)>),
}

enum Reply {
    Written {
        excluded: bool,
        durable: watch::Receiver<Outcome>,
    },
    /// Not settled by the batch (a lease's task had ended, a `jti` had
    /// been seen, a statement failed): the request writes it alone.
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
        Ok(self
            .batched(Write::Lease(Box::new(lease.clone())), events)
            .await?
            .map(|excluded| LeaseInsert::Written {
                excluded: Some(excluded),
            }))
    }

    /// Opens `task` as [`crate::store::Store::open_task_recorded`] does, in
    /// the next batch; returns once durable. `None`: the batch could not
    /// settle it (a refusal among others), the caller opens it alone.
    pub(super) async fn open_task_batched(
        &self,
        jti: &JtiUse,
        task: &Task,
        events: &[AuditEvent],
    ) -> StoreResult<Option<TaskOpen>> {
        let write = Write::Open(Box::new((jti.clone(), task.clone())));
        Ok(self.batched(write, events).await?.map(|_| TaskOpen::Opened))
    }

    /// Queues `write`; `Some(excluded)`: written and durable (whether the
    /// registry excludes a lease's scope), `None`: write it alone.
    async fn batched(&self, write: Write, events: &[AuditEvent]) -> StoreResult<Option<bool>> {
        let (reply, answer) = oneshot::channel();
        self.batch.items().push(Item {
            write,
            events: events.to_vec(),
            reply,
        });
        self.batch.wake.notify_one();
        match answer.await {
            Ok(Reply::Written { excluded, durable }) => {
                group::durable(durable).await?;
                Ok(Some(excluded))
            }
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
            if queue.items().len() == 1 {
                // A lone write was most likely queued by the request whose
                // wake-up runs this task straight after it (tokio's LIFO
                // slot): requests already ready to run queue theirs first.
                // With more queued there is a batch to write now, and the
                // writer is not kept waiting behind every ready request.
                tokio::task::yield_now().await;
            }
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
    let done = match run(&mut tx, &mut items).await {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(error = %e, writes = items.len(), "a batch of writes failed; each is written alone");
            drop(tx);
            return answer_each(items, |_| Reply::Alone);
        }
    };
    if !done.committed {
        // Some member was refused: the batch's events were chained through
        // it, so none of the batch is kept (dropping it rolls back). Who
        // was refused learns it writing alone.
        drop(tx);
        return answer_each(items, |_| Reply::Alone);
    }
    let durable = tx.committed_in_trip();
    // The trip commits only when every member went in.
    answer_each(items, |i| Reply::Written {
        excluded: matches!(&i.write, Write::Lease(l) if done.excluded.contains(&l.id)),
        durable: durable.clone(),
    });
    tx.state.checkpoint_if_due().await;
}

/// What a batch's trip wrote.
#[derive(Default)]
struct Done {
    /// Every member was written and the trip committed the group.
    committed: bool,
    /// The leases whose agent's registry excludes their scope.
    excluded: HashSet<String>,
}

fn answer_each(items: Vec<Item>, reply: impl Fn(&Item) -> Reply) {
    for item in items {
        let r = reply(&item);
        // A request cancelled meanwhile does not need its answer.
        let _ = item.reply.send(r);
    }
}

/// One trip: the `jti`s, tasks and leases go in, the events of the batch,
/// chained in order, follow, all in one statement, and it is committed:
/// alone in autocommit, or in the open group's savepoint with the group's
/// commit, every transaction kept in it with the batch. The fsync of the
/// commit is the last thing the trip waits for, with no second trip for it.
/// A member refused (a `jti` not recorded, a task or a lease not written)
/// stops the statement before the commit (the refusal, `batch/sql.rs`):
/// nothing of the batch is kept and the group, if open, stays open for the
/// next; so does a constraint failing the batch's statement. Any other
/// failure of the trip rolls the whole group back: it cannot tell whether it failed before the commit or in
/// it, and nobody is told a write landed that did not. The chain's head
/// moves only when the trip committed.
async fn run(tx: &mut WriteTx, items: &mut [Item]) -> StoreResult<Done> {
    for item in items.iter() {
        if let Write::Open(o) = &item.write {
            // Its events name its user with no read (ids are never reused,
            // so a task rolled back with the batch misleads nobody).
            let user = o.1.on_behalf_of.as_ref().map(|u| u.id.clone());
            tx.state.remember_user(&o.1.id, user);
        }
    }
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
    let (mut leases, mut opens) = (Vec::new(), Vec::new());
    for item in items.iter() {
        match &item.write {
            Write::Lease(l) => leases.push(&**l),
            Write::Open(o) => opens.push(&**o),
        }
    }
    // The agents of the opens are marked used at the latest open's second:
    // a change to what a task open remembers (`current.rs`) only when that
    // moves an agent's `last_used_at`, once a second at most.
    let used = opens.iter().map(|o| unix(o.1.opened_at)).max();
    let moved = used.filter(|u| {
        opens
            .iter()
            .any(|o| st.last_used.get(&o.1.agent_id) != Some(u))
    });
    st.changed |= moved.is_some();
    // Alone on the connection (no group open, as at one client and usually
    // under load), the batch is one statement in autocommit: SQLite commits
    // it, fsync and all, before the statement returns. Otherwise it runs in
    // the group's savepoint and the trip commits the group.
    let alone = tx.trip_alone();
    let in_group = alone.is_none();
    let mut trip = alone.unwrap_or_else(|| tx.trip());
    push_rows(&mut trip.q, &opens, used, &leases, events)?;
    if in_group {
        trip.q.push("COMMIT");
    }
    // Nothing before the commit returns a row or ends a statement: each is
    // a message from SQLite's thread that wakes this task, and one sent
    // before the fsync wakes it once more than the commit does (so a trip
    // in the group still sends one: its savepoint's opening). Past the
    // commit, on the one writer, nothing else can have landed: which
    // leases' scopes are excluded is what it was when they went in
    // (usually none: no row).
    let ids: Vec<&str> = leases.iter().map(|l| l.id.as_str()).collect();
    if !ids.is_empty() {
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        trip.q
            .push("; SELECT id FROM leases WHERE id IN (SELECT value FROM json_each(")
            .push_bind(ids)
            .push(")) AND ")
            .push(EXCLUDED);
    }
    let r = trip.q.build().fetch_all(&mut tx.state.conn).await;
    let rows = match r {
        Err(e) if is_refusal(&e) => {
            // Stopped before the commit: alone, nothing of it is kept; in
            // the group, the savepoint is open.
            trip.done(tx, Ok(())).await?;
            return Ok(Done::default());
        }
        // A constraint fails a statement, never the commit (none is
        // deferred): when the trip had no one else's statements (alone, or
        // not an opening), it failed this batch's, before the commit.
        Err(e) if !trip.opening() && is_constraint(&e) => return trip.done(tx, Err(e)).await,
        Err(e) => return Err(tx.state.abort(e).await),
        Ok(rows) => trip.done(tx, Ok(rows)).await?,
    };
    // The trip committed: the refusal checks let it only with every member
    // written.
    let done = Done {
        committed: true,
        excluded: rows
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?,
    };
    if let Some(used) = moved {
        let st = &mut *tx.state;
        if st.last_used.len() >= KEEP_USED {
            st.last_used.clear();
        }
        for o in &opens {
            st.last_used.insert(o.1.agent_id.clone(), used);
        }
    }
    tx.state.head = Some(head);
    Ok(done)
}
