//! The grants that prove who the agent is before a task opens:
//! `private_key_jwt` client assertions, mTLS with an X.509-SVID (RFC 8705),
//! and a trusted issuer's JWT (workload identity federation).

use super::*;

impl Broker {
    pub(super) async fn client_credentials(
        &self,
        req: TokenRequest,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let client_id = req
            .client_id
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OAuthError::new("invalid_request", "`client_id` is required"))?;
        if req.client_assertion.as_deref().is_none_or(str::is_empty)
            && let Some(cert) = req.client_cert.clone()
        {
            return self.tls_client_auth(client_id.to_owned(), &cert, req).await;
        }
        if req.client_assertion_type.as_deref() != Some(JWT_BEARER_ASSERTION) {
            return Err(OAuthError::new(
                "invalid_client",
                format!("`client_assertion_type` must be `{JWT_BEARER_ASSERTION}`"),
            ));
        }
        let assertion = req
            .client_assertion
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OAuthError::new("invalid_client", "`client_assertion` is required"))?;
        self.session_ttl(req.ttl.as_deref())?;
        let (agent, claims) = self.authenticate(client_id, assertion).await?;
        let method = serde_json::json!({ "method": "private_key_jwt" });
        self.open_own_task(&agent, &claims, &req, method, None)
            .await
    }

    /// RFC 8705 `tls_client_auth`: the mTLS client certificate (an
    /// X.509-SVID) authenticates the agent bound to its SPIFFE ID, and the
    /// session token is bound to that certificate.
    pub(super) async fn tls_client_auth(
        &self,
        client_id: String,
        cert: &[u8],
        req: TokenRequest,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let trust_domain = self
            .config
            .server
            .tls
            .as_ref()
            .map(|t| t.trust_domain.clone())
            .ok_or_else(|| OAuthError::new("invalid_client", "mTLS is not configured"))?;
        let id = crate::server::tls::spiffe_id(cert, &trust_domain)
            .map_err(|e| OAuthError::new("invalid_client", e))?;
        // A certificate Keygate itself revoked (release, task end, kill
        // switch) chains to the bundle still: ask the CAs that issued it.
        if let Some(name) = self
            .certificate_revoked_by(cert)
            .await
            .map_err(|m| OAuthError::new("temporarily_unavailable", m))?
        {
            return Err(OAuthError::new(
                "invalid_client",
                format!("the client certificate was revoked by provider `{name}`"),
            ));
        }
        let agent = self
            .store
            .agent_by_subject(SPIFFE_ISSUER, &id)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| {
                OAuthError::new(
                    "invalid_client",
                    format!("no agent is bound to SPIFFE ID `{id}`"),
                )
            })?;
        if agent.id != client_id {
            return Err(OAuthError::new(
                "invalid_client",
                format!("SPIFFE ID `{id}` belongs to another agent than `client_id`"),
            ));
        }
        ensure_active(&agent)?;
        // No assertion to replay: each TLS handshake proves possession anew.
        let claims = AssertionClaims {
            exp: unix(now() + time::Duration::minutes(5)),
            iat: None,
            jti: Some(new_id("mtls")),
        };
        let method = serde_json::json!({ "method": "tls_client_auth", "spiffe_id": id });
        self.open_own_task(
            &agent,
            &claims,
            &req,
            method,
            Some(crate::server::tls::thumbprint(cert)),
        )
        .await
    }

    /// Workload identity federation (RFC 7523 §2.1): a JWT from a trusted
    /// issuer authenticates the one agent bound to its subject.
    pub(super) async fn federated(
        &self,
        req: TokenRequest,
    ) -> Result<(TokenResponse, String), OAuthError> {
        let token = req
            .assertion
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OAuthError::new("invalid_request", "`assertion` is required"))?;
        self.session_ttl(req.ttl.as_deref())?;
        let fed = self
            .federation
            .verify(token)
            .await
            .map_err(|e| federation_error(&e, ""))?;
        if fed.users {
            return Err(OAuthError::new(
                "invalid_grant",
                format!(
                    "issuer `{}` vouches for users, not workloads: pass its tokens as `user_token`",
                    fed.issuer
                ),
            ));
        }
        let (agent, claims) = self.bound_workload(&fed, "invalid_grant", "").await?;
        if let Some(cid) = req.client_id.as_deref().filter(|c| !c.is_empty())
            && cid != agent.id
        {
            return Err(OAuthError::new(
                "invalid_client",
                "`client_id` is not the agent bound to this subject",
            ));
        }
        ensure_active(&agent)?;
        let method = serde_json::json!({
            "method": "jwt_bearer", "issuer": fed.issuer, "subject": fed.subject,
        });
        self.open_own_task(&agent, &claims, &req, method, None)
            .await
    }

    /// The agent bound to a verified workload token's subject (refused with
    /// `code`, the message prefixed), and the token's claims for the replay
    /// check. A token without `jti` cannot be checked for replay; its
    /// issuer's short lifetimes bound it instead.
    pub(in crate::broker) async fn bound_workload(
        &self,
        fed: &crate::identity::Federated,
        code: &'static str,
        prefix: &str,
    ) -> Result<(Agent, AssertionClaims), OAuthError> {
        let agent = self
            .store
            .agent_by_subject(&fed.issuer, &fed.subject)
            .await
            .map_err(|e| internal(&e))?
            .ok_or_else(|| {
                OAuthError::new(
                    code,
                    format!(
                        "{prefix}no agent is bound to subject `{}` of issuer `{}`",
                        fed.subject, fed.issuer
                    ),
                )
            })?;
        let claims = AssertionClaims {
            exp: fed.exp,
            iat: None,
            jti: Some(fed.jti.clone().unwrap_or_else(|| new_id("nojti"))),
        };
        Ok((agent, claims))
    }
}
