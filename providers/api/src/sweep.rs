//! Sweeping: a provider that leaves named objects at its backend (Entra app
//! passwords) removes the ones no live lease accounts for, so a crash
//! between the backend call and the broker recording it leaves nothing
//! behind for long.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::ProviderError;

/// The broker's answer to "which of these leases may still hold a working
/// credential?", asked after the provider has listed what it finds at the
/// backend, so a lease written and issued meanwhile is seen as live.
#[async_trait]
pub trait LeaseLookup: Send + Sync {
    /// The subset of `lease_ids` whose leases are live: being issued,
    /// active, being revoked, or released but still valid. A lease the
    /// broker has never seen is not live.
    async fn live(&self, lease_ids: &[String]) -> Result<BTreeSet<String>, ProviderError>;
}

/// One leftover a sweep removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Swept {
    /// The lease the leftover was created for, when its name says.
    pub lease_id: Option<String>,
    /// What was removed, in words (never secret).
    pub description: String,
    /// Why it was removed (`its lease is not live`, `it expired`).
    pub reason: String,
    /// Non-secret identifiers for the audit record (key id, application).
    pub details: serde_json::Value,
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct Sweep {
    /// What it removed.
    pub removed: Vec<Swept>,
    /// What it could not look at or remove, in words; the next sweep tries
    /// again.
    pub errors: Vec<ProviderError>,
}
