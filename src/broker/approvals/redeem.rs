//! Redeeming an approved credential: once, in the task that asked for it,
//! with policy asked again; a provider that does not deliver leaves the
//! approval unspent.

use super::approval_event;
use crate::audit::{Actor, AuditEvent};
use crate::broker::credentials::IssuedCredential;
use crate::broker::{Broker, BrokerError, BrokerResult, Session};
use crate::model::{ApprovalKind, ApprovalState, now};

impl Broker {
    /// Receives an approved credential, once, in the task that asked for it.
    pub async fn redeem_approval(&self, s: &Session, id: &str) -> BrokerResult<IssuedCredential> {
        let actor = Actor::Agent(s.agent.id.clone());
        let result = self.try_redeem(s, id).await;
        if let Err(e) = &result
            && !matches!(e, BrokerError::PolicyDenied { .. })
        {
            self.audit_alone(
                AuditEvent::new(&actor, "approval.redeem")
                    .agent(&s.agent.id)
                    .task(&s.task.id)
                    .details(serde_json::json!({ "approval": id }))
                    .failure(e.to_string()),
            )
            .await?;
        }
        result
    }

    async fn try_redeem(&self, s: &Session, id: &str) -> BrokerResult<IssuedCredential> {
        let a = self
            .store
            .get_approval(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no approval `{id}`")))?;
        if a.kind != ApprovalKind::Credential {
            return Err(BrokerError::InvalidRequest(format!(
                "approval `{id}` is a provisioning approval: there is no credential to redeem"
            )));
        }
        if a.agent_id != s.agent.id || a.task_id.as_deref() != Some(s.task.id.as_str()) {
            return Err(BrokerError::Forbidden(format!(
                "approval `{id}` was granted to another agent or task; only the task that asked may redeem it"
            )));
        }
        match a.state {
            ApprovalState::Approved if a.redeemed_at.is_some() => {
                return Err(BrokerError::Conflict(format!(
                    "approval `{id}` was redeemed already (lease `{}`): an approval yields one credential",
                    a.lease_id.as_deref().unwrap_or("?")
                )));
            }
            ApprovalState::Approved => {}
            ApprovalState::Pending => {
                return Err(BrokerError::Conflict(format!(
                    "approval `{id}` is still pending ({} of {} approvals)",
                    a.approvals().count(),
                    a.required
                )));
            }
            other => {
                return Err(BrokerError::Conflict(format!(
                    "approval `{id}` is {other}: {}",
                    a.end_reason.as_deref().unwrap_or("no credential")
                )));
            }
        }
        let scope_name = a.scope.clone().unwrap_or_default();
        let scope_cfg = self.scope_config(&scope_name)?;
        // A step-up by an incident the approval does not name (on the agent
        // or on any delegator along the chain) began after it was asked:
        // its approvers decided without knowing of it. Asked again, the new
        // approval names every incident.
        let named = a.step_up_incidents();
        if let Some(u) = self
            .step_ups_of(s, scope_cfg.sensitive)
            .await?
            .into_iter()
            .find(|u| !named.contains(&u.incident.as_str()))
        {
            return Err(BrokerError::Conflict(format!(
                "incident `{}` holds a step-up on this agent (or on one that delegated to it) that approval `{id}` was not asked under (its approvers were not told of it): ask again (the new approval names the incident)",
                u.incident
            )));
        }
        let ttl = a.request["ttl"].as_u64().unwrap_or(scope_cfg.max_ttl_secs);
        // Policy is asked again: an approval does not outlive a policy change.
        let decided = self
            .check_policy(
                &self.policy.current(),
                s,
                scope_cfg,
                ttl,
                now(),
                "credential.redeemed",
            )
            .await?
            .details(serde_json::json!({ "ttl": ttl, "approval": id }));
        let minted = self
            .mint(
                s,
                scope_cfg,
                ttl,
                a.request["params"].clone(),
                decided,
                Some(id),
            )
            .await;
        if minted.is_err() {
            // The provider did not deliver: the approval is not spent.
            let mut tx = self.store.begin().await?;
            if tx.release_redemption(id).await? {
                tx.audit(
                    approval_event(&Actor::System, "approval.redemption_released", &a).reason(
                        "the credential was not issued; the approval may be redeemed again",
                    ),
                )
                .await?;
            }
            tx.commit().await?;
        }
        minted
    }
}
