//! Credentials: decide, mint (`minting.rs`), hand over; release one;
//! complete the task.

use serde::Serialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::ScopeConfig;
use crate::model::{Approval, Lease, LeaseState, Revocability, RevocationProgress, TaskState, now};
use crate::policy::{RequestFacts, ScopeFacts};
use crate::store::{LeaseSelector, TaskSelector};

/// What the agent receives for a granted credential.
#[derive(Debug)]
pub struct IssuedCredential {
    pub lease_id: String,
    pub scope: String,
    pub provider: String,
    pub expires_at: OffsetDateTime,
    pub revocability: Revocability,
    /// Set when the credential outlives the requested lease because its
    /// backend fixes its lifetime (and cannot revoke it).
    pub note: Option<String>,
    pub credential: keygate_provider_api::Credential,
}

/// The outcome of releasing one lease.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReleasedLease {
    pub lease_id: String,
    pub state: LeaseState,
    /// How the lease's backend ends it (`revocable`, `expires_at`, `not_applicable`).
    pub revocation: Option<Revocability>,
    /// Set when the backend could not kill it: it lives until then.
    #[serde(with = "time::serde::rfc3339::option")]
    pub lives_until: Option<OffsetDateTime>,
    /// What release did, in words, when it is not a plain revocation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub last_error: Option<String>,
}

/// A lease whose credential outlives its task because its backend cannot
/// revoke it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LivesUntil {
    pub lease_id: String,
    pub scope: String,
    #[serde(with = "time::serde::rfc3339")]
    pub lives_until: OffsetDateTime,
}

/// The outcome of completing a task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletedTask {
    pub task_id: String,
    pub state: TaskState,
    pub leases: RevocationProgress,
    /// Credentials still valid after the task ended (counted as `expiring`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lives_until: Vec<LivesUntil>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The scope as policy sees it.
pub(crate) fn scope_facts(c: &ScopeConfig) -> ScopeFacts<'_> {
    ScopeFacts {
        name: &c.name,
        provider: &c.provider,
        sensitive: c.sensitive,
        max_ttl_secs: c.max_ttl_secs,
    }
}

/// What release did, in words, for leases that were not plainly revoked.
fn release_note(lease: &Lease) -> Option<String> {
    match (lease.state, lease.revocability) {
        (LeaseState::Expiring, _) => Some(format!(
            "the backend cannot revoke this credential: it stays valid until {}",
            lease
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        )),
        (LeaseState::Revoked, Some(Revocability::NotApplicable)) => Some(
            "nothing to revoke: the credential was a read of a value keygate does not rotate; it stays valid until its owner changes it"
                .into(),
        ),
        _ => None,
    }
}

/// What a credential request came to: a credential, or a wait for approvers.
#[derive(Debug)]
pub enum CredentialOutcome {
    Issued(IssuedCredential),
    /// The scope is sensitive: the request waits for a human decision.
    Pending(Box<Approval>),
}

/// What an agent asks for.
#[derive(Debug, Clone)]
pub struct CredentialAsk {
    pub scope: String,
    pub ttl: Option<u64>,
    /// Provider-specific request parameters (e.g. a JWT-SVID `audience`).
    pub params: serde_json::Value,
    /// Why the agent needs it; shown to approvers of a sensitive scope.
    pub justification: Option<String>,
}

impl Broker {
    /// Grants one credential to the session's agent, or opens an approval
    /// when the scope is sensitive.
    pub async fn request_credential(
        &self,
        s: &Session,
        ask: CredentialAsk,
    ) -> BrokerResult<CredentialOutcome> {
        // Metrics are labelled with configured names only: an agent sending
        // made-up scope names must not create a time series per string.
        let scope = if self.config.scopes.iter().any(|c| c.name == ask.scope) {
            ask.scope.clone()
        } else {
            "(unknown)".to_owned()
        };
        let result = self.try_request(s, ask).await;
        if self.validation.enabled() {
            // An unknown scope (named `(unknown)`, so made-up names do not
            // grow what is learned) counts as a denial.
            let denied = matches!(
                result,
                Err(BrokerError::PolicyDenied { .. } | BrokerError::NotFound(_))
            );
            let observed = crate::validation::Observation::Request {
                scope: scope.clone(),
                denied,
                source: s.source,
            };
            self.observe(&s.agent.id, observed).await;
            if matches!(result, Ok(CredentialOutcome::Pending(_))) {
                self.observe(
                    &s.agent.id,
                    crate::validation::Observation::ApprovalRequested,
                )
                .await;
            }
        }
        self.metrics.credential(
            &scope,
            match &result {
                Ok(CredentialOutcome::Issued(_)) => "issued",
                Ok(CredentialOutcome::Pending(_)) => "pending_approval",
                Err(BrokerError::PolicyDenied { .. }) => "denied",
                Err(_) => "error",
            },
        );
        result
    }

    /// Every step-up that sends a request for a scope (`sensitive` or
    /// not) to a human: the session's agent's own, then those of the
    /// agents that delegated to it along the task's chain, in the chain's
    /// order (root orchestrator first; a stepped-up orchestrator's requests
    /// through its sub-agents need a human too), each that covers the scope
    /// (every scope, or sensitive ones), each incident once (an agent may
    /// be on the chain twice). None hides another: an approval is asked,
    /// and redeemed, under all of them.
    pub(crate) async fn step_ups_of(
        &self,
        s: &Session,
        sensitive: bool,
    ) -> BrokerResult<Vec<crate::model::StepUp>> {
        let covers = |u: &crate::model::StepUp| {
            u.scopes == crate::validation::StepUpScopes::All || sensitive
        };
        let mut found: Vec<_> = s
            .agent
            .step_up
            .iter()
            .filter(|u| covers(u))
            .cloned()
            .collect();
        for id in &s.task.chain {
            if let Some(u) = self
                .store
                .get_agent(id)
                .await?
                .and_then(|a| a.step_up)
                .filter(covers)
                && !found.iter().any(|f| f.incident == u.incident)
            {
                found.push(u);
            }
        }
        Ok(found)
    }

    /// A configured scope with a provider behind it.
    pub(crate) fn scope_config(&self, name: &str) -> BrokerResult<&ScopeConfig> {
        self.config
            .scopes
            .iter()
            .find(|c| c.name == name)
            .filter(|_| self.registry.scope(name).is_some())
            .ok_or_else(|| BrokerError::NotFound(format!("no scope `{name}`")))
    }

    async fn try_request(
        &self,
        s: &Session,
        ask: CredentialAsk,
    ) -> BrokerResult<CredentialOutcome> {
        let scope_cfg = self.scope_config(&ask.scope)?;
        let ttl = match ask.ttl {
            Some(0) => {
                return Err(BrokerError::InvalidRequest("`ttl` must be positive".into()));
            }
            Some(n) => n,
            None => scope_cfg.max_ttl_secs,
        };
        let t = now();
        // Policy judges what would be granted: the ask capped by the scope's
        // max_ttl and what is left of the task.
        let remaining = (s.task.expires_at - t).whole_seconds().max(1) as u64;
        let ttl = s
            .agent
            .cap_ttl(ttl.min(scope_cfg.max_ttl_secs).min(remaining));
        // One policy snapshot for every decision of this request.
        let policy = self.policy.current();
        let mut decided = self
            .check_policy(&policy, s, scope_cfg, ttl, t, "credential.requested")
            .await?;
        // Within its usage limit (after policy: a refusal spends nothing).
        self.check_usage_rate(s, &ask.scope).await?;
        // An incident's step-up sends this request to a human: every scope,
        // or the sensitive ones without policy's automatic approval.
        let step_ups = self.step_ups_of(s, scope_cfg.sensitive).await?;
        if !step_ups.is_empty() {
            return self
                .open_credential_approval(s, scope_cfg, ttl, ask, decided, &step_ups)
                .await
                .map(|a| CredentialOutcome::Pending(Box::new(a)));
        }
        if scope_cfg.sensitive {
            let facts = RequestFacts {
                task_id: &s.task.id,
                task_description: &s.task.description,
                requested_ttl_secs: ttl,
                now: t,
                chain: &s.task.chain,
            };
            let auto = policy
                .auto_approve(&s.agent, &scope_facts(scope_cfg), &facts)
                .map_err(|e| BrokerError::Internal(e.to_string()))?;
            if !auto.allow {
                return self
                    .open_credential_approval(s, scope_cfg, ttl, ask, decided, &[])
                    .await
                    .map(|a| CredentialOutcome::Pending(Box::new(a)));
            }
            // Policy approved it without a human; the evidence names the
            // policies that did.
            self.audit_alone(
                AuditEvent::new(&Actor::System, "approval.auto_approved")
                    .agent(&s.agent.id)
                    .task(&s.task.id)
                    .scope(&ask.scope)
                    .decision(true, auto.policy_ids.clone(), policy.hash()),
            )
            .await?;
            decided.details["auto_approved_by"] = serde_json::json!(auto.policy_ids);
        }
        self.mint(s, scope_cfg, ttl, ask.params, decided, None)
            .await
            .map(CredentialOutcome::Issued)
    }

    /// A lease of the session's own task; another task's lease is "not found".
    pub(crate) async fn task_lease(&self, s: &Session, lease_id: &str) -> BrokerResult<Lease> {
        self.store
            .get_lease(lease_id)
            .await?
            .filter(|l| l.task_id == s.task.id)
            .ok_or_else(|| BrokerError::NotFound(format!("no lease `{lease_id}` in this task")))
    }

    /// Releases one lease of the session's task early.
    pub async fn release(&self, s: &Session, lease_id: &str) -> BrokerResult<ReleasedLease> {
        let lease = self.task_lease(s, lease_id).await?;
        let actor = Actor::Agent(s.agent.id.clone());
        let mut tx = self.store.begin().await?;
        let queued = tx
            .queue_revocations(
                &LeaseSelector::Lease(lease.id.clone()),
                "released by agent",
                None,
                now(),
            )
            .await?;
        tx.audit(
            AuditEvent::new(&actor, "lease.released")
                .about_lease(&lease)
                .details(serde_json::json!({ "was": lease.state })),
        )
        .await?;
        tx.commit().await?;
        self.leases.wake();
        self.await_revocations(&queued, Self::CONFIRM_WAIT).await;
        let after = self.store.get_lease(lease_id).await?.unwrap_or(lease);
        Ok(ReleasedLease {
            note: release_note(&after),
            revocation: after.revocability,
            lease_id: after.id,
            state: after.state,
            lives_until: (after.state == LeaseState::Expiring).then_some(after.expires_at),
            last_error: after.last_error,
        })
    }

    /// Ends the session's task: its token stops working at once and every
    /// lease of the task is revoked.
    pub async fn complete_task(&self, s: &Session) -> BrokerResult<CompletedTask> {
        let actor = Actor::Agent(s.agent.id.clone());
        let t = now();
        let mut tx = self.store.begin().await?;
        tx.end_tasks(
            &TaskSelector::Task(s.task.id.clone()),
            TaskState::Completed,
            "completed by agent",
            t,
        )
        .await?;
        let queued = tx
            .queue_revocations(
                &LeaseSelector::Task(s.task.id.clone()),
                "task completed",
                None,
                t,
            )
            .await?;
        tx.audit(
            AuditEvent::new(&actor, "task.completed")
                .agent(&s.agent.id)
                .task(&s.task.id)
                .details(serde_json::json!({ "leases_queued": queued.len() })),
        )
        .await?;
        tx.commit().await?;
        self.leases.wake();
        self.await_revocations(&queued, Self::CONFIRM_WAIT).await;
        let (progress, lives_until) = self.lease_outcomes(&queued).await?;
        let note = (!lives_until.is_empty()).then(|| {
            "the backend cannot revoke the credentials in `lives_until`: they stay valid until then"
                .to_owned()
        });
        Ok(CompletedTask {
            task_id: s.task.id.clone(),
            state: TaskState::Completed,
            leases: progress,
            lives_until,
            note,
        })
    }

    /// Where the leases of a completed task ended up, and which of them live on.
    async fn lease_outcomes(
        &self,
        lease_ids: &[String],
    ) -> BrokerResult<(RevocationProgress, Vec<LivesUntil>)> {
        let mut progress = RevocationProgress::default();
        let mut lives_until = Vec::new();
        for id in lease_ids {
            if let Some(l) = self.store.get_lease(id).await? {
                progress.found += 1;
                match l.state {
                    LeaseState::Revoked | LeaseState::Expired => progress.revoked += 1,
                    LeaseState::Expiring => {
                        progress.expiring += 1;
                        lives_until.push(LivesUntil {
                            lease_id: l.id,
                            scope: l.scope,
                            lives_until: l.expires_at,
                        });
                    }
                    _ => progress.pending += 1,
                }
            }
        }
        Ok((progress, lives_until))
    }
}
