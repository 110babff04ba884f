//! Keeping a running command's credentials fresh: each is due at two
//! thirds of its life, renewed where its backend allows, else issued again.
//! A refresh runs beside the command, its exit and the signals, never
//! instead of them (asked again, a sensitive scope may wait minutes for
//! its approval). One that fails is tried again after a back-off; once the
//! task has ended (401: completed, expired, a kill switch) none is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::session::{Refused, Session};

/// The longest wait before a failed refresh is tried again.
const MAX_BACKOFF_SECS: u64 = 30;

/// When each scope may be refreshed again after failures, and whether the
/// task has ended.
#[derive(Default)]
pub(super) struct Schedule {
    /// Scope → (not before, failures in a row).
    retry: BTreeMap<String, (OffsetDateTime, u32)>,
    ended: bool,
}

impl Schedule {
    /// When the next refresh is due (`None`: never, the task has ended).
    pub(super) fn next(&self, creds: &BTreeMap<String, Value>) -> Option<OffsetDateTime> {
        if self.ended {
            return None;
        }
        creds
            .iter()
            .filter_map(|(scope, v)| {
                let at = refresh_at(v)?;
                Some(self.retry.get(scope).map_or(at, |(r, _)| at.max(*r)))
            })
            .min()
    }

    /// The credentials due now, as they are.
    pub(super) fn due(&self, creds: &BTreeMap<String, Value>) -> Vec<(String, Value)> {
        let now = OffsetDateTime::now_utc();
        creds
            .iter()
            .filter(|(scope, v)| {
                refresh_at(v).is_some_and(|t| t <= now)
                    && self.retry.get(*scope).is_none_or(|(r, _)| *r <= now)
            })
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect()
    }

    /// Takes a refresh's outcomes into `creds`; returns whether any
    /// credential changed.
    pub(super) fn settle(
        &mut self,
        creds: &mut BTreeMap<String, Value>,
        done: Vec<(String, anyhow::Result<Value>)>,
    ) -> bool {
        let mut changed = false;
        for (scope, outcome) in done {
            match outcome {
                Ok(v) => {
                    creds.insert(scope.clone(), v);
                    self.retry.remove(&scope);
                    changed = true;
                }
                Err(e) if task_ended(&e) => {
                    if !self.ended {
                        super::note!(
                            "keygate: refreshing `{scope}` failed: {e}; the task has ended, so nothing more is refreshed"
                        );
                    }
                    self.ended = true;
                }
                Err(e) => {
                    let failures = self.retry.get(&scope).map_or(0, |(_, n)| *n) + 1;
                    let wait = (1u64 << failures.min(5)).min(MAX_BACKOFF_SECS);
                    let at = OffsetDateTime::now_utc() + Duration::from_secs(wait);
                    self.retry.insert(scope.clone(), (at, failures));
                    super::note!("keygate: refreshing `{scope}` failed: {e}; retrying in {wait} s");
                }
            }
        }
        changed
    }
}

/// Refreshes each of `due` in turn.
pub(super) async fn refresh_all(
    session: &Session,
    due: Vec<(String, Value)>,
    ttl: Option<u64>,
    wait: Duration,
) -> Vec<(String, anyhow::Result<Value>)> {
    let mut out = Vec::with_capacity(due.len());
    for (scope, v) in due {
        let outcome = refresh(session, &scope, &v, ttl, wait).await;
        out.push((scope, outcome));
    }
    out
}

/// The broker said the session is no more (its task ended).
fn task_ended(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_some_and(|r| r.status == 401)
}

/// A credential's expiry, from its response.
fn expiry(v: &Value) -> Option<OffsetDateTime> {
    v["expires_at"]
        .as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
}

/// Notes when a credential was obtained (`issued_at`, ours), to plan its
/// refresh.
pub(super) fn stamped(mut v: Value) -> Value {
    if let Ok(now) = OffsetDateTime::now_utc().format(&Rfc3339) {
        v["issued_at"] = Value::String(now);
    }
    v
}

/// When a credential is due for refresh: two thirds into its life.
fn refresh_at(v: &Value) -> Option<OffsetDateTime> {
    let until = expiry(v)?;
    let issued = v["issued_at"]
        .as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())?;
    let life = (until - issued).max(time::Duration::seconds(3));
    Some(until - life / 3)
}

/// Sleeps until `at` (at least a second); forever for `None`.
pub(super) async fn sleep_until(at: Option<OffsetDateTime>) {
    match at {
        Some(t) => {
            let left = (t - OffsetDateTime::now_utc()).max(time::Duration::seconds(1));
            tokio::time::sleep(left.unsigned_abs()).await;
        }
        None => std::future::pending().await,
    }
}

/// Renews the credential where its backend can, else asks again.
async fn refresh(
    session: &Session,
    scope: &str,
    v: &Value,
    ttl: Option<u64>,
    wait: Duration,
) -> anyhow::Result<Value> {
    let lease = v["lease_id"].as_str().unwrap_or_default();
    let life = match (expiry(v), refresh_at(v)) {
        (Some(until), Some(at)) => {
            let third: time::Duration = until - at;
            (third.whole_seconds() * 3).max(1) as u64
        }
        _ => ttl.unwrap_or(300),
    };
    if let Some(renewed) = session.renew(lease, ttl.unwrap_or(life)).await?
        && let Some(e) = renewed.get("expires_at")
    {
        let mut v = stamped(v.clone());
        v["expires_at"] = e.clone();
        return Ok(v);
    }
    Ok(stamped(session.credential(scope, ttl, wait).await?))
}
