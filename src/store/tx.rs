//! One atomic change to the store ([`StoreTx`]), and what a change names:
//! the tasks to end, the leases to queue, a notification's delivery.

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{LeaseInsert, StoreResult};
use crate::audit::AuditEvent;
use crate::model::{
    Agent, AgentStatus, Approval, ApprovalDecision, ApprovalState, FenceRecord, Lease, LeaseState,
    Notification, Revocability, Revocation, Selector, Task, TaskState,
};

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
    /// An agent as this transaction sees it, held against other writers
    /// until it ends (read to decide a rewrite on).
    async fn agent(&mut self, id: &str) -> StoreResult<Option<Agent>>;

    /// Records a client-assertion `jti`; `false` when it was seen before.
    async fn record_jti(
        &mut self,
        agent_id: &str,
        jti: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool>;
    /// Forgets assertion ids that can no longer be replayed.
    async fn prune_jtis(&mut self, now: OffsetDateTime) -> StoreResult<u64>;

    /// Writes `task` only while its agent is active and its parent task
    /// (if any) open, as this transaction finds them; `false`: not written.
    async fn insert_task(&mut self, task: &Task) -> StoreResult<bool>;
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
    /// Queues an `expired` lease for revocation after all: its backend
    /// extended the credential (a renewal) as the reaper marked it expired,
    /// which revokes nothing. Returns `false` when it is not `expired`.
    async fn revoke_expired(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool>;
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
    /// Of leases `ids` (whose provider must act at expiry), those still
    /// active whose expiry passed are queued for revocation. Returns their
    /// ids.
    async fn queue_expired(
        &mut self,
        ids: &[String],
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
    /// Adds to emergency revocation `id`'s fence failures (none: no such
    /// revocation, as for a policy change's fences).
    async fn add_fence_failures(
        &mut self,
        id: &str,
        failures: &[crate::model::FenceFailure],
    ) -> StoreResult<()>;

    async fn insert_approval(&mut self, approval: &Approval) -> StoreResult<()>;
    /// Raises a pending approval's quorum and whether it must be decided
    /// in Keygate (its agent's risk tier rose while it waited).
    async fn raise_approval_bar(
        &mut self,
        id: &str,
        required: u32,
        confirm_in_api: bool,
    ) -> StoreResult<()>;
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
    /// The outcome of `boot_id`'s attempt at a notification. A delivery is
    /// recorded whoever claims it now; a failure only while the claim is
    /// still `boot_id`'s (or nobody's): one that ran out and was taken by
    /// another replica, now sending it, is not undone by a late failure.
    /// Never back to undelivered.
    async fn notification_attempted(
        &mut self,
        id: &str,
        outcome: &Delivery,
        boot_id: &str,
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
    /// Writes the item's state, decisions, dates and reviewer, if it is
    /// still open in the store (every change starts from an open item):
    /// `false` when another writer closed it meanwhile, and nothing written.
    async fn save_review_item(
        &mut self,
        item: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<bool>;
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
    /// Every live lease in one scope of the open tasks delegated, at any
    /// depth, from one agent's (an exclusion's, for its sub-agents).
    DelegatedScope {
        delegator: String,
        scope: String,
    },
    Emergency(Selector),
}
