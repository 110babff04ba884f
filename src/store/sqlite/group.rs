//! Group commit: many write transactions, one fsync.
//!
//! Every write transaction runs on the one writer connection, inside a
//! savepoint of an outer `BEGIN IMMEDIATE` transaction. Committing releases
//! the savepoint and then waits for the flusher to commit the outer
//! transaction, so a commit returns only once its rows are on disk (WAL,
//! `synchronous=FULL`). Transactions that commit while the previous group
//! is being written share the next group's fsync; under load the group
//! grows with the queue, alone a transaction pays one fsync as before.
//!
//! A transaction dropped without commit (an error, a cancelled request)
//! leaves its savepoint open; whoever takes the connection next rolls back
//! to it first, so it takes nothing else with it. If SQLite itself fails
//! (a savepoint or the outer commit), the whole group is rolled back and
//! every transaction waiting on it gets the error: nobody is told a write
//! is durable unless it is. The read pool sees a group only once it is
//! committed, so nothing is read before it is durable.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use sqlx::{Executor, SqliteConnection};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, watch};

use crate::store::{StoreError, StoreResult};

/// How a group ended: `None` while it is open.
type Outcome = Option<Result<(), String>>;

/// The writer connection and the group being built on it.
pub(super) struct State {
    pub(super) conn: SqliteConnection,
    /// The outer transaction is open.
    open: bool,
    /// A savepoint is open: a transaction runs, or was dropped mid-way.
    savepoint: bool,
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
}

/// The shared writer: a fair (FIFO) lock over the connection, and the
/// flusher's wake-up.
pub(super) struct Writer {
    state: Arc<Mutex<State>>,
    flush: Arc<Notify>,
}

/// A write transaction holding the writer connection.
pub(super) struct WriteTx {
    pub(super) state: OwnedMutexGuard<State>,
    flush: Arc<Notify>,
    committed: bool,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Lets the flusher see that the store is gone.
        self.flush.notify_one();
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
    pub(super) fn start(conn: SqliteConnection) -> Self {
        let state = Arc::new(Mutex::new(State {
            conn,
            open: false,
            savepoint: false,
            members: 0,
            group: watch::channel(None).0,
            head: None,
            head_at_savepoint: None,
            users: HashMap::new(),
        }));
        let flush = Arc::new(Notify::new());
        tokio::spawn(flusher(Arc::downgrade(&state), Arc::clone(&flush)));
        Self { state, flush }
    }

    /// Waits for the connection (in arrival order) and opens a savepoint.
    pub(super) async fn begin(&self) -> StoreResult<WriteTx> {
        let mut state = Arc::clone(&self.state).lock_owned().await;
        state.settle().await?;
        if !state.open {
            if let Err(e) = state.conn.execute("BEGIN IMMEDIATE").await {
                return Err(e.into());
            }
            state.open = true;
        }
        if let Err(e) = state.conn.execute("SAVEPOINT kg").await {
            return Err(state.abort(e).await);
        }
        state.savepoint = true;
        state.head_at_savepoint = state.head.clone();
        Ok(WriteTx {
            state,
            flush: Arc::clone(&self.flush),
            committed: false,
        })
    }
}

impl WriteTx {
    /// Releases the savepoint into the group and waits until the group is
    /// durable.
    pub(super) async fn commit(mut self) -> StoreResult<()> {
        let st = &mut *self.state;
        if let Err(e) = st.conn.execute("RELEASE kg").await {
            return Err(st.abort(e).await);
        }
        st.savepoint = false;
        st.members += 1;
        let mut done = st.group.subscribe();
        self.committed = true;
        let flush = Arc::clone(&self.flush);
        drop(self); // hands the connection to the next in line
        flush.notify_one();
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

    /// Rolls back the savepoint a dropped transaction left open.
    async fn settle(&mut self) -> StoreResult<()> {
        if self.savepoint {
            if let Err(e) = self.conn.execute("ROLLBACK TO kg; RELEASE kg").await {
                return Err(self.abort(e).await);
            }
            self.savepoint = false;
            self.head = self.head_at_savepoint.take();
        }
        Ok(())
    }

    /// Rolls back the whole group after SQLite failed, tells its members,
    /// and returns the error for the caller.
    async fn abort(&mut self, e: sqlx::Error) -> StoreError {
        if self.open {
            // The outer transaction may already be gone (SQLite rolls back
            // on some errors); either way nothing of it is kept.
            let _ = self.conn.execute("ROLLBACK").await;
        }
        self.finish(Err(format!("the group was rolled back: {e}")));
        e.into()
    }

    /// Ends the group: members waiting on it learn `result`.
    fn finish(&mut self, result: Result<(), String>) {
        if result.is_err() {
            self.head = None;
        }
        self.open = false;
        self.savepoint = false;
        self.members = 0;
        let group = std::mem::replace(&mut self.group, watch::channel(None).0);
        group.send_replace(Some(result));
    }
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
        if st.settle().await.is_err() || !st.open {
            continue;
        }
        match st.conn.execute("COMMIT").await {
            Ok(_) => st.finish(Ok(())),
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; its transactions are rolled back");
                let _ = st.abort(e).await;
            }
        }
    }
}
