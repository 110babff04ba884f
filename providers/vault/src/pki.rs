//! `kind = "pki"`: short-lived certificates naming the agent's SPIFFE ID,
//! revoked by serial (`pki/revoke`, which publishes the serial on the CRL).

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;
use vaultrs::api::pki::requests::{GenerateCertificateRequest, RevokeCertificateRequest};

use crate::VaultProvider;
use crate::http::{VaultError, str_at, u64_at};
use crate::lifetime::{remaining_secs, rfc3339};
use crate::scope::spiffe_id;

impl VaultProvider {
    pub(crate) async fn issue_pki(
        &self,
        req: &IssueRequest,
        mount: &str,
        role: &str,
        trust_domain: &str,
    ) -> Result<Issued, ProviderError> {
        let ttl = remaining_secs(req)?;
        let spiffe = spiffe_id(trust_domain, &req.agent.id)?;
        // A fresh key each time: Vault generates it and returns it once.
        let make = || GenerateCertificateRequest {
            mount: mount.to_owned(),
            role: role.to_owned(),
            uri_sans: Some(spiffe.clone()),
            ttl: Some(format!("{ttl}s")),
            format: Some("pem".into()),
            private_key_format: Some("pkcs8".into()),
            ..Default::default()
        };
        let v = self
            .conn
            .call(make)
            .await
            .map_err(|e| e.into_provider("issuing a vault certificate"))?;
        let internal = |e: VaultError| e.into_provider("reading vault's certificate answer");
        let serial = str_at(&v, "/data/serial_number")
            .map_err(internal)?
            .to_owned();
        let not_after = u64_at(&v, "/data/expiration").map_err(internal)?;
        let expires_at = i64::try_from(not_after)
            .ok()
            .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok())
            .ok_or_else(|| {
                ProviderError::Internal("vault's certificate expiry is out of range".into())
            })?;
        let key = SecretString::from(
            str_at(&v, "/data/private_key")
                .map_err(internal)?
                .to_owned(),
        );
        let chain = v.pointer("/data/ca_chain").cloned().unwrap_or(Value::Null);
        tracing::info!(lease_id = %req.lease_id, serial = %serial, "issued vault certificate");
        Ok(Issued {
            credential: Credential::new()
                .public(
                    "certificate",
                    str_at(&v, "/data/certificate").map_err(internal)?,
                )
                .public(
                    "issuing_ca",
                    str_at(&v, "/data/issuing_ca").map_err(internal)?,
                )
                .public("ca_chain", chain)
                .public("serial", serial.clone())
                .public("spiffe_id", spiffe)
                .public("expires_at", rfc3339(expires_at)?)
                .secret("private_key", key),
            handle: RevokeHandle(json!({ "kind": "pki", "mount": mount, "serial": serial })),
            expires_at,
            revocability: Revocability::Revocable,
        })
    }

    pub(crate) async fn revoke_pki(
        &self,
        mount: &str,
        serial: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let make = || RevokeCertificateRequest {
            mount: mount.to_owned(),
            serial_number: serial.to_owned(),
        };
        match self.conn.call(make).await {
            Ok(_) => Ok(RevokeOutcome::Revoked),
            Err(e)
                if e.status() == Some(400)
                    && (e.mentions("not found") || e.mentions("expired")) =>
            {
                Ok(RevokeOutcome::AlreadyGone)
            }
            Err(e) => Err(e.into_provider("revoking a vault certificate")),
        }
    }
}
