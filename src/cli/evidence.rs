//! `keygate evidence`: writes the auditor's pack (seed 000's five items as
//! CSV and JSON, one self-contained HTML report, a manifest with every
//! file's SHA-256 and the audit-chain head), and verifies one.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use reqwest::Method;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::client::Client;
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
        super::report::html(&pack).into_bytes(),
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
/// audit head is an event of that database's intact chain.
pub async fn verify(pack: &Path, db: Option<&Path>) -> anyhow::Result<()> {
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
        let found = super::audit::verified_hash_at(db, seq).await?;
        if found != hash {
            bail!(
                "the pack's audit head (event {seq}) does not match the database: the log was altered or the pack is from another broker"
            );
        }
        println!("audit chain intact; the pack's head, event {seq}, is in it");
    }
    Ok(())
}
