//! Seed 000's maturity levels — Initial, Developing, Defined, Managed,
//! Optimizing — per agent and overall, from facts Keygate holds. Each level
//! lists the criteria it needs and whether each is met, so the score says
//! what to fix, not only where one stands.

use serde::Serialize;

use super::compliance::{Issue, Reachable};
use crate::model::Agent;

/// The five levels, lowest first.
pub const LEVELS: [&str; 5] = ["initial", "developing", "defined", "managed", "optimizing"];

/// One criterion of one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Criterion {
    pub level: &'static str,
    pub name: &'static str,
    pub met: bool,
    pub detail: String,
}

/// An agent's level: the highest whose criteria, and those of every level
/// below, are all met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AgentMaturity {
    pub level: &'static str,
    pub criteria: Vec<Criterion>,
}

/// What the criteria are judged on besides the compliance issues.
pub struct Inputs<'a> {
    pub agent: &'a Agent,
    pub reachable: &'a [Reachable],
    pub issues: &'a [Issue],
    /// A provisioning approval was granted for the agent.
    pub approved_provisioning: bool,
    /// `governance.short_ttl_secs`.
    pub short_ttl_secs: u64,
}

pub fn of_agent(i: &Inputs<'_>) -> AgentMaturity {
    let has = |kind: &str| i.issues.iter().any(|x| x.kind == kind);
    let a = i.agent;
    let own_identity = (a.federated.is_some()
        || a.jwks["keys"].as_array().is_some_and(|k| !k.is_empty()))
        && !has("shared_identity");
    let longest = i.reachable.iter().map(|r| r.max_ttl_secs).max();
    let c = |level, name, met, detail: String| Criterion {
        level,
        name,
        met,
        detail,
    };
    let criteria = vec![
        c(
            "developing",
            "own_identity",
            own_identity,
            "the agent authenticates as itself (its own key or workload identity), not a shared account".into(),
        ),
        c("defined", "owner", !a.team.trim().is_empty(), format!("owning team `{}`", a.team)),
        c("defined", "sponsor", !has("no_sponsor"), format!("sponsor `{}`", a.sponsor)),
        c(
            "defined",
            "defined_scope",
            !i.reachable.is_empty(),
            format!("{} scope(s) policy lets it reach", i.reachable.len()),
        ),
        c(
            "defined",
            "bounded_ttl",
            !has("long_ttl"),
            match longest {
                Some(s) => format!("longest credential {s} s"),
                None => "no credential".into(),
            },
        ),
        c(
            "defined",
            "approved_provisioning",
            i.approved_provisioning,
            if i.approved_provisioning {
                "a provisioning approval was granted".into()
            } else {
                "registered without a provisioning approval (`provisioning.require_approval`)".into()
            },
        ),
        c("managed", "reviewed_on_time", !has("review_overdue"), "access review not overdue".into()),
        c("managed", "in_use", !has("dormant"), "not dormant".into()),
        c(
            "optimizing",
            "short_lived_credentials",
            longest.is_none_or(|s| s <= i.short_ttl_secs),
            format!("every credential at most {} s", i.short_ttl_secs),
        ),
        c("optimizing", "least_privilege", !has("unused_scope"), "no reachable scope left unused".into()),
    ];
    let mut level = LEVELS[0];
    for l in &LEVELS[1..] {
        if criteria.iter().filter(|c| c.level == *l).all(|c| c.met) {
            level = l;
        } else {
            break;
        }
    }
    AgentMaturity { level, criteria }
}

/// The lowest of the levels (an estate is as mature as its weakest agent);
/// `initial` when there is none.
pub fn overall<'a>(levels: impl IntoIterator<Item = &'a str>) -> &'static str {
    levels
        .into_iter()
        .filter_map(|l| LEVELS.iter().position(|x| *x == l))
        .min()
        .map_or(LEVELS[0], |i| LEVELS[i])
}
