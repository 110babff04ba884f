//! The audit chain in the PostgreSQL engine: a transaction's events are
//! chained after the head and inserted at commit, under the chain's advisory
//! lock, so replicas write one chain; and each event names its task's user.

use sqlx::{Postgres, QueryBuilder, Row};

use super::super::AUDIT_CHAIN_LOCK;
use super::{PostgresTx, corrupt};
use crate::audit::GENESIS_HASH;
use crate::store::StoreResult;

impl PostgresTx {
    /// The connection of this transaction.
    pub(super) fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// The user a task acts for, if any.
    pub(super) async fn user_of(&mut self, task: &str) -> StoreResult<Option<String>> {
        if let Some(user) = self.users.get(task) {
            return Ok(user.clone());
        }
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT on_behalf_of::jsonb ->> 'id' FROM tasks WHERE id = $1")
                .bind(task)
                .fetch_optional(self.conn())
                .await?;
        if let Some(user) = &row {
            self.users.insert(task.to_owned(), user.clone());
        }
        Ok(row.flatten())
    }

    /// Chains this transaction's events after the current head and inserts
    /// them, holding the chain's lock until the transaction ends.
    pub(super) async fn append_events(&mut self) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(AUDIT_CHAIN_LOCK)
            .execute(self.conn())
            .await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(self.conn())
            .await?;
        let (mut seq, mut hash) = match head {
            Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
            None => (0, GENESIS_HASH.to_owned()),
        };
        let mut rows = Vec::with_capacity(self.events.len());
        for mut ev in std::mem::take(&mut self.events) {
            ev.chain_after(seq, &hash);
            seq = ev.seq;
            hash.clone_from(&ev.hash);
            let policy_ids = serde_json::to_string(&ev.policy_ids).map_err(corrupt)?;
            let details = serde_json::to_string(&ev.details).map_err(corrupt)?;
            rows.push((ev, policy_ids, details));
        }
        // 17 binds a row: 1,000 rows stay well under the 65,535 limit.
        for chunk in rows.chunks(1000) {
            let mut q = QueryBuilder::<Postgres>::new(
                "INSERT INTO audit_events (seq, at_ms, actor, action, agent, task, scope, lease, \
                 decision, policy_ids, policy_hash, outcome, reason, details, prev_hash, hash, \
                 on_behalf_of) ",
            );
            q.push_values(chunk, |mut b, (ev, policy_ids, details)| {
                b.push_bind(ev.seq)
                    .push_bind(ev.at_ms)
                    .push_bind(ev.actor.clone())
                    .push_bind(ev.action.clone())
                    .push_bind(ev.agent.clone())
                    .push_bind(ev.task.clone())
                    .push_bind(ev.scope.clone())
                    .push_bind(ev.lease.clone())
                    .push_bind(ev.decision.clone())
                    .push_bind(policy_ids.clone())
                    .push_bind(ev.policy_hash.clone())
                    .push_bind(ev.outcome.clone())
                    .push_bind(ev.reason.clone())
                    .push_bind(details.clone())
                    .push_bind(ev.prev_hash.clone())
                    .push_bind(ev.hash.clone())
                    .push_bind(ev.on_behalf_of.clone());
            });
            q.build().execute(self.conn()).await?;
        }
        Ok(())
    }
}
