//! The `[providers.<name>]` table of a `local-ca` provider.

use std::path::PathBuf;

use keygate_provider_api::ProviderError;
use serde::Deserialize;

/// Where the local CA keeps its keys, certificate and revocation list.
///
/// The files are created on first start and reused afterwards. Relative paths
/// are resolved against the broker's working directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCaConfig {
    /// SPIFFE trust domain, e.g. `example.org`; SVIDs name
    /// `spiffe://<trust_domain>/agent/<agent id>`.
    pub trust_domain: String,
    /// The CA's P-256 private key (PKCS#8 PEM, mode 0600).
    pub key_file: PathBuf,
    /// The CA's self-signed certificate (PEM).
    pub cert_file: PathBuf,
    /// The P-256 private key that signs JWT-SVIDs (PKCS#8 PEM, mode 0600).
    pub jwt_key_file: PathBuf,
    /// Append-only log of revoked serials and JWT ids (JSON lines).
    pub revocation_file: PathBuf,
}

/// Longest trust domain SPIFFE allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Checks a trust domain against the SPIFFE ID spec: a bare name, no scheme,
/// port or path, in the character set SPIFFE permits.
pub(crate) fn validate_trust_domain(td: &str) -> Result<(), ProviderError> {
    let invalid =
        |why: &str| ProviderError::InvalidParams(format!("invalid trust domain `{td}`: {why}"));
    if td.is_empty() {
        return Err(invalid("it is empty"));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(invalid("it is longer than 255 characters"));
    }
    if td.contains("://") || td.contains('/') {
        return Err(invalid("give the bare name, without `spiffe://` or a path"));
    }
    let allowed =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
    if !td.chars().all(allowed) {
        return Err(invalid(
            "use only lowercase letters, digits, `.`, `-` and `_`",
        ));
    }
    Ok(())
}

/// Checks that an agent id can be one SPIFFE path segment, so the SPIFFE ID
/// we put in a certificate is well formed and unambiguous.
pub(crate) fn validate_agent_id(id: &str) -> Result<(), ProviderError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if id.is_empty() || id == "." || id == ".." || !id.chars().all(allowed) {
        return Err(ProviderError::InvalidParams(format!(
            "agent id `{id}` cannot be a spiffe path segment (use letters, digits, `.`, `-` and `_`)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        for ok in ["example.org", "prod_1.keygate-test", "td"] {
            assert!(validate_trust_domain(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Example.org",
            "spiffe://example.org",
            "example.org/x",
            "ex ample",
            "exämple",
        ] {
            assert!(validate_trust_domain(bad).is_err(), "{bad}");
        }
        assert!(validate_trust_domain(&"a".repeat(256)).is_err());
    }

    #[test]
    fn agent_ids() {
        assert!(validate_agent_id("finance-invoice-agent-v1").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "a%2f"] {
            assert!(validate_agent_id(bad).is_err(), "{bad}");
        }
    }
}
