//! `app_password` scopes: a client secret added to the scope's app
//! registration for one lease (Graph `addPassword`), removed when the lease
//! ends (`removePassword`). Entra also disables it by itself at the lease's
//! expiry (`endDateTime`).
//!
//! Every password Keygate adds is named `keygate:<agent>:<task>:<lease>`,
//! so an issue that crashed before its handle was recorded, and leftovers of
//! any kind, can be found by name; passwords named otherwise are never
//! touched.

use std::sync::Arc;

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
    RevokeRequest,
};
use serde_json::json;
use time::OffsetDateTime;

use crate::graph::{PasswordInfo, Removal};
use crate::scope::AppPassword;
use crate::{AzureProvider, rfc3339};

/// The prefix of every password name Keygate writes.
pub(crate) const NAME_PREFIX: &str = "keygate:";

/// The display name of a lease's password.
pub(crate) fn display_name(agent: &str, task: &str, lease_id: &str) -> String {
    format!("{NAME_PREFIX}{agent}:{task}:{lease_id}")
}

/// A Keygate password's name, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeygateName<'a> {
    pub agent: &'a str,
    pub task: &'a str,
    pub lease_id: &'a str,
}

/// The parts of a name Keygate wrote, or `None` for any other password.
/// Agent ids, task ids and lease ids hold no `:`.
pub(crate) fn parse_name(name: &str) -> Option<KeygateName<'_>> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.split(':');
    let (agent, task, lease_id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || [agent, task, lease_id].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some(KeygateName {
        agent,
        task,
        lease_id,
    })
}

/// The Keygate-named passwords of a listing that still work at `now`.
pub(crate) fn live_keygate_passwords(list: &[PasswordInfo], now: OffsetDateTime) -> usize {
    list.iter()
        .filter(|p| p.display_name.as_deref().and_then(parse_name).is_some())
        .filter(|p| p.end.is_none_or(|end| end > now))
        .count()
}

impl AzureProvider {
    /// Adds a password for the lease, after checking the app is under the
    /// scope's `max_passwords`.
    pub(crate) async fn add_app_password(
        &self,
        req: &IssueRequest,
        p: &AppPassword,
    ) -> Result<Issued, ProviderError> {
        for part in [&req.agent.id, &req.task_id, &req.lease_id] {
            if part.is_empty() || part.contains(':') {
                return Err(ProviderError::InvalidParams(format!(
                    "`{part}` cannot be part of a keygate password name (empty or holds `:`)"
                )));
            }
        }
        let app = &p.application_object_id;
        // One issue per app at a time here, so two cannot both pass the
        // count. (Several brokers sharing an app could still overshoot by
        // the number of brokers.)
        let lock = self.app_lock(app);
        let _held = lock.lock().await;
        let existing = self.graph.passwords(app).await?;
        let live = live_keygate_passwords(&existing, OffsetDateTime::now_utc());
        if live >= p.max_passwords as usize {
            return Err(ProviderError::Refused(format!(
                "application `{app}` already holds {live} live keygate passwords and scope `{}` allows at most {}: release a credential of this scope or wait for one to expire",
                req.scope.name, p.max_passwords
            )));
        }
        let name = display_name(&req.agent.id, &req.task_id, &req.lease_id);
        let added = self.graph.add_password(app, &name, req.expires_at).await?;
        tracing::info!(lease_id = %req.lease_id, application = %app, key_id = %added.key_id, "added an app password");
        let credential = Credential::new()
            .public("client_id", p.client_id.clone())
            .secret("client_secret", added.secret)
            .public("tenant_id", self.entra.tenant_id.clone())
            .public("expires_at", rfc3339(added.end)?);
        Ok(Issued {
            credential,
            handle: RevokeHandle(json!({
                "kind": "app_password",
                "application_object_id": app,
                "key_id": added.key_id,
            })),
            expires_at: added.end,
            revocability: Revocability::Revocable,
        })
    }

    /// Removes the password named in the handle, or, for a lease whose
    /// handle was never recorded, every password named after the lease.
    pub(crate) async fn remove_app_password(
        &self,
        req: &RevokeRequest,
        scope: Option<&AppPassword>,
    ) -> Result<RevokeOutcome, ProviderError> {
        let handle = req.handle.as_ref().map(|h| &h.0);
        let recorded = handle.and_then(|h| {
            Some((
                h.get("application_object_id")?.as_str()?,
                h.get("key_id")?.as_str()?,
            ))
        });
        if let Some((app, key_id)) = recorded {
            let outcome = match self.graph.remove_password(app, key_id).await? {
                Removal::Removed => RevokeOutcome::Revoked,
                Removal::NotFound => RevokeOutcome::AlreadyGone,
            };
            tracing::info!(lease_id = %req.lease_id, application = %app, key_id, ?outcome, "removed an app password");
            return Ok(outcome);
        }
        let Some(p) = scope else {
            return Err(ProviderError::InvalidParams(format!(
                "lease `{}`: no key id was recorded and scope `{}` no longer names an application to search",
                req.lease_id, req.scope.name
            )));
        };
        self.remove_by_lease(&p.application_object_id, &req.lease_id)
            .await
    }

    /// An issue that never recorded its handle: finds the lease's passwords
    /// by name and removes them.
    async fn remove_by_lease(
        &self,
        app: &str,
        lease_id: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let mut outcome = RevokeOutcome::AlreadyGone;
        for p in self.graph.passwords(app).await? {
            let mine = p
                .display_name
                .as_deref()
                .and_then(parse_name)
                .is_some_and(|n| n.lease_id == lease_id);
            if mine && self.graph.remove_password(app, &p.key_id).await? == Removal::Removed {
                tracing::info!(lease_id, application = %app, key_id = %p.key_id, "removed an orphaned app password");
                outcome = RevokeOutcome::Revoked;
            }
        }
        Ok(outcome)
    }

    /// The issue lock of one application.
    fn app_lock(&self, app: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .app_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(locks.entry(app.to_owned()).or_default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_not_ours() {
        let n = display_name("billing-agent.v2", "tk_0190", "ls_0191");
        assert_eq!(n, "keygate:billing-agent.v2:tk_0190:ls_0191");
        assert_eq!(
            parse_name(&n),
            Some(KeygateName {
                agent: "billing-agent.v2",
                task: "tk_0190",
                lease_id: "ls_0191"
            })
        );
        for other in [
            "CI deploy secret",
            "keygate",
            "keygate:a:b",
            "keygate:a:b:c:d",
            "keygate::t:l",
            "Keygate:a:t:l",
            "xkeygate:a:t:l",
        ] {
            assert_eq!(parse_name(other), None, "{other}");
        }
    }

    #[test]
    fn only_working_keygate_passwords_count() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let p = |name: Option<&str>, end: i64| PasswordInfo {
            key_id: "k".into(),
            display_name: name.map(str::to_owned),
            end: Some(OffsetDateTime::from_unix_timestamp(end).unwrap()),
        };
        let list = [
            p(Some("keygate:a:t:l1"), 1_800_000_100),
            p(Some("keygate:a:t:l2"), 1_799_999_999),
            p(Some("deploy"), 1_800_000_100),
            p(None, 1_800_000_100),
            PasswordInfo {
                key_id: "k".into(),
                display_name: Some("keygate:a:t:l3".into()),
                end: None,
            },
        ];
        assert_eq!(live_keygate_passwords(&list, now), 2);
    }
}
