//! The [`Provider`] implementation: dispatch to the X.509 and JWT halves.

use async_trait::async_trait;
use keygate_provider_api::{
    Credential, Document, IssueRequest, Issued, Provider, ProviderError, Revocability,
    RevokeHandle, RevokeOutcome, RevokeRequest, RevokedKind, ScopeSpec, Verification,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ca::CrlEntry;
use crate::revocations::Unexpired;
use crate::scope::{self, ScopeKind};
use crate::{KIND, LocalCa, verdict, x509};

#[async_trait]
impl Provider for LocalCa {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_scope(&self, scope: &ScopeSpec) -> Result<(), ProviderError> {
        scope::parse_scope(&scope.params).map(|_| ())
    }

    /// Certificates and JWTs are signed in memory; the revocation list
    /// changes only on revoke.
    fn issues_in_process(&self) -> bool {
        true
    }

    async fn issue(&self, req: &IssueRequest) -> Result<Issued, ProviderError> {
        let kind = scope::parse_scope(&req.scope.params)?;
        let spiffe_id = self.spiffe_id(&req.agent.id)?;
        let now = OffsetDateTime::now_utc();
        match kind {
            ScopeKind::X509Svid => self.issue_x509(req, spiffe_id, now),
            ScopeKind::JwtSvid { audiences } => {
                self.issue_jwt(req, spiffe_id, audiences.as_deref(), now)
            }
        }
    }

    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, ProviderError> {
        let (serial, jti, expires_at) = revoke_targets(req);
        let now = OffsetDateTime::now_utc();
        if expires_at <= now.unix_timestamp() {
            // Nothing issued for this lease can still be in use.
            return Ok(RevokeOutcome::AlreadyGone);
        }
        let added = self
            .revocations
            .revoke(serial.clone(), jti.clone(), expires_at, now)
            .await?;
        tracing::info!(
            lease_id = %req.lease_id,
            serial = serial.as_deref().unwrap_or("-"),
            jti = jti.as_deref().unwrap_or("-"),
            newly_revoked = added,
            "revoked"
        );
        Ok(if added {
            RevokeOutcome::Revoked
        } else {
            RevokeOutcome::AlreadyGone
        })
    }

    async fn document(&self, name: &str) -> Result<Option<Document>, ProviderError> {
        let now = OffsetDateTime::now_utc();
        let doc = match name {
            "crl.pem" | "crl.der" => {
                let crl =
                    self.ca
                        .crl(self.crl_entries(now).await?, self.next_crl_number(now), now)?;
                if name == "crl.pem" {
                    let pem = crl.pem().map_err(|e| {
                        ProviderError::Internal(format!("cannot encode the crl: {e}"))
                    })?;
                    Document {
                        content_type: "application/x-pem-file",
                        body: pem.into_bytes(),
                    }
                } else {
                    Document {
                        content_type: "application/pkix-crl",
                        body: crl.der().to_vec(),
                    }
                }
            }
            "bundle.pem" => Document {
                content_type: "application/x-pem-file",
                body: self.ca.cert_pem().as_bytes().to_vec(),
            },
            "jwks.json" => Document {
                content_type: "application/json",
                body: to_json(&self.jwt.jwks())?,
            },
            "revoked.json" => {
                let Unexpired { serials, jtis } = self.revocations.unexpired(now).await?;
                let keys = |v: Vec<(String, _)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
                let body = json!({ "serials": keys(serials), "jtis": keys(jtis) });
                Document {
                    content_type: "application/json",
                    body: to_json(&body)?,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(doc))
    }

    async fn certificate_revoked(&self, cert_der: &[u8]) -> Result<bool, ProviderError> {
        let Some(serial) = x509::serial_if_ours(&self.ca, cert_der) else {
            return Ok(false);
        };
        self.revocations
            .is_revoked(RevokedKind::Serial, &serial)
            .await
    }

    async fn verify(&self, presented: &Value) -> Result<Verification, ProviderError> {
        let now = OffsetDateTime::now_utc();
        let str_field = |key: &str| presented.get(key).and_then(Value::as_str);
        let keys: Vec<&str> = match presented.as_object() {
            Some(obj) => obj.keys().map(String::as_str).collect(),
            None => return Ok(verdict::invalid("malformed")),
        };
        // The signature and times are checked first; the revocation list
        // (perhaps the database) is read only for what passes them.
        let asked = std::sync::Mutex::new(None);
        let asked_ref = &asked;
        let ask = |kind: RevokedKind| {
            move |key: &str| {
                if let Ok(mut a) = asked_ref.lock() {
                    *a = Some((kind, key.to_owned()));
                }
                false
            }
        };
        let mut verdict = match keys.as_slice() {
            ["audience", "jwt_svid"] | ["jwt_svid", "audience"] => {
                match (str_field("jwt_svid"), str_field("audience")) {
                    (Some(token), Some(audience)) => {
                        self.jwt.verify(token, audience, now, ask(RevokedKind::Jti))
                    }
                    _ => verdict::invalid("malformed"),
                }
            }
            ["x509_svid"] => match str_field("x509_svid") {
                Some(pem) => x509::verify(&self.ca, pem, now, ask(RevokedKind::Serial)),
                None => verdict::invalid("malformed"),
            },
            _ => verdict::invalid("malformed"),
        };
        let asked = asked.into_inner().ok().flatten();
        if let Some((kind, key)) = asked
            && verdict.valid
            && self.revocations.is_revoked(kind, &key).await?
        {
            verdict = verdict::with_reason(Some("revoked"), verdict.subject, verdict.expires_at);
        }
        tracing::debug!(
            valid = verdict.valid,
            reason = verdict.reason.as_deref().unwrap_or("-"),
            "verified"
        );
        Ok(verdict)
    }
}

impl LocalCa {
    fn issue_x509(
        &self,
        req: &IssueRequest,
        spiffe_id: String,
        now: OffsetDateTime,
    ) -> Result<Issued, ProviderError> {
        scope::check_x509_request(&req.request_params)?;
        let svid = x509::issue(&self.ca, &spiffe_id, &req.lease_id, req.expires_at, now)?;
        let credential = Credential::new()
            .public("certificate", svid.cert_pem)
            .public("ca_bundle", self.ca.cert_pem())
            .public("spiffe_id", spiffe_id)
            .public("serial", svid.serial_hex.clone())
            .public("expires_at", rfc3339(svid.not_after)?)
            .secret("private_key", svid.key_pem);
        let handle = json!({
            "kind": "x509_svid",
            "serial": svid.serial_hex,
            "expires_at": svid.not_after.unix_timestamp(),
        });
        tracing::info!(lease_id = %req.lease_id, serial = %svid.serial_hex, "issued x509-svid");
        Ok(Issued {
            credential,
            handle: RevokeHandle(handle),
            expires_at: svid.not_after,
            revocability: Revocability::Revocable,
        })
    }

    fn issue_jwt(
        &self,
        req: &IssueRequest,
        spiffe_id: String,
        allowed: Option<&[String]>,
        now: OffsetDateTime,
    ) -> Result<Issued, ProviderError> {
        let audiences = scope::requested_audiences(&req.request_params, allowed)?;
        // `exp` has whole seconds; rounding down keeps it within the lease.
        let expires_at = OffsetDateTime::from_unix_timestamp(req.expires_at.unix_timestamp())
            .map_err(|e| ProviderError::Internal(e.to_string()))?;
        if expires_at <= now {
            return Err(ProviderError::InvalidParams(
                "the lease has already expired (its ttl ran out before issue; X.509 and JWT times are whole seconds): ask for a longer ttl".into(),
            ));
        }
        let token: SecretString =
            self.jwt
                .sign(&spiffe_id, &audiences, &req.lease_id, expires_at, now)?;
        let credential = Credential::new()
            .secret("token", token)
            .public("spiffe_id", spiffe_id)
            .public("expires_at", rfc3339(expires_at)?)
            .public("jti", req.lease_id.clone());
        let handle = json!({
            "kind": "jwt_svid",
            "jti": req.lease_id,
            "expires_at": expires_at.unix_timestamp(),
        });
        tracing::info!(lease_id = %req.lease_id, "issued jwt-svid");
        Ok(Issued {
            credential,
            handle: RevokeHandle(handle),
            expires_at,
            revocability: Revocability::Revocable,
        })
    }

    async fn crl_entries(&self, now: OffsetDateTime) -> Result<Vec<CrlEntry>, ProviderError> {
        let serials = self.revocations.unexpired(now).await?.serials;
        Ok(serials
            .into_iter()
            .filter_map(|(serial, e)| {
                Some(CrlEntry {
                    serial: hex::decode(serial).ok()?,
                    revoked_at: OffsetDateTime::from_unix_timestamp(e.revoked_at).unwrap_or(now),
                })
            })
            .collect())
    }
}

/// What to revoke for a lease: what its handle names, or, when the handle
/// was never recorded (or is unreadable), everything the lease id could have
/// produced. Returns `(serial, jti, expires_at)`.
fn revoke_targets(req: &RevokeRequest) -> (Option<String>, Option<String>, i64) {
    let handle = req.handle.as_ref().map(|h| &h.0);
    let field = |key: &str| handle.and_then(|h| h.get(key)).and_then(Value::as_str);
    // The later of the two expiries, so the entry outlives the credential.
    let expires_at = handle
        .and_then(|h| h.get("expires_at"))
        .and_then(Value::as_i64)
        .map_or(req.expires_at.unix_timestamp(), |e| {
            e.max(req.expires_at.unix_timestamp())
        });
    match (field("kind"), field("serial"), field("jti")) {
        (Some("x509_svid"), Some(serial), _) => {
            (Some(serial.to_ascii_lowercase()), None, expires_at)
        }
        (Some("jwt_svid"), _, Some(jti)) => (None, Some(jti.to_owned()), expires_at),
        _ => {
            if handle.is_some() {
                tracing::warn!(lease_id = %req.lease_id, "unreadable revoke handle; revoking by lease id");
            }
            let serial = hex::encode(x509::serial_for_lease(&req.lease_id));
            (Some(serial), Some(req.lease_id.clone()), expires_at)
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> Result<String, ProviderError> {
    t.format(&Rfc3339)
        .map_err(|e| ProviderError::Internal(e.to_string()))
}

fn to_json(v: &Value) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec_pretty(v).map_err(|e| ProviderError::Internal(e.to_string()))
}
