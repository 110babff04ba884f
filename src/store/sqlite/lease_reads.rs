//! Reads over many leases at once: the reaper's expired active ones a page
//! at a time, what each provider still holds (start-up), and the live ones
//! of many tasks (a kill switch's preview).

use sqlx::sqlite::SqliteConnection;
use sqlx::{Row, Sqlite};
use time::OffsetDateTime;

use super::reads::Reads;
use crate::model::{Lease, from_unix, unix};
use crate::store::rows::lease_from_row;
use crate::store::{ProviderHoldings, StoreResult};

/// Active leases whose expiry passed by `now`, in order of expiry then id,
/// after `after` (expiry in Unix seconds, id), at most `limit`.
pub(super) async fn expired_active(
    conn: &mut SqliteConnection,
    now: OffsetDateTime,
    after: Option<(i64, String)>,
    limit: u32,
) -> StoreResult<Vec<Lease>> {
    let (at, id) = after.unwrap_or((i64::MIN, String::new()));
    sqlx::query(
        "SELECT * FROM leases WHERE state = 'active' AND expires_at <= ?1 \
         AND (expires_at > ?2 OR (expires_at = ?2 AND id > ?3)) \
         ORDER BY expires_at, id LIMIT ?4",
    )
    .bind(unix(now))
    .bind(at)
    .bind(id)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await?
    .iter()
    .map(lease_from_row)
    .collect()
}

/// Live leases per provider: those still to be issued or revoked whatever
/// their expiry (a renewable token outlives it until revoked), and active
/// or expiring ones that have not expired by `now` (each local CA keeps its
/// revocation list in its own file, not here).
pub(super) async fn unexpired_holdings(
    conn: &mut SqliteConnection,
    now: OffsetDateTime,
) -> StoreResult<Vec<ProviderHoldings>> {
    let rows = sqlx::query(
        "SELECT provider, count(*) AS n, max(expires_at) AS until FROM leases \
         WHERE state IN ('pending', 'revoking') \
            OR (state IN ('active', 'expiring') AND expires_at > ?) \
         GROUP BY provider ORDER BY provider",
    )
    .bind(unix(now))
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ProviderHoldings {
                provider: r.try_get("provider")?,
                live_leases: r.try_get("n")?,
                revocations: 0,
                until: from_unix(r.try_get("until")?),
            })
        })
        .collect()
}

/// The live leases of `task_ids`, oldest first within each 500 tasks.
pub(super) async fn live_of_tasks(reads: &Reads, task_ids: &[String]) -> StoreResult<Vec<Lease>> {
    let mut out = Vec::new();
    for chunk in task_ids.chunks(500) {
        let mut q = crate::store::sql::live_leases_of_tasks::<Sqlite>(chunk);
        for r in q.build().fetch_all(&mut *reads.get().await?).await?.iter() {
            out.push(lease_from_row(r)?);
        }
    }
    Ok(out)
}
