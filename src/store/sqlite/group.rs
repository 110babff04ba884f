//! Group commit: many write transactions, one fsync.
//!
//! Every write transaction runs on the one writer connection, inside a
//! savepoint of an outer `BEGIN IMMEDIATE` transaction. Committing keeps
//! the savepoint's changes and waits for the flusher to commit the outer
//! transaction, so a commit returns only once its rows are on disk (WAL,
//! `synchronous=FULL`). Transactions that commit while the previous group
//! is being written share the next group's fsync; under load the group
//! grows with the queue, alone a transaction pays one fsync as before. The
//! batcher of lease writes and task opens (`batch.rs`) commits the group in
//! its own trip instead, with whatever is kept in it.
//!
//! Every trip to SQLite's thread costs two thread wake-ups, so nothing
//! gets a trip of its own that can ride along with another:
//! - a transaction's savepoint is opened by its first statement's trip
//!   (`WriteTx::opening`), or by the first call that needs the connection;
//!   a transaction that never touches it costs nothing;
//! - a committed savepoint is released by whoever uses the connection
//!   next, in the trip that opens their own (or by the outer `COMMIT`);
//! - audit events are chained at once (the writer keeps the chain's head)
//!   and inserted, still inside their savepoint, in the trip that releases
//!   it; so are statements whose outcome nobody reads (`WriteTx::defer`),
//!   or with the transaction's own next statement, whichever comes first.
//!   One of them failing fails the trip that carries it: its own
//!   transaction's statement, or the whole group when it is another's
//!   opening or the outer commit (nobody is told a failed write landed).
//!
//! A transaction dropped without commit (an error, a cancelled request)
//! leaves its savepoint open; whoever uses the connection next rolls back
//! to it first, so it takes nothing else with it. If SQLite itself fails
//! (a savepoint, a deferred insert or the outer commit), the whole group is
//! rolled back and every transaction waiting on it gets the error: nobody
//! is told a write is durable unless it is. The read pool sees a group only
//! once it is committed, so nothing is read before it is durable.
//!
//! Checkpoints: `checkpoint.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::query_builder::Separated;
use sqlx::{Executor, QueryBuilder, Sqlite, SqliteConnection};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, watch};

use crate::audit::AuditEvent;
use crate::store::{StoreError, StoreResult};

/// The writer's busy timeout otherwise (as the store opens it).
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How a group ended: `None` while it is open.
pub(super) type Outcome = Option<Result<(), String>>;

/// The writer connection and the group being built on it.
pub(super) struct State {
    pub(super) conn: SqliteConnection,
    /// The outer transaction is open.
    open: bool,
    /// What the last transaction left on the connection.
    savepoint: Savepoint,
    /// Transactions committed into the open group.
    members: usize,
    group: watch::Sender<Outcome>,
    /// The audit chain's head (seq, hash) as the connection sees it, so an
    /// event needs no read first; `None`: read it from the table.
    pub(super) head: Option<(i64, String)>,
    /// The head when the open savepoint was taken, restored on rollback.
    head_at_savepoint: Option<(i64, String)>,
    /// Each task's user (`on_behalf_of`), which never changes once the task
    /// exists; bounded.
    pub(super) users: HashMap<String, Option<String>>,
    /// Audit events of the open savepoint, chained, not yet inserted.
    pub(super) deferred: Vec<PendingEvent>,
    /// Statements of the open savepoint whose outcome nobody reads (a new
    /// task's row), not yet run: they ride with the next trip.
    later: QueryBuilder<Sqlite>,
    /// How many statements `later` holds.
    later_count: usize,
    /// When and how to checkpoint the WAL.
    pub(super) checkpoints: super::checkpoint::Checkpoints,
    /// Counts the groups that changed something a session check or a task
    /// open may have remembered (`current.rs`), once each, after its commit.
    pub(super) changes: Arc<AtomicU64>,
    /// The open group changes such a thing.
    pub(super) changed: bool,
    /// The `last_used_at` batches of task opens gave each agent since the
    /// last other change (`batch.rs`); bounded.
    pub(super) last_used: HashMap<String, i64>,
}

/// A chained audit event waiting for its insert, with its JSON columns.
pub(super) struct PendingEvent {
    pub(super) ev: AuditEvent,
    pub(super) policy_ids: String,
    pub(super) details: String,
}

/// The savepoint of the last transaction on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Savepoint {
    /// None open.
    None,
    /// Open: a transaction runs on it, or was dropped (roll it back).
    Open,
    /// Open in SQLite, but its transaction was dropped and forgotten here:
    /// rolled back by the next trip.
    Dropped,
    /// Committed; released by the next statement batch or the outer commit.
    Kept,
}

/// The shared writer: a fair (FIFO) lock over the connection, and the
/// flusher's wake-up.
pub(super) struct Writer {
    state: Arc<Mutex<State>>,
    flush: Arc<Notify>,
    /// Lease writes waiting for the batcher (`batch.rs`).
    pub(super) batch: Arc<super::batch::Queue>,
    /// The count of changing groups (`State::changes`).
    pub(super) changes: Arc<AtomicU64>,
}

/// A write transaction holding the writer connection.
pub(super) struct WriteTx {
    pub(super) state: OwnedMutexGuard<State>,
    flush: Arc<Notify>,
    committed: bool,
    /// Its savepoint is open (the first trip on the connection opens it).
    begun: bool,
    /// A trip carrying its deferred statements failed: they may not have
    /// run, so it cannot commit.
    poisoned: bool,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Lets the flusher and the batcher see that the store is gone.
        self.flush.notify_one();
        self.batch.wake.notify_one();
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if !self.committed {
            // The flusher rolls the savepoint back and closes the outer
            // transaction if nobody else takes the connection first.
            self.flush.notify_one();
        }
    }
}

impl Writer {
    /// Takes over `conn` (migrated, in autocommit) and starts the flusher.
    pub(super) fn start(
        conn: SqliteConnection,
        checkpoints: super::checkpoint::Checkpoints,
    ) -> Self {
        let changes = Arc::new(AtomicU64::new(0));
        let state = Arc::new(Mutex::new(State {
            conn,
            open: false,
            savepoint: Savepoint::None,
            members: 0,
            group: watch::channel(None).0,
            head: None,
            head_at_savepoint: None,
            users: HashMap::new(),
            deferred: Vec::new(),
            later: QueryBuilder::default(),
            later_count: 0,
            checkpoints,
            changes: Arc::clone(&changes),
            changed: false,
            last_used: HashMap::new(),
        }));
        let flush = Arc::new(Notify::new());
        let batch = Arc::new(super::batch::Queue::default());
        tokio::spawn(flusher(Arc::downgrade(&state), Arc::clone(&flush)));
        tokio::spawn(super::batch::batcher(
            Arc::downgrade(&state),
            Arc::clone(&flush),
            Arc::clone(&batch),
        ));
        Self {
            state,
            flush,
            batch,
            changes,
        }
    }

    /// Waits for the connection (in arrival order). The savepoint opens
    /// with the first trip that uses it.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx> {
        Ok(begin_on(Arc::clone(&self.state), Arc::clone(&self.flush)).await)
    }
}

/// Waits for the connection behind `state` (in arrival order).
pub(super) async fn begin_on(state: Arc<Mutex<State>>, flush: Arc<Notify>) -> WriteTx {
    let mut state = state.lock_owned().await;
    if state.savepoint == Savepoint::Open {
        // Left by a dropped transaction: none of it is kept.
        state.discard_savepoint();
        state.savepoint = Savepoint::Dropped;
    }
    WriteTx {
        state,
        flush,
        committed: false,
        begun: false,
        poisoned: false,
    }
}

/// Waits until the group behind `done` is durable (or rolled back).
pub(super) async fn durable(mut done: watch::Receiver<Outcome>) -> StoreResult<()> {
    let outcome = done
        .wait_for(Option::is_some)
        .await
        .map_err(|_| StoreError::Database("the store closed before the commit".into()))?
        .clone();
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(StoreError::Database(format!("commit failed: {e}"))),
        None => Err(StoreError::Database("commit outcome lost".into())),
    }
}

impl WriteTx {
    /// Keeps the savepoint's changes in the group (released later, with no
    /// round trip of its own) and waits until the group is durable.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        if !self.begun {
            // Nothing was written: nothing to keep or wait for.
            self.committed = true;
            return Ok(());
        }
        durable(self.keep()?).await
    }

    /// Keeps the savepoint's changes in the group and hands the connection
    /// on; the receiver learns when the group is durable ([`durable`]).
    pub(super) fn keep(mut self) -> StoreResult<watch::Receiver<Outcome>> {
        if self.poisoned {
            // Dropped uncommitted: the savepoint is rolled back.
            return Err(StoreError::Database(
                "a statement of this transaction failed; nothing of it was kept".into(),
            ));
        }
        let st = &mut *self.state;
        st.savepoint = Savepoint::Kept;
        st.members += 1;
        // Whatever it wrote, it may have changed a task or an agent, their
        // `last_used_at` included.
        st.changed = true;
        st.last_used.clear();
        let done = st.group.subscribe();
        self.committed = true;
        let flush = Arc::clone(&self.flush);
        drop(self); // hands the connection to the next in line
        flush.notify_one();
        Ok(done)
    }
}

impl WriteTx {
    /// The trip that ran this transaction's statements also committed the
    /// outer transaction (`…; COMMIT`, see `batch.rs`): the group ends,
    /// durable, and its members learn it. The receiver (already answered)
    /// tells the same to whoever this transaction wrote for. The caller
    /// checkpoints after answering them ([`State::checkpoint_if_due`]).
    pub(super) fn committed_in_trip(&mut self) -> watch::Receiver<Outcome> {
        let st = &mut *self.state;
        let done = st.group.subscribe();
        st.finish(Ok(()));
        self.committed = true;
        done
    }

    /// The next trip for the caller to append its statement to (with what
    /// must run first: the savepoint's opening, this transaction's deferred
    /// statements); run it, then hand its result to [`Trip::done`].
    pub(super) fn trip(&mut self) -> Trip {
        let opening = !self.begun;
        let st = &mut *self.state;
        let tail = if !opening {
            ""
        } else {
            match (st.open, st.savepoint) {
                (false, _) => "BEGIN IMMEDIATE; SAVEPOINT kg; ",
                (true, Savepoint::None) => "SAVEPOINT kg; ",
                (true, Savepoint::Kept) => "RELEASE kg; SAVEPOINT kg; ",
                (true, Savepoint::Open | Savepoint::Dropped) => {
                    "ROLLBACK TO kg; RELEASE kg; SAVEPOINT kg; "
                }
            }
        };
        let carries = st.later_count > 0;
        let q = if opening || carries {
            st.with_deferred(tail)
        } else {
            QueryBuilder::default()
        };
        Trip {
            q,
            opening,
            carries: !opening && carries,
        }
    }

    /// A trip for one statement run alone, in autocommit, when nothing is
    /// open on the connection (no group, no savepoint of this transaction):
    /// SQLite commits it, fsync included, before the statement returns, so
    /// the trip sends nothing back before its rows are durable (`batch.rs`).
    /// A failed statement leaves nothing behind. `None`: something is open;
    /// take [`WriteTx::trip`] and commit the group in it.
    pub(super) fn trip_alone(&mut self) -> Option<Trip> {
        let st = &*self.state;
        if self.begun || st.open {
            return None;
        }
        debug_assert!(st.savepoint == Savepoint::None && st.later_count == 0);
        debug_assert!(st.deferred.is_empty());
        Some(Trip {
            q: QueryBuilder::default(),
            opening: false,
            carries: false,
        })
    }

    /// Opens the savepoint now, in a trip of its own, if no statement has.
    pub(super) async fn begin_now(&mut self) -> StoreResult<()> {
        if !self.begun {
            let mut trip = self.trip();
            let r = trip.q.build().execute(&mut self.state.conn).await;
            trip.done(self, r).await?;
        }
        Ok(())
    }

    /// The connection, inside this transaction's savepoint, with its
    /// deferred statements run (in a trip of their own, if any wait).
    pub(super) async fn conn(&mut self) -> StoreResult<&mut SqliteConnection> {
        if !self.begun || self.state.later_count > 0 {
            let mut trip = self.trip();
            let r = trip.q.build().execute(&mut self.state.conn).await;
            trip.done(self, r).await?;
        }
        Ok(&mut self.state.conn)
    }

    /// Queues a statement whose outcome nobody reads, to run inside this
    /// transaction's savepoint with the next trip; `push` appends it (one
    /// statement, `?` placeholders) to the builder.
    pub(super) async fn defer(
        &mut self,
        push: impl FnOnce(&mut QueryBuilder<Sqlite>),
    ) -> StoreResult<()> {
        self.begin_now().await?;
        let st = &mut *self.state;
        push(&mut st.later);
        st.later.push("; ");
        st.later_count += 1;
        Ok(())
    }
}

/// One trip to SQLite's thread, built by [`WriteTx::trip`].
pub(super) struct Trip {
    pub(super) q: QueryBuilder<Sqlite>,
    opening: bool,
    /// It runs this transaction's deferred statements.
    carries: bool,
}

impl Trip {
    /// It opens the savepoint, after statements of other transactions.
    pub(super) fn opening(&self) -> bool {
        self.opening
    }

    /// Notes the savepoint open after an opening trip. A failed opening
    /// rolls back the whole group (what failed may be another
    /// transaction's release or its deferred writes); a failed trip of an
    /// open savepoint fails this transaction only.
    pub(super) async fn done<T>(
        self,
        tx: &mut WriteTx,
        r: Result<T, sqlx::Error>,
    ) -> StoreResult<T> {
        let st = &mut *tx.state;
        match r {
            Ok(v) => {
                if self.opening {
                    st.open = true;
                    st.savepoint = Savepoint::Open;
                    st.head_at_savepoint = st.head.clone();
                    tx.begun = true;
                }
                Ok(v)
            }
            Err(e) if self.opening => Err(st.abort(e).await),
            Err(e) => {
                tx.poisoned |= self.carries;
                Err(e.into())
            }
        }
    }
}

impl State {
    /// Notes the user a task acts for (ids are never reused, so even a
    /// task whose insert is rolled back cannot mislead a later event).
    pub(super) fn remember_user(&mut self, task: &str, user: Option<String>) {
        /// How many tasks' users are kept.
        const KEEP: usize = 50_000;
        if self.users.len() >= KEEP {
            self.users.clear();
        }
        self.users.insert(task.to_owned(), user);
    }

    /// Forgets what a dropped transaction did: its events and its head.
    fn discard_savepoint(&mut self) {
        self.deferred.clear();
        self.later = QueryBuilder::default();
        self.later_count = 0;
        self.head = self.head_at_savepoint.take();
    }

    /// `tail`, preceded by the deferred statements and the inserts of the
    /// deferred audit events.
    fn with_deferred(&mut self, tail: &str) -> QueryBuilder<Sqlite> {
        let mut q = std::mem::take(&mut self.later);
        self.later_count = 0;
        push_events(&mut q, std::mem::take(&mut self.deferred));
        q.push(tail);
        q
    }

    /// Commits the outer transaction (with every kept savepoint and its
    /// events) after rolling back one a dropped transaction left open.
    async fn flush(&mut self) -> Result<(), sqlx::Error> {
        let tail = match self.savepoint {
            Savepoint::Open => {
                self.discard_savepoint();
                "ROLLBACK TO kg; RELEASE kg; COMMIT"
            }
            Savepoint::Dropped => "ROLLBACK TO kg; RELEASE kg; COMMIT",
            Savepoint::None | Savepoint::Kept => "COMMIT",
        };
        let mut q = self.with_deferred(tail);
        q.build().execute(&mut self.conn).await.map(|_| ())
    }

    /// Rolls back the whole group after SQLite failed, tells its members,
    /// and returns the error for the caller.
    pub(super) async fn abort(&mut self, e: sqlx::Error) -> StoreError {
        // The outer transaction may already be gone (SQLite rolls back on
        // some errors, or it never began); either way nothing of it is kept.
        let _ = self.conn.execute("ROLLBACK").await;
        self.finish(Err(format!("the group was rolled back: {e}")));
        e.into()
    }

    /// Ends the group: members waiting on it learn `result`.
    pub(super) fn finish(&mut self, result: Result<(), String>) {
        if result.is_err() {
            self.head = None;
            self.last_used.clear();
        }
        if self.changed || result.is_err() {
            // Before the members learn it: each returns only once what was
            // read before the change is no longer answered from memory.
            self.changes.fetch_add(1, Ordering::AcqRel);
            self.changed = false;
        }
        self.deferred.clear();
        self.later = QueryBuilder::default();
        self.later_count = 0;
        self.open = false;
        self.savepoint = Savepoint::None;
        self.members = 0;
        let group = std::mem::replace(&mut self.group, watch::channel(None).0);
        group.send_replace(Some(result));
    }
}

/// Appends the inserts of chained `events` (in order) to `q`.
pub(super) fn push_events(q: &mut QueryBuilder<Sqlite>, events: Vec<PendingEvent>) {
    /// Events per `INSERT` (17 columns each; SQLite allows 32,766 variables).
    const CHUNK: usize = 500;
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        q.push(
            "INSERT INTO audit_events (seq, at_ms, actor, action, agent, task, scope, \
             lease, decision, policy_ids, policy_hash, outcome, reason, details, prev_hash, \
             hash, on_behalf_of) ",
        );
        q.push_values(events.by_ref().take(CHUNK), |mut b, p| {
            bind_event(&mut b, p)
        });
        q.push("; ");
    }
}

/// Binds the 17 columns of an audit event's row, in `audit_events`' order.
pub(super) fn bind_event(b: &mut Separated<'_, Sqlite, &'static str>, p: PendingEvent) {
    let ev = p.ev;
    b.push_bind(ev.seq)
        .push_bind(ev.at_ms)
        .push_bind(ev.actor)
        .push_bind(ev.action)
        .push_bind(ev.agent)
        .push_bind(ev.task)
        .push_bind(ev.scope)
        .push_bind(ev.lease)
        .push_bind(ev.decision)
        .push_bind(p.policy_ids)
        .push_bind(ev.policy_hash)
        .push_bind(ev.outcome)
        .push_bind(ev.reason)
        .push_bind(p.details)
        .push_bind(ev.prev_hash)
        .push_bind(ev.hash)
        .push_bind(ev.on_behalf_of);
}

/// Commits each group once the transactions queued before it have joined.
async fn flusher(state: Weak<Mutex<State>>, flush: Arc<Notify>) {
    loop {
        flush.notified().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        // Fair lock: every transaction already waiting runs (and joins the
        // group) before the flusher gets the connection.
        let mut st = state.lock().await;
        if !st.open {
            continue;
        }
        match st.flush().await {
            Ok(()) => st.finish(Ok(())),
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; its transactions are rolled back");
                let _ = st.abort(e).await;
                continue;
            }
        }
        st.checkpoint_if_due().await;
    }
}
