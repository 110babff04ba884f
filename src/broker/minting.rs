//! Minting one credential: the lease written ahead of a backend (or once,
//! with what an in-process provider issued), the provider asked within its
//! timeout, what it issued recorded, and a failed issue resolved so that
//! nothing issued is left without a lease.

use std::time::Duration;

use keygate_provider_api::{AgentInfo, IssueRequest, ProviderError};

use super::credentials::IssuedCredential;
use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::ScopeConfig;
use crate::model::{Lease, LeaseState, Revocability, new_id, now};
use crate::store::{LeaseInsert, LeaseSelector};

/// How far past its lease a provider's clock may put a credential's expiry:
/// a backend that counts the lifetime from its own mint time (AWS STS counts
/// `DurationSeconds` from the AssumeRole call) ends up to the issue's
/// duration later, plus the clock skew between Keygate and the backend.
const BACKEND_CLOCK_SKEW: time::Duration = time::Duration::seconds(5);
/// The audit event of a lease's credential issued: what, never the secret.
/// The task ended (completion, TTL, kill switch) after this request's
/// session check: no credential for an ended task.
fn task_ended() -> BrokerError {
    BrokerError::TaskEnded("the task has ended".into())
}

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

/// Records what the provider issued on the lease, with its audit event;
/// returns the lease state after recording.
async fn record_issued(
    tx: &mut dyn crate::store::StoreTx,
    lease: &Lease,
    issued: &keygate_provider_api::Issued,
    actor: &Actor,
) -> BrokerResult<Option<LeaseState>> {
    let state = tx
        .record_issued(
            &lease.id,
            &issued.handle.0,
            issued.revocability.into(),
            issued.expires_at,
        )
        .await?;
    tx.audit(issued_event(lease, issued, actor)).await?;
    Ok(state)
}

/// Why a credential outlives the ttl granted to its lease.
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
            let mut excluded = None;
            if let Some(decided) = unwritten.take() {
                excluded = self
                    .write_lease(s, scope_cfg, &lease, redeem, decided, None)
                    .await?;
            }
            self.judge_again_if_reloaded(s, &lease, ttl, decided_hash.as_deref(), false, excluded)
                .await?;
        }
        // The issue's time counts from the lease's `created_at`, not from
        // here: the reaper takes a pending lease older than the issue
        // timeout (and a margin) for an orphan whose call cannot still be
        // in flight, so a call that starts late (a slow commit before it)
        // gets only what is left, and none once that is spent.
        let timeout = Duration::from_secs(self.config.leases.issue_timeout_secs);
        let spent = Duration::try_from(now() - t).unwrap_or_default();
        let left = timeout.saturating_sub(spent);
        if left.is_zero() {
            let e = ProviderError::NotSent(format!(
                "the issue's {}s ran out before the backend was asked",
                timeout.as_secs()
            ));
            return Err(self
                .failed_before_handover(s, scope_cfg, &lease, redeem, unwritten, &actor, e)
                .await);
        }
        let issued = match tokio::time::timeout(left, provider.issue(&req)).await {
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
                let excluded = self
                    .write_lease(
                        s,
                        scope_cfg,
                        &lease,
                        redeem,
                        decided,
                        Some((&issued, &actor)),
                    )
                    .await?;
                self.judge_again_if_reloaded(
                    s,
                    &lease,
                    ttl,
                    decided_hash.as_deref(),
                    true,
                    excluded,
                )
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
    /// `issued`, the lease is written active with what the provider issued,
    /// in the same statement. Returns whether the registry excluded its
    /// scope, as the write saw it (`None`: the engine cannot tell).
    async fn write_lease(
        &self,
        s: &Session,
        scope_cfg: &ScopeConfig,
        lease: &Lease,
        redeem: Option<&str>,
        decided: AuditEvent,
        issued: Option<(&keygate_provider_api::Issued, &Actor)>,
    ) -> BrokerResult<Option<bool>> {
        let t = lease.created_at;
        let active = issued.map(|(issued, _)| {
            let mut active = lease.clone();
            active.state = LeaseState::Active;
            active.handle = Some(issued.handle.0.clone());
            active.revocability = Some(issued.revocability.into());
            active.expires_at = issued.expires_at;
            active
        });
        let written = active.as_ref().unwrap_or(lease);
        let mut events = vec![decided.lease(&lease.id)];
        if let Some((issued, actor)) = issued {
            events.push(issued_event(lease, issued, actor));
        }
        if redeem.is_none() && !self.limits_live_leases(s, scope_cfg) {
            // Nothing to check inside the transaction: the store may batch
            // this write with other requests' (SQLite does).
            return match self.store.insert_lease_audited(written, events).await? {
                LeaseInsert::Written { excluded } => Ok(excluded),
                LeaseInsert::TaskEnded => Err(task_ended()),
            };
        }
        let mut tx = self.store.begin().await?;
        if let Some(over) = self.over_live_leases(&mut *tx, s, scope_cfg, t).await? {
            // The transaction ends unwritten before the refusal is audited.
            drop(tx);
            return Err(self.refuse_live(s, &lease.scope, over).await);
        }
        let LeaseInsert::Written { excluded } = tx.insert_lease(written).await? else {
            return Err(task_ended());
        };
        if let Some(approval_id) = redeem
            && !tx.redeem_approval(approval_id, &lease.id, t).await?
        {
            return Err(BrokerError::Conflict(format!(
                "approval `{approval_id}` was redeemed already: an approval yields one credential"
            )));
        }
        for ev in events {
            tx.audit(ev).await?;
        }
        tx.commit().await?;
        Ok(excluded)
    }

    /// Records the handle; returns the lease state after recording.
    async fn record_and_queue(
        &self,
        lease: &Lease,
        issued: &keygate_provider_api::Issued,
        actor: &Actor,
    ) -> BrokerResult<Option<LeaseState>> {
        let mut tx = self.store.begin().await?;
        let state = record_issued(&mut *tx, lease, issued, actor).await?;
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
}
