//! The one error type every provider returns.

/// Why a provider call failed. Messages are safe to show an operator: they
/// never contain secret material.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The scope's or the request's parameters are wrong; retrying won't help.
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    /// The backend refused (permission denied, quota, policy).
    #[error("backend refused: {0}")]
    Refused(String),
    /// The backend could not be reached or failed; retrying may help.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The provider does not support this operation.
    #[error("not supported by this provider: {0}")]
    Unsupported(String),
    /// Something inside the provider went wrong (key file, encoding).
    #[error("provider internal error: {0}")]
    Internal(String),
}

impl ProviderError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Internal(_))
    }
}
