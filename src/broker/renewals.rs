//! Renewing a lease: extend a live credential where its backend allows it,
//! never past the scope's `max_ttl` (counted from the lease's creation) or
//! the task's expiry.

use std::time::Duration;

use keygate_provider_api::{ProviderError, RenewRequest, RevokeHandle};
use serde::Serialize;
use time::OffsetDateTime;

use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::model::{LeaseState, from_unix, now, unix};

/// The outcome of a renewal.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RenewedLease {
    pub lease_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The latest expiry any renewal can reach (scope `max_ttl`, the agent's
    /// `max_ttl_secs`, task expiry).
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
}

impl Broker {
    /// Extends one active lease of the session's task by `increment` seconds
    /// from now, capped as above.
    pub async fn renew(
        &self,
        s: &Session,
        lease_id: &str,
        increment: u64,
    ) -> BrokerResult<RenewedLease> {
        if increment == 0 {
            return Err(BrokerError::InvalidRequest(
                "`increment` must be positive".into(),
            ));
        }
        let lease = self.task_lease(s, lease_id).await?;
        if lease.state != LeaseState::Active {
            return Err(BrokerError::Conflict(format!(
                "lease `{lease_id}` is {}, not active",
                lease.state
            )));
        }
        let (provider, spec) = self
            .registry
            .provider(&lease.provider)
            .zip(self.registry.scope(&lease.scope))
            .ok_or_else(|| {
                BrokerError::NotRenewable(format!(
                    "scope `{}` is no longer configured; it cannot be renewed",
                    lease.scope
                ))
            })?;
        let handle = lease.handle.clone().ok_or_else(|| {
            BrokerError::Internal(format!("active lease `{lease_id}` has no handle"))
        })?;
        let max_ttl = time::Duration::seconds(s.agent.cap_ttl(spec.max_ttl.as_secs()) as i64);
        let not_after = (lease.created_at + max_ttl).min(s.task.expires_at);
        let t = now();
        if lease.expires_at <= t {
            return Err(BrokerError::Conflict(format!(
                "lease `{lease_id}` has expired; request a new credential"
            )));
        }
        if not_after <= t + time::Duration::seconds(1) {
            return Err(BrokerError::NotRenewable(format!(
                "lease `{lease_id}` has reached its limit (scope `max_ttl`, the agent's `max_ttl_secs` or the task's expiry)"
            )));
        }
        let req = RenewRequest {
            lease_id: lease.id.clone(),
            scope: spec.clone(),
            handle: RevokeHandle(handle),
            increment: Duration::from_secs(increment),
            not_after,
        };
        let timeout = Duration::from_secs(self.config.leases.issue_timeout_secs);
        let renewed = match tokio::time::timeout(timeout, provider.renew(&req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(ProviderError::Unsupported(what))) => {
                return Err(BrokerError::NotRenewable(format!(
                    "scope `{}` ({} provider `{}`) does not support {what}; request a new credential instead",
                    lease.scope,
                    provider.kind(),
                    lease.provider
                )));
            }
            Ok(Err(ProviderError::InvalidParams(m))) => return Err(BrokerError::InvalidRequest(m)),
            Ok(Err(e)) => return Err(BrokerError::Provider(e.to_string())),
            Err(_) => {
                return Err(BrokerError::Provider(format!(
                    "the provider did not answer within {}s",
                    timeout.as_secs()
                )));
            }
        };
        // Whole seconds, rounded down, and never past the cap.
        let expires_at = from_unix(unix(renewed.expires_at.min(not_after)));
        let actor = Actor::Agent(s.agent.id.clone());
        let mut tx = self.store.begin().await?;
        if !tx.renew_lease(&lease.id, expires_at).await? {
            // The backend extended a credential whose lease ended meanwhile.
            // Revoked or queued, the revocation kills it; marked expired by
            // the reaper (which revokes nothing), the extension would
            // outlive its lease: it is queued for revocation instead.
            let reason = "expired while it was being renewed: the extension is revoked";
            if tx.revoke_expired(&lease.id, reason, now()).await? {
                tx.audit(
                    AuditEvent::new(&actor, "lease.renewal_revoked")
                        .about_lease(&lease)
                        .reason(reason.to_owned()),
                )
                .await?;
                tx.commit().await?;
                self.leases.wake();
            }
            return Err(BrokerError::Conflict(format!(
                "lease `{lease_id}` ended while it was being renewed; request a new credential"
            )));
        }
        tx.audit(
            AuditEvent::new(&actor, "lease.renewed")
                .about_lease(&lease)
                .details(serde_json::json!({
                    "increment": increment,
                    "previous_expires_at": unix(lease.expires_at),
                    "expires_at": unix(expires_at),
                    "not_after": unix(not_after),
                })),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(lease = %lease.id, expires_at = unix(expires_at), "lease renewed");
        self.observe(
            &s.agent.id,
            crate::validation::Observation::Renewed { source: s.source },
        )
        .await;
        Ok(RenewedLease {
            lease_id: lease.id,
            expires_at,
            not_after,
        })
    }
}
