//! Approvals: what waits, with everything an approver needs (the agent, the
//! scope, the justification as text, the policies that decided, who has
//! decided so far), and approve / deny under the API's own rules: the
//! broker checks the approver role, the approver teams, separation of
//! duties and quorum, and audits a refused decision like any other.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::agents::urlencode;
use super::page::{Viewer, broker_error, error_page, layout, respond, when};
use crate::broker::{DecisionChannel, DecisionRequest};
use crate::config::Role;
use crate::model::{ApprovalFilter, ApprovalState, Verdict};
use crate::server::AppState;

/// Who reads approvals (as `GET /v1/approvals`).
const READERS: &[Role] = &[Role::Approver, Role::Admin, Role::Secops, Role::Auditor];

/// How many pending approvals the list shows (the newest).
const PENDING_SHOWN: u32 = 500;

/// `GET /ui/approvals`: pending first, then the last decided.
pub async fn list(State(b): State<AppState>, v: Viewer) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    // Pending ones read on their own: however many were decided since, an
    // old one still waiting is listed.
    let filter = |state: Option<ApprovalState>, limit: u32| ApprovalFilter {
        state,
        limit: Some(limit),
        ..ApprovalFilter::default()
    };
    let (pending, recent) = match (
        b.store
            .list_approvals(&filter(Some(ApprovalState::Pending), PENDING_SHOWN))
            .await,
        b.store
            .list_approvals(&filter(None, PENDING_SHOWN + 50))
            .await,
    ) {
        (Ok(p), Ok(r)) => (p, r),
        (Err(e), _) | (_, Err(e)) => return broker_error(&v, e.into()),
    };
    let more_pending = pending.len() >= PENDING_SHOWN as usize;
    let pending: Vec<_> = pending.iter().collect();
    let decided: Vec<_> = recent
        .iter()
        .filter(|a| a.state != ApprovalState::Pending)
        .collect();
    let table = |list: &[&crate::model::Approval]| {
        html! {
            table {
                thead { tr {
                    th scope="col" { "Request" } th scope="col" { "Agent" } th scope="col" { "Scope" }
                    th scope="col" { "Justification" } th scope="col" { "Approvals" } th scope="col" { "State" }
                    th scope="col" { "Expires" }
                } }
                tbody { @for a in list { tr {
                    td { a href={ "/ui/approvals/" (urlencode(&a.id)) } { (a.id) } }
                    td { (a.agent_id) }
                    td { (a.scope.as_deref().unwrap_or(a.kind.as_str())) }
                    td.text { (a.justification) }
                    td { (a.approvals().count()) " of " (a.required) }
                    td { span class={ "state " (a.state) } { (a.state) } }
                    td { (when(a.expires_at)) }
                } } }
            }
        }
    };
    let body = html! {
        h2 { "Waiting for a decision" }
        @if pending.is_empty() {
            p.empty { "Nothing waits for a decision." }
        } @else {
            (table(&pending))
            @if more_pending {
                p.more { "The newest " (PENDING_SHOWN) " are shown; more wait: "
                    code { "keygate approvals list" } }
            }
        }
        h2 { "Recently decided" }
        @if decided.is_empty() {
            p.empty { "None yet." }
        } @else {
            (table(&decided[..decided.len().min(50)]))
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Approvals", body))
}

/// `GET /ui/approvals/{id}`.
pub async fn show(State(b): State<AppState>, v: Viewer, Path(id): Path<String>) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    let a = match b.approval(&id).await {
        Ok(a) => a,
        Err(e) => return broker_error(&v, e),
    };
    // The policies that decided, from the request's audit trail.
    let policies: Vec<String> = b
        .store
        .audit_events(&crate::store::AuditFilter {
            after_seq: 0,
            agent: Some(a.agent_id.clone()),
            task: a.task_id.clone(),
            action: None,
            limit: 10_000,
        })
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.details["approval"] == a.id.as_str() && !e.policy_ids.is_empty())
        .flat_map(|e| e.policy_ids)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let body = html! {
        dl.facts {
            dt { "State" } dd { span class={ "state " (a.state) } { (a.state) } }
            dt { "Agent" } dd {
                @if v.has(super::agents::READERS) {
                    a href={ "/ui/agents/" (urlencode(&a.agent_id)) } { (a.agent_id) }
                } @else {
                    (a.agent_id)
                }
            }
            dt { "Asked by" } dd { (a.requester) }
            @if let Some(s) = &a.scope { dt { "Scope" } dd { code { (s) } } }
            @if let Some(t) = &a.task_id { dt { "Task" } dd { code { (t) } } }
            dt { "Justification" } dd.text { (a.justification) }
            dt { "Request" } dd { code.text { (a.request) } }
            @let incidents = a.step_up_incidents();
            @if !incidents.is_empty() {
                dt { "Step-up" } dd.warn { "Incident " (incidents.join(", ")) " holds: this agent's requests need a human until it is resolved." }
            }
            dt { "Policies" } dd { @if policies.is_empty() { "none recorded" } @else { (policies.join(", ")) } }
            dt { "Approvals needed" } dd {
                (a.required)
                @if !a.approver_teams.is_empty() { " (from teams " (a.approver_teams.join(", ")) ")" }
                @if !a.sponsor_alone { "; the sponsor " (a.sponsor) " may not be the only approver" }
            }
            dt { "Asked" } dd { (when(a.created_at)) }
            dt { "Expires" } dd { (when(a.expires_at)) }
            @if let Some(r) = &a.end_reason { dt { "Outcome" } dd.text { (r) } }
        }
        h2 { "Decisions" }
        @if a.decisions.is_empty() {
            p.empty { "Nobody has decided yet." }
        } @else {
            ul { @for d in &a.decisions { li {
                strong { (d.operator) } " " (d.decision.as_str()) " via " (d.channel) " at " (when(d.at))
                @if let Some(r) = &d.reason { ": " span.text { (r) } }
            } } }
        }
        @if a.state == ApprovalState::Pending {
            h2 { "Decide" }
            form.actions method="post" action={ "/ui/approvals/" (urlencode(&a.id)) "/decision" } {
                (v.csrf_field())
                label for="reason" { "Reason (recorded in the audit log)" }
                input id="reason" name="reason" maxlength="500";
                button type="submit" name="decision" value="approve" { "Approve" }
                button.danger type="submit" name="decision" value="deny" { "Deny" }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Approval request", body))
}

#[derive(Deserialize)]
pub struct DecisionForm {
    #[serde(default)]
    csrf: String,
    decision: String,
    #[serde(default)]
    reason: String,
}

/// `POST /ui/approvals/{id}/decision`.
pub async fn decide(
    State(b): State<AppState>,
    v: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<DecisionForm>,
) -> Response {
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let decision = match f.decision.as_str() {
        "approve" => Verdict::Approve,
        "deny" => Verdict::Deny,
        _ => {
            return error_page(Some(&v), StatusCode::BAD_REQUEST, "Choose approve or deny.");
        }
    };
    let reason = Some(f.reason.trim().to_owned()).filter(|r| !r.is_empty());
    let req = DecisionRequest { decision, reason };
    match b
        .decide_approval(&v.name, &id, req, DecisionChannel::Console, None)
        .await
    {
        Ok(_) => Redirect::to(&format!("/ui/approvals/{}", urlencode(&id))).into_response(),
        Err(e) => broker_error(&v, e),
    }
}
