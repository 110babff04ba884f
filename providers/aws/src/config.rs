//! The `[providers.<name>]` table of an `aws` provider.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use keygate_provider_api::ProviderError;
use serde::Deserialize;

/// How Keygate reaches AWS. Keygate authenticates with the standard
/// credential chain (environment, shared profile, web identity, container or
/// instance role); config names a profile at most, never a key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// AWS region for STS, Secrets Manager and IAM, e.g. `us-east-1`.
    pub region: String,
    /// A named profile from the shared config files instead of the default
    /// chain.
    pub profile: Option<String>,
    /// Send every call to this endpoint instead of AWS's (tests point it at
    /// a moto server; also VPC endpoints).
    pub endpoint_url: Option<String>,
    /// Revocations (secret rotations) in flight at once against this
    /// account; unset leaves only the broker's per-provider limit.
    pub max_concurrent_revocations: Option<usize>,
}

impl AwsConfig {
    /// Checks the settings that can be checked without calling AWS.
    pub(crate) fn validate(&self) -> Result<(), ProviderError> {
        let invalid = |m: String| Err(ProviderError::InvalidParams(m));
        let region_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if self.region.is_empty() || !self.region.chars().all(region_ok) {
            return invalid(format!(
                "`region` `{}` is not an aws region name (like `us-east-1`)",
                self.region
            ));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return invalid(format!("`endpoint_url` `{url}` must be an http(s) url"));
        }
        if self.profile.as_deref() == Some("") {
            return invalid("`profile` is empty; leave it out to use the default chain".into());
        }
        if self.max_concurrent_revocations == Some(0) {
            return invalid("`max_concurrent_revocations` must be at least 1".into());
        }
        Ok(())
    }

    /// The SDK configuration: region, optional profile and endpoint, and the
    /// standard credential chain. Credentials are resolved lazily, on the
    /// first call.
    pub(crate) async fn sdk_config(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()));
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        loader.load().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn cfg(region: &str) -> AwsConfig {
        AwsConfig {
            region: region.into(),
            profile: None,
            endpoint_url: None,
            max_concurrent_revocations: None,
        }
    }

    #[test]
    fn validates_settings() {
        assert!(cfg("us-east-1").validate().is_ok());
        assert!(cfg("").validate().is_err());
        assert!(cfg("US East").validate().is_err());
        let mut c = cfg("eu-west-3");
        c.endpoint_url = Some("127.0.0.1:5000".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("`endpoint_url`")
        );
        c.endpoint_url = Some("http://127.0.0.1:5000".into());
        assert!(c.validate().is_ok());
        c.max_concurrent_revocations = Some(0);
        assert!(c.validate().is_err());
        c.max_concurrent_revocations = None;
        c.profile = Some(String::new());
        assert!(c.validate().is_err());
    }
}
