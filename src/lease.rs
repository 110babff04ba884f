//! The lease engine's background half: the durable revocation queue, the
//! reaper, and the providers' sweepers (`sweep.rs`). All resume from the
//! store after a restart.
//!
//! The queue is the set of leases in state `revoking`. A worker takes due
//! ones, calls the provider (at most `revoke_concurrency` at once per
//! provider instance), and either records the confirmation or the error and
//! the next attempt time (exponential backoff). A lease is never marked
//! revoked without its provider's confirmation, and never dropped.

mod sweep;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use keygate_provider_api::{RevokeHandle, RevokeOutcome, RevokeRequest};
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::audit::{Actor, AuditEvent};
use crate::config::LeaseConfig;
use crate::metrics::Metrics;
use crate::model::{Lease, LeaseState, Revocability, TaskState, now};
use crate::providers::Registry;
use crate::store::{LeaseSelector, Store, StoreResult, TaskSelector};

/// Expired leases the reaper reads and judges at a time.
const EXPIRED_PAGE: u32 = 5_000;

/// Wakes the revocation worker; cheap to clone into request handlers.
#[derive(Debug, Clone)]
pub struct LeaseEngine {
    wake: Arc<Notify>,
    /// This process: every lease it writes carries it, so a pending lease
    /// of a dead boot is known at once to be an orphan (SQLite: any other
    /// boot; PostgreSQL: a replica whose liveness lock is gone).
    boot_id: Arc<str>,
}

impl Default for LeaseEngine {
    fn default() -> Self {
        Self {
            wake: Arc::new(Notify::new()),
            boot_id: crate::model::new_id("boot").into(),
        }
    }
}

/// What the background loops need.
pub struct Worker {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub config: LeaseConfig,
    pub metrics: Arc<Metrics>,
    pub engine: LeaseEngine,
}

impl LeaseEngine {
    /// Asks the worker to look at the queue now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The id of this process, written on every lease it creates.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Claims the periodic job `name` for this process for `hold` (renewed
    /// by each run): whether to run it now. With one process, always.
    pub async fn claim_job(
        &self,
        store: &dyn Store,
        name: &str,
        hold: Duration,
    ) -> StoreResult<bool> {
        let until = now() + hold;
        let until_ms = i64::try_from(until.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        store.claim_job(name, self.boot_id(), until_ms).await
    }

    /// Pending leases of this process (or of another live replica) created
    /// before this instant are orphans: the provider call cannot still be in
    /// flight. (Those of a dead process are orphans whatever their age.)
    fn orphan_cutoff(&self, cfg: &LeaseConfig, t: OffsetDateTime) -> OffsetDateTime {
        t - Duration::from_secs(cfg.issue_timeout_secs + 5)
    }
}

impl Worker {
    /// Runs the revocation queue until the process ends.
    pub async fn run_queue(self: Arc<Self>) {
        let mut limits: BTreeMap<String, Arc<Semaphore>> = BTreeMap::new();
        for (name, provider) in self.registry.providers() {
            // The broker's limit, narrowed by the instance's own (e.g. a
            // Vault server that must not be flooded by a mass revocation).
            let limit = provider
                .revoke_concurrency()
                .map_or(self.config.revoke_concurrency, |n| {
                    n.min(self.config.revoke_concurrency)
                })
                .max(1);
            limits.insert(name.to_owned(), Arc::new(Semaphore::new(limit)));
        }
        let limits = Arc::new(limits);
        loop {
            match Arc::clone(&self).drain(&limits).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "revocation queue pass failed"),
            }
            tokio::select! {
                _ = self.engine.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One pass over due leases. Returns whether more may be due at once.
    async fn drain(
        self: Arc<Self>,
        limits: &Arc<BTreeMap<String, Arc<Semaphore>>>,
    ) -> StoreResult<bool> {
        const BATCH: u32 = 512;
        let t = now();
        // Claimed past the provider call's own timeout: another replica
        // takes a lease over only once this one is dead or gave up on it.
        let claim_until = t + Duration::from_secs(self.config.issue_timeout_secs + 30);
        let due = self
            .store
            .claim_revocations(
                t,
                self.engine.orphan_cutoff(&self.config, t),
                self.engine.boot_id(),
                claim_until,
                BATCH,
            )
            .await?;
        let full = due.len() as u32 == BATCH;
        let mut set = tokio::task::JoinSet::new();
        for lease in due {
            let limit = limits.get(&lease.provider).cloned();
            let me = Arc::clone(&self);
            set.spawn(async move {
                let _permit = match &limit {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let outcome = me.call_provider(&lease).await;
                (lease, outcome)
            });
        }
        // Outcomes are recorded as they come, up to RECORD at a time in one
        // transaction: a mass revocation is bound by its providers, not by
        // a commit per lease.
        const RECORD: usize = 256;
        let mut done = Vec::with_capacity(RECORD);
        let take = |r: Result<_, tokio::task::JoinError>, done: &mut Vec<_>| match r {
            Ok(outcome) => done.push(outcome),
            Err(e) => tracing::error!(error = %e, "revocation task failed"),
        };
        while let Some(r) = set.join_next().await {
            take(r, &mut done);
            while done.len() < RECORD
                && let Some(r) = set.try_join_next()
            {
                take(r, &mut done);
            }
            if !done.is_empty()
                && let Err(e) = self.record(std::mem::take(&mut done)).await
            {
                // The leases stay `revoking` and are retried; revoking twice
                // is harmless (already gone counts as revoked).
                tracing::error!(error = %e, "recording revocations failed");
            }
        }
        Ok(full)
    }

    /// Asks the lease's provider to revoke it.
    async fn call_provider(&self, lease: &Lease) -> Result<RevokeOutcome, String> {
        match self.registry.provider(&lease.provider) {
            None => Err(format!("provider `{}` is not configured", lease.provider)),
            Some(p) => {
                let scope = self.registry.scope_or_removed(&lease.scope);
                let req = RevokeRequest {
                    lease_id: lease.id.clone(),
                    scope,
                    handle: lease.handle.clone().map(RevokeHandle),
                    expires_at: lease.expires_at,
                };
                let timeout = Duration::from_secs(self.config.issue_timeout_secs);
                match tokio::time::timeout(timeout, p.revoke(&req)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
                }
            }
        }
    }

    /// Records providers' answers: confirmations end their leases, errors
    /// schedule the next attempt. One transaction for the lot, and one
    /// statement for every plain confirmation in it.
    async fn record(
        &self,
        outcomes: Vec<(Lease, Result<RevokeOutcome, String>)>,
    ) -> StoreResult<()> {
        let t = now();
        let mut tx = self.store.begin().await?;
        let mut confirmed = Vec::new();
        let mut others = Vec::new();
        for (lease, outcome) in outcomes {
            match outcome {
                Ok(RevokeOutcome::LivesUntil(until)) => others.push((lease, Ok(until))),
                Ok(o) => {
                    let detail = confirmation(&lease, &o);
                    confirmed.push((lease, detail));
                }
                Err(msg) => others.push((lease, Err(msg))),
            }
        }
        let ids: Vec<String> = confirmed.iter().map(|(l, _)| l.id.clone()).collect();
        let ended: std::collections::HashSet<String> = tx
            .finish_revocations(&ids, LeaseState::Revoked, t)
            .await?
            .into_iter()
            .collect();
        for (lease, detail) in confirmed {
            self.metrics.revocation("confirmed");
            // A lease another pass ended first is not recorded twice.
            if ended.contains(&lease.id) {
                let reason = lease.end_reason.clone().unwrap_or_default();
                let details = serde_json::json!({ "result": detail, "state": LeaseState::Revoked });
                tx.audit(
                    AuditEvent::new(&Actor::System, "lease.revoked")
                        .about_lease(&lease)
                        .reason(reason)
                        .details(details),
                )
                .await?;
            }
        }
        for (lease, outcome) in others {
            let ev = AuditEvent::new(&Actor::System, "lease.revoked").about_lease(&lease);
            match outcome {
                Ok(until) => {
                    self.metrics.revocation("confirmed");
                    let state = LeaseState::Expiring;
                    if tx
                        .finish_revocation(&lease.id, state, Some(until), t)
                        .await?
                    {
                        let reason = lease.end_reason.clone().unwrap_or_default();
                        let details = serde_json::json!({
                            "result": format!(
                                "the backend cannot revoke it; it lives until {}",
                                crate::model::unix(until)
                            ),
                            "state": state,
                            "expires_at": crate::model::unix(until),
                        });
                        tx.audit(ev.reason(reason).details(details)).await?;
                    }
                }
                Err(msg) => {
                    self.metrics.revocation("failed");
                    let next = t + self.backoff(lease.attempts);
                    tracing::warn!(lease = %lease.id, attempts = lease.attempts + 1, error = %msg, "revocation failed; will retry");
                    tx.revocation_failed(&lease.id, &msg, next).await?;
                    tx.audit(ev.failure(msg).details(serde_json::json!({
                        "attempt": lease.attempts + 1,
                        "next_attempt_at": crate::model::unix(next),
                    })))
                    .await?;
                }
            }
        }
        tx.commit().await
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self.config.revoke_backoff_base_ms.max(1);
        let ms = base.saturating_mul(1u64 << attempts.min(20));
        Duration::from_millis(ms).min(Duration::from_secs(self.config.revoke_backoff_max_secs))
    }

    /// Runs the reaper until the process ends.
    pub async fn run_reaper(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.reaper_interval_secs.max(1));
        loop {
            if let Err(e) = self.reap_once().await {
                tracing::error!(error = %e, "reaper pass failed");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// One reaper pass: orphans, expired tasks, expired leases, old jtis —
    /// unless another live replica is the reaper now.
    pub async fn reap_once(&self) -> StoreResult<()> {
        let every = self.config.reaper_interval_secs.max(1);
        if !self
            .engine
            .claim_job(
                self.store.as_ref(),
                "reaper",
                Duration::from_secs(3 * every),
            )
            .await?
        {
            return Ok(());
        }
        let t = now();
        // Read before the pass's transaction, a page at a time (a restart
        // after a long stop may find a million): each is judged from its
        // handle, and queued only if still active and past expiry then.
        let mut acting: Vec<String> = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .expired_active_leases(t, after.take(), EXPIRED_PAGE)
                .await?;
            acting.extend(
                page.iter()
                    .filter(|l| self.registry.acts_at_expiry(l))
                    .map(|l| l.id.clone()),
            );
            match page.last() {
                Some(l) if page.len() == EXPIRED_PAGE as usize => {
                    after = Some((crate::model::unix(l.expires_at), l.id.clone()));
                }
                _ => break,
            }
        }
        let mut tx = self.store.begin().await?;
        let orphans = tx
            .queue_orphans(
                self.engine.orphan_cutoff(&self.config, t),
                self.engine.boot_id(),
                t,
            )
            .await?;
        for id in &orphans {
            tx.audit(
                AuditEvent::new(&Actor::System, "lease.orphaned")
                    .lease(id)
                    .reason("the issue did not complete; revoking whatever the provider may have issued"),
            )
            .await?;
        }
        let mut queued = orphans.len();
        for task in tx.expired_tasks(t).await? {
            tx.end_tasks(
                &TaskSelector::Task(task.clone()),
                TaskState::Expired,
                "ttl reached",
                t,
            )
            .await?;
            queued += tx
                .queue_revocations(
                    &LeaseSelector::Task(task.clone()),
                    "task ttl reached",
                    None,
                    t,
                )
                .await?
                .len();
            tx.audit(AuditEvent::new(&Actor::System, "task.expired").task(&task))
                .await?;
        }
        // A lease whose provider must act at its TTL (rotate a secret, end a
        // renewable token), as it was minted, goes through the queue; the
        // rest die by themselves.
        for id in tx.queue_expired(&acting, t).await? {
            tx.audit(
                AuditEvent::new(&Actor::System, "lease.ttl_reached")
                    .lease(&id)
                    .reason("ttl reached; its provider acts at expiry"),
            )
            .await?;
            queued += 1;
        }
        for lease in tx.expire_leases(t).await? {
            tx.audit(AuditEvent::new(&Actor::System, "lease.expired").about_lease(&lease))
                .await?;
        }
        tx.prune_jtis(t).await?;
        tx.commit().await?;
        if queued > 0 {
            self.engine.wake();
        }
        Ok(())
    }
}

/// What a provider's confirmation means for the lease's record.
fn confirmation(lease: &Lease, o: &RevokeOutcome) -> &'static str {
    match o {
        RevokeOutcome::AlreadyGone if lease.revocability == Some(Revocability::NotApplicable) => {
            "nothing to revoke"
        }
        // An orphan (no handle) the provider searched for and did not
        // find: nothing of it exists.
        RevokeOutcome::AlreadyGone if lease.handle.is_none() => {
            "not found at the provider: never issued, or already gone"
        }
        RevokeOutcome::AlreadyGone => "already gone at the provider",
        _ => "revoked",
    }
}
