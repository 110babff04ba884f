//! Row → record mapping for the SQLite engine.

use std::str::FromStr;

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::audit::AuditEvent;
use crate::model::{Agent, Lease, Revocation, Task, from_unix};
use crate::store::{StoreError, StoreResult};

/// Parses a text column into one of the string enums.
pub(super) fn parse_col<T: FromStr<Err = String>>(r: &SqliteRow, col: &str) -> StoreResult<T> {
    let s: String = r.try_get(col)?;
    s.parse()
        .map_err(|e| StoreError::Corrupt(format!("column `{col}`: {e}")))
}

pub(super) fn json_col<T: serde::de::DeserializeOwned>(r: &SqliteRow, col: &str) -> StoreResult<T> {
    let s: String = r.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column `{col}`: {e}")))
}

pub(super) fn time_col(r: &SqliteRow, col: &str) -> StoreResult<time::OffsetDateTime> {
    Ok(from_unix(r.try_get::<i64, _>(col)?))
}

pub(super) fn opt_time_col(r: &SqliteRow, col: &str) -> StoreResult<Option<time::OffsetDateTime>> {
    Ok(r.try_get::<Option<i64>, _>(col)?.map(from_unix))
}

pub(super) fn agent_from_row(r: &SqliteRow) -> StoreResult<Agent> {
    Ok(Agent {
        id: r.try_get("id")?,
        team: r.try_get("team")?,
        sponsor: r.try_get("sponsor")?,
        risk_tier: u8::try_from(r.try_get::<i64, _>("risk_tier")?)
            .map_err(|_| StoreError::Corrupt("risk_tier out of range".into()))?,
        environment: parse_col(r, "environment")?,
        purpose: r.try_get("purpose")?,
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
            r.try_get::<Option<String>, _>("federated_issuer")?,
            r.try_get::<Option<String>, _>("federated_subject")?,
        ) {
            (Some(issuer), Some(subject)) => {
                Some(crate::model::FederatedSubject { issuer, subject })
            }
            _ => None,
        },
        may_assert_users: r.try_get("may_assert_users")?,
        suspended_from: r
            .try_get::<Option<String>, _>("suspended_from")?
            .map(|s| s.parse().map_err(StoreError::Corrupt))
            .transpose()?,
        max_ttl_secs: r
            .try_get::<Option<i64>, _>("max_ttl_secs")?
            .map(|n| u64::try_from(n).unwrap_or(0)),
        excluded_scopes: json_col(r, "excluded_scopes")?,
        keys_rotated_at: opt_time_col(r, "keys_rotated_at")?,
        owner_changed_at: opt_time_col(r, "owner_changed_at")?,
    })
}

pub(super) fn task_from_row(r: &SqliteRow) -> StoreResult<Task> {
    Ok(Task {
        id: r.try_get("id")?,
        agent_id: r.try_get("agent_id")?,
        description: r.try_get("description")?,
        state: parse_col(r, "state")?,
        opened_at: time_col(r, "opened_at")?,
        expires_at: time_col(r, "expires_at")?,
        ended_at: opt_time_col(r, "ended_at")?,
        end_reason: r.try_get("end_reason")?,
        parent_task_id: r.try_get("parent_task_id")?,
        depth: u8::try_from(r.try_get::<i64, _>("depth")?)
            .map_err(|_| StoreError::Corrupt("task depth out of range".into()))?,
        delegation_budget: u8::try_from(r.try_get::<i64, _>("delegation_budget")?)
            .map_err(|_| StoreError::Corrupt("delegation budget out of range".into()))?,
        scopes: r
            .try_get::<Option<String>, _>("scopes")?
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column `scopes`: {e}")))?,
        chain: json_col(r, "chain")?,
        on_behalf_of: r
            .try_get::<Option<String>, _>("on_behalf_of")?
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("column `on_behalf_of`: {e}")))?,
    })
}

pub(super) fn lease_from_row(r: &SqliteRow) -> StoreResult<Lease> {
    let handle: Option<String> = r.try_get("handle")?;
    let revocability: Option<String> = r.try_get("revocability")?;
    Ok(Lease {
        id: r.try_get("id")?,
        agent_id: r.try_get("agent_id")?,
        task_id: r.try_get("task_id")?,
        scope: r.try_get("scope")?,
        provider: r.try_get("provider")?,
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
        end_reason: r.try_get("end_reason")?,
        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
        last_error: r.try_get("last_error")?,
        next_attempt_at: opt_time_col(r, "next_attempt_at")?,
        revocation_id: r.try_get("revocation_id")?,
        boot_id: r.try_get("boot_id")?,
        source: r.try_get("source")?,
    })
}

pub(super) fn revocation_from_row(r: &SqliteRow) -> StoreResult<Revocation> {
    Ok(Revocation {
        id: r.try_get("id")?,
        selector: json_col(r, "selector")?,
        reason: r.try_get("reason")?,
        operator: r.try_get("operator")?,
        created_at: time_col(r, "created_at")?,
        tasks_ended: u64::try_from(r.try_get::<i64, _>("tasks_ended")?).unwrap_or(0),
    })
}

pub(super) fn audit_from_row(r: &SqliteRow) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        seq: r.try_get("seq")?,
        at_ms: r.try_get("at_ms")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        agent: r.try_get("agent")?,
        task: r.try_get("task")?,
        scope: r.try_get("scope")?,
        lease: r.try_get("lease")?,
        decision: r.try_get("decision")?,
        policy_ids: json_col(r, "policy_ids")?,
        policy_hash: r.try_get("policy_hash")?,
        outcome: r.try_get("outcome")?,
        reason: r.try_get("reason")?,
        details: json_col(r, "details")?,
        on_behalf_of: r.try_get("on_behalf_of")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}
