//! Fences: what an emergency revocation puts up at providers whose
//! credentials cannot be revoked one by one (AWS STS sessions), recorded and
//! audited, until an operator lifts them.

use std::collections::BTreeMap;
use std::time::Duration;

use keygate_provider_api::{Fence, FenceRequest, FenceTarget, LiftFenceRequest, RevokeHandle};
use serde::Deserialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult};
use crate::audit::{Actor, AuditEvent};
use crate::model::{FenceFilter, FenceRecord, Lease, LeaseState, Selector, new_id, now};

pub use crate::model::FenceFailure;

/// The fences an emergency revocation put up, and those that failed.
#[derive(Debug, Default)]
pub(super) struct FenceResults {
    pub fences: Vec<FenceRecord>,
    pub failures: Vec<FenceFailure>,
}

/// `POST /v1/fences/{id}/lift` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LiftRequest {
    pub reason: Option<String>,
}

fn to_provider_fence(r: &FenceRecord) -> Fence {
    Fence {
        target: r.target.clone(),
        name: r.name.clone(),
        agent: r.agent.clone(),
        description: r.description.clone(),
        handle: r.handle.clone(),
        expires_at: r.expires_at,
    }
}

impl Broker {
    /// The fences of `provider` standing now.
    async fn standing_records(&self, provider: &str) -> BrokerResult<Vec<FenceRecord>> {
        let standing = FenceFilter {
            provider: Some(provider.to_owned()),
            active: true,
            ..FenceFilter::default()
        };
        Ok(self.store.list_fences(&standing).await?)
    }

    /// The fences of `provider` standing now, as the provider sees them.
    async fn standing_fences(&self, provider: &str) -> BrokerResult<Vec<Fence>> {
        Ok(self
            .standing_records(provider)
            .await?
            .iter()
            .map(to_provider_fence)
            .collect())
    }

    /// Asks every provider holding live leases that `selector` hits to fence
    /// them, then records and audits what each did.
    pub(super) async fn put_up_fences(
        &self,
        actor: &Actor,
        revocation_id: &str,
        selector: &Selector,
        revoke_older_sessions: bool,
        at: OffsetDateTime,
    ) -> BrokerResult<FenceResults> {
        let mut out = FenceResults::default();
        if !self.registry.providers().any(|(_, p)| p.puts_up_fences()) {
            // Nothing configured can fence: no need to read every lease
            // hit (100,000 of them took 2 s before the kill switch answered).
            return Ok(out);
        }
        let leases = self.store.live_leases(selector).await?;
        let _one_at_a_time = self.fences_changing.lock().await;
        let _across_replicas = self.store.hold_fences().await?;
        for (provider, targets) in self.fence_targets(leases) {
            let req = FenceRequest {
                revocation_id: revocation_id.to_owned(),
                targets,
                revoke_older_sessions,
                issued_before: at,
                sessions_only: false,
                // A policy of a name some fence already holds keeps what
                // it denies (another kill switch's later cut-off, put up
                // first, is not written over with this one's earlier one).
                standing: self.standing_fences(&provider).await?,
            };
            self.fence_one(&provider, req, &mut out).await;
        }
        self.record_fences(actor, revocation_id, &out).await?;
        Ok(out)
    }

    /// After a policy change, an exclusion or a suspension queued `leases`
    /// for revocation: where the provider cannot revoke them one by one,
    /// fences exactly their sessions, under `cause` (`policy-<hash>`,
    /// `exclusion`, `agent-suspended`, …; stored as the fence's
    /// `revocation_id`). Such fences lift themselves once those sessions
    /// have expired ([`Self::lift_moot_fences`]). A failure is logged and
    /// audited (`fence.failed`); the revocation itself stands.
    pub(crate) async fn fence_sessions(&self, actor: &Actor, cause: &str, leases: &[String]) {
        if let Err(e) = self.try_fence_sessions(actor, cause, leases).await {
            tracing::error!(cause, error = %e, "fencing the sessions a policy change revoked failed");
        }
    }

    /// [`Self::fence_sessions`], saying what it could not fence.
    async fn try_fence_sessions(
        &self,
        actor: &Actor,
        cause: &str,
        leases: &[String],
    ) -> BrokerResult<Vec<FenceFailure>> {
        if !self.registry.providers().any(|(_, p)| p.puts_up_fences()) {
            // Nothing configured can fence: no lease to read.
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for id in leases {
            found.extend(self.store.get_lease(id).await?);
        }
        let mut out = FenceResults::default();
        let _one_at_a_time = self.fences_changing.lock().await;
        let _across_replicas = self.store.hold_fences().await?;
        for (provider, targets) in self.fence_targets(found) {
            let req = FenceRequest {
                revocation_id: cause.to_owned(),
                targets,
                revoke_older_sessions: false,
                issued_before: now(),
                sessions_only: true,
                standing: self.standing_fences(&provider).await?,
            };
            self.fence_one(&provider, req, &mut out).await;
        }
        if !out.fences.is_empty() || !out.failures.is_empty() {
            self.record_fences(actor, cause, &out).await?;
        }
        Ok(out.failures)
    }

    /// Lifts the fences whose every denied session has expired (a policy
    /// change's), as `keygate`; the server calls it every tenth reaper pass
    /// (20 s by default, at most a minute). One that
    /// cannot be lifted stays listed (`fences list --active`, its
    /// `expires_at` past) and is tried again.
    pub async fn lift_moot_fences(&self) -> BrokerResult<usize> {
        let moot = FenceFilter {
            active: true,
            moot_at: Some(now()),
            ..FenceFilter::default()
        };
        let mut lifted = 0;
        for fence in self.store.list_fences(&moot).await? {
            let reason = "every session it denied has expired";
            match self.take_down(&fence, &Actor::System, reason).await {
                Ok(_) => lifted += 1,
                Err(e) => {
                    tracing::error!(fence = %fence.id, error = %e, "lifting a moot fence failed")
                }
            }
        }
        Ok(lifted)
    }

    /// `leases` as fence targets, by provider.
    fn fence_targets(&self, leases: Vec<Lease>) -> BTreeMap<String, Vec<FenceTarget>> {
        let mut by_provider: BTreeMap<String, Vec<FenceTarget>> = BTreeMap::new();
        for lease in leases {
            let scope = self.registry.scope_or_removed(&lease.scope);
            by_provider
                .entry(lease.provider.clone())
                .or_default()
                .push(FenceTarget {
                    lease_id: lease.id,
                    agent_id: lease.agent_id,
                    scope,
                    handle: lease.handle.map(RevokeHandle),
                    task_id: lease.task_id,
                    expires_at: lease.expires_at,
                });
        }
        by_provider
    }

    /// Stores the fences put up and audits them and the failures, together.
    async fn record_fences(
        &self,
        actor: &Actor,
        revocation_id: &str,
        out: &FenceResults,
    ) -> BrokerResult<()> {
        let mut tx = self.store.begin().await?;
        for f in &out.fences {
            tx.insert_fence(f).await?;
            tx.audit(
                AuditEvent::new(actor, "fence.applied").details(serde_json::json!({
                    "revocation_id": revocation_id, "fence": f,
                })),
            )
            .await?;
        }
        if !out.failures.is_empty() {
            tx.add_fence_failures(revocation_id, &out.failures).await?;
        }
        for f in &out.failures {
            tx.audit(
                AuditEvent::new(actor, "fence.failed")
                    .failure(f.error.clone())
                    .details(serde_json::json!({ "revocation_id": revocation_id, "fence": f })),
            )
            .await?;
        }
        Ok(tx.commit().await?)
    }

    async fn fence_one(&self, provider: &str, req: FenceRequest, out: &mut FenceResults) {
        let failure = |target: Option<&Fence>, error: String| FenceFailure {
            provider: provider.to_owned(),
            target: target.map(|f| f.target.clone()),
            name: target.map(|f| f.name.clone()),
            agent: target.and_then(|f| f.agent.clone()),
            error,
        };
        let Some(p) = self.registry.provider(provider) else {
            out.failures.push(failure(
                None,
                format!("provider `{provider}` is not configured"),
            ));
            return;
        };
        let timeout = Duration::from_secs(self.config.leases.issue_timeout_secs);
        let fenced = match tokio::time::timeout(timeout, p.fence(&req)).await {
            Ok(Ok(fenced)) => fenced,
            Ok(Err(e)) => {
                out.failures.push(failure(None, e.to_string()));
                return;
            }
            Err(_) => {
                let msg = format!("no answer within {}s", timeout.as_secs());
                out.failures.push(failure(None, msg));
                return;
            }
        };
        let record = |f: Fence| FenceRecord {
            id: new_id("fn"),
            revocation_id: req.revocation_id.clone(),
            provider: provider.to_owned(),
            target: f.target,
            name: f.name,
            agent: f.agent,
            description: f.description,
            handle: f.handle,
            created_at: now(),
            lifted_at: None,
            lifted_by: None,
            lift_reason: None,
            expires_at: f.expires_at,
        };
        out.fences.extend(fenced.fences.into_iter().map(record));
        for (f, e) in fenced.failed {
            tracing::error!(provider, target = %f.target, fence = %f.name, error = %e, "fence not put up");
            out.failures.push(failure(Some(&f), e.to_string()));
        }
    }

    /// Fences, for operators.
    pub async fn fences(&self, filter: &FenceFilter) -> BrokerResult<Vec<FenceRecord>> {
        Ok(self.store.list_fences(filter).await?)
    }

    /// Takes a standing fence down at its provider, then records who lifted
    /// it and why.
    pub async fn lift_fence(
        &self,
        operator: &str,
        id: &str,
        req: LiftRequest,
    ) -> BrokerResult<FenceRecord> {
        let reason = super::required_reason(req.reason.as_deref())?;
        let fence = self
            .store
            .get_fence(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no fence `{id}`")))?;
        if fence.lifted_at.is_some() {
            return Err(BrokerError::Conflict(format!(
                "fence `{id}` was lifted already"
            )));
        }
        let actor = Actor::Operator(operator.to_owned());
        // An agent's fence stands until lifted and denies every session of
        // the agent, those the kill switch ended included (their backend
        // cannot end them: their leases are `expiring`). Lifted to let the
        // agent work again, it must not give those back: they are fenced
        // one by one first, by fences that lift themselves once they have
        // expired; if that fails, the fence stays.
        if fence.agent.is_some() && fence.expires_at.is_none() {
            let agent = Selector::Agent(fence.agent.clone().unwrap_or_default());
            let ended: Vec<String> = self
                .store
                .live_leases(&agent)
                .await?
                .into_iter()
                .filter(|l| {
                    l.provider == fence.provider
                        && matches!(l.state, LeaseState::Revoking | LeaseState::Expiring)
                })
                .map(|l| l.id)
                .collect();
            if !ended.is_empty() {
                let failed = self
                    .try_fence_sessions(&actor, &fence.revocation_id, &ended)
                    .await?;
                if let Some(f) = failed.first() {
                    return Err(BrokerError::Provider(format!(
                        "fence `{id}` stays: the sessions it denies that were ended could not be fenced one by one first ({}), and lifting it would let them work again until they expire",
                        f.error
                    )));
                }
            }
        }
        self.take_down(&fence, &actor, &reason).await
    }

    /// Takes `fence` down at its provider (keeping its standing twins in
    /// force) and records who lifted it (`keygate` for the broker).
    async fn take_down(
        &self,
        fence: &FenceRecord,
        actor: &Actor,
        reason: &str,
    ) -> BrokerResult<FenceRecord> {
        let id = fence.id.as_str();
        let by = match actor {
            Actor::Operator(name) => name.clone(),
            _ => "keygate".to_owned(),
        };
        let provider = self.registry.provider(&fence.provider).ok_or_else(|| {
            BrokerError::Provider(format!("provider `{}` is not configured", fence.provider))
        })?;
        // From reading the twins still standing to recording the lift, no
        // fence goes up: one of this name put up meanwhile would be deleted
        // with the policy while recorded as standing.
        let _one_at_a_time = self.fences_changing.lock().await;
        let _across_replicas = self.store.hold_fences().await?;
        let lift = LiftFenceRequest {
            fence: to_provider_fence(fence),
            remaining: self.standing_twins(fence).await?,
        };
        let event = AuditEvent::new(actor, "fence.lifted").reason(reason.to_owned());
        let timeout = Duration::from_secs(self.config.leases.issue_timeout_secs);
        let lifted = match tokio::time::timeout(timeout, provider.lift_fence(&lift)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
        };
        if let Err(msg) = lifted {
            // An operator's failed lift is audited; the broker's own retries
            // of a moot fence (harmless while it stands) are only logged,
            // so a backend that stays down cannot fill the audit log.
            if !matches!(actor, Actor::System) {
                self.audit_alone(
                    event
                        .failure(msg.clone())
                        .details(serde_json::json!({ "fence": fence })),
                )
                .await?;
            }
            return Err(BrokerError::Provider(msg));
        }
        let t = now();
        let mut tx = self.store.begin().await?;
        tx.lift_fence(id, &by, reason, t).await?;
        tx.audit(event.details(serde_json::json!({ "fence": fence })))
            .await?;
        tx.commit().await?;
        self.store
            .get_fence(id)
            .await?
            .ok_or_else(|| BrokerError::Internal(format!("fence `{id}` vanished")))
    }

    /// Other standing fences of the same provider, target and name (put up
    /// by other revocations), which lifting `fence` must keep in force.
    async fn standing_twins(&self, fence: &FenceRecord) -> BrokerResult<Vec<Fence>> {
        Ok(self
            .standing_records(&fence.provider)
            .await?
            .iter()
            .filter(|f| f.id != fence.id && f.target == fence.target && f.name == fence.name)
            .map(to_provider_fence)
            .collect())
    }
}
