//! Signing in and out. An operator signs in with its bearer token; the
//! console answers with a session cookie (a random value, `HttpOnly`,
//! `SameSite=Strict`, `Secure` when the console is served over https, path
//! `/ui`) whose SHA-256 keys a row in the store, so every replica knows it
//! and signing out ends it everywhere. The token itself is never kept, put
//! in a page or logged. Signing in and out are audited.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::page::{COOKIE, Viewer, cookie, error_page, layout, respond, sha256_hex};
use crate::audit::{Actor, AuditEvent};
use crate::model::{ConsoleSession, now};
use crate::server::AppState;

/// How long a console session lasts.
const SESSION_HOURS: i64 = 8;
/// The sign-in form's own anti-forgery cookie (double submit).
const LOGIN_COOKIE: &str = "keygate_console_login";

/// 256 random bits, in hex. The operating system's generator does not fail
/// once the process runs; if it ever did, this would not hand out a
/// guessable value: the caller refuses to sign in.
pub(super) fn random_hex() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

pub(super) fn no_randomness() -> Response {
    tracing::error!("the operating system's random generator failed");
    error_page(
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        "Signing in is not possible right now: try again shortly.",
    )
}

/// Whether cookies must be `Secure`: the console's public address is https.
pub(super) fn secure(b: &AppState) -> bool {
    b.config.public_url().starts_with("https://")
}

pub(super) fn set_cookie(
    name: &str,
    value: &str,
    max_age: Option<time::Duration>,
    secure: bool,
) -> String {
    let mut c = cookie::Cookie::build((name.to_owned(), value.to_owned()))
        .path("/ui")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(secure);
    if let Some(age) = max_age {
        c = c.max_age(age);
    }
    c.build().to_string()
}

/// Only a console path may be returned to after signing in.
pub(super) fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| {
        n.starts_with("/ui") && !n.starts_with("/ui//") && !n.contains('\\') && !n.contains("://")
    })
    .unwrap_or("/ui")
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    pub next: Option<String>,
}

fn login_form(b: &AppState, next: &str, nonce: &str, error: Option<&str>) -> maud::Markup {
    let oidc = b.config.console.oidc_issuer.as_deref();
    html! {
        @if let Some(e) = error {
            p.error role="alert" { (e) }
        }
        form.login method="post" action="/ui/login" {
            input type="hidden" name="login_csrf" value=(nonce);
            input type="hidden" name="next" value=(next);
            label for="token" { "Operator token" }
            input id="token" type="password" name="token" autocomplete="off" required autofocus;
            button type="submit" { "Sign in" }
        }
        @if let Some(name) = oidc {
            p { a.oidc href={ "/ui/login/oidc?next=" (super::agents::urlencode(next)) } { "Sign in with " (name) } }
        }
        p.note {
            "Your operator token (the one `keygate` commands use) is checked and then forgotten: "
            "the console keeps a session of " (SESSION_HOURS) " hours instead."
        }
    }
}

/// `GET /ui/login`.
pub async fn login_page(State(b): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    let Some(nonce) = random_hex() else {
        return no_randomness();
    };
    let next = safe_next(q.next.as_deref());
    let mut resp = respond(
        StatusCode::OK,
        layout(None, "Sign in", login_form(&b, next, &nonce, None)),
    );
    if let Ok(v) = set_cookie(LOGIN_COOKIE, &nonce, None, secure(&b)).parse() {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: SecretString,
    #[serde(default)]
    login_csrf: String,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /ui/login`.
pub async fn login(
    State(b): State<AppState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Form(f): Form<LoginForm>,
) -> Response {
    let source = crate::server::auth::source_in(&extensions);
    let next = safe_next(f.next.as_deref()).to_owned();
    // The form must come from the page that set its cookie.
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || expected != f.login_csrf {
        return error_page(
            None,
            StatusCode::FORBIDDEN,
            "This sign-in was refused: it did not come from the sign-in page. Open the sign-in page and try again.",
        );
    }
    let refuse = |message: &str| {
        let Some(nonce) = random_hex() else {
            return no_randomness();
        };
        let mut resp = respond(
            StatusCode::UNAUTHORIZED,
            layout(
                None,
                "Sign in",
                login_form(&b, &next, &nonce, Some(message)),
            ),
        );
        if let Ok(v) = set_cookie(LOGIN_COOKIE, &nonce, None, secure(&b)).parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    };
    let Some(op) = crate::server::find_operator(&b, f.token.expose_secret().trim()) else {
        // Sign-ins are limited per address (`limit_by_address`); failures
        // are audited in bursts.
        b.record_operator_auth_failure(
            source,
            None,
            "unknown operator token at the console sign-in",
        )
        .await;
        return refuse("That token is not an operator's. Check it and try again.");
    };
    match b.operator_departure(&op.name).await {
        Ok(None) => {}
        Ok(Some(d)) => {
            let why = format!(
                "Operator `{}` departed on {}; its token no longer signs in.",
                op.name,
                d.departed_at.date()
            );
            // Audited as the API audits a departed operator's token.
            b.record_operator_auth_failure(source, Some(&op.name), &why)
                .await;
            return refuse(&why);
        }
        Err(e) => {
            tracing::error!(error = %e, "console sign-in: departure check failed");
            return error_page(
                None,
                StatusCode::SERVICE_UNAVAILABLE,
                "Signing in is not possible right now: try again shortly.",
            );
        }
    }
    begin(&b, &op.name, "token", &next, false).await
}

/// Starts a console session for `operator` (signed in by `method`) and
/// sends the browser to `next`: by redirect, or (`via_page`, after a
/// cross-site sign-in where a `SameSite=Strict` cookie would not follow a
/// redirect) by a page of our own that moves on at once.
pub(super) async fn begin(
    b: &AppState,
    operator: &str,
    method: &str,
    next: &str,
    via_page: bool,
) -> Response {
    let Some(value) = random_hex() else {
        return no_randomness();
    };
    let t = now();
    let credential = b
        .config
        .operators
        .iter()
        .find(|o| o.name == operator)
        .and_then(|o| credential_of(o, method));
    let session = ConsoleSession {
        operator: operator.to_owned(),
        method: method.to_owned(),
        credential,
        created_at: t,
        expires_at: t + time::Duration::hours(SESSION_HOURS),
    };
    let started = async {
        let mut tx = b.store.begin().await?;
        tx.insert_console_session(&sha256_hex(&value), &session)
            .await?;
        tx.audit(
            AuditEvent::new(&Actor::Operator(operator.to_owned()), "console.signed_in")
                .details(serde_json::json!({ "method": method })),
        )
        .await?;
        tx.commit().await
    };
    if let Err(e) = started.await {
        tracing::error!(error = %e, "console sign-in: the session could not be stored");
        return error_page(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Signing in is not possible right now: try again shortly.",
        );
    }
    let mut resp = if via_page {
        let body = html! {
            p { "Signed in as " strong { (operator) } ". " a href=(next) { "Continue" } }
        };
        respond(
            StatusCode::OK,
            super::page::layout_refreshing_to(None, "Signed in", body, next),
        )
    } else {
        Redirect::to(next).into_response()
    };
    let cookies = [
        set_cookie(
            COOKIE,
            &value,
            Some(time::Duration::hours(SESSION_HOURS)),
            secure(b),
        ),
        set_cookie(LOGIN_COOKIE, "", Some(time::Duration::ZERO), secure(b)),
    ];
    for c in cookies {
        if let Ok(v) = c.parse() {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/logout`: the session ends here and on every replica.
pub async fn logout(
    State(b): State<AppState>,
    v: Viewer,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let value = cookie(&headers, COOKIE).unwrap_or_default();
    let ended = async {
        let mut tx = b.store.begin().await?;
        tx.delete_console_session(&sha256_hex(&value)).await?;
        tx.audit(AuditEvent::new(&v.actor(), "console.signed_out"))
            .await?;
        tx.commit().await
    };
    if let Err(e) = ended.await {
        tracing::error!(error = %e, "console sign-out failed");
        return error_page(
            Some(&v),
            StatusCode::SERVICE_UNAVAILABLE,
            "Signing out did not go through: try again.",
        );
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    if let Ok(c) = set_cookie(COOKIE, "", Some(time::Duration::ZERO), secure(&b)).parse() {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

/// A fingerprint of what an operator signs in with by `method`: its
/// configured token's hash, or its OIDC subject. A session records it at
/// sign-in and ends once config says otherwise (a rotated token, a changed
/// subject).
pub(super) fn credential_of(op: &crate::config::OperatorConfig, method: &str) -> Option<String> {
    let what = match method {
        "token" => op.token_sha256.to_ascii_lowercase(),
        "oidc" => op.oidc_subject.clone()?,
        _ => return None,
    };
    let hex = sha256_hex(&format!("{method}:{what}"));
    Some(hex.get(..32).unwrap_or(&hex).to_owned())
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn only_console_paths_are_returned_to() {
        assert_eq!(safe_next(Some("/ui/agents?team=a")), "/ui/agents?team=a");
        for evil in [
            "https://evil.example/ui",
            "//evil.example",
            "/ui//evil.example",
            "/ui\\@evil",
            "/v1/agents",
        ] {
            assert_eq!(safe_next(Some(evil)), "/ui", "{evil}");
        }
        assert_eq!(safe_next(None), "/ui");
    }
}
