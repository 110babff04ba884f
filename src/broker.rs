//! The broker: agents, tasks, credentials and revocations, tied to the store,
//! policy, providers and audit. The HTTP layer is a thin shell around this.

mod agent_update;
mod agents;
mod approvals;
mod auth_failures;
mod credentials;
mod decisions;
mod delegation;
mod fences;
mod minting;
mod policy_changes;
mod policy_reload;
mod provisioning;
mod renewals;
mod revocations;
mod session_checks;
pub use session_checks::SessionRefusal;
mod sessions;
mod usage;
mod users;

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::identity::SessionSigner;
use crate::lease::LeaseEngine;
use crate::metrics::Metrics;
use crate::providers::Registry;
use crate::store::{Store, StoreError};

pub use agents::{AgentSpec, AgentUpdate, Registered, seed_agents};
pub use approvals::{DecisionChannel, DecisionRequest};
pub use credentials::{
    CompletedTask, CredentialAsk, CredentialOutcome, IssuedCredential, ReleasedLease,
};
pub use fences::{FenceFailure, LiftRequest};
pub use policy_changes::{OnChange, PolicyDiff, PolicyFiles, PolicyReload};
pub use renewals::RenewedLease;
pub(crate) use revocations::Pulled;
pub use revocations::{
    MAX_WAIT, RevocationLooks, RevocationPreview, RevocationReport, RevocationRequest,
};
pub use sessions::{
    JWT_BEARER_ASSERTION, JWT_BEARER_GRANT, OAuthError, Presented, Session, TOKEN_EXCHANGE,
    TokenRequest, TokenResponse,
};

/// Why a broker operation failed. The server maps each variant to a status
/// and a stable error code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    PolicyDenied {
        message: String,
        policies: Vec<String>,
    },
    /// The caller is known but may not do this (an ineligible approver).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TaskEnded(String),
    /// The lease's provider (or scope kind) cannot extend a credential.
    #[error("{0}")]
    NotRenewable(String),
    #[error("{0}")]
    Provider(String),
    /// Refused by a rate limit or a cap; try again after the given seconds.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// Nothing was done, and the same call may succeed in a moment (a
    /// transaction rolled back after colliding with another).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::Conflict(format!("{what} already exists")),
            StoreError::Contention(m) => Self::Unavailable(m),
            StoreError::Invalid(m) => Self::InvalidRequest(m),
            other => Self::Internal(other.to_string()),
        }
    }
}

pub type BrokerResult<T> = Result<T, BrokerError>;

/// How many times a change that must not be lost to a race runs.
const COLLISION_TRIES: u64 = 4;

/// Whether `what`, a whole transaction that failed with `e` on its
/// `attempt`th run, runs again: the database rolled it back for colliding
/// with another change at the same moment (PostgreSQL: a deadlock, a
/// serialization failure; nothing of it was kept), up to
/// [`COLLISION_TRIES`] runs. Waits a moment first. For what must not be
/// lost to a race: the kill switch, an incident's response.
pub(crate) async fn run_again(what: &str, attempt: u64, e: &BrokerError) -> bool {
    let BrokerError::Unavailable(why) = e else {
        return false;
    };
    if attempt >= COLLISION_TRIES {
        return false;
    }
    tracing::warn!(attempt, error = %why, "{what} collided with another change; running it again");
    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
    true
}

/// A mandatory, non-blank `reason` (kill switch, lifting a fence).
pub(crate) fn required_reason(reason: Option<&str>) -> BrokerResult<String> {
    reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| BrokerError::InvalidRequest("`reason` is required".into()))
}

/// Everything a request handler needs.
pub struct Broker {
    pub config: Config,
    pub store: Arc<dyn Store>,
    /// The active Cedar policy set; reloadable (`POST /v1/policy/reload`).
    pub policy: crate::policy::PolicyHandle,
    pub signer: SessionSigner,
    pub registry: Registry,
    pub leases: LeaseEngine,
    pub metrics: Arc<Metrics>,
    /// Announces approvals on Slack and webhooks through the outbox.
    pub notifier: Arc<crate::notify::Notifier>,
    /// Trusted issuers for workload identity federation.
    pub federation: crate::identity::Federation,
    /// Woken on every approval decision, for long-polling agents.
    pub approvals_changed: Arc<tokio::sync::Notify>,
    /// Rate limits by source address, claimed client id and agent.
    pub limits: crate::limits::RateLimits,
    /// Failed authentications waiting to be audited as counts.
    pub auth_failures: crate::limits::AuthFailures,
    /// Continuous validation: per-agent signals and the detectors over them.
    pub validation: crate::validation::Validation,
    /// Whether revocations are finished, as last looked at by those
    /// waiting on them.
    pub revocation_looks: RevocationLooks,
    /// Set when the server begins to stop.
    pub stopping: Stopping,
    /// Counts agents whose attributes changed (bumped before what they
    /// hold is judged again): a credential request that read its agent
    /// before a change judges its lease again once written (`Session`).
    pub agents_changed: std::sync::atomic::AtomicU64,
    /// Held while fences are put up or taken down: a lift reads the fences
    /// of its name still standing and then deletes the policy, which must
    /// not interleave with a fence of that name going up.
    pub fences_changing: tokio::sync::Mutex<()>,
}

/// Set once the server begins to stop (SIGTERM, SIGINT). A request that
/// waits for something to happen — a long-poll on an approval, a look at a
/// revocation waiting for its end, a release waiting for its provider —
/// answers at once with what it has then, instead of holding the
/// shutdown's drain until it is cut: the caller gets an answer it can act
/// on and asks again once the server is back.
#[derive(Debug)]
pub struct Stopping(tokio::sync::watch::Sender<bool>);

impl Default for Stopping {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

impl Stopping {
    /// The server begins to stop.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Whether the server has begun to stop.
    pub fn has_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the server begins to stop (at once if it has).
    pub async fn begun(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: `wait_for` cannot fail here.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Sleeps `d`, or less if the server begins to stop meanwhile.
    pub async fn sleep(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.begun() => {}
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("registry", &self.registry)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// One credential operation by `agent` against its rate limit.
    pub fn check_agent_rate(&self, agent: &str) -> BrokerResult<()> {
        self.limits.check_agent(agent).map_err(|l| {
            self.metrics.limited(l.limit);
            BrokerError::RateLimited {
                message: format!(
                    "agent `{agent}` is over its rate limit ([limits] per_agent_per_minute); retry in {} s",
                    l.retry_after_secs()
                ),
                retry_after_secs: l.retry_after_secs(),
            }
        })
    }

    /// How long release, completion and revocation calls wait for providers
    /// to confirm before answering with what is still pending.
    pub const CONFIRM_WAIT: Duration = Duration::from_secs(5);

    /// Waits until none of `lease_ids` is still queued, or `wait` passes,
    /// or the server begins to stop.
    pub(crate) async fn await_revocations(&self, lease_ids: &[String], wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut pending = false;
            for id in lease_ids {
                if let Ok(Some(l)) = self.store.get_lease(id).await
                    && l.state == crate::model::LeaseState::Revoking
                {
                    pending = true;
                    break;
                }
            }
            if !pending || tokio::time::Instant::now() >= deadline || self.stopping.has_begun() {
                return;
            }
            self.stopping.sleep(Duration::from_millis(20)).await;
        }
    }
}
