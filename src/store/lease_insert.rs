//! What a lease write reports, and a lease written with its events in a
//! transaction of its own (what an engine that does not batch does).

use crate::audit::AuditEvent;
use crate::model::Lease;

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
