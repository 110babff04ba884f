//! Delegation (RFC 8693 token exchange): a sub-agent, proving itself with
//! its own client assertion or its workload token, receives a narrower child
//! task under the orchestrator's.

use super::Broker;
use super::sessions::{
    OAuthError, TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT, TokenRequest, TokenResponse, ensure_active,
    federation_error,
};
use crate::identity::{AssertionClaims, unverified_issuer};
use crate::model::{Agent, Task, TaskState, new_id, now, unix};

impl Broker {
    /// A federated workload token as `actor_token`: the one agent bound to
    /// its subject, active.
    async fn federated_actor(&self, token: &str) -> Result<(Agent, AssertionClaims), OAuthError> {
        let fed = self
            .federation
            .verify(token)
            .await
            .map_err(|e| federation_error(&e, "actor_token: "))?;
        if fed.users {
            return Err(OAuthError::new(
                "invalid_client",
                "actor_token: a user's ID token cannot act as a sub-agent",
            ));
        }
        let (agent, claims) = self
            .bound_workload(&fed, "invalid_client", "actor_token: ")
            .await?;
        ensure_active(&agent)?;
        Ok((agent, claims))
    }

    /// RFC 8693 delegation: the orchestrator's session token (`subject_token`)
    /// and the sub-agent's own client assertion (`actor_token`) give the
    /// sub-agent a child task whose scopes are requested ∩ parent's ∩ its own.
    pub(super) async fn token_exchange(
        &self,
        req: TokenRequest,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let required = |v: &Option<String>, name: &str, why: &str| {
            v.as_deref()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| {
                    OAuthError::new("invalid_request", format!("`{name}` is required: {why}"))
                })
        };
        let subject = required(
            &req.subject_token,
            "subject_token",
            "the delegating task's session token",
        )?;
        if req.subject_token_type.as_deref() != Some(TOKEN_TYPE_ACCESS) {
            return Err(OAuthError::new(
                "invalid_request",
                format!("`subject_token_type` must be `{TOKEN_TYPE_ACCESS}`"),
            ));
        }
        let actor = required(
            &req.actor_token,
            "actor_token",
            "the sub-agent proves who it is with its own client assertion",
        )?;
        if req.actor_token_type.as_deref() != Some(TOKEN_TYPE_JWT) {
            return Err(OAuthError::new(
                "invalid_request",
                format!("`actor_token_type` must be `{TOKEN_TYPE_JWT}`"),
            ));
        }
        let parent = self.session(&subject).await.map_err(|e| match e {
            super::SessionRefusal::Invalid(m) => {
                OAuthError::new("invalid_grant", format!("subject_token: {m}"))
            }
            super::SessionRefusal::Unavailable(m) => OAuthError::new("temporarily_unavailable", m),
        })?;
        if parent.jkt.is_some() {
            return Err(OAuthError::new(
                "invalid_grant",
                "subject_token is DPoP-bound; exchanging DPoP-bound tokens is not supported yet",
            ));
        }
        // A certificate-bound token is refused on any connection without
        // that certificate, here as at every other endpoint (RFC 8705 §3).
        if let Some(x5t) = &parent.x5t
            && req
                .client_cert
                .as_deref()
                .map(|c| crate::server::tls::thumbprint(c))
                .as_ref()
                != Some(x5t)
        {
            return Err(OAuthError::new(
                "invalid_grant",
                "subject_token is bound to a client certificate (cnf.x5t#S256): exchange it over the mTLS listener with that certificate",
            ));
        }
        // Revoked since its task opened: the session it opened delegates
        // nothing, as it issues nothing (`check_sender`).
        if parent.x5t.is_some()
            && let Some(cert) = req.client_cert.as_deref()
            && let Some(name) = self
                .certificate_revoked_by(cert)
                .await
                .map_err(|m| OAuthError::new("temporarily_unavailable", m))?
        {
            return Err(OAuthError::new(
                "invalid_grant",
                format!(
                    "subject_token is bound to a client certificate provider `{name}` has revoked"
                ),
            ));
        }
        let actor_iss = unverified_issuer(&actor)
            .map_err(|e| OAuthError::new("invalid_client", format!("actor_token: {e}")))?;
        // The sub-agent proves itself with its client assertion (`iss` = its
        // id) or, for a federated agent with no key, its workload token
        // (`iss` = a trusted issuer), verified as at the token endpoint.
        let (child, claims) = if self.federation.trusts_issuer_url(&actor_iss) {
            self.federated_actor(&actor).await?
        } else {
            self.authenticate(&actor_iss, &actor).await?
        };
        if let Some(cid) = req.client_id.as_deref().filter(|c| !c.is_empty())
            && cid != child.id
        {
            return Err(OAuthError::new(
                "invalid_client",
                "`client_id` does not match the agent the actor_token proves",
            ));
        }
        let from = &parent.agent;
        if child.id == from.id {
            return Err(OAuthError::new(
                "invalid_target",
                "an agent cannot delegate to itself; use its own session token",
            ));
        }
        if !from.delegation.targets.contains(&child.id) {
            return Err(OAuthError::new(
                "invalid_target",
                format!(
                    "agent `{}` may not delegate to `{}` (not among its delegation targets)",
                    from.id, child.id
                ),
            ));
        }
        // The budget the task opened with, cut by what each delegator's
        // registration allows now: a `max_depth` lowered since binds the
        // tasks already open too.
        let mut budget = parent.task.delegation_budget.min(from.delegation.max_depth);
        for (depth, id) in parent.task.chain.iter().enumerate() {
            let allows = match self
                .store
                .get_agent(id)
                .await
                .map_err(|e| super::sessions::internal(&e))?
            {
                Some(a) => (depth as u8)
                    .saturating_add(a.delegation.max_depth)
                    .saturating_sub(parent.task.depth),
                None => 0,
            };
            budget = budget.min(allows);
        }
        if budget == 0 {
            return Err(OAuthError::new(
                "invalid_grant",
                format!(
                    "delegation depth limit reached: task `{}` (depth {}) may not delegate further",
                    parent.task.id, parent.task.depth
                ),
            ));
        }
        let parent_scopes = parent
            .task
            .scopes
            .clone()
            .unwrap_or_else(|| self.reachable_scopes(from));
        let own = self.reachable_scopes(&child);
        let requested = delegated_scopes(req.scope.as_deref(), &parent_scopes, &own, &child.id)?;
        let t = now();
        let ttl = self.session_ttl(req.ttl.as_deref())?;
        let source = req.source;
        let mut chain = parent.task.chain.clone();
        chain.push(from.id.clone());
        let task = Task {
            id: new_id("tk"),
            agent_id: child.id.clone(),
            description: req.task.unwrap_or_else(|| parent.task.description.clone()),
            state: TaskState::Open,
            opened_at: t,
            expires_at: (t + super::sessions::capped(&child, ttl)).min(parent.task.expires_at),
            ended_at: None,
            end_reason: None,
            parent_task_id: Some(parent.task.id.clone()),
            depth: parent.task.depth + 1,
            delegation_budget: (budget - 1).min(child.delegation.max_depth),
            scopes: Some(requested.clone()),
            chain: chain.clone(),
            // A sub-agent acts for whomever its orchestrator acts for.
            on_behalf_of: parent.task.on_behalf_of.clone(),
        };
        let details = serde_json::json!({
            "method": "token_exchange",
            "parent_task": parent.task.id,
            "chain": chain,
            "depth": task.depth,
            "scopes": requested,
            "expires_at": unix(task.expires_at),
        });
        let opened = self
            .open_task(
                &child,
                &claims,
                task,
                "task.delegated",
                details,
                req.dpop.as_ref(),
            )
            .await?;
        // The delegating agent did this (the sub-agent's task open is
        // observed as its own).
        self.observe(
            &from.id,
            crate::validation::Observation::Delegated {
                target: child.id.clone(),
                source,
            },
        )
        .await;
        Ok(opened)
    }
}

/// The scopes a delegated task gets: the requested ones (default: all the
/// parent's that the sub-agent may hold), each of which must be both the
/// parent's and permitted to the sub-agent. Never wider than either.
pub(crate) fn delegated_scopes(
    requested: Option<&str>,
    parent: &[String],
    own: &[String],
    child: &str,
) -> Result<Vec<String>, OAuthError> {
    let requested: Vec<String> = match requested.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => {
            let mut v: Vec<String> = s.split_whitespace().map(str::to_owned).collect();
            v.sort();
            v.dedup();
            v
        }
        None => parent.iter().filter(|s| own.contains(s)).cloned().collect(),
    };
    for s in &requested {
        if !parent.contains(s) {
            return Err(OAuthError::new(
                "invalid_scope",
                format!(
                    "scope `{s}` is beyond the delegating task's scopes: delegation only narrows"
                ),
            ));
        }
        if !own.contains(s) {
            return Err(OAuthError::new(
                "invalid_scope",
                format!("policy does not permit agent `{child}` to obtain scope `{s}`"),
            ));
        }
    }
    if requested.is_empty() {
        return Err(OAuthError::new(
            "invalid_scope",
            "no scope is both the delegating task's and permitted to the sub-agent",
        ));
    }
    Ok(requested)
}

#[cfg(test)]
mod tests {
    use super::delegated_scopes;
    use proptest::prelude::*;

    fn names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(prop::sample::select(vec!["a", "b", "c", "d", "e"]), 0..5)
            .prop_map(|v| v.into_iter().map(str::to_owned).collect())
    }

    proptest! {
        /// Along any chain of delegations, each task's scopes are a subset of
        /// its parent's and of what its own agent may hold.
        #[test]
        fn delegation_only_narrows(
            root in names(),
            chain in proptest::collection::vec((names(), proptest::option::of(names())), 1..5),
        ) {
            let mut parent = root;
            for (own, asked) in chain {
                let asked = asked.map(|a| a.join(" "));
                match delegated_scopes(asked.as_deref(), &parent, &own, "x") {
                    Ok(child) => {
                        prop_assert!(!child.is_empty());
                        prop_assert!(child.iter().all(|s| parent.contains(s) && own.contains(s)));
                        parent = child;
                    }
                    Err(e) => {
                        prop_assert_eq!(e.error, "invalid_scope");
                        break;
                    }
                }
            }
        }
    }
}
