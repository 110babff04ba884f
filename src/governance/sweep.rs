//! The governance sweep and the compliance view: per agent, the effective
//! lifecycle policy, what it may reach and has used, its open issues and its
//! maturity; the sweep records issues as findings, carries out a lifecycle
//! action once its deadline passes, and closes what was resolved. Every
//! step is audited in the transaction that makes it.

use serde::Serialize;
use time::OffsetDateTime;

use super::compliance::{self, Facts, Issue, Reachable};
use super::maturity::{self, AgentMaturity};
use super::people::{Directory, Standing};
use super::reviews::ReviewFilter;
use super::{Finding, ScopeUsage};
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerResult};
use crate::config::{LifecycleAction, LifecyclePolicy, lifecycle};
use crate::model::{Agent, AgentStatus, ApprovalFilter, ApprovalKind, ApprovalState, new_id, now};

/// One reachable scope with its use.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScopeView {
    pub scope: String,
    pub max_ttl_secs: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub credentials: u64,
    /// The client addresses its credentials were asked from (the most
    /// recent distinct ones).
    pub sources: Vec<String>,
}

/// An agent's governance record (seed 000's registry row and more).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentCompliance {
    pub agent_id: String,
    pub status: AgentStatus,
    pub team: String,
    pub sponsor: String,
    pub risk_tier: u8,
    /// Its own cap on session and credential lifetime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl_secs: Option<u64>,
    /// Scopes the registry denies it whatever policy says.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub excluded_scopes: std::collections::BTreeMap<String, crate::model::Exclusion>,
    /// The `[[lifecycle]]` entry that governs it.
    pub lifecycle: LifecyclePolicy,
    /// The scopes policy lets it reach, whatever the hour, with their use.
    pub permitted_scopes: Vec<ScopeView>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_review_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub next_review_due: OffsetDateTime,
    pub issues: Vec<Issue>,
    pub maturity: AgentMaturity,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct SweepReport {
    pub agents: usize,
    pub opened: Vec<Finding>,
    pub closed: Vec<String>,
    /// `(agent, action)` carried out.
    pub acted: Vec<(String, LifecycleAction)>,
    /// Review items escalated for being overdue.
    pub escalated: usize,
    /// `(agent, scope)` excluded as unused (`remove_unused`).
    pub excluded: Vec<(String, String)>,
    /// The automatic review campaign this sweep started, if any
    /// (`governance.schedule_reviews`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled: Option<String>,
}

/// The estate's maturity: every agent's level, and the lowest.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MaturityReport {
    pub level: &'static str,
    /// Agents (not decommissioned) per level.
    pub counts: std::collections::BTreeMap<&'static str, usize>,
    pub agents: Vec<AgentLevel>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentLevel {
    pub agent_id: String,
    pub level: &'static str,
    /// The criteria not met.
    pub failing: Vec<&'static str>,
}

/// Which agents (not decommissioned) hold each public key.
type KeyIndex = std::collections::HashMap<String, Vec<String>>;

/// What judging every agent needs, read once per pass.
pub(crate) struct Context {
    keys: KeyIndex,
    pub(crate) people: Directory,
    /// Open review items past their campaign's due date: agent → (campaign
    /// name, due).
    overdue_reviews: std::collections::HashMap<String, (String, OffsetDateTime)>,
}

fn key_index(agents: &[Agent]) -> KeyIndex {
    let mut index = KeyIndex::new();
    for a in agents {
        if a.status == AgentStatus::Decommissioned {
            continue;
        }
        for k in compliance::key_fingerprints(&a.jwks) {
            index.entry(k).or_default().push(a.id.clone());
        }
    }
    index
}

impl Broker {
    /// The agent's governance record, now.
    pub async fn compliance(&self, agent: &Agent) -> BrokerResult<AgentCompliance> {
        let ctx = self.governance_context().await?;
        self.compliance_in(agent, &ctx, now()).await
    }

    /// The people directory: config's people and operators, less departures.
    pub async fn directory(&self) -> BrokerResult<Directory> {
        Ok(Directory::build(
            &self.config.people,
            &self.config.operators,
            self.store.departures().await?,
        ))
    }

    pub(crate) async fn governance_context(&self) -> BrokerResult<Context> {
        let keys = key_index(&self.store.list_agents(None, None).await?);
        let t = now();
        let campaigns = self.store.review_campaigns().await?;
        let mut overdue_reviews = std::collections::HashMap::new();
        for i in self
            .store
            .review_items(&ReviewFilter {
                open_only: true,
                ..ReviewFilter::default()
            })
            .await?
        {
            if let Some(c) = campaigns.iter().find(|c| c.id == i.campaign_id)
                && c.due_at <= t
            {
                overdue_reviews.insert(i.agent_id, (c.name.clone(), c.due_at));
            }
        }
        Ok(Context {
            keys,
            people: self.directory().await?,
            overdue_reviews,
        })
    }

    pub(crate) async fn compliance_in(
        &self,
        a: &Agent,
        ctx: &Context,
        t: OffsetDateTime,
    ) -> BrokerResult<AgentCompliance> {
        let keys = &ctx.keys;
        let policy = lifecycle::effective(&self.config.lifecycle, a);
        let names = self.reachable_scopes(a);
        let reachable: Vec<Reachable> = self
            .config
            .scopes
            .iter()
            .filter(|s| names.contains(&s.name))
            .map(|s| Reachable {
                scope: s.name.clone(),
                max_ttl_secs: s.max_ttl_secs,
            })
            .collect();
        let usage: Vec<ScopeUsage> = self.store.scope_usage(&a.id).await?;
        let mut shares_key_with: Vec<String> = compliance::key_fingerprints(&a.jwks)
            .iter()
            .filter_map(|k| keys.get(k))
            .flatten()
            .filter(|o| **o != a.id)
            .cloned()
            .collect();
        shares_key_with.sort();
        shares_key_with.dedup();
        let mut issues = compliance::issues(&Facts {
            agent: a,
            policy: &policy,
            reachable: &reachable,
            usage: &usage,
            shares_key_with: &shares_key_with,
            sponsor: ctx.people.standing(&a.sponsor),
            now: t,
        });
        if a.status != AgentStatus::Decommissioned
            && let Some((name, due)) = ctx.overdue_reviews.get(&a.id)
        {
            let (action, at) = match policy.overdue_action {
                LifecycleAction::Notify => (Some(LifecycleAction::Notify), None),
                other => (
                    Some(other),
                    Some(*due + time::Duration::days(i64::from(policy.grace_days))),
                ),
            };
            issues.push(Issue {
                kind: "review_item_overdue",
                subject: name.clone(),
                detail: format!(
                    "its item in review campaign `{name}` was due on {}",
                    due.date()
                ),
                action,
                action_due_at: at,
            });
        }
        let approved_provisioning = self
            .store
            .list_approvals(&ApprovalFilter {
                kind: Some(ApprovalKind::Provisioning),
                agent: Some(a.id.clone()),
                state: Some(ApprovalState::Approved),
                ..ApprovalFilter::default()
            })
            .await?
            .into_iter()
            .next()
            .is_some();
        let maturity = maturity::of_agent(&maturity::Inputs {
            agent: a,
            reachable: &reachable,
            issues: &issues,
            approved_provisioning,
            short_ttl_secs: self.config.governance.short_ttl_secs,
        });
        let permitted_scopes = reachable
            .iter()
            .map(|r| {
                let u = usage.iter().find(|u| u.scope == r.scope);
                ScopeView {
                    scope: r.scope.clone(),
                    max_ttl_secs: r.max_ttl_secs,
                    last_used_at: u.map(|u| u.last_used_at),
                    credentials: u.map_or(0, |u| u.credentials),
                    sources: u.map(|u| u.sources.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(AgentCompliance {
            agent_id: a.id.clone(),
            status: a.status,
            team: a.team.clone(),
            sponsor: a.sponsor.clone(),
            risk_tier: a.risk_tier,
            max_ttl_secs: a.max_ttl_secs,
            excluded_scopes: a.excluded_scopes.clone(),
            next_review_due: compliance::next_review_due(a, &policy),
            lifecycle: policy,
            permitted_scopes,
            last_used_at: a.last_used_at,
            last_review_at: a.last_review_at,
            issues,
            maturity,
        })
    }

    /// Every agent's level, and the estate's (the lowest of them).
    pub async fn maturity(&self) -> BrokerResult<MaturityReport> {
        let mut agents = Vec::new();
        let mut counts: std::collections::BTreeMap<&'static str, usize> =
            maturity::LEVELS.iter().map(|l| (*l, 0)).collect();
        let all = self.store.list_agents(None, None).await?;
        let ctx = self.governance_context().await?;
        for a in all {
            if a.status == AgentStatus::Decommissioned {
                continue;
            }
            let c = self.compliance_in(&a, &ctx, now()).await?;
            *counts.entry(c.maturity.level).or_default() += 1;
            agents.push(AgentLevel {
                agent_id: a.id,
                level: c.maturity.level,
                failing: c
                    .maturity
                    .criteria
                    .iter()
                    .filter(|c| !c.met)
                    .map(|c| c.name)
                    .collect(),
            });
        }
        for (level, n) in &counts {
            self.metrics.set_maturity(level, *n);
        }
        Ok(MaturityReport {
            level: maturity::overall(agents.iter().map(|a| a.level)),
            counts,
            agents,
        })
    }

    /// One governance pass over every agent that is not decommissioned.
    pub async fn governance_sweep(&self) -> BrokerResult<SweepReport> {
        let mut report = SweepReport::default();
        let all = self.store.list_agents(None, None).await?;
        self.record_departures(&all).await?;
        let (retired, live): (Vec<&Agent>, Vec<&Agent>) = all
            .iter()
            .partition(|a| a.status == AgentStatus::Decommissioned);
        // Nothing is left to fix on a retired agent: its findings close,
        // and nobody is asked to review it (before any escalation, so an
        // overdue item of a retired agent is cancelled, not escalated).
        for a in retired {
            self.close_findings(a, "agent decommissioned", &mut report)
                .await?;
            self.cancel_reviews(a).await?;
        }
        report.escalated = self.escalate_reviews(now()).await?;
        let ctx = self.governance_context().await?;
        for a in live {
            report.agents += 1;
            self.sweep_agent(a, &ctx, &mut report).await?;
        }
        if self.config.governance.schedule_reviews
            && let Some(started) = self.schedule_reviews(&all, now()).await?
        {
            report.scheduled = Some(started.campaign.name);
        }
        self.maturity().await?;
        Ok(report)
    }

    async fn close_findings(
        &self,
        a: &Agent,
        reason: &str,
        report: &mut SweepReport,
    ) -> BrokerResult<()> {
        let open = self.store.findings(Some(&a.id), true).await?;
        if open.is_empty() {
            return Ok(());
        }
        let t = now();
        let mut tx = self.store.begin().await?;
        for f in &open {
            if tx.close_finding(&f.id, reason, t).await? {
                tx.audit(
                    AuditEvent::new(&Actor::System, "governance.finding_closed")
                        .agent(&a.id)
                        .reason(reason)
                        .details(serde_json::json!({ "finding": f.id, "kind": f.kind, "subject": f.subject })),
                )
                .await?;
                report.closed.push(f.id.clone());
            }
        }
        tx.commit().await.map_err(Into::into)
    }

    /// Sponsors no longer active in a configured directory (departed in
    /// config, or gone from it) are recorded as departed now, which starts
    /// `sponsor_reassign_within_days`.
    async fn record_departures(&self, agents: &[Agent]) -> BrokerResult<()> {
        let people = self.directory().await?;
        let mut seen = std::collections::BTreeSet::new();
        for a in agents {
            if a.status == AgentStatus::Decommissioned
                || people.standing(&a.sponsor) != Standing::Gone
                || !seen.insert(super::people::normalize(&a.sponsor))
            {
                continue;
            }
            let reason = if people.get(&a.sponsor).is_some() {
                "marked departed in the people directory"
            } else {
                "no longer in the people directory"
            };
            self.record_departure(&Actor::System, &a.sponsor, reason)
                .await?;
        }
        Ok(())
    }

    /// Open review items of a decommissioned agent are cancelled.
    async fn cancel_reviews(&self, a: &Agent) -> BrokerResult<()> {
        let open = self
            .store
            .review_items(&ReviewFilter {
                agent_id: Some(a.id.clone()),
                open_only: true,
                ..ReviewFilter::default()
            })
            .await?;
        if open.is_empty() {
            return Ok(());
        }
        let campaigns = self.store.review_campaigns().await?;
        for i in open {
            let mut tx = self.store.begin().await?;
            let actor = Actor::System;
            let reason = "agent decommissioned";
            if self
                .cancel_review_item(&mut *tx, &actor, &i.id, reason, &campaigns, now())
                .await?
            {
                tx.commit().await?;
            }
        }
        self.notifier.wake();
        Ok(())
    }

    async fn sweep_agent(
        &self,
        a: &Agent,
        ctx: &Context,
        report: &mut SweepReport,
    ) -> BrokerResult<()> {
        // Judged as it is now, not as listed when the pass began: attested,
        // given a sponsor or used since, it may have nothing left to act on.
        let Some(a) = self.store.get_agent(&a.id).await? else {
            return Ok(());
        };
        if a.status == AgentStatus::Decommissioned {
            return Ok(());
        }
        let a = &a;
        let t = now();
        let c = self.compliance_in(a, ctx, t).await?;
        let open = self.store.findings(Some(&a.id), true).await?;
        let key = |kind: &str, subject: &str| format!("{kind}\u{0}{subject}");
        let current: std::collections::BTreeSet<String> =
            c.issues.iter().map(|i| key(i.kind, &i.subject)).collect();
        let mut tx = self.store.begin().await?;
        for f in &open {
            if !current.contains(&key(&f.kind, &f.subject))
                && tx.close_finding(&f.id, "resolved", t).await?
            {
                tx.audit(
                    AuditEvent::new(&Actor::System, "governance.finding_closed")
                        .agent(&a.id)
                        .reason("resolved")
                        .details(serde_json::json!({ "finding": f.id, "kind": f.kind, "subject": f.subject })),
                )
                .await?;
                report.closed.push(f.id.clone());
            }
        }
        for i in &c.issues {
            // `review_due` is a reminder, not a finding.
            if i.kind == "review_due" {
                continue;
            }
            let f = Finding {
                id: new_id("fd"),
                agent_id: a.id.clone(),
                kind: i.kind.to_owned(),
                subject: i.subject.clone(),
                detail: i.detail.clone(),
                opened_at: t,
                action_due_at: i.action_due_at,
                action: i.action,
                acted_at: None,
                closed_at: None,
                close_reason: None,
            };
            if tx.open_finding(&f).await? {
                tx.audit(
                    AuditEvent::new(&Actor::System, "governance.finding_opened")
                        .agent(&a.id)
                        .reason(f.detail.clone())
                        .details(serde_json::json!({
                            "finding": f.id, "kind": f.kind, "subject": f.subject,
                            "action": f.action,
                            "action_due_at": f.action_due_at.map(crate::model::unix),
                        })),
                )
                .await?;
                report.opened.push(f);
            }
        }
        tx.commit().await?;

        // `remove_unused`: an unused scope is excluded in the registry.
        if c.lifecycle.remove_unused {
            for i in c.issues.iter().filter(|i| i.kind == "unused_scope") {
                if a.exclusion(&i.subject).is_none() {
                    let reason = format!("lifecycle `{}`: {}", c.lifecycle.name, i.detail);
                    self.exclude_scope(&Actor::System, &a.id, &i.subject, &reason)
                        .await?;
                    report.excluded.push((a.id.clone(), i.subject.clone()));
                }
            }
        }

        // Deadlines: the first due action that changes the agent's state.
        let due = self
            .store
            .findings(Some(&a.id), true)
            .await?
            .into_iter()
            .filter(|f| f.acted_at.is_none() && f.action_due_at.is_some_and(|d| d <= t));
        for f in due {
            let Some(action) = f.action else { continue };
            let to = match action {
                LifecycleAction::Notify => continue,
                LifecycleAction::Suspend => AgentStatus::Suspended,
                LifecycleAction::Decommission => AgentStatus::Decommissioned,
            };
            let current = self.agent(&a.id).await?.status;
            if to == AgentStatus::Suspended && current == AgentStatus::Suspended {
                // Suspended by other means (an admin, a detector, the kill
                // switch): the action has not been carried out, so it is
                // not recorded as done. Should the agent be resumed while
                // the finding stands, the next sweep suspends it then.
                continue;
            }
            let applies = match to {
                AgentStatus::Suspended => {
                    matches!(current, AgentStatus::Active | AgentStatus::Pending)
                }
                _ => current != AgentStatus::Decommissioned,
            };
            let reason = format!(
                "lifecycle `{}`: {} ({})",
                c.lifecycle.name, f.kind, f.detail
            );
            let applies = applies
                && match self
                    .set_agent_status(&Actor::System, &a.id, to, &reason)
                    .await
                {
                    Ok(_) => {
                        report.acted.push((a.id.clone(), action));
                        true
                    }
                    // Another sweep (on another replica, or the API's
                    // beside the periodic one) moved the agent first.
                    Err(crate::broker::BrokerError::Conflict(_)) => false,
                    Err(e) => return Err(e),
                };
            let mut tx = self.store.begin().await?;
            if tx.finding_acted(&f.id, now()).await? {
                tx.audit(
                    AuditEvent::new(&Actor::System, "governance.action")
                        .agent(&a.id)
                        .reason(reason)
                        .details(serde_json::json!({
                            "finding": f.id, "kind": f.kind, "action": action,
                            "applied": applies, "status_before": current,
                        })),
                )
                .await?;
            }
            tx.commit().await?;
            if applies {
                break;
            }
        }
        Ok(())
    }
}
