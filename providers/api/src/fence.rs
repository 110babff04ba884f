//! Fences: the barrier for credentials that cannot be revoked one by one
//! (AWS STS sessions). An emergency revocation puts up fences that stay
//! until an operator lifts them; a policy change puts up fences against
//! exactly the sessions it stopped permitting, lifted once they expire.

use serde::Serialize;
use time::OffsetDateTime;

use crate::{ProviderError, RevokeHandle, ScopeSpec};

/// What an emergency revocation hit at one provider.
#[derive(Debug, Clone)]
pub struct FenceRequest {
    /// The emergency revocation putting the fences up.
    pub revocation_id: String,
    /// One entry per live lease the revocation hit (including leases that
    /// were already released but still live until their expiry).
    pub targets: Vec<FenceTarget>,
    /// Also fence every session issued before `issued_before`, whoever it
    /// belongs to (AWS: the role-wide "revoke older sessions" deny).
    pub revoke_older_sessions: bool,
    /// The cut-off for `revoke_older_sessions`: the revocation's time.
    pub issued_before: OffsetDateTime,
    /// Fence only the sessions of these leases, not every session of their
    /// agents: a policy change stopped permitting exactly these. Such a
    /// fence is moot once they have all expired ([`Fence::expires_at`]).
    pub sessions_only: bool,
    /// This provider's fences still standing (put up earlier): a fence that
    /// shares a name with one of them must keep denying what it denies.
    pub standing: Vec<Fence>,
}

/// One live lease hit by an emergency revocation.
#[derive(Debug, Clone)]
pub struct FenceTarget {
    /// The lease.
    pub lease_id: String,
    /// The agent holding it.
    pub agent_id: String,
    /// The scope it was minted for, as configured now.
    pub scope: ScopeSpec,
    /// The revoke handle recorded at issue (`None` if the issue never
    /// completed).
    pub handle: Option<RevokeHandle>,
    /// The task the lease belongs to (its session's name, where the backend
    /// names sessions).
    pub task_id: String,
    /// When the lease's TTL ends, as Keygate recorded it.
    pub expires_at: OffsetDateTime,
}

/// A barrier a provider put up. Never secret: it is stored, audited and
/// shown to operators.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fence {
    /// What the fence is attached to (an AWS role ARN).
    pub target: String,
    /// The fence's name at the backend (an inline policy name).
    pub name: String,
    /// The agent it stops, or `None` for a fence against everyone (the
    /// role-wide "older sessions" deny).
    pub agent: Option<String>,
    /// What it does, in words, for operators and the audit log.
    pub description: String,
    /// What the provider needs to lift or rebuild it.
    pub handle: serde_json::Value,
    /// When it becomes moot because everything it denies has expired (the
    /// broker lifts it then); `None`: it stands until an operator lifts it.
    #[serde(skip)]
    pub expires_at: Option<OffsetDateTime>,
}

/// What [`crate::Provider::fence`] did.
#[derive(Debug, Default)]
pub struct Fenced {
    /// Fences now standing.
    pub fences: Vec<Fence>,
    /// Fences it tried to put up and could not, with why.
    pub failed: Vec<(Fence, ProviderError)>,
}

/// A request to take one fence down.
#[derive(Debug, Clone)]
pub struct LiftFenceRequest {
    /// The fence to lift.
    pub fence: Fence,
    /// The other fences of this provider still standing on the same target
    /// with the same name (put up by other revocations): the provider keeps
    /// what they need in force.
    pub remaining: Vec<Fence>,
}
