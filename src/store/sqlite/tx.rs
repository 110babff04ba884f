//! Changes in the SQLite engine: each [`StoreTx`] runs on the one writer
//! connection (group commit, `group.rs`), its audit events chained at once.

mod leases;

use async_trait::async_trait;
use sqlx::{QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::model::{
    Agent, AgentStatus, Approval, ApprovalDecision, ApprovalState, FenceRecord, Lease, LeaseState,
    Notification, Revocability, Revocation, Selector, Task, TaskState, unix,
};
use crate::store::sql::push_selector;
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
        let st = &mut *self.tx.state;
        let (seq, hash) = match st.head.clone() {
            Some(head) => head,
            None => {
                let head =
                    sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                        .fetch_optional(&mut st.conn)
                        .await?;
                match head {
                    Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
                    None => (0, GENESIS_HASH.to_owned()),
                }
            }
        };
        // Every event of a task that acts for a user names the user.
        if ev.on_behalf_of.is_none()
            && let Some(task) = &ev.task
        {
            ev.on_behalf_of = match st.users.get(task) {
                Some(user) => user.clone(),
                None => {
                    let row: Option<Option<String>> = sqlx::query_scalar(
                        "SELECT json_extract(on_behalf_of, '$.id') FROM tasks WHERE id = ?",
                    )
                    .bind(task)
                    .fetch_optional(&mut st.conn)
                    .await?;
                    if let Some(user) = &row {
                        st.remember_user(task, user.clone());
                    }
                    row.flatten()
                }
            };
        }
        ev.chain_after(seq, &hash);
        // Written with the connection's next round trip, still inside this
        // transaction's savepoint (group.rs).
        let pending = group::PendingEvent {
            policy_ids: serde_json::to_string(&ev.policy_ids).map_err(corrupt)?,
            details: serde_json::to_string(&ev.details).map_err(corrupt)?,
            ev,
        };
        st.head = Some((pending.ev.seq, pending.ev.hash.clone()));
        st.deferred.push(pending);
        Ok(())
    }

    async fn insert_agent(&mut self, a: &Agent) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO agents (id, team, sponsor, risk_tier, environment, purpose, labels, \
             status, auth_method, jwks, created_at, updated_at, last_used_at, last_review_at, \
             delegation, federated_issuer, federated_subject, may_assert_users, max_ttl_secs) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&a.id)
        .bind(&a.team)
        .bind(&a.sponsor)
        .bind(i64::from(a.risk_tier))
        .bind(a.environment.as_str())
        .bind(&a.purpose)
        .bind(serde_json::to_string(&a.labels).map_err(corrupt)?)
        .bind(a.status.as_str())
        .bind(a.auth_method.as_str())
        .bind(serde_json::to_string(&a.jwks).map_err(corrupt)?)
        .bind(unix(a.created_at))
        .bind(unix(a.updated_at))
        .bind(a.last_used_at.map(unix))
        .bind(a.last_review_at.map(unix))
        .bind(serde_json::to_string(&a.delegation).map_err(corrupt)?)
        .bind(a.federated.as_ref().map(|f| f.issuer.clone()))
        .bind(a.federated.as_ref().map(|f| f.subject.clone()))
        .bind(a.may_assert_users)
        .bind(a.max_ttl_secs.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
        .execute(&mut self.tx.state.conn)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(m) if m.contains("federated") => StoreError::Conflict(format!(
                "an agent bound to that federated subject (agent `{}`)",
                a.id
            )),
            StoreError::Conflict(_) => StoreError::Conflict(format!("agent `{}`", a.id)),
            other => other,
        })?;
        Ok(())
    }

    async fn set_agent_status(
        &mut self,
        id: &str,
        from: &[AgentStatus],
        to: AgentStatus,
        now: OffsetDateTime,
    ) -> StoreResult<Option<AgentStatus>> {
        // Read and write in one transaction on the one writer connection:
        // nothing changes the row in between.
        let Some(row) = sqlx::query("SELECT status FROM agents WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut self.tx.state.conn)
            .await?
        else {
            return Ok(None);
        };
        let was: AgentStatus = crate::store::rows::parse_col(&row, "status")?;
        if !from.contains(&was) {
            return Ok(None);
        }
        let suspended_from = (to == AgentStatus::Suspended).then_some(was.as_str());
        sqlx::query(
            "UPDATE agents SET status = ?, suspended_from = ?, updated_at = ? WHERE id = ?",
        )
        .bind(to.as_str())
        .bind(suspended_from)
        .bind(unix(now))
        .bind(id)
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(Some(was))
    }

    async fn set_step_up(
        &mut self,
        id: &str,
        step_up: Option<&crate::model::StepUp>,
        replacing: Option<&crate::model::StepUp>,
    ) -> StoreResult<bool> {
        let json = |s: Option<&crate::model::StepUp>| {
            s.map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        let done = sqlx::query(
            "UPDATE agents SET step_up = ?1 WHERE id = ?2 AND (?3 IS NULL OR step_up = ?3)",
        )
        .bind(json(step_up)?)
        .bind(id)
        .bind(json(replacing)?)
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_console_session(
        &mut self,
        id_sha256: &str,
        s: &crate::model::ConsoleSession,
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM console_sessions WHERE expires_at <= ?")
            .bind(unix(s.created_at))
            .execute(&mut self.tx.state.conn)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id_sha256, operator, method, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id_sha256)
        .bind(&s.operator)
        .bind(&s.method)
        .bind(unix(s.created_at))
        .bind(unix(s.expires_at))
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(())
    }

    async fn delete_console_session(&mut self, id_sha256: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM console_sessions WHERE id_sha256 = ?")
            .bind(id_sha256)
            .execute(&mut self.tx.state.conn)
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
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(())
    }

    async fn touch_agent(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET last_used_at = ? WHERE id = ?")
            .bind(unix(now))
            .bind(id)
            .execute(&mut self.tx.state.conn)
            .await?;
        Ok(())
    }

    async fn update_agent(&mut self, a: &Agent) -> StoreResult<()> {
        sqlx::query(
            "UPDATE agents SET team = ?, sponsor = ?, risk_tier = ?, environment = ?, \
             purpose = ?, labels = ?, jwks = ?, last_review_at = ?, updated_at = ?, \
             delegation = ?, federated_issuer = ?, federated_subject = ?, may_assert_users = ?, \
             max_ttl_secs = ?, keys_rotated_at = ?, owner_changed_at = ? WHERE id = ?",
        )
        .bind(&a.team)
        .bind(&a.sponsor)
        .bind(i64::from(a.risk_tier))
        .bind(a.environment.as_str())
        .bind(&a.purpose)
        .bind(serde_json::to_string(&a.labels).map_err(corrupt)?)
        .bind(serde_json::to_string(&a.jwks).map_err(corrupt)?)
        .bind(a.last_review_at.map(unix))
        .bind(unix(a.updated_at))
        .bind(serde_json::to_string(&a.delegation).map_err(corrupt)?)
        .bind(a.federated.as_ref().map(|f| f.issuer.clone()))
        .bind(a.federated.as_ref().map(|f| f.subject.clone()))
        .bind(a.may_assert_users)
        .bind(a.max_ttl_secs.map(|n| i64::try_from(n).unwrap_or(i64::MAX)))
        .bind(a.keys_rotated_at.map(unix))
        .bind(a.owner_changed_at.map(unix))
        .bind(&a.id)
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(())
    }

    async fn record_jti(
        &mut self,
        agent_id: &str,
        jti: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO assertion_jtis (agent_id, jti, expires_at) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(agent_id)
        .bind(jti)
        .bind(unix(expires_at))
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn prune_jtis(&mut self, now: OffsetDateTime) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM assertion_jtis WHERE expires_at < ?")
            .bind(unix(now) - 60)
            .execute(&mut self.tx.state.conn)
            .await?;
        Ok(done.rows_affected())
    }

    async fn insert_task(&mut self, t: &Task) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tasks (id, agent_id, description, state, opened_at, expires_at, \
             parent_task_id, depth, delegation_budget, scopes, chain, on_behalf_of) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.agent_id)
        .bind(&t.description)
        .bind(t.state.as_str())
        .bind(unix(t.opened_at))
        .bind(unix(t.expires_at))
        .bind(&t.parent_task_id)
        .bind(i64::from(t.depth))
        .bind(i64::from(t.delegation_budget))
        .bind(
            t.scopes
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(corrupt)?,
        )
        .bind(serde_json::to_string(&t.chain).map_err(corrupt)?)
        .bind(
            t.on_behalf_of
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(corrupt)?,
        )
        .execute(&mut self.tx.state.conn)
        .await?;
        self.tx
            .state
            .remember_user(&t.id, t.on_behalf_of.as_ref().map(|u| u.id.clone()));
        Ok(())
    }

    async fn end_tasks(
        &mut self,
        sel: &TaskSelector,
        state: TaskState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        let mut q = QueryBuilder::<Sqlite>::new("UPDATE tasks SET state = ");
        q.push_bind(state.as_str())
            .push(", ended_at = ")
            .push_bind(unix(now))
            .push(", end_reason = ")
            .push_bind(reason.to_owned())
            .push(" WHERE state = 'open'");
        match sel {
            TaskSelector::Task(id) => {
                q.push(" AND id = ").push_bind(id.clone());
            }
            TaskSelector::Emergency(Selector::Provider(p)) => {
                q.push(
                    " AND id IN (SELECT task_id FROM leases WHERE state IN \
                     ('pending','active','revoking','expiring') AND provider = ",
                )
                .push_bind(p.clone())
                .push(")");
            }
            TaskSelector::Emergency(s) => push_selector(&mut q, s, "agent_id"),
        }
        q.push(" RETURNING id");
        let rows = q.build().fetch_all(&mut self.tx.state.conn).await?;
        let mut ended: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        // Delegated tasks end with their parent, level by level, and their
        // leases are queued for revocation in the same commit.
        loop {
            let children: Vec<String> = sqlx::query(
                "UPDATE tasks SET state = 'revoked', ended_at = ?, \
                 end_reason = 'the parent task ended' WHERE state = 'open' AND parent_task_id IN \
                 (SELECT id FROM tasks WHERE state != 'open') RETURNING id",
            )
            .bind(unix(now))
            .fetch_all(&mut self.tx.state.conn)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
            if children.is_empty() {
                break;
            }
            sqlx::query(
                "UPDATE leases SET state = 'revoking', attempts = 0, last_error = NULL, \
                 next_attempt_at = ?, end_reason = 'the parent task ended' \
                 WHERE +state IN ('pending', 'active') AND task_id IN (SELECT value FROM json_each(?))",
            )
            .bind(unix(now))
            .bind(serde_json::to_string(&children).map_err(corrupt)?)
            .execute(&mut self.tx.state.conn)
            .await?;
            ended.extend(children);
        }
        Ok(ended)
    }

    async fn insert_lease(&mut self, l: &Lease) -> StoreResult<bool> {
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
        scopes: &[String],
        now: OffsetDateTime,
    ) -> StoreResult<Vec<String>> {
        leases::queue_expired(self, scopes, now).await
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
                .fetch_all(&mut self.tx.state.conn)
                .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
            .collect()
    }

    async fn insert_revocation(&mut self, r: &Revocation) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revocations (id, selector, reason, operator, created_at, tasks_ended) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(serde_json::to_string(&r.selector).map_err(corrupt)?)
        .bind(&r.reason)
        .bind(&r.operator)
        .bind(unix(r.created_at))
        .bind(r.tasks_ended as i64)
        .execute(&mut self.tx.state.conn)
        .await?;
        Ok(())
    }

    async fn insert_approval(&mut self, a: &Approval) -> StoreResult<()> {
        approvals::insert(&mut self.tx.state.conn, a).await
    }

    async fn approval(&mut self, id: &str) -> StoreResult<Option<Approval>> {
        approvals::get(&mut self.tx.state.conn, id).await
    }

    async fn add_decision(&mut self, id: &str, d: &ApprovalDecision) -> StoreResult<bool> {
        approvals::add_decision(&mut self.tx.state.conn, id, d).await
    }

    async fn finish_approval(
        &mut self,
        id: &str,
        state: ApprovalState,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::finish(&mut self.tx.state.conn, id, state, reason, now).await
    }

    async fn redeem_approval(
        &mut self,
        id: &str,
        lease_id: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::redeem(&mut self.tx.state.conn, id, lease_id, now).await
    }

    async fn release_redemption(&mut self, id: &str) -> StoreResult<bool> {
        approvals::release_redemption(&mut self.tx.state.conn, id).await
    }

    async fn close_stale_approvals(&mut self, now: OffsetDateTime) -> StoreResult<Vec<Approval>> {
        let closed = approvals::close_stale(&mut self.tx.state.conn, now).await?;
        approvals::prune_replays(&mut self.tx.state.conn, now).await?;
        Ok(closed)
    }

    async fn insert_notification(&mut self, n: &Notification) -> StoreResult<()> {
        approvals::insert_notification(&mut self.tx.state.conn, n).await
    }

    async fn notification_attempted(
        &mut self,
        id: &str,
        outcome: &Delivery,
        now: OffsetDateTime,
    ) -> StoreResult<()> {
        approvals::notification_attempted(&mut self.tx.state.conn, id, outcome, now).await
    }

    async fn record_replay(
        &mut self,
        digest: &str,
        expires_at: OffsetDateTime,
    ) -> StoreResult<bool> {
        approvals::record_replay(&mut self.tx.state.conn, digest, expires_at).await
    }

    async fn insert_fence(&mut self, f: &FenceRecord) -> StoreResult<()> {
        fences::insert(&mut self.tx.state.conn, f).await
    }

    async fn open_finding(&mut self, f: &crate::governance::Finding) -> StoreResult<bool> {
        findings::open(&mut self.tx.state.conn, f).await
    }

    async fn close_finding(
        &mut self,
        id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        findings::close(&mut self.tx.state.conn, id, reason, now).await
    }

    async fn finding_acted(&mut self, id: &str, now: OffsetDateTime) -> StoreResult<bool> {
        findings::acted(&mut self.tx.state.conn, id, now).await
    }

    async fn put_exclusion(
        &mut self,
        agent_id: &str,
        scope: &str,
        exclusion: &crate::model::Exclusion,
    ) -> StoreResult<bool> {
        reviews::put_exclusion(&mut self.tx.state.conn, agent_id, scope, exclusion).await
    }

    async fn record_departure(
        &mut self,
        d: &crate::governance::people::Departure,
    ) -> StoreResult<bool> {
        reviews::record_departure(&mut self.tx.state.conn, d).await
    }

    async fn mark_reviewed(&mut self, agent_id: &str, at: OffsetDateTime) -> StoreResult<()> {
        reviews::mark_reviewed(&mut self.tx.state.conn, agent_id, at).await
    }

    async fn insert_campaign(
        &mut self,
        c: &crate::governance::reviews::Campaign,
    ) -> StoreResult<()> {
        reviews::insert_campaign(&mut self.tx.state.conn, c).await
    }

    async fn insert_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()> {
        reviews::insert_item(&mut self.tx.state.conn, i).await
    }

    async fn review_item(
        &mut self,
        id: &str,
    ) -> StoreResult<Option<crate::governance::reviews::ReviewItem>> {
        reviews::item(&mut self.tx.state.conn, id).await
    }

    async fn save_review_item(
        &mut self,
        i: &crate::governance::reviews::ReviewItem,
    ) -> StoreResult<()> {
        reviews::save_item(&mut self.tx.state.conn, i).await
    }

    async fn lift_fence(
        &mut self,
        id: &str,
        by: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> StoreResult<bool> {
        fences::lift(&mut self.tx.state.conn, id, by, reason, now).await
    }
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}
