//! Building [`Verification`] answers.

use keygate_provider_api::Verification;
use time::OffsetDateTime;

/// Rejected before anything about the credential could be trusted.
pub(crate) fn invalid(reason: &str) -> Verification {
    with_reason(Some(reason), None, None)
}

/// Valid when `reason` is `None`.
pub(crate) fn with_reason(
    reason: Option<&str>,
    subject: Option<String>,
    expires_at: Option<OffsetDateTime>,
) -> Verification {
    Verification {
        valid: reason.is_none(),
        reason: reason.map(str::to_owned),
        subject,
        expires_at,
    }
}
