//! The audit chain as the writer extends it: the head it keeps in memory,
//! the user each task acts for, and an event made ready for its insert.

use sqlx::Row;

use super::group::{PendingEvent, State};
use super::tx::corrupt;
use crate::audit::{AuditEvent, GENESIS_HASH};
use crate::store::StoreResult;

impl State {
    /// The chain's head (seq, hash), read from the table when the writer
    /// does not know it (at start, after a rolled-back group).
    pub(super) async fn chain_head(&mut self) -> StoreResult<(i64, String)> {
        if let Some(head) = &self.head {
            return Ok(head.clone());
        }
        let head = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut self.conn)
            .await?;
        Ok(match head {
            Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
            None => (0, GENESIS_HASH.to_owned()),
        })
    }

    /// Whether [`State::name_user`] can name `ev`'s user without a read.
    pub(super) fn knows_user(&self, ev: &AuditEvent) -> bool {
        ev.on_behalf_of.is_some()
            || ev
                .task
                .as_ref()
                .is_none_or(|task| self.users.contains_key(task))
    }

    /// Every event of a task that acts for a user names the user.
    pub(super) async fn name_user(&mut self, ev: &mut AuditEvent) -> StoreResult<()> {
        if ev.on_behalf_of.is_some() {
            return Ok(());
        }
        let Some(task) = &ev.task else {
            return Ok(());
        };
        ev.on_behalf_of = match self.users.get(task) {
            Some(user) => user.clone(),
            None => {
                let row: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT json_extract(on_behalf_of, '$.id') FROM tasks WHERE id = ?",
                )
                .bind(task)
                .fetch_optional(&mut self.conn)
                .await?;
                if let Some(user) = &row {
                    self.remember_user(task, user.clone());
                }
                row.flatten()
            }
        };
        Ok(())
    }
}

impl PendingEvent {
    /// `ev`, chained, with its JSON columns.
    pub(super) fn new(ev: AuditEvent) -> StoreResult<Self> {
        Ok(Self {
            policy_ids: serde_json::to_string(&ev.policy_ids).map_err(corrupt)?,
            details: serde_json::to_string(&ev.details).map_err(corrupt)?,
            ev,
        })
    }
}
