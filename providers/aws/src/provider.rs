//! The [`Provider`] implementation: dispatch to the STS, Secrets Manager and
//! fence halves.

use async_trait::async_trait;
use keygate_provider_api::{
    FenceRequest, Fenced, IssueRequest, Issued, LiftFenceRequest, Provider, ProviderError,
    RevokeOutcome, RevokeRequest, ScopeSpec,
};
use serde_json::Value;

use crate::scope::{self, ScopeKind};
use crate::{AwsProvider, KIND};

#[async_trait]
impl Provider for AwsProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_scope(&self, scope: &ScopeSpec) -> Result<(), ProviderError> {
        scope::validate(&scope.params, scope.max_ttl)
    }

    /// A secret read with `rotate_on_release` is rotated at TTL too: the
    /// value the agent saw must not stay current.
    fn acts_at_expiry(&self, scope: &ScopeSpec) -> bool {
        matches!(
            scope::parse(&scope.params),
            Ok(scope::ScopeKind::Secret(s)) if s.rotate_on_release
        )
    }

    /// As read: a secret whose handle names a rotation.
    fn acts_at_expiry_of(&self, _scope: &ScopeSpec, handle: &Value) -> bool {
        handle["kind"] == "secret" && handle["rotation"].as_str().is_some_and(|r| r != "none")
    }

    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError> {
        if !matches!(&req.request_params, Value::Null)
            && req.request_params.as_object().is_none_or(|o| !o.is_empty())
        {
            return Err(ProviderError::InvalidParams(
                "aws scopes take no request params".into(),
            ));
        }
        match scope::parse(&req.scope.params)? {
            ScopeKind::AssumeRole(p) => self.assume_role(req, &p).await,
            ScopeKind::Secret(p) => self.read_secret(req, &p).await,
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
            (Some("assume_role"), _) | (None, Some(ScopeKind::AssumeRole(_))) => {
                Ok(self.session_lives_until(req))
            }
            (Some("secret"), s) | (None, s @ Some(ScopeKind::Secret(_))) => {
                let secret = match &s {
                    Some(ScopeKind::Secret(p)) => Some(p),
                    _ => None,
                };
                self.end_secret_lease(req, secret).await
            }
            _ => Err(ProviderError::InvalidParams(format!(
                "lease `{}`: neither its handle nor scope `{}` says what was issued",
                req.lease_id, req.scope.name
            ))),
        }
    }

    async fn fence(&self, req: &FenceRequest) -> Result<Fenced, ProviderError> {
        self.put_fences(req).await
    }

    fn puts_up_fences(&self) -> bool {
        true
    }

    async fn lift_fence(&self, req: &LiftFenceRequest) -> Result<(), ProviderError> {
        self.take_down(req).await
    }
}
