//! Registry exclusions and departures: the two governance changes that take
//! effect without editing config. An exclusion denies an agent one scope
//! whatever the Cedar policies say (a review's `narrow`, `remove_unused`, an
//! admin), revoking what the scope holds, until an admin lifts it. A
//! departure marks a person gone: their agents need a new sponsor, and their
//! operator token stops working.

use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerError, BrokerResult};
use crate::model::{Agent, AgentStatus, Approval, Exclusion, now};
use crate::store::{LeaseSelector, StoreTx};

use super::people::{Departure, Person, normalize};

impl Broker {
    /// Excludes `scope` from `agent_id` and queues its live leases of that
    /// scope for revocation, in one commit. Excluding an excluded scope
    /// changes nothing (`false`).
    pub async fn exclude_scope(
        &self,
        actor: &Actor,
        agent_id: &str,
        scope: &str,
        reason: &str,
    ) -> BrokerResult<bool> {
        if !self.config.scopes.iter().any(|s| s.name == scope) {
            return Err(BrokerError::NotFound(format!(
                "no scope `{}`",
                crate::limits::claimed_label(scope)
            )));
        }
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "an exclusion needs a `reason`".into(),
            ));
        }
        let agent = self.agent(agent_id).await?;
        if agent.status == AgentStatus::Decommissioned {
            return Err(BrokerError::Conflict(format!(
                "agent `{agent_id}` is decommissioned; its record cannot change"
            )));
        }
        let t = now();
        let exclusion = Exclusion {
            reason: crate::limits::clip_message(reason),
            by: actor.render(),
            at: t,
            lifted_by: None,
            lifted_at: None,
        };
        // A lift of this exclusion waiting for approval was asked before
        // this decision to exclude (a review's narrowing, an admin's): it
        // must not undo it when granted later.
        let waiting_lift = self
            .waiting_provisioning(agent_id, |r| {
                r["change"] == "include" && r["scope"] == scope
            })
            .await?;
        let mut tx = self.store.begin().await?;
        if let Some(a) = &waiting_lift {
            // The agent before its approval (PostgreSQL), in the order a
            // decision on that approval takes them.
            tx.agent(agent_id).await?;
            self.cancel_approval(
                &mut *tx,
                actor,
                a,
                &format!(
                    "the scope was excluded again meanwhile: {}",
                    exclusion.reason
                ),
            )
            .await?;
        }
        if !tx.put_exclusion(agent_id, scope, &exclusion).await? {
            tx.commit().await?;
            if waiting_lift.is_some() {
                self.notifier.wake();
            }
            return Ok(false);
        }
        // Its live leases, found in the same transaction after the
        // exclusion is written: a lease written before it is queued here,
        // one written after it sees the exclusion (`judge_again_if_reloaded`).
        // And its sub-agents' of that scope in the tasks it delegated: no
        // delegated task may hold what a delegator may not (checked on
        // every request along the chain).
        let mut revoked = Vec::new();
        for sel in [
            LeaseSelector::AgentScope {
                agent: agent_id.to_owned(),
                scope: scope.to_owned(),
            },
            LeaseSelector::DelegatedScope {
                delegator: agent_id.to_owned(),
                scope: scope.to_owned(),
            },
        ] {
            revoked.extend(
                tx.queue_revocations(&sel, &exclusion.reason, None, t)
                    .await?,
            );
        }
        tx.audit(
            AuditEvent::new(actor, "agent.scope_excluded")
                .agent(agent_id)
                .scope(scope)
                .reason(exclusion.reason.clone())
                .details(serde_json::json!({ "revoked": revoked })),
        )
        .await?;
        tx.commit().await?;
        if waiting_lift.is_some() {
            self.notifier.wake();
        }
        if !revoked.is_empty() {
            self.leases.wake();
            self.fence_sessions(actor, "exclusion", &revoked).await;
        }
        Ok(true)
    }

    /// Lifts an exclusion: policy alone decides the scope again. With
    /// `[provisioning] require_approval`, lifting one that lets the agent
    /// reach the scope again widens it, and waits for approval like any
    /// widening: the approval is returned, nothing is lifted yet.
    pub async fn include_scope(
        &self,
        actor: &Actor,
        agent_id: &str,
        scope: &str,
        reason: &str,
    ) -> BrokerResult<Option<Approval>> {
        let agent = self.agent(agent_id).await?;
        if agent.status == AgentStatus::Decommissioned {
            return Err(BrokerError::Conflict(format!(
                "agent `{agent_id}` is decommissioned; its record cannot change"
            )));
        }
        if agent.exclusion(scope).is_none() {
            return Err(BrokerError::NotFound(format!(
                "agent `{agent_id}` has no standing exclusion of scope `{}`",
                crate::limits::claimed_label(scope)
            )));
        }
        if self.config.provisioning.require_approval {
            let reaches = |a: &Agent| {
                self.reachable_scopes(&Agent {
                    status: AgentStatus::Active,
                    ..a.clone()
                })
                .iter()
                .any(|s| s == scope)
            };
            let mut lifted = agent.clone();
            lifted.excluded_scopes.remove(scope);
            if reaches(&lifted) && !reaches(&agent) {
                return self
                    .hold_include(actor, &agent, scope, reason)
                    .await
                    .map(Some);
            }
        }
        let mut tx = self.store.begin().await?;
        if !self
            .lift_exclusion(&mut *tx, actor, agent_id, scope, reason, None)
            .await?
        {
            return Err(BrokerError::Conflict(format!(
                "the exclusion of `{scope}` from `{agent_id}` was lifted already"
            )));
        }
        tx.commit().await?;
        // The agent may use the scope again: learned, not flagged as new.
        self.validation.relearn(Some(agent_id));
        Ok(None)
    }

    /// The provisioning approval for lifting `scope`'s exclusion (the one
    /// already waiting, if asked again).
    async fn hold_include(
        &self,
        actor: &Actor,
        agent: &Agent,
        scope: &str,
        reason: &str,
    ) -> BrokerResult<Approval> {
        let waiting = self
            .waiting_provisioning(&agent.id, |r| {
                r["change"] == "include"
                    && r["scope"] == scope
                    && r["status"] == agent.status.as_str()
            })
            .await?;
        if let Some(a) = waiting {
            return Ok(a);
        }
        let mut tx = self.store.begin().await?;
        let approval = self
            .open_provisioning_approval(
                &mut *tx,
                actor,
                agent,
                serde_json::json!({
                    "change": "include", "scope": scope,
                    "reason": crate::limits::clip_message(reason.trim()),
                    "widened_scopes": [scope], "status": agent.status,
                }),
                format!(
                    "agent `{}`: lifting the exclusion of `{scope}` widens it to: {scope}",
                    agent.id
                ),
            )
            .await?;
        tx.commit().await?;
        self.notifier.wake();
        Ok(approval)
    }

    /// Marks the exclusion of `scope` lifted, audited (naming the approval
    /// that granted it, if any). `false`: it was lifted already.
    pub(crate) async fn lift_exclusion(
        &self,
        tx: &mut dyn StoreTx,
        actor: &Actor,
        agent_id: &str,
        scope: &str,
        reason: &str,
        approval: Option<&str>,
    ) -> BrokerResult<bool> {
        let agent = self.agent(agent_id).await?;
        let Some(was) = agent.exclusion(scope) else {
            return Ok(false);
        };
        let lifted = Exclusion {
            lifted_by: Some(actor.render()),
            lifted_at: Some(now()),
            ..was.clone()
        };
        if !tx.put_exclusion(agent_id, scope, &lifted).await? {
            return Ok(false);
        }
        tx.audit(
            AuditEvent::new(actor, "agent.scope_included")
                .agent(agent_id)
                .scope(scope)
                .reason(crate::limits::clip_message(reason.trim()))
                .details(serde_json::json!({
                    "excluded_by": was.by, "excluded_for": was.reason, "approval": approval,
                })),
        )
        .await?;
        Ok(true)
    }

    /// Records that `email` left (idempotent: the first departure stands).
    pub(crate) async fn record_departure(
        &self,
        actor: &Actor,
        email: &str,
        reason: &str,
    ) -> BrokerResult<Option<Departure>> {
        let d = Departure {
            email: normalize(email),
            departed_at: now(),
            actor: actor.render(),
            reason: crate::limits::clip_message(reason.trim()),
        };
        let sponsored: Vec<String> = self
            .store
            .list_agents(None, None)
            .await?
            .into_iter()
            .filter(|a| a.status != AgentStatus::Decommissioned && normalize(&a.sponsor) == d.email)
            .map(|a| a.id)
            .collect();
        let mut tx = self.store.begin().await?;
        if !tx.record_departure(&d).await? {
            return Ok(None);
        }
        tx.audit(
            AuditEvent::new(actor, "person.departed")
                .reason(d.reason.clone())
                .details(serde_json::json!({ "email": d.email, "sponsor_of": sponsored })),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(d))
    }

    /// The departure of the person an operator is, if they left: their
    /// token and Slack clicks no longer count.
    pub async fn operator_departure(&self, name: &str) -> BrokerResult<Option<Departure>> {
        let Some(email) = self
            .config
            .operators
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| o.email.as_deref())
        else {
            return Ok(None);
        };
        let email = normalize(email);
        Ok(self
            .store
            .departures()
            .await?
            .into_iter()
            .find(|d| d.email == email))
    }

    /// `POST /v1/people/{email}/depart`: the person must be known (in the
    /// directory, or some agent's sponsor) and not departed already.
    pub async fn depart_person(
        &self,
        actor: &Actor,
        email: &str,
        reason: &str,
    ) -> BrokerResult<Person> {
        let people = self.directory().await?;
        let known = people.get(email).is_some()
            || self
                .store
                .list_agents(None, None)
                .await?
                .iter()
                .any(|a| normalize(&a.sponsor) == normalize(email));
        if !known {
            return Err(BrokerError::NotFound(format!(
                "no person `{}` in the directory or among sponsors",
                crate::limits::claimed_label(email)
            )));
        }
        let reason = if reason.trim().is_empty() {
            "departed"
        } else {
            reason
        };
        if self.record_departure(actor, email, reason).await?.is_none() {
            return Err(BrokerError::Conflict(format!(
                "`{}` has departed already",
                normalize(email)
            )));
        }
        let people = self.directory().await?;
        Ok(people.get(email).cloned().unwrap_or_else(|| Person {
            email: normalize(email),
            name: String::new(),
            team: None,
            manager: None,
            lead: false,
            operator: None,
            status: super::people::PersonStatus::Departed,
            departed_at: Some(now()),
        }))
    }
}
