//! `[governance]` and `[[lifecycle]]`: how often agents are reviewed, when
//! an unused identity or scope is flagged, and what happens when nobody acts.

use serde::Deserialize;

use crate::model::{Agent, Environment};

/// `[governance]`: the sweep that finds compliance issues and acts on them.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GovernanceConfig {
    /// Seconds between sweeps (also run at start and by
    /// `POST /v1/governance/sweep`).
    pub sweep_interval_secs: u64,
    /// A credential this long-lived or longer is not "short-lived" for the
    /// maturity score's Optimizing level.
    pub short_ttl_secs: u64,
    /// Days a review campaign's items are due after it starts, unless
    /// `--due` says otherwise.
    pub review_due_days: u32,
    /// Separation of duties in reviews: a sponsor's attestation never
    /// stands alone; someone who does not sponsor the agent attests too.
    /// (Tier-3 agents always need that second reviewer.)
    pub review_separation: bool,
    /// The sweep starts a review campaign by itself for agents whose review
    /// is due (`review_every_days`, from `remind_before_days` before) and
    /// not already in an open item.
    pub schedule_reviews: bool,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        Self {
            sweep_interval_secs: 3600,
            short_ttl_secs: 3600,
            review_due_days: 14,
            review_separation: false,
            schedule_reviews: true,
        }
    }
}

/// What happens to an agent when a deadline passes with nobody acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    /// Record the finding (audit log, compliance issues) and nothing else.
    Notify,
    /// Suspend the agent: its tasks end and its credentials are revoked.
    Suspend,
    /// Decommission it for good, revoking everything.
    Decommission,
}

/// Which agents a `[[lifecycle]]` entry applies to; every given field must
/// match. An entry without `match` is the default for all.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, utoipa::ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleMatch {
    pub risk_tier: Option<u8>,
    pub environment: Option<Environment>,
    /// `key=value`: the agent carries this label.
    pub label: Option<String>,
}

impl LifecycleMatch {
    fn matches(&self, a: &Agent) -> bool {
        self.risk_tier.is_none_or(|t| t == a.risk_tier)
            && self.environment.is_none_or(|e| e == a.environment)
            && self.label.as_deref().is_none_or(|l| {
                l.split_once('=')
                    .is_some_and(|(k, v)| a.labels.get(k).is_some_and(|x| x == v))
            })
    }

    /// How many fields it names: the most specific entry wins.
    fn specificity(&self) -> usize {
        usize::from(self.risk_tier.is_some())
            + usize::from(self.environment.is_some())
            + usize::from(self.label.is_some())
    }
}

/// One `[[lifecycle]]` entry. Days throughout; omitted fields take the
/// defaults below.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LifecyclePolicy {
    /// A name for messages and the agent's effective policy.
    pub name: String,
    #[serde(rename = "match")]
    pub matches: LifecycleMatch,
    /// A review is due this long after the last one (or the registration).
    pub review_every_days: u32,
    /// `review_due` shows this long before the due date.
    pub remind_before_days: u32,
    /// After the due date, this long before `overdue_action`.
    pub grace_days: u32,
    pub overdue_action: LifecycleAction,
    /// No authentication for this long (since registration, if never) →
    /// `dormant`.
    pub dormant_after_days: u32,
    /// Dormant this much longer → `dormant_action`.
    pub dormant_grace_days: u32,
    pub dormant_action: LifecycleAction,
    /// A scope policy lets the agent reach that it has not used for this
    /// long (since registration, if never) → `unused_scope`.
    pub unused_scope_after_days: u32,
    /// A reachable scope whose `max_ttl_secs` passes this → `long_ttl`.
    pub max_credential_ttl_secs: u64,
    /// An `unused_scope` finding also excludes the scope from the agent in
    /// the registry (an admin lifts it: `keygate agents include`).
    pub remove_unused: bool,
    /// When the sponsor leaves, this many business days to name another
    /// before `orphan_action`.
    pub sponsor_reassign_within_days: u32,
    pub orphan_action: LifecycleAction,
    /// After retirement every credential must be confirmed ended, and
    /// after a team or sponsor change the agent reviewed, within this many
    /// hours; the evidence pack's deprovisioning records say whether.
    pub deprovision_within_hours: u32,
    /// Usage limit: credentials the agent may obtain per minute (that
    /// many at once, refilled at that rate); more are refused with 429.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_credentials_per_minute: Option<u32>,
    /// Usage limit: live (pending or active, unexpired) credentials the
    /// agent may hold at once; more are refused with 429.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_live_leases: Option<u32>,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self {
            name: "default".into(),
            matches: LifecycleMatch::default(),
            review_every_days: 90,
            remind_before_days: 14,
            grace_days: 14,
            overdue_action: LifecycleAction::Notify,
            dormant_after_days: 60,
            dormant_grace_days: 14,
            dormant_action: LifecycleAction::Suspend,
            unused_scope_after_days: 30,
            max_credential_ttl_secs: 86_400,
            remove_unused: false,
            sponsor_reassign_within_days: 5,
            orphan_action: LifecycleAction::Suspend,
            deprovision_within_hours: 24,
            max_credentials_per_minute: None,
            max_live_leases: None,
        }
    }
}

/// The entry that governs `agent`: the most specific matching one (the
/// first of equals), else the built-in default.
pub fn effective<'a>(policies: &'a [LifecyclePolicy], agent: &Agent) -> LifecyclePolicy {
    policies
        .iter()
        .filter(|p| p.matches.matches(agent))
        .fold(None::<&'a LifecyclePolicy>, |best, p| match best {
            Some(b) if b.matches.specificity() >= p.matches.specificity() => Some(b),
            _ => Some(p),
        })
        .cloned()
        .unwrap_or_default()
}

/// Checks the entries: names unique, periods positive, labels `k=v`.
pub fn validate(policies: &[LifecyclePolicy]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for p in policies {
        if !names.insert(p.name.as_str()) {
            return Err(format!("`[[lifecycle]]` `{}` is declared twice", p.name));
        }
        for (field, v) in [
            ("review_every_days", p.review_every_days),
            ("dormant_after_days", p.dormant_after_days),
            ("unused_scope_after_days", p.unused_scope_after_days),
            ("deprovision_within_hours", p.deprovision_within_hours),
        ] {
            if v == 0 {
                return Err(format!(
                    "`[[lifecycle]]` `{}`: `{field}` must be at least 1",
                    p.name
                ));
            }
        }
        if p.remind_before_days >= p.review_every_days {
            return Err(format!(
                "`[[lifecycle]]` `{}`: `remind_before_days` must be less than `review_every_days`",
                p.name
            ));
        }
        if let Some(l) = &p.matches.label
            && l.split_once('=').is_none_or(|(k, _)| k.is_empty())
        {
            return Err(format!(
                "`[[lifecycle]]` `{}`: `match.label` must be `key=value`",
                p.name
            ));
        }
    }
    Ok(())
}
