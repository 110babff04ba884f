//! Per-agent usage limits: `[[lifecycle]] max_credentials_per_minute` and
//! `max_live_leases` for the agents a lifecycle policy governs, `[[scopes]]
//! max_live_leases_per_agent` per scope. A refusal is a 429 with
//! `Retry-After` and a `credential.limited` audit event. The rate is
//! counted per replica; live leases are counted in the store, inside the
//! lease's own write-ahead transaction, so concurrent requests cannot both
//! pass.

use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::config::ScopeConfig;
use crate::config::lifecycle::{LifecyclePolicy, effective};
use crate::store::StoreTx;

/// What a live-lease refusal tells the agent to wait: one is released or
/// expires meanwhile, or not; asking again is cheap.
const LIVE_RETRY_SECS: u64 = 5;

impl Broker {
    /// The lifecycle policy governing the agent, when any sets a limit.
    fn usage_policy(&self, s: &Session) -> Option<LifecyclePolicy> {
        self.config
            .lifecycle
            .iter()
            .any(|p| p.max_credentials_per_minute.is_some() || p.max_live_leases.is_some())
            .then(|| effective(&self.config.lifecycle, &s.agent))
    }

    /// The rate part, before anything is written: one more credential this
    /// minute.
    pub(super) async fn check_usage_rate(&self, s: &Session, scope: &str) -> BrokerResult<()> {
        let Some(p) = self.usage_policy(s) else {
            return Ok(());
        };
        let Some(per_minute) = p.max_credentials_per_minute else {
            return Ok(());
        };
        if let Err(l) = self.limits.check_agent_quota(&s.agent.id, per_minute) {
            self.metrics.limited(l.limit);
            let message = format!(
                "agent `{}` may obtain {per_minute} credentials a minute ([[lifecycle]] `{}` max_credentials_per_minute); retry in {} s",
                s.agent.id,
                p.name,
                l.retry_after_secs()
            );
            return Err(self
                .refuse_usage(
                    s,
                    scope,
                    "max_credentials_per_minute",
                    message,
                    l.retry_after_secs(),
                )
                .await);
        }
        Ok(())
    }

    /// The live-lease part, inside the write-ahead transaction before the
    /// lease is inserted: `Some(refusal)` when the agent holds its limit.
    /// Whether a live-lease limit applies to this agent's leases of this
    /// scope (what [`Self::over_live_leases`] counts).
    pub(super) fn limits_live_leases(&self, s: &Session, scope_cfg: &ScopeConfig) -> bool {
        scope_cfg.max_live_leases_per_agent.is_some()
            || self
                .usage_policy(s)
                .is_some_and(|p| p.max_live_leases.is_some())
    }

    pub(super) async fn over_live_leases(
        &self,
        tx: &mut dyn StoreTx,
        s: &Session,
        scope_cfg: &ScopeConfig,
        now: OffsetDateTime,
    ) -> BrokerResult<Option<(&'static str, String)>> {
        if let Some(p) = self.usage_policy(s)
            && let Some(max) = p.max_live_leases
        {
            let n = tx.live_lease_count(&s.agent.id, None, now).await?;
            if n >= u64::from(max) {
                return Ok(Some((
                    "max_live_leases",
                    format!(
                        "agent `{}` holds {n} live credentials, its limit ([[lifecycle]] `{}` max_live_leases = {max}): release one (DELETE /v1/credentials/{{lease_id}}) or let one expire",
                        s.agent.id, p.name
                    ),
                )));
            }
        }
        if let Some(max) = scope_cfg.max_live_leases_per_agent {
            let n = tx
                .live_lease_count(&s.agent.id, Some(&scope_cfg.name), now)
                .await?;
            if n >= u64::from(max) {
                return Ok(Some((
                    "max_live_leases_per_agent",
                    format!(
                        "agent `{}` holds {n} live credentials of scope `{}`, its limit (max_live_leases_per_agent = {max}): release one or let one expire",
                        s.agent.id, scope_cfg.name
                    ),
                )));
            }
        }
        Ok(None)
    }

    /// Audits a usage refusal and makes it the 429 the agent gets.
    pub(super) async fn refuse_usage(
        &self,
        s: &Session,
        scope: &str,
        limit: &str,
        message: String,
        retry_after_secs: u64,
    ) -> BrokerError {
        let ev = AuditEvent::new(&Actor::Agent(s.agent.id.clone()), "credential.limited")
            .agent(&s.agent.id)
            .task(&s.task.id)
            .scope(scope)
            .failure(message.clone())
            .details(serde_json::json!({ "limit": limit }));
        if let Err(e) = self.audit_alone(ev).await {
            return e.into();
        }
        BrokerError::RateLimited {
            message,
            retry_after_secs,
        }
    }

    /// The live-lease refusal, after its transaction is dropped.
    pub(super) async fn refuse_live(
        &self,
        s: &Session,
        scope: &str,
        (limit, message): (&'static str, String),
    ) -> BrokerError {
        self.metrics.limited("usage");
        self.refuse_usage(s, scope, limit, message, LIVE_RETRY_SECS)
            .await
    }
}
