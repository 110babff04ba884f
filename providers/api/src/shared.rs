//! State a provider must share with every replica of the broker.
//!
//! One broker process can keep its backend's state in local files (the local
//! CA's revocation list). Several replicas on one database cannot: a
//! certificate revoked through one must be refused by all, and all must
//! serve the same revocation list. The broker hands such providers a
//! [`RevocationJournal`] kept in its database; each check reads it, so no
//! replica answers from a stale copy.

use async_trait::async_trait;

use crate::ProviderError;

/// What a revocation names: an X.509 serial (hex) or a JWT id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RevokedKind {
    Serial,
    Jti,
}

impl RevokedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::Jti => "jti",
        }
    }
}

/// One revoked credential in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub kind: RevokedKind,
    pub key: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub revoked_at: i64,
}

/// A durable revocation list shared by every replica, one per provider
/// instance (by name).
#[async_trait]
pub trait RevocationJournal: Send + Sync + std::fmt::Debug {
    /// Records the entries durably (all or none). Returns whether any was
    /// not listed before.
    async fn revoke(&self, provider: &str, entries: &[Revoked]) -> Result<bool, ProviderError>;
    /// Whether `key` is listed.
    async fn is_revoked(
        &self,
        provider: &str,
        kind: RevokedKind,
        key: &str,
    ) -> Result<bool, ProviderError>;
    /// Every entry whose credential expires after `after` (unix seconds),
    /// sorted by kind and key.
    async fn unexpired(&self, provider: &str, after: i64) -> Result<Vec<Revoked>, ProviderError>;
}
