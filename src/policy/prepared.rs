//! What a decision asks Cedar with, prepared once and reused.
//!
//! Every credential request builds the same agent, team and scope entities
//! for the same agent and scope, and Cedar checks them against the schema
//! (and adds the schema's action entities) each time: most of a decision's
//! cost, and not Cedar's evaluation. So the entities are kept per agent and
//! scope, in the engine of one policy set (a reload starts afresh), and
//! reused only while every fact they were built from is unchanged: an
//! agent's team, sponsor, tier, environment, purpose, status and labels,
//! and the scope's provider, sensitivity and ttl ceiling, compared in full
//! on every use. A changed agent is built anew.
//!
//! Likewise the request's check against the schema (its action applies to
//! the principal and resource types, its context has the declared type)
//! depends only on the action and on the context's shape, which is fixed
//! but for one thing: an empty delegation chain conforms to any set type, a
//! non-empty one only to a set of strings. So each (action, chain empty or
//! not) is checked once with the schema; after that passes, requests of
//! that shape skip it. One that fails is checked again each time (and
//! fails the same way).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use cedar_policy::Entities;

use super::{AUTO_APPROVE, REQUEST_CREDENTIAL, ScopeFacts};
use crate::model::{Agent, AgentStatus, Environment};

/// Agents kept at most; past it, everything kept is dropped and built anew
/// (a bound on memory, not on correctness).
pub(super) const MAX_AGENTS: usize = 4096;

/// The prepared inputs of one policy set.
#[derive(Default)]
pub(super) struct Prepared {
    agents: Mutex<HashMap<String, PreparedAgent>>,
    /// Whether an agent's request for each action (`REQUEST_CREDENTIAL`,
    /// `AUTO_APPROVE`), with an empty and a non-empty chain, passed the
    /// schema's check.
    checked: [AtomicBool; 4],
}

/// The entities of one agent, by scope, and the facts they were built from.
struct PreparedAgent {
    facts: AgentFacts,
    scopes: HashMap<String, (ScopeKey, Arc<Entities>)>,
}

/// The facts of an agent its entities carry.
#[derive(PartialEq, Eq)]
struct AgentFacts {
    team: String,
    sponsor: String,
    risk_tier: u8,
    environment: Environment,
    purpose: String,
    status: AgentStatus,
    labels: BTreeMap<String, String>,
}

impl AgentFacts {
    fn of(a: &Agent) -> Self {
        Self {
            team: a.team.clone(),
            sponsor: a.sponsor.clone(),
            risk_tier: a.risk_tier,
            environment: a.environment,
            purpose: a.purpose.clone(),
            status: a.status,
            labels: a.labels.clone(),
        }
    }

    fn describes(&self, a: &Agent) -> bool {
        self.team == a.team
            && self.sponsor == a.sponsor
            && self.risk_tier == a.risk_tier
            && self.environment == a.environment
            && self.purpose == a.purpose
            && self.status == a.status
            && self.labels == a.labels
    }
}

/// The facts of a scope its entity carries (its name is the key).
#[derive(PartialEq, Eq)]
struct ScopeKey {
    provider: String,
    sensitive: bool,
    max_ttl_secs: u64,
}

impl ScopeKey {
    fn describes(&self, s: &ScopeFacts<'_>) -> bool {
        self.provider == s.provider
            && self.sensitive == s.sensitive
            && self.max_ttl_secs == s.max_ttl_secs
    }
}

impl Prepared {
    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, PreparedAgent>> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entities of `agent` asking for `scope`, kept or built by `build`
    /// (then kept).
    pub(super) fn entities<E>(
        &self,
        agent: &Agent,
        scope: &ScopeFacts<'_>,
        build: impl FnOnce() -> Result<Entities, E>,
    ) -> Result<Arc<Entities>, E> {
        if let Some(kept) = self.agents().get(&agent.id).and_then(|p| {
            let (key, entities) = p.scopes.get(scope.name)?;
            (p.facts.describes(agent) && key.describes(scope)).then(|| Arc::clone(entities))
        }) {
            return Ok(kept);
        }
        // Built without the lock: other decisions go on meanwhile.
        let built = Arc::new(build()?);
        let mut agents = self.agents();
        if agents.len() >= MAX_AGENTS && !agents.contains_key(&agent.id) {
            agents.clear();
        }
        let p = agents
            .entry(agent.id.clone())
            .or_insert_with(|| PreparedAgent {
                facts: AgentFacts::of(agent),
                scopes: HashMap::new(),
            });
        if !p.facts.describes(agent) {
            *p = PreparedAgent {
                facts: AgentFacts::of(agent),
                scopes: HashMap::new(),
            };
        }
        p.scopes.insert(
            scope.name.to_owned(),
            (
                ScopeKey {
                    provider: scope.provider.to_owned(),
                    sensitive: scope.sensitive,
                    max_ttl_secs: scope.max_ttl_secs,
                },
                Arc::clone(&built),
            ),
        );
        Ok(built)
    }

    /// Which of `checked` an agent's request for `action` is (`None`: an
    /// action whose check is never skipped).
    fn slot(action: &str, chain_empty: bool) -> Option<usize> {
        let a = match action {
            REQUEST_CREDENTIAL => 0,
            AUTO_APPROVE => 1,
            _ => return None,
        };
        Some(a * 2 + usize::from(chain_empty))
    }

    /// Whether an agent's request of this shape already passed the schema's
    /// check.
    pub(super) fn request_checked(&self, action: &str, chain_empty: bool) -> bool {
        Self::slot(action, chain_empty).is_some_and(|i| self.checked[i].load(Ordering::Acquire))
    }

    /// Records that an agent's request of this shape passed the check.
    pub(super) fn request_passed(&self, action: &str, chain_empty: bool) {
        if let Some(i) = Self::slot(action, chain_empty) {
            self.checked[i].store(true, Ordering::Release);
        }
    }
}
