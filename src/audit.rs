//! The audit log: append-only, hash-chained events.
//!
//! Every event carries the hash of the one before it, so removing, reordering
//! or editing a row breaks the chain at that row. The store appends events in
//! the same transaction as the state change they describe; this module owns
//! the event shape, the hash and the verifier.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The hash the first event points back to.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who did something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// An agent, by id.
    Agent(String),
    /// A human operator, by configured name.
    Operator(String),
    /// The broker itself (reaper, revocation queue, start-up).
    System,
    /// Someone who failed to authenticate; the claimed identity, if any.
    Unauthenticated(Option<String>),
}

impl Actor {
    /// Reads back what [`Actor::render`] wrote.
    pub fn from_rendered(s: &str) -> Self {
        match s.split_once(':') {
            Some(("agent", a)) => Self::Agent(a.to_owned()),
            Some(("operator", o)) => Self::Operator(o.to_owned()),
            Some(("unauthenticated", c)) => Self::Unauthenticated(Some(c.to_owned())),
            _ if s == "unauthenticated" => Self::Unauthenticated(None),
            _ => Self::System,
        }
    }

    /// How the audit log names the actor: `agent:<id>`, `operator:<name>`, `system`.
    pub fn render(&self) -> String {
        match self {
            Self::Agent(a) => format!("agent:{a}"),
            Self::Operator(o) => format!("operator:{o}"),
            Self::System => "system".into(),
            Self::Unauthenticated(Some(c)) => format!("unauthenticated:{c}"),
            Self::Unauthenticated(None) => "unauthenticated".into(),
        }
    }
}

/// One audit event. Build with [`AuditEvent::new`]; `seq`, `prev_hash` and
/// `hash` are filled in by the store when it appends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub agent: Option<String>,
    pub task: Option<String>,
    pub scope: Option<String>,
    pub lease: Option<String>,
    pub decision: Option<String>,
    pub policy_ids: Vec<String>,
    pub policy_hash: Option<String>,
    pub outcome: String,
    pub reason: Option<String>,
    /// Extra non-secret facts (a certificate serial, counts, a selector).
    pub details: serde_json::Value,
    /// The user the event's task acts for, if any (filled in by the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields covered by the hash, in a fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    agent: &'a Option<String>,
    task: &'a Option<String>,
    scope: &'a Option<String>,
    lease: &'a Option<String>,
    decision: &'a Option<String>,
    policy_ids: &'a [String],
    policy_hash: &'a Option<String>,
    outcome: &'a str,
    reason: &'a Option<String>,
    details: &'a serde_json::Value,
    // Absent from events without a user, so chains written before the field
    // existed still verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    on_behalf_of: &'a Option<String>,
    prev_hash: &'a str,
}

impl AuditEvent {
    /// A successful `action` by `actor`, now.
    pub fn new(actor: &Actor, action: &str) -> Self {
        let at_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        Self {
            seq: 0,
            at_ms,
            actor: actor.render(),
            action: action.to_owned(),
            agent: None,
            task: None,
            scope: None,
            lease: None,
            decision: None,
            policy_ids: Vec::new(),
            policy_hash: None,
            outcome: "success".into(),
            reason: None,
            details: serde_json::Value::Null,
            on_behalf_of: None,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_owned());
        self
    }

    pub fn task(mut self, task: &str) -> Self {
        self.task = Some(task.to_owned());
        self
    }

    pub fn scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.to_owned());
        self
    }

    pub fn lease(mut self, lease: &str) -> Self {
        self.lease = Some(lease.to_owned());
        self
    }

    /// Names the lease, and its agent, task and scope.
    pub fn about_lease(self, lease: &crate::model::Lease) -> Self {
        self.agent(&lease.agent_id)
            .task(&lease.task_id)
            .scope(&lease.scope)
            .lease(&lease.id)
    }

    /// Records a policy decision and the policies that made it.
    pub fn decision(mut self, allow: bool, policy_ids: Vec<String>, policy_hash: &str) -> Self {
        self.decision = Some(if allow { "allow" } else { "deny" }.into());
        self.policy_ids = policy_ids;
        self.policy_hash = Some(policy_hash.to_owned());
        self
    }

    /// Marks the event a failure with a reason.
    pub fn failure(mut self, reason: impl Into<String>) -> Self {
        self.outcome = "failure".into();
        self.reason = Some(reason.into());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    /// The hash of this event given its `seq` and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let hashed = Hashed {
            seq: self.seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            agent: &self.agent,
            task: &self.task,
            scope: &self.scope,
            lease: &self.lease,
            decision: &self.decision,
            policy_ids: &self.policy_ids,
            policy_hash: &self.policy_hash,
            outcome: &self.outcome,
            reason: &self.reason,
            details: &self.details,
            on_behalf_of: &self.on_behalf_of,
            prev_hash: &self.prev_hash,
        };
        // Serialising a struct of plain fields cannot fail; an empty input
        // would still chain, so no panic path is needed.
        let bytes = serde_json::to_vec(&hashed).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }

    /// Fills in `seq`, `prev_hash` and `hash` to follow `prev`.
    pub fn chain_after(&mut self, prev_seq: i64, prev_hash: &str) {
        self.seq = prev_seq + 1;
        self.prev_hash = prev_hash.to_owned();
        self.hash = self.compute_hash();
    }
}

/// Where a chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// The first event that does not verify.
    pub seq: i64,
    pub problem: String,
}

/// Checks events in `seq` order, continuing from (`prev_seq`, `prev_hash`).
/// Returns the new chain head, or the first broken link.
pub fn verify_chain<'a>(
    events: impl IntoIterator<Item = &'a AuditEvent>,
    mut prev_seq: i64,
    mut prev_hash: String,
) -> Result<(i64, String), BrokenLink> {
    for ev in events {
        let broken = |problem: &str| BrokenLink {
            seq: ev.seq,
            problem: problem.to_owned(),
        };
        if ev.seq != prev_seq + 1 {
            return Err(broken(&format!(
                "sequence gap: expected {} after {prev_seq}",
                prev_seq + 1
            )));
        }
        if ev.prev_hash != prev_hash {
            return Err(broken("prev_hash does not match the previous event's hash"));
        }
        if ev.compute_hash() != ev.hash {
            return Err(broken("content does not match its hash (row altered)"));
        }
        prev_seq = ev.seq;
        prev_hash = ev.hash.clone();
    }
    Ok((prev_seq, prev_hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<AuditEvent> {
        let mut out: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let mut ev = AuditEvent::new(&Actor::System, "test").reason(format!("event {i}"));
            let (s, h) = out
                .last()
                .map(|p| (p.seq, p.hash.clone()))
                .unwrap_or((0, GENESIS_HASH.into()));
            ev.chain_after(s, &h);
            out.push(ev);
        }
        out
    }

    #[test]
    fn intact_chain_verifies() {
        let evs = chain(5);
        assert_eq!(
            verify_chain(&evs, 0, GENESIS_HASH.into()).map(|r| r.0),
            Ok(5)
        );
    }

    #[test]
    fn altered_row_is_the_first_broken_link() {
        let mut evs = chain(5);
        evs[2].reason = Some("rewritten".into());
        let err = verify_chain(&evs, 0, GENESIS_HASH.into()).err();
        assert_eq!(err.map(|e| e.seq), Some(3));
    }

    #[test]
    fn deleted_row_is_detected() {
        let mut evs = chain(5);
        evs.remove(1);
        let err = verify_chain(&evs, 0, GENESIS_HASH.into()).err();
        assert_eq!(err.map(|e| e.seq), Some(3));
    }
}
