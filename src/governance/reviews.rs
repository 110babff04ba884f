//! Access reviews: a campaign puts one item per agent in front of its
//! sponsor (or its team's lead), with a snapshot of what the agent may reach
//! and has used. Decisions: `attest` (still needed), `narrow` (the registry
//! excludes the named scopes, revoking what they hold), `retire`
//! (decommission). Taking access away needs one reviewer; confirming it
//! needs two distinct ones for a tier-3 agent or under
//! `governance.review_separation`, so a sponsor never attests alone there.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::people::Standing;
use crate::audit::{Actor, AuditEvent};
use crate::broker::{Broker, BrokerError, BrokerResult};
use crate::model::{AgentStatus, new_id, now, unix};

mod decide;
mod schedule;

/// A review campaign.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Campaign {
    pub id: String,
    pub name: String,
    /// Only this team's agents (`None`: every team).
    pub team: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    Open,
    Attested,
    Narrowed,
    Retired,
    /// Closed without a decision of its own: the agent was decommissioned
    /// by other means, or reviewed in another item, before anyone decided.
    Cancelled,
}

impl ReviewState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Attested => "attested",
            Self::Narrowed => "narrowed",
            Self::Retired => "retired",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::str::FromStr for ReviewState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "open" => Self::Open,
            "attested" => Self::Attested,
            "narrowed" => Self::Narrowed,
            "retired" => Self::Retired,
            "cancelled" => Self::Cancelled,
            other => return Err(format!("unknown review state `{other}`")),
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = ReviewVerdict)]
pub enum Verdict {
    Attest,
    Narrow,
    Retire,
}

/// One reviewer's decision on an item.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ReviewDecision {
    /// The operator who decided.
    pub by: String,
    /// Their email, when the directory knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub decision: Verdict,
    /// The scopes a `narrow` removes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub note: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// One agent in one campaign.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ReviewItem {
    pub id: String,
    pub campaign_id: String,
    pub agent_id: String,
    /// Who is asked: the sponsor, else the team's lead.
    pub reviewer: String,
    /// Distinct attestations needed (2: tier 3 or separation).
    pub attestations: u8,
    /// What the reviewer is shown, as it stood when the campaign started.
    pub snapshot: serde_json::Value,
    pub state: ReviewState,
    pub decisions: Vec<ReviewDecision>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub escalated_at: Option<OffsetDateTime>,
}

/// Which items to list.
#[derive(Debug, Clone, Default)]
pub struct ReviewFilter {
    pub campaign_id: Option<String>,
    pub agent_id: Option<String>,
    pub open_only: bool,
}

/// What starting a campaign came to.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Started {
    pub campaign: Campaign,
    pub items: Vec<ReviewItem>,
    /// Agents left out, and why (nothing to review, decommissioned).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Skipped {
    pub agent_id: String,
    pub reason: String,
}

/// A campaign with its items and how far it got.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CampaignView {
    #[serde(flatten)]
    pub campaign: Campaign,
    pub open: usize,
    /// Attested, narrowed or retired.
    pub decided: usize,
    /// Closed without a decision (the agent decommissioned, or reviewed in
    /// another item).
    pub cancelled: usize,
    pub items: Vec<ReviewItem>,
}

/// The operator deciding, as the broker sees them.
#[derive(Debug, Clone)]
pub struct Reviewer {
    pub operator: String,
    /// May decide any item (admin, approver); else only items assigned to
    /// their email.
    pub any_item: bool,
}

/// A decision as asked for.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ReviewDecisionRequest)]
pub struct DecisionRequest {
    pub decision: Verdict,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub note: String,
}

/// Campaign names appear in URLs and file names: keep them plain.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

impl Broker {
    /// Starts a campaign: one item per agent (of `team`, if given) that is
    /// not decommissioned and may reach at least one scope.
    pub async fn start_review(
        &self,
        actor: &Actor,
        name: &str,
        team: Option<String>,
        due_days: Option<u32>,
    ) -> BrokerResult<Started> {
        self.open_campaign(actor, name, team, None, due_days).await
    }

    /// A campaign over the agents of `team` (or every team), or only those
    /// in `only`.
    async fn open_campaign(
        &self,
        actor: &Actor,
        name: &str,
        team: Option<String>,
        only: Option<&[String]>,
        due_days: Option<u32>,
    ) -> BrokerResult<Started> {
        if !valid_name(name) {
            return Err(BrokerError::InvalidRequest(
                "a campaign `name` is 1-64 characters of letters, digits, `-`, `.`, `_` (e.g. `2026-Q4`)"
                    .into(),
            ));
        }
        let due_days = due_days.unwrap_or(self.config.governance.review_due_days);
        if !(1..=366).contains(&due_days) {
            return Err(BrokerError::InvalidRequest(
                "`due` must be 1 to 366 days".into(),
            ));
        }
        let t = now();
        let campaign = Campaign {
            id: new_id("rv"),
            name: name.to_owned(),
            team: team.clone(),
            created_at: t,
            created_by: actor.render(),
            due_at: t + time::Duration::days(i64::from(due_days)),
        };
        let ctx = self.governance_context().await?;
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for a in self.store.list_agents(None, None).await? {
            if team.as_deref().is_some_and(|t| t != a.team)
                || only.is_some_and(|ids| !ids.contains(&a.id))
            {
                continue;
            }
            if a.status == AgentStatus::Decommissioned {
                continue;
            }
            let c = self.compliance_in(&a, &ctx, t).await?;
            if c.permitted_scopes.is_empty() {
                skipped.push(Skipped {
                    agent_id: a.id.clone(),
                    reason: "it may reach no scope: nothing to review".into(),
                });
                continue;
            }
            let reviewer = reviewer_of(&ctx.people, &a);
            let two = a.risk_tier >= 3 || self.config.governance.review_separation;
            items.push(ReviewItem {
                id: new_id("ri"),
                campaign_id: campaign.id.clone(),
                agent_id: a.id.clone(),
                reviewer,
                attestations: if two { 2 } else { 1 },
                snapshot: serde_json::json!({
                    "status": c.status,
                    "team": c.team,
                    "sponsor": c.sponsor,
                    "risk_tier": c.risk_tier,
                    "max_ttl_secs": a.max_ttl_secs,
                    "permitted_scopes": c.permitted_scopes,
                    "excluded_scopes": a.excluded_scopes,
                    "last_used_at": c.last_used_at.map(unix),
                    "last_review_at": c.last_review_at.map(unix),
                    "issues": c.issues,
                }),
                state: ReviewState::Open,
                decisions: Vec::new(),
                decided_at: None,
                escalated_at: None,
            });
        }
        let mut tx = self.store.begin().await?;
        tx.insert_campaign(&campaign).await?;
        tx.audit(
            AuditEvent::new(actor, "review.campaign_started").details(serde_json::json!({
                "campaign": campaign.id, "name": campaign.name, "team": campaign.team,
                "due_at": unix(campaign.due_at), "items": items.len(),
                "skipped": skipped.iter().map(|s| &s.agent_id).collect::<Vec<_>>(),
            })),
        )
        .await?;
        for i in &items {
            tx.insert_review_item(i).await?;
            tx.audit(
                AuditEvent::new(actor, "review.item_opened")
                    .agent(&i.agent_id)
                    .details(serde_json::json!({
                        "campaign": campaign.id, "item": i.id, "reviewer": i.reviewer,
                        "attestations": i.attestations,
                        "permitted_scopes": i.snapshot["permitted_scopes"]
                            .as_array().map(|v| v.iter().map(|s| s["scope"].clone()).collect::<Vec<_>>()),
                    })),
            )
            .await?;
            let slack_to = self.slack_user_of(&i.reviewer);
            for n in self
                .notifier
                .review_requested(i, &campaign, slack_to.as_deref())
            {
                tx.insert_notification(&n).await?;
            }
        }
        tx.commit().await?;
        self.notifier.wake();
        Ok(Started {
            campaign,
            items,
            skipped,
        })
    }

    /// Every campaign, newest first, with its counts (no items).
    pub async fn review_campaigns(&self) -> BrokerResult<Vec<CampaignView>> {
        let mut out = Vec::new();
        for c in self.store.review_campaigns().await? {
            let mut v = self.campaign_view(c).await?;
            v.items.clear();
            out.push(v);
        }
        Ok(out)
    }

    /// One campaign by id or name, with its items.
    pub async fn review_campaign(&self, key: &str) -> BrokerResult<CampaignView> {
        let c = self
            .store
            .review_campaigns()
            .await?
            .into_iter()
            .find(|c| c.id == key || c.name == key)
            .ok_or_else(|| BrokerError::NotFound(format!("no review campaign `{key}`")))?;
        self.campaign_view(c).await
    }

    async fn campaign_view(&self, c: Campaign) -> BrokerResult<CampaignView> {
        let items = self
            .store
            .review_items(&ReviewFilter {
                campaign_id: Some(c.id.clone()),
                ..ReviewFilter::default()
            })
            .await?;
        let count = |s: ReviewState| items.iter().filter(|i| i.state == s).count();
        let (open, cancelled) = (count(ReviewState::Open), count(ReviewState::Cancelled));
        Ok(CampaignView {
            campaign: c,
            open,
            decided: items.len() - open - cancelled,
            cancelled,
            items,
        })
    }

    pub async fn review_item(&self, id: &str) -> BrokerResult<ReviewItem> {
        self.store
            .review_item(id)
            .await?
            .ok_or_else(|| BrokerError::NotFound(format!("no review item `{id}`")))
    }

    /// The Slack user id of the operator with this email, for reminders
    /// sent as a direct message.
    fn slack_user_of(&self, email: &str) -> Option<String> {
        self.config
            .operators
            .iter()
            .find(|o| {
                o.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
            })
            .and_then(|o| o.slack_user_id.clone())
    }
}

/// Who reviews agent `a` as it is now: its sponsor, or its team's lead
/// (`lead = true`) when the sponsor has left.
pub(crate) fn reviewer_of(people: &super::people::Directory, a: &crate::model::Agent) -> String {
    match people.standing(&a.sponsor) {
        Standing::Active | Standing::Unknown => a.sponsor.clone(),
        Standing::Departed(_) | Standing::Gone => people
            .team_lead(&a.team)
            .map_or_else(|| a.sponsor.clone(), |p| p.email.clone()),
    }
}
