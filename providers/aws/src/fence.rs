//! The kill switch for STS sessions: inline deny policies on the roles an
//! emergency revocation hit.
//!
//! - `keygate-fence-<agent>` denies every action to sessions whose
//!   `aws:SourceIdentity` is the agent. SourceIdentity survives role
//!   chaining, so sessions chained from the agent's are denied too.
//! - `keygate-revoke-older-sessions` (on request) denies every action to
//!   every session of the role issued before the revocation
//!   (`aws:TokenIssueTime`), whoever holds it: AWS's "revoke active
//!   sessions".
//!
//! Inline policy names are unique per role, so the same fence put up twice
//! is one policy; lifting rebuilds it from the fences still standing.

use std::collections::{BTreeMap, BTreeSet};

use keygate_provider_api::{
    Fence, FenceRequest, FenceTarget, Fenced, LiftFenceRequest, ProviderError,
};
use serde_json::{Value, json};

use crate::scope::{self, ScopeKind};
use crate::{AwsProvider, error, limits, rfc3339};

/// Prefix of the per-agent deny policies.
const AGENT_FENCE_PREFIX: &str = "keygate-fence-";
/// The role-wide deny of sessions issued before a time. Its prefix differs
/// from the agent fences', so no agent id can collide with it.
const OLDER_SESSIONS_FENCE: &str = "keygate-revoke-older-sessions";

/// The role an `assume_role` lease was for: from its handle, else its scope.
fn role_of(t: &FenceTarget) -> Option<String> {
    let from_handle = t
        .handle
        .as_ref()
        .filter(|h| h.0.get("kind").and_then(Value::as_str) == Some("assume_role"))
        .and_then(|h| h.0.get("role_arn"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    from_handle.or_else(|| match scope::parse(&t.scope.params) {
        Ok(ScopeKind::AssumeRole(p)) => Some(p.role_arn),
        _ => None,
    })
}

fn deny_all(sid: &str, condition: Value) -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": sid,
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": condition,
        }],
    })
    .to_string()
}

fn agent_fence(role_arn: &str, role_name: &str, agent: &str) -> Fence {
    Fence {
        target: role_arn.to_owned(),
        name: format!("{AGENT_FENCE_PREFIX}{agent}"),
        agent: Some(agent.to_owned()),
        description: format!(
            "inline policy denies every action to sessions of this role whose aws:SourceIdentity is `{agent}` (every session keygate issued the agent here, and sessions chained from them), until lifted"
        ),
        handle: json!({ "kind": "source_identity", "role_name": role_name, "agent": agent }),
    }
}

fn older_sessions_fence(role_arn: &str, role_name: &str, at: &str) -> Fence {
    Fence {
        target: role_arn.to_owned(),
        name: OLDER_SESSIONS_FENCE.to_owned(),
        agent: None,
        description: format!(
            "inline policy denies every action to every session of this role issued before {at} (aws:TokenIssueTime), whoever holds it, until lifted"
        ),
        handle: json!({ "kind": "issued_before", "role_name": role_name, "issued_before": at }),
    }
}

/// The policy document a fence (or several fences of one name) needs.
fn document(fences: &[&Fence]) -> Result<String, ProviderError> {
    let bad = || ProviderError::Internal("a fence record is unreadable".into());
    let first = fences.first().ok_or_else(bad)?;
    match first.handle.get("kind").and_then(Value::as_str) {
        Some("source_identity") => {
            let agent = first.agent.as_deref().ok_or_else(bad)?;
            Ok(deny_all(
                "KeygateFenceSourceIdentity",
                json!({ "StringEquals": { "aws:SourceIdentity": agent } }),
            ))
        }
        Some("issued_before") => {
            // Several revocations: the latest cut-off covers the earlier ones.
            let latest = fences
                .iter()
                .filter_map(|f| f.handle.get("issued_before").and_then(Value::as_str))
                .max()
                .ok_or_else(bad)?;
            Ok(deny_all(
                "KeygateRevokeOlderSessions",
                json!({ "DateLessThan": { "aws:TokenIssueTime": latest } }),
            ))
        }
        _ => Err(bad()),
    }
}

fn role_name_of(f: &Fence) -> Result<String, ProviderError> {
    f.handle
        .get("role_name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ProviderError::Internal("a fence record names no role".into()))
}

impl AwsProvider {
    /// Puts up the fences for every role the revocation's live leases are on.
    pub(crate) async fn put_fences(&self, req: &FenceRequest) -> Result<Fenced, ProviderError> {
        let cut_off = rfc3339(req.issued_before)?;
        let mut roles: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for t in &req.targets {
            if let Some(role) = role_of(t) {
                roles.entry(role).or_default().insert(t.agent_id.as_str());
            }
        }
        let mut out = Fenced::default();
        for (role_arn, agents) in &roles {
            // Role ARNs come from scopes checked at config load.
            let role_name = limits::role_name(role_arn)?;
            let mut planned: Vec<Fence> = agents
                .iter()
                .map(|a| agent_fence(role_arn, role_name, a))
                .collect();
            if req.revoke_older_sessions {
                planned.push(older_sessions_fence(role_arn, role_name, &cut_off));
            }
            for f in planned {
                match self.put_policy(&f, &[&f]).await {
                    Ok(()) => out.fences.push(f),
                    Err(e) => out.failed.push((f, e)),
                }
            }
        }
        Ok(out)
    }

    /// Writes the inline policy for `fence`, built from `all` of that name.
    async fn put_policy(&self, fence: &Fence, all: &[&Fence]) -> Result<(), ProviderError> {
        let role_name = role_name_of(fence)?;
        let doc = document(all)?;
        self.iam
            .put_role_policy()
            .role_name(&role_name)
            .policy_name(&fence.name)
            .policy_document(doc)
            .send()
            .await
            .map_err(|e| error::from_sdk("iam:PutRolePolicy", e))?;
        tracing::warn!(role = %fence.target, policy = %fence.name, "fence put up");
        Ok(())
    }

    /// Takes a fence down: deletes its policy, or rewrites it for the
    /// fences of the same name that still stand.
    pub(crate) async fn take_down(&self, req: &LiftFenceRequest) -> Result<(), ProviderError> {
        let same: Vec<&Fence> = req
            .remaining
            .iter()
            .filter(|f| f.target == req.fence.target && f.name == req.fence.name)
            .collect();
        if let Some(first) = same.first() {
            return self.put_policy(first, &same).await;
        }
        let role_name = role_name_of(&req.fence)?;
        let deleted = self
            .iam
            .delete_role_policy()
            .role_name(&role_name)
            .policy_name(&req.fence.name)
            .send()
            .await;
        match deleted {
            Ok(_) => {}
            Err(e) if error::code(&e) == Some("NoSuchEntity") => {}
            Err(e) => return Err(error::from_sdk("iam:DeleteRolePolicy", e)),
        }
        tracing::warn!(role = %req.fence.target, policy = %req.fence.name, "fence lifted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const ROLE: &str = "arn:aws:iam::123456789012:role/reports";

    #[test]
    fn documents() {
        let f = agent_fence(ROLE, "reports", "agent-1");
        assert_eq!(f.name, "keygate-fence-agent-1");
        let doc: Value = serde_json::from_str(&document(&[&f]).unwrap()).unwrap();
        let st = &doc["Statement"][0];
        assert_eq!(
            (st["Effect"].as_str(), st["Action"].as_str()),
            (Some("Deny"), Some("*"))
        );
        assert_eq!(
            st["Condition"]["StringEquals"]["aws:SourceIdentity"],
            "agent-1"
        );

        let early = older_sessions_fence(ROLE, "reports", "2023-11-14T22:13:20Z");
        let late = older_sessions_fence(ROLE, "reports", "2027-01-15T08:00:00Z");
        assert_eq!(early.name, OLDER_SESSIONS_FENCE);
        assert!(early.agent.is_none());
        let doc: Value = serde_json::from_str(&document(&[&early, &late]).unwrap()).unwrap();
        assert_eq!(
            doc["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
            "2027-01-15T08:00:00Z"
        );
        assert!(!OLDER_SESSIONS_FENCE.starts_with(AGENT_FENCE_PREFIX));
    }
}
