//! Cedar policy: every credential request is decided here, deny by default.
//!
//! Policies live in `*.cedar` files under the configured folder; an optional
//! `*.cedarschema` there is used to validate them at load, so a typo in an
//! attribute name is a start-up error rather than a silent deny. A policy's id
//! is its `@id("...")` annotation, or `<file>#<n>` without one. The set's
//! content hash is recorded with every decision.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use crate::model::{Agent, UserContext};

pub mod cases;
mod prepared;

/// Why policies could not be loaded or evaluated.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy folder `{path}`: {message}")]
    Read { path: String, message: String },
    #[error("policy file `{file}` does not parse: {message}")]
    Parse { file: String, message: String },
    #[error("policy schema `{file}` is invalid: {message}")]
    Schema { file: String, message: String },
    #[error("policies do not validate against the schema: {0}")]
    Validation(String),
    #[error("policy id `{0}` is used twice")]
    DuplicateId(String),
    #[error("cannot build the policy request: {0}")]
    Request(String),
}

/// What the engine needs to know about the scope being requested.
#[derive(Debug, Clone)]
pub struct ScopeFacts<'a> {
    pub name: &'a str,
    pub provider: &'a str,
    pub sensitive: bool,
    pub max_ttl_secs: u64,
}

/// The request's context: when, for how long, within which task.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    pub task_id: &'a str,
    pub task_description: &'a str,
    pub requested_ttl_secs: u64,
    pub now: time::OffsetDateTime,
    /// The delegating agents above this task, root first (empty: not delegated).
    pub chain: &'a [String],
}

/// The policy id a decision names when the registry excluded the scope.
pub const EXCLUSION_POLICY_ID: &str = "keygate:registry-exclusion";

/// A decision and the policies that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub allow: bool,
    /// The policies that decided: the permits for an allow, the forbids for
    /// an explicit deny, empty when nothing permitted (deny by default).
    pub policy_ids: Vec<String>,
    /// Errors met while evaluating (a policy that errors does not apply).
    pub errors: Vec<String>,
}

/// The loaded policy set.
pub struct PolicyEngine {
    set: PolicySet,
    schema: Option<Schema>,
    hash: String,
    authorizer: Authorizer,
    /// Entities and request checks reused across decisions.
    prepared: prepared::Prepared,
    /// Whether any policy reads the clock (`context.now`, `hour_utc`,
    /// `weekday`): then what an agent may reach depends on when one asks.
    clock_sensitive: bool,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

const AGENT: &str = "Keygate::Agent";
const TEAM: &str = "Keygate::Team";
const SCOPE: &str = "Keygate::Scope";
const ACTION: &str = "Keygate::Action";
/// The action every credential request is checked against.
pub const REQUEST_CREDENTIAL: &str = "request_credential";
/// The action checked for the user a task acts for, beside the agent's.
pub const REQUEST_FOR_USER: &str = "request_credential_for_user";
const USER: &str = "Keygate::User";
const GROUP: &str = "Keygate::Group";
/// The action a sensitive request is checked against before it waits for a
/// human: a permit here approves it without one.
pub const AUTO_APPROVE: &str = "auto_approve";

impl PolicyEngine {
    /// Loads every `*.cedar` file (and an optional `*.cedarschema`) in `dir`.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files(&Self::read_dir(dir)?)
    }

    /// The policy and schema files of `dir`, by file name.
    pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, String>, PolicyError> {
        let read_err = |e: std::io::Error| PolicyError::Read {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        let mut files: BTreeMap<String, String> = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".cedar") || name.ends_with(".cedarschema") {
                files.insert(name, std::fs::read_to_string(&path).map_err(read_err)?);
            }
        }
        Ok(files)
    }

    /// Builds the engine from `(file name, content)` pairs.
    pub fn from_files(files: &BTreeMap<String, String>) -> Result<Self, PolicyError> {
        let mut hasher = Sha256::new();
        let mut set = PolicySet::new();
        let mut schema = None;
        let mut clock_sensitive = false;
        for (name, text) in files {
            hasher.update(name.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            if name.ends_with(".cedarschema") {
                let (s, _warnings) =
                    Schema::from_cedarschema_str(text).map_err(|e| PolicyError::Schema {
                        file: name.clone(),
                        message: e.to_string(),
                    })?;
                schema = Some(s);
                continue;
            }
            // A plain word test: a mention in a comment only costs more probes.
            clock_sensitive |= text
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|w| matches!(w, "now" | "hour_utc" | "weekday"));
            let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
                file: name.clone(),
                message: e.to_string(),
            })?;
            for (n, p) in parsed.policies().enumerate() {
                let id = p
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{name}#{n}"));
                let renamed: Policy = p.new_id(PolicyId::new(&id));
                set.add(renamed)
                    .map_err(|_| PolicyError::DuplicateId(id.clone()))?;
            }
        }
        if let Some(s) = &schema {
            let result = Validator::new(s.clone()).validate(&set, ValidationMode::default());
            if !result.validation_passed() {
                let msgs: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
                return Err(PolicyError::Validation(msgs.join("; ")));
            }
        }
        Ok(Self {
            set,
            schema,
            hash: hex::encode(hasher.finalize()),
            authorizer: Authorizer::new(),
            prepared: Default::default(),
            clock_sensitive,
        })
    }

    /// The instants at which to ask what an agent may reach, so that the
    /// answer does not depend on when it is asked: `at` alone when no policy
    /// reads the clock; otherwise every hour of the week from `at` (each
    /// `hour_utc` x `weekday` pair once). A scope permitted at any of them is
    /// reachable — a policy that opens a team only on Sundays at 03:00 widens
    /// it now, not at that hour.
    pub fn probe_instants(&self, at: time::OffsetDateTime) -> Vec<time::OffsetDateTime> {
        if !self.clock_sensitive {
            return vec![at];
        }
        (0..7 * 24).map(|h| at + time::Duration::hours(h)).collect()
    }

    /// The content hash of the loaded files (names and bytes).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.set.policies().count()
    }

    /// Whether no policy is loaded (then everything is denied).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides whether `agent` may obtain `scope`.
    pub fn decide(
        &self,
        agent: &Agent,
        scope: &ScopeFacts<'_>,
        req: &RequestFacts<'_>,
    ) -> Result<PolicyDecision, PolicyError> {
        // The registry's exclusions deny before any policy is read.
        if let Some(e) = agent.exclusion(scope.name) {
            return Ok(PolicyDecision {
                allow: false,
                policy_ids: vec![EXCLUSION_POLICY_ID.to_owned()],
                errors: vec![format!("excluded by {}: {}", e.by, e.reason)],
            });
        }
        self.decide_action(REQUEST_CREDENTIAL, agent, scope, req)
    }

    /// Whether policy approves a sensitive request without a human. A schema
    /// that does not declare `auto_approve` never auto-approves.
    pub fn auto_approve(
        &self,
        agent: &Agent,
        scope: &ScopeFacts<'_>,
        req: &RequestFacts<'_>,
    ) -> Result<PolicyDecision, PolicyError> {
        let action = uid(ACTION, AUTO_APPROVE)?;
        if let Some(schema) = &self.schema
            && !schema.actions().any(|a| a == &action)
        {
            return Ok(PolicyDecision {
                allow: false,
                policy_ids: Vec::new(),
                errors: Vec::new(),
            });
        }
        self.decide_action(AUTO_APPROVE, agent, scope, req)
    }

    /// Whether the user a task acts for may have `scope` obtained for them
    /// (`request_credential_for_user`, principal `Keygate::User`, in its
    /// `Keygate::Group`s). A schema without that action permits no user.
    pub fn decide_for_user(
        &self,
        agent: &Agent,
        user: &UserContext,
        scope: &ScopeFacts<'_>,
        req: &RequestFacts<'_>,
    ) -> Result<PolicyDecision, PolicyError> {
        let action = uid(ACTION, REQUEST_FOR_USER)?;
        if let Some(schema) = &self.schema
            && !schema.actions().any(|a| a == &action)
        {
            return Ok(PolicyDecision {
                allow: false,
                policy_ids: Vec::new(),
                errors: vec![format!(
                    "the schema declares no `{REQUEST_FOR_USER}` action"
                )],
            });
        }
        self.evaluate(REQUEST_FOR_USER, agent, Some(user), scope, req)
    }

    fn decide_action(
        &self,
        action: &str,
        agent: &Agent,
        scope: &ScopeFacts<'_>,
        req: &RequestFacts<'_>,
    ) -> Result<PolicyDecision, PolicyError> {
        self.evaluate(action, agent, None, scope, req)
    }

    /// One Cedar request: the agent (or, with `user`, the user it acts for)
    /// as principal, the scope as resource, the request as context.
    fn evaluate(
        &self,
        action: &str,
        agent: &Agent,
        user: Option<&UserContext>,
        scope: &ScopeFacts<'_>,
        req: &RequestFacts<'_>,
    ) -> Result<PolicyDecision, PolicyError> {
        let resource = uid(SCOPE, scope.name)?;
        let action_uid = uid(ACTION, action)?;
        let (principal, entities) = match user {
            None => (
                uid(AGENT, &agent.id)?,
                self.prepared
                    .entities(agent, scope, || self.agent_entities(agent, scope))?,
            ),
            Some(u) => {
                // Users and groups are namespaced by the issuer that vouched
                // for them: `corp-sso/alice` is not `other-sso/alice`.
                let user_uid = uid(USER, &format!("{}/{}", u.issuer, u.id))?;
                let entities = self.user_entities(u, user_uid.clone(), scope)?;
                (user_uid, Arc::new(entities))
            }
        };
        let context = context(agent, req)?;
        // The schema's check of a request depends only on its shape: once
        // an agent's request of this shape passed it, it is not run again.
        let chain_empty = req.chain.is_empty();
        let skip_check = user.is_none() && self.prepared.request_checked(action, chain_empty);
        let schema = self.schema.as_ref().filter(|_| !skip_check);
        let request = Request::new(principal, action_uid, resource, context, schema)
            .map_err(request_error)?;
        if user.is_none() && schema.is_some() {
            self.prepared.request_passed(action, chain_empty);
        }
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policy_ids.sort();
        Ok(PolicyDecision {
            allow: response.decision() == Decision::Allow,
            policy_ids,
            errors: response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect(),
        })
    }

    /// The agent in its team, and the scope: checked against the schema,
    /// with the schema's actions.
    fn agent_entities(
        &self,
        agent: &Agent,
        scope: &ScopeFacts<'_>,
    ) -> Result<Entities, PolicyError> {
        let team = uid(TEAM, &agent.team)?;
        let agent_entity = Entity::new_with_tags(
            uid(AGENT, &agent.id)?,
            [
                ("team".to_owned(), s(&agent.team)),
                ("sponsor".to_owned(), s(&agent.sponsor)),
                ("risk_tier".to_owned(), l(u64::from(agent.risk_tier))),
                ("environment".to_owned(), s(agent.environment.as_str())),
                ("purpose".to_owned(), s(&agent.purpose)),
                ("status".to_owned(), s(agent.status.as_str())),
            ],
            [team.clone()],
            agent.labels.iter().map(|(k, v)| (k.clone(), s(v))),
        )
        .map_err(request_error)?;
        let team_entity = Entity::new_no_attrs(team, Default::default());
        let all = [scope_entity(scope)?, agent_entity, team_entity];
        Entities::from_entities(all, self.schema.as_ref()).map_err(request_error)
    }

    /// The user (`user_uid`) in its groups, and the scope.
    fn user_entities(
        &self,
        u: &UserContext,
        user_uid: EntityUid,
        scope: &ScopeFacts<'_>,
    ) -> Result<Entities, PolicyError> {
        let groups = u
            .groups
            .iter()
            .map(|g| uid(GROUP, &format!("{}/{g}", u.issuer)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut all = vec![
            scope_entity(scope)?,
            Entity::new(
                user_uid,
                HashMap::from([("issuer".to_owned(), s(&u.issuer))]),
                groups.iter().cloned().collect(),
            )
            .map_err(request_error)?,
        ];
        all.extend(
            groups
                .into_iter()
                .map(|g| Entity::new_no_attrs(g, Default::default())),
        );
        Entities::from_entities(all, self.schema.as_ref()).map_err(request_error)
    }
}

/// A request Cedar refused to build (never a secret: ids and facts only).
fn request_error(e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Request(e.to_string())
}

fn s(v: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(v.to_owned())
}

fn l(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn scope_entity(scope: &ScopeFacts<'_>) -> Result<Entity, PolicyError> {
    Entity::new(
        uid(SCOPE, scope.name)?,
        HashMap::from([
            ("provider".to_owned(), s(scope.provider)),
            (
                "sensitive".to_owned(),
                RestrictedExpression::new_bool(scope.sensitive),
            ),
            ("max_ttl".to_owned(), l(scope.max_ttl_secs)),
        ]),
        HashSet::new(),
    )
    .map_err(request_error)
}

/// The request's context: when, for how long, within which task, delegated
/// by whom.
fn context(agent: &Agent, req: &RequestFacts<'_>) -> Result<Context, PolicyError> {
    let now = req.now;
    Context::from_pairs([
        ("environment".to_owned(), s(agent.environment.as_str())),
        (
            "now".to_owned(),
            RestrictedExpression::new_long(now.unix_timestamp()),
        ),
        ("hour_utc".to_owned(), l(u64::from(now.hour()))),
        (
            "weekday".to_owned(),
            s(&now.weekday().to_string().to_lowercase()),
        ),
        ("ttl".to_owned(), l(req.requested_ttl_secs)),
        (
            "delegation".to_owned(),
            RestrictedExpression::new_record([
                ("depth".to_owned(), l(req.chain.len() as u64)),
                (
                    "chain".to_owned(),
                    RestrictedExpression::new_set(req.chain.iter().map(|a| s(a))),
                ),
            ])
            .map_err(request_error)?,
        ),
        (
            "task".to_owned(),
            RestrictedExpression::new_record([
                ("id".to_owned(), s(req.task_id)),
                ("description".to_owned(), s(req.task_description)),
            ])
            .map_err(request_error)?,
        ),
    ])
    .map_err(request_error)
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, PolicyError> {
    /// Keygate's entity types, parsed once: Cedar parses a type name with
    /// its whole grammar, several times per decision otherwise.
    static PARSED: std::sync::LazyLock<Vec<(&str, EntityTypeName)>> =
        std::sync::LazyLock::new(|| {
            [AGENT, TEAM, SCOPE, ACTION, USER, GROUP]
                .into_iter()
                .filter_map(|t| Some((t, EntityTypeName::from_str(t).ok()?)))
                .collect()
        });
    let ty = match PARSED.iter().find(|(name, _)| *name == ty) {
        Some((_, parsed)) => parsed.clone(),
        None => EntityTypeName::from_str(ty).map_err(request_error)?,
    };
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

#[cfg(test)]
mod tests;

/// The active policy set, replaced whole on reload. A request takes one
/// snapshot ([`PolicyHandle::current`]) and decides everything with it, so
/// no decision mixes two sets.
#[derive(Debug)]
pub struct PolicyHandle {
    active: std::sync::RwLock<std::sync::Arc<PolicyEngine>>,
    reload: tokio::sync::Mutex<()>,
}

impl PolicyHandle {
    pub fn new(engine: PolicyEngine) -> Self {
        Self {
            active: std::sync::RwLock::new(std::sync::Arc::new(engine)),
            reload: tokio::sync::Mutex::new(()),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> std::sync::Arc<PolicyEngine> {
        std::sync::Arc::clone(&self.active.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Makes `engine` the set in force; returns the one it replaced.
    pub fn replace(&self, engine: PolicyEngine) -> std::sync::Arc<PolicyEngine> {
        let mut g = self.active.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *g, std::sync::Arc::new(engine))
    }

    /// Held for the whole of one reload, so two never interleave.
    pub async fn reloading(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reload.lock().await
    }
}
