#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
//! Keygate provider for HashiCorp Vault and OpenBao (same HTTP API), built on
//! `vaultrs`.
//!
//! Keygate logs in to Vault with AppRole (role id + secret id read from a
//! file or an environment variable) or with a token read from a file or an
//! environment variable, renews its own token in the background at about
//! two thirds of its TTL, and logs in again when renewal fails or a call
//! finds the token expired. It starts even while Vault is down, so the
//! revocation queue resumes after a restart.
//!
//! Scope kinds (`[scopes.params] kind = ...`):
//!
//! | kind | mints | handle | revoke | renew | orphan (handle never recorded) |
//! |---|---|---|---|---|---|
//! | `token` | an orphan token created against `token_role` (else a child of Keygate's token): the scope's `policies`, TTL = the lease, `explicit_max_ttl` = the scope's `max_ttl`, optional `num_uses`, metadata `agent`, `task`, `scope`, `keygate_lease` | accessor | `auth/token/revoke-accessor` (children die too) | `renew-accessor` | found by its `keygate_lease` metadata in a shared walk over `auth/token/accessors` (`walk.rs`) and revoked |
//! | `database` | dynamic credentials from a database secrets engine role; the Vault lease is shortened to the Keygate lease if the role's default is longer | Vault lease id | `sys/leases/revoke` | `sys/leases/renew` | cannot be found (Vault leases name no Keygate lease): `LivesUntil(now + role max_ttl)`, or an error that keeps the lease visible when the role has no `max_ttl` |
//! | `pki` | a certificate with URI SAN `spiffe://<trust_domain>/agent/<agent id>`, a fresh key, TTL = the lease | serial | `pki/revoke` (the serial goes on Vault's CRL; relying parties must check it) | no | `LivesUntil(lease expiry)`: it was requested with the lease TTL |
//! | `kv` | a read of a KV v2 secret; the values go to the agent only and are never stored | none | nothing to revoke: `AlreadyGone`, and the lease records `not_applicable` | no | nothing to revoke |
//!
//! "Not found", "invalid accessor" and "invalid lease" count as revoked;
//! connection failures, 5xx, 429 and a sealed Vault are
//! `ProviderError::Unavailable`, which the broker's queue retries with
//! backoff until Vault confirms.
//!
//! Secrets (Keygate's own token and secret id, minted tokens, passwords,
//! private keys, KV values) are held only in `SecretString`; errors carry
//! Vault's `errors` list, never a response body.

mod config;
mod conn;
mod database;
mod http;
mod kv;
mod lifetime;
mod pki;
mod provider;
mod scope;
mod stale_logins;
mod token;
mod walk;

use std::fmt;
use std::sync::Arc;

use keygate_provider_api::{ProviderError, SecretResolver};

pub use config::{AuthConfig, VaultConfig};

/// The `kind` of this provider in config.
pub const KIND: &str = "vault";

/// A Vault or OpenBao server as a Keygate provider.
pub struct VaultProvider {
    conn: Arc<conn::Conn>,
    address: String,
    max_revocations: Option<usize>,
    /// The token role agents' tokens are created against (orphans).
    token_role: Option<String>,
    /// The shared accessor walk (orphans, stale logins).
    walker: Arc<walk::Walker>,
}

impl fmt::Debug for VaultProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultProvider")
            .field("address", &self.address)
            .field("max_revocations", &self.max_revocations)
            .finish_non_exhaustive()
    }
}

impl VaultProvider {
    /// Checks the config and builds the client. Does not need Vault to be up:
    /// Keygate logs in at the first call and keeps its token renewed from
    /// then on. Must be called inside a tokio runtime.
    /// Opens the provider; `secrets` reads the login's secret references
    /// (`aws-sm:` needs the broker's AWS source).
    pub fn open(cfg: VaultConfig, secrets: SecretResolver) -> Result<Self, ProviderError> {
        let conn = conn::Conn::new(&cfg, secrets)?;
        conn::spawn_renewer(&conn);
        let address = cfg.checked_address()?;
        if cfg.token_role.is_none() {
            tracing::warn!(
                "vault: no `token_role`: agents' tokens are children of keygate's own login and die with it; set a token role with orphan = true"
            );
        }
        let walker = Arc::new(walk::Walker::default());
        if conn.owns_logins() {
            tokio::spawn(stale_logins::clean_up(
                Arc::clone(&conn),
                Arc::clone(&walker),
            ));
        }
        tracing::info!(address = %address, "vault provider ready");
        Ok(Self {
            conn,
            address,
            max_revocations: cfg.max_concurrent_revocations,
            token_role: cfg.token_role,
            walker,
        })
    }

    /// The server's base URL.
    pub fn address(&self) -> &str {
        &self.address
    }
}
