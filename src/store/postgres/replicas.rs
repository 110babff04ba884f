//! Several replicas on one database: which are alive, and who does which
//! piece of background work.
//!
//! **Liveness.** A serving replica holds a session-level advisory lock
//! (class [`REPLICA_LOCK_CLASS`], key from its boot id) on a connection of
//! its own, and registers the key in `replicas`. PostgreSQL releases the
//! lock the instant that connection ends, so a replica killed with SIGKILL
//! is dead to the others at once — even if a new one starts in the same
//! second — with no heartbeat period to wait out. A replica whose lock
//! connection breaks is not ready (`ping` fails) until it holds its lock
//! again; meanwhile the others may treat its in-flight issues as orphans,
//! which is the safe direction (they are revoked, never lost).
//!
//! **Work.** Queue items (the revocation queue, the notification outbox)
//! are claimed row by row with `FOR UPDATE SKIP LOCKED` and a claim that
//! expires; a claim of a dead replica is void at once. Periodic jobs (the
//! reaper, sweeps) are held by one replica through a row in `jobs` that its
//! holder renews each run and any other takes once it runs out or its holder
//! is dead.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use keygate_provider_api::{ProviderError, RevocationJournal, Revoked, RevokedKind};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection, Row};
use time::OffsetDateTime;

use crate::model::{Lease, Notification, unix};
use crate::store::rows::{lease_from_row, notification_from_row};
use crate::store::{StoreError, StoreResult};

/// The advisory lock class of replica liveness locks ("KG"; spelled out
/// as 19271 in [`live_boots`]).
pub(super) const REPLICA_LOCK_CLASS: i32 = 0x4b47;
const _: () = assert!(REPLICA_LOCK_CLASS == 19271);

/// The boots of the replicas alive now: those holding their lock in this
/// database.
macro_rules! live_boots {
    () => {
        "SELECT r.boot_id FROM replicas r JOIN pg_locks l \
         ON l.locktype = 'advisory' AND l.granted AND l.classid = 19271 \
         AND l.objsubid = 2 AND l.objid::bigint = r.lock_key \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    };
}
pub(super) use live_boots;

/// The lock key of a boot: 31 bits of its id's digest, never 0.
fn lock_key(boot_id: &str) -> i32 {
    let d = Sha256::digest(boot_id.as_bytes());
    let k = i32::from_be_bytes([d[0], d[1], d[2], d[3]]) & i32::MAX;
    k.max(1)
}

/// Takes this replica's liveness lock, registers it, and keeps the lock
/// held (reconnecting if its connection breaks) while the process lives.
/// The flag says whether the lock is held now.
pub(super) async fn register(
    opts: PgConnectOptions,
    pool: &PgPool,
    boot_id: &str,
) -> StoreResult<Arc<AtomicBool>> {
    let key = lock_key(boot_id);
    let conn = lock(&opts, key).await?;
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    sqlx::query(
        "INSERT INTO replicas (boot_id, lock_key, started_at, host) VALUES ($1, $2, $3, $4)",
    )
    .bind(boot_id)
    .bind(i64::from(key))
    .bind(unix(OffsetDateTime::now_utc()))
    .bind(host)
    .execute(pool)
    .await?;
    // Dead replicas' rows older than a day: nothing refers to them any more
    // (a pending lease of an unknown boot counts as a dead one's).
    sqlx::query(concat!(
        "DELETE FROM replicas WHERE started_at < $1 AND boot_id NOT IN (",
        live_boots!(),
        ")"
    ))
    .bind(unix(OffsetDateTime::now_utc()) - 86_400)
    .execute(pool)
    .await?;
    let held = Arc::new(AtomicBool::new(true));
    tokio::spawn(keep(opts, key, conn, Arc::clone(&held)));
    tracing::info!(boot_id, lock_key = key, "registered as a replica");
    Ok(held)
}

async fn lock(opts: &PgConnectOptions, key: i32) -> StoreResult<PgConnection> {
    let mut conn = PgConnection::connect_with(opts).await.map_err(|e| {
        StoreError::Database(format!(
            "cannot connect to the store for the replica lock: {e}"
        ))
    })?;
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(REPLICA_LOCK_CLASS)
        .bind(key)
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Checks the lock's connection every second; when it breaks, reconnects
/// and takes the lock again.
async fn keep(opts: PgConnectOptions, key: i32, mut conn: PgConnection, held: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if conn.ping().await.is_ok() {
            continue;
        }
        held.store(false, Ordering::SeqCst);
        tracing::warn!("lost the connection holding this replica's lock; reconnecting");
        loop {
            match lock(&opts, key).await {
                Ok(c) => {
                    conn = c;
                    held.store(true, Ordering::SeqCst);
                    tracing::info!("holding this replica's lock again");
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "replica lock not back yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

pub(super) async fn claim_revocations(
    pool: &PgPool,
    now: OffsetDateTime,
    orphan_before: OffsetDateTime,
    boot_id: &str,
    claim_until: OffsetDateTime,
    limit: u32,
) -> StoreResult<Vec<Lease>> {
    sqlx::query(concat!(
        "UPDATE leases SET claimed_by = $3, claim_until = $4 WHERE id IN (\
         SELECT id FROM leases WHERE state = 'revoking' AND next_attempt_at <= $1 \
         AND (handle IS NOT NULL OR created_at < $2 OR boot_id IS NULL OR boot_id NOT IN (",
        live_boots!(),
        ")) AND (claimed_by IS NULL OR claimed_by = $3 OR claim_until < $1 OR claimed_by NOT IN (",
        live_boots!(),
        ")) ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING *"
    ))
    .bind(unix(now))
    .bind(unix(orphan_before))
    .bind(boot_id)
    .bind(unix(claim_until))
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?
    .iter()
    .map(lease_from_row)
    .collect()
}

pub(super) async fn claim_notifications(
    pool: &PgPool,
    now: OffsetDateTime,
    boot_id: &str,
    claim_until: OffsetDateTime,
    limit: u32,
) -> StoreResult<Vec<Notification>> {
    let mut due: Vec<Notification> = sqlx::query(concat!(
        "UPDATE notifications SET claimed_by = $2, claim_until = $3 WHERE id IN (\
         SELECT id FROM notifications WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= $1 \
         AND (claimed_by IS NULL OR claimed_by = $2 OR claim_until < $1 OR claimed_by NOT IN (",
        live_boots!(),
        ")) ORDER BY next_attempt_at, created_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING *"
    ))
    .bind(unix(now))
    .bind(boot_id)
    .bind(unix(claim_until))
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?
    .iter()
    .map(notification_from_row)
    .collect::<StoreResult<_>>()?;
    // RETURNING keeps no order; deliveries go oldest first.
    due.sort_by(|a, b| {
        (a.next_attempt_at, a.created_at, &a.id).cmp(&(b.next_attempt_at, b.created_at, &b.id))
    });
    Ok(due)
}

pub(super) async fn claim_job(
    pool: &PgPool,
    name: &str,
    holder: &str,
    until_ms: i64,
) -> StoreResult<bool> {
    let now_ms = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
        .unwrap_or(i64::MAX);
    Ok(sqlx::query(concat!(
        "INSERT INTO jobs (name, holder, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
         WHERE jobs.holder = EXCLUDED.holder OR jobs.until_ms < $4 OR jobs.holder NOT IN (",
        live_boots!(),
        ") RETURNING holder"
    ))
    .bind(name)
    .bind(holder)
    .bind(until_ms)
    .bind(now_ms)
    .fetch_optional(pool)
    .await?
    .is_some())
}

pub(super) async fn publish_policy(
    pool: &PgPool,
    hash: &str,
    files: &BTreeMap<String, String>,
) -> StoreResult<()> {
    let files = serde_json::to_string(files)
        .map_err(|e| StoreError::Invalid(format!("policy files: {e}")))?;
    sqlx::query(
        "INSERT INTO policy_active (id, hash, files, at) VALUES (1, $1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET hash = EXCLUDED.hash, files = EXCLUDED.files, at = EXCLUDED.at",
    )
    .bind(hash)
    .bind(files)
    .bind(unix(OffsetDateTime::now_utc()))
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn published_policy(
    pool: &PgPool,
    unless: &str,
) -> StoreResult<Option<(String, BTreeMap<String, String>)>> {
    let Some(row) =
        sqlx::query("SELECT hash, files FROM policy_active WHERE id = 1 AND hash <> $1")
            .bind(unless)
            .fetch_optional(pool)
            .await?
    else {
        return Ok(None);
    };
    let files: String = row.try_get("files")?;
    let files = serde_json::from_str(&files)
        .map_err(|e| StoreError::Corrupt(format!("the active policy set's files: {e}")))?;
    Ok(Some((row.try_get("hash")?, files)))
}

/// The local CA's revocation list in `ca_revocations`.
#[derive(Debug)]
pub(super) struct Journal(pub(super) PgPool);

fn unreachable(e: &sqlx::Error) -> ProviderError {
    ProviderError::Unavailable(format!(
        "cannot reach the revocation list in the store: {e}"
    ))
}

#[async_trait]
impl RevocationJournal for Journal {
    async fn revoke(&self, provider: &str, entries: &[Revoked]) -> Result<bool, ProviderError> {
        let mut tx = self.0.begin().await.map_err(|e| unreachable(&e))?;
        let mut added = false;
        for e in entries {
            // `xmax = 0`: the row was inserted, not updated.
            let inserted: bool = sqlx::query(
                "INSERT INTO ca_revocations (provider, kind, key, expires_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (provider, kind, key) \
                 DO UPDATE SET repeats = ca_revocations.repeats + 1 RETURNING (xmax = 0) AS inserted",
            )
            .bind(provider)
            .bind(e.kind.as_str())
            .bind(&e.key)
            .bind(e.expires_at)
            .bind(e.revoked_at)
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get("inserted"))
            .map_err(|e| unreachable(&e))?;
            added |= inserted;
        }
        tx.commit().await.map_err(|e| unreachable(&e))?;
        Ok(added)
    }

    async fn is_revoked(
        &self,
        provider: &str,
        kind: RevokedKind,
        key: &str,
    ) -> Result<bool, ProviderError> {
        sqlx::query("SELECT 1 FROM ca_revocations WHERE provider = $1 AND kind = $2 AND key = $3")
            .bind(provider)
            .bind(kind.as_str())
            .bind(key)
            .fetch_optional(&self.0)
            .await
            .map(|r| r.is_some())
            .map_err(|e| unreachable(&e))
    }

    async fn unexpired(&self, provider: &str, after: i64) -> Result<Vec<Revoked>, ProviderError> {
        let rows = sqlx::query(
            "SELECT kind, key, expires_at, revoked_at FROM ca_revocations \
             WHERE provider = $1 AND expires_at > $2 ORDER BY kind, key",
        )
        .bind(provider)
        .bind(after)
        .fetch_all(&self.0)
        .await
        .map_err(|e| unreachable(&e))?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(Revoked {
                    kind: if kind == "jti" {
                        RevokedKind::Jti
                    } else {
                        RevokedKind::Serial
                    },
                    key: r.try_get("key")?,
                    expires_at: r.try_get("expires_at")?,
                    revoked_at: r.try_get("revoked_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| unreachable(&e))
    }
}
