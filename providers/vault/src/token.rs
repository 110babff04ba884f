//! `kind = "token"`: child tokens of Keygate's Vault token.

use std::collections::HashMap;

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;
use vaultrs::api::token::requests::{
    CreateTokenRequest, RenewTokenAccessorRequest, RevokeTokenAccessorRequest,
};

use crate::VaultProvider;
use crate::http::{Raw, VaultError, str_at, u64_at};
use crate::lifetime::{expiry, remaining_secs, rfc3339};

/// The token metadata key naming the Keygate lease, used to find a token
/// whose accessor the broker never recorded.
pub(crate) const LEASE_META: &str = "keygate_lease";

impl VaultProvider {
    pub(crate) async fn issue_token(
        &self,
        req: &IssueRequest,
        policies: &[String],
        num_uses: Option<u64>,
        renewable: bool,
    ) -> Result<Issued, ProviderError> {
        let ttl = remaining_secs(req)?;
        let meta: HashMap<String, String> = [
            ("agent", req.agent.id.as_str()),
            ("task", req.task_id.as_str()),
            ("scope", req.scope.name.as_str()),
            (LEASE_META, req.lease_id.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let max_ttl = req.scope.max_ttl.as_secs().max(ttl);
        self.walker.issuing();
        let created = match &self.token_role {
            // Against the token role: an orphan, living exactly its lease.
            Some(role) => {
                let body = json!({
                    "policies": policies,
                    "ttl": format!("{ttl}s"),
                    "explicit_max_ttl": format!("{max_ttl}s"),
                    "meta": meta,
                    "num_uses": num_uses.unwrap_or(0),
                    "renewable": renewable,
                    "display_name": format!("keygate-{}", req.agent.id),
                });
                self.conn
                    .call(|| Raw::post(format!("auth/token/create/{role}"), body.clone()))
                    .await
            }
            None => {
                let make = || CreateTokenRequest {
                    policies: Some(policies.to_vec()),
                    ttl: Some(format!("{ttl}s")),
                    explicit_max_ttl: Some(format!("{max_ttl}s")),
                    meta: Some(meta.clone()),
                    num_uses,
                    renewable: Some(renewable),
                    display_name: Some(format!("keygate-{}", req.agent.id)),
                    ..Default::default()
                };
                self.conn.call(make).await
            }
        };
        let v = created.map_err(|e| e.into_provider("creating a vault token"))?;
        let internal = |e: VaultError| e.into_provider("reading vault's token answer");
        let token = SecretString::from(
            str_at(&v, "/auth/client_token")
                .map_err(internal)?
                .to_owned(),
        );
        let accessor = str_at(&v, "/auth/accessor").map_err(internal)?.to_owned();
        let granted = u64_at(&v, "/auth/lease_duration").map_err(internal)?;
        let expires_at = expiry(req.expires_at, granted);
        tracing::info!(lease_id = %req.lease_id, accessor = %accessor, ttl_secs = granted, "issued vault token");
        Ok(Issued {
            credential: Credential::new()
                .secret("token", token)
                .public("accessor", accessor.clone())
                .public("policies", policies.to_vec())
                .public("vault_addr", self.address.clone())
                .public("renewable", renewable)
                .public("expires_at", rfc3339(expires_at)?),
            handle: RevokeHandle(
                json!({ "kind": "token", "accessor": accessor, "renewable": renewable }),
            ),
            expires_at,
            revocability: Revocability::Revocable,
        })
    }

    /// Revokes a token (and its children) by accessor. Vault answers 200
    /// with a warning, or 400 `invalid accessor`, for a token that is gone.
    pub(crate) async fn revoke_token(
        &self,
        accessor: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let make = || RevokeTokenAccessorRequest {
            accessor: accessor.to_owned(),
        };
        match self.conn.call(make).await {
            Ok(v) => {
                let warned_gone = v
                    .get("warnings")
                    .and_then(Value::as_array)
                    .is_some_and(|w| {
                        w.iter()
                            .filter_map(Value::as_str)
                            .any(|s| s.contains("No token found"))
                    });
                Ok(if warned_gone {
                    RevokeOutcome::AlreadyGone
                } else {
                    RevokeOutcome::Revoked
                })
            }
            Err(e) if gone(&e) => Ok(RevokeOutcome::AlreadyGone),
            Err(e) => Err(e.into_provider("revoking a vault token")),
        }
    }

    /// A lease whose accessor was never recorded: find the token by its
    /// `keygate_lease` metadata in a walk over all accessors (shared with
    /// other orphans, see `walk.rs`) and revoke it; a finished walk that
    /// did not find it proves there is nothing to revoke.
    pub(crate) async fn revoke_token_orphan(
        &self,
        lease_id: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let walk = self.walker.walk(&self.conn).await;
        let walk = walk
            .as_ref()
            .as_ref()
            .map_err(|e| ProviderError::Unavailable(e.clone()))?;
        match walk.by_lease.get(lease_id) {
            Some(found) => {
                tracing::info!(lease_id, accessor = %found.accessor, "found the orphaned lease's vault token");
                self.revoke_token(&found.accessor).await
            }
            None => {
                tracing::info!(
                    lease_id,
                    skipped = walk.skipped,
                    "no vault token carries this lease: it was never minted or is gone"
                );
                Ok(RevokeOutcome::AlreadyGone)
            }
        }
    }

    pub(crate) async fn renew_token(
        &self,
        accessor: &str,
        increment: u64,
        not_after: OffsetDateTime,
    ) -> Result<OffsetDateTime, ProviderError> {
        let make = || RenewTokenAccessorRequest {
            accessor: accessor.to_owned(),
            increment: Some(format!("{increment}s")),
        };
        let v = self
            .conn
            .call(make)
            .await
            .map_err(|e| e.into_provider("renewing a vault token"))?;
        let granted = u64_at(&v, "/auth/lease_duration")
            .map_err(|e| e.into_provider("reading vault's renewal"))?;
        Ok(expiry(not_after, granted))
    }
}

/// Vault's ways of saying the token does not exist.
fn gone(e: &VaultError) -> bool {
    matches!(e.status(), Some(400 | 404))
        && (e.mentions("invalid accessor") || e.mentions("not found") || e.mentions("bad token"))
}
