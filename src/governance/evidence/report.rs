//! The evidence pack's HTML report: one self-contained page (no external
//! asset), summary first, a chart of credentials per week, then each item.

use std::fmt::Write;

use serde::Serialize;

use crate::governance::evidence::EvidencePack;

/// Rows shown per table; the CSV and JSON files hold them all.
const SHOWN: usize = 500;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn table<T: Serialize>(title: &str, file: &str, rows: &[T]) -> String {
    let mut h = format!(
        "<h2>{}</h2><p class=note>{} rows; all in <code>{file}.csv</code> and <code>{file}.json</code>.</p>",
        esc(title),
        rows.len()
    );
    let values: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    let Some(first) = values.first().and_then(|v| v.as_object()) else {
        h.push_str("<p>None in this period.</p>");
        return h;
    };
    let cols: Vec<&String> = first.keys().collect();
    h.push_str("<table><tr>");
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", esc(c));
    }
    h.push_str("</tr>");
    for v in values.iter().take(SHOWN) {
        h.push_str("<tr>");
        for c in &cols {
            let cell = match &v[c.as_str()] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = write!(h, "<td>{}</td>", esc(&cell));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    if values.len() > SHOWN {
        let _ = write!(h, "<p class=note>first {SHOWN} shown.</p>");
    }
    h
}

/// Bars of credentials issued per ISO week, as inline SVG.
fn chart(weeks: &[(String, usize)]) -> String {
    if weeks.is_empty() {
        return "<p>No credential issued in this period.</p>".into();
    }
    let max = weeks.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let (bar, gap, height) = (28usize, 8usize, 160usize);
    let width = weeks.len() * (bar + gap) + gap;
    let mut s = format!(
        "<svg role=img aria-label='credentials issued per week' width='{width}' height='{}'>",
        height + 40
    );
    for (i, (week, n)) in weeks.iter().enumerate() {
        let h = n * height / max;
        let x = gap + i * (bar + gap);
        let _ = write!(
            s,
            "<rect x='{x}' y='{}' width='{bar}' height='{h}' fill='#3b6ea5'><title>{}: {n}</title></rect>\
             <text x='{}' y='{}' font-size='10' text-anchor='middle'>{n}</text>\
             <text x='{}' y='{}' font-size='9' text-anchor='middle'>{}</text>",
            height - h + 14,
            esc(week),
            x + bar / 2,
            height - h + 10,
            x + bar / 2,
            height + 30,
            esc(week.rsplit('-').next().unwrap_or(week)),
        );
    }
    s.push_str("</svg>");
    s
}

pub fn html(p: &EvidencePack) -> String {
    let s = &p.summary;
    let day = |t: time::OffsetDateTime| t.date().to_string();
    let head = p
        .audit_head
        .as_ref()
        .map_or("empty".to_owned(), |(seq, hash)| {
            format!("event {seq}, {hash}")
        });
    let check = |ok: bool| if ok { "✔" } else { "✘" };
    let ok_class = |ok: bool| if ok { "ok" } else { "bad" };
    let mut h = String::from(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Keygate evidence pack</title><style>\
         body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}\
         td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}th{background:#f1f3f6}\
         .note{color:#666;font-size:12px}.sum td:first-child{font-weight:600}.ok{color:#17823b}.bad{color:#b3261e}\
         </style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>Agent identity evidence, {} to {}</h1><p class=note>Generated {} by Keygate from its store and audit log; audit-chain head {}.</p>",
        day(p.from),
        // `to` is exclusive: the last day covered is the one before.
        day(p.to - time::Duration::seconds(1)),
        esc(&p.generated_at.to_string()),
        esc(&head)
    );
    let _ = write!(
        h,
        "<h2>Summary</h2><table class=sum>\
         <tr><td>Maturity (weakest agent)</td><td>{}</td></tr>\
         <tr><td>Agents (not decommissioned)</td><td>{}</td></tr>\
         <tr><td>Provisioning records</td><td>{} <span class={}>{} {} without approval</span></td></tr>\
         <tr><td>Access reviews</td><td>{} review items, {} decided</td></tr>\
         <tr><td>Review findings</td><td>{} opened, {} closed, {} lifecycle actions</td></tr>\
         <tr><td>Continuous validation incidents</td><td>{} opened, {} resolved</td></tr>\
         <tr><td>Credentials live in the period</td><td>{} ({} still live at generation)</td></tr>\
         <tr><td>Agents deprovisioned</td><td>{} <span class={}>{} {} with every credential confirmed ended</span>, <span class={}>{} {} within the deadline</span></td></tr>\
         <tr><td>Team or sponsor changes</td><td>{} <span class={}>{} {} reviewed by the new owner within the deadline</span></td></tr></table>",
        esc(&s.maturity),
        s.agents,
        s.provisioning_records,
        if s.provisioned_without_approval == 0 {
            "ok"
        } else {
            "bad"
        },
        check(s.provisioned_without_approval == 0),
        s.provisioned_without_approval,
        s.review_items,
        s.review_items_decided,
        s.findings_opened,
        s.findings_closed,
        s.lifecycle_actions,
        s.incidents_opened,
        s.incidents_resolved,
        s.credentials,
        s.credentials_still_live,
        s.deprovisioned,
        if s.deprovisioned_fully_revoked == s.deprovisioned {
            "ok"
        } else {
            "bad"
        },
        check(s.deprovisioned_fully_revoked == s.deprovisioned),
        s.deprovisioned_fully_revoked,
        ok_class(s.deprovisioned_within_deadline == s.deprovisioned),
        check(s.deprovisioned_within_deadline == s.deprovisioned),
        s.deprovisioned_within_deadline,
        s.ownership_changes,
        ok_class(s.ownership_changes_reviewed_in_time == s.ownership_changes),
        check(s.ownership_changes_reviewed_in_time == s.ownership_changes),
        s.ownership_changes_reviewed_in_time,
    );
    h.push_str("<h2>Credentials issued per week</h2>");
    h.push_str(&chart(&s.credentials_per_week));
    h.push_str(&table(
        "1. Agent identity registry",
        "registry",
        &p.registry,
    ));
    h.push_str(&table(
        "2. Provisioning records",
        "provisioning",
        &p.provisioning,
    ));
    h.push_str(&table("3. Access review records", "reviews", &p.reviews));
    h.push_str(&table("4. Credential audit", "credentials", &p.credentials));
    h.push_str(&table(
        "5. Deprovisioning records",
        "deprovisioning",
        &p.deprovisioning,
    ));
    h.push_str("<p class=note>Verify with <code>keygate evidence verify &lt;dir&gt; --db keygate.db</code>.</p></body></html>");
    h
}
