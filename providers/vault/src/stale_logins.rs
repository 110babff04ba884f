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

/// Waits for Vault, then revokes the stale logins once.
pub(crate) async fn clean_up(conn: Arc<Conn>, walker: Arc<Walker>) {
    let mut wait = Duration::from_secs(1);
    let me = loop {
        match conn.lookup_self().await {
            Ok(v) => break v,
            Err(e) => {
                tracing::debug!(error = %e, "vault not ready for the stale-login clean-up");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    };
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
