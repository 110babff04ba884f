//! The embedded engine: one SQLite file in WAL mode, created and migrated on
//! first start.
//!
//! Writes go through a single connection, so transactions serialise in the
//! process instead of fighting over SQLite's lock, and the audit chain's head
//! is read and extended inside the same transaction. Transactions that
//! commit together share one fsync (`group.rs`). Reads use a few read-only
//! connections (`reads.rs`).

mod approvals;
mod batch;
mod chain;
mod checkpoint;
mod current;
mod fences;
mod findings;
mod group;
mod lease_reads;
mod read_batches;
mod reads;
mod reviews;
mod tx;

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteRow, SqliteSynchronous};
use sqlx::{ConnectOptions, Executor, QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use super::rows::{
    agent_from_row, audit_from_row, lease_from_row, revocation_from_row, task_from_row,
};
use super::sql::{push_page, push_selector};
use super::{AuditFilter, Store, StoreError, StoreResult, StoreTx};
use crate::audit::AuditEvent;
use crate::model::{
    Agent, Approval, ApprovalFilter, FenceFilter, FenceRecord, Lease, LeaseFilter, Notification,
    Revocation, RevocationProgress, Selector, Task, unix,
};
use tx::SqliteTx;

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    write: group::Writer,
    read: reads::Reads,
    /// Session checks and agent lookups, read in batches (read_batches.rs).
    sessions: std::sync::Arc<read_batches::Batched<read_batches::TaskWithAgent>>,
    agents: std::sync::Arc<read_batches::Batched<read_batches::AgentById>>,
    /// What those reads found, while nothing has changed (current.rs).
    current: current::Current,
    path: String,
    /// The file lock of a serving process (`register_replica`).
    lock: std::sync::Mutex<Option<std::fs::File>>,
}

impl SqliteStore {
    /// Opens (creating if absent) and migrates the database file at `path`.
    pub async fn open(path: &str) -> StoreResult<Self> {
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(format!("cannot create `{}`: {e}", dir.display()))
            })?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed lease row survives power loss, which the
            // write-ahead lease rule depends on.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(group::BUSY_TIMEOUT);
        // The writer checkpoints between groups itself (group.rs), so
        // SQLite's own checkpoint at every commit past 1000 pages is off.
        let mut conn = opts
            .clone()
            .pragma("wal_autocheckpoint", "0")
            // What the WAL file is cut back to when a checkpoint restarts
            // it (below this, it is reused as it is: group.rs).
            .pragma("journal_size_limit", checkpoint::WAL_FILE_LIMIT.to_string())
            // The writer's savepoints journal in memory, not in a temporary
            // file.
            .pragma("temp_store", "memory")
            // A small page cache (2 MiB, about SQLite's default): when a
            // B-tree split reorders its new pages, SQLite parks one at the
            // pending-byte page number, and the next commit walks the whole
            // cache to drop pages past the end of the file. With 32 MiB that
            // walk was 3.6% of the server's CPU during task opens (the
            // `jti` index splits often) and slowed the kill switch's
            // commits; with 2 MiB the right edges the writer appends to
            // still fit (README, Performance: the fourteenth run).
            .pragma("cache_size", "-2048")
            // A batch's statement differs with its size (batch.rs): room
            // for each size next to the other statements.
            .statement_cache_capacity(512)
            .connect()
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(|e| StoreError::Database(format!("migration failed: {e}")))?;
        // The view a batch's rows go in by, in one statement (batch.rs).
        conn.execute(batch::BATCH_ROWS).await?;
        // A connection of its own copies the WAL into the database in the
        // background while the writer goes on (checkpoint.rs).
        let copier = opts
            .clone()
            .pragma("wal_autocheckpoint", "0")
            .connect()
            .await?;
        let checkpoints = checkpoint::Checkpoints::new(format!("{path}-wal").into(), Some(copier));
        let write = group::Writer::start(conn, checkpoints);
        let read = reads::Reads::new(opts, 8);
        let current = current::Current::new(std::sync::Arc::clone(&write.changes));
        Ok(Self {
            write,
            read,
            sessions: Default::default(),
            agents: Default::default(),
            current,
            path: path.to_owned(),
            lock: std::sync::Mutex::new(None),
        })
    }
}

impl SqliteStore {
    /// One row by primary key, mapped.
    async fn by_id<T>(
        &self,
        sql: &'static str,
        id: &str,
        map: fn(&SqliteRow) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        sqlx::query(sql)
            .bind(id)
            .fetch_optional(&mut *self.read.get().await?)
            .await?
            .map(|r| map(&r))
            .transpose()
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn begin(&self) -> StoreResult<Box<dyn StoreTx>> {
        Ok(Box::new(SqliteTx {
            tx: self.write.begin().await?,
        }))
    }

    async fn insert_lease_audited(
        &self,
        lease: &Lease,
        events: Vec<AuditEvent>,
    ) -> StoreResult<super::LeaseInsert> {
        if let Some(done) = self.write.insert_lease_batched(lease, &events).await? {
            return Ok(done);
        }
        super::insert_lease_alone(self.begin().await?, lease, events).await
    }

    async fn open_task_recorded(
        &self,
        jti: &super::JtiUse,
        task: &Task,
        events: Vec<AuditEvent>,
    ) -> StoreResult<super::TaskOpen> {
        if let Some(opened) = self.write.open_task_batched(jti, task, &events).await? {
            return Ok(opened);
        }
        super::open_task_alone(self.begin().await?, jti, task, events).await
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>> {
        // Read with the other agent lookups waiting (read_batches.rs).
        self.agents.get(&self.read, id).await
    }

    async fn agent_by_subject(&self, issuer: &str, subject: &str) -> StoreResult<Option<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE federated_issuer = ? AND federated_subject = ?")
            .bind(issuer)
            .bind(subject)
            .fetch_optional(&mut *self.read.get().await?)
            .await?
            .map(|r| agent_from_row(&r))
            .transpose()
    }

    async fn list_agents(
        &self,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> StoreResult<Vec<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after.unwrap_or(""))
            .bind(limit.map_or(-1, i64::from))
            .fetch_all(&mut *self.read.get().await?)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn get_task(&self, id: &str) -> StoreResult<Option<Task>> {
        self.by_id("SELECT * FROM tasks WHERE id = ?", id, task_from_row)
            .await
    }

    async fn agent_to_authenticate(&self, id: &str) -> StoreResult<Option<Agent>> {
        if let Some(a) = self.current.agent(id) {
            return Ok(Some(a));
        }
        let at = self.current.count();
        let agent = self.get_agent(id).await?;
        self.current.remember(at, None, agent.as_ref());
        Ok(agent)
    }

    async fn task_with_agent(&self, task_id: &str) -> StoreResult<Option<(Task, Option<Agent>)>> {
        if let Some(found) = self.current.task_with_agent(task_id) {
            return Ok(Some(found));
        }
        let at = self.current.count();
        // Read with the other session checks waiting (read_batches.rs).
        let found = self.sessions.get(&self.read, task_id).await?;
        if let Some((task, Some(agent))) = &found {
            self.current.remember(at, Some(task), Some(agent));
        }
        Ok(found)
    }

    async fn get_lease(&self, id: &str) -> StoreResult<Option<Lease>> {
        self.by_id("SELECT * FROM leases WHERE id = ?", id, lease_from_row)
            .await
    }

    async fn list_leases(&self, f: &LeaseFilter) -> StoreResult<Vec<Lease>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM leases WHERE 1=1");
        if let Some(a) = &f.agent {
            q.push(" AND agent_id = ").push_bind(a);
        }
        if let Some(t) = &f.task {
            q.push(" AND task_id = ").push_bind(t);
        }
        if let Some(s) = f.state {
            q.push(" AND state = ").push_bind(s.as_str());
        }
        if let Some(p) = &f.provider {
            q.push(" AND provider = ").push_bind(p);
        }
        push_page(&mut q, f.cursor.as_deref(), f.limit)?;
        q.build()
            .fetch_all(&mut *self.read.get().await?)
            .await?
            .iter()
            .map(lease_from_row)
            .collect()
    }

    async fn register_replica(&self, _boot_id: &str) -> StoreResult<()> {
        // One process per file: the lock is held as long as the store lives,
        // and released by the kernel however the process ends.
        let path = format!("{}.lock", self.path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Database(format!("cannot open `{path}`: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Database(format!(
                    "another keygate process is serving from `{}`: a SQLite store serves one \
                     process (use PostgreSQL for several replicas)",
                    self.path
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Database(format!("cannot lock `{path}`: {e}")));
            }
        }
        if let Ok(mut held) = self.lock.lock() {
            *held = Some(file);
        }
        Ok(())
    }

    async fn publish_policy(
        &self,
        hash: &str,
        files: &std::collections::BTreeMap<String, String>,
    ) -> StoreResult<()> {
        let files = serde_json::to_string(files)
            .map_err(|e| StoreError::Invalid(format!("policy files: {e}")))?;
        let mut tx = self.write.begin().await?;
        sqlx::query(
            "INSERT INTO policy_active (id, hash, files, at) VALUES (1, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, files = excluded.files, at = excluded.at",
        )
        .bind(hash)
        .bind(files)
        .bind(unix(OffsetDateTime::now_utc()))
        .execute(tx.conn().await?)
        .await?;
        tx.commit().await
    }

    async fn published_policy(
        &self,
        unless: &str,
    ) -> StoreResult<Option<(String, std::collections::BTreeMap<String, String>)>> {
        let Some(row) =
            sqlx::query("SELECT hash, files FROM policy_active WHERE id = 1 AND hash <> ?")
                .bind(unless)
                .fetch_optional(&mut *self.read.get().await?)
                .await?
        else {
            return Ok(None);
        };
        let files: String = row.try_get("files")?;
        let files = serde_json::from_str(&files)
            .map_err(|e| StoreError::Corrupt(format!("the active policy set's files: {e}")))?;
        Ok(Some((row.try_get("hash")?, files)))
    }

    async fn claim_job(&self, _name: &str, _holder: &str, _until_ms: i64) -> StoreResult<bool> {
        // One process per file: every job is this one's.
        Ok(true)
    }

    /// One process per file, one worker: nothing to claim against.
    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        orphan_before: OffsetDateTime,
        boot_id: &str,
        _claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Lease>> {
        // The queue's own index, named: left to itself the planner takes
        // (state, expires_at) and sorts every queued lease on each pass, so
        // a kill switch over 100,000 leases scanned and sorted all of them
        // on each of its 200 passes.
        sqlx::query(
            "SELECT * FROM leases INDEXED BY leases_queue \
             WHERE state = 'revoking' AND next_attempt_at <= ? \
             AND (handle IS NOT NULL OR created_at < ? OR boot_id IS NOT ?) \
             ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(unix(now))
        .bind(unix(orphan_before))
        .bind(boot_id)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.read.get().await?)
        .await?
        .iter()
        .map(lease_from_row)
        .collect()
    }

    async fn get_revocation(&self, id: &str) -> StoreResult<Option<Revocation>> {
        self.by_id(
            "SELECT * FROM revocations WHERE id = ?",
            id,
            revocation_from_row,
        )
        .await
    }

    async fn revocation_progress(&self, id: &str) -> StoreResult<RevocationProgress> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM (SELECT state FROM leases WHERE revocation_id = ?1 \
             UNION ALL SELECT l.state FROM revocation_overlaps o JOIN leases l ON l.id = o.lease_id \
             WHERE o.revocation_id = ?1) AS hit GROUP BY state",
        )
        .bind(id)
        .fetch_all(&mut *self.read.get().await?)
        .await?;
        let mut p = RevocationProgress::default();
        for r in rows {
            let n = r.try_get::<i64, _>("n")? as u64;
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
            "SELECT EXISTS (SELECT 1 FROM leases WHERE revocation_id = ?1 \
             AND state IN ('pending', 'active', 'revoking')) OR EXISTS (SELECT 1 \
             FROM revocation_overlaps o JOIN leases l ON l.id = o.lease_id \
             WHERE o.revocation_id = ?1 AND l.state IN ('pending', 'active', 'revoking'))",
        )
        .bind(id)
        .fetch_one(&mut *self.read.get().await?)
        .await?)
    }

    async fn live_leases(&self, sel: &Selector) -> StoreResult<Vec<Lease>> {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT * FROM leases WHERE state IN ('pending', 'active', 'revoking', 'expiring')",
        );
        push_selector(&mut q, sel, "agent_id");
        q.push(" ORDER BY created_at, id");
        q.build()
            .fetch_all(&mut *self.read.get().await?)
            .await?
            .iter()
            .map(lease_from_row)
            .collect()
    }

    async fn live_leases_of_tasks(&self, task_ids: &[String]) -> StoreResult<Vec<Lease>> {
        lease_reads::live_of_tasks(&self.read, task_ids).await
    }

    async fn expired_active_leases(
        &self,
        now: OffsetDateTime,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> StoreResult<Vec<Lease>> {
        lease_reads::expired_active(&mut *self.read.get().await?, now, after, limit).await
    }

    async fn unexpired_holdings(
        &self,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<super::ProviderHoldings>> {
        lease_reads::unexpired_holdings(&mut *self.read.get().await?, now).await
    }

    async fn get_fence(&self, id: &str) -> StoreResult<Option<FenceRecord>> {
        fences::get(&mut *self.read.get().await?, id).await
    }

    async fn list_fences(&self, filter: &FenceFilter) -> StoreResult<Vec<FenceRecord>> {
        fences::list(&mut *self.read.get().await?, filter).await
    }

    async fn audit_events(&self, f: &AuditFilter) -> StoreResult<Vec<AuditEvent>> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM audit_events WHERE seq > ");
        q.push_bind(f.after_seq);
        if let Some(a) = &f.agent {
            q.push(" AND agent = ").push_bind(a);
        }
        if let Some(t) = &f.task {
            q.push(" AND task = ").push_bind(t);
        }
        if let Some(a) = &f.action {
            q.push(" AND action = ").push_bind(a);
        }
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&mut *self.read.get().await?)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        let mut conn = self.read.get().await?;
        approvals::get(&mut conn, id).await
    }

    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>> {
        Ok(
            sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *self.read.get().await?)
                .await?
                .map(|r| Ok::<_, sqlx::Error>((r.try_get("seq")?, r.try_get("hash")?)))
                .transpose()?,
        )
    }

    async fn scope_usage(&self, agent_id: &str) -> StoreResult<Vec<crate::governance::ScopeUsage>> {
        findings::scope_usage(&mut *self.read.get().await?, agent_id).await
    }

    async fn findings(
        &self,
        agent_id: Option<&str>,
        open_only: bool,
    ) -> StoreResult<Vec<crate::governance::Finding>> {
        findings::list(&mut *self.read.get().await?, agent_id, open_only).await
    }

    async fn console_session(
        &self,
        id_sha256: &str,
    ) -> StoreResult<Option<crate::model::ConsoleSession>> {
        sqlx::query("SELECT * FROM console_sessions WHERE id_sha256 = ?")
            .bind(id_sha256)
            .fetch_optional(&mut *self.read.get().await?)
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
            .fetch_all(&mut *self.read.get().await?)
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
        reviews::departures(&mut *self.read.get().await?).await
    }

    async fn review_campaigns(&self) -> StoreResult<Vec<crate::governance::reviews::Campaign>> {
        reviews::campaigns(&mut *self.read.get().await?).await
    }

    async fn review_items(
        &self,
        filter: &crate::governance::reviews::ReviewFilter,
    ) -> StoreResult<Vec<crate::governance::reviews::ReviewItem>> {
        reviews::items(&mut *self.read.get().await?, filter).await
    }

    async fn review_item(
        &self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>> {
        reviews::item(&mut *self.read.get().await?, id).await
    }

    async fn list_approvals(&self, filter: &ApprovalFilter) -> StoreResult<Vec<Approval>> {
        let mut conn = self.read.get().await?;
        approvals::list(&mut conn, filter).await
    }

    async fn notifications(&self, subject: &str) -> StoreResult<Vec<Notification>> {
        approvals::notifications_of(&mut *self.read.get().await?, subject).await
    }

    async fn claim_notifications(
        &self,
        now: OffsetDateTime,
        _boot_id: &str,
        _claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Notification>> {
        approvals::due_notifications(&mut *self.read.get().await?, now, limit).await
    }

    async fn notification_receipt(
        &self,
        subject: &str,
        channel: &str,
    ) -> StoreResult<Option<serde_json::Value>> {
        approvals::receipt(&mut *self.read.get().await?, subject, channel).await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.read.get().await?)
            .await?;
        Ok(())
    }
}
