//! The PostgreSQL engine: one database shared by every replica.
//!
//! Each [`StoreTx`] is a PostgreSQL transaction on a pooled connection
//! (READ COMMITTED). Where a change is decided on a read, the read locks the
//! row it decides on (`FOR UPDATE`, `FOR SHARE`), so a concurrent
//! transaction on another replica waits instead of deciding on the same
//! stale state — what the SQLite engine gets from its single writer.
//!
//! The audit chain stays one chain with writers on many replicas: a
//! transaction's events are staged with its change, unchained, and each
//! replica's chainer moves them into the chain in batches under one
//! advisory lock (`chain.rs`); every read of the log chains what is pending
//! first. A change made after another's was visible is chained after it.
//!
//! Migrations (`migrations/postgres/`) run at start under sqlx's migration
//! advisory lock, so replicas starting together apply them once.

mod approvals;
mod chain;
mod connect;
mod fences;
mod findings;
mod replicas;
mod reviews;
mod tx;

use async_trait::async_trait;
use secrecy::SecretString;
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};
use time::OffsetDateTime;

use super::rows::{
    agent_from_row, audit_from_row, lease_from_row, revocation_from_row, task_from_row,
};
use super::sql::{push_page, push_selector};
use super::{AuditFilter, Store, StoreError, StoreResult, StoreTx};
use crate::audit::AuditEvent;
use crate::model::{
    Agent, Approval, ApprovalFilter, FenceFilter, FenceRecord, Lease, LeaseFilter, Notification,
    Revocation, RevocationProgress, Selector, Task,
};
use tx::PostgresTx;

/// The advisory lock key that serialises appends to the audit chain
/// ("keygate-audit" folded into 63 bits; any fixed key works, it only has
/// to differ from the migration lock's).
pub(super) const AUDIT_CHAIN_LOCK: i64 = 0x6b65_7967_6174_6561;
/// The advisory lock held while fences change ([`Store::hold_fences`]).
const FENCES_LOCK: i64 = 0x6b65_7967_6665_6e63;

/// How many connections one replica keeps, and how many more its audit
/// chainer does.
const POOL_SIZE: u32 = 16;
const CHAIN_POOL_SIZE: u32 = 2;

/// PostgreSQL-backed [`Store`].
pub struct PostgresStore {
    write: PgPool,
    read: PgPool,
    /// For the replica lock's own connection.
    opts: PgConnectOptions,
    /// Whether this replica holds its liveness lock (once registered).
    registered: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Chains the events transactions staged.
    chain: std::sync::Arc<chain::Chain>,
    /// Each task's user, for its events.
    users: std::sync::Arc<tx::TaskUsers>,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db?sslmode=verify-full&…`)
    /// with `password` (never part of the URL) and applies the migrations.
    pub async fn open(url: &str, password: Option<&SecretString>) -> StoreResult<Self> {
        let opts = connect_options(url, password)?;
        let pool = |opts: PgConnectOptions, size: u32| async move {
            connect::open_pool(opts, size).await.map_err(|e| {
                StoreError::Database(format!(
                    "cannot connect to the store: {}",
                    redact(&e.to_string(), password)
                ))
            })
        };
        let write = pool(opts.clone(), POOL_SIZE).await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&write)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
        // One pool for transactions and reads.
        let read = write.clone();
        // The chainer's own connections: a request holding one of the pool's
        // while it reads the log (which chains first) never waits for a
        // pass that waits for the pool.
        let chain = chain::Chain::start(pool(opts.clone(), CHAIN_POOL_SIZE).await?);
        Ok(Self {
            write,
            read,
            opts,
            registered: std::sync::OnceLock::new(),
            chain,
            users: Default::default(),
        })
    }

    /// One row by primary key, mapped.
    async fn by_id<T>(
        &self,
        sql: &'static str,
        id: &str,
        map: fn(&PgRow) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        sqlx::query(sql)
            .bind(id)
            .fetch_optional(&self.read)
            .await?
            .map(|r| map(&r))
            .transpose()
    }
}

pub(crate) use connect::connect_options;
use connect::redact;

#[async_trait]
impl Store for PostgresStore {
    async fn hold_fences(&self) -> StoreResult<crate::store::Held> {
        let mut tx = self.write.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(FENCES_LOCK)
            .execute(&mut *tx)
            .await?;
        // Released by rolling the holding transaction back once the guard
        // is dropped (a dropped transaction would roll back only when its
        // connection is next used).
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = released.await;
            if let Err(e) = tx.rollback().await {
                tracing::warn!(error = %e, "releasing the fences' lock failed; it goes with its connection");
            }
        });
        Ok(crate::store::Held::until(release))
    }

    async fn insert_lease_audited(
        &self,
        lease: &Lease,
        events: Vec<AuditEvent>,
    ) -> StoreResult<crate::store::LeaseInsert> {
        chain::insert_lease_audited(self, lease, events).await
    }

    async fn open_task_recorded(
        &self,
        jti: &crate::store::JtiUse,
        task: &Task,
        events: Vec<AuditEvent>,
    ) -> StoreResult<crate::store::TaskOpen> {
        chain::open_task_recorded(self, jti, task, events).await
    }

    async fn begin(&self) -> StoreResult<Box<dyn StoreTx>> {
        Ok(Box::new(PostgresTx {
            tx: self.write.begin().await?,
            events: Vec::new(),
            chain: self.chain.clone(),
            users: self.users.clone(),
        }))
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        self.by_id("SELECT * FROM agents WHERE id = $1", id, |r| {
            agent_from_row(r)
        })
        .await
    }

    async fn agent_by_subject(&self, issuer: &str, subject: &str) -> StoreResult<Option<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE federated_issuer = $1 AND federated_subject = $2")
            .bind(issuer)
            .bind(subject)
            .fetch_optional(&self.read)
            .await?
            .map(|r| agent_from_row(&r))
            .transpose()
    }

    async fn list_agents(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> StoreResult<Vec<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.unwrap_or(""))
            .bind(limit.map(i64::from))
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn get_task(&self, id: &str) -> StoreResult<Option<Task>> {
        self.by_id("SELECT * FROM tasks WHERE id = $1", id, |r| {
            task_from_row(r)
        })
        .await
    }

    async fn tasks(&self, ids: &[String]) -> StoreResult<Vec<Task>> {
        sqlx::query("SELECT * FROM tasks WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(task_from_row)
            .collect()
    }

    async fn audit_of_tasks(
        &self,
        ids: &[String],
        actions: &[&str],
    ) -> StoreResult<Vec<AuditEvent>> {
        self.chain.chain_pending().await?;
        sqlx::query(
            "SELECT * FROM audit_events WHERE task = ANY($1) AND action = ANY($2) ORDER BY seq",
        )
        .bind(ids)
        .bind(actions)
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn get_lease(&self, id: &str) -> StoreResult<Option<Lease>> {
        self.by_id("SELECT * FROM leases WHERE id = $1", id, |r| {
            lease_from_row(r)
        })
        .await
    }

    async fn list_leases(&self, f: &LeaseFilter) -> StoreResult<Vec<Lease>> {
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM leases WHERE 1=1");
        if let Some(a) = &f.agent {
            q.push(" AND agent_id = ").push_bind(a.clone());
        }
        if let Some(t) = &f.task {
            q.push(" AND task_id = ").push_bind(t.clone());
        }
        if let Some(s) = f.state {
            q.push(" AND state = ").push_bind(s.as_str());
        }
        if let Some(p) = &f.provider {
            q.push(" AND provider = ").push_bind(p.clone());
        }
        push_page(&mut q, f.cursor.as_deref(), f.limit)?;
        q.build()
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(lease_from_row)
            .collect()
    }

    async fn register_replica(&self, boot_id: &str) -> StoreResult<()> {
        let held = replicas::register(self.opts.clone(), &self.write, boot_id).await?;
        self.registered
            .set(held)
            .map_err(|_| StoreError::Invalid("this store registered its replica already".into()))
    }

    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        orphan_before: OffsetDateTime,
        boot_id: &str,
        claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Lease>> {
        replicas::claim_revocations(&self.write, now, orphan_before, boot_id, claim_until, limit)
            .await
    }

    async fn claim_job(&self, name: &str, holder: &str, until_ms: i64) -> StoreResult<bool> {
        replicas::claim_job(&self.write, name, holder, until_ms).await
    }

    fn revocation_journal(
        &self,
    ) -> Option<std::sync::Arc<dyn keygate_provider_api::RevocationJournal>> {
        Some(std::sync::Arc::new(replicas::Journal(self.write.clone())))
    }

    async fn publish_policy(
        &self,
        hash: &str,
        files: &std::collections::BTreeMap<String, String>,
    ) -> StoreResult<()> {
        replicas::publish_policy(&self.write, hash, files).await
    }

    async fn published_policy(
        &self,
        unless: &str,
    ) -> StoreResult<Option<(String, std::collections::BTreeMap<String, String>)>> {
        replicas::published_policy(&self.read, unless).await
    }

    async fn get_revocation(&self, id: &str) -> StoreResult<Option<Revocation>> {
        self.by_id("SELECT * FROM revocations WHERE id = $1", id, |r| {
            revocation_from_row(r)
        })
        .await
    }

    async fn revocation_progress(&self, id: &str) -> StoreResult<RevocationProgress> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM (SELECT state FROM leases WHERE revocation_id = $1 \
             UNION ALL SELECT l.state FROM revocation_overlaps o JOIN leases l ON l.id = o.lease_id \
             WHERE o.revocation_id = $1) AS hit GROUP BY state",
        )
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        let mut p = RevocationProgress::default();
        for r in rows {
            let n = u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0);
            p.found += n;
            match r.try_get::<String, _>("state")?.as_str() {
                "revoked" | "expired" => p.revoked += n,
                "expiring" => p.expiring += n,
                _ => p.pending += n,
            }
        }
        Ok(p)
    }

    async fn revocation_unfinished(&self, id: &str) -> StoreResult<bool> {
        // States listed, not excluded: each is one seek in
        // `leases_revocation (revocation_id, state)`.
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM leases WHERE revocation_id = $1 \
             AND state IN ('pending', 'active', 'revoking')) OR EXISTS (SELECT 1 \
             FROM revocation_overlaps o JOIN leases l ON l.id = o.lease_id \
             WHERE o.revocation_id = $1 AND l.state IN ('pending', 'active', 'revoking'))",
        )
        .bind(id)
        .fetch_one(&self.read)
        .await?)
    }

    async fn live_leases(&self, sel: &Selector) -> StoreResult<Vec<Lease>> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT * FROM leases WHERE state IN ('pending', 'active', 'revoking', 'expiring')",
        );
        push_selector(&mut q, sel, "agent_id");
        q.push(" ORDER BY created_at, id");
        q.build()
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(lease_from_row)
            .collect()
    }

    async fn live_leases_of_tasks(&self, task_ids: &[String]) -> StoreResult<Vec<Lease>> {
        let mut out = Vec::new();
        for chunk in task_ids.chunks(500) {
            let mut q = super::sql::live_leases_of_tasks::<Postgres>(chunk);
            for r in q.build().fetch_all(&self.read).await?.iter() {
                out.push(lease_from_row(r)?);
            }
        }
        Ok(out)
    }

    async fn expired_active_leases(
        &self,
        now: OffsetDateTime,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> StoreResult<Vec<Lease>> {
        let (at, id) = after.unwrap_or((i64::MIN, String::new()));
        sqlx::query(
            "SELECT * FROM leases WHERE state = 'active' AND expires_at <= $1 \
             AND (expires_at, id) > ($2, $3) ORDER BY expires_at, id LIMIT $4",
        )
        .bind(crate::model::unix(now))
        .bind(at)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?
        .iter()
        .map(lease_from_row)
        .collect()
    }

    async fn unexpired_holdings(
        &self,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<super::ProviderHoldings>> {
        // The shared local-CA revocation lists live here too, by name.
        let rows = sqlx::query(
            "SELECT provider, sum(live)::bigint AS live, sum(revoked)::bigint AS revoked, \
             max(until) AS until FROM ( \
               SELECT provider, count(*) AS live, 0 AS revoked, max(expires_at) AS until \
               FROM leases WHERE state IN ('pending', 'revoking') \
               OR (state IN ('active', 'expiring') AND expires_at > $1) GROUP BY provider \
               UNION ALL \
               SELECT provider, 0, count(*), max(expires_at) FROM ca_revocations \
               WHERE expires_at > $1 GROUP BY provider \
             ) held GROUP BY provider ORDER BY provider",
        )
        .bind(crate::model::unix(now))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(super::ProviderHoldings {
                    provider: r.try_get("provider")?,
                    live_leases: r.try_get("live")?,
                    revocations: r.try_get("revoked")?,
                    until: crate::model::from_unix(r.try_get("until")?),
                })
            })
            .collect()
    }

    async fn get_fence(&self, id: &str) -> StoreResult<Option<FenceRecord>> {
        fences::get(&self.read, id).await
    }

    async fn list_fences(&self, filter: &FenceFilter) -> StoreResult<Vec<FenceRecord>> {
        fences::list(&self.read, filter).await
    }

    async fn audit_events(&self, f: &AuditFilter) -> StoreResult<Vec<AuditEvent>> {
        self.chain.chain_pending().await?;
        let mut q = QueryBuilder::<Postgres>::new("SELECT * FROM audit_events WHERE seq > ");
        q.push_bind(f.after_seq);
        if let Some(a) = &f.agent {
            q.push(" AND agent = ").push_bind(a.clone());
        }
        if let Some(t) = &f.task {
            q.push(" AND task = ").push_bind(t.clone());
        }
        if let Some(a) = &f.action {
            q.push(" AND action = ").push_bind(a.clone());
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        let mut conn = self.read.acquire().await?;
        approvals::get(&mut conn, id).await
    }

    async fn list_approvals(&self, filter: &ApprovalFilter) -> StoreResult<Vec<Approval>> {
        let mut conn = self.read.acquire().await?;
        approvals::list(&mut conn, filter).await
    }

    async fn notifications(&self, subject: &str) -> StoreResult<Vec<Notification>> {
        approvals::notifications_of(&self.read, subject).await
    }

    async fn claim_notifications(
        &self,
        now: OffsetDateTime,
        boot_id: &str,
        claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Notification>> {
        replicas::claim_notifications(&self.write, now, boot_id, claim_until, limit).await
    }

    async fn notification_receipt(
        &self,
        subject: &str,
        channel: &str,
    ) -> StoreResult<Option<serde_json::Value>> {
        approvals::receipt(&self.read, subject, channel).await
    }

    async fn ping(&self) -> StoreResult<()> {
        // A read of a real table: the database is there and has the schema.
        sqlx::query("SELECT 1 FROM agents LIMIT 1")
            .execute(&self.read)
            .await?;
        // A replica without its lock may see its in-flight work revoked by
        // the others: not ready until it holds it again.
        if self
            .registered
            .get()
            .is_some_and(|held| !held.load(std::sync::atomic::Ordering::SeqCst))
        {
            return Err(StoreError::Database(
                "this replica lost its liveness lock; reconnecting".into(),
            ));
        }
        Ok(())
    }

    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>> {
        self.chain.chain_pending().await?;
        Ok(
            sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.read)
                .await?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get("seq")?, r.try_get("hash")?)))
                .transpose()?,
        )
    }

    async fn scope_usage(&self, agent_id: &str) -> StoreResult<Vec<crate::governance::ScopeUsage>> {
        findings::scope_usage(&self.read, agent_id).await
    }

    async fn findings(
        &self,
        agent_id: Option<&str>,
        open_only: bool,
    ) -> StoreResult<Vec<crate::governance::Finding>> {
        findings::list(&self.read, agent_id, open_only).await
    }

    async fn console_session(
        &self,
        id_sha256: &str,
    ) -> StoreResult<Option<crate::model::ConsoleSession>> {
        sqlx::query("SELECT * FROM console_sessions WHERE id_sha256 = $1")
            .bind(id_sha256)
            .fetch_optional(&self.read)
            .await?
            .map(|r| {
                Ok(crate::model::ConsoleSession {
                    operator: r.try_get("operator")?,
                    method: r.try_get("method")?,
                    credential: r.try_get("credential")?,
                    created_at: crate::model::from_unix(r.try_get("created_at")?),
                    expires_at: crate::model::from_unix(r.try_get("expires_at")?),
                })
            })
            .transpose()
    }

    async fn validation_states(&self) -> StoreResult<Vec<crate::validation::Snapshot>> {
        sqlx::query("SELECT agent_id, state FROM validation_state ORDER BY agent_id")
            .fetch_all(&self.read)
            .await?
            .iter()
            .map(|r| {
                Ok(crate::validation::Snapshot {
                    agent: r.try_get("agent_id")?,
                    state: r.try_get("state")?,
                })
            })
            .collect()
    }

    async fn departures(&self) -> StoreResult<Vec<crate::governance::people::Departure>> {
        reviews::departures(&self.read).await
    }

    async fn review_campaigns(&self) -> StoreResult<Vec<crate::governance::reviews::Campaign>> {
        reviews::campaigns(&self.read).await
    }

    async fn review_items(
        &self,
        filter: &crate::governance::reviews::ReviewFilter,
    ) -> StoreResult<Vec<crate::governance::reviews::ReviewItem>> {
        reviews::items(&self.read, filter).await
    }

    async fn review_item(
        &self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>> {
        reviews::item(&self.read, id).await
    }
}
