//! Request authentication: agents' session tokens and operators' bearer tokens.

use crate::broker::SessionRefusal;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::audit::Actor;
use crate::broker::Session;
use crate::config::Role;

/// `Authorization: Bearer <token>` or `Authorization: DPoP <token>`.
fn authorization(parts: &Parts) -> Option<(&str, &str)> {
    let v = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("dpop"))
        .then(|| (scheme, token.trim()))
}

fn bearer(parts: &Parts) -> Option<&str> {
    authorization(parts)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t)
}

/// A session token checked for its task, its agent and, when DPoP-bound,
/// the proof of possession that must come with it.
async fn agent_session(parts: &Parts, state: &AppState) -> Result<Session, ApiError> {
    let (scheme, token) = authorization(parts).ok_or_else(|| {
        ApiError::invalid_token("a session token is required (Authorization: Bearer)")
    })?;
    let dpop_scheme = scheme.eq_ignore_ascii_case("dpop");
    // A refused token is a 401 (with the DPoP challenge when bound); a
    // store that cannot be asked is a 503, so the agent keeps its token and
    // retries instead of starting over.
    let refused = |e: SessionRefusal, bound: bool| match e {
        SessionRefusal::Invalid(m) if bound => ApiError::invalid_token(m).with_dpop_challenge(),
        SessionRefusal::Invalid(m) => ApiError::invalid_token(m),
        SessionRefusal::Unavailable(m) => {
            let mut e = ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                m,
            );
            e.retry_after = Some(1);
            e
        }
    };
    let s = state
        .session(token)
        .await
        .map_err(|e| refused(e, dpop_scheme))?;
    let bound = dpop_scheme || s.jkt.is_some();
    let proof = parts.headers.get("dpop").and_then(|v| v.to_str().ok());
    let cert = client_cert(parts);
    let presented = crate::broker::Presented {
        scheme,
        token,
        proof,
        cert: cert.as_deref().map(Vec::as_slice),
        method: parts.method.as_str(),
        path: parts.uri.path(),
    };
    state
        .check_sender(&s, &presented)
        .await
        .map_err(|e| refused(e, bound))?;
    Ok(s)
}

/// The connection's client certificate, if it came over mTLS with one.
pub struct PeerCert(pub Option<std::sync::Arc<Vec<u8>>>);

impl<S: Send + Sync> FromRequestParts<S> for PeerCert {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_cert(parts)))
    }
}

/// The connection's source address.
pub struct PeerAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<super::ClientConn>>()
                .map(|c| c.0.addr.ip()),
        ))
    }
}

/// The client certificate of the connection (mTLS listener only).
pub fn client_cert(parts: &Parts) -> Option<std::sync::Arc<Vec<u8>>> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<super::ClientConn>>()
        .and_then(|c| c.0.cert.clone())
}

/// An agent's verified session.
pub struct AgentSession(pub Session);

impl FromRequestParts<AppState> for AgentSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let source = PeerAddr::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|p| p.0);
        agent_session(parts, state).await.map(|mut s| {
            s.source = source;
            AgentSession(s)
        })
    }
}

/// A human operator, authenticated by a token whose SHA-256 is in config.
pub struct Operator {
    pub name: String,
    pub roles: Vec<Role>,
}

impl Operator {
    /// Refuses with 403 unless the operator holds one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| roles.contains(r)) {
            Ok(())
        } else {
            let names: Vec<String> = roles
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect();
            Err(ApiError::forbidden(format!(
                "operator `{}` lacks the role for this call (needs one of: {})",
                self.name,
                names.join(", ")
            )))
        }
    }

    pub fn actor(&self) -> Actor {
        Actor::Operator(self.name.clone())
    }
}

/// Compares two equal-length byte strings without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The operator whose token this is.
pub fn find_operator(state: &AppState, token: &str) -> Option<Operator> {
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    state
        .config
        .operators
        .iter()
        .find(|o| {
            constant_time_eq(
                o.token_sha256.to_ascii_lowercase().as_bytes(),
                digest.as_bytes(),
            )
        })
        .map(|o| Operator {
            name: o.name.clone(),
            roles: o.roles.clone(),
        })
}

/// An operator or an agent, for endpoints both may call.
pub enum Caller {
    Operator(Operator),
    Agent(Box<Session>),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if authorization(parts).is_none() {
            return Err(ApiError::unauthorized(
                "an operator or session token is required (Authorization: Bearer)",
            ));
        }
        if bearer(parts)
            .and_then(|t| find_operator(state, t))
            .is_some()
        {
            // The operator path, departures included.
            return Operator::from_request_parts(parts, state)
                .await
                .map(Self::Operator);
        }
        agent_session(parts, state)
            .await
            .map(|s| Self::Agent(Box::new(s)))
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = bearer(parts) else {
            return Err(ApiError::unauthorized(
                "an operator token is required (Authorization: Bearer)",
            ));
        };
        match find_operator(state, token) {
            Some(o) => match state.operator_departure(&o.name).await? {
                None => Ok(o),
                Some(d) => {
                    let why = format!(
                        "operator `{}` departed on {}; its token no longer works",
                        o.name,
                        d.departed_at.date()
                    );
                    state
                        .record_operator_auth_failure(source_of(parts), Some(&o.name), &why)
                        .await;
                    Err(ApiError::unauthorized(why))
                }
            },
            None => {
                // Failures are limited per address and audited in bursts:
                // a flood of bad tokens neither guesses on unchecked nor
                // fills the audit log.
                let source = source_of(parts);
                if let Some(ip) = source
                    && let Err(l) = state.limits.check_address("operator", ip)
                {
                    state.metrics.limited(l.limit);
                    let secs = l.retry_after_secs();
                    return Err(ApiError::rate_limited(
                        format!(
                            "too many failed operator authentications from this address; retry in {secs} s"
                        ),
                        secs,
                    ));
                }
                // The route, not the path: a flood over made-up paths is
                // one burst per route, not one audit row per request.
                let route = parts
                    .extensions
                    .get::<axum::extract::MatchedPath>()
                    .map_or("(no route)", |p| p.as_str());
                let why = format!("unknown operator token on {route}");
                state.record_operator_auth_failure(source, None, &why).await;
                Err(ApiError::unauthorized("the operator token is not valid"))
            }
        }
    }
}

/// The address a request came from, when the listener recorded it.
fn source_of(parts: &Parts) -> Option<std::net::IpAddr> {
    source_in(&parts.extensions)
}

/// [`source_of`] from a request's extensions (a handler that also reads
/// its body takes those).
pub(crate) fn source_in(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<super::ClientConn>>()
        .map(|c| c.0.addr.ip())
}
