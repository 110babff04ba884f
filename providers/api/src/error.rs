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
    /// The backend could not be reached or failed; retrying may help. An
    /// issue that fails so may have minted something.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The request provably never reached the backend (connection refused,
    /// name not resolved, TLS handshake refused): nothing was done there.
    /// Retrying may help; an issue that fails so minted nothing.
    #[error("backend not reached: {0}")]
    NotSent(String),
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
        matches!(
            self,
            Self::Unavailable(_) | Self::NotSent(_) | Self::Internal(_)
        )
    }
}
