//! Reloading the policy set without a restart: atomically, audited, with
//! what it no longer permits revoked (`policy.on_change`); a set that
//! widens any agent's reach under `[provisioning] require_approval` is held
//! for a provisioning approval that carries its exact files; and a request
//! decided under a set a reload just replaced is judged again before issue.

use std::collections::BTreeMap;

use super::policy_changes::{
    AgentDiff, OnChange, PolicyDiff, PolicyFiles, PolicyReload, queue_not_permitted, short,
};
use super::{Broker, BrokerError, BrokerResult, Session};
use crate::audit::{Actor, AuditEvent};
use crate::model::{Lease, Selector, now};

impl Broker {
    /// Loads the policy directory (or `files`) again and makes it the active
    /// set at once; an invalid set is refused and the running one stays.
    /// Live leases the new set does not permit are queued for revocation
    /// (`policy.on_change = "revoke"`) or listed (`"report"`).
    pub async fn reload_policy(
        &self,
        actor: &Actor,
        files: &PolicyFiles,
    ) -> BrokerResult<PolicyReload> {
        self.reload_inner(actor, files.files.as_ref(), None).await
    }

    /// Makes a set that waited for provisioning approval active, once the
    /// approval is granted, if the active set is still the one it was
    /// compared with.
    pub(crate) async fn apply_approved_policy(
        &self,
        approval: &crate::model::Approval,
    ) -> BrokerResult<PolicyReload> {
        let files: BTreeMap<String, String> =
            serde_json::from_value(approval.request["files"].clone())
                .map_err(|e| BrokerError::Internal(format!("stored policy set: {e}")))?;
        let actor = Actor::System;
        self.reload_inner(&actor, Some(&files), Some(approval))
            .await
    }

    /// Why held policy set `a` cannot be granted now, if it cannot: checked
    /// before its grant is recorded, so a set that would not become active
    /// is never recorded as approved.
    pub(crate) async fn policy_grant_refusal(
        &self,
        a: &crate::model::Approval,
    ) -> BrokerResult<Option<String>> {
        let files: BTreeMap<String, String> = serde_json::from_value(a.request["files"].clone())
            .map_err(|e| BrokerError::Internal(format!("stored policy set: {e}")))?;
        // Judged against the set every replica decides with (another one
        // may have reloaded a moment ago), not a copy this one has not
        // caught up with yet.
        self.follow_policy().await?;
        let old = self.policy.current();
        if let Some(why) = base_moved(a, old.hash()) {
            return Ok(Some(why));
        }
        let (candidate, _) = self.candidate_files(Some(&files))?;
        let diff = self.diff_against(&old, &candidate).await?;
        Ok(grant_refusal(a, old.hash(), &diff))
    }

    /// Agents changed through another replica (several on one database):
    /// what each uses from then on is learned here too, as on the replica
    /// that made the change (continuous validation), not judged new. Reads
    /// the audit log past `seen` (the last sequence number looked at;
    /// `None`: the log's head, so nothing before this start) for the
    /// changes that have an agent relearned: `agent.updated` (made at once
    /// or granted) and `agent.scope_included`.
    pub async fn follow_agent_changes(&self, seen: &mut Option<i64>) -> BrokerResult<()> {
        if !self.validation.enabled() {
            return Ok(());
        }
        let Some(after) = *seen else {
            *seen = Some(self.store.audit_head().await?.map_or(0, |h| h.0));
            return Ok(());
        };
        const PAGE: u32 = 500;
        let mut next = after;
        let mut cut: Option<i64> = None;
        for action in ["agent.updated", "agent.scope_included"] {
            let events = self
                .store
                .audit_events(&crate::store::AuditFilter {
                    after_seq: after,
                    action: Some(action.to_owned()),
                    limit: PAGE,
                    ..crate::store::AuditFilter::default()
                })
                .await?;
            for ev in &events {
                if let Some(agent) = &ev.agent {
                    self.validation.relearn(Some(agent));
                }
            }
            let last = events.last().map_or(after, |e| e.seq);
            next = next.max(last);
            if events.len() == PAGE as usize {
                // More of this kind wait: the next look starts before them.
                cut = Some(cut.map_or(last, |c| c.min(last)));
            }
        }
        *seen = Some(cut.unwrap_or(next));
        Ok(())
    }

    /// Several replicas: when another one made a different set active,
    /// makes it this one's too, and revokes what it no longer permits that
    /// this replica issued before it followed (the other replica's own scan
    /// could not see those). Returns whether it changed the set.
    pub async fn follow_policy(&self) -> BrokerResult<bool> {
        // Read under the reload lock: a reload here swaps its set before it
        // publishes it, and must not be undone by a read taken before.
        let _one_at_a_time = self.policy.reloading().await;
        let Some((hash, files)) = self
            .store
            .published_policy(self.policy.current().hash())
            .await?
        else {
            return Ok(false);
        };
        let candidate = crate::policy::PolicyEngine::from_files(&files).map_err(|e| {
            BrokerError::Internal(format!("the active policy set in the store: {e}"))
        })?;
        if candidate.hash() != hash {
            return Err(BrokerError::Internal(format!(
                "the active policy set in the store hashes to {}, not {}",
                short(candidate.hash()),
                short(&hash)
            )));
        }
        let old = self.policy.replace(candidate);
        self.validation.relearn(None);
        tracing::info!(from = %short(old.hash()), to = %short(&hash), "following the policy set another replica made active");
        if self.config.policy.on_change != OnChange::Revoke {
            return Ok(true);
        }
        let gone = self
            .not_permitted(&self.policy.current(), &Selector::All)
            .await?;
        if gone.is_empty() {
            return Ok(true);
        }
        let reason = format!(
            "policy {} no longer permits it (was {})",
            short(&hash),
            short(old.hash())
        );
        let mut tx = self.store.begin().await?;
        let revoked =
            queue_not_permitted(&mut *tx, &Actor::System, &gone, &reason, &hash, now()).await?;
        tx.commit().await?;
        if !revoked.is_empty() {
            self.leases.wake();
            let cause = format!("policy-{}", short(&hash));
            self.fence_sessions(&Actor::System, &cause, &revoked).await;
        }
        Ok(true)
    }

    async fn reload_inner(
        &self,
        actor: &Actor,
        files: Option<&BTreeMap<String, String>>,
        approved: Option<&crate::model::Approval>,
    ) -> BrokerResult<PolicyReload> {
        let _one_at_a_time = self.policy.reloading().await;
        let candidate = match self.candidate_files(files) {
            Ok(c) => c,
            Err(e) => {
                self.audit_alone(
                    AuditEvent::new(actor, "policy.reload_refused").failure(e.to_string()),
                )
                .await?;
                return Err(e);
            }
        };
        let (candidate, contents) = candidate;
        let old = self.policy.current();
        let mut diff = self.diff_against(&old, &candidate).await?;
        let new_hash = candidate.hash().to_owned();
        // Asked again under the reload lock: a reload may have slipped in
        // since the grant's own check (`policy_grant_refusal`).
        if let Some(a) = approved
            && let Some(why) = grant_refusal(a, old.hash(), &diff)
        {
            let why = format!(
                "approval `{}` is granted, but {why}: nothing changed; reload again",
                a.id
            );
            self.audit_alone(AuditEvent::new(actor, "policy.reload_refused").failure(why.clone()))
                .await?;
            return Err(BrokerError::Conflict(why));
        }
        if approved.is_none()
            && self.config.provisioning.require_approval
            && diff.agents.iter().any(|a| !a.gained.is_empty())
        {
            let held = self.hold_policy(actor, &diff, contents, old.hash()).await?;
            return Ok(PolicyReload {
                diff,
                on_change: self.config.policy.on_change,
                revoked: Vec::new(),
                tasks_ended: Vec::new(),
                held: Some(held),
            });
        }
        self.policy.replace(candidate);
        // What agents do under the new set is learned, not flagged as new.
        self.validation.relearn(None);
        // Leases issued between the diff and the swap were judged by the
        // old set: look again under the new one.
        diff.leases_not_permitted = self
            .not_permitted(&self.policy.current(), &Selector::All)
            .await?;
        let on_change = self.config.policy.on_change;
        let reason = format!(
            "policy {} no longer permits it (was {})",
            short(&new_hash),
            short(old.hash())
        );
        let t = now();
        let mut tx = self.store.begin().await?;
        tx.audit(
            AuditEvent::new(actor, "policy.reloaded").details(serde_json::json!({
                "from_hash": old.hash(),
                "to_hash": new_hash,
                "approval": approved.map(|a| &a.id),
                "on_change": on_change,
                "agents": diff.agents,
                "leases_not_permitted": diff.leases_not_permitted.len(),
            })),
        )
        .await?;
        let (mut revoked, mut tasks_ended) = (Vec::new(), Vec::new());
        if on_change == OnChange::Revoke {
            revoked = queue_not_permitted(
                &mut *tx,
                actor,
                &diff.leases_not_permitted,
                &reason,
                &new_hash,
                t,
            )
            .await?;
            for a in diff.agents.iter().filter(|a| a.reaches.is_empty()) {
                let (tasks, leases) = self
                    .end_when_nothing_left(&mut *tx, actor, &a.agent, &reason, t)
                    .await?;
                tasks_ended.extend(tasks);
                revoked.extend(leases);
            }
        }
        tx.commit().await?;
        // Every other replica follows within a second (`follow_policy`).
        self.store.publish_policy(&new_hash, &contents).await?;
        if !revoked.is_empty() {
            self.leases.wake();
            let cause = format!("policy-{}", short(&new_hash));
            self.fence_sessions(actor, &cause, &revoked).await;
        }
        tracing::info!(from = %short(old.hash()), to = %short(&new_hash), revoked = revoked.len(), "policy reloaded");
        Ok(PolicyReload {
            diff,
            on_change,
            revoked,
            tasks_ended,
            held: None,
        })
    }

    /// Holds a widening set for provisioning approval: the files travel in
    /// the approval, so what is approved is exactly what becomes active. A
    /// set already waiting (the same content) is not asked for twice.
    async fn hold_policy(
        &self,
        actor: &Actor,
        diff: &PolicyDiff,
        files: BTreeMap<String, String>,
        from_hash: &str,
    ) -> BrokerResult<crate::model::Approval> {
        let waiting = self
            .store
            .list_approvals(&crate::model::ApprovalFilter {
                kind: Some(crate::model::ApprovalKind::Provisioning),
                state: Some(crate::model::ApprovalState::Pending),
                ..crate::model::ApprovalFilter::default()
            })
            .await?
            .into_iter()
            .find(|a| {
                a.request["change"] == "policy"
                    && a.request["to_hash"] == diff.to_hash.as_str()
                    && a.request["from_hash"] == from_hash
            });
        let widened: Vec<&AgentDiff> = diff
            .agents
            .iter()
            .filter(|a| !a.gained.is_empty())
            .collect();
        let shown = serde_json::json!(
            widened
                .iter()
                .map(|a| serde_json::json!({ "agent": a.agent, "gained": a.gained }))
                .collect::<Vec<_>>()
        );
        if let Some(a) = waiting {
            // The same set asked again: the same approval, unless what it
            // widens changed since (then approving it would be refused).
            if unseen_gains(&a, diff).is_empty() {
                return Ok(a);
            }
            let mut tx = self.store.begin().await?;
            self.cancel_approval(
                &mut *tx,
                actor,
                &a,
                "the agents this set widens changed: asked again",
            )
            .await?;
            tx.commit().await?;
        }
        let Some(first) = widened.first() else {
            return Err(BrokerError::Internal("nothing widens".into()));
        };
        // The approval hangs on the first agent it widens; every widened
        // agent's sponsor is one who may not approve it alone.
        let mut anchor = self.agent(&first.agent).await?;
        anchor.sponsor = String::new();
        let mut sponsors: Vec<String> = Vec::new();
        for a in &widened {
            if let Some(g) = self.store.get_agent(&a.agent).await?
                && !sponsors.contains(&g.sponsor)
            {
                sponsors.push(g.sponsor);
            }
        }
        let what: Vec<String> = widened
            .iter()
            .map(|a| format!("{} gains {}", a.agent, a.gained.join(", ")))
            .collect();
        let mut tx = self.store.begin().await?;
        let approval = self
            .open_provisioning_approval(
                &mut *tx,
                actor,
                &anchor,
                serde_json::json!({
                    "change": "policy", "files": files, "from_hash": from_hash,
                    "to_hash": diff.to_hash,
                    "widened": shown, "widened_sponsors": sponsors,
                }),
                format!(
                    "policy set {} widens: {}",
                    short(&diff.to_hash),
                    what.join("; ")
                ),
            )
            .await?;
        tx.audit(
            AuditEvent::new(actor, "policy.reload_held").details(serde_json::json!({
                "approval": approval.id, "from_hash": from_hash, "to_hash": diff.to_hash,
                "widened": widened.iter().map(|a| &a.agent).collect::<Vec<_>>(),
            })),
        )
        .await?;
        tx.commit().await?;
        self.notifier.wake();
        Ok(approval)
    }

    /// A reload may swap the policy set (or an admin or review exclude the
    /// scope) after this request was decided and before its lease row was
    /// written — too late for the reload's scan of
    /// live leases. With the lease written, a set that changed meanwhile
    /// judges it again; if it does not permit it, nothing is handed over:
    /// a lease written ahead fails before the provider is asked, and one
    /// written with its credential (`issued`, an in-process provider's) is
    /// revoked.
    pub(super) async fn judge_again_if_reloaded(
        &self,
        s: &Session,
        lease: &Lease,
        ttl: u64,
        decided_hash: Option<&str>,
        issued: bool,
        excluded_at_write: Option<bool>,
    ) -> BrokerResult<()> {
        let policy = self.policy.current();
        // An exclusion committed after the decision, whose scan of live
        // leases ran before this lease was written, is the same race. The
        // write itself says whether it saw one, when its engine can tell;
        // otherwise the agent is read now that the lease is committed.
        let excluded = match excluded_at_write {
            Some(false) => None,
            Some(true) | None => self
                .store
                .get_agent(&s.agent.id)
                .await?
                .and_then(|a| a.exclusion(&lease.scope).cloned()),
        };
        let message = if let Some(e) = excluded {
            format!(
                "scope `{}` was excluded from agent `{}` while this request was decided ({}: {})",
                lease.scope, s.agent.id, e.by, e.reason
            )
        } else if self.config.policy.on_change != super::OnChange::Revoke {
            return Ok(());
        } else if self
            .agents_changed
            .load(std::sync::atomic::Ordering::SeqCst)
            != s.agents_seen
            && let Some(agent) = self.store.get_agent(&s.agent.id).await?
            && !self
                .still_permitted(&policy, &agent, &s.task, lease, Some(ttl))
                .await?
        {
            // An agent changed after this request read its own, and the
            // scan of what it holds may have run before this lease was
            // written.
            format!(
                "agent `{}` changed while this request was decided; it is no longer permitted this scope",
                s.agent.id
            )
        } else if decided_hash.is_none_or(|h| h == policy.hash())
            || self
                .still_permitted(&policy, &s.agent, &s.task, lease, Some(ttl))
                .await?
        {
            return Ok(());
        } else {
            format!(
                "the policy set changed while this request was decided; the set now active ({}) does not permit it",
                &policy.hash()[..12.min(policy.hash().len())]
            )
        };
        let mut tx = self.store.begin().await?;
        if issued {
            tx.queue_revocations(
                &crate::store::LeaseSelector::Lease(lease.id.clone()),
                &message,
                None,
                now(),
            )
            .await?;
        } else {
            tx.mark_failed(&lease.id, &message, now()).await?;
        }
        tx.audit(
            AuditEvent::new(&Actor::Agent(s.agent.id.clone()), "lease.policy_revoked")
                .agent(&s.agent.id)
                .task(&s.task.id)
                .scope(&lease.scope)
                .lease(&lease.id)
                .reason(message.clone())
                .details(
                    serde_json::json!({ "policy_hash": policy.hash(), "before_issue": !issued }),
                ),
        )
        .await?;
        tx.commit().await?;
        if issued {
            self.leases.wake();
        }
        Err(BrokerError::PolicyDenied {
            message,
            policies: Vec::new(),
        })
    }
}

/// Why held policy set `a` cannot be made active over the set `active_hash`
/// with `diff` (the set against it), if it cannot: the active set is no
/// longer the one it was compared with, or agents changed since it was
/// asked (moved, registered, an exclusion lifted) gain under it what the
/// approvers were not shown. Either is asked again, not granted.
fn grant_refusal(
    a: &crate::model::Approval,
    active_hash: &str,
    diff: &PolicyDiff,
) -> Option<String> {
    if let Some(why) = base_moved(a, active_hash) {
        return Some(why);
    }
    let unseen = unseen_gains(a, diff);
    (!unseen.is_empty()).then(|| {
        format!(
            "agents changed since it was asked: under this set {} too, which the approvers were not shown",
            unseen.join("; ")
        )
    })
}

/// The first half of [`grant_refusal`]: the active set is not the one `a`
/// was compared with.
fn base_moved(a: &crate::model::Approval, active_hash: &str) -> Option<String> {
    let from = a.request["from_hash"].as_str().unwrap_or_default();
    (from != active_hash).then(|| {
        format!(
            "the active policy set changed since it was asked (it was compared with {}, the active set is {})",
            short(from),
            short(active_hash)
        )
    })
}

/// What agents gain under `diff` that held approval `a` did not show its
/// approvers, as "agent gains scope".
fn unseen_gains(a: &crate::model::Approval, diff: &PolicyDiff) -> Vec<String> {
    let shown = |agent: &str, scope: &str| {
        a.request["widened"].as_array().is_some_and(|w| {
            w.iter().any(|e| {
                e["agent"] == agent
                    && e["gained"]
                        .as_array()
                        .is_some_and(|g| g.iter().any(|s| s == scope))
            })
        })
    };
    diff.agents
        .iter()
        .flat_map(|d| {
            d.gained
                .iter()
                .filter(|s| !shown(&d.agent, s))
                .map(move |s| format!("{} gains {s}", d.agent))
        })
        .collect()
}
