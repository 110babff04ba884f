//! The people directory: who sponsors, reviews and leads. Config says who
//! exists (`[[people]]`, and every operator with an `email`); the store
//! records who left since (`POST /v1/people/{email}/depart`, or the sweep
//! noticing a sponsor gone from the directory). Every lookup goes through
//! [`Directory`], the one seam a SCIM or IdP feed would replace.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime, Weekday};

use crate::config::OperatorConfig;

/// One `[[people]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonConfig {
    pub email: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub team: Option<String>,
    /// Their manager's email.
    #[serde(default)]
    pub manager: Option<String>,
    /// Leads `team`: reviews its agents that have no sponsor to do it, and
    /// is told when a review escalates.
    #[serde(default)]
    pub lead: bool,
    #[serde(default)]
    pub status: PersonStatus,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PersonStatus {
    #[default]
    Active,
    Departed,
}

/// A departure the store holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Departure {
    pub email: String,
    #[serde(with = "time::serde::rfc3339")]
    pub departed_at: OffsetDateTime,
    pub actor: String,
    pub reason: String,
}

/// A person as the directory knows them now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Person {
    pub email: String,
    pub name: String,
    pub team: Option<String>,
    pub manager: Option<String>,
    pub lead: bool,
    /// The operator this person signs in as, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    pub status: PersonStatus,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub departed_at: Option<OffsetDateTime>,
}

/// Where a sponsor stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Active,
    /// Left at this time (a recorded departure).
    Departed(OffsetDateTime),
    /// Departed in config or missing from a configured directory, not yet
    /// recorded (the sweep records it, which starts the clock).
    Gone,
    /// No directory is configured: nothing can be said.
    Unknown,
}

/// Emails compare without case.
pub fn normalize(email: &str) -> String {
    email.trim().to_ascii_lowercase()
}

/// The directory: config's people and operators, less those who left.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    people: BTreeMap<String, Person>,
    departures: BTreeMap<String, Departure>,
    /// `[[people]]` is given: a sponsor missing from it is not a person.
    /// (Operators' emails alone do not make a directory.)
    configured: bool,
}

impl Directory {
    pub fn build(
        people: &[PersonConfig],
        operators: &[OperatorConfig],
        departures: Vec<Departure>,
    ) -> Self {
        let mut out: BTreeMap<String, Person> = BTreeMap::new();
        for p in people {
            out.insert(
                normalize(&p.email),
                Person {
                    email: normalize(&p.email),
                    name: p.name.clone(),
                    team: p.team.clone(),
                    manager: p.manager.as_deref().map(normalize),
                    lead: p.lead,
                    operator: None,
                    status: p.status,
                    departed_at: None,
                },
            );
        }
        for o in operators {
            let Some(email) = o.email.as_deref().map(normalize) else {
                continue;
            };
            let p = out.entry(email.clone()).or_insert_with(|| Person {
                email,
                name: o.name.clone(),
                team: o.team.clone(),
                manager: None,
                lead: false,
                operator: None,
                status: PersonStatus::Active,
                departed_at: None,
            });
            p.operator = Some(o.name.clone());
        }
        let departures: BTreeMap<String, Departure> = departures
            .into_iter()
            .map(|d| (normalize(&d.email), d))
            .collect();
        for (email, d) in &departures {
            if let Some(p) = out.get_mut(email) {
                p.status = PersonStatus::Departed;
                p.departed_at = Some(d.departed_at);
            }
        }
        Self {
            people: out,
            departures,
            configured: !people.is_empty(),
        }
    }

    /// Whether `[[people]]` is given (else absent sponsors cannot be judged).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    pub fn get(&self, email: &str) -> Option<&Person> {
        self.people.get(&normalize(email))
    }

    pub fn all(&self) -> impl Iterator<Item = &Person> {
        self.people.values()
    }

    /// Where `email` stands as a sponsor or reviewer.
    pub fn standing(&self, email: &str) -> Standing {
        let key = normalize(email);
        if let Some(d) = self.departures.get(&key) {
            return Standing::Departed(d.departed_at);
        }
        match self.people.get(&key) {
            Some(p) if p.status == PersonStatus::Active => Standing::Active,
            Some(_) => Standing::Gone,
            None if self.configured => Standing::Gone,
            None => Standing::Unknown,
        }
    }

    /// The active lead of `team`, if the directory names one.
    pub fn team_lead(&self, team: &str) -> Option<&Person> {
        self.people.values().find(|p| {
            p.lead && p.team.as_deref() == Some(team) && self.standing(&p.email) == Standing::Active
        })
    }

    /// The active person an operator is, if it has an email.
    pub fn operator(&self, name: &str) -> Option<&Person> {
        self.people
            .values()
            .find(|p| p.operator.as_deref() == Some(name))
    }
}

/// `n` business days (Monday to Friday) after `from`.
pub fn add_business_days(from: OffsetDateTime, n: u32) -> OffsetDateTime {
    let mut t = from;
    let mut left = n;
    while left > 0 {
        t += Duration::days(1);
        if !matches!(t.weekday(), Weekday::Saturday | Weekday::Sunday) {
            left -= 1;
        }
    }
    t
}

/// Checks `[[people]]`: emails present and unique, managers known.
pub fn validate(people: &[PersonConfig]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for p in people {
        let e = normalize(&p.email);
        if e.is_empty() || !e.contains('@') {
            return Err("`[[people]]`: every entry needs an `email` with an `@`".into());
        }
        if !seen.insert(e.clone()) {
            return Err(format!("`[[people]]` `{e}` is listed twice"));
        }
        if p.lead && p.team.is_none() {
            return Err(format!("`[[people]]` `{e}`: `lead = true` needs a `team`"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn business_days_skip_weekends() {
        // 2026-12-04 is a Friday: five business days later is Friday 12-11.
        let fri = time::macros::datetime!(2026-12-04 10:00 UTC);
        assert_eq!(
            add_business_days(fri, 5),
            time::macros::datetime!(2026-12-11 10:00 UTC)
        );
        let sat = time::macros::datetime!(2026-12-05 10:00 UTC);
        assert_eq!(
            add_business_days(sat, 1),
            time::macros::datetime!(2026-12-07 10:00 UTC)
        );
    }

    #[test]
    fn standing_follows_config_and_departures() {
        let people = vec![
            PersonConfig {
                email: "Ana@Example.com".into(),
                name: "Ana".into(),
                team: Some("platform".into()),
                manager: None,
                lead: true,
                status: PersonStatus::Active,
            },
            PersonConfig {
                email: "bo@example.com".into(),
                name: "Bo".into(),
                team: Some("platform".into()),
                manager: Some("ana@example.com".into()),
                lead: false,
                status: PersonStatus::Departed,
            },
        ];
        let at = time::macros::datetime!(2026-12-01 00:00 UTC);
        let d = Directory::build(&people, &[], Vec::new());
        assert_eq!(d.standing("ana@example.com"), Standing::Active);
        assert_eq!(d.standing("bo@example.com"), Standing::Gone);
        assert_eq!(d.standing("nobody@example.com"), Standing::Gone);
        assert_eq!(d.team_lead("platform").unwrap().email, "ana@example.com");
        let d = Directory::build(
            &people,
            &[],
            vec![Departure {
                email: "ana@example.com".into(),
                departed_at: at,
                actor: "operator:root".into(),
                reason: "left".into(),
            }],
        );
        assert_eq!(d.standing("ANA@example.com"), Standing::Departed(at));
        assert!(d.team_lead("platform").is_none());
        assert_eq!(
            Directory::default().standing("x@example.com"),
            Standing::Unknown
        );
    }
}
