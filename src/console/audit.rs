//! The audit log (search, the chain's verification, export as JSON lines)
//! and continuous validation's incidents (list, resolve).

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::agents::urlencode;
use super::page::{Viewer, broker_error, error_page, layout, respond, when};
use crate::audit::{GENESIS_HASH, verify_chain};
use crate::config::Role;
use crate::server::AppState;
use crate::store::AuditFilter;
use crate::validation::IncidentState;

const AUDITORS: &[Role] = &[Role::Admin, Role::Auditor];

#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    agent: String,
    #[serde(default)]
    action: String,
    /// Events after this `seq` (the next page).
    #[serde(default)]
    after: i64,
}

const PAGE: u32 = 200;

fn filter(q: &AuditQuery, limit: u32) -> AuditFilter {
    let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    AuditFilter {
        after_seq: q.after.max(0),
        agent: some(&q.agent),
        task: None,
        action: some(&q.action),
        limit,
    }
}

/// `GET /ui/audit?agent=&action=&after=`, oldest first, a page at a time.
pub async fn list(State(b): State<AppState>, v: Viewer, Query(q): Query<AuditQuery>) -> Response {
    if let Err(r) = v.require(AUDITORS) {
        return *r;
    }
    let events = match b.store.audit_events(&filter(&q, PAGE)).await {
        Ok(e) => e,
        Err(e) => return broker_error(&v, e.into()),
    };
    let next = (events.len() == PAGE as usize)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    let export = format!(
        "/ui/audit/export?agent={}&action={}",
        urlencode(&q.agent),
        urlencode(&q.action)
    );
    let body = html! {
        form.filters method="get" action="/ui/audit" {
            label for="agent" { "Agent" }
            input id="agent" name="agent" value=(q.agent) maxlength="200";
            label for="action" { "Action" }
            input id="action" name="action" value=(q.action) maxlength="100" placeholder="credential.issued";
            button type="submit" { "Search" }
            a href="/ui/audit" { "Clear" }
        }
        p {
            a href="/ui/audit/verify" { "Verify the chain" } " · "
            a href=(export) { "Export these as JSON lines" }
        }
        @if events.is_empty() {
            p.empty { "No event matches." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "#" } th scope="col" { "When" } th scope="col" { "Actor" }
                    th scope="col" { "Action" } th scope="col" { "Agent" } th scope="col" { "Scope" }
                    th scope="col" { "Outcome" } th scope="col" { "Reason" }
                } }
                tbody { @for e in &events { tr {
                    td { (e.seq) }
                    td { (when(crate::model::from_unix(e.at_ms / 1000))) }
                    td { (e.actor) } td { code { (e.action) } }
                    td { (e.agent.as_deref().unwrap_or("")) }
                    td { (e.scope.as_deref().unwrap_or("")) }
                    td { (e.outcome) }
                    td.text { (e.reason.as_deref().unwrap_or("")) }
                } } }
            }
            @if let Some(after) = next {
                p { a href={ "/ui/audit?agent=" (urlencode(&q.agent)) "&action=" (urlencode(&q.action)) "&after=" (after) } { "Next page" } }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Audit log", body))
}

/// `GET /ui/audit/verify`: every event's hash and link, from the start.
pub async fn verify(State(b): State<AppState>, v: Viewer) -> Response {
    if let Err(r) = v.require(AUDITORS) {
        return *r;
    }
    let (mut seq, mut hash) = (0, GENESIS_HASH.to_owned());
    let outcome = loop {
        let page = match b
            .store
            .audit_events(&filter(
                &AuditQuery {
                    after: seq,
                    ..AuditQuery::default()
                },
                10_000,
            ))
            .await
        {
            Ok(p) => p,
            Err(e) => return broker_error(&v, e.into()),
        };
        if page.is_empty() {
            break Ok((seq, hash));
        }
        match verify_chain(&page, seq, hash) {
            Ok((s, h)) => (seq, hash) = (s, h),
            Err(broken) => break Err(broken),
        }
    };
    let (status, body) = match outcome {
        Ok((n, head)) => (
            StatusCode::OK,
            html! {
                p.ok role="status" { strong { "Chain intact" } ": " (n) " events, each linked to the one before and matching its hash." }
                p { "Head: " code { (head) } }
            },
        ),
        Err(broken) => (
            StatusCode::CONFLICT,
            html! {
                p.error role="alert" { strong { "Chain broken" } " at event " (broken.seq) ": " (broken.problem) }
            },
        ),
    };
    respond(status, layout(Some(&v), "Audit chain", body))
}

/// `GET /ui/audit/export?agent=&action=`: every matching event, as JSON lines.
pub async fn export(State(b): State<AppState>, v: Viewer, Query(q): Query<AuditQuery>) -> Response {
    if let Err(r) = v.require(AUDITORS) {
        return *r;
    }
    let mut out = String::new();
    let mut after = 0;
    loop {
        let page = match b
            .store
            .audit_events(&filter(
                &AuditQuery {
                    after,
                    agent: q.agent.clone(),
                    action: q.action.clone(),
                },
                10_000,
            ))
            .await
        {
            Ok(p) => p,
            Err(e) => return broker_error(&v, e.into()),
        };
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            if let Ok(line) = serde_json::to_string(e) {
                out.push_str(&line);
                out.push('\n');
            }
        }
    }
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"keygate-audit.jsonl\"",
            ),
        ],
        out,
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
pub struct IncidentsQuery {
    #[serde(default)]
    open: bool,
}

/// `GET /ui/incidents?open=true`.
pub async fn incidents(
    State(b): State<AppState>,
    v: Viewer,
    Query(q): Query<IncidentsQuery>,
) -> Response {
    if let Err(r) = v.require(&[Role::Admin, Role::Secops, Role::Auditor]) {
        return *r;
    }
    let mut list = match b.incidents(None).await {
        Ok(l) => l,
        Err(e) => return broker_error(&v, e),
    };
    if q.open {
        list.retain(|i| i.state == IncidentState::Open);
    }
    let resolver = v.has(&[Role::Admin, Role::Secops]);
    let name = |x: serde_json::Value| x.as_str().unwrap_or_default().to_owned();
    let body = html! {
        p { a href="/ui/incidents?open=true" { "Open only" } " · " a href="/ui/incidents" { "All" } }
        @if list.is_empty() {
            p.empty { "No incident." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Incident" } th scope="col" { "Agent" } th scope="col" { "Detector" }
                    th scope="col" { "Severity" } th scope="col" { "Action" } th scope="col" { "Evidence" }
                    th scope="col" { "Opened" } th scope="col" { "State" }
                } }
                tbody { @for i in &list { tr {
                    td { code { (i.id) } }
                    td { a href={ "/ui/agents/" (urlencode(&i.agent)) } { (i.agent) } }
                    td { (i.detector) }
                    td { (name(serde_json::json!(i.severity))) }
                    td { (name(serde_json::json!(i.action))) @if i.dry_run { " (dry run)" } }
                    td { code.text { (i.evidence) } }
                    td { (when(i.opened_at)) }
                    td {
                        @if i.state == IncidentState::Resolved {
                            "resolved by " (i.resolved_by.as_deref().unwrap_or("?"))
                            @if let Some(r) = &i.resolution { ": " span.text { (r) } }
                        } @else if resolver {
                            form.inline method="post" action={ "/ui/incidents/" (urlencode(&i.id)) "/resolve" } {
                                (v.csrf_field())
                                label for={ "reason-" (i.id) } { "Reason" }
                                input id={ "reason-" (i.id) } name="reason" required maxlength="500";
                                button type="submit" { "Resolve" }
                            }
                        } @else {
                            "open"
                        }
                    }
                } } }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Incidents", body))
}

#[derive(Deserialize)]
pub struct ResolveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// `POST /ui/incidents/{id}/resolve` (secops, admin).
pub async fn resolve_incident(
    State(b): State<AppState>,
    v: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<ResolveForm>,
) -> Response {
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    if let Err(r) = v.require(&[Role::Admin, Role::Secops]) {
        return *r;
    }
    if f.reason.trim().is_empty() {
        return error_page(
            Some(&v),
            StatusCode::BAD_REQUEST,
            "Say why: the reason is recorded in the audit log.",
        );
    }
    match b.resolve_incident(&v.actor(), &id, &f.reason).await {
        Ok(_) => Redirect::to("/ui/incidents").into_response(),
        Err(e) => broker_error(&v, e),
    }
}
