//! A transaction's audit events in the PostgreSQL engine: each names its
//! task's user; they are staged at commit and chained after it
//! (`store/postgres/chain.rs`).

use sqlx::PgExecutor;

use super::PostgresTx;
use crate::audit::AuditEvent;
use crate::store::StoreResult;

impl PostgresTx {
    /// The connection of this transaction.
    pub(super) fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Names the user of the event's task, if it acts for one.
    pub(super) async fn name_user(&mut self, ev: &mut AuditEvent) -> StoreResult<()> {
        let users = self.users.clone();
        users.name_user(self.conn(), ev).await
    }
}

/// Each task's user (`on_behalf_of`), which never changes once the task is
/// written: learnt once a replica, not read again for every event.
#[derive(Default)]
pub(in crate::store::postgres) struct TaskUsers(
    std::sync::Mutex<std::collections::HashMap<String, Option<String>>>,
);

/// How many tasks' users a replica keeps before it starts over.
const TASK_USERS: usize = 65_536;

impl TaskUsers {
    fn get(&self, task: &str) -> Option<Option<String>> {
        self.0.lock().ok()?.get(task).cloned()
    }

    /// Every event of a task that acts for a user names the user.
    pub(in crate::store::postgres) async fn name_user(
        &self,
        db: impl PgExecutor<'_>,
        ev: &mut AuditEvent,
    ) -> StoreResult<()> {
        let Some(task) = ev.task.as_deref().filter(|_| ev.on_behalf_of.is_none()) else {
            return Ok(());
        };
        if let Some(user) = self.get(task) {
            ev.on_behalf_of = user;
            return Ok(());
        }
        let row: Option<Option<String>> =
            sqlx::query_scalar("SELECT on_behalf_of::jsonb ->> 'id' FROM tasks WHERE id = $1")
                .bind(task)
                .fetch_optional(db)
                .await?;
        if let Some(user) = &row {
            self.learn(task, user.clone());
        }
        ev.on_behalf_of = row.flatten();
        Ok(())
    }

    pub(in crate::store::postgres) fn learn(&self, task: &str, user: Option<String>) {
        if let Ok(mut users) = self.0.lock() {
            if users.len() >= TASK_USERS {
                users.clear();
            }
            users.insert(task.to_owned(), user);
        }
    }
}
