//! The read connections: a few read-only connections, each handed to one
//! reader at a time.
//!
//! Not `sqlx::Pool`: for every read it pings the connection when handing
//! it out (`test_before_acquire`) and again when taking it back (always).
//! Each ping is a round trip to the connection's SQLite thread, two thread
//! wake-ups: a read cost three round trips instead of one, and those
//! wake-ups were the largest share of the server's CPU under load. A ping
//! finds a dropped network connection; a SQLite connection is a file
//! handle in this process, and a failed statement leaves it usable (SQLite
//! resets the statement), so nothing here needs one.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::{StoreError, StoreResult};

/// Up to `size` read-only connections, opened on first need (a clone
/// shares them).
#[derive(Clone)]
pub(super) struct Reads {
    opts: SqliteConnectOptions,
    idle: Arc<Mutex<Vec<SqliteConnection>>>,
    permits: Arc<Semaphore>,
}

/// One connection, lent to one reader; back to the idle list on drop.
pub(super) struct ReadConn {
    conn: Option<SqliteConnection>,
    idle: Arc<Mutex<Vec<SqliteConnection>>>,
    _permit: OwnedSemaphorePermit,
}

impl Reads {
    pub(super) fn new(opts: SqliteConnectOptions, size: usize) -> Self {
        Self {
            opts: opts.read_only(true),
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// A connection of its own for one read (waits while all are lent).
    pub(super) async fn get(&self) -> StoreResult<ReadConn> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Database("the store is closed".into()))?;
        let idle = self.idle.lock().map(|mut v| v.pop()).unwrap_or_default();
        let conn = match idle {
            Some(c) => c,
            None => self.opts.connect().await?,
        };
        Ok(ReadConn {
            conn: Some(conn),
            idle: Arc::clone(&self.idle),
            _permit: permit,
        })
    }
}

impl Deref for ReadConn {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        // Set from construction until drop.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for ReadConn {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for ReadConn {
    fn drop(&mut self) {
        // A reader cancelled mid-statement leaves the connection busy until
        // its thread notices; the next reader's statement queues behind it.
        if let (Some(c), Ok(mut idle)) = (self.conn.take(), self.idle.lock()) {
            idle.push(c);
        }
    }
}
