//! Credentials: decide, write the lease ahead, mint, hand over; release one;
//! complete the task.

use std::time::Duration;

use keygate_provider_api::{AgentInfo, IssueRequest, ProviderError};
use serde::Serialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::ScopeConfig;
use crate::model::{
    Approval, Lease, LeaseState, Revocability, RevocationProgress, TaskState, new_id, now,
};
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

/// How far past its lease a provider's clock may put a credential's expiry:
/// a backend that counts the lifetime from its own mint time (AWS STS counts
/// `DurationSeconds` from the AssumeRole call) ends up to the issue's
/// duration later, plus the clock skew between Keygate and the backend.
const BACKEND_CLOCK_SKEW: time::Duration = time::Duration::seconds(5);

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

/// Why a credential outlives the ttl granted to its lease.
/// The audit event of a lease's credential issued: what, never the secret.
fn issued_event(lease: &Lease, issued: &keygate_provider_api::Issued, actor: &Actor) -> AuditEvent {
    let revocability: Revocability = issued.revocability.into();
    AuditEvent::new(actor, "lease.issued")
        .about_lease(lease)
        .details(serde_json::json!({
            "provider": lease.provider,
            "expires_at": crate::model::unix(issued.expires_at),
            "revocability": revocability,
            "handle": issued.handle.0,
            "fields": issued.credential.field_names().collect::<Vec<_>>(),
        }))
}

fn outlives_note(issued: &keygate_provider_api::Issued, granted: u64) -> String {
    format!(
        "the backend sets this credential's lifetime and cannot revoke it: it stays valid until {}, past the {granted} s granted; releasing it or ending the task does not shorten that",
        issued
            .expires_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    )
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

    /// The step-up on the session's agent, or on any agent that delegated
    /// to it along the task's chain: a stepped-up orchestrator's requests
    /// through its sub-agents need a human too.
    async fn step_up_of(&self, s: &Session) -> BrokerResult<Option<crate::model::StepUp>> {
        if let Some(u) = &s.agent.step_up {
            return Ok(Some(u.clone()));
        }
        for id in &s.task.chain {
            if let Some(u) = self.store.get_agent(id).await?.and_then(|a| a.step_up) {
                return Ok(Some(u));
            }
        }
        Ok(None)
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
        let step_up = self
            .step_up_of(s)
            .await?
            .filter(|u| u.scopes == crate::validation::StepUpScopes::All || scope_cfg.sensitive);
        if step_up.is_some() {
            return self
                .open_credential_approval(s, scope_cfg, ttl, ask, decided, step_up.as_ref())
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
                    .open_credential_approval(s, scope_cfg, ttl, ask, decided, None)
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

    /// Writes the lease ahead, asks the provider, records what it issued.
    /// With `redeem`, the approval is marked redeemed in the lease's own
    /// commit, so an approval yields at most one credential.
    pub(crate) async fn mint(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        ttl: u64,
        params: serde_json::Value,
        decided: AuditEvent,
        redeem: Option<&str>,
    ) -> BrokerResult<IssuedCredential> {
        let actor = Actor::Agent(s.agent.id.clone());
        let scope_name = scope_cfg.name.as_str();
        let spec = self
            .registry
            .scope(scope_name)
            .ok_or_else(|| BrokerError::NotFound(format!("no scope `{scope_name}`")))?;
        let t = now();
        let remaining = (s.task.expires_at - t).whole_seconds().max(0) as u64;
        let granted = s
            .agent
            .cap_ttl(ttl.min(scope_cfg.max_ttl_secs).min(remaining));
        if granted == 0 {
            return Err(BrokerError::TaskEnded("the task has no time left".into()));
        }
        let expires_at = t + time::Duration::seconds(granted as i64);
        let lease = Lease {
            id: new_id("ls"),
            agent_id: s.agent.id.clone(),
            task_id: s.task.id.clone(),
            scope: scope_name.to_owned(),
            provider: scope_cfg.provider.clone(),
            state: LeaseState::Pending,
            revocability: None,
            handle: None,
            created_at: t,
            expires_at,
            ended_at: None,
            end_reason: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            revocation_id: None,
            boot_id: Some(self.leases.boot_id().to_owned()),
            source: s.source.map(|ip| ip.to_string()),
        };
        let provider = self.registry.provider(&lease.provider).ok_or_else(|| {
            BrokerError::Internal(format!("provider `{}` missing", lease.provider))
        })?;
        let req = IssueRequest {
            lease_id: lease.id.clone(),
            task_id: s.task.id.clone(),
            agent: AgentInfo {
                id: s.agent.id.clone(),
                team: s.agent.team.clone(),
                sponsor: s.agent.sponsor.clone(),
                environment: s.agent.environment.to_string(),
                risk_tier: s.agent.risk_tier,
            },
            scope: spec.clone(),
            ttl: Duration::from_secs(granted),
            expires_at,
            request_params: params,
        };
        let decided_hash = decided.policy_hash.clone();
        // Write-ahead: the lease exists before a backend is asked, so a
        // crash from here on leaves a row the reaper resolves. A provider
        // that creates nothing outside this process (the local CA) is asked
        // first instead, and its lease written once with what it issued:
        // until that commit the credential exists nowhere but here.
        let mut unwritten = Some(decided);
        if !provider.issues_in_process() {
            if let Some(decided) = unwritten.take() {
                self.write_lease(s, scope_cfg, &lease, redeem, decided, None)
                    .await?;
            }
            self.judge_again_if_reloaded(s, &lease, ttl, decided_hash.as_deref(), false)
                .await?;
        }
        let timeout = Duration::from_secs(self.config.leases.issue_timeout_secs);
        let issued = match tokio::time::timeout(timeout, provider.issue(&req)).await {
            Ok(Ok(issued)) => issued,
            Ok(Err(e)) => {
                return Err(self
                    .failed_before_handover(s, scope_cfg, &lease, redeem, unwritten, &actor, e)
                    .await);
            }
            Err(_) => {
                let e =
                    ProviderError::Unavailable(format!("no answer within {}s", timeout.as_secs()));
                return Err(self
                    .failed_before_handover(s, scope_cfg, &lease, redeem, unwritten, &actor, e)
                    .await);
            }
        };
        // A provider counting from its own mint time ends a little later than
        // the lease; the lease then records the real expiry. Anything later
        // breaks the lease's promise, except for a credential whose backend
        // fixes its lifetime and cannot revoke it (an Entra access token):
        // that one may live up to the scope's max_ttl (never past the agent's
        // own `max_ttl_secs`: seed 000's promise), and the agent is told.
        let slack = time::Duration::seconds((now() - t).whole_seconds() + 1) + BACKEND_CLOCK_SKEW;
        let latest = match issued.revocability {
            keygate_provider_api::Revocability::ExpiresAt => {
                t + time::Duration::seconds(s.agent.cap_ttl(scope_cfg.max_ttl_secs) as i64)
            }
            _ => expires_at,
        };
        let note =
            (issued.expires_at > expires_at + slack).then(|| outlives_note(&issued, granted));
        if issued.expires_at > latest + slack {
            if unwritten.is_some() {
                // Issued in process: dropping it is all it takes.
                let e = ProviderError::Internal(
                    "the provider issued a credential that outlives its lease; it was discarded"
                        .into(),
                );
                return Err(self
                    .failed_before_handover(s, scope_cfg, &lease, redeem, unwritten, &actor, e)
                    .await);
            }
            // A provider that outlives the lease breaks the broker's promise;
            // kill what it issued rather than hand it over.
            self.record_and_queue(&lease, &issued, &actor).await?;
            let mut tx = self.store.begin().await?;
            tx.queue_revocations(
                &LeaseSelector::Lease(lease.id.clone()),
                "the provider issued past the lease expiry",
                None,
                now(),
            )
            .await?;
            tx.commit().await?;
            self.leases.wake();
            return Err(BrokerError::Provider(
                "the provider issued a credential that outlives its lease; it is being revoked"
                    .into(),
            ));
        }
        let state = match unwritten {
            Some(decided) => {
                self.write_lease(
                    s,
                    scope_cfg,
                    &lease,
                    redeem,
                    decided,
                    Some((&issued, &actor)),
                )
                .await?;
                self.judge_again_if_reloaded(s, &lease, ttl, decided_hash.as_deref(), true)
                    .await?;
                Some(LeaseState::Active)
            }
            None => self.record_and_queue(&lease, &issued, &actor).await?,
        };
        match state {
            Some(LeaseState::Active) => Ok(IssuedCredential {
                lease_id: lease.id,
                scope: lease.scope,
                provider: lease.provider,
                expires_at: issued.expires_at,
                revocability: issued.revocability.into(),
                note,
                credential: issued.credential,
            }),
            _ => {
                self.leases.wake();
                Err(BrokerError::TaskEnded(
                    "the task ended while the credential was being issued; it is being revoked"
                        .into(),
                ))
            }
        }
    }

    /// Writes a new lease with the decision that granted it, within the
    /// agent's live-lease limit and only while its task is open; with
    /// `issued`, what the provider issued is recorded in the same commit.
    async fn write_lease(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        lease: &Lease,
        redeem: Option<&str>,
        decided: AuditEvent,
        issued: Option<(&keygate_provider_api::Issued, &Actor)>,
    ) -> BrokerResult<()> {
        let t = lease.created_at;
        let mut tx = self.store.begin().await?;
        if let Some(over) = self.over_live_leases(&mut *tx, s, scope_cfg, t).await? {
            // The transaction ends unwritten before the refusal is audited.
            drop(tx);
            return Err(self.refuse_live(s, &lease.scope, over).await);
        }
        if !tx.insert_lease(lease).await? {
            // The task ended (completion, TTL, kill switch) after this
            // request's session check: no credential for an ended task.
            return Err(BrokerError::TaskEnded("the task has ended".into()));
        }
        if let Some(approval_id) = redeem
            && !tx.redeem_approval(approval_id, &lease.id, t).await?
        {
            return Err(BrokerError::Conflict(format!(
                "approval `{approval_id}` was redeemed already: an approval yields one credential"
            )));
        }
        tx.audit(decided.lease(&lease.id)).await?;
        if let Some((issued, actor)) = issued {
            tx.record_issued(
                &lease.id,
                &issued.handle.0,
                issued.revocability.into(),
                issued.expires_at,
            )
            .await?;
            tx.audit(issued_event(lease, issued, actor)).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the handle; returns the lease state after recording.
    async fn record_and_queue(
        &self,
        lease: &Lease,
        issued: &keygate_provider_api::Issued,
        actor: &Actor,
    ) -> BrokerResult<Option<LeaseState>> {
        let mut tx = self.store.begin().await?;
        let state = tx
            .record_issued(
                &lease.id,
                &issued.handle.0,
                issued.revocability.into(),
                issued.expires_at,
            )
            .await?;
        tx.audit(issued_event(lease, issued, actor)).await?;
        tx.commit().await?;
        Ok(state)
    }

    /// An issue that failed before anything was handed over. A lease not
    /// yet written (an in-process provider's) is written now with its
    /// decision, and fails: nothing exists anywhere to revoke.
    #[allow(clippy::too_many_arguments)]
    async fn failed_before_handover(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        lease: &Lease,
        redeem: Option<&str>,
        unwritten: Option<AuditEvent>,
        actor: &Actor,
        e: ProviderError,
    ) -> BrokerError {
        let in_process = unwritten.is_some();
        if let Some(decided) = unwritten
            && let Err(refused) = self
                .write_lease(s, scope_cfg, lease, redeem, decided, None)
                .await
        {
            return refused;
        }
        self.issue_failed(lease, actor, e, in_process).await
    }

    /// A provider error during issue: definitive refusals mean nothing
    /// exists; anything else may have issued, so the lease is queued for
    /// revocation by lease id.
    async fn issue_failed(
        &self,
        lease: &Lease,
        actor: &Actor,
        e: ProviderError,
        in_process: bool,
    ) -> BrokerError {
        let msg = e.to_string();
        tracing::warn!(lease = %lease.id, error = %msg, "provider failed to issue");
        // Nothing can exist at the backend: refused, never sent, or never
        // outside this process.
        let definitive = in_process
            || matches!(
                e,
                ProviderError::InvalidParams(_)
                    | ProviderError::Refused(_)
                    | ProviderError::Unsupported(_)
                    | ProviderError::NotSent(_)
            );
        let t = now();
        let stored = async {
            let mut tx = self.store.begin().await?;
            if definitive {
                tx.mark_failed(&lease.id, &msg, t).await?;
            } else {
                // The reason, with the provider's error, is visible on the
                // lease from the start (`end_reason`).
                tx.queue_revocations(
                    &LeaseSelector::Lease(lease.id.clone()),
                    &format!(
                        "the issue failed ({msg}); revoking whatever the provider may have issued"
                    ),
                    None,
                    t,
                )
                .await?;
            }
            tx.audit(
                AuditEvent::new(actor, "lease.issue_failed")
                    .about_lease(lease)
                    .failure(msg.clone()),
            )
            .await?;
            tx.commit().await
        }
        .await;
        if let Err(se) = stored {
            tracing::error!(lease = %lease.id, error = %se, "cannot record a failed issue; the reaper will resolve the pending lease");
        }
        if !definitive {
            self.leases.wake();
        }
        match e {
            ProviderError::InvalidParams(m) => BrokerError::InvalidRequest(m),
            other => BrokerError::Provider(other.to_string()),
        }
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
