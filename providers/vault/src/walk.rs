//! Finding tokens Keygate never recorded: one walk over
//! `auth/token/accessors`, looking every accessor up (16 at a time), that
//! survives OpenBao's stale entries and is shared by every caller.
//!
//! Why a walk: Vault has no way to find a token by its metadata, and a token
//! cannot be given an id of Keygate's choosing (only root may set `id`). A
//! lease interrupted by a crash never learnt its token's accessor, so the
//! token is found by the `keygate_lease` metadata Keygate put on it. The walk
//! is costly (one lookup per live token), so:
//! - it runs as its own task, and its result is kept for [`FRESH`]: every
//!   orphan of a crash (and the start-up clean-up of Keygate's own stale
//!   logins) is served by one walk, not one walk each, and a caller that
//!   gives up (the revocation timeout) does not waste it;
//! - an accessor that cannot be looked up (OpenBao keeps entries whose token
//!   is gone, answering 403 even to root until `auth/token/tidy`) is skipped
//!   and counted, never the end of the walk.
//! - a walk is only reused if it started after the newest token creation
//!   this process began: a token minted after a walk started may be missing
//!   from it (an issue the broker gave up on while it was still running),
//!   so "not found" proves nothing is left only for a walk that could have
//!   seen it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Mutex, Semaphore, watch};
use vaultrs::api::token::requests::{ListAccessorRequest, LookupTokenAccessorRequest};

use crate::conn::Conn;
use crate::http::VaultError;
use crate::token::LEASE_META;

/// How long a finished walk answers for.
const FRESH: Duration = Duration::from_secs(15);
/// Lookups in flight at once during a walk.
const PARALLEL: usize = 16;

/// A live token found by the walk.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub accessor: String,
    /// The token's `meta` (Keygate's lease metadata, or AppRole's
    /// `role_name` for a login).
    pub meta: Value,
    /// The auth path that created it (`auth/approle/login`, `auth/token/create`).
    pub path: String,
}

/// What one walk saw.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// Tokens carrying `keygate_lease`, by lease id.
    pub by_lease: HashMap<String, Found>,
    /// Every other live token it could look up.
    pub others: Vec<Found>,
    /// Accessors listed but not looked up (stale entries, refusals).
    pub skipped: usize,
}

type Shared = watch::Receiver<Option<Arc<Result<Walk, String>>>>;

/// The walk in progress or the last one, shared by all callers.
#[derive(Default)]
pub(crate) struct Walker {
    current: Mutex<Option<(Instant, Shared)>>,
    /// When this process last began creating a token.
    newest_issue: std::sync::Mutex<Option<Instant>>,
}

impl Walker {
    /// Called as a token creation begins: walks started before now may
    /// miss that token.
    pub(crate) fn issuing(&self) {
        *self.newest_issue.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The result of a walk that started at most [`FRESH`] ago and after
    /// the newest token creation began, or of a new one.
    pub(crate) async fn walk(&self, conn: &Arc<Conn>) -> Arc<Result<Walk, String>> {
        let newest = *self.newest_issue.lock().unwrap_or_else(|p| p.into_inner());
        let mut rx = {
            let mut cur = self.current.lock().await;
            match cur.as_ref() {
                Some((started, rx))
                    if started.elapsed() < FRESH && newest.is_none_or(|n| *started > n) =>
                {
                    rx.clone()
                }
                _ => {
                    let (tx, rx) = watch::channel(None);
                    let conn = Arc::clone(conn);
                    tokio::spawn(async move {
                        let result = run(&conn).await;
                        let _ = tx.send(Some(Arc::new(result)));
                    });
                    *cur = Some((Instant::now(), rx.clone()));
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_else(|| Arc::new(Err("no walk".into()))),
            Err(_) => Arc::new(Err("the accessor walk stopped".into())),
        }
    }
}

async fn run(conn: &Arc<Conn>) -> Result<Walk, String> {
    let listed = match conn.call(ListAccessorRequest::default).await {
        Ok(v) => v,
        Err(e) if e.status() == Some(404) => return Ok(Walk::default()),
        Err(e) => return Err(format!("listing vault token accessors: {e}")),
    };
    let accessors: Vec<String> = listed
        .pointer("/data/keys")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let permits = Arc::new(Semaphore::new(PARALLEL));
    let mut set = tokio::task::JoinSet::new();
    for accessor in accessors {
        let (conn, permits) = (Arc::clone(conn), Arc::clone(&permits));
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let make = || LookupTokenAccessorRequest {
                accessor: accessor.clone(),
            };
            let r = conn.call(make).await;
            (accessor, r)
        });
    }
    let mut walk = Walk::default();
    let mut unavailable = None;
    while let Some(joined) = set.join_next().await {
        let Ok((accessor, r)) = joined else {
            walk.skipped += 1;
            continue;
        };
        match r {
            Ok(v) => {
                let found = Found {
                    accessor,
                    meta: v.pointer("/data/meta").cloned().unwrap_or(Value::Null),
                    path: v
                        .pointer("/data/path")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned(),
                };
                match found.meta.get(LEASE_META).and_then(Value::as_str) {
                    Some(lease) => {
                        walk.by_lease.insert(lease.to_owned(), found);
                    }
                    None => walk.others.push(found),
                }
            }
            // Vault down mid-walk: the walk proves nothing.
            Err(e @ (VaultError::Unavailable(_) | VaultError::NotSent(_))) => {
                unavailable = Some(e.to_string());
            }
            // A stale or refused entry: skip it, count it, go on.
            Err(_) => walk.skipped += 1,
        }
    }
    if let Some(e) = unavailable {
        return Err(format!(
            "vault became unavailable during the accessor walk: {e}"
        ));
    }
    tracing::info!(
        tokens = walk.by_lease.len() + walk.others.len(),
        keygate_leases = walk.by_lease.len(),
        skipped = walk.skipped,
        "walked vault token accessors"
    );
    Ok(walk)
}
