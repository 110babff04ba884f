//! Workload identity federation: JWTs from trusted issuers (Kubernetes
//! service-account tokens, CI OIDC tokens, cloud identity tokens) as proof of
//! an agent's identity, with no long-lived client key.
//!
//! Each issuer's JWKS is fetched from config (`jwks_url`, or OIDC discovery)
//! and cached; a token with an unknown `kid` triggers one refresh, at most
//! every [`REFRESH_FLOOR`], so a flood of bogus kids cannot hammer the issuer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::AuthError;
use crate::config::TrustedIssuer;

/// How long a fetched JWKS is used before it is fetched again.
const JWKS_TTL: Duration = Duration::from_secs(3600);
/// The shortest gap between two fetches of one issuer's JWKS.
pub const REFRESH_FLOOR: Duration = Duration::from_secs(2);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 256 * 1024;
const LEEWAY_SECS: u64 = 30;

struct Cached {
    set: JwkSet,
    fetched: Instant,
}

/// A verified federated token.
#[derive(Debug, Clone)]
pub struct Federated {
    /// The trusted issuer's configured name.
    pub issuer: String,
    /// The subject the agent is bound to (`subject_claim` of the token).
    pub subject: String,
    pub exp: i64,
    pub jti: Option<String>,
    /// Whether the issuer vouches for users (ID tokens) rather than workloads.
    pub users: bool,
    /// The `groups_claim` values (users' issuers).
    pub groups: Vec<String>,
}

/// The trusted issuers and their key caches.
pub struct Federation {
    issuers: Vec<TrustedIssuer>,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn parse_alg(s: &str) -> Option<Algorithm> {
    match s {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

impl Federation {
    pub fn new(issuers: Vec<TrustedIssuer>) -> anyhow::Result<Self> {
        for i in &issuers {
            for a in &i.algorithms {
                if parse_alg(a).is_none() {
                    anyhow::bail!(
                        "federation issuer `{}`: algorithm `{a}` is not allowed (asymmetric only: RS256, RS384, RS512, PS256, ES256, ES384, EdDSA)",
                        i.name
                    );
                }
            }
        }
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        for i in &issuers {
            if let Some(ca) = &i.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    anyhow::anyhow!("federation issuer `{}`: `{}`: {e}", i.name, ca.display())
                })?;
                builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
            }
        }
        Ok(Self {
            issuers,
            http: builder.build()?,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Whether an issuer of this name is configured.
    pub fn knows(&self, name: &str) -> bool {
        self.issuers.iter().any(|i| i.name == name)
    }

    async fn fetch(&self, i: &TrustedIssuer) -> Result<JwkSet, AuthError> {
        let unavailable = |why: String| {
            AuthError::invalid(format!("issuer `{}`: keys unavailable: {why}", i.name))
        };
        let url = match &i.jwks_url {
            Some(u) => u.clone(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    i.issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = self
                    .http
                    .get(&discovery)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(|e| unavailable(e.without_url().to_string()))?
                    .json()
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                doc["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| unavailable("discovery has no jwks_uri".into()))?
                    .to_owned()
            }
        };
        let body = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(e.without_url().to_string()))?
            .bytes()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(unavailable("the JWKS is too large".into()));
        }
        serde_json::from_slice(&body).map_err(|e| unavailable(format!("not a JWKS: {e}")))
    }

    /// The issuer's key for `kid`, from cache or a (bounded) refresh.
    async fn key(
        &self,
        i: &TrustedIssuer,
        kid: Option<&str>,
    ) -> Result<jsonwebtoken::jwk::Jwk, AuthError> {
        let mut cache = self.cache.lock().await;
        let find = |set: &JwkSet| match kid {
            Some(k) => set.find(k).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let stale = cache
            .get(&i.name)
            .is_none_or(|c| c.fetched.elapsed() > JWKS_TTL);
        if !stale && let Some(k) = cache.get(&i.name).and_then(|c| find(&c.set)) {
            return Ok(k);
        }
        let may_refresh = cache
            .get(&i.name)
            .is_none_or(|c| c.fetched.elapsed() >= REFRESH_FLOOR);
        if may_refresh {
            let set = self.fetch(i).await?;
            cache.insert(
                i.name.clone(),
                Cached {
                    set,
                    fetched: Instant::now(),
                },
            );
        }
        cache
            .get(&i.name)
            .and_then(|c| find(&c.set))
            .ok_or_else(|| {
                AuthError::invalid(format!(
                    "issuer `{}` has no key `{}`",
                    i.name,
                    kid.unwrap_or("(no kid)")
                ))
            })
    }

    /// Verifies a federated token: trusted `iss`, allowed `alg`, signature by
    /// the issuer's current keys, `aud`, `exp`/`nbf`, and required claims.
    pub async fn verify(&self, token: &str) -> Result<Federated, AuthError> {
        let iss = super::unverified_issuer(token)?;
        let i = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| AuthError::invalid(format!("issuer `{iss}` is not trusted")))?;
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| super::describe_jwt_error(&e))?;
        let allowed: Vec<Algorithm> = i.algorithms.iter().filter_map(|a| parse_alg(a)).collect();
        if !allowed.contains(&header.alg) {
            return Err(AuthError::invalid(format!(
                "`alg` {:?} is not allowed for issuer `{}`",
                header.alg, i.name
            )));
        }
        let jwk = self.key(i, header.kid.as_deref()).await?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| {
            AuthError::invalid(format!("issuer `{}` published an unusable key", i.name))
        })?;
        let mut v = Validation::new(header.alg);
        v.set_audience(&[&i.audience]);
        v.set_issuer(&[&i.issuer]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| super::describe_jwt_error(&e))?
            .claims;
        for (name, want) in &i.required_claims {
            if claims[name].as_str() != Some(want.as_str()) {
                return Err(AuthError::invalid(format!(
                    "claim `{name}` must be `{want}` for issuer `{}`",
                    i.name
                )));
            }
        }
        let subject = claims[i.subject_claim.as_str()]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::invalid(format!("the token has no `{}`", i.subject_claim)))?
            .to_owned();
        let groups = claims[i.groups_claim.as_str()]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Federated {
            issuer: i.name.clone(),
            subject,
            exp: claims["exp"].as_i64().unwrap_or_default(),
            jti: claims["jti"].as_str().map(str::to_owned),
            users: i.users,
            groups,
        })
    }
}
