//! `keygate evidence`: writes the auditor's pack (seed 000's five items as
//! CSV and JSON, one self-contained HTML report, a manifest with every
//! file's SHA-256 and the audit-chain head), and verifies one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use reqwest::Method;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::client::Client;
use crate::audit::AuditEvent;
use crate::governance::evidence::EvidencePack;

const ITEMS: [&str; 5] = [
    "registry",
    "provisioning",
    "reviews",
    "credentials",
    "deprovisioning",
];

fn csv_of<T: Serialize>(rows: &[T]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(w.into_inner()?)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fetches the pack for the period and writes it under `out`.
pub async fn write(c: &Client, from: &str, to: &str, out: &Path) -> anyhow::Result<()> {
    let pack: EvidencePack = c
        .send(
            c.request(Method::GET, "/v1/evidence")
                .query(&[("from", from), ("to", to)]),
        )
        .await?
        .json()
        .await?;
    std::fs::create_dir_all(out).with_context(|| format!("creating `{}`", out.display()))?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    macro_rules! item {
        ($name:literal, $rows:expr) => {
            files.insert(format!("{}.csv", $name), csv_of(&$rows)?);
            files.insert(
                format!("{}.json", $name),
                serde_json::to_vec_pretty(&$rows)?,
            );
        };
    }
    item!("registry", pack.registry);
    item!("provisioning", pack.provisioning);
    item!("reviews", pack.reviews);
    item!("credentials", pack.credentials);
    item!("deprovisioning", pack.deprovisioning);
    files.insert(
        "summary.json".into(),
        serde_json::to_vec_pretty(&pack.summary)?,
    );
    files.insert(
        "report.html".into(),
        crate::governance::evidence::report::html(&pack).into_bytes(),
    );
    for (name, bytes) in &files {
        std::fs::write(out.join(name), bytes)
            .with_context(|| format!("writing `{}`", out.join(name).display()))?;
    }
    let manifest = serde_json::json!({
        "from": pack.from.unix_timestamp(),
        "to": pack.to.unix_timestamp(),
        "generated_at": pack.generated_at.unix_timestamp(),
        "audit_head": pack.audit_head.as_ref().map(|(seq, hash)| serde_json::json!({ "seq": seq, "hash": hash })),
        "files": files.iter().map(|(n, b)| (n.clone(), sha256(b))).collect::<BTreeMap<_, _>>(),
    });
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    eprintln!(
        "evidence pack written to {} ({} files; {} agents, {} credentials, {} deprovisioned; maturity {})",
        out.display(),
        files.len() + 1,
        pack.summary.agents,
        pack.summary.credentials,
        pack.summary.deprovisioned,
        pack.summary.maturity
    );
    Ok(())
}

/// Checks every file against the manifest, and with `db` that the pack's
/// audit head is an event of that database's intact chain and that every
/// record of the five items is traced to events at or before that head.
pub async fn verify(pack: &Path, db: Option<&super::OfflineStore>) -> anyhow::Result<()> {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pack.join("manifest.json"))
            .with_context(|| format!("reading `{}`", pack.join("manifest.json").display()))?,
    )?;
    let files = manifest["files"]
        .as_object()
        .context("manifest.json has no `files`")?;
    for item in ITEMS {
        for ext in ["csv", "json"] {
            if !files.contains_key(&format!("{item}.{ext}")) {
                bail!("the manifest lacks `{item}.{ext}`");
            }
        }
    }
    let mut problems = Vec::new();
    for (name, want) in files {
        if name.contains('/') || name.starts_with('.') {
            bail!("the manifest names `{name}`, outside the pack");
        }
        match std::fs::read(pack.join(name)) {
            Ok(bytes) if Some(sha256(&bytes).as_str()) == want.as_str() => {}
            Ok(_) => problems.push(format!("`{name}` was changed (its SHA-256 differs)")),
            Err(e) => problems.push(format!("`{name}`: {e}")),
        }
    }
    if !problems.is_empty() {
        bail!("evidence pack NOT intact:\n  {}", problems.join("\n  "));
    }
    println!(
        "evidence pack intact: {} files match the manifest",
        files.len()
    );
    if let Some(db) = db {
        let head = &manifest["audit_head"];
        let (Some(seq), Some(hash)) = (head["seq"].as_i64(), head["hash"].as_str()) else {
            bail!("the manifest has no audit head to check");
        };
        let mut log = Log::default();
        let found = super::audit::verified_hash_at(db, seq, &mut |e| log.add(e)).await?;
        if found != hash {
            bail!(
                "the pack's audit head (event {seq}) does not match the database: the log was altered or the pack is from another broker"
            );
        }
        println!("audit chain intact; the pack's head, event {seq}, is in it");
        let (traced, problems) = log.trace(pack)?;
        if !problems.is_empty() {
            let shown: Vec<&String> = problems.iter().take(20).collect();
            bail!(
                "{} record(s) of the pack are not in the audit log up to its head:\n  {}{}",
                problems.len(),
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  "),
                if problems.len() > shown.len() {
                    "\n  …"
                } else {
                    ""
                }
            );
        }
        println!("every record traced to the audit log: {traced} records");
    }
    Ok(())
}

/// What the audit log (up to a pack's head) says happened, indexed by what
/// the pack's records name.
#[derive(Default)]
struct Log {
    registered: HashSet<String>,
    /// lease → (agent, task, scope) of its `lease.issued`.
    issued: HashMap<String, (String, String, String)>,
    /// Leases with an event after their issue (released, revoked, expired).
    ended: HashSet<String>,
    /// approval → agent of its `approval.requested`.
    requested: HashMap<String, String>,
    /// approval or review item → the actors who decided it.
    deciders: HashMap<String, HashSet<String>>,
    /// finding → (agent, kind) of its `governance.finding_opened`.
    findings: HashMap<String, (String, String)>,
    /// review item → agent of its `review.item_opened`.
    items: HashMap<String, String>,
    /// (agent, actor) of `agent.decommissioned` and of `agent.updated`
    /// events that changed team or sponsor.
    decommissioned: HashSet<(String, String)>,
    owner_changes: HashSet<(String, String)>,
}

impl Log {
    fn add(&mut self, e: &AuditEvent) {
        let agent = e.agent.clone().unwrap_or_default();
        let detail = |k: &str| e.details[k].as_str().map(str::to_owned);
        match e.action.as_str() {
            "agent.registered" => {
                self.registered.insert(agent);
            }
            "lease.issued" => {
                if let Some(l) = &e.lease {
                    let task = e.task.clone().unwrap_or_default();
                    let scope = e.scope.clone().unwrap_or_default();
                    self.issued.insert(l.clone(), (agent, task, scope));
                }
            }
            "lease.released" | "lease.revoked" | "lease.expired" | "lease.ttl_reached"
            | "lease.orphaned" => {
                if let Some(l) = &e.lease {
                    self.ended.insert(l.clone());
                }
            }
            "approval.requested" => {
                if let Some(a) = detail("approval") {
                    self.requested.insert(a, agent);
                }
            }
            "approval.decision" => {
                if let Some(a) = detail("approval") {
                    self.deciders.entry(a).or_default().insert(e.actor.clone());
                }
            }
            "governance.finding_opened" => {
                if let (Some(f), Some(k)) = (detail("finding"), detail("kind")) {
                    self.findings.insert(f, (agent, k));
                }
            }
            "review.item_opened" => {
                if let Some(i) = detail("item") {
                    self.items.insert(i, agent);
                }
            }
            a if a.starts_with("review.") => {
                if let Some(i) = detail("item") {
                    self.deciders.entry(i).or_default().insert(e.actor.clone());
                }
            }
            "agent.decommissioned" => {
                self.decommissioned.insert((agent, e.actor.clone()));
            }
            "agent.updated" if e.details["ownership"].is_object() => {
                self.owner_changes.insert((agent, e.actor.clone()));
            }
            _ => {}
        }
    }

    fn decided(&self, id: &str, names: &str) -> Option<String> {
        let by = self.deciders.get(id);
        names
            .split_whitespace()
            .find(|n| by.is_none_or(|b| !b.contains(&format!("operator:{n}"))))
            .map(|n| format!("no decision by `{n}` on `{id}`"))
    }

    /// Checks every record of the pack's JSON items against the log: how
    /// many records it checked, and those it could not trace.
    fn trace(&self, pack: &Path) -> anyhow::Result<(usize, Vec<String>)> {
        let read = |item: &str| -> anyhow::Result<Vec<serde_json::Value>> {
            let path = pack.join(format!("{item}.json"));
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading `{}`", path.display()))?;
            serde_json::from_slice(&bytes)
                .with_context(|| format!("`{item}.json` is not a JSON list"))
        };
        let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        let (mut n, mut problems) = (0, Vec::new());
        let mut check = |item: &str, why: Option<String>| {
            n += 1;
            if let Some(why) = why {
                problems.push(format!("{item}.json: {why}"));
            }
        };
        for r in read("registry")? {
            let a = s(&r, "agent");
            let why = (!self.registered.contains(&a))
                .then(|| format!("agent `{a}` has no `agent.registered` event"));
            check("registry", why);
        }
        for r in read("provisioning")? {
            let (a, ap) = (s(&r, "agent"), s(&r, "approval"));
            let why = if ap.is_empty() {
                (!self.registered.contains(&a))
                    .then(|| format!("agent `{a}` has no `agent.registered` event"))
            } else if self.requested.get(&ap) != Some(&a) {
                Some(format!(
                    "approval `{ap}` for agent `{a}` has no `approval.requested` event"
                ))
            } else {
                self.decided(&ap, &s(&r, "approved_by"))
            };
            check("provisioning", why);
        }
        for r in read("reviews")? {
            let (id, a, kind) = (s(&r, "id"), s(&r, "agent"), s(&r, "kind"));
            let why = if kind == "review_item" {
                if self.items.get(&id) != Some(&a) {
                    Some(format!(
                        "review item `{id}` of agent `{a}` has no `review.item_opened` event"
                    ))
                } else {
                    self.decided(&id, &s(&r, "decided_by"))
                }
            } else {
                (self.findings.get(&id) != Some(&(a.clone(), kind.clone()))).then(|| {
                    format!("finding `{id}` ({kind} of agent `{a}`) has no `governance.finding_opened` event")
                })
            };
            check("reviews", why);
        }
        for r in read("credentials")? {
            let l = s(&r, "lease");
            let want = (s(&r, "agent"), s(&r, "task"), s(&r, "scope"));
            let why = if self.issued.get(&l) != Some(&want) {
                Some(format!(
                    "lease `{l}` ({} of agent `{}`) has no matching `lease.issued` event",
                    want.2, want.0
                ))
            } else if matches!(s(&r, "state").as_str(), "revoked" | "expired")
                && !self.ended.contains(&l)
            {
                Some(format!(
                    "lease `{l}` is {} but the log never says it ended",
                    s(&r, "state")
                ))
            } else {
                None
            };
            check("credentials", why);
        }
        for r in read("deprovisioning")? {
            let key = (s(&r, "agent"), s(&r, "by"));
            let (set, action) = if s(&r, "kind") == "ownership_change" {
                (&self.owner_changes, "agent.updated (team or sponsor)")
            } else {
                (&self.decommissioned, "agent.decommissioned")
            };
            let why = (!set.contains(&key))
                .then(|| format!("agent `{}` has no `{action}` event by `{}`", key.0, key.1));
            check("deprovisioning", why);
        }
        Ok((n, problems))
    }
}
