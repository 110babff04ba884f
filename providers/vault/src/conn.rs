//! Keygate's own session with Vault: the HTTP client, the current Vault
//! token, logging in (AppRole or a token from a file/env), renewing the token
//! in the background at about two thirds of its TTL, and logging in again
//! when renewal fails or a call finds the token expired or revoked.

use std::fmt;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use rustify::endpoint::Endpoint;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use vaultrs::api::auth::approle::requests::LoginWithApproleRequest;
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};

use crate::config::{Login, VaultConfig};
use crate::http::{Raw, VaultError, body_json, classify, str_at, u64_at};

/// The token Keygate currently uses, and when it must be renewed.
struct TokenState {
    token: SecretString,
    obtained: Instant,
    /// `None` for a token that never expires (e.g. a root token).
    ttl: Option<Duration>,
    renewable: bool,
}

/// A connection to one Vault server, shared by every call of the provider.
pub(crate) struct Conn {
    client: VaultClient,
    login: Login,
    /// Reads `aws-sm:` (and `env:`/`file:`) references at each login.
    secrets: keygate_provider_api::SecretResolver,
    state: RwLock<Option<TokenState>>,
    relogin: tokio::sync::Mutex<()>,
    /// Whether a login Keygate replaces may be revoked: only when agents'
    /// tokens are not its children (a token role makes them orphans).
    revoke_replaced: bool,
    /// When the current token was last confirmed valid (`lookup-self`), so a
    /// burst of 403s (a walk over stale accessors) checks it once.
    verified: std::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("address", &self.client.settings.address.as_str())
            .field("login", &self.login)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Builds the client. Does not contact Vault: Keygate must start (and
    /// resume its revocation queue) while Vault is down.
    pub(crate) fn new(
        cfg: &VaultConfig,
        secrets: keygate_provider_api::SecretResolver,
    ) -> Result<Arc<Self>, keygate_provider_api::ProviderError> {
        let address = cfg.checked_address()?;
        let login = cfg.login()?;
        let invalid = |m: String| keygate_provider_api::ProviderError::InvalidParams(m);
        url::Url::parse(&address).map_err(|e| invalid(format!("address `{address}`: {e}")))?;
        let mut b = VaultClientSettingsBuilder::default();
        // Everything explicit: vaultrs would otherwise read VAULT_* variables.
        b.address(&address)
            .token("")
            .verify(true)
            .timeout(Some(cfg.timeout()))
            .ca_certs(
                cfg.ca_cert_file
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            )
            .namespace(cfg.namespace.clone());
        let settings = b
            .build()
            .map_err(|e| invalid(format!("vault client settings: {e}")))?;
        let client = VaultClient::new(settings)
            .map_err(|e| invalid(format!("cannot build the vault client: {e}")))?;
        Ok(Arc::new(Self {
            client,
            login,
            secrets,
            state: RwLock::new(None),
            relogin: tokio::sync::Mutex::new(()),
            revoke_replaced: cfg.token_role.is_some(),
            verified: std::sync::Mutex::new(None),
        }))
    }

    /// Calls Vault with Keygate's token. A 403 is either Keygate's token
    /// gone (expired, revoked behind our back) or a real refusal (a path
    /// its policy does not allow, a stale accessor): only when `lookup-self`
    /// says the token is gone does Keygate log in again and retry once.
    pub(crate) async fn call<E: Endpoint>(
        &self,
        make: impl Fn() -> E,
    ) -> Result<Value, VaultError> {
        let token = self.token().await?;
        match self.exec(make(), Some(&token)).await {
            Err(e) if e.status() == Some(403) => {
                if self.still_valid(&token).await? {
                    return Err(e);
                }
                tracing::info!(error = %e, "keygate's vault token is gone; logging in again");
                let token = self.relogin(Some(&token)).await?;
                self.exec(make(), Some(&token)).await
            }
            other => other,
        }
    }

    /// Whether `token` still works (`lookup-self`), remembered for a second.
    async fn still_valid(&self, token: &SecretString) -> Result<bool, VaultError> {
        let recent = |v: &std::sync::Mutex<Option<Instant>>| {
            v.lock()
                .map(|g| g.is_some_and(|at| at.elapsed() < Duration::from_secs(1)))
                .unwrap_or(false)
        };
        let current = self
            .current()
            .is_some_and(|c| c.expose_secret() == token.expose_secret());
        if current && recent(&self.verified) {
            return Ok(true);
        }
        match self
            .exec(Raw::get("auth/token/lookup-self"), Some(token))
            .await
        {
            Ok(_) => {
                if current && let Ok(mut g) = self.verified.lock() {
                    *g = Some(Instant::now());
                }
                Ok(true)
            }
            Err(e) if e.status() == Some(403) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The current token's own `lookup-self` data (logging in if needed).
    pub(crate) async fn lookup_self(&self) -> Result<Value, VaultError> {
        self.call(|| Raw::get("auth/token/lookup-self")).await
    }

    /// Revokes Keygate's current login (graceful shutdown), when agents'
    /// tokens do not depend on it.
    pub(crate) async fn revoke_own(&self) {
        if !self.revoke_replaced || matches!(self.login, Login::Token(_)) {
            return;
        }
        let token = self
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|s| s.token);
        if let Some(t) = token {
            match self
                .exec(Raw::post("auth/token/revoke-self", json!({})), Some(&t))
                .await
            {
                Ok(_) => tracing::info!("revoked keygate's vault login"),
                Err(e) => tracing::warn!(error = %e, "could not revoke keygate's vault login"),
            }
        }
    }

    /// Whether this connection's logins are Keygate's own to clean up
    /// (AppRole, with agents' tokens independent of them).
    pub(crate) fn owns_logins(&self) -> bool {
        self.revoke_replaced && matches!(self.login, Login::AppRole { .. })
    }

    /// Sends one request with `token` (or none, for a login).
    async fn exec<E: Endpoint>(
        &self,
        ep: E,
        token: Option<&SecretString>,
    ) -> Result<Value, VaultError> {
        let mut mw = self.client.middle().clone();
        mw.token = token
            .map(|t| t.expose_secret().to_owned())
            .unwrap_or_default();
        let res = ep.with_middleware(&mw).exec(self.client.http()).await;
        match res {
            Ok(r) => body_json(r.response.body()),
            Err(e) => Err(classify(e)),
        }
    }

    /// The current token, logging in first if there is none.
    async fn token(&self) -> Result<SecretString, VaultError> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        self.relogin(None).await
    }

    fn current(&self) -> Option<SecretString> {
        let g = self.state.read().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|s| s.token.clone())
    }

    /// Logs in again unless another caller already replaced `stale`.
    async fn relogin(&self, stale: Option<&SecretString>) -> Result<SecretString, VaultError> {
        let _one = self.relogin.lock().await;
        if let Some(cur) = self.current() {
            let replaced = stale.is_none_or(|s| s.expose_secret() != cur.expose_secret());
            if replaced {
                return Ok(cur);
            }
        }
        let state = self.login().await?;
        let token = state.token.clone();
        tracing::info!(
            ttl_secs = state.ttl.map(|t| t.as_secs()),
            renewable = state.renewable,
            "logged in to vault"
        );
        let replaced = self
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(state)
            .map(|s| s.token);
        // The login replaced is revoked, so Keygate's own tokens do not pile
        // up (only when agents' tokens are not its children).
        if let Some(old) = replaced
            && self.owns_logins()
            && old.expose_secret() != token.expose_secret()
            && let Err(e) = self
                .exec(Raw::post("auth/token/revoke-self", json!({})), Some(&old))
                .await
            && e.status() != Some(403)
        {
            tracing::warn!(error = %e, "could not revoke the vault login keygate replaced");
        }
        Ok(token)
    }

    async fn login(&self) -> Result<TokenState, VaultError> {
        let local = |e: keygate_provider_api::ProviderError| VaultError::Other(e.to_string());
        match &self.login {
            Login::AppRole {
                mount,
                role_id,
                secret_id,
            } => {
                let secret_id = secret_id.read(&self.secrets).await.map_err(local)?;
                let ep = LoginWithApproleRequest {
                    mount: mount.clone(),
                    role_id: role_id.clone(),
                    secret_id: secret_id.expose_secret().to_owned(),
                };
                let v = self
                    .exec(ep, None)
                    .await
                    .map_err(|e| login_failed("approle", e))?;
                Ok(TokenState {
                    token: SecretString::from(str_at(&v, "/auth/client_token")?.to_owned()),
                    obtained: Instant::now(),
                    ttl: ttl_of(u64_at(&v, "/auth/lease_duration")?),
                    renewable: v.pointer("/auth/renewable").and_then(Value::as_bool) == Some(true),
                })
            }
            Login::Token(source) => {
                let token = source.read(&self.secrets).await.map_err(local)?;
                let v = self
                    .exec(Raw::get("auth/token/lookup-self"), Some(&token))
                    .await
                    .map_err(|e| login_failed("token", e))?;
                Ok(TokenState {
                    token,
                    obtained: Instant::now(),
                    ttl: ttl_of(u64_at(&v, "/data/ttl")?),
                    renewable: v.pointer("/data/renewable").and_then(Value::as_bool) == Some(true),
                })
            }
        }
    }

    /// When the current token should be renewed, and whether it can be.
    fn renewal_due(&self) -> Option<(Instant, bool, Duration)> {
        let g = self.state.read().unwrap_or_else(|p| p.into_inner());
        let s = g.as_ref()?;
        let ttl = s.ttl?;
        Some((s.obtained + ttl * 2 / 3, s.renewable, ttl))
    }

    /// Renews the current token (`renew-self`); logs in again when renewal
    /// fails for any reason but an outage, or when Vault grants much less
    /// than asked (the token nears its max TTL).
    async fn renew_or_relogin(&self) -> Result<(), VaultError> {
        let Some((_, renewable, ttl)) = self.renewal_due() else {
            return Ok(());
        };
        let token = self.token().await?;
        if renewable {
            let ep = Raw::post(
                "auth/token/renew-self",
                json!({ "increment": ttl.as_secs() }),
            );
            match self.exec(ep, Some(&token)).await {
                Ok(v) => {
                    let granted = ttl_of(u64_at(&v, "/auth/lease_duration")?);
                    if granted.is_some_and(|g| g >= ttl / 2) {
                        let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
                        if let Some(s) = g.as_mut() {
                            s.obtained = Instant::now();
                            s.ttl = granted;
                        }
                        tracing::debug!("renewed keygate's vault token");
                        return Ok(());
                    }
                }
                Err(e @ (VaultError::Unavailable(_) | VaultError::NotSent(_))) => return Err(e),
                Err(e) => tracing::info!(error = %e, "cannot renew keygate's vault token"),
            }
        }
        self.relogin(Some(&token)).await.map(|_| ())
    }
}

fn ttl_of(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn login_failed(method: &str, e: VaultError) -> VaultError {
    match e {
        VaultError::Api { status, errors } => VaultError::Api {
            status,
            errors: format!("keygate's {method} login was refused ({errors})"),
        },
        other => other,
    }
}

/// Keeps Keygate's Vault token alive until the provider is dropped.
pub(crate) fn spawn_renewer(conn: &Arc<Conn>) {
    let weak: Weak<Conn> = Arc::downgrade(conn);
    tokio::spawn(async move {
        let mut retry = Duration::from_secs(1);
        loop {
            let wait = match weak.upgrade() {
                None => return,
                Some(c) => match c.renewal_due() {
                    // Not logged in yet (or a token that never expires): look
                    // again later; the first call logs in.
                    None => Duration::from_secs(5),
                    Some((due, ..)) => due.saturating_duration_since(Instant::now()),
                },
            };
            tokio::time::sleep(wait).await;
            let Some(c) = weak.upgrade() else { return };
            if c.renewal_due().is_none_or(|(due, ..)| due > Instant::now()) {
                continue;
            }
            match c.renew_or_relogin().await {
                Ok(()) => retry = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew keygate's vault token; will retry");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}
