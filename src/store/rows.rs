//! Row → record mapping, shared by both engines: every column is TEXT
//! (strings, JSON), a 64-bit integer (times in unix seconds, counts) or a
//! boolean in both schemas, so one mapper reads a row of either.

use std::str::FromStr;

use sqlx::{Decode, Postgres, Row, Sqlite, Type};

use crate::audit::AuditEvent;
use crate::governance::Finding;
use crate::governance::reviews::{Campaign, ReviewItem};
use crate::model::{
    Agent, Approval, ApprovalDecision, FenceRecord, Lease, Notification, Revocation, Task,
    from_unix,
};
use crate::store::{StoreError, StoreResult};

/// A column value either engine can decode.
pub(crate) trait Value:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}
impl<T> Value for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A row of either engine, read by column name.
pub(crate) trait Get {
    fn get<T: Value>(&self, col: &str) -> StoreResult<T>;
}

impl Get for sqlx::sqlite::SqliteRow {
    fn get<T: Value>(&self, col: &str) -> StoreResult<T> {
        Ok(self.try_get::<T, _>(col)?)
    }
}

impl Get for sqlx::postgres::PgRow {
    fn get<T: Value>(&self, col: &str) -> StoreResult<T> {
        Ok(self.try_get::<T, _>(col)?)
    }
}

/// Parses a text column into one of the string enums.
pub(crate) fn parse_col<T: FromStr<Err = String>>(r: &impl Get, col: &str) -> StoreResult<T> {
    let s: String = r.get(col)?;
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("column `{col}`: {e}")))
}

pub(crate) fn json_col<T: serde::de::DeserializeOwned>(r: &impl Get, col: &str) -> StoreResult<T> {
    let s: String = r.get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column `{col}`: {e}")))
}

pub(crate) fn time_col(r: &impl Get, col: &str) -> StoreResult<time::OffsetDateTime> {
    Ok(from_unix(r.get::<i64>(col)?))
}

pub(crate) fn opt_time_col(r: &impl Get, col: &str) -> StoreResult<Option<time::OffsetDateTime>> {
    Ok(r.get::<Option<i64>>(col)?.map(from_unix))
}

pub(crate) fn agent_from_row(r: &impl Get) -> StoreResult<Agent> {
    Ok(Agent {
        id: r.get("id")?,
        team: r.get("team")?,
        sponsor: r.get("sponsor")?,
        risk_tier: u8::try_from(r.get::<i64>("risk_tier")?)
            .map_err(|_| StoreError::Corrupt("risk_tier out of range".into()))?,
        environment: parse_col(r, "environment")?,
        purpose: r.get("purpose")?,
        labels: json_col(r, "labels")?,
        status: parse_col(r, "status")?,
        auth_method: parse_col(r, "auth_method")?,
        jwks: json_col(r, "jwks")?,
        created_at: time_col(r, "created_at")?,
        updated_at: time_col(r, "updated_at")?,
        last_used_at: opt_time_col(r, "last_used_at")?,
        last_review_at: opt_time_col(r, "last_review_at")?,
        delegation: json_col(r, "delegation")?,
        federated: match (
            r.get::<Option<String>>("federated_issuer")?,
            r.get::<Option<String>>("federated_subject")?,
        ) {
            (Some(issuer), Some(subject)) => {
                Some(crate::model::FederatedSubject { issuer, subject })
            }
            _ => None,
        },
        may_assert_users: r.get("may_assert_users")?,
        suspended_from: r
            .get::<Option<String>>("suspended_from")?
            .map(|s| s.parse().map_err(StoreError::Corrupt))
            .transpose()?,
        max_ttl_secs: r
            .get::<Option<i64>>("max_ttl_secs")?
            .map(|n| u64::try_from(n).unwrap_or(0)),
        excluded_scopes: json_col(r, "excluded_scopes")?,
        keys_rotated_at: opt_time_col(r, "keys_rotated_at")?,
        owner_changed_at: opt_time_col(r, "owner_changed_at")?,
        step_up: r
            .get::<Option<String>>("step_up")?
            .map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()?,
    })
}

pub(crate) fn task_from_row(r: &impl Get) -> StoreResult<Task> {
    Ok(Task {
        id: r.get("id")?,
        agent_id: r.get("agent_id")?,
        description: r.get("description")?,
        state: parse_col(r, "state")?,
        opened_at: time_col(r, "opened_at")?,
        expires_at: time_col(r, "expires_at")?,
        ended_at: opt_time_col(r, "ended_at")?,
        end_reason: r.get("end_reason")?,
        parent_task_id: r.get("parent_task_id")?,
        depth: u8::try_from(r.get::<i64>("depth")?)
            .map_err(|_| StoreError::Corrupt("task depth out of range".into()))?,
        delegation_budget: u8::try_from(r.get::<i64>("delegation_budget")?)
            .map_err(|_| StoreError::Corrupt("delegation budget out of range".into()))?,
        scopes: r
            .get::<Option<String>>("scopes")?
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column `scopes`: {e}")))?,
        chain: json_col(r, "chain")?,
        on_behalf_of: r
            .get::<Option<String>>("on_behalf_of")?
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column `on_behalf_of`: {e}")))?,
    })
}

pub(crate) fn lease_from_row(r: &impl Get) -> StoreResult<Lease> {
    let handle: Option<String> = r.get("handle")?;
    let revocability: Option<String> = r.get("revocability")?;
    Ok(Lease {
        id: r.get("id")?,
        agent_id: r.get("agent_id")?,
        task_id: r.get("task_id")?,
        scope: r.get("scope")?,
        provider: r.get("provider")?,
        state: parse_col(r, "state")?,
        revocability: revocability
            .map(|s| s.parse())
            .transpose()
            .map_err(StoreError::Corrupt)?,
        handle: handle
            .map(|h| serde_json::from_str(&h))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("lease handle: {e}")))?,
        created_at: time_col(r, "created_at")?,
        expires_at: time_col(r, "expires_at")?,
        ended_at: opt_time_col(r, "ended_at")?,
        end_reason: r.get("end_reason")?,
        attempts: u32::try_from(r.get::<i64>("attempts")?).unwrap_or(u32::MAX),
        last_error: r.get("last_error")?,
        next_attempt_at: opt_time_col(r, "next_attempt_at")?,
        revocation_id: r.get("revocation_id")?,
        boot_id: r.get("boot_id")?,
        source: r.get("source")?,
    })
}

pub(crate) fn revocation_from_row(r: &impl Get) -> StoreResult<Revocation> {
    Ok(Revocation {
        id: r.get("id")?,
        selector: json_col(r, "selector")?,
        reason: r.get("reason")?,
        operator: r.get("operator")?,
        created_at: time_col(r, "created_at")?,
        tasks_ended: u64::try_from(r.get::<i64>("tasks_ended")?).unwrap_or(0),
        agents_suspended: u64::try_from(r.get::<i64>("agents_suspended")?).unwrap_or(0),
        fence_failures: json_col(r, "fence_failures")?,
    })
}

pub(crate) fn audit_from_row(r: &impl Get) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        seq: r.get("seq")?,
        at_ms: r.get("at_ms")?,
        actor: r.get("actor")?,
        action: r.get("action")?,
        agent: r.get("agent")?,
        task: r.get("task")?,
        scope: r.get("scope")?,
        lease: r.get("lease")?,
        decision: r.get("decision")?,
        policy_ids: json_col(r, "policy_ids")?,
        policy_hash: r.get("policy_hash")?,
        outcome: r.get("outcome")?,
        reason: r.get("reason")?,
        details: json_col(r, "details")?,
        on_behalf_of: r.get("on_behalf_of")?,
        prev_hash: r.get("prev_hash")?,
        hash: r.get("hash")?,
    })
}

pub(crate) fn approval_from_row(r: &impl Get) -> StoreResult<Approval> {
    Ok(Approval {
        id: r.get("id")?,
        kind: parse_col(r, "kind")?,
        state: parse_col(r, "state")?,
        requester: r.get("requester")?,
        agent_id: r.get("agent_id")?,
        task_id: r.get("task_id")?,
        scope: r.get("scope")?,
        request: json_col(r, "request")?,
        justification: r.get("justification")?,
        required: u32::try_from(r.get::<i64>("required")?)
            .map_err(|_| StoreError::Corrupt("approval quorum out of range".into()))?,
        approver_teams: json_col(r, "approver_teams")?,
        sponsor: r.get("sponsor")?,
        sponsor_alone: r.get("sponsor_alone")?,
        confirm_in_api: r.get("confirm_in_api")?,
        created_at: time_col(r, "created_at")?,
        expires_at: time_col(r, "expires_at")?,
        decided_at: opt_time_col(r, "decided_at")?,
        end_reason: r.get("end_reason")?,
        redeemed_at: opt_time_col(r, "redeemed_at")?,
        lease_id: r.get("lease_id")?,
        decisions: Vec::new(),
    })
}

pub(crate) fn decision_from_row(r: &impl Get) -> StoreResult<ApprovalDecision> {
    Ok(ApprovalDecision {
        operator: r.get("operator")?,
        decision: parse_col(r, "decision")?,
        channel: r.get("channel")?,
        reason: r.get("reason")?,
        at: time_col(r, "at")?,
    })
}

pub(crate) fn notification_from_row(r: &impl Get) -> StoreResult<Notification> {
    Ok(Notification {
        id: r.get("id")?,
        approval_id: r.get("approval_id")?,
        review_item_id: r.get("review_item_id")?,
        incident_id: r.get("incident_id")?,
        channel: r.get("channel")?,
        event: r.get("event")?,
        payload: json_col(r, "payload")?,
        created_at: time_col(r, "created_at")?,
        attempts: u32::try_from(r.get::<i64>("attempts")?).unwrap_or(u32::MAX),
        next_attempt_at: r.get::<Option<i64>>("next_attempt_at")?.map(from_unix),
        last_error: r.get("last_error")?,
        delivered_at: opt_time_col(r, "delivered_at")?,
    })
}

pub(crate) fn fence_from_row(r: &impl Get) -> StoreResult<FenceRecord> {
    Ok(FenceRecord {
        id: r.get("id")?,
        revocation_id: r.get("revocation_id")?,
        provider: r.get("provider")?,
        target: r.get("target")?,
        name: r.get("name")?,
        agent: r.get("agent")?,
        description: r.get("description")?,
        handle: json_col(r, "handle")?,
        created_at: time_col(r, "created_at")?,
        lifted_at: opt_time_col(r, "lifted_at")?,
        lifted_by: r.get("lifted_by")?,
        lift_reason: r.get("lift_reason")?,
        expires_at: opt_time_col(r, "expires_at")?,
    })
}

pub(crate) fn finding_from_row(r: &impl Get) -> StoreResult<Finding> {
    let action: Option<String> = r.get("action")?;
    Ok(Finding {
        id: r.get("id")?,
        agent_id: r.get("agent_id")?,
        kind: r.get("kind")?,
        subject: r.get("subject")?,
        detail: r.get("detail")?,
        opened_at: time_col(r, "opened_at")?,
        action_due_at: opt_time_col(r, "action_due_at")?,
        action: action
            .map(|a| serde_json::from_value(serde_json::Value::String(a)))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column `action`: {e}")))?,
        acted_at: opt_time_col(r, "acted_at")?,
        closed_at: opt_time_col(r, "closed_at")?,
        close_reason: r.get("close_reason")?,
    })
}

pub(crate) fn campaign_from_row(r: &impl Get) -> StoreResult<Campaign> {
    Ok(Campaign {
        id: r.get("id")?,
        name: r.get("name")?,
        team: r.get("team")?,
        created_at: time_col(r, "created_at")?,
        created_by: r.get("created_by")?,
        due_at: time_col(r, "due_at")?,
    })
}

pub(crate) fn item_from_row(r: &impl Get) -> StoreResult<ReviewItem> {
    Ok(ReviewItem {
        id: r.get("id")?,
        campaign_id: r.get("campaign_id")?,
        agent_id: r.get("agent_id")?,
        reviewer: r.get("reviewer")?,
        attestations: u8::try_from(r.get::<i64>("attestations")?).unwrap_or(1),
        snapshot: json_col(r, "snapshot")?,
        state: parse_col(r, "state")?,
        decisions: json_col(r, "decisions")?,
        decided_at: opt_time_col(r, "decided_at")?,
        escalated_at: opt_time_col(r, "escalated_at")?,
    })
}

/// Per-scope use from rows of (`scope`, `source`, `last_at`, `n`) ordered by
/// scope, then most recent first: one entry per scope, its last use, its
/// count, and up to [`ScopeUsage::MAX_SOURCES`] addresses.
pub(crate) fn usage_from_rows(
    rows: &[impl Get],
) -> StoreResult<Vec<crate::governance::ScopeUsage>> {
    use crate::governance::ScopeUsage;
    let mut out: Vec<ScopeUsage> = Vec::new();
    for r in rows {
        let scope: String = r.get("scope")?;
        let last = time_col(r, "last_at")?;
        let n = u64::try_from(r.get::<i64>("n")?).unwrap_or(0);
        let source: Option<String> = r.get("source")?;
        if out.last().is_none_or(|u| u.scope != scope) {
            out.push(ScopeUsage {
                scope,
                last_used_at: last,
                credentials: 0,
                sources: Vec::new(),
            });
        }
        let Some(u) = out.last_mut() else { continue };
        u.last_used_at = u.last_used_at.max(last);
        u.credentials += n;
        if let Some(s) = source
            && u.sources.len() < ScopeUsage::MAX_SOURCES
        {
            u.sources.push(s);
        }
    }
    Ok(out)
}
