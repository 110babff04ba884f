//! What every console page shares: who is looking (the session cookie,
//! checked against the store and the operator list on every request), the
//! CSRF check of every form, the layout, and error pages.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{DOCTYPE, Markup, html};
use sha2::{Digest, Sha256};

use crate::broker::BrokerError;
use crate::config::Role;
use crate::server::{ApiError, AppState};

/// The session cookie's name.
pub const COOKIE: &str = "keygate_console";

/// The stylesheet, compiled in.
const CSS: &str = include_str!("console.css");

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The CSRF token of a session: derived from the cookie's value (which the
/// page never shows), so a page can embed it and another site cannot know it.
pub fn csrf_of(cookie: &str) -> String {
    sha256_hex(&format!("keygate-console-csrf:{cookie}"))
}

/// A cookie of the request, by name.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
}

/// A signed-in operator looking at the console.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub name: String,
    pub roles: Vec<Role>,
    csrf: String,
}

impl Viewer {
    pub fn has(&self, roles: &[Role]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }

    /// A page refusing what the viewer's roles do not allow.
    pub fn require(&self, roles: &[Role]) -> Result<(), Box<Response>> {
        if self.has(roles) {
            return Ok(());
        }
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        Err(Box::new(error_page(
            Some(self),
            StatusCode::FORBIDDEN,
            &format!(
                "Your roles do not allow this (it needs one of: {}).",
                names.join(", ")
            ),
        )))
    }

    pub fn actor(&self) -> crate::audit::Actor {
        crate::audit::Actor::Operator(self.name.clone())
    }

    /// The hidden field every form carries.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.csrf); }
    }

    /// Refuses a form that did not come from a console page: its CSRF
    /// token must match, and a browser that says where it came from must
    /// say this site.
    pub fn check_form(&self, headers: &HeaderMap, token: &str) -> Result<(), Box<Response>> {
        let refused = |why: &str| {
            Err(Box::new(error_page(
                Some(self),
                StatusCode::FORBIDDEN,
                &format!("This form was refused: {why}. Reload the page and try again."),
            )))
        };
        let site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("same-origin");
        if !matches!(site, "same-origin" | "none") {
            return refused("it was sent from another site");
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let same = origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host));
            if !same {
                return refused("it was sent from another origin");
            }
        }
        let ok = token.len() == self.csrf.len()
            && token
                .bytes()
                .zip(self.csrf.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !ok {
            return refused("its anti-forgery token is missing or wrong");
        }
        Ok(())
    }
}

/// Where a request without a session goes: the sign-in page, then back.
fn to_login(parts: &Parts) -> Response {
    let back = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with("/ui") && parts.method == axum::http::Method::GET)
        .unwrap_or("/ui");
    let next = url::form_urlencoded::byte_serialize(back.as_bytes()).collect::<String>();
    Redirect::to(&format!("/ui/login?next={next}")).into_response()
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, b: &AppState) -> Result<Self, Response> {
        let Some(value) = cookie(&parts.headers, COOKIE) else {
            return Err(to_login(parts));
        };
        let unavailable = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "console session lookup failed");
            error_page(
                None,
                StatusCode::SERVICE_UNAVAILABLE,
                "The console cannot check your session right now: try again shortly.",
            )
        };
        let session = b
            .store
            .console_session(&sha256_hex(&value))
            .await
            .map_err(|e| unavailable(&e))?
            .filter(|s| s.expires_at > crate::model::now());
        let Some(session) = session else {
            return Err(to_login(parts));
        };
        // The operator must still be configured, with the roles it has now,
        // and not have departed.
        let Some(op) = b
            .config
            .operators
            .iter()
            .find(|o| o.name == session.operator)
        else {
            return Err(to_login(parts));
        };
        // Signed in with what config still says: a rotated token (or a
        // changed OIDC subject) ends the sessions it opened.
        if session.credential.is_none()
            || session.credential != super::session::credential_of(op, &session.method)
        {
            return Err(to_login(parts));
        }
        if b.operator_departure(&op.name)
            .await
            .map_err(|e| unavailable(&e))?
            .is_some()
        {
            return Err(to_login(parts));
        }
        Ok(Self {
            name: op.name.clone(),
            roles: op.roles.clone(),
            csrf: csrf_of(&value),
        })
    }
}

/// A whole page: the header with what the viewer may open, then `body`.
pub fn layout(viewer: Option<&Viewer>, title: &str, body: Markup) -> Markup {
    layout_refreshing(viewer, title, body, 0)
}

/// A page that reloads itself every `secs` seconds (0: never).
pub fn layout_refreshing(viewer: Option<&Viewer>, title: &str, body: Markup, secs: u32) -> Markup {
    page(viewer, title, body, (secs > 0).then(|| secs.to_string()))
}

/// A page that moves on to `to` (a console path) at once.
pub fn layout_refreshing_to(
    viewer: Option<&Viewer>,
    title: &str,
    body: Markup,
    to: &str,
) -> Markup {
    page(viewer, title, body, Some(format!("0; url={to}")))
}

fn page(viewer: Option<&Viewer>, title: &str, body: Markup, refresh: Option<String>) -> Markup {
    let has = |roles: &[Role]| viewer.is_some_and(|v| v.has(roles));
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Keygate" }
                @if let Some(r) = &refresh {
                    meta http-equiv="refresh" content=(r);
                }
                link rel="stylesheet" href="/ui/static/console.css";
            }
            body {
                header {
                    a.brand href="/ui" { "Keygate" }
                    @if let Some(v) = viewer {
                        nav aria-label="Main" {
                            @if has(&[Role::Admin, Role::Secops, Role::Auditor, Role::Approver]) {
                                a href="/ui/approvals" { "Approvals" }
                            }
                            @if has(&[Role::Admin, Role::Secops, Role::Auditor]) {
                                a href="/ui/agents" { "Agents" }
                                a href="/ui/leases" { "Leases" }
                                a href="/ui/incidents" { "Incidents" }
                            }
                            @if has(&[Role::Admin, Role::Secops]) {
                                a.danger href="/ui/kill" { "Kill switch" }
                            }
                            @if has(&[Role::Admin, Role::Auditor]) {
                                a href="/ui/audit" { "Audit" }
                            }
                            a href="/ui/reviews" { "Reviews" }
                        }
                        form.signout method="post" action="/ui/logout" {
                            (v.csrf_field())
                            span { (v.name) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// An HTML answer with `status`.
pub fn respond(status: StatusCode, page: Markup) -> Response {
    (status, Html(page.into_string())).into_response()
}

/// An error page that says what went wrong and what to do.
pub fn error_page(viewer: Option<&Viewer>, status: StatusCode, message: &str) -> Response {
    let body = html! {
        p.error role="alert" { (message) }
        p { a href="/ui" { "Back to the console" } }
    };
    let title = status.canonical_reason().unwrap_or("Error");
    respond(status, layout(viewer, title, body))
}

/// A broker error as a page: the API's status and message.
pub fn broker_error(viewer: &Viewer, e: BrokerError) -> Response {
    let api = ApiError::from(e);
    error_page(Some(viewer), api.status, &api.message)
}

/// `GET /ui`: where to go from here.
pub async fn home(State(b): State<AppState>, v: Viewer) -> Response {
    let pending = b
        .store
        .list_approvals(&crate::model::ApprovalFilter {
            state: Some(crate::model::ApprovalState::Pending),
            ..crate::model::ApprovalFilter::default()
        })
        .await
        .map(|l| l.len())
        .unwrap_or(0);
    let body = html! {
        p { "Signed in as " strong { (v.name) } " (" (roles(&v)) ")." }
        ul.cards {
            @if v.has(&[Role::Admin, Role::Secops, Role::Auditor, Role::Approver]) {
                li { a href="/ui/approvals" { (pending) " pending approval" @if pending != 1 { "s" } } }
            }
            @if v.has(&[Role::Admin, Role::Secops, Role::Auditor]) {
                li { a href="/ui/agents" { "The agent registry" } }
                li { a href="/ui/leases" { "Live credentials and fences" } }
                li { a href="/ui/incidents?open=true" { "Open incidents" } }
            }
            @if v.has(&[Role::Admin, Role::Secops]) {
                li { a.danger href="/ui/kill" { "The kill switch" } }
            }
            @if v.has(&[Role::Admin, Role::Auditor]) {
                li { a href="/ui/audit" { "The audit log, and its chain" } }
            }
            li { a href="/ui/reviews" { "Access reviews assigned to you" @if v.has(&[Role::Admin, Role::Auditor]) { ", and the evidence pack" } } }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Console", body))
}

/// The viewer's roles, in words.
pub fn roles(v: &Viewer) -> String {
    v.roles
        .iter()
        .map(|r| format!("{r:?}").to_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// Any other `/ui/…` path.
pub async fn not_found() -> Response {
    error_page(
        None,
        StatusCode::NOT_FOUND,
        "There is no such page in the console.",
    )
}

/// A time for people.
pub fn when(t: time::OffsetDateTime) -> String {
    crate::model::rfc3339(t)
}
