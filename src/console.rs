//! The web console at `/ui`, served by the broker itself for approvers,
//! SecOps and auditors: server-rendered HTML (`maud`, which escapes every
//! value it interpolates unless told otherwise), no JavaScript at all (the
//! Content-Security-Policy forbids scripts outright; the kill switch's
//! progress refreshes with `<meta http-equiv="refresh">`), one stylesheet
//! compiled into the binary.
//!
//! Every page is a thin view over the same broker calls the API makes, so
//! roles, separation of duties and audit are the API's own. Operators sign
//! in with their token (`session.rs`), which starts a console session kept
//! in the store: the `HttpOnly`, `SameSite=Strict` cookie holds a random
//! value whose SHA-256 is the row's key, every form carries a CSRF token
//! derived from it, and signing out deletes the row.

mod agents;
mod approvals;
mod audit;
mod leases;
mod oidc;
mod page;
mod reviews;
mod session;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::routing::{get, post};

use crate::server::AppState;

pub use page::Viewer;

/// The largest form the console accepts.
const BODY_LIMIT: usize = 64 * 1024;

/// The console's routes, with their own headers (they are HTML, not the
/// API: the JSON error rewriting and the OpenAPI document leave them out).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ui", get(page::home))
        .route("/ui/static/console.css", get(page::stylesheet))
        .route("/ui/login", get(session::login_page).post(session::login))
        .route("/ui/login/oidc", get(oidc::start))
        .route("/ui/login/oidc/callback", get(oidc::callback))
        .route("/ui/logout", post(session::logout))
        .route("/ui/agents", get(agents::list))
        .route("/ui/agents/{id}", get(agents::show))
        .route("/ui/agents/{id}/status", post(agents::set_status))
        .route("/ui/approvals", get(approvals::list))
        .route("/ui/approvals/{id}", get(approvals::show))
        .route("/ui/approvals/{id}/decision", post(approvals::decide))
        .route("/ui/leases", get(leases::list))
        .route(
            "/ui/kill",
            get(leases::kill_form).post(leases::kill_preview),
        )
        .route("/ui/kill/confirm", post(leases::kill))
        .route("/ui/revocations/{id}", get(leases::progress))
        .route("/ui/audit", get(audit::list))
        .route("/ui/audit/verify", get(audit::verify))
        .route("/ui/audit/export", get(audit::export))
        .route("/ui/incidents", get(audit::incidents))
        .route("/ui/reviews", get(reviews::list))
        .route("/ui/reviews/items/{id}", get(reviews::item))
        .route("/ui/reviews/items/{id}/decision", post(reviews::decide))
        .route("/ui/evidence", get(reviews::evidence))
        .route("/ui/incidents/{id}/resolve", post(audit::resolve_incident))
        .route("/ui/{*rest}", get(page::not_found).post(page::not_found))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::middleware::from_fn(crate::server::log_requests))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// What every console answer carries: no script may run, nothing may frame
/// the page, nothing is cached, no address leaks to another site through the referrer.
async fn security_headers(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, name: header::HeaderName, v: &'static str| {
        h.insert(name, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'none'; style-src 'self'; img-src 'self'; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    // `same-origin`, not `no-referrer`: with no referrer policy at all a
    // browser sends `Origin: null` on its own forms, and the CSRF check
    // needs the real one.
    set(h, header::REFERRER_POLICY, "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    resp
}
