//! A session token on every call after it was issued: verified against its
//! task and agent, checked for the sender it is bound to (DPoP key, client
//! certificate), introspected (RFC 7662) and revoked (RFC 7009).

use super::Broker;
use super::sessions::{Presented, Session};
use crate::audit::{Actor, AuditEvent};
use crate::model::{AgentStatus, TaskState, now, unix};

/// Why a session token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The token, its task, its agent or its sender binding says no (401).
    Invalid(String),
    /// The store could not be asked: nothing is known about the token, so
    /// the caller should retry rather than drop it (503).
    Unavailable(String),
}

impl std::fmt::Display for SessionRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(m) | Self::Unavailable(m) => f.write_str(m),
        }
    }
}

impl From<String> for SessionRefusal {
    fn from(m: String) -> Self {
        Self::Invalid(m)
    }
}

impl From<&str> for SessionRefusal {
    fn from(m: &str) -> Self {
        Self::Invalid(m.to_owned())
    }
}

impl Broker {
    /// Checks a session token: signature, then that its task is still open
    /// and its agent still active. Ended tasks fail here at once.
    pub async fn session(&self, token: &str) -> Result<Session, SessionRefusal> {
        let claims = self.signer.verify(token).map_err(|e| e.to_string())?;
        let agents_seen = self
            .agents_changed
            .load(std::sync::atomic::Ordering::SeqCst);
        let (task, agent) = self
            .store
            .task_with_agent(&claims.task_id)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "session lookup failed");
                SessionRefusal::Unavailable(
                    "the session cannot be checked right now: try again shortly".to_owned(),
                )
            })?
            .ok_or("the session's task does not exist")?;
        if task.agent_id != claims.sub {
            return Err("the session token does not match its task".into());
        }
        if task.state != TaskState::Open || task.expires_at <= now() {
            return Err(format!("the task has ended ({})", task.state).into());
        }
        let agent = agent.ok_or("the session's agent does not exist")?;
        if agent.status != AgentStatus::Active {
            return Err(format!("agent is {}", agent.status).into());
        }
        Ok(Session {
            agent,
            task,
            agents_seen,
            jkt: claims
                .cnf
                .as_ref()
                .and_then(|c| c["jkt"].as_str())
                .map(str::to_owned),
            x5t: claims
                .cnf
                .as_ref()
                .and_then(|c| c["x5t#S256"].as_str())
                .map(str::to_owned),
            source: None,
        })
    }

    /// RFC 7662 introspection of a session token: `active` only while its
    /// task is open and its agent active, so ended and revoked tokens turn
    /// inactive at once.
    pub async fn introspect(&self, token: &str) -> serde_json::Value {
        let Ok(claims) = self.signer.verify(token) else {
            return serde_json::json!({ "active": false });
        };
        match self.session(token).await {
            Ok(s) => {
                let mut v = serde_json::json!({
                    "active": true,
                    "token_type": "Bearer",
                    "iss": claims.iss,
                    "sub": claims.sub,
                    "client_id": claims.sub,
                    "aud": claims.aud,
                    "iat": claims.iat,
                    "exp": claims.exp,
                    "jti": claims.jti,
                    "task_id": s.task.id,
                });
                if let Some(scopes) = &s.task.scopes {
                    v["scope"] = scopes.join(" ").into();
                }
                if let Some(act) = claims.act {
                    v["act"] = act;
                }
                if let Some(u) = &s.task.on_behalf_of {
                    v["on_behalf_of"] = serde_json::json!({ "sub": u.id, "issuer": u.issuer });
                }
                // The binding a resource server must check (RFC 9449 §6.2,
                // RFC 8705 §3.2).
                if let Some(jkt) = &s.jkt {
                    v["token_type"] = "DPoP".into();
                    v["cnf"]["jkt"] = jkt.clone().into();
                }
                if let Some(x5t) = &s.x5t {
                    v["cnf"]["x5t#S256"] = x5t.clone().into();
                }
                v
            }
            Err(_) => serde_json::json!({ "active": false }),
        }
    }

    /// RFC 7009 revocation of a session token: its task ends (with any task
    /// delegated from it) and every lease of those tasks is revoked. An
    /// unknown or already dead token is not an error.
    pub async fn revoke_session_token(
        &self,
        actor: &Actor,
        token: &str,
    ) -> super::BrokerResult<()> {
        let Ok(claims) = self.signer.verify(token) else {
            return Ok(());
        };
        let t = now();
        let mut tx = self.store.begin().await?;
        let ended = tx
            .end_tasks(
                &crate::store::TaskSelector::Task(claims.task_id.clone()),
                TaskState::Revoked,
                "session token revoked",
                t,
            )
            .await?;
        if ended.is_empty() {
            return Ok(());
        }
        let queued = tx
            .queue_revocations(
                &crate::store::LeaseSelector::Task(claims.task_id.clone()),
                "session token revoked",
                None,
                t,
            )
            .await?;
        tx.audit(
            AuditEvent::new(actor, "task.token_revoked")
                .agent(&claims.sub)
                .task(&claims.task_id)
                .details(
                    serde_json::json!({ "tasks_ended": ended, "leases_queued": queued.len() }),
                ),
        )
        .await?;
        tx.commit().await?;
        self.leases.wake();
        Ok(())
    }

    /// The provider whose CA issued `cert` (DER) and has revoked it since:
    /// a certificate Keygate revoked still chains to the trust bundle. An
    /// error when a provider cannot tell right now (its revocation list is
    /// unreadable): the certificate is refused, with a message to retry.
    pub(crate) async fn certificate_revoked_by(
        &self,
        cert: &[u8],
    ) -> Result<Option<String>, String> {
        for (name, p) in self.registry.providers() {
            match p.certificate_revoked(cert).await {
                Ok(true) => return Ok(Some(name.to_owned())),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(provider = %name, error = %e, "cannot read the revocation list; refusing the client certificate");
                    return Err(format!(
                        "provider `{name}` cannot read its revocation list right now, so the client certificate is refused; retry"
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Sender constraint of a session (RFC 9449 §7): a DPoP-bound token must
    /// come as `Authorization: DPoP` with a fresh, unreplayed proof by its
    /// key for this method and URL; an unbound one as `Bearer`.
    pub async fn check_sender(
        &self,
        s: &Session,
        req: &Presented<'_>,
    ) -> Result<(), SessionRefusal> {
        let Presented {
            scheme,
            token,
            proof,
            cert,
            method,
            path,
        } = *req;
        if let Some(x5t) = &s.x5t {
            let Some(cert) = cert.filter(|c| &crate::server::tls::thumbprint(c) == x5t) else {
                return Err("this session token is bound to a client certificate: call over mTLS with that certificate".into());
            };
            // Revoked since the task opened (released, its own task ended,
            // a kill switch): the session it opened gets nothing more, but
            // may still end itself and give back what it holds.
            let ending = matches!(
                (method, path),
                ("POST", "/v1/tasks/complete") | ("POST", "/oauth/revoke")
            ) || (method == "DELETE" && path.starts_with("/v1/credentials/"));
            if !ending
                && let Some(name) = self
                    .certificate_revoked_by(cert)
                    .await
                    .map_err(SessionRefusal::Unavailable)?
            {
                return Err(format!("the client certificate this session token is bound to was revoked by provider `{name}`").into());
            }
        }
        let dpop_scheme = scheme.eq_ignore_ascii_case("dpop");
        let Some(jkt) = &s.jkt else {
            return if dpop_scheme {
                Err(
                    "this session token is not DPoP-bound: send it as `Authorization: Bearer`"
                        .into(),
                )
            } else {
                Ok(())
            };
        };
        if !dpop_scheme {
            return Err("this session token is bound to a DPoP key: send `Authorization: DPoP <token>` with a `DPoP` proof".into());
        }
        let proof = proof.ok_or("a `DPoP` proof header is required with this token")?;
        let url = format!("{}{path}", self.config.server.issuer.trim_end_matches('/'));
        let p = crate::identity::dpop::verify_proof(proof, method, &url, Some(token), unix(now()))
            .map_err(|e| e.to_string())?;
        if &p.jkt != jkt {
            return Err(
                "the DPoP proof is signed by another key than the token is bound to".into(),
            );
        }
        let fresh = async {
            let mut tx = self.store.begin().await?;
            let fresh = tx
                .record_jti(
                    &format!("dpop:{jkt}"),
                    &p.jti,
                    crate::model::from_unix(p.iat + 2 * crate::identity::dpop::MAX_SKEW_SECS),
                )
                .await?;
            tx.commit().await?;
            Ok::<bool, crate::store::StoreError>(fresh)
        }
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "cannot record a DPoP proof");
            SessionRefusal::Unavailable(
                "the DPoP proof cannot be checked right now: try again shortly".to_owned(),
            )
        })?;
        if !fresh {
            return Err("the DPoP proof was already used (`jti` replayed): send a fresh proof with each request".into());
        }
        Ok(())
    }
}
