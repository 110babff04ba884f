//! Deciding a credential request: the task's delegated scopes, the agent's
//! policy, the user it acts for, and every delegator up the chain — each
//! refusal audited, a refusal caused by the ttl said so.

use time::OffsetDateTime;

use super::credentials::scope_facts;
use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::ScopeConfig;
use crate::policy::{PolicyEngine, RequestFacts};

impl Broker {
    /// Evaluates policy for a request; a denial is audited and returned as
    /// an error, an allow comes back as the event to record with the lease.
    pub(crate) async fn check_policy(
        &self,
        policy: &PolicyEngine,
        s: &Session,
        scope_cfg: &ScopeConfig,
        ttl: u64,
        t: OffsetDateTime,
        action: &str,
    ) -> BrokerResult<AuditEvent> {
        let actor = Actor::Agent(s.agent.id.clone());
        let scope_name = scope_cfg.name.as_str();
        if let Some(allowed) = &s.task.scopes
            && !allowed.iter().any(|a| a == scope_name)
        {
            let message = format!(
                "task `{}` was delegated with scopes [{}]; `{scope_name}` is not among them",
                s.task.id,
                allowed.join(", ")
            );
            self.audit_alone(
                AuditEvent::new(&actor, action)
                    .agent(&s.agent.id)
                    .task(&s.task.id)
                    .scope(scope_name)
                    .details(serde_json::json!({ "ttl": ttl, "chain": s.task.chain }))
                    .failure(message.clone()),
            )
            .await?;
            return Err(BrokerError::PolicyDenied {
                message,
                policies: Vec::new(),
            });
        }
        let facts = RequestFacts {
            task_id: &s.task.id,
            task_description: &s.task.description,
            requested_ttl_secs: ttl,
            now: t,
            chain: &s.task.chain,
        };
        let decision = policy
            .decide(&s.agent, &scope_facts(scope_cfg), &facts)
            .map_err(|e| BrokerError::Internal(e.to_string()))?;
        // Acting for a user: the user must be permitted too (agent ∩ user).
        let user_decision = match &s.task.on_behalf_of {
            Some(u) => Some(
                policy
                    .decide_for_user(&s.agent, u, &scope_facts(scope_cfg), &facts)
                    .map_err(|e| BrokerError::Internal(e.to_string()))?,
            ),
            None => None,
        };
        let user_denied = user_decision.as_ref().is_some_and(|d| !d.allow);
        let mut policy_ids = decision.policy_ids.clone();
        if let Some(d) = &user_decision {
            policy_ids.extend(d.policy_ids.iter().cloned());
        }
        let mut decided = AuditEvent::new(&actor, action)
            .agent(&s.agent.id)
            .task(&s.task.id)
            .scope(scope_name)
            .decision(decision.allow && !user_denied, policy_ids, policy.hash())
            .details(serde_json::json!({
                "ttl": ttl,
                "errors": decision.errors,
                "user": user_decision.as_ref().map(|d| serde_json::json!({
                    "allow": d.allow, "policy_ids": d.policy_ids, "errors": d.errors,
                })),
            }));
        if decision.allow
            && user_denied
            && let (Some(u), Some(d)) = (&s.task.on_behalf_of, user_decision)
        {
            let message = if d.policy_ids.is_empty() {
                format!(
                    "agent `{}` acts for user `{}`, and no policy permits that user scope `{scope_name}`",
                    s.agent.id, u.id
                )
            } else {
                format!(
                    "agent `{}` acts for user `{}`, and policy forbids that user scope `{scope_name}`",
                    s.agent.id, u.id
                )
            };
            self.audit_alone(decided.failure(message.clone())).await?;
            return Err(BrokerError::PolicyDenied {
                message,
                policies: d.policy_ids,
            });
        }
        if !decision.allow {
            let mut message = if let Some(e) = s.agent.exclusion(scope_name) {
                format!(
                    "scope `{scope_name}` is excluded from agent `{}` in the registry ({}: {}); an admin lifts it with `keygate agents include {} {scope_name}`",
                    s.agent.id, e.by, e.reason, s.agent.id
                )
            } else if decision.policy_ids.is_empty() {
                format!(
                    "no policy permits agent `{}` to obtain scope `{scope_name}`",
                    s.agent.id
                )
            } else {
                format!(
                    "policy forbids agent `{}` to obtain scope `{scope_name}`",
                    s.agent.id
                )
            };
            if let Some(shorter) = self
                .longest_permitted_ttl(policy, s, scope_cfg, &facts)
                .filter(|_| s.agent.exclusion(scope_name).is_none())
            {
                message.push_str(&format!(
                    " for {ttl} s; the ttl is what policy refused: {shorter} s is permitted"
                ));
            }
            self.audit_alone(decided.failure(message.clone())).await?;
            return Err(BrokerError::PolicyDenied {
                message,
                policies: decision.policy_ids,
            });
        }
        // A delegated request may not exceed any delegator: each one up the
        // chain must be permitted the same request (scope, ttl, time, task),
        // with the chain as it stood above it.
        let mut delegators = Vec::new();
        for (i, id) in s.task.chain.iter().enumerate() {
            let above = RequestFacts {
                chain: &s.task.chain[..i],
                ..facts.clone()
            };
            let d = match self.store.get_agent(id).await? {
                Some(delegator) => policy
                    .decide(&delegator, &scope_facts(scope_cfg), &above)
                    .map_err(|e| BrokerError::Internal(e.to_string()))?,
                None => crate::policy::PolicyDecision {
                    allow: false,
                    policy_ids: Vec::new(),
                    errors: vec![format!("delegator `{id}` is not registered")],
                },
            };
            delegators.push(
                serde_json::json!({ "agent": id, "allow": d.allow, "policy_ids": d.policy_ids }),
            );
            if !d.allow {
                let message = format!(
                    "task `{}` is delegated from `{id}`, and policy does not permit `{id}` scope `{scope_name}` on these terms (ttl {ttl} s): a delegated request may not exceed its delegators",
                    s.task.id
                );
                decided.details["delegators"] = delegators.into();
                let mut denied = decided.failure(message.clone());
                denied.decision = Some("deny".into());
                self.audit_alone(denied).await?;
                return Err(BrokerError::PolicyDenied {
                    message,
                    policies: d.policy_ids,
                });
            }
        }
        if !delegators.is_empty() {
            decided.details["delegators"] = delegators.into();
        }
        Ok(decided)
    }

    /// When policy refused `facts.requested_ttl_secs`, the longest shorter
    /// ttl it permits (a binary search, checked), so the agent is told the
    /// ttl was the problem; `None` when no ttl would do.
    fn longest_permitted_ttl(
        &self,
        policy: &PolicyEngine,
        s: &Session,
        scope_cfg: &ScopeConfig,
        facts: &RequestFacts<'_>,
    ) -> Option<u64> {
        let allows = |ttl: u64| {
            let probe = RequestFacts {
                requested_ttl_secs: ttl,
                ..facts.clone()
            };
            policy
                .decide(&s.agent, &scope_facts(scope_cfg), &probe)
                .is_ok_and(|d| d.allow)
        };
        let (mut lo, mut hi) = (1u64, facts.requested_ttl_secs);
        if hi <= 1 || !allows(lo) {
            return None;
        }
        // Invariant: `lo` is permitted, `hi` is not.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if allows(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(lo)
    }
}
