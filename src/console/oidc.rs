//! Signing in through an OIDC issuer: the authorization code flow with
//! PKCE (RFC 7636, `S256`), `state` against login CSRF and `nonce` against
//! a replayed ID token, all three kept in a short-lived `HttpOnly` cookie
//! of this browser. The ID token is verified like any federated token (the
//! issuer's keys, `iss`, `aud` = the console's client id, expiry), then
//! mapped to the `[[operators]]` entry whose `oidc_subject` it names.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::page::{cookie, error_page};
use super::session::{LoginQuery, begin, no_randomness, random_hex, safe_next, secure};
use crate::audit::{Actor, AuditEvent};
use crate::config::TrustedIssuer;
use crate::server::AppState;

/// The flow's cookie: `state.nonce.verifier.next`. `SameSite=Lax`: the
/// issuer sends the browser back with a top-level cross-site navigation.
const FLOW_COOKIE: &str = "keygate_console_oidc";
/// How long a sign-in at the issuer may take.
const FLOW_MINUTES: i64 = 10;

fn refused(message: &str) -> Response {
    error_page(
        None,
        StatusCode::UNAUTHORIZED,
        &format!("{message} Go back to the sign-in page and try again."),
    )
}

fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "console OIDC sign-in: {what}");
    error_page(
        None,
        StatusCode::BAD_GATEWAY,
        &format!("The identity provider could not be reached ({what}): try again shortly."),
    )
}

/// The configured issuer (its federation entry).
fn issuer(b: &AppState) -> Option<&TrustedIssuer> {
    b.config
        .console
        .oidc_issuer
        .as_deref()
        .and_then(|n| b.federation.issuer(n))
}

/// The issuer's authorization and token endpoints, from discovery.
async fn endpoints(b: &AppState, i: &TrustedIssuer) -> Result<(String, String), Box<Response>> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        i.issuer.trim_end_matches('/')
    );
    let doc: serde_json::Value = b
        .federation
        .http(i)
        .map_err(|e| Box::new(unavailable("discovery", &e)))?
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| Box::new(unavailable("discovery", &e.without_url())))?
        .json()
        .await
        .map_err(|e| Box::new(unavailable("discovery", &e)))?;
    let field = |name: &str| {
        doc[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Box::new(unavailable("discovery", &format!("no `{name}`"))))
    };
    Ok((field("authorization_endpoint")?, field("token_endpoint")?))
}

/// The flow's cookie, for the callback's path only.
fn flow_cookie(b: &AppState, value: String, max_age: time::Duration) -> String {
    cookie::Cookie::build((FLOW_COOKIE, value))
        .path("/ui/login/oidc")
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .secure(secure(b))
        .max_age(max_age)
        .build()
        .to_string()
}

fn redirect_uri(b: &AppState) -> String {
    format!("{}/ui/login/oidc/callback", b.config.public_url())
}

fn challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// `GET /ui/login/oidc?next=`: off to the issuer.
pub async fn start(State(b): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    let Some(i) = issuer(&b) else {
        return error_page(
            None,
            StatusCode::NOT_FOUND,
            "Sign-in through an identity provider is not configured (`[console] oidc_issuer`).",
        );
    };
    let (authorize, _) = match endpoints(&b, i).await {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let (Some(state), Some(nonce), Some(verifier)) = (random_hex(), random_hex(), random_hex())
    else {
        return no_randomness();
    };
    let next = safe_next(q.next.as_deref());
    let Ok(mut url) = url::Url::parse(&authorize) else {
        return unavailable("discovery", &"an unusable authorization_endpoint");
    };
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &i.audience)
        .append_pair("redirect_uri", &redirect_uri(&b))
        .append_pair("scope", "openid email profile")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge(&verifier))
        .append_pair("code_challenge_method", "S256");
    let flow = format!(
        "{state}.{nonce}.{verifier}.{}",
        super::agents::urlencode(next)
    );
    let c = flow_cookie(&b, flow, time::Duration::minutes(FLOW_MINUTES));
    let mut resp = Redirect::to(url.as_str()).into_response();
    if let Ok(v) = c.parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Debug, Default, Deserialize)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /ui/login/oidc/callback?code=&state=`: back from the issuer.
pub async fn callback(
    State(b): State<AppState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Query(q): Query<Callback>,
) -> Response {
    let Some(i) = issuer(&b) else {
        return error_page(
            None,
            StatusCode::NOT_FOUND,
            "Sign-in through an identity provider is not configured.",
        );
    };
    let flow = cookie(&headers, FLOW_COOKIE).unwrap_or_default();
    let mut parts = flow.splitn(4, '.');
    let (Some(state), Some(nonce), Some(verifier), Some(next)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return refused("This sign-in did not start here, or took too long.");
    };
    let next = url::form_urlencoded::parse(format!("n={next}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let next = safe_next(Some(&next)).to_owned();
    let same_state = q.state.as_deref().is_some_and(|s| {
        s.len() == state.len()
            && s.bytes()
                .zip(state.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if !same_state {
        return refused("This sign-in's state does not match the one this browser started.");
    }
    if let Some(e) = &q.error {
        return refused(&format!(
            "The identity provider refused: {e}{}.",
            q.error_description
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ));
    }
    let Some(code) = q.code.as_deref().filter(|c| !c.is_empty()) else {
        return refused("The identity provider sent no code.");
    };
    let (_, token_endpoint) = match endpoints(&b, i).await {
        Ok(e) => e,
        Err(r) => return *r,
    };
    let mut form = vec![
        ("grant_type", "authorization_code".to_owned()),
        ("code", code.to_owned()),
        ("redirect_uri", redirect_uri(&b)),
        ("client_id", i.audience.clone()),
        ("code_verifier", verifier.to_owned()),
    ];
    if let Some(secret) = &b.config.console.oidc_client_secret {
        match b.notifier.secrets().resolve(secret).await {
            Ok(s) => form.push(("client_secret", s.expose_secret().to_owned())),
            Err(e) => return unavailable("the client secret", &e),
        }
    }
    let http = match b.federation.http(i) {
        Ok(h) => h,
        Err(e) => return unavailable("the token endpoint", &e),
    };
    let answer: serde_json::Value = match http.post(&token_endpoint).form(&form).send().await {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(v) => v,
            Err(e) => return unavailable("the token endpoint", &e),
        },
        Ok(r) => {
            return refused(&format!(
                "The identity provider did not exchange the code (HTTP {}).",
                r.status().as_u16()
            ));
        }
        Err(e) => return unavailable("the token endpoint", &e.without_url()),
    };
    let Some(id_token) = answer["id_token"].as_str() else {
        return refused("The identity provider sent no ID token.");
    };
    let fed = match b.federation.verify(id_token).await {
        Ok(f) if f.issuer == i.name && f.users => f,
        Ok(_) => return refused("The ID token is not from the console's identity provider."),
        Err(e) => return refused(&format!("The ID token was refused: {e}.")),
    };
    if fed.nonce.as_deref() != Some(nonce) {
        return refused("The ID token was not issued for this sign-in (its nonce differs).");
    }
    let Some(op) = b
        .config
        .operators
        .iter()
        .find(|o| o.oidc_subject.as_deref() == Some(fed.subject.as_str()))
    else {
        let ev = AuditEvent::new(&Actor::Unauthenticated(None), "operator.auth").failure(format!(
            "console OIDC sign-in: subject `{}` of `{}` is no operator",
            fed.subject, i.name
        ));
        if let Err(e) = b.audit_alone(ev).await {
            tracing::error!(error = %e, "cannot audit a console sign-in failure");
        }
        return refused(&format!(
            "You signed in at {} as `{}`, who is not a Keygate operator.",
            i.name, fed.subject
        ));
    };
    match b.operator_departure(&op.name).await {
        Ok(None) => {}
        Ok(Some(d)) => {
            let why = format!(
                "Operator `{}` departed on {}.",
                op.name,
                d.departed_at.date()
            );
            let source = crate::server::auth::source_in(&extensions);
            b.record_operator_auth_failure(source, Some(&op.name), &why)
                .await;
            return refused(&why);
        }
        Err(e) => return unavailable("the people directory", &e),
    }
    let mut resp = begin(&b, &op.name, "oidc", &next, true).await;
    let clear = flow_cookie(&b, String::new(), time::Duration::ZERO);
    if let Ok(v) = clear.parse() {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}
