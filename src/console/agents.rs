//! The registry: every agent with filters, an agent's page (attributes,
//! permitted scopes, live credentials, recent audit events, compliance),
//! and suspend / resume / decommission with a reason.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::page::{Viewer, broker_error, layout, respond, when};
use crate::config::Role;
use crate::model::{AgentStatus, LeaseFilter, LeaseState};
use crate::server::AppState;
use crate::store::AuditFilter;

/// The registry's filters, as the form sends them (empty means any).
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    team: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    tier: String,
    #[serde(default)]
    environment: String,
    /// A compliance issue kind (`review_overdue`, `dormant`…).
    #[serde(default)]
    issue: String,
}

fn select(name: &str, label: &str, current: &str, options: &[&str]) -> maud::Markup {
    html! {
        label for=(name) { (label) }
        select id=(name) name=(name) {
            option value="" { "any" }
            @for o in options {
                option value=(o) selected[*o == current] { (o) }
            }
        }
    }
}

/// Who reads the registry (as `GET /v1/agents`).
pub const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];

/// `GET /ui/agents?team=&status=&tier=&environment=&issue=`.
pub async fn list(State(b): State<AppState>, v: Viewer, Query(f): Query<Filters>) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    let agents = match b.store.list_agents(None, None).await {
        Ok(a) => a,
        Err(e) => return broker_error(&v, e.into()),
    };
    let rows = match b.registry_rows(&agents).await {
        Ok(r) => r,
        Err(e) => return broker_error(&v, e),
    };
    let teams: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.team.as_str()).collect();
    let teams: Vec<&str> = teams.into_iter().collect();
    let shown: Vec<_> = rows
        .iter()
        .filter(|r| f.team.is_empty() || r.team == f.team)
        .filter(|r| f.status.is_empty() || r.status == f.status)
        .filter(|r| f.tier.is_empty() || r.risk_tier.to_string() == f.tier)
        .filter(|r| f.environment.is_empty() || r.environment == f.environment)
        .filter(|r| f.issue.is_empty() || r.open_issues.split(' ').any(|i| i == f.issue))
        .collect();
    let body = html! {
        form.filters method="get" action="/ui/agents" {
            (select("team", "Team", &f.team, &teams))
            (select("status", "State", &f.status, &["pending", "active", "suspended", "decommissioned"]))
            (select("tier", "Risk tier", &f.tier, &["1", "2", "3"]))
            (select("environment", "Environment", &f.environment,
                &crate::model::Environment::ALL.iter().map(|e| e.as_str()).collect::<Vec<_>>()))
            (select("issue", "Compliance issue", &f.issue, &[
                "no_sponsor", "sponsor_departed", "review_due", "review_overdue", "dormant",
                "unused_scope", "long_ttl", "credential_expired", "key_rotation_due",
                "ownership_changed", "shared_identity",
            ]))
            button type="submit" { "Filter" }
            a href="/ui/agents" { "Clear" }
        }
        p.count { (shown.len()) " of " (rows.len()) " agents" }
        @if shown.is_empty() {
            p.empty { "No agent matches these filters." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Agent" } th scope="col" { "Team" } th scope="col" { "Sponsor" }
                    th scope="col" { "Tier" } th scope="col" { "Environment" } th scope="col" { "State" }
                    th scope="col" { "Last used" } th scope="col" { "Maturity" } th scope="col" { "Issues" }
                } }
                tbody {
                    @for r in &shown {
                        tr {
                            td { a href={ "/ui/agents/" (urlencode(&r.agent)) } { (r.agent) } }
                            td { (r.team) } td { (r.sponsor) } td { (r.risk_tier) }
                            td { (r.environment) }
                            td { span class={ "state " (r.status) } { (r.status) } }
                            td { @if r.last_used_at.is_empty() { "never" } @else { (r.last_used_at) } }
                            td { (r.maturity) }
                            td { (r.open_issues) }
                        }
                    }
                }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Agents", body))
}

/// How many credentials of each live state an agent's page lists.
const LIVE_SHOWN: u32 = 200;

/// `GET /ui/agents/{id}`.
pub async fn show(State(b): State<AppState>, v: Viewer, Path(id): Path<String>) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    let agent = match b.agent(&id).await {
        Ok(a) => a,
        Err(e) => return broker_error(&v, e),
    };
    let compliance = match b.compliance(&agent).await {
        Ok(c) => c,
        Err(e) => return broker_error(&v, e),
    };
    // Each live state read on its own: an old live credential is not hidden
    // behind many newer ended ones, and one that cannot be revoked
    // (`expiring`) is live until it expires.
    let mut leases = Vec::new();
    for state in [
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::Revoking,
        LeaseState::Expiring,
    ] {
        let filter = LeaseFilter {
            agent: Some(id.clone()),
            state: Some(state),
            limit: Some(LIVE_SHOWN),
            ..LeaseFilter::default()
        };
        match b.store.list_leases(&filter).await {
            Ok(l) => leases.extend(l),
            Err(e) => return broker_error(&v, e.into()),
        }
    }
    let events = if v.has(&[Role::Admin, Role::Auditor]) {
        recent_events(&b, &id).await
    } else {
        Vec::new()
    };
    let body = html! {
        dl.facts {
            dt { "State" } dd { span class={ "state " (agent.status) } { (agent.status) } }
            dt { "Team" } dd { (agent.team) }
            dt { "Sponsor" } dd { (agent.sponsor) }
            dt { "Risk tier" } dd { (agent.risk_tier) }
            dt { "Environment" } dd { (agent.environment) }
            dt { "Purpose" } dd { (agent.purpose) }
            dt { "Authentication" } dd { (agent.auth_method) }
            dt { "Last used" } dd { @match agent.last_used_at { Some(t) => (when(t)), None => "never" } }
            dt { "Last review" } dd { @match agent.last_review_at { Some(t) => (when(t)), None => "never" } }
            dt { "Next review due" } dd { (when(compliance.next_review_due)) }
            dt { "Maturity" } dd { (compliance.maturity.level) }
            @if let Some(u) = &agent.step_up {
                dt { "Step-up" } dd.warn { "Every request needs an approval until incident " (u.incident) " is resolved." }
            }
        }
        h2 { "Permitted scopes" }
        @if compliance.permitted_scopes.is_empty() {
            p.empty { "Policy lets this agent reach no scope." }
        } @else {
            ul { @for s in &compliance.permitted_scopes { li { code { (s.scope) } } } }
        }
        h2 { "Compliance issues" }
        @if compliance.issues.is_empty() {
            p.empty { "None." }
        } @else {
            ul { @for i in &compliance.issues { li { strong { (i.kind) } " " (i.subject) ": " (i.detail) } } }
        }
        h2 { "Live credentials" }
        @if leases.is_empty() {
            p.empty { "None." }
        } @else {
            table {
                thead { tr { th { "Lease" } th { "Scope" } th { "State" } th { "Expires" } th { "Last error" } } }
                tbody { @for l in &leases { tr {
                    td { code { (l.id) } } td { (l.scope) }
                    td { span class={ "state " (l.state) } { (l.state) } }
                    td { (when(l.expires_at)) }
                    td { (l.last_error.as_deref().unwrap_or("")) }
                } } }
            }
        }
        @if !events.is_empty() {
            h2 { "Recent audit events" }
            table {
                thead { tr { th { "#" } th { "When" } th { "Action" } th { "Actor" } th { "Outcome" } } }
                tbody { @for e in &events { tr {
                    td { (e.seq) } td { (when(crate::model::from_unix(e.at_ms / 1000))) }
                    td { code { (e.action) } } td { (e.actor) }
                    td { (e.outcome) @if let Some(r) = &e.reason { ": " (r) } }
                } } }
            }
        }
        @if v.has(&[Role::Admin, Role::Secops]) {
            h2 { "Change its state" }
            form.actions method="post" action={ "/ui/agents/" (urlencode(&agent.id)) "/status" } {
                (v.csrf_field())
                label for="reason" { "Reason (recorded in the audit log)" }
                input id="reason" name="reason" required maxlength="500";
                @if agent.status != AgentStatus::Suspended && agent.status != AgentStatus::Decommissioned {
                    button.danger type="submit" name="action" value="suspend" { "Suspend" }
                }
                @if v.has(&[Role::Admin]) && agent.status == AgentStatus::Suspended {
                    button type="submit" name="action" value="resume" { "Resume" }
                }
                @if v.has(&[Role::Admin]) && agent.status != AgentStatus::Decommissioned {
                    button.danger type="submit" name="action" value="decommission" { "Decommission" }
                }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), &agent.id, body))
}

/// The agent's last 20 audit events, newest first.
async fn recent_events(b: &AppState, id: &str) -> Vec<crate::audit::AuditEvent> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = b
            .store
            .audit_events(&AuditFilter {
                after_seq: after,
                agent: Some(id.to_owned()),
                task: None,
                action: None,
                limit: 10_000,
            })
            .await
            .unwrap_or_default();
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
        // Only the newest are shown: keep memory bounded.
        if all.len() > 1_000 {
            all.drain(..all.len() - 20);
        }
    }
    all.reverse();
    all.truncate(20);
    all
}

#[derive(Deserialize)]
pub struct StatusForm {
    #[serde(default)]
    csrf: String,
    action: String,
    #[serde(default)]
    reason: String,
}

/// `POST /ui/agents/{id}/status`: suspend (admin, secops), resume or
/// decommission (admin), as the API's agent actions.
pub async fn set_status(
    State(b): State<AppState>,
    v: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<StatusForm>,
) -> Response {
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let (to, roles): (AgentStatus, &[Role]) = match f.action.as_str() {
        "suspend" => (AgentStatus::Suspended, &[Role::Admin, Role::Secops]),
        "resume" => (AgentStatus::Active, &[Role::Admin]),
        "decommission" => (AgentStatus::Decommissioned, &[Role::Admin]),
        _ => {
            return super::page::error_page(
                Some(&v),
                StatusCode::BAD_REQUEST,
                "Choose suspend, resume or decommission.",
            );
        }
    };
    if let Err(r) = v.require(roles) {
        return *r;
    }
    let reason = f.reason.trim();
    if reason.is_empty() {
        return super::page::error_page(
            Some(&v),
            StatusCode::BAD_REQUEST,
            "Say why: the reason is recorded in the audit log.",
        );
    }
    match b.set_agent_status(&v.actor(), &id, to, reason).await {
        Ok(_) => Redirect::to(&format!("/ui/agents/{}", urlencode(&id))).into_response(),
        Err(e) => broker_error(&v, e),
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
