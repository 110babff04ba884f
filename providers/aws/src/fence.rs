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
//! - `keygate-revoked-sessions-<agent>` (a policy change) denies every
//!   action to the agent's sessions of the role whose names (Keygate names a
//!   session after its task) are those the change stopped permitting, until
//!   they expire: `aws:userid` of an assumed-role session ends in
//!   `:<session name>`. It is moot after the last of them expires.
//!
//! Inline policy names are unique per role, so the same fence put up twice
//! is one policy; lifting rebuilds it from the fences still standing.

use std::collections::{BTreeMap, BTreeSet};

use keygate_provider_api::{
    Fence, FenceRequest, FenceTarget, Fenced, LiftFenceRequest, ProviderError,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::scope::{self, ScopeKind};
use crate::{AwsProvider, error, limits, rfc3339};

/// Prefix of the per-agent deny policies.
const AGENT_FENCE_PREFIX: &str = "keygate-fence-";
/// The role-wide deny of sessions issued before a time. Its prefix differs
/// from the agent fences', so no agent id can collide with it.
const OLDER_SESSIONS_FENCE: &str = "keygate-revoke-older-sessions";
/// Prefix of the per-agent denies of named sessions (a policy change).
/// `keygate-revoked-` differs from both names above at its 15th character.
const SESSIONS_FENCE_PREFIX: &str = "keygate-revoked-sessions-";

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
        expires_at: None,
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
        expires_at: None,
    }
}

/// When the session of an `assume_role` lease expires: as STS said at
/// issue, else (an issue that never completed) the lease's end plus the
/// margin a late session could have.
fn session_expiry(t: &FenceTarget) -> OffsetDateTime {
    t.handle
        .as_ref()
        .and_then(|h| h.0.get("expires_at"))
        .and_then(Value::as_i64)
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(t.expires_at + crate::sts::ORPHAN_MARGIN)
}

/// The fence against `sessions` (task id → when its session expires) of
/// `agent` on a role.
fn sessions_fence(
    role_arn: &str,
    role_name: &str,
    agent: &str,
    sessions: &BTreeMap<String, i64>,
) -> Result<Fence, ProviderError> {
    let last = sessions.values().max().copied().unwrap_or_default();
    let until = OffsetDateTime::from_unix_timestamp(last)
        .map_err(|e| ProviderError::Internal(format!("a session expiry is out of range: {e}")))?;
    let names = sessions.keys().cloned().collect::<Vec<_>>().join(", ");
    Ok(Fence {
        target: role_arn.to_owned(),
        name: format!("{SESSIONS_FENCE_PREFIX}{agent}"),
        agent: Some(agent.to_owned()),
        description: format!(
            "inline policy denies every action to the sessions of this role named {names} with aws:SourceIdentity `{agent}` (a policy change stopped permitting them), until they expire at {}",
            rfc3339(until)?
        ),
        handle: json!({
            "kind": "sessions", "role_name": role_name, "agent": agent, "sessions": sessions,
        }),
        expires_at: Some(until),
    })
}

/// The policy document a fence (or several fences of one name) needs, or
/// `None` when nothing is left to deny (every session named has expired).
fn document(fences: &[&Fence], now: OffsetDateTime) -> Result<Option<String>, ProviderError> {
    let bad = || ProviderError::Internal("a fence record is unreadable".into());
    let first = fences.first().ok_or_else(bad)?;
    match first.handle.get("kind").and_then(Value::as_str) {
        Some("source_identity") => {
            let agent = first.agent.as_deref().ok_or_else(bad)?;
            Ok(Some(deny_all(
                "KeygateFenceSourceIdentity",
                json!({ "StringEquals": { "aws:SourceIdentity": agent } }),
            )))
        }
        Some("sessions") => {
            let agent = first.agent.as_deref().ok_or_else(bad)?;
            let mut live = BTreeSet::new();
            for f in fences {
                let sessions = f.handle.get("sessions").and_then(Value::as_object);
                for (task, until) in sessions.ok_or_else(bad)? {
                    if until.as_i64().ok_or_else(bad)? > now.unix_timestamp() {
                        live.insert(format!("*:{task}"));
                    }
                }
            }
            if live.is_empty() {
                return Ok(None);
            }
            Ok(Some(deny_all(
                "KeygateRevokedSessions",
                json!({
                    "StringEquals": { "aws:SourceIdentity": agent },
                    "StringLike": { "aws:userid": live },
                }),
            )))
        }
        Some("issued_before") => {
            // Several revocations: the latest cut-off covers the earlier ones.
            let latest = fences
                .iter()
                .filter_map(|f| f.handle.get("issued_before").and_then(Value::as_str))
                .max()
                .ok_or_else(bad)?;
            Ok(Some(deny_all(
                "KeygateRevokeOlderSessions",
                json!({ "DateLessThan": { "aws:TokenIssueTime": latest } }),
            )))
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
        if req.sessions_only {
            return self.fence_sessions(req).await;
        }
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
                self.put_with_standing(f, &req.standing, &mut out).await;
            }
        }
        Ok(out)
    }

    /// Fences exactly the sessions of `req.targets`, per role and agent.
    async fn fence_sessions(&self, req: &FenceRequest) -> Result<Fenced, ProviderError> {
        type Sessions = BTreeMap<String, i64>;
        let mut by_role: BTreeMap<(String, &str), Sessions> = BTreeMap::new();
        for t in &req.targets {
            if let Some(role) = role_of(t) {
                let until = session_expiry(t);
                by_role
                    .entry((role, t.agent_id.as_str()))
                    .or_default()
                    .insert(t.task_id.clone(), until.unix_timestamp());
            }
        }
        let mut out = Fenced::default();
        for ((role_arn, agent), sessions) in &by_role {
            let role_name = limits::role_name(role_arn)?;
            let f = sessions_fence(role_arn, role_name, agent, sessions)?;
            self.put_with_standing(f, &req.standing, &mut out).await;
        }
        Ok(out)
    }

    /// Puts `f` up into `out`. Fences of one name are one policy: it keeps
    /// denying what the `standing` ones of its name deny (another kill
    /// switch's later cut-off of older sessions, put up first, stays the
    /// one written; sessions fenced before stay fenced).
    async fn put_with_standing(&self, f: Fence, standing: &[Fence], out: &mut Fenced) {
        let mut all = vec![&f];
        all.extend(
            standing
                .iter()
                .filter(|s| s.target == f.target && s.name == f.name),
        );
        match self.put_policy(&f, &all).await {
            Ok(()) => out.fences.push(f),
            Err(e) => out.failed.push((f, e)),
        }
    }

    /// Writes the inline policy for `fence`, built from `all` of that name
    /// (deletes it when nothing in them is left to deny).
    async fn put_policy(&self, fence: &Fence, all: &[&Fence]) -> Result<(), ProviderError> {
        let role_name = role_name_of(fence)?;
        let Some(doc) = document(all, OffsetDateTime::now_utc())? else {
            return self.delete_policy(fence).await;
        };
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
        self.delete_policy(&req.fence).await
    }

    async fn delete_policy(&self, fence: &Fence) -> Result<(), ProviderError> {
        let role_name = role_name_of(fence)?;
        let deleted = self
            .iam
            .delete_role_policy()
            .role_name(&role_name)
            .policy_name(&fence.name)
            .send()
            .await;
        match deleted {
            Ok(_) => {}
            Err(e) if error::code(&e) == Some("NoSuchEntity") => {}
            Err(e) => return Err(error::from_sdk("iam:DeleteRolePolicy", e)),
        }
        tracing::warn!(role = %fence.target, policy = %fence.name, "fence lifted");
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
        let now = OffsetDateTime::now_utc();
        let doc: Value = serde_json::from_str(&document(&[&f], now).unwrap().unwrap()).unwrap();
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
        let doc: Value =
            serde_json::from_str(&document(&[&early, &late], now).unwrap().unwrap()).unwrap();
        assert_eq!(
            doc["Statement"][0]["Condition"]["DateLessThan"]["aws:TokenIssueTime"],
            "2027-01-15T08:00:00Z"
        );
        assert!(!OLDER_SESSIONS_FENCE.starts_with(AGENT_FENCE_PREFIX));
        assert!(!OLDER_SESSIONS_FENCE.starts_with(SESSIONS_FENCE_PREFIX));
        assert!(!SESSIONS_FENCE_PREFIX.starts_with(AGENT_FENCE_PREFIX));
    }

    /// Two policy changes fence two sessions of one agent on one role: one
    /// policy denies both while they live, drops each as it expires, and is
    /// gone (nothing to deny) once both have.
    #[test]
    fn session_fences_merge_and_expire() {
        let t0 = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let one = BTreeMap::from([("tk_one".to_owned(), at(900).unix_timestamp())]);
        let two = BTreeMap::from([("tk_two".to_owned(), at(3600).unix_timestamp())]);
        let a = sessions_fence(ROLE, "reports", "agent-1", &one).unwrap();
        let b = sessions_fence(ROLE, "reports", "agent-1", &two).unwrap();
        assert_eq!(
            (a.name.as_str(), b.expires_at),
            ("keygate-revoked-sessions-agent-1", Some(at(3600)))
        );
        let userids = |now| -> Option<Value> {
            document(&[&a, &b], now).unwrap().map(|d| {
                let doc: Value = serde_json::from_str(&d).unwrap();
                let cond = &doc["Statement"][0]["Condition"];
                assert_eq!(cond["StringEquals"]["aws:SourceIdentity"], "agent-1");
                cond["StringLike"]["aws:userid"].clone()
            })
        };
        assert_eq!(userids(t0), Some(json!(["*:tk_one", "*:tk_two"])));
        assert_eq!(userids(at(901)), Some(json!(["*:tk_two"])));
        assert_eq!(userids(at(3600)), None);
    }
}
