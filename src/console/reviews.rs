//! Access reviews and the evidence pack: the campaigns, the items assigned
//! to me (by my email; admins and approvers may decide any), attest /
//! narrow / retire under the API's rules, and the evidence pack for a
//! period, downloaded as its self-contained HTML report or as JSON.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use super::agents::urlencode;
use super::page::{Viewer, broker_error, error_page, layout, respond, when};
use crate::config::Role;
use crate::governance::reviews::{DecisionRequest, ReviewFilter, ReviewState, Reviewer, Verdict};
use crate::server::AppState;

/// Who reads campaigns (as `GET /v1/reviews`).
const READERS: &[Role] = &[Role::Admin, Role::Secops, Role::Auditor, Role::Approver];

fn email_of<'a>(b: &'a AppState, v: &Viewer) -> Option<&'a str> {
    b.config
        .operators
        .iter()
        .find(|o| o.name == v.name)
        .and_then(|o| o.email.as_deref())
}

fn may_decide_any(v: &Viewer) -> bool {
    v.has(&[Role::Admin, Role::Approver])
}

/// `GET /ui/reviews`: what waits for me, then the campaigns.
pub async fn list(State(b): State<AppState>, v: Viewer) -> Response {
    let campaigns = match b.review_campaigns().await {
        Ok(c) => c,
        Err(e) => return broker_error(&v, e),
    };
    let open = match b
        .store
        .review_items(&ReviewFilter {
            open_only: true,
            ..ReviewFilter::default()
        })
        .await
    {
        Ok(i) => i,
        Err(e) => return broker_error(&v, e.into()),
    };
    // Each open item with its campaign.
    let open: Vec<_> = open
        .iter()
        .filter_map(|i| {
            campaigns
                .iter()
                .find(|c| c.campaign.id == i.campaign_id)
                .map(|c| (c, i))
        })
        .collect();
    let me = email_of(&b, &v);
    let mine: Vec<_> = open
        .iter()
        .filter(|(_, i)| me.is_some_and(|m| m.eq_ignore_ascii_case(&i.reviewer)))
        .collect();
    let body = html! {
        h2 { "Assigned to me" }
        @if me.is_none() {
            p.empty { "Your operator entry has no email, so no review item is assigned to you." }
        } @else if mine.is_empty() {
            p.empty { "Nothing waits for your review." }
        } @else {
            table {
                thead { tr { th { "Item" } th { "Campaign" } th { "Agent" } th { "Due" } } }
                tbody { @for (c, i) in &mine { tr {
                    td { a href={ "/ui/reviews/items/" (urlencode(&i.id)) } { (i.id) } }
                    td { (c.campaign.name) } td { (i.agent_id) } td { (when(c.campaign.due_at)) }
                } } }
            }
        }
        @if v.has(READERS) {
            h2 { "Campaigns" }
            @if campaigns.is_empty() {
                p.empty { "No campaign yet (`keygate reviews start --name …`)." }
            } @else {
                table {
                    thead { tr { th { "Campaign" } th { "Team" } th { "Due" } th { "Open" } th { "Decided" } } }
                    tbody { @for c in &campaigns { tr {
                        td { (c.campaign.name) }
                        td { (c.campaign.team.as_deref().unwrap_or("every team")) }
                        td { (when(c.campaign.due_at)) }
                        td { (c.open) } td { (c.decided) }
                    } } }
                }
                @if may_decide_any(&v) && !open.is_empty() {
                    h2 { "Open items" }
                    ul { @for (c, i) in &open {
                        li { a href={ "/ui/reviews/items/" (urlencode(&i.id)) } { (i.agent_id) } " (" (c.campaign.name) ", reviewer " (i.reviewer) ")" }
                    } }
                }
            }
        }
        @if v.has(&[Role::Admin, Role::Auditor]) {
            h2 { "Evidence pack" }
            form.filters method="get" action="/ui/evidence" {
                label for="from" { "From (day)" }
                input id="from" type="date" name="from" required;
                label for="to" { "To (day, included)" }
                input id="to" type="date" name="to" required;
                label for="format" { "As" }
                select id="format" name="format" {
                    option value="html" { "the HTML report" }
                    option value="json" { "JSON" }
                }
                button type="submit" { "Download" }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Reviews", body))
}

/// `GET /ui/reviews/items/{id}`: an item, its snapshot and decisions.
pub async fn item(State(b): State<AppState>, v: Viewer, Path(id): Path<String>) -> Response {
    let i = match b.review_item(&id).await {
        Ok(i) => i,
        Err(e) => return broker_error(&v, e),
    };
    let mine = email_of(&b, &v).is_some_and(|m| m.eq_ignore_ascii_case(&i.reviewer));
    let body = html! {
        dl.facts {
            dt { "Agent" } dd { (i.agent_id) }
            dt { "Reviewer" } dd { (i.reviewer) }
            dt { "State" } dd { span class={ "state " (i.state.as_str()) } { (i.state.as_str()) } }
            dt { "Attestations needed" } dd { (i.attestations) }
            @if let Some(t) = i.escalated_at { dt { "Escalated" } dd { (when(t)) } }
            dt { "What was reviewed" } dd { code.text { (serde_json::to_string_pretty(&i.snapshot).unwrap_or_default()) } }
        }
        h2 { "Decisions" }
        @if i.decisions.is_empty() {
            p.empty { "None yet." }
        } @else {
            ul { @for d in &i.decisions { li {
                strong { (d.by) } " " (serde_json::json!(d.decision).as_str().unwrap_or("")) " at " (when(d.at))
                @if !d.scopes.is_empty() { " (" (d.scopes.join(", ")) ")" }
            } } }
        }
        @if i.state == ReviewState::Open && (mine || may_decide_any(&v)) {
            h2 { "Decide" }
            form.actions method="post" action={ "/ui/reviews/items/" (urlencode(&i.id)) "/decision" } {
                (v.csrf_field())
                label for="scopes" { "Scopes to remove (narrow)" }
                input id="scopes" name="scopes" maxlength="1000" placeholder="scope-a scope-b";
                label for="note" { "Note" }
                input id="note" name="note" maxlength="500";
                button type="submit" name="decision" value="attest" { "Attest" }
                button type="submit" name="decision" value="narrow" { "Narrow" }
                button.danger type="submit" name="decision" value="retire" { "Retire" }
            }
        }
    };
    respond(StatusCode::OK, layout(Some(&v), "Review item", body))
}

#[derive(Deserialize)]
pub struct ItemForm {
    #[serde(default)]
    csrf: String,
    decision: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    note: String,
}

/// `POST /ui/reviews/items/{id}/decision`.
pub async fn decide(
    State(b): State<AppState>,
    v: Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<ItemForm>,
) -> Response {
    if let Err(r) = v.check_form(&headers, &f.csrf) {
        return *r;
    }
    let decision = match f.decision.as_str() {
        "attest" => Verdict::Attest,
        "narrow" => Verdict::Narrow,
        "retire" => Verdict::Retire,
        _ => {
            return error_page(
                Some(&v),
                StatusCode::BAD_REQUEST,
                "Choose attest, narrow or retire.",
            );
        }
    };
    let req = DecisionRequest {
        decision,
        scopes: f
            .scopes
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        note: f.note.trim().to_owned(),
    };
    let who = Reviewer {
        operator: v.name.clone(),
        any_item: may_decide_any(&v),
    };
    match b.decide_review(&who, &id, req).await {
        Ok(_) => Redirect::to(&format!("/ui/reviews/items/{}", urlencode(&id))).into_response(),
        Err(e) => broker_error(&v, e),
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct EvidenceQuery {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    format: String,
}

/// `GET /ui/evidence?from=&to=&format=html|json`: the pack, as a download.
pub async fn evidence(
    State(b): State<AppState>,
    v: Viewer,
    Query(q): Query<EvidenceQuery>,
) -> Response {
    if let Err(r) = v.require(&[Role::Admin, Role::Auditor]) {
        return *r;
    }
    use crate::governance::evidence::{parse_instant, report};
    let (Some(from), Some(to)) = (parse_instant(&q.from, false), parse_instant(&q.to, true)) else {
        return error_page(
            Some(&v),
            StatusCode::BAD_REQUEST,
            "Give the period as two days (2026-10-01).",
        );
    };
    if from >= to {
        return error_page(
            Some(&v),
            StatusCode::BAD_REQUEST,
            "`from` must be before `to`.",
        );
    }
    let pack = match b.evidence(from, to).await {
        Ok(p) => p,
        Err(e) => return broker_error(&v, e),
    };
    let name = format!("keygate-evidence-{}-{}", q.from, q.to)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_".contains(*c))
        .collect::<String>();
    let (kind, ext, body) = if q.format == "json" {
        (
            "application/json",
            "json",
            serde_json::to_string_pretty(&pack).unwrap_or_default(),
        )
    } else {
        ("text/html; charset=utf-8", "html", report::html(&pack))
    };
    (
        [
            (header::CONTENT_TYPE, kind.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{ext}\""),
            ),
        ],
        body,
    )
        .into_response()
}
