//! `kind = "kv"`: a brokered read of a KV v2 secret. The values go to the
//! agent and nowhere else; there is nothing to revoke afterwards.

use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle,
};
use serde_json::{Value, json};
use vaultrs::api::kv2::requests::ReadSecretRequest;

use crate::VaultProvider;
use crate::lifetime::{remaining_secs, rfc3339};

impl VaultProvider {
    pub(crate) async fn read_kv(
        &self,
        req: &IssueRequest,
        mount: &str,
        path: &str,
        version: Option<u64>,
    ) -> Result<Issued, ProviderError> {
        remaining_secs(req)?;
        let make = || ReadSecretRequest {
            mount: mount.to_owned(),
            path: path.to_owned(),
            version,
        };
        let v = self
            .conn
            .call(make)
            .await
            .map_err(|e| e.into_provider("reading a kv secret"))?;
        let Some(Value::Object(data)) = v.pointer("/data/data").cloned() else {
            return Err(ProviderError::Refused(format!(
                "kv secret `{mount}/{path}` has no data (deleted or destroyed version)"
            )));
        };
        let read_version = v
            .pointer("/data/metadata/version")
            .cloned()
            .unwrap_or(Value::Null);
        // The secret's fields under `data`, with their JSON types, apart
        // from Keygate's own fields (a secret key `expires_at` cannot
        // overwrite the credential's).
        let credential = Credential::new()
            .public("kv_path", format!("{mount}/{path}"))
            .public("kv_version", read_version)
            .public("expires_at", rfc3339(req.expires_at)?)
            .secret_json("data", Value::Object(data));
        tracing::info!(lease_id = %req.lease_id, path = %format!("{mount}/{path}"), "brokered a kv read");
        Ok(Issued {
            credential,
            // A read cannot be taken back: the lease records `not_applicable`.
            handle: RevokeHandle(json!({ "kind": "kv" })),
            expires_at: req.expires_at,
            revocability: Revocability::NotApplicable,
        })
    }
}
