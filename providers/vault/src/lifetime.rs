//! Lifetimes: asking Vault for no more than the lease has left, and
//! reporting an expiry that never passes what the broker granted.

use keygate_provider_api::{IssueRequest, ProviderError};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Whole seconds the lease has left, rounded down so Vault's clock cannot
/// carry the credential past the lease.
pub(crate) fn remaining_secs(req: &IssueRequest) -> Result<u64, ProviderError> {
    secs_until(req.expires_at)
}

/// Whole seconds from now until `t`, at least one.
pub(crate) fn secs_until(t: OffsetDateTime) -> Result<u64, ProviderError> {
    let left = (t - OffsetDateTime::now_utc()).whole_seconds();
    u64::try_from(left)
        .ok()
        .filter(|s| *s >= 1)
        .ok_or_else(|| ProviderError::InvalidParams("the lease has no time left".into()))
}

/// `now + granted`, but never later than `cap`.
pub(crate) fn expiry(cap: OffsetDateTime, granted_secs: u64) -> OffsetDateTime {
    let granted = i64::try_from(granted_secs).unwrap_or(i64::MAX);
    let by_vault = OffsetDateTime::now_utc().saturating_add(time::Duration::seconds(granted));
    by_vault.min(cap)
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> Result<String, ProviderError> {
    t.format(&Rfc3339)
        .map_err(|e| ProviderError::Internal(e.to_string()))
}
