//! An agent's compliance issues under its effective lifecycle policy, like
//! Entra's `complianceIssues`: computed from facts alone (the agent, the
//! scopes policy lets it reach, its per-scope use, the time), so the API,
//! the sweep and the tests agree.

use serde::Serialize;
use time::{Duration, OffsetDateTime};

use super::ScopeUsage;
use super::people::{Standing, add_business_days};
use crate::config::{LifecycleAction, LifecyclePolicy};
use crate::model::{Agent, AgentStatus};

/// A scope policy lets the agent reach (at some time, with some TTL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Reachable {
    pub scope: String,
    pub max_ttl_secs: u64,
}

/// One compliance issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Issue {
    /// `shared_identity`, `no_sponsor`, `sponsor_departed`, `review_due`,
    /// `review_overdue`, `dormant`, `unused_scope`, `long_ttl`,
    /// `credential_expired`, `key_rotation_due`, `ownership_changed`.
    pub kind: &'static str,
    /// The scope, for `unused_scope` and `long_ttl`; empty otherwise.
    pub subject: String,
    pub detail: String,
    /// What happens when nobody acts, and when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<LifecycleAction>,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub action_due_at: Option<OffsetDateTime>,
}

/// Everything the issues are computed from.
pub struct Facts<'a> {
    pub agent: &'a Agent,
    pub policy: &'a LifecyclePolicy,
    pub reachable: &'a [Reachable],
    pub usage: &'a [ScopeUsage],
    /// Other agents (not decommissioned) registered with one of its keys.
    pub shares_key_with: &'a [String],
    /// Where its sponsor stands in the people directory.
    pub sponsor: Standing,
    pub now: OffsetDateTime,
}

/// The public members of each key in a JWKS, for comparing keys whatever
/// their `kid`, `alg` or `use`.
pub fn key_fingerprints(jwks: &serde_json::Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| {
            ["kty", "crv", "x", "y", "n", "e"]
                .iter()
                .map(|m| k[m].as_str().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

fn days(n: u32) -> Duration {
    Duration::days(i64::from(n))
}

fn date(t: OffsetDateTime) -> String {
    t.date().to_string()
}

/// When the agent's next review is due: `review_every_days` after the last
/// review, or after registration if it was never reviewed.
pub fn next_review_due(agent: &Agent, policy: &LifecyclePolicy) -> OffsetDateTime {
    agent.last_review_at.unwrap_or(agent.created_at) + days(policy.review_every_days)
}

/// The action of a deadline: `None` when it only notifies.
fn acting(
    action: LifecycleAction,
    due: OffsetDateTime,
) -> (Option<LifecycleAction>, Option<OffsetDateTime>) {
    match action {
        LifecycleAction::Notify => (Some(action), None),
        other => (Some(other), Some(due)),
    }
}

/// What its declared `credential` block asks (agents as code records it as
/// the labels `credential_expires` and `credential_rotation_days`): a key
/// past its expiry, a key older than its rotation period.
fn credential_issues(
    a: &Agent,
    now: OffsetDateTime,
    push: &mut impl FnMut(&'static str, &str, String, (Option<LifecycleAction>, Option<OffsetDateTime>)),
) {
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    if let Some(exp) = a
        .labels
        .get("credential_expires")
        .and_then(|e| OffsetDateTime::parse(e, rfc3339).ok())
        && now >= exp
    {
        push(
            "credential_expired",
            "",
            format!(
                "its declared credential expired on {}: rotate its key and update `credential.expires`",
                date(exp)
            ),
            (None, None),
        );
    }
    if let Some(every) = a
        .labels
        .get("credential_rotation_days")
        .and_then(|d| d.parse::<u32>().ok())
    {
        let since = a.keys_rotated_at.unwrap_or(a.created_at);
        if now >= since + days(every) {
            push(
                "key_rotation_due",
                "",
                format!(
                    "its keys were last set on {}; `credential.rotation_days` asks for new ones every {every} days",
                    date(since)
                ),
                (None, None),
            );
        }
    }
}

/// The agent's open compliance issues now. A decommissioned agent has none.
pub fn issues(f: &Facts<'_>) -> Vec<Issue> {
    let (a, p, now) = (f.agent, f.policy, f.now);
    let mut out = Vec::new();
    if a.status == AgentStatus::Decommissioned {
        return out;
    }
    let mut push = |kind,
                    subject: &str,
                    detail: String,
                    act: (Option<LifecycleAction>, Option<OffsetDateTime>)| {
        out.push(Issue {
            kind,
            subject: subject.to_owned(),
            detail,
            action: act.0,
            action_due_at: act.1,
        });
    };
    if !f.shares_key_with.is_empty() {
        push(
            "shared_identity",
            "",
            format!(
                "its key is also registered to {}: not a distinct identity",
                f.shares_key_with.join(", ")
            ),
            (None, None),
        );
    }
    if a.sponsor.trim().is_empty() {
        push(
            "no_sponsor",
            "",
            "the agent has no sponsor".into(),
            (None, None),
        );
    }
    match f.sponsor {
        Standing::Departed(at) => push(
            "sponsor_departed",
            "",
            format!(
                "sponsor `{}` left on {}: name another within {} business days",
                a.sponsor,
                date(at),
                p.sponsor_reassign_within_days
            ),
            acting(
                p.orphan_action,
                add_business_days(at, p.sponsor_reassign_within_days),
            ),
        ),
        Standing::Gone => push(
            "sponsor_departed",
            "",
            format!(
                "sponsor `{}` is no longer an active person in the directory",
                a.sponsor
            ),
            (Some(p.orphan_action), None),
        ),
        Standing::Active | Standing::Unknown => {}
    }
    credential_issues(a, now, &mut push);
    if let Some(changed) = a.owner_changed_at
        && a.last_review_at.is_none_or(|r| r < changed)
    {
        let by = changed + Duration::hours(i64::from(p.deprovision_within_hours));
        let rfc = |t: OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        push(
            "ownership_changed",
            "",
            format!(
                "its team or sponsor changed at {}: the new owner reviews it by {} (`deprovision_within_hours` = {}){}",
                rfc(changed),
                rfc(by),
                p.deprovision_within_hours,
                if now >= by {
                    "; that time has passed"
                } else {
                    ""
                }
            ),
            (None, None),
        );
    }
    let due = next_review_due(a, p);
    if now >= due {
        push(
            "review_overdue",
            "",
            format!(
                "review was due on {} (every {} days)",
                date(due),
                p.review_every_days
            ),
            acting(p.overdue_action, due + days(p.grace_days)),
        );
    } else if now >= due - days(p.remind_before_days) {
        push(
            "review_due",
            "",
            format!("review due on {}", date(due)),
            (None, None),
        );
    }
    let last_auth = a.last_used_at.unwrap_or(a.created_at).max(a.created_at);
    let dormant_since = last_auth + days(p.dormant_after_days);
    if now >= dormant_since {
        let never = a.last_used_at.is_none();
        push(
            "dormant",
            "",
            if never {
                format!(
                    "never authenticated since registration on {}",
                    date(a.created_at)
                )
            } else {
                format!("no authentication since {}", date(last_auth))
            },
            acting(p.dormant_action, dormant_since + days(p.dormant_grace_days)),
        );
    }
    for r in f.reachable {
        let used = f.usage.iter().find(|u| u.scope == r.scope);
        // An admin lifting an exclusion restarts the clock: the sweep does
        // not take the scope away again the moment it is given back.
        let lifted = a
            .excluded_scopes
            .get(&r.scope)
            .and_then(|e| e.lifted_at)
            .unwrap_or(a.created_at);
        let last = used
            .map_or(a.created_at, |u| u.last_used_at.max(a.created_at))
            .max(lifted);
        if now >= last + days(p.unused_scope_after_days) {
            push(
                "unused_scope",
                &r.scope,
                match used {
                    Some(u) => format!("`{}` last used on {}", r.scope, date(u.last_used_at)),
                    None => format!("`{}` reachable but never used", r.scope),
                },
                (None, None),
            );
        }
        let ttl = a.cap_ttl(r.max_ttl_secs);
        if ttl > p.max_credential_ttl_secs {
            push(
                "long_ttl",
                &r.scope,
                format!(
                    "`{}` allows credentials of {} s, more than the {} s this policy accepts (set the agent's `max_ttl_secs`)",
                    r.scope, ttl, p.max_credential_ttl_secs
                ),
                (None, None),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn agent(created_days_ago: i64, used_days_ago: Option<i64>, now: OffsetDateTime) -> Agent {
        Agent {
            id: "a".into(),
            team: "platform".into(),
            sponsor: "s@example.com".into(),
            risk_tier: 1,
            environment: crate::model::Environment::Dev,
            purpose: "test".into(),
            labels: Default::default(),
            status: AgentStatus::Active,
            auth_method: crate::model::AuthMethod::PrivateKeyJwt,
            jwks: serde_json::json!({"keys": []}),
            created_at: now - Duration::days(created_days_ago),
            updated_at: now,
            last_used_at: used_days_ago.map(|d| now - Duration::days(d)),
            last_review_at: None,
            delegation: Default::default(),
            federated: None,
            may_assert_users: false,
            suspended_from: None,
            step_up: None,
            excluded_scopes: Default::default(),
            max_ttl_secs: None,
            keys_rotated_at: None,
            owner_changed_at: None,
        }
    }

    fn kinds(v: &[Issue]) -> Vec<&str> {
        v.iter().map(|i| i.kind).collect()
    }

    /// A team or sponsor change asks the new owner for a review within
    /// `deprovision_within_hours`; a review after the change ends it.
    #[test]
    fn an_ownership_change_needs_a_review_in_time() {
        let now = OffsetDateTime::now_utc();
        let p = LifecyclePolicy::default();
        let mut a = agent(10, Some(1), now);
        a.last_review_at = Some(now - Duration::days(5));
        let facts = |a: &Agent| -> Vec<Issue> {
            issues(&Facts {
                agent: a,
                policy: &p,
                reachable: &[],
                usage: &[],
                shares_key_with: &[],
                sponsor: Standing::Unknown,
                now,
            })
        };
        a.owner_changed_at = Some(now - Duration::hours(2));
        let got = facts(&a);
        assert_eq!(kinds(&got), ["ownership_changed"]);
        assert!(!got[0].detail.contains("has passed"), "{}", got[0].detail);
        a.owner_changed_at = Some(now - Duration::hours(25));
        assert!(facts(&a)[0].detail.ends_with("that time has passed"));
        a.last_review_at = Some(now - Duration::hours(1));
        assert!(facts(&a).is_empty());
    }

    #[test]
    fn dormancy_review_and_unused_scopes_follow_the_policy() {
        let now = OffsetDateTime::now_utc();
        let p = LifecyclePolicy::default();
        let reach = [Reachable {
            scope: "s".into(),
            max_ttl_secs: 600,
        }];
        let used = [ScopeUsage {
            scope: "s".into(),
            last_used_at: now - Duration::days(1),
            credentials: 3,
            sources: Vec::new(),
        }];

        let fresh = agent(10, Some(1), now);
        let f = Facts {
            agent: &fresh,
            policy: &p,
            reachable: &reach,
            usage: &used,
            shares_key_with: &[],
            sponsor: Standing::Unknown,
            now,
        };
        assert!(issues(&f).is_empty(), "{:?}", issues(&f));

        // 61 days without authentication: dormant, suspended 14 days later.
        let idle = agent(100, Some(61), now);
        let f = Facts {
            agent: &idle,
            policy: &p,
            reachable: &reach,
            usage: &[],
            shares_key_with: &[],
            sponsor: Standing::Unknown,
            now,
        };
        let got = issues(&f);
        assert_eq!(kinds(&got), ["review_overdue", "dormant", "unused_scope"]);
        let dormant = &got[1];
        assert_eq!(dormant.action, Some(LifecycleAction::Suspend));
        assert_eq!(
            dormant.action_due_at,
            Some(now - Duration::days(61) + Duration::days(74))
        );
        // Overdue reviews only notify by default.
        assert_eq!(
            (got[0].action, got[0].action_due_at),
            (Some(LifecycleAction::Notify), None)
        );

        // Review reminders start 14 days before the due date.
        let soon = agent(80, Some(1), now);
        let f = Facts {
            agent: &soon,
            policy: &p,
            reachable: &reach,
            usage: &used,
            shares_key_with: &[],
            sponsor: Standing::Unknown,
            now,
        };
        assert_eq!(kinds(&issues(&f)), ["review_due"]);

        let mut gone = agent(100, Some(70), now);
        gone.status = AgentStatus::Decommissioned;
        let f = Facts {
            agent: &gone,
            policy: &p,
            reachable: &reach,
            usage: &[],
            shares_key_with: &[],
            sponsor: Standing::Unknown,
            now,
        };
        assert!(issues(&f).is_empty());
    }

    #[test]
    fn long_ttls_and_missing_sponsors_are_issues() {
        let now = OffsetDateTime::now_utc();
        let p = LifecyclePolicy::default();
        let mut a = agent(1, Some(0), now);
        a.sponsor = " ".into();
        let reach = [Reachable {
            scope: "day".into(),
            max_ttl_secs: 2 * 86_400,
        }];
        let used = [ScopeUsage {
            scope: "day".into(),
            last_used_at: now,
            credentials: 1,
            sources: Vec::new(),
        }];
        let f = Facts {
            agent: &a,
            policy: &p,
            reachable: &reach,
            usage: &used,
            shares_key_with: &[],
            sponsor: Standing::Unknown,
            now,
        };
        let got = issues(&f);
        assert_eq!(kinds(&got), ["no_sponsor", "long_ttl"]);
        assert_eq!(got[1].subject, "day");
    }

    #[test]
    fn a_declared_credential_expiry_and_rotation_period_are_issues() {
        let now = OffsetDateTime::now_utc();
        let p = LifecyclePolicy::default();
        let mut a = agent(40, Some(0), now);
        a.labels
            .insert("credential_expires".into(), "2020-08-11T00:00:00Z".into());
        a.labels
            .insert("credential_rotation_days".into(), "30".into());
        let f = |a: &Agent| {
            issues(&Facts {
                agent: a,
                policy: &p,
                reachable: &[],
                usage: &[],
                shares_key_with: &[],
                sponsor: Standing::Unknown,
                now,
            })
        };
        let got = f(&a);
        let k = kinds(&got);
        assert!(k.contains(&"key_rotation_due"), "{k:?}");
        assert!(k.contains(&"credential_expired"), "{k:?}");
        // New keys ten days ago: no rotation due.
        a.keys_rotated_at = Some(now - Duration::days(10));
        assert!(!kinds(&f(&a)).contains(&"key_rotation_due"));
    }
}
