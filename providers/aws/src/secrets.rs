//! `secret` scopes: brokered Secrets Manager reads, optionally rotated when
//! the lease ends so the value the agent saw is no longer current. Also the
//! `aws-sm:` source for Keygate's own secret references.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use keygate_provider_api::{
    Credential, IssueRequest, Issued, ProviderError, Revocability, RevokeHandle, RevokeOutcome,
    RevokeRequest, SecretSource,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use crate::scope::{Rotation, Secret};
use crate::{AwsConfig, AwsProvider, error};

/// The stage every reader gets by default.
const CURRENT: &str = "AWSCURRENT";

/// A secret value read from Secrets Manager, and how it is encoded.
struct Read {
    value: SecretString,
    encoding: &'static str,
    version_id: String,
    arn: String,
}

async fn get_value(
    client: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
    stage: Option<&str>,
) -> Result<Read, ProviderError> {
    let out = client
        .get_secret_value()
        .secret_id(secret_id)
        .set_version_stage(stage.map(str::to_owned))
        .send()
        .await
        .map_err(|e| error::from_sdk("secretsmanager:GetSecretValue", e))?;
    let (value, encoding) = match (out.secret_string(), out.secret_binary()) {
        (Some(s), _) => (SecretString::from(s.to_owned()), "text"),
        (None, Some(b)) => (SecretString::from(STANDARD.encode(b.as_ref())), "base64"),
        (None, None) => {
            return Err(ProviderError::Refused(format!(
                "secret `{secret_id}` has no value in that version"
            )));
        }
    };
    Ok(Read {
        value,
        encoding,
        version_id: out.version_id().unwrap_or_default().to_owned(),
        arn: out.arn().unwrap_or(secret_id).to_owned(),
    })
}

/// The client request token (and so the version id) of the rotation that
/// ends a lease: the lease id itself when AWS accepts it (32-64 characters
/// of letters, digits, `-` and `_`, as Keygate's lease ids are), else the
/// SHA-256 of it in hex — the same every time, so a retry or an orphan's
/// revocation finds the version an earlier attempt made.
pub(crate) fn request_token(lease_id: &str) -> String {
    let fits = (32..=64).contains(&lease_id.len())
        && lease_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        lease_id.to_owned()
    } else {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(lease_id.as_bytes()))
    }
}

impl AwsProvider {
    /// GetSecretValue for the lease. The value goes to the agent only.
    pub(crate) async fn read_secret(
        &self,
        req: &IssueRequest,
        p: &Secret,
    ) -> Result<Issued, ProviderError> {
        if req.expires_at <= time::OffsetDateTime::now_utc() {
            return Err(ProviderError::InvalidParams(format!(
                "lease `{}` has already expired: nothing is read for it",
                req.lease_id
            )));
        }
        let read = get_value(&self.secrets, &p.secret_id, p.version_stage.as_deref()).await?;
        let rotation = p.rotation();
        let credential = Credential::new()
            .secret("value", read.value)
            .public("encoding", read.encoding)
            .public("version_id", read.version_id.clone())
            .public("secret_arn", read.arn.clone());
        let handle = json!({
            "kind": "secret",
            "secret_id": read.arn,
            "version_id": read.version_id,
            "rotation": rotation.as_str(),
        });
        tracing::info!(lease_id = %req.lease_id, secret = %read.arn, version = %read.version_id, "read secret");
        Ok(Issued {
            credential,
            handle: RevokeHandle(handle),
            expires_at: req.expires_at,
            revocability: match rotation {
                Rotation::None => Revocability::NotApplicable,
                Rotation::PutValue | Rotation::RotateSecret => Revocability::Revocable,
            },
        })
    }

    /// Ends a secret lease: rotates the secret when the scope says so, so the
    /// value the agent saw is no longer current. Without rotation there is
    /// nothing to revoke.
    pub(crate) async fn end_secret_lease(
        &self,
        req: &RevokeRequest,
        scope: Option<&Secret>,
    ) -> Result<RevokeOutcome, ProviderError> {
        let handle = req.handle.as_ref().map(|h| &h.0);
        let field = |k: &str| handle.and_then(|h| h.get(k)).and_then(Value::as_str);
        // The handle says how it was issued; a lease whose issue never
        // completed falls back to the scope as configured now.
        let rotation = field("rotation")
            .and_then(Rotation::parse)
            .or_else(|| scope.map(Secret::rotation))
            .unwrap_or(Rotation::None);
        if rotation == Rotation::None {
            return Ok(RevokeOutcome::AlreadyGone);
        }
        let secret_id = field("secret_id")
            .or(scope.map(|s| s.secret_id.as_str()))
            .ok_or_else(|| {
                ProviderError::InvalidParams(format!(
                    "lease `{}`: no secret to rotate (no handle and no scope)",
                    req.lease_id
                ))
            })?;
        let _permit = self.revocation_permit().await?;
        let current = self.current_version(secret_id).await?;
        // The lease's request token names the version the rotation creates,
        // so retries are idempotent and an orphan's rotation is recognised.
        let token = request_token(&req.lease_id);
        if current.as_deref() == Some(token.as_str()) {
            return Ok(RevokeOutcome::Revoked);
        }
        if let Some(seen) = field("version_id")
            && current.as_deref() != Some(seen)
        {
            tracing::info!(lease_id = %req.lease_id, secret = %secret_id, "already rotated since the agent read it");
            return Ok(RevokeOutcome::AlreadyGone);
        }
        match rotation {
            Rotation::PutValue => self.put_fresh_value(secret_id, &token).await,
            _ => self.start_rotation(secret_id, &token).await,
        }
    }

    /// The version id holding `AWSCURRENT`.
    async fn current_version(&self, secret_id: &str) -> Result<Option<String>, ProviderError> {
        let out = self
            .secrets
            .describe_secret()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| error::from_sdk("secretsmanager:DescribeSecret", e))?;
        Ok(out.version_ids_to_stages().and_then(|m| {
            m.iter()
                .find(|(_, stages)| stages.iter().any(|s| s == CURRENT))
                .map(|(v, _)| v.clone())
        }))
    }

    /// PutSecretValue with 256 fresh random bits: the new value becomes
    /// `AWSCURRENT` at once.
    async fn put_fresh_value(
        &self,
        secret_id: &str,
        token: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| ProviderError::Internal(format!("no randomness for a new value: {e}")))?;
        let value = SecretString::from(URL_SAFE_NO_PAD.encode(bytes));
        bytes.fill(0);
        let sent = self
            .secrets
            .put_secret_value()
            .secret_id(secret_id)
            .client_request_token(token)
            .secret_string(value.expose_secret())
            .send()
            .await;
        match sent {
            Ok(_) => {}
            // A version with this token exists: an earlier attempt wrote it.
            Err(e) if error::code(&e) == Some("ResourceExistsException") => {}
            Err(e) => return Err(error::from_sdk("secretsmanager:PutSecretValue", e)),
        }
        tracing::info!(version = token, secret = %secret_id, "rotated secret to a fresh value");
        Ok(RevokeOutcome::Revoked)
    }

    /// RotateSecret through the secret's rotation function. The rotation
    /// finishes asynchronously, so this reports an error that keeps the lease
    /// queued; a later attempt confirms once the new version is current.
    async fn start_rotation(
        &self,
        secret_id: &str,
        token: &str,
    ) -> Result<RevokeOutcome, ProviderError> {
        let sent = self
            .secrets
            .rotate_secret()
            .secret_id(secret_id)
            .client_request_token(token)
            .rotate_immediately(true)
            .send()
            .await;
        match sent {
            Ok(_) => {}
            // AWS refuses a second rotation while one is in progress.
            Err(e) if error::code(&e) == Some("InvalidRequestException") => {
                tracing::info!(version = token, secret = %secret_id, error = %error::from_sdk("secretsmanager:RotateSecret", e), "rotation not started");
            }
            Err(e) => return Err(error::from_sdk("secretsmanager:RotateSecret", e)),
        }
        Err(ProviderError::Unavailable(format!(
            "rotation of secret `{secret_id}` requested; waiting for its new version to become current"
        )))
    }
}

/// Reads `aws-sm:<secret-id>` references: the current value of a Secrets
/// Manager secret (binary secrets base64-encoded), read at each use.
#[derive(Debug, Clone)]
pub struct SecretsManagerSource {
    client: aws_sdk_secretsmanager::Client,
}

impl SecretsManagerSource {
    /// A source on the same settings as an `aws` provider (region, profile,
    /// endpoint, standard credential chain).
    pub async fn open(cfg: &AwsConfig) -> Result<Self, ProviderError> {
        cfg.validate()?;
        let sdk = cfg.sdk_config().await;
        Ok(Self {
            client: aws_sdk_secretsmanager::Client::new(&sdk),
        })
    }

    /// A source on an SDK client configured elsewhere.
    pub fn from_client(client: aws_sdk_secretsmanager::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl SecretSource for SecretsManagerSource {
    fn scheme(&self) -> &'static str {
        "aws-sm"
    }

    async fn read(&self, id: &str) -> Result<SecretString, ProviderError> {
        Ok(get_value(&self.client, id, None).await?.value)
    }
}
