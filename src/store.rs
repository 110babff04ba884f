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

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::model::{
    Agent, AgentStatus, Approval, ApprovalDecision, ApprovalFilter, ApprovalState, FenceFilter,
    FenceRecord, Lease, LeaseFilter, LeaseState, Notification, Revocability, Revocation,
    RevocationProgress, Selector, Task, TaskState,
};

pub use batchable::{JtiUse, LeaseInsert};
pub(crate) use batchable::{insert_lease_alone, open_task_alone};
pub use postgres::PostgresStore;
pub(crate) use postgres::connect_options as postgres_options;
pub use sqlite::SqliteStore;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A caller's argument the store cannot use (a bad cursor).
    #[error("{0}")]
    Invalid(String),
    #[error("unsupported store url `{0}` (supported: sqlite://path, postgres://user@host/db)")]
    UnsupportedUrl(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Audit events matching a filter, after a sequence number.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub after_seq: i64,
    pub agent: Option<String>,
    pub task: Option<String>,
    pub action: Option<String>,
    pub limit: u32,
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
    /// Opens `task`: records `jti` (`false`, and nothing written, when it
    /// was seen before), writes the task, marks its agent used and appends
    /// `events`, as one durable change; an engine may batch it with others.
    async fn open_task_recorded(
        &self,
        jti: &JtiUse,
        task: &Task,
        events: Vec<AuditEvent>,
    ) -> StoreResult<bool> {
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
    /// Leases matching an emergency selector that may still be working
    /// credentials: pending, active, revoking, and expiring (released, but
    /// their backend cannot kill them).
    async fn live_leases(&self, selector: &Selector) -> StoreResult<Vec<Lease>>;
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

/// One atomic change. Dropping it without `commit` rolls back.
#[async_trait]
pub trait StoreTx: Send {
    async fn commit(self: Box<Self>) -> StoreResult<()>;

    /// Appends an audit event to the chain.
    async fn audit(&mut self, event: AuditEvent) -> StoreResult<()>;

    async fn insert_agent(&mut self, agent: &Agent) -> StoreResult<()>;
    /// Moves an agent from one of `from` to `to`, in this transaction and only
    /// if it is still in one of `from` (so a change decided on a stale read
    /// cannot apply). Suspending remembers the state left, for resume.
    /// Returns the state it left, or `None` when it was in none of `from`.
    async fn set_agent_status(
        &mut self,
        id: &str,
        from: &[AgentStatus],
        to: AgentStatus,
        now: OffsetDateTime,
    ) -> StoreResult<Option<AgentStatus>>;
    async fn touch_agent(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<()>;
    /// Sets or clears an agent's step-up, only if its current one is
    /// `replacing` when that is given; `false` when nothing changed.
    async fn set_step_up(
        &mut self,
        id: &str,
        step_up: Option<&crate::model::StepUp>,
        replacing: Option<&crate::model::StepUp>,
    ) -> StoreResult<bool>;
    /// Starts a console session (and forgets the expired ones).
    async fn insert_console_session(
        &mut self,
        id_sha256: &str,
        session: &crate::model::ConsoleSession,
    ) -> StoreResult<()>;
    /// Ends a console session; `false` when there was none.
    async fn delete_console_session(&mut self, id_sha256: &str) -> StoreResult<bool>;
    /// Saves one agent's continuous validation learning (replacing the last).
    async fn save_validation_state(
        &mut self,
        snapshot: &crate::validation::Snapshot,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Rewrites an agent's attributes (team, sponsor, tier, labels, keys…).
    async fn update_agent(&mut self, agent: &Agent) -> StoreResult<()>;

    /// Records a client-assertion `jti`; `false` when it was seen before.
    async fn record_jti(
        &mut self,
        agent_id: &str,
        jti: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// Forgets assertion ids that can no longer be replayed.
    async fn prune_jtis(&mut self, now: OffsetDateTime) -> StoreResult<u64>;

    async fn insert_task(&mut self, task: &Task) -> StoreResult<()>;
    /// Ends open tasks matching the selector (for `Provider`: tasks holding a
    /// live lease of that provider). Returns their ids.
    async fn end_tasks(
        &mut self,
        selector: &TaskSelector,
        state: TaskState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;

    /// Writes a new lease (with its handle and revocability when the
    /// credential was issued before the write), but only while its task is
    /// still open (checked in the same transaction, so a task ended
    /// concurrently cannot gain a lease nobody will revoke).
    async fn insert_lease(&mut self, lease: &Lease) -> StoreResult<LeaseInsert>;
    /// Live leases (pending or active, unexpired at `now`) of `agent`, of
    /// `scope` when given: what a usage limit counts. Callers for one agent
    /// are serialised until commit (PostgreSQL: a transaction-scoped
    /// advisory lock; SQLite: the one writer), so concurrent requests cannot
    /// both pass a limit.
    async fn live_lease_count(
        &mut self,
        agent: &str,
        scope: Option<&str>,
        now: OffsetDateTime,
    ) -> StoreResult<u64>;
    /// Records what the provider issued. Returns the lease's state afterwards:
    /// `Active`, or `Revoking` when a revocation overtook the issue (the
    /// handle is kept so the queue can revoke it), or `None` if the lease
    /// was no longer pending or revoking.
    async fn record_issued(
        &mut self,
        id: &str,
        handle: &serde_json::Value,
        revocability: Revocability,
        expires_at: OffsetDateTime,
    ) -> StoreResult<Option<LeaseState>>;
    /// Moves an active lease's expiry after a renewal. Returns `false` when
    /// the lease is no longer active (a revocation overtook the renewal).
    async fn renew_lease(&mut self, id: &str, expires_at: OffsetDateTime) -> StoreResult<bool>;
    /// A pending lease whose provider refused: nothing exists to revoke.
    async fn mark_failed(&mut self, id: &str, error: &str, now: OffsetDateTime) -> StoreResult<()>;
    /// Queues live leases matching the selector for revocation. Returns the
    /// ids queued.
    async fn queue_revocations(
        &mut self,
        selector: &LeaseSelector,
        reason: &str,
        revocation_id: Option<&str>,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;
    /// The provider confirmed (or cannot act): `Revoked`, or `Expiring` with
    /// the time the credential really lives until (the lease's expiry then
    /// says so, in the API, the CLI and the audit log alike).
    async fn finish_revocation(
        &mut self,
        id: &str,
        state: LeaseState,
        lives_until: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// [`StoreTx::finish_revocation`] for many leases confirmed alike (no
    /// `lives_until`) in one statement; returns the ids it ended (those
    /// still `revoking`).
    async fn finish_revocations(
        &mut self,
        ids: &[String],
        state: LeaseState,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;
    /// A revocation attempt failed; it stays queued with its error.
    async fn revocation_failed(
        &mut self,
        id: &str,
        error: &str,
        next_attempt_at: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Active leases of `scopes` (whose provider must act at expiry) whose
    /// expiry passed are queued for revocation. Returns their ids.
    async fn queue_expired(
        &mut self,
        scopes: &[String],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;
    /// Active and expiring leases whose expiry passed become `Expired`.
    async fn expire_leases(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Lease>>;
    /// Pending leases written by a process that is no longer alive (it
    /// crashed: their issue cannot be in flight; SQLite: any other than
    /// `boot_id`; PostgreSQL: a replica whose liveness lock is gone), or
    /// older than `before` (the provider hung): queued for revocation by
    /// lease id.
    async fn queue_orphans(
        &mut self,
        before: OffsetDateTime,
        boot_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>>;
    /// Open tasks past their expiry. Returns their ids (not yet ended).
    async fn expired_tasks(&mut self, now: OffsetDateTime) -> StoreResult<Vec<String>>;

    async fn insert_revocation(&mut self, revocation: &Revocation) -> StoreResult<()>;

    async fn insert_approval(&mut self, approval: &Approval) -> StoreResult<()>;
    /// Reads an approval inside the transaction (decisions included).
    async fn approval(&mut self, id: &str) -> StoreResult<Option<Approval>>;
    /// Adds one approver's decision to a pending approval; `false` when the
    /// approver decided before or the approval is no longer pending.
    async fn add_decision(
        &mut self,
        approval_id: &str,
        decision: &ApprovalDecision,
    ) -> StoreResult<bool>;
    /// Ends a pending approval; `false` when it was no longer pending.
    async fn finish_approval(
        &mut self,
        id: &str,
        state: ApprovalState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// Marks an approved credential request redeemed by `lease_id`; `false`
    /// when it is not approved or was redeemed already.
    async fn redeem_approval(
        &mut self,
        id: &str,
        lease_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// Undoes a redemption whose lease never became a working credential
    /// (failed, or being revoked), so the approval can be redeemed again.
    /// Returns whether it was undone.
    async fn release_redemption(&mut self, id: &str) -> StoreResult<bool>;
    /// Expires pending approvals past their expiry and cancels those whose
    /// task ended. Returns them in their new state.
    async fn close_stale_approvals(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Approval>>;
    async fn insert_notification(&mut self, notification: &Notification) -> StoreResult<()>;
    async fn notification_attempted(
        &mut self,
        id: &str,
        outcome: &Delivery,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Records a signed inbound request's digest; `false` when it was seen
    /// before (a replay).
    async fn record_replay(
        &mut self,
        digest: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool>;

    async fn insert_fence(&mut self, fence: &FenceRecord) -> StoreResult<()>;
    /// Records a finding unless one of its agent, kind and subject is open
    /// (that one's detail and deadline are brought up to date); whether it
    /// was recorded.
    async fn open_finding(&mut self, finding: &crate::governance::Finding) -> StoreResult<bool>;
    /// Closes an open finding; whether it was open.
    async fn close_finding(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// Marks an open finding's lifecycle action done; whether it was pending.
    async fn finding_acted(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<bool>;
    /// Writes the agent's exclusion of `scope` if it changes whether one
    /// stands: a new one (no `lifted_at`) where none stands, or a lifted one
    /// where one stands; whether it was written.
    async fn put_exclusion(
        &mut self,
        agent_id: &str,
        scope: &str,
        exclusion: &crate::model::Exclusion,
    ) -> StoreResult<bool>;
    /// Records a departure unless that email departed already; whether it did.
    async fn record_departure(
        &mut self,
        departure: &crate::governance::people::Departure,
    ) -> StoreResult<bool>;
    /// Sets the agent's `last_review_at`.
    async fn mark_reviewed(&mut self, agent_id: &str, at: OffsetDateTime) -> StoreResult<()>;
    /// A campaign of the same name is a `Conflict`.
    async fn insert_campaign(
        &mut self,
        campaign: &crate::governance::reviews::Campaign,
    ) -> StoreResult<()>;
    async fn insert_review_item(
        &mut self,
        item: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()>;
    /// The item as this transaction sees it.
    async fn review_item(
        &mut self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>>;
    /// Writes the item's state, decisions and dates.
    async fn save_review_item(
        &mut self,
        item: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()>;
    /// Marks a standing fence lifted; `false` when it was lifted already.
    async fn lift_fence(
        &mut self,
        id: &str,
        by: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
}

/// What one delivery attempt of a notification came to.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// Delivered; what the channel answered (e.g. a Slack message ts).
    Delivered(serde_json::Value),
    /// Not delivered: retry at `retry_at`, or never (`None`: given up).
    Failed {
        error: String,
        retry_at: Option<OffsetDateTime>,
    },
}

/// Which open tasks to end.
#[derive(Debug, Clone)]
pub enum TaskSelector {
    Task(String),
    Emergency(Selector),
}

/// Which live leases to queue for revocation.
#[derive(Debug, Clone)]
pub enum LeaseSelector {
    Lease(String),
    /// These leases (one statement for many: a policy change's).
    Leases(Vec<String>),
    Task(String),
    /// Every live lease of these tasks (tasks an emergency revocation ended).
    Tasks(Vec<String>),
    /// Every live lease of one agent in one scope (an exclusion's).
    AgentScope {
        agent: String,
        scope: String,
    },
    Emergency(Selector),
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
