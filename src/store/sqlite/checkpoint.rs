//! Checkpoints: the WAL copied into the database and restarted, mostly off
//! the writer's path.
//!
//! With readers always active, SQLite's automatic checkpoint never gets to
//! restart the WAL, which then grows without bound and makes every later
//! commit try (and pay for) a checkpoint again. So the writer restarts it
//! itself once it holds about [`WAL_LIMIT_FRAMES`], with a `RESTART`
//! checkpoint after a commit: it waits at most 20 ms for readers of old
//! snapshots, and the next group writes the WAL from its beginning again.
//! The file keeps its size, so a commit overwrites blocks the file already
//! has and its fsync flushes data only; a truncated WAL would grow again
//! and every fsync would also commit the file system's journal (its new
//! size).
//!
//! A checkpoint copies every page the WAL holds into the database and
//! syncs it: milliseconds during which the writer, and every request
//! waiting on it, would stand still. So when one is due, a connection of
//! its own first copies the WAL in the background (`PASSIVE`: it takes no
//! lock a writer needs) while groups go on committing; once it is done,
//! the writer's `RESTART` has only the pages committed meanwhile left to
//! copy. Whatever the copier did or failed to do, the `RESTART` copies
//! the rest, so it only ever shortens the writer's part.
//!
//! The WAL's length is not known between checkpoints, so whoever commits
//! (the flusher, the batcher) counts groups: each restart reports how many
//! frames the groups since the last one wrote, which sets how many groups
//! to wait for next. Should larger groups come, the file outgrowing
//! [`WAL_FILE_LIMIT`] (to which SQLite cuts it back at each restart,
//! `journal_size_limit`) has the writer restart it at once, or as soon as
//! a copy under way is done (a restart during one would only wait for its
//! lock and give up).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Executor, SqliteConnection};
use tokio::sync::mpsc;

use super::group::State;

/// WAL frames (pages written) past which the WAL is checkpointed and
/// restarted: about 8 MiB of 4 KiB pages.
const WAL_LIMIT_FRAMES: u64 = 2048;
/// The WAL file's size past which it is restarted whatever the count
/// says; SQLite cuts it back to this at each restart (`journal_size_limit`).
pub(super) const WAL_FILE_LIMIT: u64 = 16 << 20;
/// How long after a busy checkpoint the next is tried.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// When to checkpoint, where the WAL is, and the background copier.
pub(super) struct Checkpoints {
    pace: Pace,
    wal: PathBuf,
    copier: Option<Copier>,
}

/// The writer's side of the background copier.
struct Copier {
    ask: mpsc::Sender<u64>,
    /// The last copy asked for.
    asked: u64,
    /// A copy was asked for the checkpoint due.
    copying: bool,
    /// The last copy done.
    done: Arc<AtomicU64>,
}

impl Checkpoints {
    /// Checkpoints for the WAL at `wal`, copied in the background on
    /// `copier` (a connection of its own to the same database) if given.
    pub(super) fn new(wal: PathBuf, copier: Option<SqliteConnection>) -> Self {
        let copier = copier.map(|conn| {
            let (ask, asks) = mpsc::channel(1);
            let done = Arc::new(AtomicU64::new(0));
            tokio::spawn(copy_when_asked(conn, asks, Arc::clone(&done)));
            Copier {
                ask,
                asked: 0,
                copying: false,
                done,
            }
        });
        Self {
            pace: Pace::new(),
            wal,
            copier,
        }
    }
}

/// What a commit found.
#[derive(PartialEq, Eq)]
enum Wal {
    /// No checkpoint due.
    Short,
    /// The WAL holds about [`WAL_LIMIT_FRAMES`].
    Full,
    /// The WAL file outgrew [`WAL_FILE_LIMIT`]: restart it now.
    Overgrown,
}

impl State {
    /// After a group's commit (its members told): starts the background
    /// copy of the WAL when a checkpoint is due, and restarts the WAL once
    /// the copy is done (at once when the file outgrew its limit and no
    /// copy runs).
    pub(super) async fn checkpoint_if_due(&mut self) {
        let cp = &mut self.checkpoints;
        let due = cp.pace.committed(&cp.wal);
        if due == Wal::Short {
            return;
        }
        if let Some(c) = &mut cp.copier {
            if c.copying {
                if c.done.load(Ordering::Acquire) != c.asked {
                    // The copy runs, holding SQLite's checkpoint lock: a
                    // restart now would only wait for it and give up. The
                    // writer goes on; the first commit after the copy
                    // restarts the WAL, even one past its limit.
                    return;
                }
            } else if due == Wal::Full {
                // Copy first, in the background; restart once it is done.
                c.asked += 1;
                if c.ask.try_send(c.asked).is_ok() {
                    c.copying = true;
                    return;
                }
                // The copier is gone: the restart copies it all.
            }
        }
        let frames = self.restart().await;
        self.checkpoints.pace.checkpointed(frames);
        if let Some(c) = &mut self.checkpoints.copier {
            c.copying = false;
        }
    }

    /// Copies what is left of the WAL into the database and has the next
    /// group restart it, waiting at most 20 ms for readers of older
    /// snapshots. Returns the frames the WAL held, or `None` if it could
    /// not get through.
    async fn restart(&mut self) -> Option<u64> {
        let started = Instant::now();
        let _ = self.conn.execute("PRAGMA busy_timeout = 20").await;
        let done: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
            .fetch_one(&mut self.conn)
            .await;
        let _ = self.conn.execute("PRAGMA busy_timeout = 10000").await; // BUSY_TIMEOUT
        match done {
            Ok((0, frames, _)) => {
                tracing::debug!(
                    frames,
                    took_ms = started.elapsed().as_millis(),
                    "restarted the wal"
                );
                Some(u64::try_from(frames).unwrap_or(0))
            }
            Ok(_) => {
                tracing::debug!("checkpoint busy (a long read); retrying later");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint failed; the WAL grows until one succeeds");
                None
            }
        }
    }
}

/// Copies the WAL into the database each time it is asked (`PASSIVE`:
/// whatever no reader still needs, with no lock a writer waits for), then
/// says which ask it answered. Ends with the store.
async fn copy_when_asked(
    mut conn: SqliteConnection,
    mut asks: mpsc::Receiver<u64>,
    done: Arc<AtomicU64>,
) {
    while let Some(ask) = asks.recv().await {
        let started = Instant::now();
        let copied: Result<(i64, i64, i64), _> = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut conn)
            .await;
        match copied {
            Ok((_, frames, copied)) => tracing::debug!(
                frames,
                copied,
                took_ms = started.elapsed().as_millis(),
                "copied the wal in the background"
            ),
            // The writer's restart copies it all instead.
            Err(e) => tracing::warn!(error = %e, "background checkpoint failed"),
        }
        done.store(ask, Ordering::Release);
    }
}

/// When to checkpoint: after how many groups, learnt from what each
/// restart reports.
struct Pace {
    /// Groups committed since the last restart.
    groups: u64,
    /// Groups expected to fill the WAL to [`WAL_LIMIT_FRAMES`].
    every: u64,
    /// No checkpoint before this (one was busy).
    not_before: Instant,
}

impl Pace {
    fn new() -> Self {
        Self {
            groups: 0,
            every: 64,
            not_before: Instant::now(),
        }
    }

    /// A group was committed: is a checkpoint due?
    fn committed(&mut self, wal: &std::path::Path) -> Wal {
        self.groups += 1;
        if Instant::now() < self.not_before {
            Wal::Short
        } else if self.groups >= self.every {
            Wal::Full
        } else if std::fs::metadata(wal).is_ok_and(|m| m.len() > WAL_FILE_LIMIT) {
            Wal::Overgrown
        } else {
            Wal::Short
        }
    }

    /// The restart found `frames` in the WAL (`None`: it was busy).
    fn checkpointed(&mut self, frames: Option<u64>) {
        let Some(frames) = frames else {
            self.not_before = Instant::now() + CHECKPOINT_RETRY;
            return;
        };
        let per_group = frames.div_ceil(self.groups.max(1)).max(1);
        self.every = (WAL_LIMIT_FRAMES / per_group).clamp(1, 100_000);
        self.groups = 0;
    }
}
