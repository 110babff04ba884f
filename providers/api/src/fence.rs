//! Fences: the emergency barrier for credentials that cannot be revoked one
//! by one (AWS STS sessions). A fence is put up by an emergency revocation
//! and stays until an operator lifts it.

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
