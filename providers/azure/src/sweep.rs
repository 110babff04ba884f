//! The sweeper: removes Keygate-named app passwords that no live lease
//! accounts for (an issue that crashed or timed out after `addPassword`, a
//! removal that raced an issue) or that have expired. Passwords named
//! otherwise are never touched.

use std::collections::BTreeSet;

use keygate_provider_api::{LeaseLookup, ProviderError, ScopeSpec, Sweep, Swept};
use serde_json::json;
use time::OffsetDateTime;

use crate::AzureProvider;
use crate::app_password::parse_name;
use crate::graph::Removal;
use crate::scope::{self, ScopeKind};

impl AzureProvider {
    /// Sweeps every application an `app_password` scope names.
    pub(crate) async fn sweep_apps(&self, scopes: &[ScopeSpec], leases: &dyn LeaseLookup) -> Sweep {
        let apps: BTreeSet<String> = scopes
            .iter()
            .filter_map(|s| match scope::parse(&s.params) {
                Ok(ScopeKind::AppPassword(p)) => Some(p.application_object_id),
                _ => None,
            })
            .collect();
        let mut sweep = Sweep::default();
        for app in apps {
            if let Err(e) = self.sweep_app(&app, leases, &mut sweep).await {
                sweep.errors.push(e);
            }
        }
        sweep
    }

    /// Lists the app's passwords first and asks which leases are live
    /// second: a lease row is written before its `addPassword`, so every
    /// password listed here already has its lease visible.
    async fn sweep_app(
        &self,
        app: &str,
        leases: &dyn LeaseLookup,
        sweep: &mut Sweep,
    ) -> Result<(), ProviderError> {
        let listed = self.graph.passwords(app).await?;
        let ours: Vec<_> = listed
            .iter()
            .filter_map(|p| Some((p, parse_name(p.display_name.as_deref()?)?)))
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = ours.iter().map(|(_, n)| n.lease_id.to_owned()).collect();
        let live = leases.live(&ids).await?;
        let now = OffsetDateTime::now_utc();
        for (p, name) in ours {
            let reason = if p.end.is_some_and(|end| end <= now) {
                "it expired"
            } else if !live.contains(name.lease_id) {
                "its lease is not live (an issue that did not complete, or a removal that missed it)"
            } else {
                continue;
            };
            match self.graph.remove_password(app, &p.key_id).await {
                Ok(Removal::Removed) => {
                    tracing::info!(application = %app, key_id = %p.key_id, lease_id = %name.lease_id, reason, "swept an app password");
                    sweep.removed.push(Swept {
                        lease_id: Some(name.lease_id.to_owned()),
                        description: format!("app password `{}` of application `{app}`", p.key_id),
                        reason: reason.to_owned(),
                        details: json!({
                            "application_object_id": app,
                            "key_id": p.key_id,
                            "display_name": p.display_name,
                            "agent": name.agent,
                            "task": name.task,
                            "end_date_time": p.end.map(|t| t.unix_timestamp()),
                        }),
                    });
                }
                // Removed meanwhile (by a revocation): nothing to report.
                Ok(Removal::NotFound) => {}
                Err(e) => sweep.errors.push(e),
            }
        }
        Ok(())
    }
}
