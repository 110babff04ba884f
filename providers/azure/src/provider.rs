//! The [`Provider`] implementation: dispatch to the app-password and
//! access-token halves, and the sweeper.

use std::time::Duration;

use async_trait::async_trait;
use keygate_provider_api::{
    IssueRequest, Issued, LeaseLookup, Provider, ProviderError, RevokeOutcome, RevokeRequest,
    ScopeSpec, Sweep,
};
use serde_json::Value;
use time::OffsetDateTime;

use crate::scope::{self, ScopeKind};
use crate::{AzureProvider, KIND, access_token};

#[async_trait]
impl Provider for AzureProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_scope(&self, scope: &ScopeSpec) -> Result<(), ProviderError> {
        scope::validate(&scope.params).map(|_| ())
    }

    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError> {
        if !matches!(&req.request_params, Value::Null)
            && req.request_params.as_object().is_none_or(|o| !o.is_empty())
        {
            return Err(ProviderError::InvalidParams(
                "azure scopes take no request params".into(),
            ));
        }
        if req.expires_at <= OffsetDateTime::now_utc() {
            return Err(ProviderError::InvalidParams(format!(
                "lease `{}` has already expired; nothing is issued for it",
                req.lease_id
            )));
        }
        match scope::parse(&req.scope.params)? {
            ScopeKind::AppPassword(p) => self.add_app_password(req, &p).await,
            ScopeKind::AccessToken(p) => self.access_token(req, &p).await,
        }
    }

    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError> {
        // The handle says what was issued; without one (a crashed issue) the
        // scope as configured now does.
        let handle_kind = req
            .handle
            .as_ref()
            .and_then(|h| h.0.get("kind"))
            .and_then(Value::as_str);
        let scope = scope::parse(&req.scope.params).ok();
        match (handle_kind, scope) {
            (Some("app_password"), s) | (None, s @ Some(ScopeKind::AppPassword(_))) => {
                let p = match &s {
                    Some(ScopeKind::AppPassword(p)) => Some(p),
                    _ => None,
                };
                self.remove_app_password(req, p).await
            }
            (Some("access_token"), _) | (None, Some(ScopeKind::AccessToken(_))) => {
                Ok(access_token::lives_until(req))
            }
            _ => Err(ProviderError::InvalidParams(format!(
                "lease `{}`: neither its handle nor scope `{}` says what was issued",
                req.lease_id, req.scope.name
            ))),
        }
    }

    fn revoke_concurrency(&self) -> Option<usize> {
        self.max_revocations
    }

    fn sweep_interval(&self) -> Option<Duration> {
        Some(self.sweep_every)
    }

    async fn sweep(&self, scopes: &[ScopeSpec], leases: &dyn LeaseLookup) -> Sweep {
        self.sweep_apps(scopes, leases).await
    }
}
