//! Provider sweepers: once at start and then at each provider's own
//! interval, a provider that leaves named objects at its backend (Azure app
//! passwords) removes those no live lease accounts for. Every removal is
//! audited; a sweep that could not finish is logged and audited, and the
//! next one tries again.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use keygate_provider_api::{LeaseLookup, ProviderError, Sweep};

use super::Worker;
use crate::audit::{Actor, AuditEvent};
use crate::store::{Store, StoreResult};

/// Which leases are live, straight from the store.
struct StoreLeases<'a>(&'a dyn Store);

#[async_trait]
impl LeaseLookup for StoreLeases<'_> {
    async fn live(&self, lease_ids: &[String]) -> Result<BTreeSet<String>, ProviderError> {
        let mut live = BTreeSet::new();
        for id in lease_ids {
            let lease = self.0.get_lease(id).await.map_err(|e| {
                ProviderError::Unavailable(format!("cannot read the broker's leases: {e}"))
            })?;
            if lease.is_some_and(|l| l.state.is_live()) {
                live.insert(id.clone());
            }
        }
        Ok(live)
    }
}

impl Worker {
    /// Starts one sweeper per provider that asks for one.
    pub fn spawn_sweepers(self: &Arc<Self>) {
        for (name, provider) in self.registry.providers() {
            let Some(every) = provider.sweep_interval() else {
                continue;
            };
            let me = Arc::clone(self);
            let name = name.to_owned();
            tokio::spawn(async move {
                let job = format!("sweep:{name}");
                loop {
                    // One replica sweeps a provider; another takes over
                    // when it dies or misses two of its turns.
                    match me
                        .engine
                        .claim_job(me.store.as_ref(), &job, 2 * every)
                        .await
                    {
                        Ok(true) => {
                            if let Err(e) = me.sweep_once(&name).await {
                                tracing::error!(provider = %name, error = %e, "recording a sweep failed");
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(provider = %name, error = %e, "claiming the sweep failed")
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    }

    /// One sweep of one provider instance, audited.
    pub async fn sweep_once(&self, name: &str) -> StoreResult<()> {
        let Some(provider) = self.registry.provider(name) else {
            return Ok(());
        };
        let scopes = self.registry.provider_scopes(name);
        let sweep = provider
            .sweep(scopes, &StoreLeases(self.store.as_ref()))
            .await;
        self.record_sweep(name, sweep).await
    }

    async fn record_sweep(&self, name: &str, sweep: Sweep) -> StoreResult<()> {
        if sweep.removed.is_empty() && sweep.errors.is_empty() {
            return Ok(());
        }
        // Name the lease's agent, task and scope where the store knows the
        // lease (read before the write transaction holds the writer).
        let mut events = Vec::with_capacity(sweep.removed.len());
        for s in &sweep.removed {
            let mut ev = AuditEvent::new(&Actor::System, "provider.swept")
                .reason(s.reason.clone())
                .details(serde_json::json!({
                    "provider": name,
                    "removed": s.description,
                    "backend": s.details,
                }));
            if let Some(id) = &s.lease_id {
                ev = match self.store.get_lease(id).await? {
                    Some(lease) => ev.about_lease(&lease),
                    None => ev.lease(id),
                };
            }
            events.push(ev);
        }
        let mut tx = self.store.begin().await?;
        for ev in events {
            tx.audit(ev).await?;
        }
        if !sweep.errors.is_empty() {
            let errors: Vec<String> = sweep.errors.iter().map(ToString::to_string).collect();
            tracing::warn!(provider = %name, errors = ?errors, "sweep incomplete; the next sweep tries again");
            tx.audit(
                AuditEvent::new(&Actor::System, "provider.sweep_failed")
                    .failure(errors.join("; "))
                    .details(serde_json::json!({ "provider": name })),
            )
            .await?;
        }
        tx.commit().await
    }
}
