#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! Keygate's AWS provider, on the official AWS SDK for Rust.
//!
//! Scope kinds:
//! - **`assume_role`**: STS AssumeRole into the scope's role, the session
//!   named after the task, `SourceIdentity` = the agent id, session tags
//!   `agent`, `team`, `sponsor`, `task`, `environment`, and the scope's
//!   session policy. STS sessions cannot be revoked one by one: revoking the
//!   lease reports that the session lives until its expiry, and an emergency
//!   revocation puts up deny-policy fences on the role instead
//!   ([`Provider::fence`](keygate_provider_api::Provider::fence)).
//! - **`secret`**: a brokered Secrets Manager read; with `rotate_on_release`
//!   the secret is rotated when the lease ends, so the value the agent saw
//!   is no longer current.
//!
//! AWS's limits (session duration, policy size, tag and name alphabets) are
//! checked locally with messages that say what is wrong. [`SecretsManagerSource`]
//! reads Keygate's own `aws-sm:` secret references.

mod config;
mod error;
mod fence;
mod limits;
mod provider;
mod scope;
mod secrets;
mod sts;

use std::fmt;

use keygate_provider_api::ProviderError;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Semaphore, SemaphorePermit};

pub use config::AwsConfig;
pub use secrets::SecretsManagerSource;

/// The `kind` of this provider in config.
pub const KIND: &str = "aws";

/// A configured AWS account and region. Build it with [`AwsProvider::open`]
/// and hand it to the broker as an `Arc<dyn Provider>`.
pub struct AwsProvider {
    region: String,
    sts: aws_sdk_sts::Client,
    secrets: aws_sdk_secretsmanager::Client,
    iam: aws_sdk_iam::Client,
    revocations: Option<Semaphore>,
}

impl fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsProvider")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AwsProvider {
    /// Checks the settings and builds the SDK clients. AWS is not called
    /// here: credentials are resolved on the first request.
    pub async fn open(cfg: AwsConfig) -> Result<Self, ProviderError> {
        cfg.validate()?;
        let sdk = cfg.sdk_config().await;
        tracing::info!(region = %cfg.region, profile = cfg.profile.as_deref().unwrap_or("-"), endpoint = cfg.endpoint_url.as_deref().unwrap_or("-"), "aws provider ready");
        Self::with_sdk_config(cfg, &sdk)
    }

    /// Builds the provider on an SDK configuration the embedder made (its
    /// own credential chain, endpoint or retry settings); `cfg` gives the
    /// revocation limit, and its region names the provider in logs.
    pub fn with_sdk_config(
        cfg: AwsConfig,
        sdk: &aws_config::SdkConfig,
    ) -> Result<Self, ProviderError> {
        cfg.validate()?;
        Ok(Self {
            region: cfg.region,
            sts: aws_sdk_sts::Client::new(sdk),
            secrets: aws_sdk_secretsmanager::Client::new(sdk),
            iam: aws_sdk_iam::Client::new(sdk),
            revocations: cfg.max_concurrent_revocations.map(Semaphore::new),
        })
    }

    /// Waits for a revocation slot when `max_concurrent_revocations` is set.
    async fn revocation_permit(&self) -> Result<Option<SemaphorePermit<'_>>, ProviderError> {
        match &self.revocations {
            None => Ok(None),
            Some(s) => s
                .acquire()
                .await
                .map(Some)
                .map_err(|e| ProviderError::Internal(format!("revocation limit closed: {e}"))),
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> Result<String, ProviderError> {
    t.format(&Rfc3339)
        .map_err(|e| ProviderError::Internal(e.to_string()))
}
