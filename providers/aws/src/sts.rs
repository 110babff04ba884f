//! `assume_role` scopes: STS AssumeRole sessions that cannot be revoked one
//! by one, so they are kept short and revocation says how long they live.

use aws_sdk_sts::operation::assume_role::builders::AssumeRoleFluentBuilder;
use aws_sdk_sts::types::{PolicyDescriptorType, Tag};
use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
    RevokeRequest,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::scope::AssumeRole;
use crate::{AwsProvider, error, limits, rfc3339};

/// The session tags Keygate sets on every session, in this order.
pub(crate) const KEYGATE_TAGS: [&str; 5] = ["agent", "team", "sponsor", "task", "environment"];

/// When an issue never recorded its handle, whatever STS may have issued
/// lives at most this long past the lease's expiry (the issue started
/// before the lease's clock and took at most the issue timeout).
pub(crate) const ORPHAN_MARGIN: time::Duration = time::Duration::minutes(5);

/// Keygate's tags for one session, then the scope's own.
fn session_tags(req: &IssueRequest, p: &AssumeRole) -> Vec<(String, String)> {
    let a = &req.agent;
    let values = [&a.id, &a.team, &a.sponsor, &req.task_id, &a.environment];
    KEYGATE_TAGS
        .iter()
        .zip(values)
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain(p.session_tags.clone())
        .collect()
}

impl AwsProvider {
    /// STS AssumeRole into the scope's role for the lease: the task id as
    /// session name, the agent id as source identity, session tags, and the
    /// scope's session policy.
    pub(crate) async fn assume_role(
        &self,
        req: &IssueRequest,
        p: &AssumeRole,
    ) -> Result<Issued, ProviderError> {
        let duration = limits::session_duration(req.ttl.as_secs(), p.max_session_secs())?;
        let call = self.assume_role_call(req, p, duration)?;
        let out = call
            .send()
            .await
            .map_err(|e| error::from_sdk("sts:AssumeRole", e))?;
        let creds = out
            .credentials()
            .ok_or_else(|| ProviderError::Internal("sts answered without credentials".into()))?;
        let expires_at = to_time(creds.expiration())?;
        let assumed_role_arn = out.assumed_role_user().map(|u| u.arn()).unwrap_or_default();
        let credential = Credential::new()
            .public("access_key_id", creds.access_key_id())
            .secret(
                "secret_access_key",
                SecretString::from(creds.secret_access_key().to_owned()),
            )
            .secret(
                "session_token",
                SecretString::from(creds.session_token().to_owned()),
            )
            .public("expiration", rfc3339(expires_at)?)
            .public("assumed_role_arn", assumed_role_arn)
            .public("region", self.region.clone());
        // The access key id is an identifier, not a secret: it lets an
        // auditor find the session in CloudTrail.
        let handle = json!({
            "kind": "assume_role",
            "role_arn": p.role_arn,
            "assumed_role_arn": assumed_role_arn,
            "access_key_id": creds.access_key_id(),
            "expires_at": expires_at.unix_timestamp(),
        });
        tracing::info!(lease_id = %req.lease_id, role = %p.role_arn, access_key_id = %creds.access_key_id(), duration_secs = duration, "assumed role");
        Ok(Issued {
            credential,
            handle: RevokeHandle(handle),
            expires_at,
            revocability: Revocability::ExpiresAt,
        })
    }

    /// The AssumeRole request, after checking every parameter against AWS's
    /// limits.
    fn assume_role_call(
        &self,
        req: &IssueRequest,
        p: &AssumeRole,
        duration: i32,
    ) -> Result<AssumeRoleFluentBuilder, ProviderError> {
        limits::role_session_name(&req.task_id)?;
        limits::source_identity(&req.agent.id)?;
        let tags = session_tags(req, p);
        limits::session_tags(&tags)?;
        limits::policy_arns(&p.policy_arns)?;
        let mut call = self
            .sts
            .assume_role()
            .role_arn(&p.role_arn)
            .role_session_name(&req.task_id)
            .source_identity(&req.agent.id)
            .duration_seconds(duration)
            .set_policy(p.compact_policy()?);
        for (key, value) in tags {
            let tag =
                Tag::builder().key(key).value(value).build().map_err(|e| {
                    ProviderError::Internal(format!("cannot build a session tag: {e}"))
                })?;
            call = call.tags(tag);
        }
        for arn in &p.policy_arns {
            call = call.policy_arns(PolicyDescriptorType::builder().arn(arn).build());
        }
        Ok(call)
    }

    /// STS sessions cannot be revoked one by one: report how long it lives.
    /// (An emergency revocation puts up a fence instead; see `fence`.)
    pub(crate) fn session_lives_until(&self, req: &RevokeRequest) -> RevokeOutcome {
        let recorded = req
            .handle
            .as_ref()
            .and_then(|h| h.0.get("expires_at"))
            .and_then(Value::as_i64)
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
        let until = recorded.unwrap_or(req.expires_at + ORPHAN_MARGIN);
        if until <= OffsetDateTime::now_utc() {
            RevokeOutcome::AlreadyGone
        } else {
            RevokeOutcome::LivesUntil(until)
        }
    }
}

/// An AWS timestamp, rounded up to whole seconds (an expiry must not be
/// reported earlier than it is).
pub(crate) fn to_time(
    t: &aws_sdk_sts::primitives::DateTime,
) -> Result<OffsetDateTime, ProviderError> {
    let secs = t.secs() + i64::from(t.subsec_nanos() > 0);
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| ProviderError::Internal(format!("sts sent an unusable expiry: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use std::time::Duration;

    use keygate_provider_api::{AgentInfo, ScopeSpec};
    use serde_json::json;

    use super::*;
    use crate::scope::{self, ScopeKind};

    /// Every fence rests on what AssumeRole is sent: the task id as the
    /// session name (`aws:userid` ends with it), the agent id as the source
    /// identity (`aws:SourceIdentity`), and the session tags. Checked on the
    /// request the SDK would send, with no AWS to call.
    #[tokio::test]
    async fn assume_role_names_the_task_and_the_agent() {
        let cfg: crate::AwsConfig = serde_json::from_value(json!({
            "region": "eu-west-1", "endpoint_url": "http://127.0.0.1:9",
        }))
        .unwrap();
        let p = AwsProvider::open(cfg).await.unwrap();
        let params = json!({
            "kind": "assume_role", "role_arn": "arn:aws:iam::123456789012:role/reports",
            "session_tags": { "cost-center": "42" },
        });
        let ScopeKind::AssumeRole(role) = scope::parse(&params).unwrap() else {
            panic!("not assume_role");
        };
        let req = IssueRequest {
            lease_id: "ls_1".into(),
            task_id: "tk_01abc".into(),
            agent: AgentInfo {
                id: "invoice-agent".into(),
                team: "finance".into(),
                sponsor: "owner@example.com".into(),
                environment: "prod".into(),
                risk_tier: 2,
            },
            scope: ScopeSpec {
                name: "reports".into(),
                max_ttl: Duration::from_secs(3600),
                params: params.clone(),
            },
            ttl: Duration::from_secs(900),
            expires_at: OffsetDateTime::now_utc() + Duration::from_secs(900),
            request_params: serde_json::Value::Null,
        };
        let input = p
            .assume_role_call(&req, &role, 900)
            .unwrap()
            .as_input()
            .clone();
        assert_eq!(input.get_role_session_name().as_deref(), Some("tk_01abc"));
        assert_eq!(
            input.get_source_identity().as_deref(),
            Some("invoice-agent")
        );
        assert_eq!(input.get_duration_seconds(), &Some(900));
        let tags: Vec<(String, String)> = input
            .get_tags()
            .as_ref()
            .unwrap()
            .iter()
            .map(|t| (t.key().to_owned(), t.value().to_owned()))
            .collect();
        for want in [
            ("agent", "invoice-agent"),
            ("team", "finance"),
            ("sponsor", "owner@example.com"),
            ("task", "tk_01abc"),
            ("environment", "prod"),
            ("cost-center", "42"),
        ] {
            assert!(
                tags.contains(&(want.0.to_owned(), want.1.to_owned())),
                "{want:?} not in {tags:?}"
            );
        }
    }
}
