//! Live credentials and the kill switch: live and `revoking` leases with
//! their errors, fences, and the emergency revocation by agent, team,
//! provider or everything, with a confirmation that names what will be
//! revoked, then its progress until every lease is confirmed.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::agents::urlencode;
use super::page::{Viewer, broker_error, error_page, layout, layout_refreshing, respond, when};
use crate::broker::RevocationRequest;
use crate::config::Role;
use crate::model::{FenceFilter, LeaseFilter, LeaseState};
use crate::server::AppState;

const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor];
const SWITCHERS: &[Role] = &[Role::Admin, Role::Secops];

fn lease_table(leases: &[crate::model::Lease]) -> Markup {
    html! {
        table {
            thead { tr {
                th scope="col" { "Lease" } th scope="col" { "Agent" } th scope="col" { "Scope" }
                th scope="col" { "Provider" } th scope="col" { "State" } th scope="col" { "Expires" }
                th scope="col" { "Attempts" } th scope="col" { "Last error" }
            } }
            tbody { @for l in leases { tr {
                td { code { (l.id) } }
                td { a href={ "/ui/agents/" (urlencode(&l.agent_id)) } { (l.agent_id) } }
                td { (l.scope) } td { (l.provider) }
                td { span class={ "state " (l.state) } { (l.state) } }
                td { (when(l.expires_at)) }
                td { (l.attempts) }
                td.text { (l.last_error.as_deref().unwrap_or("")) }
            } } }
        }
    }
}

/// How many leases of each state the page lists (the newest).
const SHOWN: u32 = 500;

/// `GET /ui/leases`: what is live (active, expiring, being issued), what
/// is being revoked, and the fences.
pub async fn list(State(b): State<AppState>, v: Viewer) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    let of = |state| LeaseFilter {
        state: Some(state),
        limit: Some(SHOWN),
        ..LeaseFilter::default()
    };
    let (revoking, active, expiring, pending, fences) = match async {
        Ok::<_, crate::broker::BrokerError>((
            b.store.list_leases(&of(LeaseState::Revoking)).await?,
            b.store.list_leases(&of(LeaseState::Active)).await?,
            b.store.list_leases(&of(LeaseState::Expiring)).await?,
            b.store.list_leases(&of(LeaseState::Pending)).await?,
            b.fences(&FenceFilter {
                active: true,
                ..FenceFilter::default()
            })
            .await?,
        ))
    }
    .await
    {
        Ok(x) => x,
        Err(e) => return broker_error(&v, e),
    };
    let more = |list: &[crate::model::Lease], state: &str| {
        html! {
            @if list.len() >= SHOWN as usize {
                p.more { "The newest " (SHOWN) " are shown: "
                    code { "keygate leases list --all --state " (state) } " lists them all." }
            }
        }
    };
    let body = html! {
        h2 { "Being revoked" }
        @if revoking.is_empty() {
            p.empty { "Nothing is waiting for its provider to confirm a revocation." }
        } @else {
            (lease_table(&revoking))
            (more(&revoking, "revoking"))
        }
        h2 { "Active" }
        @if active.is_empty() {
            p.empty { "No credential is active." }
        } @else {
            (lease_table(&active))
            (more(&active, "active"))
        }
        h2 { "Expiring" }
        p { "Released or revoked, but their backend cannot end them: they work until they expire." }
        @if expiring.is_empty() {
            p.empty { "None." }
        } @else {
            (lease_table(&expiring))
            (more(&expiring, "expiring"))
        }
        h2 { "Being issued" }
        @if pending.is_empty() {
            p.empty { "None." }
        } @else {
            (lease_table(&pending))
            (more(&pending, "pending"))
        }
        h2 { "Standing fences" }
        @if fences.is_empty() {
            p.empty { "No fence stands." }
        } @else {
            table {
                thead { tr { th { "Fence" } th { "Provider" } th { "Target" } th { "What it does" } th { "Since" } } }
                tbody { @for f in &fences { tr {
                    td { code { (f.id) } } td { (f.provider) } td { code { (f.target) } }
                    td.text { (f.description) } td { (when(f.created_at)) }
                } } }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Leases", body))
}

/// The kill switch's form, filled in with `f`.
fn kill_fields(v: &Viewer, f: &KillForm, confirm: bool) -> Markup {
    html! {
        (v.csrf_field())
        fieldset {
            legend { "Revoke every live credential of" }
            @for (value, label) in [("agent", "one agent"), ("team", "a team"), ("provider", "a provider"), ("all", "every agent")] {
                label.choice {
                    input type="radio" name="by" value=(value) checked[f.by == value] required disabled[confirm];
                    (label)
                }
            }
            label for="target" { "Agent, team or provider" }
            input id="target" name="target" value=(f.target) maxlength="200" readonly[confirm];
            label for="reason" { "Reason (recorded in the audit log)" }
            input id="reason" name="reason" value=(f.reason) required maxlength="500" readonly[confirm];
            label.choice {
                input type="checkbox" name="suspend" value="true" checked[f.suspend] disabled[confirm];
                "Also suspend the agents (agent and team only), so they cannot open new tasks"
            }
        }
        @if confirm {
            // Disabled inputs are not sent: the choices travel hidden.
            input type="hidden" name="by" value=(f.by);
            @if f.suspend { input type="hidden" name="suspend" value="true"; }
        }
    }
}

/// `GET /ui/kill`.
pub async fn kill_form(v: Viewer) -> Response {
    if let Err(r) = v.require(SWITCHERS) {
        return *r;
    }
    let body = html! {
        p { "The kill switch ends the selected tasks at once (their session tokens stop working) and revokes their credentials at the provider. You confirm on the next page, which names what will be revoked." }
        form.kill method="post" action="/ui/kill" {
            (kill_fields(&v, &KillForm::default(), false))
            button type="submit" { "Show what this revokes" }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Kill switch", body))
}

#[derive(Debug, Default, Deserialize)]
pub struct KillForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    by: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    suspend: bool,
}

impl KillForm {
    fn request(&self) -> Result<RevocationRequest, &'static str> {
        let target = self.target.trim().to_owned();
        let mut req = RevocationRequest {
            reason: Some(self.reason.trim().to_owned()).filter(|r| !r.is_empty()),
            suspend: self.suspend,
            // Answer at once; the progress page follows the queue.
            wait: Some(0),
            ..RevocationRequest::default()
        };
        if req.reason.is_none() {
            return Err("Say why: the reason is recorded in the audit log.");
        }
        match self.by.as_str() {
            "all" => req.all = true,
            by if target.is_empty() => {
                let _ = by;
                return Err("Name the agent, team or provider.");
            }
            "agent" => req.agent = Some(target),
            "team" => req.team = Some(target),
            "provider" => req.provider = Some(target),
            _ => return Err("Choose an agent, a team, a provider or every agent."),
        }
        if req.suspend && (req.provider.is_some() || req.all) {
            return Err("Suspending applies to an agent or a team only.");
        }
        Ok(req)
    }
}

/// `POST /ui/kill`: what the switch would revoke, and the confirmation.
pub async fn kill_preview(
    State(b): State<AppState>,
    v: Viewer,
    headers: HeaderMap,
    Form(f): Form<KillForm>,
) -> Response {
    if let Err(r) = v.require(SWITCHERS) {
        return *r;
    }
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let selector = match f
        .request()
        .map_err(str::to_owned)
        .and_then(|r| r.selector().map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(m) => return error_page(Some(&v), StatusCode::BAD_REQUEST, &m),
    };
    let crate::broker::RevocationPreview {
        leases,
        tasks,
        agents,
    } = match b.revocation_preview(&selector).await {
        Ok(p) => p,
        Err(e) => return broker_error(&v, e),
    };
    let shown = &leases[..leases.len().min(SHOWN as usize)];
    let body = html! {
        p.warn role="alert" {
            "This revokes " strong { (leases.len()) " live credential" @if leases.len() != 1 { "s" } }
            " of " strong { (agents.len()) " agent" @if agents.len() != 1 { "s" } }
            " (" (selector) ") and ends " strong { (tasks) " open task" @if tasks != 1 { "s" } }
            ", with every credential of those tasks and of the tasks they delegated."
            @if f.suspend { " The agents are also suspended." }
        }
        @if !agents.is_empty() {
            p { "Agents: " @for (i, a) in agents.iter().take(50).enumerate() {
                @if i > 0 { ", " }
                a href={ "/ui/agents/" (urlencode(a)) } { (a) }
            } @if agents.len() > 50 { " and " (agents.len() - 50) " more" } }
        }
        @if !leases.is_empty() { (lease_table(shown)) }
        @if leases.len() > shown.len() {
            p.more { "The first " (shown.len()) " of " (leases.len()) " are listed." }
        }
        form.kill method="post" action="/ui/kill/confirm" {
            (kill_fields(&v, &f, true))
            button.danger type="submit" { "Revoke now" }
            a href="/ui/kill" { "Cancel" }
        }
    };
    respond(
        StatusCode::OK,
        layout(Some(&v), "Confirm the kill switch", body),
    )
}

/// `POST /ui/kill/confirm`: pulls the switch, then shows its progress.
pub async fn kill(
    State(b): State<AppState>,
    v: Viewer,
    headers: HeaderMap,
    Form(f): Form<KillForm>,
) -> Response {
    if let Err(r) = v.require(SWITCHERS) {
        return *r;
    }
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let req = match f.request() {
        Ok(r) => r,
        Err(m) => return error_page(Some(&v), StatusCode::BAD_REQUEST, m),
    };
    match b.revoke(&v.name, req).await {
        Ok(report) => Redirect::to(&format!(
            "/ui/revocations/{}",
            urlencode(&report.revocation_id)
        ))
        .into_response(),
        Err(e) => broker_error(&v, e),
    }
}

/// `GET /ui/revocations/{id}`: refreshes itself until every lease is
/// confirmed (no script: a `refresh` meta tag).
pub async fn progress(State(b): State<AppState>, v: Viewer, Path(id): Path<String>) -> Response {
    if let Err(r) = v.require(READERS) {
        return *r;
    }
    let r = match b.revocation_status(&id, 0).await {
        Ok(r) => r,
        Err(e) => return broker_error(&v, e),
    };
    let p = &r.leases;
    let done = p.pending == 0;
    let body = html! {
        dl.facts {
            dt { "Revocation" } dd { code { (r.revocation_id) } }
            dt { "Selected" } dd { (r.selector) }
            dt { "Reason" } dd.text { (r.reason) }
            dt { "Tasks ended" } dd { (r.tasks_ended) }
            dt { "Agents suspended" } dd { (r.agents_suspended) }
        }
        progress max=(p.found.max(1)) value=(p.revoked + p.expiring) {}
        p.status role="status" {
            @if done {
                @if p.expiring == 0 {
                    strong { "All revoked" } ": " (p.revoked) " of " (p.found) " confirmed by their providers."
                } @else {
                    strong { "All ended" } ": " (p.revoked) " revoked, " (p.expiring) " cannot be revoked and live until they expire."
                }
            } @else {
                (p.revoked) " of " (p.found) " confirmed; " (p.pending) " waiting for their provider. This page refreshes every second."
            }
        }
        @if !r.fences.is_empty() {
            h2 { "Fences put up" }
            ul { @for f in &r.fences { li { code { (f.id) } ": " (f.description) } } }
        }
        @if !r.fence_failures.is_empty() {
            p.error { "Some fences could not be put up (see the audit log); pulling the switch again retries them." }
        }
        p { a href="/ui/leases" { "All live credentials" } }
    };
    let page = if done {
        layout(Some(&v), "Kill switch progress", body)
    } else {
        layout_refreshing(Some(&v), "Kill switch progress", body, 1)
    };
    respond(StatusCode::OK, page)
}
