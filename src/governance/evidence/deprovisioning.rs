//! Item 5 of the evidence pack: deprovisioning records. An agent retired
//! (decommissioned) must have every credential confirmed ended — revoked,
//! expired, or fenced at a provider that cannot revoke it — and an agent
//! whose team or sponsor changed must be reviewed by its new owner, each
//! within its lifecycle's `deprovision_within_hours`. Each record says
//! whether that was met.

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::{Summary, opt, ts};
use crate::broker::{Broker, BrokerResult};
use crate::config::lifecycle;
use crate::model::{FenceFilter, LeaseFilter, LeaseState, from_unix};

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeprovisioningRecord {
    pub agent: String,
    /// `retired` (decommissioned) or `ownership_change` (team or sponsor
    /// changed).
    pub kind: String,
    pub at: String,
    pub by: String,
    /// The reason given, or what changed (`team a -> b`).
    pub trigger: String,
    /// `deprovision_within_hours` after `at`.
    pub deadline: String,
    /// Retired: the credentials it was ever issued (none for an ownership
    /// change).
    pub credentials: Option<usize>,
    /// Retired: those confirmed revoked or expired.
    pub credentials_ended: Option<usize>,
    /// Retired: those the backend cannot revoke that are fenced there (an
    /// AWS deny policy on their sessions) until they expire.
    pub credentials_fenced: Option<usize>,
    /// Retired: every credential confirmed ended or fenced.
    pub fully_revoked: Option<bool>,
    /// When it was done: the last credential confirmed ended or fenced, or
    /// the first review after the change; empty if not (yet).
    pub done_at: String,
    pub within_deadline: bool,
}

fn hours(n: u32) -> Duration {
    Duration::hours(i64::from(n))
}

impl Broker {
    /// The deprovisioning records of `[from, to)`, counted into `summary`.
    pub(super) async fn deprovisioning(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        summary: &mut Summary,
    ) -> BrokerResult<Vec<DeprovisioningRecord>> {
        let mut out = Vec::new();
        for e in self.events("agent.decommissioned", None, from, to).await? {
            let Some(id) = e.agent.clone() else { continue };
            let Some(agent) = self.store.get_agent(&id).await? else {
                continue;
            };
            let at = from_unix(e.at_ms / 1000);
            let within =
                lifecycle::effective(&self.config.lifecycle, &agent).deprovision_within_hours;
            let deadline = at + hours(within);
            let leases = self
                .store
                .list_leases(&LeaseFilter {
                    agent: Some(id.clone()),
                    ..LeaseFilter::default()
                })
                .await?;
            let issued: Vec<_> = leases
                .iter()
                .filter(|l| l.state != LeaseState::Failed)
                .collect();
            let ended: Vec<_> = issued
                .iter()
                .filter(|l| matches!(l.state, LeaseState::Revoked | LeaseState::Expired))
                .collect();
            // Sessions the backend cannot revoke, fenced when the agent left.
            let fences: Vec<_> = self
                .store
                .list_fences(&FenceFilter {
                    revocation: Some("agent-decommissioned".into()),
                    ..FenceFilter::default()
                })
                .await?
                .into_iter()
                .filter(|f| f.agent.as_deref() == Some(id.as_str()) && f.created_at >= at)
                .collect();
            let fenced: Vec<_> = issued
                .iter()
                .filter(|l| {
                    l.state == LeaseState::Expiring
                        && fences.iter().any(|f| f.provider == l.provider)
                })
                .collect();
            let fully = ended.len() + fenced.len() == issued.len();
            let done_at = fully.then(|| {
                let last_end = ended.iter().filter_map(|l| l.ended_at).max();
                let last_fence = (!fenced.is_empty())
                    .then(|| fences.iter().map(|f| f.created_at).max())
                    .flatten();
                last_end.max(last_fence).unwrap_or(at).max(at)
            });
            let in_time = done_at.is_some_and(|d| d <= deadline);
            summary.deprovisioned += 1;
            summary.deprovisioned_fully_revoked += usize::from(fully);
            summary.deprovisioned_within_deadline += usize::from(in_time);
            out.push(DeprovisioningRecord {
                agent: id,
                kind: "retired".into(),
                at: ts(at),
                by: e.actor.clone(),
                trigger: e.reason.clone().unwrap_or_default(),
                deadline: ts(deadline),
                credentials: Some(issued.len()),
                credentials_ended: Some(ended.len()),
                credentials_fenced: Some(fenced.len()),
                fully_revoked: Some(fully),
                done_at: opt(done_at),
                within_deadline: in_time,
            });
        }
        for e in self.events("agent.updated", None, from, to).await? {
            let (Some(id), Some(change)) = (e.agent.clone(), e.details["ownership"].as_object())
            else {
                continue;
            };
            let Some(agent) = self.store.get_agent(&id).await? else {
                continue;
            };
            let at = from_unix(e.at_ms / 1000);
            let within =
                lifecycle::effective(&self.config.lifecycle, &agent).deprovision_within_hours;
            let deadline = at + hours(within);
            let trigger = change
                .iter()
                .map(|(what, v)| {
                    let s = |i: usize| v[i].as_str().unwrap_or_default().to_owned();
                    format!("{what} {} -> {}", s(0), s(1))
                })
                .collect::<Vec<_>>()
                .join("; ");
            let done_at = self.reviewed_after(&id, at).await?;
            let in_time = done_at.is_some_and(|d| d <= deadline);
            summary.ownership_changes += 1;
            summary.ownership_changes_reviewed_in_time += usize::from(in_time);
            out.push(DeprovisioningRecord {
                agent: id,
                kind: "ownership_change".into(),
                at: ts(at),
                by: e.actor.clone(),
                trigger,
                deadline: ts(deadline),
                credentials: None,
                credentials_ended: None,
                credentials_fenced: None,
                fully_revoked: None,
                done_at: opt(done_at),
                within_deadline: in_time,
            });
        }
        Ok(out)
    }

    /// The first review of `agent` at or after `t`, from the audit log: a
    /// campaign item attested, narrowed or retired, an admin recording a
    /// review (`last_review_at` in an update), or the agent decommissioned
    /// (the change is answered: nobody uses it any more).
    async fn reviewed_after(
        &self,
        agent: &str,
        t: OffsetDateTime,
    ) -> BrokerResult<Option<OffsetDateTime>> {
        let until = crate::model::now() + Duration::days(1);
        let mut first: Option<OffsetDateTime> = None;
        for action in [
            "review.attested",
            "review.narrowed",
            "review.retired",
            "agent.updated",
            "agent.decommissioned",
        ] {
            for e in self.events(action, Some(agent), t, until).await? {
                if action == "agent.updated" && e.details["update"]["last_review_at"].is_null() {
                    continue;
                }
                let at = from_unix(e.at_ms / 1000);
                first = Some(first.map_or(at, |f| f.min(at)));
            }
        }
        Ok(first)
    }
}
