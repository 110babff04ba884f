//! `access_token` scopes: an Entra access token for the scope's resource,
//! obtained with the scope's app credentials (client credentials, the
//! resource's `.default` scope). Entra access tokens cannot be revoked:
//! a lease of one lives until the token's own expiry, which Entra sets.

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
    RevokeRequest,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::scope::AccessToken;
use crate::{AzureProvider, error, rfc3339};

/// Clock difference tolerated between Keygate and Entra when checking a
/// token's expiry against the scope's `max_ttl`.
const CLOCK_SLACK: time::Duration = time::Duration::seconds(5);

impl AzureProvider {
    /// A fresh token for the lease: a new credential per issue, so the
    /// scope's secret is read at the point of use and no two leases share a
    /// cached token.
    pub(crate) async fn access_token(
        &self,
        req: &IssueRequest,
        p: &AccessToken,
    ) -> Result<Issued, ProviderError> {
        let started = OffsetDateTime::now_utc();
        let secret = self.resolver.resolve(&p.client_secret).await?;
        let credential = self.entra.client_secret(&p.client_id, &secret)?;
        let scope = p.entra_scope();
        let token = azure_core::credentials::TokenCredential::get_token(
            credential.as_ref(),
            &[scope.as_str()],
            None,
        )
        .await
        .map_err(|e| {
            error::from_entra(
                &format!("app `{}` (scope `{}`)", p.client_id, req.scope.name),
                &e,
            )
        })?;
        let expires_at = whole_seconds_up(token.expires_on)?;
        let latest = started + req.scope.max_ttl + CLOCK_SLACK;
        if expires_at > latest {
            return Err(ProviderError::Refused(format!(
                "entra issued a token for `{}` valid for {} s, longer than scope `{}` allows ({} s); entra access tokens cannot be revoked, so keygate does not hand it over: raise the scope's `max_ttl_secs` to cover the tenant's token lifetime (entra's default is 60 to 90 minutes)",
                p.resource,
                (expires_at - started).whole_seconds(),
                req.scope.name,
                req.scope.max_ttl.as_secs()
            )));
        }
        tracing::info!(lease_id = %req.lease_id, client_id = %p.client_id, resource = %p.resource, expires_at = expires_at.unix_timestamp(), "obtained an access token");
        let credential = Credential::new()
            .secret(
                "access_token",
                secrecy::SecretString::from(token.token.secret().to_owned()),
            )
            .public("token_type", "Bearer")
            .public("expires_at", rfc3339(expires_at)?)
            .public("resource", p.resource.clone());
        Ok(Issued {
            credential,
            handle: RevokeHandle(json!({
                "kind": "access_token",
                "client_id": p.client_id,
                "resource": p.resource,
                "expires_at": expires_at.unix_timestamp(),
            })),
            expires_at,
            revocability: Revocability::ExpiresAt,
        })
    }
}

/// Entra access tokens cannot be revoked: says until when it lives.
pub(crate) fn lives_until(req: &RevokeRequest) -> RevokeOutcome {
    let recorded = req
        .handle
        .as_ref()
        .and_then(|h| h.0.get("expires_at"))
        .and_then(Value::as_i64)
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    match recorded {
        Some(until) if until > OffsetDateTime::now_utc() => RevokeOutcome::LivesUntil(until),
        Some(_) => RevokeOutcome::AlreadyGone,
        // No handle: the issue never completed, so no token left the broker
        // (it lived only in the memory of the call that was cut short).
        None => RevokeOutcome::AlreadyGone,
    }
}

/// An expiry rounded up to whole seconds (never reported earlier than it is).
fn whole_seconds_up(t: OffsetDateTime) -> Result<OffsetDateTime, ProviderError> {
    let secs = t.unix_timestamp() + i64::from(t.nanosecond() > 0);
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| ProviderError::Internal(format!("entra sent an unusable expiry: {e}")))
}
