//! `kind = "database"`: dynamic credentials from a database secrets engine
//! role, revoked through Vault's lease (`sys/leases/revoke`).

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;
use vaultrs::api::database::requests::GenerateCredentialsRequest;

use crate::VaultProvider;
use crate::http::{Raw, VaultError, str_at, u64_at};
use crate::lifetime::{expiry, remaining_secs, rfc3339};

impl VaultProvider {
    pub(crate) async fn issue_database(
        &self,
        req: &IssueRequest,
        mount: &str,
        role: &str,
    ) -> Result<Issued, ProviderError> {
        let ttl = remaining_secs(req)?;
        // vaultrs' `database::role::creds()` drops the lease id; its request
        // type executed directly keeps the whole answer.
        let make = || GenerateCredentialsRequest {
            mount: mount.to_owned(),
            name: role.to_owned(),
        };
        let v = self
            .conn
            .call(make)
            .await
            .map_err(|e| e.into_provider("creating database credentials"))?;
        let internal = |e: VaultError| e.into_provider("reading vault's database answer");
        let lease_id = str_at(&v, "/lease_id").map_err(internal)?.to_owned();
        let username = str_at(&v, "/data/username").map_err(internal)?.to_owned();
        let password =
            SecretString::from(str_at(&v, "/data/password").map_err(internal)?.to_owned());
        let granted = u64_at(&v, "/lease_duration").map_err(internal)?;
        let expires_at = self
            .fit_to_lease(&lease_id, role, granted, ttl, req.expires_at)
            .await?;
        tracing::info!(lease_id = %req.lease_id, vault_lease = %lease_id, username = %username, ttl_secs = granted, "issued database credentials");
        Ok(Issued {
            credential: Credential::new()
                .public("username", username)
                .secret("password", password)
                .public("expires_at", rfc3339(expires_at)?),
            handle: RevokeHandle(json!({ "kind": "database", "lease_id": lease_id })),
            expires_at,
            revocability: Revocability::Revocable,
        })
    }

    /// The role's default_ttl may be longer than the lease: shorten the
    /// Vault lease to the Keygate lease, or revoke it and refuse. Returns the
    /// credentials' expiry.
    ///
    /// When neither works the database user lives on: the answer is then
    /// the issue with its true, longer expiry, so the broker records the
    /// Vault lease and queues it for revocation (retried until Vault takes
    /// it) instead of forgetting a live user.
    async fn fit_to_lease(
        &self,
        lease_id: &str,
        role: &str,
        granted: u64,
        ttl: u64,
        cap: OffsetDateTime,
    ) -> Result<OffsetDateTime, ProviderError> {
        if granted <= ttl {
            return Ok(expiry(cap, granted));
        }
        let why = match self.renew_vault_lease(lease_id, ttl).await {
            Ok(g) if g <= ttl => return Ok(expiry(cap, g)),
            Ok(_) => "vault kept the longer ttl".to_owned(),
            Err(e) => e.to_string(),
        };
        match self.revoke_vault_lease(lease_id).await {
            // Gone: nothing lives, the issue simply failed.
            Ok(_) => Err(ProviderError::Refused(format!(
                "role `{role}` grants {granted}s, more than the lease's {ttl}s, and shortening failed ({why}); lower the role's default_ttl"
            ))),
            Err(e) => {
                tracing::warn!(vault_lease = %lease_id, role, granted_secs = granted, error = %e, "database credentials outlive their lease: shortening ({why}) and revoking failed");
                Ok(expiry(
                    OffsetDateTime::now_utc() + time::Duration::days(36_500),
                    granted,
                ))
            }
        }
    }

    /// `sys/leases/renew`: sets the Vault lease to `increment` seconds from
    /// now (Vault caps it at the role's max_ttl). Returns what Vault granted.
    pub(crate) async fn renew_vault_lease(
        &self,
        lease_id: &str,
        increment: u64,
    ) -> Result<u64, ProviderError> {
        let body = json!({ "lease_id": lease_id, "increment": increment });
        let v = self
            .conn
            .call(|| Raw::put("sys/leases/renew", body.clone()))
            .await
            .map_err(|e| e.into_provider("renewing a vault lease"))?;
        u64_at(&v, "/lease_duration").map_err(|e| e.into_provider("reading vault's renewal"))
    }

    pub(crate) async fn renew_database(
        &self,
        lease_id: &str,
        increment: u64,
        not_after: OffsetDateTime,
    ) -> Result<OffsetDateTime, ProviderError> {
        let granted = self.renew_vault_lease(lease_id, increment).await?;
        Ok(expiry(not_after, granted))
    }

    /// `sys/leases/revoke`. Vault answers 204 also for a lease it no longer
    /// has, so a second revoke reports `Revoked` again.
    pub(crate) async fn revoke_vault_lease(
        &self,
        lease_id: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let body = json!({ "lease_id": lease_id });
        match self
            .conn
            .call(|| Raw::put("sys/leases/revoke", body.clone()))
            .await
        {
            Ok(_) => Ok(RevokeOutcome::Revoked),
            Err(e)
                if matches!(e.status(), Some(400 | 404))
                    && (e.mentions("invalid lease") || e.mentions("not found")) =>
            {
                Ok(RevokeOutcome::AlreadyGone)
            }
            Err(e) => Err(e.into_provider("revoking a vault lease")),
        }
    }

    /// A lease whose Vault lease id was never recorded. Vault's leases carry
    /// nothing that names the Keygate lease, so it cannot be found; it is
    /// bounded instead by the role's `max_ttl`: credentials created before
    /// now die by `now + max_ttl`. A role without a `max_ttl` gives no honest
    /// bound, so the lease stays queued with an error an operator sees.
    pub(crate) async fn database_orphan(
        &self,
        mount: &str,
        role: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let v = self
            .conn
            .call(|| Raw::get(format!("{mount}/roles/{role}")))
            .await
            .map_err(|e| e.into_provider("reading the database role"))?;
        let max_ttl = v
            .pointer("/data/max_ttl")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if max_ttl == 0 {
            return Err(ProviderError::Refused(format!(
                "the lease's vault lease id was never recorded and role `{role}` has no max_ttl to bound it; revoke leftovers by hand (`bao lease revoke -prefix {mount}/creds/{role}`) and release the lease"
            )));
        }
        let until = OffsetDateTime::now_utc().saturating_add(time::Duration::seconds(
            i64::try_from(max_ttl).unwrap_or(i64::MAX),
        ));
        Ok(RevokeOutcome::LivesUntil(until))
    }
}
