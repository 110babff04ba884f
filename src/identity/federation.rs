//! Workload identity federation: JWTs from trusted issuers (Kubernetes
//! service-account tokens, CI OIDC tokens, cloud identity tokens) as proof of
//! an agent's identity, with no long-lived client key.
//!
//! Each issuer's JWKS is fetched from config (`jwks_url`, or OIDC discovery)
//! and cached; a token with an unknown `kid` triggers one refresh, at most
//! every [`REFRESH_FLOOR`], so a flood of bogus kids cannot hammer the issuer.
//! Each issuer refreshes on its own (single flight: one fetch at a time, the
//! others wait for its result, never for another issuer's), a failed fetch is
//! remembered for the same floor (negative cache), keys past their TTL are
//! served while one request refreshes them, and a JWKS body is cut off while
//! it streams in once it passes [`MAX_JWKS_BYTES`].

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

/// What is known of one issuer's keys.
#[derive(Default)]
struct KeyState {
    set: Option<JwkSet>,
    /// When `set` was fetched.
    fetched: Option<Instant>,
    /// When a fetch last finished, and its error if it failed.
    attempted: Option<Instant>,
    failure: Option<String>,
}

/// One issuer's cache: state behind a short lock, refreshes one at a time.
#[derive(Default)]
struct IssuerKeys {
    state: std::sync::Mutex<KeyState>,
    refresh: tokio::sync::Mutex<()>,
}

impl IssuerKeys {
    /// The state, briefly; never held across an await.
    fn lock(&self, issuer: &str) -> Result<std::sync::MutexGuard<'_, KeyState>, AuthError> {
        self.state
            .lock()
            .map_err(|_| AuthError::Unavailable(format!("issuer `{issuer}`: key cache poisoned")))
    }
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
    /// The party the token was issued to (`azp`), if it says.
    pub azp: Option<String>,
    /// The audience the issuer is configured with (the token carries it).
    pub audience: String,
    /// The `nonce` of an ID token (OIDC sign-in binds it to the browser).
    pub nonce: Option<String>,
}

fn no_such_key(i: &TrustedIssuer, kid: Option<&str>) -> AuthError {
    AuthError::invalid(format!(
        "issuer `{}` has no key `{}`",
        i.name,
        kid.unwrap_or("(no kid)")
    ))
}

/// The trusted issuers and their key caches.
pub struct Federation {
    issuers: Vec<TrustedIssuer>,
    /// One client per issuer, trusting the system roots and that issuer's
    /// own `ca_file` only: one issuer's private CA must not vouch for
    /// another issuer's keys or its token endpoint.
    http: HashMap<String, reqwest::Client>,
    cache: HashMap<String, IssuerKeys>,
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
        let builder = || {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
        };
        // Issuers without a `ca_file` share one client (connections too).
        let shared = builder().build()?;
        let mut http = HashMap::new();
        for i in &issuers {
            let client = match &i.ca_file {
                Some(ca) => {
                    let in_file = |e: &dyn std::fmt::Display| {
                        anyhow::anyhow!("federation issuer `{}`: `{}`: {e}", i.name, ca.display())
                    };
                    let pem = std::fs::read(ca).map_err(|e| in_file(&e))?;
                    let roots =
                        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| in_file(&e))?;
                    if roots.is_empty() {
                        return Err(in_file(&"no PEM certificate in it"));
                    }
                    roots
                        .into_iter()
                        .fold(builder(), reqwest::ClientBuilder::add_root_certificate)
                        .build()?
                }
                None => shared.clone(),
            };
            http.insert(i.name.clone(), client);
        }
        let cache = issuers
            .iter()
            .map(|i| (i.name.clone(), IssuerKeys::default()))
            .collect();
        Ok(Self {
            issuers,
            http,
            cache,
        })
    }

    /// Whether a token with this `iss` comes from a trusted issuer.
    /// A trusted issuer, by its configured name.
    pub fn issuer(&self, name: &str) -> Option<&TrustedIssuer> {
        self.issuers.iter().find(|i| i.name == name)
    }

    /// The client that talks to issuer `i` (its own extra roots only).
    pub fn http(&self, i: &TrustedIssuer) -> Result<&reqwest::Client, AuthError> {
        self.http
            .get(&i.name)
            .ok_or_else(|| AuthError::Unavailable(format!("issuer `{}` is not configured", i.name)))
    }

    pub fn trusts_issuer_url(&self, iss: &str) -> bool {
        self.issuers.iter().any(|i| i.issuer == iss)
    }

    /// Whether an issuer of this name is configured.
    pub fn knows(&self, name: &str) -> bool {
        self.issuers.iter().any(|i| i.name == name)
    }

    async fn fetch(&self, i: &TrustedIssuer) -> Result<JwkSet, AuthError> {
        let unavailable = |why: String| {
            AuthError::Unavailable(format!("issuer `{}`: keys unavailable: {why}", i.name))
        };
        let url = match &i.jwks_url {
            Some(u) => u.clone(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    i.issuer.trim_end_matches('/')
                );
                let doc: serde_json::Value = self
                    .http(i)?
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
        let mut resp = self
            .http(i)?
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(e.without_url().to_string()))?;
        let too_large = || unavailable(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(too_large());
        }
        // Read chunk by chunk and stop at the cap: a huge or endless body
        // never sits in memory.
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| unavailable(e.without_url().to_string()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| unavailable(format!("not a JWKS: {e}")))
    }

    /// The issuer's key for `kid`, from cache or a (bounded) refresh.
    async fn key(
        &self,
        i: &TrustedIssuer,
        kid: Option<&str>,
    ) -> Result<jsonwebtoken::jwk::Jwk, AuthError> {
        let find = |set: &JwkSet| match kid {
            Some(k) => set.find(k).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let Some(keys) = self.cache.get(&i.name) else {
            return Err(AuthError::invalid(format!(
                "issuer `{}` is not configured",
                i.name
            )));
        };
        // 1. A known key: fresh, or stale while someone else refreshes.
        let (known, fresh) = {
            let st = keys.lock(&i.name)?;
            let known = st.set.as_ref().and_then(find);
            let fresh = st.fetched.is_some_and(|f| f.elapsed() <= JWKS_TTL);
            (known, fresh)
        };
        if let Some(k) = &known
            && fresh
        {
            return Ok(k.clone());
        }
        let refresh = match (&known, keys.refresh.try_lock()) {
            (Some(k), Err(_)) => return Ok(k.clone()),
            (_, Ok(g)) => g,
            // Unknown key and a refresh under way: wait for its result.
            (None, Err(_)) => keys.refresh.lock().await,
        };
        // 2. Under the issuer's refresh lock: maybe someone just fetched.
        {
            let st = keys.lock(&i.name)?;
            let recent = st.attempted.is_some_and(|a| a.elapsed() < REFRESH_FLOOR);
            if recent {
                if let Some(k) = st.set.as_ref().and_then(find) {
                    return Ok(k);
                }
                // Negative cache: the issuer failed a moment ago.
                if let Some(why) = &st.failure {
                    return Err(AuthError::Unavailable(why.clone()));
                }
                return Err(no_such_key(i, kid));
            }
        }
        // 3. Fetch, holding only this issuer's refresh lock.
        let fetched = self.fetch(i).await;
        let mut st = keys.lock(&i.name)?;
        st.attempted = Some(Instant::now());
        match fetched {
            Ok(set) => {
                st.set = Some(set);
                st.fetched = st.attempted;
                st.failure = None;
            }
            Err(e) => {
                st.failure = Some(e.to_string());
                // A key we hold stays usable while the issuer is down.
                if let Some(k) = known {
                    tracing::warn!(issuer = %i.name, error = %e, "JWKS refresh failed; serving the cached keys");
                    return Ok(k);
                }
                return Err(e);
            }
        }
        drop(refresh);
        st.set
            .as_ref()
            .and_then(find)
            .ok_or_else(|| no_such_key(i, kid))
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
            azp: claims["azp"].as_str().map(str::to_owned),
            audience: i.audience.clone(),
            nonce: claims["nonce"].as_str().map(str::to_owned),
        })
    }
}
