//! The [`Provider`] implementation: dispatch on the scope kind or handle.

use async_trait::async_trait;
use keygate_provider_api::{
    IssueRequest, Issued, Provider, ProviderError, RenewRequest, Renewed, RevokeOutcome,
    RevokeRequest, ScopeSpec,
};
use serde_json::Value;

use crate::lifetime::secs_until;
use crate::scope::{self, ScopeKind};
use crate::{KIND, VaultProvider};

#[async_trait]
impl Provider for VaultProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_scope(&self, scope: &ScopeSpec) -> Result<(), ProviderError> {
        if let ScopeKind::Token { policies, .. } = scope::parse(&scope.params)? {
            // Once Vault answers: say, once, which policies Keygate could
            // not grant, instead of a refusal at every request.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return Ok(());
            };
            runtime.spawn(crate::stale_logins::check_grantable(
                std::sync::Arc::clone(&self.conn),
                self.token_role.clone(),
                scope.name.clone(),
                policies,
            ));
        }
        Ok(())
    }

    /// A renewable token can be extended by its holder
    /// (`auth/token/renew-self`, which Vault's `default` policy allows)
    /// past the lease Keygate recorded: it is revoked at its TTL, never
    /// left to die by itself.
    /// A renewable token (its holder may renew it past the lease) and a
    /// database lease (a renewal Vault applied but whose answer was lost
    /// extended it past the lease) are revoked at the lease's TTL; revoking
    /// what Vault already expired changes nothing.
    fn acts_at_expiry(&self, scope: &ScopeSpec) -> bool {
        matches!(
            scope::parse(&scope.params),
            Ok(ScopeKind::Token {
                renewable: true,
                ..
            } | ScopeKind::Database { .. })
        )
    }

    /// As minted: a token its handle says is renewable, any database lease.
    fn acts_at_expiry_of(&self, _scope: &ScopeSpec, handle: &serde_json::Value) -> bool {
        match handle["kind"].as_str() {
            Some("token") => handle["renewable"].as_bool().unwrap_or(true),
            Some("database") => true,
            _ => false,
        }
    }

    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError> {
        match scope::parse(&req.scope.params)? {
            ScopeKind::Token {
                policies,
                num_uses,
                renewable,
            } => self.issue_token(req, &policies, num_uses, renewable).await,
            ScopeKind::Database { mount, role } => self.issue_database(req, &mount, &role).await,
            ScopeKind::Pki {
                mount,
                role,
                trust_domain,
            } => self.issue_pki(req, &mount, &role, &trust_domain).await,
            ScopeKind::Kv {
                mount,
                path,
                version,
            } => self.read_kv(req, &mount, &path, version).await,
        }
    }

    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError> {
        let Some(handle) = &req.handle else {
            return self.revoke_orphan(req).await;
        };
        let field = |k: &str| handle.0.get(k).and_then(Value::as_str);
        let outcome = match (
            field("kind"),
            field("accessor"),
            field("lease_id"),
            field("serial"),
        ) {
            (Some("token"), Some(accessor), ..) => self.revoke_token(accessor).await?,
            (Some("database"), _, Some(lease_id), _) => self.revoke_vault_lease(lease_id).await?,
            (Some("pki"), .., Some(serial)) => {
                let mount = field("mount").unwrap_or("pki");
                self.revoke_pki(mount, serial).await?
            }
            // A brokered read: nothing exists to revoke.
            (Some("kv"), ..) => RevokeOutcome::AlreadyGone,
            _ => {
                tracing::warn!(lease_id = %req.lease_id, "unreadable vault revoke handle; treating the lease as an orphan");
                self.revoke_orphan(req).await?
            }
        };
        tracing::info!(lease_id = %req.lease_id, outcome = ?outcome, "vault revocation");
        Ok(outcome)
    }

    async fn renew(&self, req: &RenewRequest) -> Result<Renewed, ProviderError> {
        let increment = req.increment.as_secs().min(secs_until(req.not_after)?);
        let field = |k: &str| req.handle.0.get(k).and_then(Value::as_str);
        let expires_at = match (field("kind"), field("accessor"), field("lease_id")) {
            (Some("token"), Some(accessor), _) => {
                if req.handle.0.get("renewable").and_then(Value::as_bool) == Some(false) {
                    return Err(ProviderError::Unsupported(
                        "renewal of this vault token: it was issued with `renewable = false`"
                            .into(),
                    ));
                }
                self.renew_token(accessor, increment, req.not_after).await?
            }
            (Some("database"), _, Some(lease_id)) => {
                self.renew_database(lease_id, increment, req.not_after)
                    .await?
            }
            (Some(kind), ..) => {
                return Err(ProviderError::Unsupported(format!(
                    "renewal of a vault `{kind}` credential (issue a new one instead)"
                )));
            }
            _ => {
                return Err(ProviderError::Unsupported(
                    "renewal without a handle".into(),
                ));
            }
        };
        tracing::info!(lease_id = %req.lease_id, increment_secs = increment, "renewed");
        Ok(Renewed { expires_at })
    }

    fn revoke_concurrency(&self) -> Option<usize> {
        self.max_revocations
    }

    async fn shutdown(&self) {
        self.conn.revoke_own().await;
    }
}

impl VaultProvider {
    /// What the broker may have issued for a lease whose handle it never
    /// recorded (it crashed inside the issue call).
    async fn revoke_orphan(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError> {
        match scope::parse(&req.scope.params) {
            Ok(ScopeKind::Token { .. }) => self.revoke_token_orphan(&req.lease_id).await,
            Ok(ScopeKind::Database { mount, role }) => self.database_orphan(&mount, &role).await,
            // The certificate was requested with the lease's TTL, so it dies
            // by the lease's expiry; its serial is unknown.
            Ok(ScopeKind::Pki { .. }) => Ok(RevokeOutcome::LivesUntil(req.expires_at)),
            Ok(ScopeKind::Kv { .. }) => Ok(RevokeOutcome::AlreadyGone),
            Err(e) => Err(ProviderError::Internal(format!(
                "the lease has no revoke handle and its scope `{}` is gone or invalid ({e}); cannot tell what to revoke",
                req.scope.name
            ))),
        }
    }
}
