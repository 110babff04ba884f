#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! Keygate's built-in CA: the default provider, needing no external system.
//!
//! It mints SPIFFE credentials for agents:
//! - **X.509-SVIDs** (`kind = "x509_svid"`): a fresh P-256 key and a leaf
//!   certificate naming `spiffe://<trust domain>/agent/<agent id>`, signed by
//!   a self-signed CA kept in local files;
//! - **JWT-SVIDs** (`kind = "jwt_svid"`): ES256 tokens signed by a separate key.
//!
//! Certificate serials and JWT ids are derived from the lease id, so a lease
//! whose handle the broker never recorded can still be revoked. Revocations
//! go to a durable append-only file and are published as a CRL
//! (`crl.pem`, `crl.der`) and as `revoked.json`; the trust bundle is served
//! as `bundle.pem` and the JWT key as `jwks.json`.

mod ca;
mod config;
mod jwt;
mod keys;
mod provider;
mod revocations;
mod scope;
mod verdict;
mod x509;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use keygate_provider_api::{ProviderError, RevocationJournal};
use time::OffsetDateTime;

pub use config::LocalCaConfig;
/// The leaf key of an X.509-SVID, as issued (public for the benchmark's
/// crypto floor, which generates keys the same way).
pub use keys::LeafKey;

use crate::ca::Ca;
use crate::jwt::JwtKeys;
use crate::revocations::{FileList, RevocationList};

/// The `kind` of this provider in config.
pub const KIND: &str = "local-ca";

/// A running local CA. Build it with [`LocalCa::open`] and hand it to the
/// broker as an `Arc<dyn Provider>`.
pub struct LocalCa {
    trust_domain: String,
    ca: Ca,
    jwt: JwtKeys,
    revocations: RevocationList,
    /// The last CRL number handed out; CRL numbers must only ever grow.
    last_crl_number: AtomicU64,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .field("ca", &self.ca)
            .field("jwt", &self.jwt)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads the CA and JWT keys, the CA certificate and the revocation list,
    /// creating whatever does not exist yet (first start). Reopening the same
    /// files gives the same CA certificate, JWT key id and revocations.
    pub async fn open(cfg: LocalCaConfig) -> Result<Self, ProviderError> {
        Self::open_shared(cfg, None).await
    }

    /// Like [`LocalCa::open`], but with `shared` (the broker's journal and
    /// this instance's name) the revocation list is kept there, shared by
    /// every replica, and `revocation_file` is not used.
    pub async fn open_shared(
        cfg: LocalCaConfig,
        shared: Option<(Arc<dyn RevocationJournal>, String)>,
    ) -> Result<Self, ProviderError> {
        config::validate_trust_domain(&cfg.trust_domain)?;
        tokio::task::spawn_blocking(move || Self::open_blocking(cfg, shared))
            .await
            .map_err(|e| ProviderError::Internal(format!("opening the local ca failed: {e}")))?
    }

    fn open_blocking(
        cfg: LocalCaConfig,
        shared: Option<(Arc<dyn RevocationJournal>, String)>,
    ) -> Result<Self, ProviderError> {
        let ca = Ca::open(&cfg.trust_domain, &cfg.key_file, &cfg.cert_file)?;
        let jwt = JwtKeys::open(&cfg.jwt_key_file)?;
        let revocations = match shared {
            Some((journal, provider)) => RevocationList::Shared { journal, provider },
            None => RevocationList::File(Box::new(FileList::open(
                &cfg.revocation_file,
                OffsetDateTime::now_utc(),
            )?)),
        };
        tracing::info!(trust_domain = %cfg.trust_domain, jwt_kid = %jwt.kid(), shared_revocations = matches!(revocations, RevocationList::Shared { .. }), "local ca ready");
        Ok(Self {
            trust_domain: cfg.trust_domain,
            ca,
            jwt,
            revocations,
            last_crl_number: AtomicU64::new(0),
        })
    }

    /// The SPIFFE trust domain this CA issues for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate (PEM): the trust bundle relying parties install.
    pub fn ca_certificate_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The `kid` of the JWT-SVID signing key.
    pub fn jwt_key_id(&self) -> &str {
        self.jwt.kid()
    }

    /// The SPIFFE ID for an agent: `spiffe://<trust domain>/agent/<agent id>`.
    pub fn spiffe_id(&self, agent_id: &str) -> Result<String, ProviderError> {
        config::validate_agent_id(agent_id)?;
        Ok(format!("spiffe://{}/agent/{agent_id}", self.trust_domain))
    }

    /// A CRL number larger than any handed out before, also across restarts
    /// (it is at least the current time in milliseconds).
    fn next_crl_number(&self, now: OffsetDateTime) -> u64 {
        let now_ms = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let bump = |last: u64| now_ms.max(last.saturating_add(1));
        let last = self
            .last_crl_number
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(bump(last)))
            .unwrap_or_else(|last| last);
        bump(last)
    }
}
