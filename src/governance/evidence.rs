//! The auditor's evidence pack for a period: seed 000's five items, built
//! from the store and the audit log only, with the audit-chain head it was
//! built from.
//!
//! 1. the registry (every agent: team, sponsor, permitted scopes,
//!    credential types, TTL, last review, state, maturity);
//! 2. provisioning records (each creation and widening with its approvals,
//!    and whether it took effect without one);
//! 3. access review records (review campaign items with their decisions
//!    and who made them; findings opened, closed and acted on, the
//!    identities deprovisioned by lifecycle actions, and continuous
//!    validation's incidents with what was done and who resolved them);
//! 4. credential audit (every credential live in the period: issue, scope,
//!    end);
//! 5. deprovisioning records (each agent retired in the period and each
//!    team or sponsor change: the trigger, the deadline, and whether every
//!    credential was confirmed ended, or the agent reviewed, by then).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::broker::{Broker, BrokerResult};
use crate::model::{
    AgentStatus, ApprovalFilter, ApprovalKind, ApprovalState, LeaseFilter, LeaseState,
};
use crate::store::AuditFilter;

mod deprovisioning;
pub mod report;
pub use deprovisioning::DeprovisioningRecord;

/// A period's bound: a day (`2026-10-01`: its start, or with `end_of_day`
/// the start of the next) or an RFC 3339 instant.
pub fn parse_instant(s: &str, end_of_day: bool) -> Option<OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let day =
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    let start = day.midnight().assume_utc();
    Some(if end_of_day {
        start + time::Duration::days(1)
    } else {
        start
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvidencePack {
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    /// The last audit event when the pack was built (`seq`, `hash`).
    pub audit_head: Option<(i64, String)>,
    pub summary: Summary,
    pub registry: Vec<RegistryRow>,
    pub provisioning: Vec<ProvisioningRecord>,
    pub reviews: Vec<ReviewRecord>,
    pub credentials: Vec<CredentialRecord>,
    pub deprovisioning: Vec<DeprovisioningRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    pub agents: usize,
    pub maturity: String,
    pub provisioning_records: usize,
    pub provisioned_without_approval: usize,
    pub findings_opened: usize,
    pub findings_closed: usize,
    /// Review campaign items opened or decided in the period, and how many
    /// of them are decided.
    #[serde(default)]
    pub review_items: usize,
    #[serde(default)]
    pub review_items_decided: usize,
    pub lifecycle_actions: usize,
    /// Continuous validation's incidents opened in the period, and how
    /// many of those are resolved.
    #[serde(default)]
    pub incidents_opened: usize,
    #[serde(default)]
    pub incidents_resolved: usize,
    pub credentials: usize,
    pub credentials_still_live: usize,
    pub deprovisioned: usize,
    pub deprovisioned_fully_revoked: usize,
    /// Retirements whose every credential was confirmed ended or fenced
    /// within `deprovision_within_hours`.
    #[serde(default)]
    pub deprovisioned_within_deadline: usize,
    /// Team or sponsor changes, and how many were reviewed in time.
    #[serde(default)]
    pub ownership_changes: usize,
    #[serde(default)]
    pub ownership_changes_reviewed_in_time: usize,
    /// Credentials issued per ISO week (`2026-W40`), for the report's chart.
    pub credentials_per_week: Vec<(String, usize)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistryRow {
    pub agent: String,
    pub team: String,
    pub sponsor: String,
    pub risk_tier: u8,
    pub environment: String,
    pub status: String,
    pub permitted_scopes: String,
    pub credential_types: String,
    pub max_ttl_secs: u64,
    pub created_at: String,
    pub last_used_at: String,
    pub last_review_at: String,
    pub next_review_due: String,
    pub maturity: String,
    pub open_issues: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProvisioningRecord {
    pub agent: String,
    /// `registration` or `update`.
    pub change: String,
    pub approval: String,
    pub state: String,
    pub requested_by: String,
    pub requested_at: String,
    pub approved_by: String,
    pub decided_at: String,
    /// Scopes a widening change asked for.
    pub widened_scopes: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReviewRecord {
    /// The finding's id, or the review item's.
    pub id: String,
    pub agent: String,
    pub kind: String,
    pub subject: String,
    pub detail: String,
    pub opened_at: String,
    pub action: String,
    pub acted_at: String,
    pub closed_at: String,
    pub close_reason: String,
    /// Review items: the operators who decided, space-separated.
    #[serde(default)]
    pub decided_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CredentialRecord {
    pub lease: String,
    pub agent: String,
    pub task: String,
    pub scope: String,
    pub provider: String,
    pub issued_at: String,
    /// The agent obtained it then; Keygate does not see its later use at
    /// the backend.
    pub last_use: String,
    pub expires_at: String,
    pub ended_at: String,
    pub state: String,
    pub end_reason: String,
}

fn ts(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn opt(t: Option<OffsetDateTime>) -> String {
    t.map(ts).unwrap_or_default()
}

impl Broker {
    /// Every audit event with `action` (of `agent`, if given) in the
    /// period, in order.
    async fn events(
        &self,
        action: &str,
        agent: Option<&str>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> BrokerResult<Vec<AuditEvent>> {
        let (lo, hi) = (from.unix_timestamp() * 1000, to.unix_timestamp() * 1000);
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .store
                .audit_events(&AuditFilter {
                    after_seq: after,
                    agent: agent.map(str::to_owned),
                    task: None,
                    action: Some(action.to_owned()),
                    limit: 5000,
                })
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            out.extend(page.into_iter().filter(|e| (lo..hi).contains(&e.at_ms)));
        }
        Ok(out)
    }

    /// Seed 000's registry table: one row per agent.
    pub async fn registry_rows(
        &self,
        agents: &[crate::model::Agent],
    ) -> BrokerResult<Vec<RegistryRow>> {
        let mut registry = Vec::new();
        for a in agents {
            let c = self.compliance(a).await?;
            let providers: std::collections::BTreeSet<String> = c
                .permitted_scopes
                .iter()
                .filter_map(|s| self.config.scopes.iter().find(|x| x.name == s.scope))
                .map(|s| s.provider.clone())
                .collect();
            registry.push(RegistryRow {
                agent: a.id.clone(),
                team: a.team.clone(),
                sponsor: a.sponsor.clone(),
                risk_tier: a.risk_tier,
                environment: a.environment.to_string(),
                status: a.status.to_string(),
                permitted_scopes: c
                    .permitted_scopes
                    .iter()
                    .map(|s| s.scope.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                credential_types: providers.into_iter().collect::<Vec<_>>().join(" "),
                max_ttl_secs: c
                    .permitted_scopes
                    .iter()
                    .map(|s| a.cap_ttl(s.max_ttl_secs))
                    .max()
                    .unwrap_or(0),
                created_at: ts(a.created_at),
                last_used_at: opt(a.last_used_at),
                last_review_at: opt(a.last_review_at),
                next_review_due: ts(c.next_review_due),
                maturity: c.maturity.level.to_owned(),
                open_issues: c
                    .issues
                    .iter()
                    .map(|i| i.kind)
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
        Ok(registry)
    }

    /// The evidence pack for `[from, to)`.
    pub async fn evidence(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> BrokerResult<EvidencePack> {
        let generated_at = crate::model::now();
        let maturity = self.maturity().await?;
        let agents = self.store.list_agents(None, None).await?;
        let mut summary = Summary {
            maturity: maturity.level.to_owned(),
            ..Summary::default()
        };

        // 1. Registry.
        let registry = self.registry_rows(&agents).await?;
        summary.agents = agents
            .iter()
            .filter(|a| a.status != AgentStatus::Decommissioned)
            .count();

        // 2. Provisioning: approvals in the period, and agents created in
        // it with none granted.
        let mut approvals = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_approvals(&ApprovalFilter {
                    kind: Some(ApprovalKind::Provisioning),
                    cursor: cursor.clone(),
                    ..ApprovalFilter::default()
                })
                .await?;
            let full = page.len() == crate::model::MAX_PAGE as usize;
            cursor = page
                .last()
                .map(|a| crate::model::Cursor::of(a.created_at, &a.id));
            approvals.extend(page);
            if !full {
                break;
            }
        }
        let mut provisioning = Vec::new();
        for ap in approvals
            .iter()
            .filter(|ap| ap.created_at >= from && ap.created_at < to)
        {
            let approvers: Vec<&str> = ap
                .decisions
                .iter()
                .filter(|d| d.decision == crate::model::Verdict::Approve)
                .map(|d| d.operator.as_str())
                .collect();
            provisioning.push(ProvisioningRecord {
                agent: ap.agent_id.clone(),
                change: ap.request["change"]
                    .as_str()
                    .unwrap_or("registration")
                    .to_owned(),
                approval: ap.id.clone(),
                state: ap.state.to_string(),
                requested_by: ap.requester.clone(),
                requested_at: ts(ap.created_at),
                approved_by: approvers.join(" "),
                decided_at: opt(ap.decided_at),
                widened_scopes: ap.request["widened_scopes"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default(),
            });
        }
        for a in agents
            .iter()
            .filter(|a| a.created_at >= from && a.created_at < to)
        {
            let granted = approvals
                .iter()
                .any(|ap| ap.agent_id == a.id && ap.state == ApprovalState::Approved);
            if !granted {
                summary.provisioned_without_approval += 1;
                provisioning.push(ProvisioningRecord {
                    agent: a.id.clone(),
                    change: "registration".into(),
                    approval: String::new(),
                    state: "without_approval".into(),
                    requested_by: String::new(),
                    requested_at: ts(a.created_at),
                    approved_by: String::new(),
                    decided_at: String::new(),
                    widened_scopes: String::new(),
                });
            }
        }
        summary.provisioning_records = provisioning.len();

        // 3. Reviews: findings touched in the period.
        let mut reviews = Vec::new();
        for f in self.store.findings(None, false).await? {
            let touched = |t: Option<OffsetDateTime>| t.is_some_and(|t| t >= from && t < to);
            if !(touched(Some(f.opened_at)) || touched(f.closed_at) || touched(f.acted_at)) {
                continue;
            }
            summary.findings_opened += usize::from(touched(Some(f.opened_at)));
            summary.findings_closed += usize::from(touched(f.closed_at));
            summary.lifecycle_actions += usize::from(touched(f.acted_at));
            reviews.push(ReviewRecord {
                id: f.id,
                agent: f.agent_id,
                kind: f.kind,
                subject: f.subject,
                detail: f.detail,
                opened_at: ts(f.opened_at),
                action: f
                    .action
                    .and_then(|a| serde_json::to_value(a).ok())
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                acted_at: opt(f.acted_at),
                closed_at: opt(f.closed_at),
                close_reason: f.close_reason.unwrap_or_default(),
                decided_by: String::new(),
            });
        }

        // ... and review campaign items opened or decided in the period: one
        // row each, its decisions and who made them.
        let campaigns = self.store.review_campaigns().await?;
        for i in self
            .store
            .review_items(&super::reviews::ReviewFilter::default())
            .await?
        {
            let Some(c) = campaigns.iter().find(|c| c.id == i.campaign_id) else {
                continue;
            };
            let touched = |t: Option<OffsetDateTime>| t.is_some_and(|t| t >= from && t < to);
            if !(touched(Some(c.created_at)) || touched(i.decided_at) || touched(i.escalated_at)) {
                continue;
            }
            summary.review_items += 1;
            // Cancelled items closed without anyone deciding them.
            summary.review_items_decided += usize::from(
                i.decided_at.is_some() && i.state != super::reviews::ReviewState::Cancelled,
            );
            let decisions: Vec<String> = i
                .decisions
                .iter()
                .map(|d| {
                    let verdict = serde_json::to_value(d.decision)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let scopes = if d.scopes.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", d.scopes.join(","))
                    };
                    format!("{verdict}{scopes} by {} at {}", d.by, ts(d.at))
                })
                .collect();
            let decided_by: Vec<&str> = i.decisions.iter().map(|d| d.by.as_str()).collect();
            reviews.push(ReviewRecord {
                id: i.id.clone(),
                decided_by: decided_by.join(" "),
                agent: i.agent_id,
                kind: "review_item".into(),
                subject: c.name.clone(),
                detail: format!(
                    "reviewer {}; {} attestation(s) needed; {}",
                    i.reviewer,
                    i.attestations,
                    if decisions.is_empty() {
                        "no decision".to_owned()
                    } else {
                        decisions.join("; ")
                    }
                ),
                opened_at: ts(c.created_at),
                action: i
                    .escalated_at
                    .map(|t| format!("escalated at {}", ts(t)))
                    .unwrap_or_default(),
                acted_at: opt(i.decided_at),
                closed_at: opt(i.decided_at),
                close_reason: i.state.as_str().to_owned(),
            });
        }

        // ... and continuous validation's incidents opened in the period.
        for i in self.incidents(None).await? {
            if i.opened_at < from || i.opened_at >= to {
                continue;
            }
            let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let action = name(serde_json::json!(i.action));
            summary.incidents_opened += 1;
            summary.incidents_resolved += usize::from(i.resolved_at.is_some());
            reviews.push(ReviewRecord {
                id: i.id,
                agent: i.agent,
                kind: "incident".into(),
                subject: i.detector,
                detail: format!(
                    "{} ({} severity): observed {}; {}",
                    name(serde_json::json!(i.signal)),
                    name(serde_json::json!(i.severity)),
                    i.observed,
                    i.evidence
                ),
                opened_at: ts(i.opened_at),
                action: if i.dry_run {
                    format!("{action} (dry run: not taken)")
                } else {
                    action
                },
                acted_at: if i.dry_run {
                    String::new()
                } else {
                    ts(i.opened_at)
                },
                closed_at: opt(i.resolved_at),
                close_reason: i.resolution.unwrap_or_default(),
                decided_by: i.resolved_by.unwrap_or_default(),
            });
        }

        // 4. Credentials live in the period.
        let mut credentials = Vec::new();
        let mut per_week: std::collections::BTreeMap<String, usize> = Default::default();
        let mut cursor = None;
        loop {
            let page = self
                .store
                .list_leases(&LeaseFilter {
                    cursor: cursor.clone(),
                    ..LeaseFilter::default()
                })
                .await?;
            let full = page.len() == crate::model::MAX_PAGE as usize;
            cursor = page
                .last()
                .map(|l| crate::model::Cursor::of(l.created_at, &l.id));
            for l in page {
                let ended = l.ended_at.unwrap_or(l.expires_at.max(generated_at));
                if l.created_at >= to || ended < from || l.state == LeaseState::Failed {
                    continue;
                }
                if l.created_at >= from {
                    let (y, w, _) = l.created_at.to_iso_week_date();
                    *per_week.entry(format!("{y}-W{w:02}")).or_default() += 1;
                }
                summary.credentials_still_live += usize::from(matches!(
                    l.state,
                    LeaseState::Active | LeaseState::Pending | LeaseState::Revoking
                ));
                credentials.push(CredentialRecord {
                    lease: l.id,
                    agent: l.agent_id,
                    task: l.task_id,
                    scope: l.scope,
                    provider: l.provider,
                    issued_at: ts(l.created_at),
                    last_use: ts(l.created_at),
                    expires_at: ts(l.expires_at),
                    ended_at: opt(l.ended_at),
                    state: l.state.to_string(),
                    end_reason: l.end_reason.unwrap_or_default(),
                });
            }
            if !full {
                break;
            }
        }
        summary.credentials = credentials.len();
        summary.credentials_per_week = per_week.into_iter().collect();

        // 5. Deprovisioning: retirements and ownership changes.
        let deprovisioning = self.deprovisioning(from, to, &mut summary).await?;

        // The head last: every record above has its events at or before it,
        // so `evidence verify --db` can trace each one in the log.
        let audit_head = self.store.audit_head().await?;
        Ok(EvidencePack {
            from,
            to,
            generated_at,
            audit_head,
            summary,
            registry,
            provisioning,
            reviews,
            credentials,
            deprovisioning,
        })
    }
}
