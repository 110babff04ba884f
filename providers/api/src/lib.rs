//! The contract between Keygate's broker core and its credential backends.
//!
//! The core knows no backend by name: it holds `Arc<dyn Provider>` values built
//! from config and talks to them only through this crate. A provider mints a
//! credential for one lease ([`Provider::issue`]), hands back the credential
//! (secret parts wrapped in [`secrecy`] types) and an opaque [`RevokeHandle`]
//! that never leaves the broker, and later revokes by that handle
//! ([`Provider::revoke`]).
//!
//! Two rules every provider keeps:
//! - **The lease id is the correlation key.** The broker writes the lease row
//!   before calling `issue`; if it crashes before recording the handle, it calls
//!   `revoke` with `handle: None`, and the provider must find and revoke what it
//!   may have issued for that lease id (or say it cannot, with an error).
//! - **Secrets stay secret.** Error messages, `Debug` output and revoke handles
//!   never contain secret material.

mod credential;
mod error;
mod fence;
pub mod jws;
mod secret_ref;
mod shared;
mod sweep;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use credential::{Credential, CredentialField};
pub use error::ProviderError;
pub use fence::{Fence, FenceRequest, FenceTarget, Fenced, LiftFenceRequest};
pub use secret_ref::{SecretRef, SecretResolver, SecretSource};
pub use shared::{RevocationJournal, Revoked, RevokedKind};
pub use sweep::{LeaseLookup, Sweep, Swept};

/// A credential backend instance (one `[providers.<name>]` table in config).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The backend kind, as written in config (`local-ca`, `vault`, ...).
    fn kind(&self) -> &'static str;

    /// Checks a scope's provider parameters when config is loaded, so a typo is
    /// a start-up error and not a failed request.
    fn validate_scope(&self, scope: &ScopeSpec) -> Result<(), ProviderError>;

    /// Mints one credential for the lease described by `req`.
    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError>;

    /// Revokes what was issued for a lease. Must be idempotent: revoking
    /// something already revoked or gone returns [`RevokeOutcome::AlreadyGone`]
    /// or [`RevokeOutcome::Revoked`], never an error.
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError>;

    /// Extends a lease where the backend allows it, never past
    /// [`RenewRequest::not_after`]. The default says it cannot
    /// ([`ProviderError::Unsupported`]), which the broker reports to the agent
    /// as `not_renewable`.
    async fn renew(&self, _req: &RenewRequest) -> Result<Renewed, ProviderError> {
        Err(ProviderError::Unsupported("renewal".into()))
    }

    /// The most revocations this instance wants in flight at once. The broker
    /// uses the smaller of this and its own `leases.revoke_concurrency`, so an
    /// emergency revocation of thousands of leases does not flood a backend.
    /// `None` (the default) leaves the broker's limit alone.
    fn revoke_concurrency(&self) -> Option<usize> {
        None
    }

    /// A public document the provider publishes for relying parties (a CRL,
    /// a trust bundle), served unauthenticated by the broker at
    /// `GET /v1/providers/{instance}/{name}`. `Ok(None)` means no such document.
    async fn document(&self, _name: &str) -> Result<Option<Document>, ProviderError> {
        Ok(None)
    }

    /// Checks a credential this provider issued, as a relying party would,
    /// honouring revocation. Served at `POST /v1/providers/{instance}/verify`.
    async fn verify(&self, _presented: &serde_json::Value) -> Result<Verification, ProviderError> {
        Err(ProviderError::Unsupported("verification".into()))
    }

    /// Whether `cert_der` (a client certificate presented to Keygate's mTLS
    /// listener) is one this provider issued and has since revoked, so it
    /// must not authenticate anyone. The default knows no certificate. A
    /// provider that cannot tell (its revocation list is unreachable)
    /// answers an error: the mTLS door fails closed, and the caller learns
    /// to retry rather than that its certificate was revoked.
    async fn certificate_revoked(&self, _cert_der: &[u8]) -> Result<bool, ProviderError> {
        Ok(false)
    }

    /// Emergency revocation for credentials the backend cannot revoke one by
    /// one: puts up whatever barrier the backend offers (an AWS deny policy
    /// on a role) against the sessions of the agents and scopes hit, and
    /// reports what it put up and what it could not. Must be idempotent. The
    /// default puts up nothing, for providers whose `revoke` already kills
    /// credentials.
    async fn fence(&self, _req: &FenceRequest) -> Result<Fenced, ProviderError> {
        Ok(Fenced::default())
    }

    /// Whether [`Provider::fence`] can put anything up. `false` (the
    /// default, with the default `fence`) lets a kill switch skip reading
    /// every lease it hits to look for fence targets.
    fn puts_up_fences(&self) -> bool {
        false
    }

    /// Takes down one fence returned by [`Provider::fence`], keeping in force
    /// what the still-standing fences in `req.remaining` need. Idempotent: a
    /// fence already gone is lifted.
    async fn lift_fence(&self, _req: &LiftFenceRequest) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported("fences".into()))
    }

    /// Whether [`Provider::issue`] creates nothing outside this process: the
    /// credential exists only in the returned value until the broker hands
    /// it over (a local CA signing in memory). The broker then writes the
    /// lease once, after the call, instead of ahead of it and again after
    /// it: a crash before that commit leaves nothing anywhere to revoke, and
    /// nothing is handed over before the lease is on disk. The default,
    /// `false`, is right for every provider that calls a backend.
    fn issues_in_process(&self) -> bool {
        false
    }

    /// Whether a credential of `scope` needs this provider to act when its
    /// lease reaches its TTL (e.g. rotate a secret whose value the agent
    /// saw). Such leases go through the revocation queue at expiry; others
    /// die by themselves and are simply marked `expired`.
    fn acts_at_expiry(&self, _scope: &ScopeSpec) -> bool {
        false
    }

    /// Whether the credential a lease's `handle` names needs this provider
    /// to act at the lease's TTL, judged from what it was minted with (the
    /// handle), so a scope edited or removed from config since does not
    /// change it. By default: what [`Provider::acts_at_expiry`] says of the
    /// scope as configured now.
    fn acts_at_expiry_of(&self, scope: &ScopeSpec, _handle: &serde_json::Value) -> bool {
        self.acts_at_expiry(scope)
    }

    /// Called once when Keygate shuts down gracefully: release what the
    /// provider holds of its own (e.g. its login to the backend).
    async fn shutdown(&self) {}

    /// How often the broker should call [`Provider::sweep`] (also once at
    /// start). `None` (the default): this provider leaves nothing to sweep.
    fn sweep_interval(&self) -> Option<Duration> {
        None
    }

    /// Removes what this provider created at its backend, for the `scopes`
    /// configured on it, for leases that are no longer live (an issue that
    /// crashed or timed out after the backend call), asking `leases` which
    /// are, and never touching objects it did not create. Reports every
    /// removal, for the audit log. Must be safe to run at any time, next to
    /// issues and revocations.
    async fn sweep(&self, _scopes: &[ScopeSpec], _leases: &dyn LeaseLookup) -> Sweep {
        Sweep::default()
    }
}

/// A public document published by a provider.
#[derive(Debug, Clone)]
pub struct Document {
    /// MIME type, e.g. `application/pkix-crl`.
    pub content_type: &'static str,
    /// The bytes served.
    pub body: Vec<u8>,
}

/// The verdict on a presented credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Whether a relying party should accept it now.
    pub valid: bool,
    /// Why not, when not valid (`revoked`, `expired`, `bad_signature`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The identity the credential asserts (a SPIFFE ID, a username).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When it expires.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires_at: Option<OffsetDateTime>,
}

/// A scope as the provider sees it at config load and at issue time.
#[derive(Debug, Clone)]
pub struct ScopeSpec {
    /// The scope's name in config.
    pub name: String,
    /// The longest lease this scope allows.
    pub max_ttl: Duration,
    /// Provider-specific parameters (`[scopes.params]`), never secret.
    pub params: serde_json::Value,
}

/// The agent a credential is minted for, as far as a provider needs to know.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    /// Registered agent id, e.g. `finance-invoice-agent-v1`.
    pub id: String,
    /// Owning team.
    pub team: String,
    /// Accountable human sponsor.
    pub sponsor: String,
    /// Deployment environment (`dev`, `test`, `prod`).
    pub environment: String,
    /// Risk tier 1–3.
    pub risk_tier: u8,
}

/// Everything a provider needs to mint one credential.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The lease this credential belongs to; also the correlation key for
    /// revoking an issue whose handle was never recorded.
    pub lease_id: String,
    /// The task (broker session) the lease belongs to.
    pub task_id: String,
    /// The agent the credential is for.
    pub agent: AgentInfo,
    /// The scope being minted.
    pub scope: ScopeSpec,
    /// Granted lifetime; the provider must not issue anything that outlives
    /// it, with one exception: a credential the backend gives a fixed
    /// lifetime and cannot revoke ([`Revocability::ExpiresAt`], e.g. an Entra
    /// access token) may live longer, up to the scope's `max_ttl` from now.
    /// The broker then records its real expiry and tells the agent.
    pub ttl: Duration,
    /// `now + ttl`, computed once by the broker.
    pub expires_at: OffsetDateTime,
    /// Per-request parameters the agent sent (e.g. a JWT-SVID audience).
    pub request_params: serde_json::Value,
}

/// How a lease can be ended before its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Revocability {
    /// The backend can kill the credential on request.
    Revocable,
    /// The credential cannot be killed; it lives until `expires_at`.
    ExpiresAt,
    /// Nothing was issued that could be revoked (e.g. a brokered read).
    NotApplicable,
}

/// Opaque data a provider needs to revoke a credential (serial, accessor,
/// lease id, key id). Stored by the broker; never returned to agents and never
/// secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RevokeHandle(pub serde_json::Value);

/// A freshly minted credential.
#[derive(Debug)]
pub struct Issued {
    /// What the agent receives.
    pub credential: Credential,
    /// What the broker keeps to revoke it.
    pub handle: RevokeHandle,
    /// When the credential stops working by itself.
    pub expires_at: OffsetDateTime,
    /// Whether revocation before expiry is possible.
    pub revocability: Revocability,
}

/// A request to revoke what was issued for one lease.
#[derive(Debug, Clone)]
pub struct RevokeRequest {
    /// The lease being revoked.
    pub lease_id: String,
    /// The scope the lease was minted for.
    pub scope: ScopeSpec,
    /// The handle recorded at issue, or `None` when the broker crashed before
    /// recording it.
    pub handle: Option<RevokeHandle>,
    /// The lease's expiry, for providers that can only wait it out.
    pub expires_at: OffsetDateTime,
}

/// What a provider did with a revoke request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The backend confirmed the credential is dead.
    Revoked,
    /// The backend had no such credential (never issued, expired or revoked
    /// before); counts as revoked.
    AlreadyGone,
    /// The backend cannot revoke it; it lives until this time.
    LivesUntil(OffsetDateTime),
}

/// A request to extend a lease.
#[derive(Debug, Clone)]
pub struct RenewRequest {
    /// The lease being renewed.
    pub lease_id: String,
    /// The scope, whose `max_ttl` caps the renewal.
    pub scope: ScopeSpec,
    /// The handle recorded at issue.
    pub handle: RevokeHandle,
    /// Requested lifetime from now.
    pub increment: Duration,
    /// The latest expiry the broker allows: the lease's creation plus the
    /// scope's `max_ttl`, and no later than the task's expiry. A provider
    /// must not extend the credential past it.
    pub not_after: OffsetDateTime,
}

/// The result of a renewal.
#[derive(Debug, Clone)]
pub struct Renewed {
    /// The new expiry.
    pub expires_at: OffsetDateTime,
}
