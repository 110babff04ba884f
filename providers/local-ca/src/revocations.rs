//! The durable revocation list: an append-only JSON-lines file plus an
//! in-memory index (one broker process), or the broker's shared
//! [`RevocationJournal`] in its database (several replicas), read on every
//! check so no replica answers from a stale copy.
//!
//! Each revoke appends one line and fsyncs before reporting success, so a
//! revocation the broker was told about survives a crash; revokes that
//! arrive together share one write and one fsync. On open the file
//! is compacted: entries more than a day past their expiry are dropped (the
//! credential is dead anyway) and torn lines from a crash are discarded.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keygate_provider_api::{ProviderError, RevocationJournal, Revoked, RevokedKind};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::keys;

/// How long past its expiry an entry is kept, for relying parties whose
/// clocks run behind.
const KEEP_AFTER_EXPIRY_SECS: i64 = 24 * 60 * 60;

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    /// Unix seconds.
    expires_at: i64,
    /// Unix seconds.
    #[serde(default)]
    revoked_at: i64,
}

/// When a revoked credential expires and when it was revoked, in unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub expires_at: i64,
    pub revoked_at: i64,
}

#[derive(Default)]
struct Index {
    serials: HashMap<String, Entry>,
    jtis: HashMap<String, Entry>,
    /// Revokes waiting for the next write; not listed until it is durable.
    pending: Batch,
    /// The batch being written and fsynced.
    writing: Batch,
}

/// Records waiting to be written together, and how their write ended.
struct Batch {
    lines: Vec<u8>,
    records: Vec<Record>,
    serials: HashSet<String>,
    jtis: HashSet<String>,
    done: watch::Sender<Option<Result<(), String>>>,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            lines: Vec::new(),
            records: Vec::new(),
            serials: HashSet::new(),
            jtis: HashSet::new(),
            done: watch::channel(None).0,
        }
    }
}

impl Batch {
    fn push(&mut self, record: Record) -> Result<(), ProviderError> {
        serde_json::to_writer(&mut self.lines, &record)
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        self.lines.push(b'\n');
        self.serials.extend(record.serial.clone());
        self.jtis.extend(record.jti.clone());
        self.records.push(record);
        Ok(())
    }
}

struct Log {
    /// Shared with the blocking task that writes and fsyncs.
    file: Arc<fs::File>,
    /// A write failed part-way; the next record starts on a fresh line so
    /// the torn one can't swallow it.
    torn: bool,
}

/// Revoked credentials still in use, each with its [`Entry`], sorted by key.
pub(crate) struct Unexpired {
    pub serials: Vec<(String, Entry)>,
    pub jtis: Vec<(String, Entry)>,
}

/// Revoked X.509 serials (hex) and JWT ids, wherever they are kept.
pub(crate) enum RevocationList {
    File(Box<FileList>),
    Shared {
        journal: Arc<dyn RevocationJournal>,
        /// This provider instance's name: the journal's key.
        provider: String,
    },
}

impl RevocationList {
    /// Lists whichever of `serial` and `jti` are not listed yet, durably.
    /// Returns whether anything was added.
    pub(crate) async fn revoke(
        &self,
        serial: Option<String>,
        jti: Option<String>,
        expires_at: i64,
        now: OffsetDateTime,
    ) -> Result<bool, ProviderError> {
        match self {
            Self::File(f) => f.revoke(serial, jti, expires_at, now).await,
            Self::Shared { journal, provider } => {
                let entry = |kind, key| Revoked {
                    kind,
                    key,
                    expires_at,
                    revoked_at: now.unix_timestamp(),
                };
                let entries: Vec<Revoked> = serial
                    .map(|s| entry(RevokedKind::Serial, s))
                    .into_iter()
                    .chain(jti.map(|j| entry(RevokedKind::Jti, j)))
                    .collect();
                journal.revoke(provider, &entries).await
            }
        }
    }

    pub(crate) async fn is_revoked(
        &self,
        kind: RevokedKind,
        key: &str,
    ) -> Result<bool, ProviderError> {
        match self {
            Self::File(f) => Ok(match kind {
                RevokedKind::Serial => f.is_serial_revoked(key),
                RevokedKind::Jti => f.is_jti_revoked(key),
            }),
            Self::Shared { journal, provider } => journal.is_revoked(provider, kind, key).await,
        }
    }

    /// Revoked serials and JWT ids whose credentials have not expired yet,
    /// sorted so documents are stable.
    pub(crate) async fn unexpired(&self, now: OffsetDateTime) -> Result<Unexpired, ProviderError> {
        match self {
            Self::File(f) => Ok(f.unexpired(now)),
            Self::Shared { journal, provider } => {
                let mut out = Unexpired {
                    serials: Vec::new(),
                    jtis: Vec::new(),
                };
                for r in journal.unexpired(provider, now.unix_timestamp()).await? {
                    let entry = Entry {
                        expires_at: r.expires_at,
                        revoked_at: r.revoked_at,
                    };
                    match r.kind {
                        RevokedKind::Serial => out.serials.push((r.key, entry)),
                        RevokedKind::Jti => out.jtis.push((r.key, entry)),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The list in a local file.
pub(crate) struct FileList {
    path: PathBuf,
    /// Held across append and fsync: one batch is written at a time.
    log: tokio::sync::Mutex<Log>,
    /// Held only briefly, so `verify` never waits for an fsync. "Was it
    /// new?" is answered here, against the list and the pending batch.
    index: Mutex<Index>,
}

impl FileList {
    /// Loads and compacts the file (creating it if missing). Blocking.
    pub(crate) fn open(path: &Path, now: OffsetDateTime) -> Result<Self, ProviderError> {
        let mut index = Index::default();
        if path.exists() {
            let text = fs::read_to_string(path).map_err(|e| keys::io_error("read", path, &e))?;
            load_lines(
                &text,
                path,
                now.unix_timestamp() - KEEP_AFTER_EXPIRY_SECS,
                &mut index,
            );
        }
        keys::write_file_atomic(path, &compacted(&index), keys::PUBLIC_FILE_MODE)?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| keys::io_error("open", path, &e))?;
        Ok(Self {
            path: path.to_path_buf(),
            log: tokio::sync::Mutex::new(Log {
                file: Arc::new(file),
                torn: false,
            }),
            index: Mutex::new(index),
        })
    }

    /// Adds whichever of `serial` and `jti` are not listed yet and makes
    /// them durable. Returns whether anything was added.
    ///
    /// Group commit: records join a pending batch; whoever takes the file
    /// next writes the whole batch with one fsync, and every revoke in it
    /// returns once that fsync is done (so a mass revocation pays one fsync
    /// per batch, not per credential).
    pub(crate) async fn revoke(
        &self,
        serial: Option<String>,
        jti: Option<String>,
        expires_at: i64,
        now: OffsetDateTime,
    ) -> Result<bool, ProviderError> {
        let (mut done, added) = {
            let mut index = self.index();
            let Index {
                serials,
                jtis,
                pending,
                writing,
            } = &mut *index;
            let listed = |b: &Batch| {
                serial.as_ref().is_some_and(|s| b.serials.contains(s))
                    || jti.as_ref().is_some_and(|j| b.jtis.contains(j))
            };
            let (in_pending, in_writing) = (listed(pending), listed(writing));
            let new = |k: &String,
                       done: &HashMap<String, Entry>,
                       p: &HashSet<String>,
                       w: &HashSet<String>| {
                !done.contains_key(k) && !p.contains(k) && !w.contains(k)
            };
            let serial = serial.filter(|s| new(s, serials, &pending.serials, &writing.serials));
            let jti = jti.filter(|j| new(j, jtis, &pending.jtis, &writing.jtis));
            if serial.is_some() || jti.is_some() {
                pending.push(Record {
                    serial,
                    jti,
                    expires_at,
                    revoked_at: now.unix_timestamp(),
                })?;
                (pending.done.subscribe(), true)
            } else if in_pending {
                // Listed by a revoke still in flight: answer once durable.
                (pending.done.subscribe(), false)
            } else if in_writing {
                (writing.done.subscribe(), false)
            } else {
                return Ok(false);
            }
        };
        let mut log = self.log.lock().await;
        if done.borrow_and_update().is_none() {
            // Nobody has written this batch yet: write it (with whatever
            // joined it meanwhile). While it is written it stays listed as
            // in flight, so a repeat revoke neither adds it again nor
            // returns before it is durable.
            let lines = {
                let mut index = self.index();
                index.writing = std::mem::take(&mut index.pending);
                index.writing.lines.clone()
            };
            let result = self.write(&mut log, lines).await;
            let mut index = self.index();
            let batch = std::mem::take(&mut index.writing);
            if result.is_ok() {
                for r in batch.records {
                    let entry = Entry {
                        expires_at: r.expires_at,
                        revoked_at: r.revoked_at,
                    };
                    if let Some(s) = r.serial {
                        index.serials.insert(s, entry);
                    }
                    if let Some(j) = r.jti {
                        index.jtis.insert(j, entry);
                    }
                }
            }
            batch.done.send_replace(Some(result));
        }
        drop(log);
        let outcome = done.borrow().clone();
        match outcome {
            Some(Ok(())) => Ok(added),
            Some(Err(e)) => Err(ProviderError::Unavailable(e)),
            None => Err(ProviderError::Internal(
                "revocation batch ended without an outcome".into(),
            )),
        }
    }

    /// Appends a batch's lines and fsyncs them; the error is for the agent.
    async fn write(&self, log: &mut Log, batch: Vec<u8>) -> Result<(), String> {
        let mut lines = if log.torn { b"\n".to_vec() } else { Vec::new() };
        lines.extend_from_slice(&batch);
        log.torn = true;
        let file = Arc::clone(&log.file);
        tokio::task::spawn_blocking(move || {
            (&*file).write_all(&lines)?;
            file.sync_data()
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| format!("cannot append to `{}`: {e}", self.path.display()))?;
        log.torn = false;
        Ok(())
    }

    pub(crate) fn is_serial_revoked(&self, serial_hex: &str) -> bool {
        self.index().serials.contains_key(serial_hex)
    }

    pub(crate) fn is_jti_revoked(&self, jti: &str) -> bool {
        self.index().jtis.contains_key(jti)
    }

    /// Revoked serials and JWT ids whose credentials have not expired yet,
    /// sorted so documents are stable.
    pub(crate) fn unexpired(&self, now: OffsetDateTime) -> Unexpired {
        let now = now.unix_timestamp();
        let live = |m: &HashMap<String, Entry>| {
            let mut v: Vec<_> = m
                .iter()
                .filter(|(_, e)| e.expires_at > now)
                .map(|(k, e)| (k.clone(), *e))
                .collect();
            v.sort();
            v
        };
        let index = self.index();
        Unexpired {
            serials: live(&index.serials),
            jtis: live(&index.jtis),
        }
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // The index is only ever updated by whole inserts; a panic elsewhere
        // can't leave it half-changed.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.expires_at, self.revoked_at).cmp(&(other.expires_at, other.revoked_at))
    }
}

fn load_lines(text: &str, path: &Path, keep_after: i64, index: &mut Index) {
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Ok(record) = serde_json::from_str::<Record>(line) else {
            // Expected after a crash mid-append; that revoke was never confirmed.
            tracing::warn!(path = %path.display(), line = n + 1, "skipping unreadable revocation record");
            continue;
        };
        if record.expires_at < keep_after {
            continue;
        }
        let entry = Entry {
            expires_at: record.expires_at,
            revoked_at: record.revoked_at,
        };
        if let Some(s) = record.serial {
            index.serials.entry(s).or_insert(entry);
        }
        if let Some(j) = record.jti {
            index.jtis.entry(j).or_insert(entry);
        }
    }
}

fn compacted(index: &Index) -> Vec<u8> {
    let mut out = Vec::new();
    let records = index
        .serials
        .iter()
        .map(|(s, e)| Record {
            serial: Some(s.clone()),
            jti: None,
            expires_at: e.expires_at,
            revoked_at: e.revoked_at,
        })
        .chain(index.jtis.iter().map(|(j, e)| Record {
            serial: None,
            jti: Some(j.clone()),
            expires_at: e.expires_at,
            revoked_at: e.revoked_at,
        }));
    for record in records {
        // Serialising a struct of strings and integers cannot fail.
        if serde_json::to_writer(&mut out, &record).is_ok() {
            out.push(b'\n');
        }
    }
    out
}
