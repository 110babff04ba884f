//! Start-up checks once Vault answers: Keygate's own logins that a killed
//! process left behind, and policies a `token` scope asks for that Keygate
//! cannot grant.
//!
//! Keygate's own logins that a killed process left behind: at start, once
//! logged in, Keygate revokes every other live token of its AppRole (same
//! `role_name`, same login path), so its live tokens stay bounded by the
//! running processes instead of piling up one per start. Done only when a
//! token role makes agents' tokens orphans (revoking a login would otherwise
//! revoke the agents' tokens created under it).
//!
//! Several Keygate processes on one AppRole (replicas on PostgreSQL) would
//! revoke each other's logins at start; each logs in again at its next
//! call (a 403 whose `lookup-self` fails), so this converges, at the cost of
//! one extra login per replica start.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::conn::Conn;
use crate::http::Raw;
use crate::walk::Walker;

/// Keygate's own `lookup-self`, once Vault answers (retried with backoff).
async fn wait_for_vault(conn: &Conn) -> Value {
    let mut wait = Duration::from_secs(1);
    loop {
        match conn.lookup_self().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::debug!(error = %e, "vault not ready for the start-up checks");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Warns, once, when a `token` scope asks for policies Keygate cannot grant:
/// not in the token role's `allowed_policies`, or (without a role) not held
/// by Keygate's own token (Vault: "child policies must be subset of parent").
pub(crate) async fn check_grantable(
    conn: Arc<Conn>,
    role: Option<String>,
    scope: String,
    policies: Vec<String>,
) {
    let me = wait_for_vault(&conn).await;
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (held, what) = match &role {
        Some(r) => match conn
            .call(|| Raw::get(format!("auth/token/roles/{r}")))
            .await
        {
            Ok(v) => {
                if v.pointer("/data/orphan").and_then(Value::as_bool) != Some(true) {
                    tracing::warn!(role = %r, "vault token role is not `orphan = true`: agents' tokens die with keygate's login");
                }
                (
                    strings(v.pointer("/data/allowed_policies")),
                    format!("token role `{r}` allows"),
                )
            }
            Err(e) => {
                tracing::warn!(role = %r, error = %e, "cannot read the vault token role; set it up as the README says");
                return;
            }
        },
        None => {
            let mut held = strings(me.pointer("/data/policies"));
            held.extend(strings(me.pointer("/data/identity_policies")));
            (held, "keygate's own vault token holds".to_owned())
        }
    };
    let missing: Vec<&String> = policies
        .iter()
        .filter(|p| p.as_str() != "default" && !held.contains(p))
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            scope = %scope,
            missing = ?missing,
            "vault scope `{scope}` grants policies that {what} not: {missing:?}; its requests will be refused until they are added"
        );
    }
}

/// Waits for Vault, then revokes the stale logins once.
pub(crate) async fn clean_up(conn: Arc<Conn>, walker: Arc<Walker>) {
    let me = wait_for_vault(&conn).await;
    let field = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let (Some(own), Some(path), Some(role)) = (
        field(&me, "/data/accessor"),
        field(&me, "/data/path"),
        field(&me, "/data/meta/role_name"),
    ) else {
        return;
    };
    let walk = walker.walk(&conn).await;
    let Ok(walk) = walk.as_ref() else {
        tracing::warn!("cannot look for stale keygate logins: the accessor walk failed");
        return;
    };
    let mut revoked = 0;
    for t in &walk.others {
        let mine = t.path == path
            && t.meta.get("role_name").and_then(Value::as_str) == Some(role.as_str())
            && t.accessor != own;
        if !mine {
            continue;
        }
        let accessor = t.accessor.clone();
        match conn
            .call(|| {
                Raw::post(
                    "auth/token/revoke-accessor",
                    json!({ "accessor": accessor }),
                )
            })
            .await
        {
            Ok(_) => revoked += 1,
            Err(e) => tracing::warn!(error = %e, "could not revoke a stale keygate login"),
        }
    }
    if revoked > 0 {
        tracing::info!(revoked, "revoked keygate's stale vault logins");
    }
}
