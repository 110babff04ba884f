//! Changes in the PostgreSQL engine: one [`StoreTx`] is one PostgreSQL
//! transaction; its audit events are staged at commit and chained after it.

mod agents;
mod chain;
pub(super) use chain::TaskUsers;
mod leases;
pub(super) use leases::insert_lease_staged;
pub(super) use tasks::open_task_staged;
mod tasks;

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;

use super::{approvals, fences, findings, reviews};
use crate::audit::AuditEvent;
use crate::model::{
    Agent, AgentStatus, Approval, ApprovalDecision, ApprovalState, FenceRecord, Lease, LeaseState,
    Notification, Revocability, Revocation, Task, TaskState, unix,
};
use crate::store::{Delivery, LeaseSelector, StoreError, StoreResult, StoreTx, TaskSelector};

pub(super) struct PostgresTx {
    pub(super) tx: Transaction<'static, Postgres>,
    /// Audit events of this transaction, staged at commit.
    pub(super) events: Vec<AuditEvent>,
    /// Chains them once committed.
    pub(super) chain: std::sync::Arc<super::chain::Chain>,
    /// Each task's user (`on_behalf_of`), as this replica learnt it.
    pub(super) users: std::sync::Arc<chain::TaskUsers>,
}

impl PostgresTx {
    /// Ids from a `RETURNING id` statement.
    pub(super) fn ids(rows: &[PgRow]) -> StoreResult<Vec<String>> {
        rows.iter()
            .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
            .collect()
    }
}

#[async_trait]
impl StoreTx for PostgresTx {
    async fn commit(mut self: Box<Self>) -> StoreResult<()> {
        if self.events.is_empty() {
            self.tx.commit().await?;
            return Ok(());
        }
        super::chain::stage(&mut self.tx, super::chain::staged(&self.events)?).await?;
        self.tx.commit().await?;
        self.chain.wake();
        Ok(())
    }

    async fn audit(&mut self, mut ev: AuditEvent) -> StoreResult<()> {
        self.name_user(&mut ev).await?;
        self.events.push(ev);
        Ok(())
    }

    async fn insert_agent(&mut self, a: &Agent) -> StoreResult<()> {
        agents::insert_agent(self, a).await
    }

    async fn set_agent_status(
        &mut self,
        id: &str,
        from: &[AgentStatus],
        to: AgentStatus,
        now: OffsetDateTime,
    ) -> StoreResult<Option<AgentStatus>> {
        agents::set_agent_status(self, id, from, to, now).await
    }

    async fn set_step_up(
        &mut self,
        id: &str,
        step_up: Option<&crate::model::StepUp>,
        replacing: Option<&crate::model::StepUp>,
    ) -> StoreResult<bool> {
        agents::set_step_up(self, id, step_up, replacing).await
    }

    async fn insert_console_session(
        &mut self,
        id_sha256: &str,
        s: &crate::model::ConsoleSession,
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
            .bind(unix(s.created_at))
            .execute(self.conn())
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, operator, method, credential, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id_sha256)
        .bind(&s.operator)
        .bind(&s.method)
        .bind(&s.credential)
        .bind(unix(s.created_at))
        .bind(unix(s.expires_at))
        .execute(self.conn())
        .await?;
        Ok(())
    }

    async fn delete_console_session(&mut self, id_sha256: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = $1")
            .bind(id_sha256)
            .execute(self.conn())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn save_validation_state(
        &mut self,
        snapshot: &crate::validation::Snapshot,
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO validation_state (agent_id, state, saved_at) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state, saved_at = excluded.saved_at",
        )
        .bind(&snapshot.agent)
        .bind(&snapshot.state)
        .bind(unix(now))
        .execute(self.conn())
        .await?;
        Ok(())
    }

    async fn touch_agent(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET last_used_at = $1 WHERE id = $2")
            .bind(unix(now))
            .bind(id)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    async fn update_agent(&mut self, a: &Agent) -> StoreResult<()> {
        agents::update_agent(self, a).await
    }

    async fn agent(&mut self, id: &str) -> StoreResult<Option<Agent>> {
        sqlx::query("SELECT * FROM agents WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(self.conn())
            .await?
            .as_ref()
            .map(crate::store::rows::agent_from_row)
            .transpose()
    }

    async fn record_jti(
        &mut self,
        agent_id: &str,
        jti: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool> {
        tasks::record_jti(self, agent_id, jti, expires_at).await
    }

    async fn prune_jtis(&mut self, now: OffsetDateTime) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM assertion_jtis WHERE expires_at < $1")
            .bind(unix(now) - 60)
            .execute(self.conn())
            .await?;
        // The local CA's shared revocation list keeps an entry a day past
        // its credential's expiry, as its file does.
        sqlx::query("DELETE FROM ca_revocations WHERE expires_at < $1")
            .bind(unix(now) - 86_400)
            .execute(self.conn())
            .await?;
        Ok(done.rows_affected())
    }

    async fn insert_task(&mut self, t: &Task) -> StoreResult<bool> {
        tasks::insert_task(self, t).await
    }

    async fn end_tasks(
        &mut self,
        sel: &TaskSelector,
        state: TaskState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        tasks::end_tasks(self, sel, state, reason, now).await
    }

    async fn insert_lease(&mut self, l: &Lease) -> StoreResult<crate::store::LeaseInsert> {
        leases::insert_lease(self, l).await
    }

    async fn live_lease_count(
        &mut self,
        agent: &str,
        scope: Option<&str>,
        now: OffsetDateTime,
    ) -> StoreResult<u64> {
        leases::live_lease_count(self, agent, scope, now).await
    }

    async fn record_issued(
        &mut self,
        id: &str,
        handle: &serde_json::Value,
        revocability: Revocability,
        expires_at: OffsetDateTime,
    ) -> StoreResult<Option<LeaseState>> {
        leases::record_issued(self, id, handle, revocability, expires_at).await
    }

    async fn renew_lease(&mut self, id: &str, expires_at: OffsetDateTime) -> StoreResult<bool> {
        leases::renew_lease(self, id, expires_at).await
    }

    async fn revoke_expired(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
             next_attempt_at = $1, ended_at = NULL, end_reason = $2 WHERE id = $3 AND state = 'expired'",
        )
        .bind(unix(now))
        .bind(reason)
        .bind(id)
        .execute(self.conn())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn mark_failed(&mut self, id: &str, error: &str, now: OffsetDateTime) -> StoreResult<()> {
        leases::mark_failed(self, id, error, now).await
    }

    async fn queue_revocations(
        &mut self,
        sel: &LeaseSelector,
        reason: &str,
        revocation_id: Option<&str>,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::queue_revocations(self, sel, reason, revocation_id, now).await
    }

    async fn finish_revocation(
        &mut self,
        id: &str,
        state: LeaseState,
        lives_until: Option<OffsetDateTime>,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        leases::finish_revocation(self, id, state, lives_until, now).await
    }

    async fn finish_revocations(
        &mut self,
        ids: &[String],
        state: LeaseState,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::finish_revocations(self, ids, state, now).await
    }

    async fn revocation_failed(
        &mut self,
        id: &str,
        error: &str,
        next_attempt_at: OffsetDateTime,
    ) -> StoreResult<()> {
        leases::revocation_failed(self, id, error, next_attempt_at).await
    }

    async fn queue_expired(
        &mut self,
        ids: &[String],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::queue_expired(self, ids, now).await
    }

    async fn expire_leases(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Lease>> {
        leases::expire_leases(self, now).await
    }

    async fn queue_orphans(
        &mut self,
        before: OffsetDateTime,
        _boot_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::queue_orphans(self, before, _boot_id, now).await
    }

    async fn expired_tasks(&mut self, now: OffsetDateTime) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM tasks WHERE state = 'open' AND expires_at <= $1 LIMIT 1000",
        )
        .bind(unix(now))
        .fetch_all(self.conn())
        .await?;
        Self::ids(&rows)
    }

    async fn insert_revocation(&mut self, r: &Revocation) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revocations (id, selector, reason, operator, created_at, tasks_ended, \
             agents_suspended, fence_failures) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&r.id)
        .bind(serde_json::to_string(&r.selector).map_err(corrupt)?)
        .bind(&r.reason)
        .bind(&r.operator)
        .bind(unix(r.created_at))
        .bind(i64::try_from(r.tasks_ended).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.agents_suspended).unwrap_or(i64::MAX))
        .bind(serde_json::to_string(&r.fence_failures).map_err(corrupt)?)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    async fn raise_approval_bar(
        &mut self,
        id: &str,
        required: u32,
        confirm_in_api: bool,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE approvals SET required = $1, confirm_in_api = $2 WHERE id = $3 AND state = 'pending'")
            .bind(i64::from(required))
            .bind(confirm_in_api)
            .bind(id)
            .execute(self.conn())
            .await?;
        Ok(())
    }

    async fn add_fence_failures(
        &mut self,
        id: &str,
        failures: &[crate::model::FenceFailure],
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE revocations SET fence_failures = (fence_failures::jsonb || $1::jsonb)::text \
             WHERE id = $2",
        )
        .bind(serde_json::to_string(failures).map_err(corrupt)?)
        .bind(id)
        .execute(self.conn())
        .await?;
        Ok(())
    }

    async fn insert_approval(&mut self, a: &Approval) -> StoreResult<()> {
        approvals::insert(self.conn(), a).await
    }

    async fn approval(&mut self, id: &str) -> StoreResult<Option<Approval>> {
        // Read to decide on (a quorum, a redemption): locked until commit,
        // so two replicas deciding at once take turns and the second sees
        // the first's decision.
        sqlx::query("SELECT 1 FROM approvals WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(self.conn())
            .await?;
        approvals::get(self.conn(), id).await
    }

    async fn add_decision(&mut self, id: &str, d: &ApprovalDecision) -> StoreResult<bool> {
        approvals::add_decision(self.conn(), id, d).await
    }

    async fn finish_approval(
        &mut self,
        id: &str,
        state: ApprovalState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::finish(self.conn(), id, state, reason, now).await
    }

    async fn redeem_approval(
        &mut self,
        id: &str,
        lease_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::redeem(self.conn(), id, lease_id, now).await
    }

    async fn release_redemption(&mut self, id: &str) -> StoreResult<bool> {
        approvals::release_redemption(self.conn(), id).await
    }

    async fn close_stale_approvals(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Approval>> {
        let closed = approvals::close_stale(self.conn(), now).await?;
        approvals::prune_replays(self.conn(), now).await?;
        Ok(closed)
    }

    async fn insert_notification(&mut self, n: &Notification) -> StoreResult<()> {
        approvals::insert_notification(self.conn(), n).await
    }

    async fn notification_attempted(
        &mut self,
        id: &str,
        outcome: &Delivery,
        boot_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        approvals::notification_attempted(self.conn(), id, outcome, boot_id, now).await
    }

    async fn record_replay(
        &mut self,
        digest: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::record_replay(self.conn(), digest, expires_at).await
    }

    async fn insert_fence(&mut self, f: &FenceRecord) -> StoreResult<()> {
        fences::insert(self.conn(), f).await
    }

    async fn open_finding(&mut self, f: &crate::governance::Finding) -> StoreResult<bool> {
        findings::open(self.conn(), f).await
    }

    async fn close_finding(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        findings::close(self.conn(), id, reason, now).await
    }

    async fn finding_acted(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<bool> {
        findings::acted(self.conn(), id, now).await
    }

    async fn put_exclusion(
        &mut self,
        agent_id: &str,
        scope: &str,
        exclusion: &crate::model::Exclusion,
    ) -> StoreResult<bool> {
        reviews::put_exclusion(self.conn(), agent_id, scope, exclusion).await
    }

    async fn record_departure(
        &mut self,
        d: &crate::governance::people::Departure,
    ) -> StoreResult<bool> {
        reviews::record_departure(self.conn(), d).await
    }

    async fn mark_reviewed(&mut self, agent_id: &str, at: OffsetDateTime) -> StoreResult<()> {
        reviews::mark_reviewed(self.conn(), agent_id, at).await
    }

    async fn insert_campaign(
        &mut self,
        c: &crate::governance::reviews::Campaign,
    ) -> StoreResult<()> {
        let mut sp = sqlx::Connection::begin(self.conn()).await?;
        let done = reviews::insert_campaign(&mut *sp, c).await;
        settle(sp, done).await
    }

    async fn insert_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()> {
        let mut sp = sqlx::Connection::begin(self.conn()).await?;
        let done = reviews::insert_item(&mut *sp, i).await;
        settle(sp, done).await
    }

    async fn review_item(
        &mut self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>> {
        // Read to be decided on and written back: locked until commit, so a
        // decision on another replica waits and then sees this one.
        sqlx::query("SELECT * FROM review_items WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(self.conn())
            .await?
            .map(|r| crate::store::rows::item_from_row(&r))
            .transpose()
    }

    async fn save_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<bool> {
        reviews::save_item(self.conn(), i).await
    }

    async fn lift_fence(
        &mut self,
        id: &str,
        by: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        fences::lift(self.conn(), id, by, reason, now).await
    }
}

/// Ends the savepoint of a write that may fail on a constraint: kept when
/// it worked, rolled back when not. PostgreSQL aborts the whole transaction
/// at a failed statement; the store contract (as SQLite) fails only the
/// statement, so the transaction can go on and record what happened.
async fn settle<T>(sp: Transaction<'_, Postgres>, done: StoreResult<T>) -> StoreResult<T> {
    match done {
        Ok(v) => {
            sp.commit().await?;
            Ok(v)
        }
        Err(e) => {
            sp.rollback().await?;
            Err(e)
        }
    }
}

pub(super) fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
