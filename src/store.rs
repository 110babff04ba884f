//! The store interface. Callers see these traits only; `sqlite` is the
//! embedded engine, and a PostgreSQL engine plugs in behind the same traits.
//!
//! Reads go through [`Store`]. Every change goes through a [`StoreTx`], which
//! also appends the audit events describing the change, so state and evidence
//! commit together or not at all.

mod batchable;
pub mod copy;
mod postgres;
mod rows;
mod sql;
mod sqlite;
mod tx;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::model::{
    Agent, Approval, ApprovalFilter, FenceFilter, FenceRecord, Lease, LeaseFilter, Notification,
    Revocation, RevocationProgress, Selector, Task,
};

pub use batchable::{JtiUse, LeaseInsert, TaskOpen};
pub(crate) use batchable::{insert_lease_alone, open_task_alone};
pub use postgres::PostgresStore;
pub(crate) use postgres::connect_options as postgres_options;
pub use sqlite::SqliteStore;
pub use tx::{Delivery, LeaseSelector, StoreTx, TaskSelector};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(String),
    /// The database rolled the transaction back because it collided with
    /// another at the same moment (PostgreSQL: a deadlock, a serialization
    /// failure): nothing of it was kept, and running it again may succeed.
    #[error("{0}")]
    Contention(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A caller's argument the store cannot use (a bad cursor).
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported store url `{0}` (supported: sqlite://path, postgres://user@host/db)")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What either engine's error means to a caller.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict(d.message().to_owned())
            }
            // PostgreSQL's deadlock_detected and serialization_failure.
            sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40P01" | "40001")) => {
                tracing::warn!(error = %d.message(), "a transaction collided with another and was rolled back");
                StoreError::Contention(
                    "the change collided with another made at the same moment and was rolled back; nothing of it was kept: retry".into(),
                )
            }
            _ => StoreError::Database(e.to_string()),
        }
    }
}

/// A lock held across processes until dropped ([`Store::hold_fences`]);
/// its sender is kept only to be dropped.
#[derive(Default)]
pub struct Held(#[allow(dead_code)] Option<tokio::sync::oneshot::Sender<()>>);

impl Held {
    /// Held until `release` is dropped (or sent on).
    pub(crate) fn until(release: tokio::sync::oneshot::Sender<()>) -> Self {
        Self(Some(release))
    }
}

/// Audit events matching a filter, after a sequence number.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub after_seq: i64,
    pub agent: Option<String>,
    pub task: Option<String>,
    pub action: Option<String>,
    pub limit: u32,
}

/// What the store holds of one provider that has not expired yet: leases
/// that may still be working credentials, and revocations a local CA's
/// shared list still serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderHoldings {
    pub provider: String,
    pub live_leases: i64,
    pub revocations: i64,
    /// When the last of them expires.
    pub until: OffsetDateTime,
}

/// A lease the revocation queue should attempt now.
#[derive(Debug, Clone)]
pub struct DueRevocation {
    pub lease: Lease,
}

/// Read access, and the way to start a change.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Starts a write transaction.
    async fn begin(&self) -> StoreResult<Box<dyn StoreTx>>;
    /// Writes a lease as [`StoreTx::insert_lease`] does and, if it was
    /// written, `events`, as one durable change; an engine may batch it with
    /// other lease writes.
    async fn insert_lease_audited(
        &self,
        lease: &Lease,
        events: Vec<AuditEvent>,
    ) -> StoreResult<LeaseInsert> {
        insert_lease_alone(self.begin().await?, lease, events).await
    }
    /// Opens `task`: records `jti`, writes the task, marks its agent used
    /// and appends `events`, as one durable change, only while the `jti`
    /// is unseen, the agent active and the parent task (if any) open
    /// ([`TaskOpen`]); an engine may batch it with others.
    async fn open_task_recorded(
        &self,
        jti: &JtiUse,
        task: &Task,
        events: Vec<AuditEvent>,
    ) -> StoreResult<TaskOpen> {
        open_task_alone(self.begin().await?, jti, task, events).await
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Agent>>;
    /// An agent presenting itself to open a task (its keys and status), on
    /// every task open: the engine may answer with what it read before if
    /// it knows nothing has changed since.
    async fn agent_to_authenticate(&self, id: &str) -> StoreResult<Option<Agent>> {
        self.get_agent(id).await
    }
    /// Agents ordered by id: those after `after`, at most `limit` (all
    /// when `None`).
    async fn list_agents(&self, after: Option<&str>, limit: Option<u32>)
    -> StoreResult<Vec<Agent>>;
    /// The agent bound to a federated subject of a trusted issuer.
    async fn agent_by_subject(&self, issuer: &str, subject: &str) -> StoreResult<Option<Agent>>;
    async fn get_task(&self, id: &str) -> StoreResult<Option<Task>>;
    /// A task and its agent, as a session check needs them on every call
    /// (the engine may answer with what it read before if it knows nothing
    /// has changed since).
    async fn task_with_agent(&self, task_id: &str) -> StoreResult<Option<(Task, Option<Agent>)>> {
        let Some(task) = self.get_task(task_id).await? else {
            return Ok(None);
        };
        let agent = self.get_agent(&task.agent_id).await?;
        Ok(Some((task, agent)))
    }
    /// The tasks of `ids` that exist (one round trip where the engine has
    /// a network between it and the broker).
    async fn tasks(&self, ids: &[String]) -> StoreResult<Vec<Task>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(self.get_task(id).await?);
        }
        Ok(out)
    }
    /// Every audit event of the tasks `ids` with one of `actions`, in
    /// chain order.
    async fn audit_of_tasks(
        &self,
        ids: &[String],
        actions: &[&str],
    ) -> StoreResult<Vec<AuditEvent>> {
        let mut out = Vec::new();
        for id in ids {
            for action in actions {
                let mut after = 0;
                loop {
                    let page = self
                        .audit_events(&AuditFilter {
                            after_seq: after,
                            agent: None,
                            task: Some(id.clone()),
                            action: Some((*action).to_owned()),
                            limit: 1000,
                        })
                        .await?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    out.extend(page);
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }
    async fn get_lease(&self, id: &str) -> StoreResult<Option<Lease>>;
    async fn list_leases(&self, filter: &LeaseFilter) -> StoreResult<Vec<Lease>>;
    /// This process (`boot_id`) starts serving from this store. SQLite: it
    /// takes the file's lock (one process per file; any other boot is
    /// dead). PostgreSQL: it registers as a replica and holds its liveness
    /// lock while it runs, so the others know at once when it dies.
    async fn register_replica(&self, boot_id: &str) -> StoreResult<()>;
    /// Leases in `revoking` whose next attempt is due, claimed for
    /// `boot_id` until `claim_until` so no other replica attempts them
    /// meanwhile (a claim of a dead replica is void). Leases whose issue
    /// may still be in flight (no handle yet, written by a live process and
    /// younger than `orphan_before`) are left alone.
    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        orphan_before: OffsetDateTime,
        boot_id: &str,
        claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Lease>>;
    /// Claims the periodic job `name` for `holder` until `until` (unix ms)
    /// if no live replica holds it: whether this replica should run it now.
    /// The holder renews its claim each run.
    async fn claim_job(&self, name: &str, holder: &str, until_ms: i64) -> StoreResult<bool>;
    /// Makes `files` (whose content hash is `hash`) the policy set every
    /// replica decides with. One process (SQLite): nothing to share.
    async fn publish_policy(
        &self,
        _hash: &str,
        _files: &std::collections::BTreeMap<String, String>,
    ) -> StoreResult<()> {
        Ok(())
    }
    /// The policy set the replicas decide with, when it is not `unless`
    /// (the hash this replica has): its hash and files.
    async fn published_policy(
        &self,
        _unless: &str,
    ) -> StoreResult<Option<(String, std::collections::BTreeMap<String, String>)>> {
        Ok(None)
    }
    /// Where a provider keeps a revocation list every replica must share
    /// (`None`: one process, the provider's own files do).
    fn revocation_journal(
        &self,
    ) -> Option<std::sync::Arc<dyn keygate_provider_api::RevocationJournal>> {
        None
    }
    async fn get_revocation(&self, id: &str) -> StoreResult<Option<Revocation>>;
    async fn revocation_progress(&self, id: &str) -> StoreResult<RevocationProgress>;
    /// Whether a lease of revocation `id` still waits for its provider: one
    /// index seek, where [`Store::revocation_progress`] counts every lease
    /// (100,000 of them after a large kill switch), so cheap to poll.
    async fn revocation_unfinished(&self, id: &str) -> StoreResult<bool>;
    /// Leases matching an emergency selector that may still be working
    /// credentials: pending, active, revoking, and expiring (released, but
    /// their backend cannot kill them).
    async fn live_leases(&self, selector: &Selector) -> StoreResult<Vec<Lease>>;
    /// The live leases of these tasks (as [`Store::live_leases`]).
    async fn live_leases_of_tasks(&self, task_ids: &[String]) -> StoreResult<Vec<Lease>>;
    /// Active leases whose expiry passed by `now` (the reaper's next), in
    /// order of expiry then id, after `after` (the last one's expiry, in
    /// Unix seconds, and id), at most `limit`.
    async fn expired_active_leases(
        &self,
        now: OffsetDateTime,
        after: Option<(i64, String)>,
        limit: u32,
    ) -> StoreResult<Vec<Lease>>;
    /// Per provider, sorted by name: the live leases (pending and revoking
    /// ones whatever their expiry; active and expiring ones not expired by
    /// `now`) and shared revocation-list entries not expired by `now`.
    async fn unexpired_holdings(&self, now: OffsetDateTime) -> StoreResult<Vec<ProviderHoldings>>;
    async fn get_fence(&self, id: &str) -> StoreResult<Option<FenceRecord>>;
    /// Fences, oldest first.
    async fn list_fences(&self, filter: &FenceFilter) -> StoreResult<Vec<FenceRecord>>;
    async fn audit_events(&self, filter: &AuditFilter) -> StoreResult<Vec<AuditEvent>>;
    /// An approval with its decisions.
    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>>;
    /// Approvals, newest first, with their decisions.
    async fn list_approvals(&self, filter: &ApprovalFilter) -> StoreResult<Vec<Approval>>;
    /// Notifications of one approval or review item (by its id), oldest first.
    async fn notifications(&self, subject: &str) -> StoreResult<Vec<Notification>>;
    /// Notifications whose next delivery attempt is due, claimed for
    /// `boot_id` until `claim_until` (as [`Store::claim_revocations`]).
    async fn claim_notifications(
        &self,
        now: OffsetDateTime,
        boot_id: &str,
        claim_until: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<Vec<Notification>>;
    /// What a channel answered when it delivered the request of an approval
    /// or review item (by its id): the Slack message's channel and ts.
    async fn notification_receipt(
        &self,
        subject: &str,
        channel: &str,
    ) -> StoreResult<Option<serde_json::Value>>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> StoreResult<()>;
    /// The last audit event's `seq` and hash (`None`: the log is empty).
    async fn audit_head(&self) -> StoreResult<Option<(i64, String)>>;
    /// Held while fences are put up or lifted, against every process that
    /// shares the store (PostgreSQL: other replicas), until dropped: the
    /// standing fences read, the backend's policy written from them and
    /// the record committed are one step, so a lift on one replica cannot
    /// take down a policy another has just rebuilt with a new fence. One
    /// process on its file (SQLite): nothing to hold beyond the broker's
    /// own lock.
    async fn hold_fences(&self) -> StoreResult<Held> {
        Ok(Held::default())
    }
    /// Per scope: when the agent was last issued a credential, and how many.
    async fn scope_usage(&self, agent_id: &str) -> StoreResult<Vec<crate::governance::ScopeUsage>>;
    /// Governance findings, of one agent or all, open only or all.
    async fn findings(
        &self,
        agent_id: Option<&str>,
        open_only: bool,
    ) -> StoreResult<Vec<crate::governance::Finding>>;
    /// Every recorded departure from the people directory.
    async fn departures(&self) -> StoreResult<Vec<crate::governance::people::Departure>>;
    /// The console session whose cookie hashes to `id_sha256`, expired or not.
    async fn console_session(
        &self,
        id_sha256: &str,
    ) -> StoreResult<Option<crate::model::ConsoleSession>>;
    /// What continuous validation saved of every agent's learning.
    async fn validation_states(&self) -> StoreResult<Vec<crate::validation::Snapshot>>;
    /// Every review campaign, newest first.
    async fn review_campaigns(&self) -> StoreResult<Vec<crate::governance::reviews::Campaign>>;
    async fn review_items(
        &self,
        filter: &crate::governance::reviews::ReviewFilter,
    ) -> StoreResult<Vec<crate::governance::reviews::ReviewItem>>;
    async fn review_item(
        &self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>>;
}

/// Opens the store named by a URL, creating and migrating it if needed.
pub async fn open(url: &str) -> StoreResult<std::sync::Arc<dyn Store>> {
    open_with(url, None).await
}

/// Opens the store named by a URL with the database password (PostgreSQL;
/// SQLite has none), creating and migrating it if needed.
pub async fn open_with(
    url: &str,
    password: Option<&secrecy::SecretString>,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if password.is_some() {
            return Err(StoreError::Invalid(
                "`store.password` is for PostgreSQL; a SQLite store has none".into(),
            ));
        }
        Ok(std::sync::Arc::new(SqliteStore::open(path).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PostgresStore::open(url, password).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl(without_userinfo(url)))
    }
}

/// A URL for an error message: whatever stood before an `@` (a user and
/// perhaps a password) is cut out.
fn without_userinfo(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://…{}", &url[at..]),
        _ => url.to_owned(),
    }
}
