//! Changes in the SQLite engine: each [`StoreTx`] runs on the one writer
//! connection (group commit, `group.rs`), its audit events chained at once.

mod agents;
mod leases;
mod tasks;

use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::model::{
    Agent, AgentStatus, Approval, ApprovalDecision, ApprovalState, FenceRecord, Lease, LeaseState,
    Notification, Revocability, Revocation, Task, TaskState, unix,
};
use crate::store::{Delivery, LeaseSelector, StoreError, StoreResult, StoreTx, TaskSelector};

use super::{approvals, fences, findings, group, reviews};

pub(super) struct SqliteTx {
    pub(super) tx: group::WriteTx,
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn commit(self: Box<Self>) -> StoreResult<()> {
        self.tx.commit().await
    }

    async fn audit(&mut self, mut ev: AuditEvent) -> StoreResult<()> {
        // The event belongs to this transaction's savepoint: it must be open
        // before the event joins the deferred inserts.
        self.tx.begin_now().await?;
        let st = &mut *self.tx.state;
        let (seq, hash) = st.chain_head().await?;
        st.name_user(&mut ev).await?;
        ev.chain_after(seq, &hash);
        // Written with the connection's next round trip, still inside this
        // transaction's savepoint (group.rs).
        let pending = group::PendingEvent::new(ev)?;
        st.head = Some((pending.ev.seq, pending.ev.hash.clone()));
        st.deferred.push(pending);
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
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= ?")
            .bind(unix(s.created_at))
            .execute(self.tx.conn().await?)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, operator, method, credential, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id_sha256)
        .bind(&s.operator)
        .bind(&s.method)
        .bind(&s.credential)
        .bind(unix(s.created_at))
        .bind(unix(s.expires_at))
        .execute(self.tx.conn().await?)
        .await?;
        Ok(())
    }

    async fn delete_console_session(&mut self, id_sha256: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = ?")
            .bind(id_sha256)
            .execute(self.tx.conn().await?)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn save_validation_state(
        &mut self,
        snapshot: &crate::validation::Snapshot,
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO validation_state (agent_id, state, saved_at) VALUES (?, ?, ?) \
             ON CONFLICT (agent_id) DO UPDATE SET state = excluded.state, saved_at = excluded.saved_at",
        )
        .bind(&snapshot.agent)
        .bind(&snapshot.state)
        .bind(unix(now))
        .execute(self.tx.conn().await?)
        .await?;
        Ok(())
    }

    async fn touch_agent(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<()> {
        // Nobody reads its outcome: it rides with the next trip.
        let id = id.to_owned();
        self.tx
            .defer(|q| {
                q.push("UPDATE agents SET last_used_at = ")
                    .push_bind(unix(now))
                    .push(" WHERE id = ")
                    .push_bind(id);
            })
            .await
    }

    async fn update_agent(&mut self, a: &Agent) -> StoreResult<()> {
        agents::update_agent(self, a).await
    }

    async fn agent(&mut self, id: &str) -> StoreResult<Option<Agent>> {
        // The one writer: nothing else writes until this transaction ends.
        sqlx::query("SELECT * FROM agents WHERE id = ?")
            .bind(id)
            .fetch_optional(self.tx.conn().await?)
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
        let done = sqlx::query("DELETE FROM assertion_jtis WHERE expires_at < ?")
            .bind(unix(now) - 60)
            .execute(self.tx.conn().await?)
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
             next_attempt_at = ?, ended_at = NULL, end_reason = ? WHERE id = ? AND state = 'expired'",
        )
        .bind(unix(now))
        .bind(reason)
        .bind(id)
        .execute(self.tx.conn().await?)
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
        boot_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::queue_orphans(self, before, boot_id, now).await
    }

    async fn expired_tasks(&mut self, now: OffsetDateTime) -> StoreResult<Vec<String>> {
        let rows =
            sqlx::query("SELECT id FROM tasks WHERE state = 'open' AND expires_at <= ? LIMIT 1000")
                .bind(unix(now))
                .fetch_all(self.tx.conn().await?)
                .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
            .collect()
    }

    async fn insert_revocation(&mut self, r: &Revocation) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revocations (id, selector, reason, operator, created_at, tasks_ended, \
             agents_suspended, fence_failures) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(serde_json::to_string(&r.selector).map_err(corrupt)?)
        .bind(&r.reason)
        .bind(&r.operator)
        .bind(unix(r.created_at))
        .bind(r.tasks_ended as i64)
        .bind(r.agents_suspended as i64)
        .bind(serde_json::to_string(&r.fence_failures).map_err(corrupt)?)
        .execute(self.tx.conn().await?)
        .await?;
        Ok(())
    }

    async fn raise_approval_bar(
        &mut self,
        id: &str,
        required: u32,
        confirm_in_api: bool,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE approvals SET required = ?, confirm_in_api = ? WHERE id = ? AND state = 'pending'")
            .bind(i64::from(required))
            .bind(confirm_in_api)
            .bind(id)
            .execute(self.tx.conn().await?)
            .await?;
        Ok(())
    }

    async fn add_fence_failures(
        &mut self,
        id: &str,
        failures: &[crate::model::FenceFailure],
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE revocations SET fence_failures = (SELECT json_group_array(json(value)) FROM \
             (SELECT value FROM json_each(fence_failures) UNION ALL SELECT value FROM json_each(?1))) \
             WHERE id = ?2",
        )
        .bind(serde_json::to_string(failures).map_err(corrupt)?)
        .bind(id)
        .execute(self.tx.conn().await?)
        .await?;
        Ok(())
    }

    async fn insert_approval(&mut self, a: &Approval) -> StoreResult<()> {
        approvals::insert(self.tx.conn().await?, a).await
    }

    async fn approval(&mut self, id: &str) -> StoreResult<Option<Approval>> {
        approvals::get(self.tx.conn().await?, id).await
    }

    async fn add_decision(&mut self, id: &str, d: &ApprovalDecision) -> StoreResult<bool> {
        approvals::add_decision(self.tx.conn().await?, id, d).await
    }

    async fn finish_approval(
        &mut self,
        id: &str,
        state: ApprovalState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::finish(self.tx.conn().await?, id, state, reason, now).await
    }

    async fn redeem_approval(
        &mut self,
        id: &str,
        lease_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::redeem(self.tx.conn().await?, id, lease_id, now).await
    }

    async fn release_redemption(&mut self, id: &str) -> StoreResult<bool> {
        approvals::release_redemption(self.tx.conn().await?, id).await
    }

    async fn close_stale_approvals(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Approval>> {
        let closed = approvals::close_stale(self.tx.conn().await?, now).await?;
        approvals::prune_replays(self.tx.conn().await?, now).await?;
        Ok(closed)
    }

    async fn insert_notification(&mut self, n: &Notification) -> StoreResult<()> {
        approvals::insert_notification(self.tx.conn().await?, n).await
    }

    async fn notification_attempted(
        &mut self,
        id: &str,
        outcome: &Delivery,
        boot_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        approvals::notification_attempted(self.tx.conn().await?, id, outcome, boot_id, now).await
    }

    async fn record_replay(
        &mut self,
        digest: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::record_replay(self.tx.conn().await?, digest, expires_at).await
    }

    async fn insert_fence(&mut self, f: &FenceRecord) -> StoreResult<()> {
        fences::insert(self.tx.conn().await?, f).await
    }

    async fn open_finding(&mut self, f: &crate::governance::Finding) -> StoreResult<bool> {
        findings::open(self.tx.conn().await?, f).await
    }

    async fn close_finding(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        findings::close(self.tx.conn().await?, id, reason, now).await
    }

    async fn finding_acted(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<bool> {
        findings::acted(self.tx.conn().await?, id, now).await
    }

    async fn put_exclusion(
        &mut self,
        agent_id: &str,
        scope: &str,
        exclusion: &crate::model::Exclusion,
    ) -> StoreResult<bool> {
        reviews::put_exclusion(self.tx.conn().await?, agent_id, scope, exclusion).await
    }

    async fn record_departure(
        &mut self,
        d: &crate::governance::people::Departure,
    ) -> StoreResult<bool> {
        reviews::record_departure(self.tx.conn().await?, d).await
    }

    async fn mark_reviewed(&mut self, agent_id: &str, at: OffsetDateTime) -> StoreResult<()> {
        reviews::mark_reviewed(self.tx.conn().await?, agent_id, at).await
    }

    async fn insert_campaign(
        &mut self,
        c: &crate::governance::reviews::Campaign,
    ) -> StoreResult<()> {
        reviews::insert_campaign(self.tx.conn().await?, c).await
    }

    async fn insert_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()> {
        reviews::insert_item(self.tx.conn().await?, i).await
    }

    async fn review_item(
        &mut self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>> {
        reviews::item(self.tx.conn().await?, id).await
    }

    async fn save_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<bool> {
        reviews::save_item(self.tx.conn().await?, i).await
    }

    async fn lift_fence(
        &mut self,
        id: &str,
        by: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        fences::lift(self.tx.conn().await?, id, by, reason, now).await
    }
}

pub(super) fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
