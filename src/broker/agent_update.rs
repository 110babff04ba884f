//! A change to an agent's attributes: applying it as registration checks
//! it, and naming what it changes that needs approval (identity and
//! accountability) or that the evidence pack records (ownership).

use std::collections::BTreeMap;

use serde::Deserialize;

use time::OffsetDateTime;

use super::BrokerResult;
use super::agents::AgentSpec;
use crate::model::{Agent, Delegation, Environment};

/// A change to an agent's attributes; absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sponsor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_tier: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub last_review_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<Delegation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_assert_users: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ttl_secs: Option<u64>,
}

/// The attributes that prove an agent's identity or say who answers for it
/// (and its risk tier, which sets approval quorums) that differ between
/// `before` and `after`. Under `provisioning.require_approval` a change to
/// any of them waits for approval like a widening does.
pub(super) fn identity_changes(before: &Agent, after: &Agent) -> Vec<&'static str> {
    [
        ("jwks", before.jwks != after.jwks),
        ("federated", before.federated != after.federated),
        (
            "may_assert_users",
            before.may_assert_users != after.may_assert_users,
        ),
        ("delegation", before.delegation != after.delegation),
        ("risk_tier", before.risk_tier != after.risk_tier),
        ("sponsor", before.sponsor != after.sponsor),
        ("team", before.team != after.team),
        // A longer (or no) cap lets its credentials live longer: a widening.
        (
            "max_ttl_secs",
            after.max_ttl_secs.unwrap_or(u64::MAX) > before.max_ttl_secs.unwrap_or(u64::MAX),
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// What changed of who answers for the agent, `{"team": [old, new],
/// "sponsor": [old, new]}` (only what changed), for `agent.updated`: the
/// evidence pack's ownership-change records are read from it.
pub(crate) fn ownership_change(before: &Agent, after: &Agent) -> Option<serde_json::Value> {
    let mut out = serde_json::Map::new();
    if before.team != after.team {
        out.insert("team".into(), serde_json::json!([before.team, after.team]));
    }
    if before.sponsor != after.sponsor {
        out.insert(
            "sponsor".into(),
            serde_json::json!([before.sponsor, after.sponsor]),
        );
    }
    (!out.is_empty()).then_some(serde_json::Value::Object(out))
}

impl AgentUpdate {
    /// Applies the change to `agent`, checking the result as registration does.
    pub fn apply(&self, agent: &mut Agent) -> BrokerResult<()> {
        let spec = AgentSpec {
            id: agent.id.clone(),
            team: self.team.clone().unwrap_or_else(|| agent.team.clone()),
            sponsor: self
                .sponsor
                .clone()
                .unwrap_or_else(|| agent.sponsor.clone()),
            risk_tier: self.risk_tier.unwrap_or(agent.risk_tier),
            environment: self.environment.unwrap_or(agent.environment),
            purpose: self
                .purpose
                .clone()
                .unwrap_or_else(|| agent.purpose.clone()),
            labels: self.labels.clone().unwrap_or_else(|| agent.labels.clone()),
            auth_method: agent.auth_method,
            jwks: self.jwks.clone().unwrap_or_else(|| agent.jwks.clone()),
            last_review_at: self.last_review_at.or(agent.last_review_at),
            delegation: self
                .delegation
                .clone()
                .unwrap_or_else(|| agent.delegation.clone()),
            federated: agent.federated.clone(),
            may_assert_users: self.may_assert_users.unwrap_or(agent.may_assert_users),
            max_ttl_secs: self.max_ttl_secs.or(agent.max_ttl_secs),
        };
        spec.validate()?;
        let moved = agent.team != spec.team || agent.sponsor != spec.sponsor;
        if let Some(at) = self.last_review_at {
            // A review is the new owner's, after the change: recorded with
            // it, the change would certify itself.
            if moved {
                return Err(super::BrokerError::InvalidRequest(
                    "`last_review_at` cannot be set in the change that moves the agent's team or sponsor: the new owner's review is recorded after it".into(),
                ));
            }
            super::agents::check_review_date(Some(at))?;
            // One from before the last ownership change is the previous
            // owner's.
            if let Some(moved_at) = agent.owner_changed_at
                && at.unix_timestamp() < moved_at.unix_timestamp()
            {
                return Err(super::BrokerError::InvalidRequest(format!(
                    "`last_review_at` is before the agent's team or sponsor changed ({}): the new owner's review is recorded after it",
                    crate::model::rfc3339(moved_at)
                )));
            }
        }
        if moved {
            agent.owner_changed_at = Some(crate::model::now());
        }
        agent.team = spec.team;
        agent.sponsor = spec.sponsor;
        agent.risk_tier = spec.risk_tier;
        agent.environment = spec.environment;
        agent.purpose = spec.purpose;
        agent.labels = spec.labels;
        if agent.jwks != spec.jwks {
            agent.keys_rotated_at = Some(crate::model::now());
        }
        agent.jwks = spec.jwks;
        agent.last_review_at = spec.last_review_at;
        agent.delegation = spec.delegation;
        agent.may_assert_users = spec.may_assert_users;
        agent.max_ttl_secs = spec.max_ttl_secs;
        Ok(())
    }
}
