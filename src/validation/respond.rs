//! The broker's response to a detector that fired, and incidents: each is
//! an `incident.opened` audit event (the detector, the signal, what was
//! observed against what), and `incident.resolved` when an operator closes
//! it. Kept in the audit log, so they are durable, chained and shared by
//! every replica.

use serde::Serialize;
use serde_json::json;

use super::{Action, Observation, StepUp, StepUpScopes, Trigger};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerError, BrokerResult, RevocationRequest};
use crate::model::{from_unix, new_id, now};
use crate::store::AuditFilter;

/// Who the kill switch names when continuous validation pulls it.
pub const ACTOR: &str = "continuous-validation";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum IncidentState {
    Open,
    Resolved,
}

/// A detector that fired, and what came of it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Incident {
    pub id: String,
    pub agent: String,
    pub state: IncidentState,
    pub detector: String,
    pub signal: super::Signal,
    pub severity: super::Severity,
    pub action: Action,
    /// The action was only recorded, not taken.
    pub dry_run: bool,
    pub observed: u64,
    /// What the value was compared with (threshold and window, or the
    /// novelty and what was known).
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
    #[serde(with = "time::serde::rfc3339")]
    pub opened_at: time::OffsetDateTime,
    /// The audit event that opened it.
    pub opened_seq: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub resolved_at: Option<time::OffsetDateTime>,
    pub resolved_by: Option<String>,
    pub resolution: Option<String>,
}

fn opened(ev: &AuditEvent) -> Option<Incident> {
    let d = &ev.details;
    Some(Incident {
        id: d["incident"].as_str()?.to_owned(),
        agent: ev.agent.clone()?,
        state: IncidentState::Open,
        detector: d["detector"].as_str()?.to_owned(),
        signal: serde_json::from_value(d["signal"].clone()).ok()?,
        severity: serde_json::from_value(d["severity"].clone()).ok()?,
        action: serde_json::from_value(d["action"].clone()).ok()?,
        dry_run: d["dry_run"].as_bool().unwrap_or(false),
        observed: d["observed"].as_u64().unwrap_or(0),
        evidence: d["evidence"].clone(),
        opened_at: from_unix(ev.at_ms / 1000),
        opened_seq: ev.seq,
        resolved_at: None,
        resolved_by: None,
        resolution: None,
    })
}

impl Broker {
    /// Tells continuous validation what `agent` did, and responds to the
    /// detectors that fire. Never fails the request it observes: a failed
    /// response is logged.
    pub(crate) async fn observe(&self, agent: &str, obs: Observation) {
        if !self.validation.enabled() {
            return;
        }
        let fired = self.validation.observe(agent, obs, self.validation.now());
        for t in fired {
            let (who, what) = (t.agent.clone(), t.detector.name.clone());
            if let Err(e) = self.respond(t).await {
                tracing::error!(error = %e, "continuous validation could not respond to a detector");
                // Its incident was not recorded (the commit holds the
                // incident with its response): it may fire again.
                self.validation.not_fired(&who, &what);
            }
        }
    }

    /// Records the incident with its response, then does what follows the
    /// commit (fences, settling a step-up), logging what fails there: an
    /// error means nothing was recorded.
    async fn respond(&self, t: Trigger) -> BrokerResult<()> {
        let d = &t.detector;
        let dry_run = self.validation.dry_run(d);
        let t_now = now();
        let incident = Incident {
            id: new_id("in"),
            agent: t.agent.clone(),
            state: IncidentState::Open,
            detector: d.name.clone(),
            signal: d.signal,
            severity: d.severity,
            action: d.action,
            dry_run,
            observed: t.observed,
            evidence: t.evidence.clone(),
            opened_at: t_now,
            // Not known before the event is written; alerts leave it out.
            opened_seq: 0,
            resolved_at: None,
            resolved_by: None,
            resolution: None,
        };
        let id = incident.id.clone();
        let ev = AuditEvent::new(&Actor::System, "incident.opened")
            .agent(&t.agent)
            .reason(format!(
                "detector `{}` ({:?}) fired: {}{}",
                d.name,
                d.signal,
                t.evidence,
                if dry_run { " (dry run)" } else { "" }
            ))
            .details(json!({
                "incident": id,
                "detector": d.name,
                "signal": d.signal,
                "severity": d.severity,
                "action": d.action,
                "dry_run": dry_run,
                "observed": t.observed,
                "evidence": t.evidence,
            }));
        // The incident, its step-up and its alerts commit together: an
        // alert is never sent for an incident that was not recorded, nor
        // lost for one that was.
        // A step-up of sensitive scopes only does not replace one of every
        // scope that an open incident holds: the stricter holds.
        let holding = if !dry_run && d.action == Action::StepUp {
            self.store
                .get_agent(&t.agent)
                .await?
                .and_then(|a| a.step_up)
        } else {
            None
        };
        // A `suspend` pulls the kill switch in the incident's own commit:
        // the incident, its alert ("suspended") and the suspension, the
        // tasks ended and the leases queued land together or not at all,
        // so a crash between them cannot leave the agent running under an
        // incident that says it was stopped. Fences and the wait follow.
        let suspension = if !dry_run && d.action == Action::Suspend {
            let req = RevocationRequest {
                agent: Some(t.agent.clone()),
                reason: Some(format!("incident {id}: detector `{}`", d.name)),
                suspend: true,
                // Answer now; the revocation queue finishes the work.
                wait: Some(0),
                ..RevocationRequest::default()
            };
            let checked = self.checked_revocation(&req).await?;
            Some((req, checked))
        } else {
            None
        };
        let alerts = if dry_run || d.action == Action::Record {
            Vec::new()
        } else {
            self.notifier.incident_opened(&incident)
        };
        let step_up = (!dry_run && d.action == Action::StepUp).then(|| StepUp {
            incident: id.clone(),
            scopes: d.step_up_scopes.unwrap_or_default(),
            since: t_now,
        });
        // Run again if the database rolled it back for colliding with
        // another change (PostgreSQL): an incident, above all one that
        // suspends, is not dropped for that.
        let mut attempt = 0;
        let pulled = loop {
            attempt += 1;
            match self
                .record_incident(
                    &t.agent,
                    ev.clone(),
                    suspension.as_ref(),
                    step_up.as_ref(),
                    holding.as_ref(),
                    &alerts,
                )
                .await
            {
                Err(e) if crate::broker::run_again("an incident", attempt, &e).await => {}
                done => break done?,
            }
        };
        if !alerts.is_empty() {
            self.notifier.wake();
        }
        self.metrics.incident(&d.name);
        if dry_run {
            return Ok(());
        }
        match d.action {
            Action::Record => {}
            Action::Alert => {
                tracing::warn!(incident = %id, agent = %t.agent, detector = %d.name, severity = ?d.severity, "continuous validation: incident opened");
            }
            Action::StepUp => {
                tracing::warn!(incident = %id, agent = %t.agent, detector = %d.name, "continuous validation: the agent's requests need an approval until the incident is resolved");
                // Another incident opened or resolved at once may have
                // written over this one's step-up from what it read before.
                if let Err(e) = self.settle_step_up(&t.agent).await {
                    tracing::error!(incident = %id, error = %e, "settling the agent's step-up failed; the next incident opened or resolved settles it");
                }
            }
            Action::Suspend => {
                tracing::warn!(incident = %id, agent = %t.agent, detector = %d.name, "continuous validation: the agent was suspended");
                if let Some((pulled, req)) = pulled
                    && let Err(e) = self.after_revocation(ACTOR, &req, pulled).await
                {
                    tracing::error!(incident = %id, error = %e, "the suspension is committed, but its fences or its wait failed");
                }
            }
        }
        Ok(())
    }

    /// The incident's event, its step-up (kept only if `holding`, a
    /// stricter one, still holds as read: a compare-and-set), its
    /// suspension (the kill switch's writes) and its alerts, in one commit.
    async fn record_incident(
        &self,
        agent: &str,
        ev: AuditEvent,
        suspension: Option<&(RevocationRequest, (crate::model::Selector, String))>,
        step_up: Option<&StepUp>,
        holding: Option<&StepUp>,
        alerts: &[crate::model::Notification],
    ) -> BrokerResult<Option<(crate::broker::Pulled, RevocationRequest)>> {
        let mut tx = self.store.begin().await?;
        tx.audit(ev).await?;
        let pulled = match suspension {
            Some((req, (selector, reason))) => Some((
                self.revoke_in(&mut *tx, ACTOR, req, selector.clone(), reason.clone())
                    .await?,
                req.clone(),
            )),
            None => None,
        };
        if let Some(step_up) = step_up {
            let kept = match holding.filter(|h| stricter(h.scopes, step_up.scopes)) {
                Some(h) => tx.set_step_up(agent, Some(h), Some(h)).await?,
                None => false,
            };
            if !kept {
                tx.set_step_up(agent, Some(step_up), None).await?;
            }
        }
        for n in alerts {
            tx.insert_notification(n).await?;
        }
        tx.commit().await?;
        Ok(pulled)
    }

    /// Every incident (of `agent`), newest first.
    pub async fn incidents(&self, agent: Option<&str>) -> BrokerResult<Vec<Incident>> {
        let events = |action: &'static str| {
            let agent = agent.map(str::to_owned);
            async move {
                let mut out = Vec::new();
                let mut after = 0;
                loop {
                    let page = self
                        .store
                        .audit_events(&AuditFilter {
                            after_seq: after,
                            agent: agent.clone(),
                            task: None,
                            action: Some(action.to_owned()),
                            limit: 10_000,
                        })
                        .await?;
                    let Some(last) = page.last() else { break };
                    after = last.seq;
                    out.extend(page);
                }
                Ok::<_, BrokerError>(out)
            }
        };
        let mut list: Vec<Incident> = events("incident.opened")
            .await?
            .iter()
            .filter_map(opened)
            .collect();
        for ev in events("incident.resolved").await? {
            if let Some(i) = list
                .iter_mut()
                .find(|i| Some(i.id.as_str()) == ev.details["incident"].as_str())
            {
                i.state = IncidentState::Resolved;
                i.resolved_at = Some(from_unix(ev.at_ms / 1000));
                i.resolved_by = Some(ev.actor.clone());
                i.resolution = ev.reason.clone();
            }
        }
        list.reverse();
        Ok(list)
    }

    pub async fn incident(&self, id: &str) -> BrokerResult<Incident> {
        self.incidents(None)
            .await?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| BrokerError::NotFound(format!("no incident `{id}`")))
    }

    /// Closes an incident, lifting the step-up it put on the agent. It does
    /// not resume a suspended agent: that is `keygate agents resume`, a
    /// decision of its own.
    pub async fn resolve_incident(
        &self,
        actor: &Actor,
        id: &str,
        reason: &str,
    ) -> BrokerResult<Incident> {
        let reason = crate::broker::required_reason(Some(reason))?;
        let mut i = self.incident(id).await?;
        if i.state == IncidentState::Resolved {
            return Err(BrokerError::Conflict(format!(
                "incident `{id}` is already resolved"
            )));
        }
        // The step-up this incident holds on the agent ends with it, unless
        // another open step-up incident of the agent still holds one: then
        // that one (the strictest, the newest of those) holds it. A step-up
        // another incident holds stays as it is.
        let agent = self.store.get_agent(&i.agent).await?;
        let step_up = agent.and_then(|a| a.step_up).filter(|s| s.incident == id);
        let next = match &step_up {
            Some(_) => self.next_step_up(&i.agent, id).await?,
            None => None,
        };
        let mut tx = self.store.begin().await?;
        // Compare-and-set: a step-up written meanwhile is not undone.
        let lifts = match &step_up {
            Some(s) => tx.set_step_up(&i.agent, next.as_ref(), Some(s)).await? && next.is_none(),
            None => false,
        };
        tx.audit(
            AuditEvent::new(actor, "incident.resolved")
                .agent(&i.agent)
                .reason(reason.clone())
                .details(json!({
                    "incident": id,
                    "step_up_lifted": lifts,
                    "step_up_held_by": next.as_ref().map(|n| &n.incident),
                })),
        )
        .await?;
        tx.commit().await?;
        // Another incident of the agent resolved at the same moment may
        // have been handed the step-up here, or have handed it to this one.
        self.settle_step_up(&i.agent).await?;
        i.state = IncidentState::Resolved;
        i.resolved_at = Some(now());
        i.resolved_by = Some(actor.render());
        i.resolution = Some(reason);
        Ok(i)
    }

    /// The step-up that holds once `except` no longer does: the strictest
    /// of the agent's other open step-up incidents (the newest of those).
    async fn next_step_up(&self, agent: &str, except: &str) -> BrokerResult<Option<StepUp>> {
        Ok(self.strictest_open(self.incidents(Some(agent)).await?, except))
    }

    /// The step-up the strictest of `incidents` still open holds (of every
    /// scope before sensitive ones only), but for incident `except`.
    fn strictest_open(&self, incidents: Vec<Incident>, except: &str) -> Option<StepUp> {
        let open: Vec<StepUp> = incidents
            .into_iter()
            .filter(|o| {
                o.id != except
                    && o.state == IncidentState::Open
                    && o.action == Action::StepUp
                    && !o.dry_run
            })
            .map(|o| StepUp {
                scopes: self
                    .config
                    .detectors
                    .iter()
                    .find(|d| d.name == o.detector)
                    .and_then(|d| d.step_up_scopes)
                    .unwrap_or_default(),
                incident: o.id,
                since: o.opened_at,
            })
            .collect();
        let strictest = open
            .iter()
            .position(|u| u.scopes == StepUpScopes::All)
            .unwrap_or(0);
        open.into_iter().nth(strictest)
    }

    /// After a step-up incident opened or was resolved and committed: the
    /// agent's step-up is made to agree with its open step-up incidents (the
    /// strictest holds), whatever changes made at once wrote from what they
    /// read before the other committed: held by a resolved incident, it
    /// passes to the next open one or is lifted; held by none (or by a
    /// weaker one) while an open incident steps the agent up, that one
    /// holds. Every open and resolve runs it after its own commit, so
    /// whichever commits last sees the other's.
    async fn settle_step_up(&self, agent: &str) -> BrokerResult<()> {
        for _ in 0..4 {
            let held = self.store.get_agent(agent).await?.and_then(|a| a.step_up);
            // The agent's incidents, read once (its audit events).
            let incidents = self.incidents(Some(agent)).await?;
            let resolved = |id: &str| {
                incidents
                    .iter()
                    .any(|i| i.id == id && i.state == IncidentState::Resolved)
            };
            let held_resolved = held.as_ref().is_some_and(|h| resolved(&h.incident));
            let want = self.strictest_open(incidents, "");
            let keep = match (&held, &want) {
                (None, None) => true,
                (None, Some(_)) => false,
                (Some(h), want) => {
                    !held_resolved && want.as_ref().is_none_or(|w| !stricter(w.scopes, h.scopes))
                }
            };
            if keep {
                return Ok(());
            }
            let mut tx = self.store.begin().await?;
            tx.set_step_up(agent, want.as_ref(), held.as_ref()).await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

/// Whether a step-up of `held` scopes asks a human for more than one of
/// `new` scopes (every scope over sensitive ones only).
fn stricter(held: StepUpScopes, new: StepUpScopes) -> bool {
    held == StepUpScopes::All && new == StepUpScopes::Sensitive
}
