//! The writes a store may batch, as one call each: a lease with its
//! events, and a task opened with its assertion's `jti`; and each in a
//! transaction of its own (what an engine that does not batch does).

use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::model::{Lease, Task};

use super::{StoreResult, StoreTx};

/// What [`StoreTx::insert_lease`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseInsert {
    /// The task had ended: nothing was written.
    TaskEnded,
    Written {
        /// Whether the registry excludes the lease's scope from its agent,
        /// as this transaction sees it. `None`: the engine cannot tell
        /// from inside the transaction whether an exclusion being committed
        /// alongside it will see this lease (PostgreSQL's concurrent
        /// writers); the caller reads the agent after the commit.
        excluded: Option<bool>,
    },
}

impl LeaseInsert {
    /// The lease was written.
    pub fn written(self) -> bool {
        matches!(self, Self::Written { .. })
    }
}

/// [`Store::insert_lease_audited`] in a transaction of its own.
pub(crate) async fn insert_lease_alone(
    mut tx: Box<dyn StoreTx>,
    lease: &Lease,
    events: Vec<AuditEvent>,
) -> StoreResult<LeaseInsert> {
    let inserted = tx.insert_lease(lease).await?;
    if inserted.written() {
        for ev in events {
            tx.audit(ev).await?;
        }
        tx.commit().await?;
    }
    Ok(inserted)
}

/// An assertion id to record once (`StoreTx::record_jti`).
#[derive(Debug, Clone)]
pub struct JtiUse {
    pub agent_id: String,
    pub jti: String,
    /// When the assertion expires; it may be forgotten after.
    pub expires_at: OffsetDateTime,
}

/// What [`super::Store::open_task_recorded`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOpen {
    /// The task is open and the `jti` recorded, durably.
    Opened,
    /// The `jti` was seen before (the agent active and the parent open):
    /// nothing was written.
    Replayed,
    /// The agent is no longer active, or the parent task no longer open,
    /// as the write finds them (a suspension, the kill switch or the
    /// parent's end committed after the request read them): nothing was
    /// written, so no task outlives what ended its agent's work.
    Overtaken,
}

/// [`super::Store::open_task_recorded`] in a transaction of its own.
pub(crate) async fn open_task_alone(
    mut tx: Box<dyn StoreTx>,
    jti: &JtiUse,
    task: &Task,
    events: Vec<AuditEvent>,
) -> StoreResult<TaskOpen> {
    // The task first: on PostgreSQL its write locks the agent's row, and
    // every task open takes that lock before the `jti`'s key, as the
    // engine's one-statement open does (in the other order, one assertion
    // presented on both paths at once deadlocked).
    if !tx.insert_task(task).await? {
        return Ok(TaskOpen::Overtaken);
    }
    if !tx
        .record_jti(&jti.agent_id, &jti.jti, jti.expires_at)
        .await?
    {
        // Dropped: the task is not kept either.
        return Ok(TaskOpen::Replayed);
    }
    tx.touch_agent(&task.agent_id, task.opened_at).await?;
    for ev in events {
        tx.audit(ev).await?;
    }
    tx.commit().await?;
    Ok(TaskOpen::Opened)
}
