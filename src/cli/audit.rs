//! `keygate audit`: tail and verify the hash chain, over HTTP or straight
//! from a database file (so an auditor need not trust the server).

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use reqwest::Method;

use super::client::Client;
use crate::audit::{AuditEvent, GENESIS_HASH, verify_chain};
use crate::store::AuditFilter;

const PAGE: u32 = 5000;

async fn page(c: &Client, after: i64, extra: &[(&str, String)]) -> anyhow::Result<Vec<AuditEvent>> {
    let mut q: Vec<(&str, String)> =
        vec![("after", after.to_string()), ("limit", PAGE.to_string())];
    q.extend(extra.iter().cloned());
    let text = c
        .send(c.request(Method::GET, "/v1/audit").query(&q))
        .await?
        .text()
        .await?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).map_err(anyhow::Error::from))
        .collect()
}

fn report(result: Result<(i64, String), crate::audit::BrokenLink>) -> anyhow::Result<()> {
    match result {
        Ok((n, head)) => {
            println!("audit chain intact: {n} events, head {head}");
            Ok(())
        }
        Err(b) => bail!("audit chain broken at event {}: {}", b.seq, b.problem),
    }
}

pub async fn verify_remote(c: &Client) -> anyhow::Result<()> {
    let (mut seq, mut hash) = (0, GENESIS_HASH.to_owned());
    loop {
        let evs = page(c, seq, &[]).await?;
        if evs.is_empty() {
            return report(Ok((seq, hash)));
        }
        match verify_chain(&evs, seq, hash) {
            Ok((s, h)) => (seq, hash) = (s, h),
            Err(b) => return report(Err(b)),
        }
    }
}

impl super::OfflineStore {
    /// Opens the store it names; a file that is not there is an error (it
    /// would otherwise be created empty).
    pub async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn crate::store::Store>> {
        let Some(location) = &self.location else {
            bail!("no store given (`--db`)");
        };
        let url = if location.contains("://") {
            location.clone()
        } else {
            format!("sqlite://{location}")
        };
        if let Some(path) = url.strip_prefix("sqlite://")
            && !Path::new(path).exists()
        {
            bail!("no database at `{path}`");
        }
        let password = match &self.password {
            Some(r) => Some(
                keygate_provider_api::SecretResolver::new()
                    .resolve(r)
                    .await
                    .map_err(|e| anyhow::anyhow!("`--db-password` ({r}) cannot be read: {e}"))?,
            ),
            None => None,
        };
        Ok(crate::store::open_with(&url, password.as_ref()).await?)
    }
}

/// Walks the whole chain in the store `db`: `Ok((last seq, head hash, hash
/// of event `at`))`, or the first broken link. Events up to `at` that
/// `keep` selects are handed to it as they pass.
async fn walk_db(
    db: &super::OfflineStore,
    at: Option<i64>,
    keep: &mut dyn FnMut(&AuditEvent),
) -> anyhow::Result<Result<(i64, String, Option<String>), crate::audit::BrokenLink>> {
    walk_store(db.open().await?.as_ref(), at, keep).await
}

/// The whole chain in `store` verified: its last seq and head hash, or the
/// first broken link.
pub async fn verify_store(
    store: &dyn crate::store::Store,
) -> anyhow::Result<Result<(i64, String), crate::audit::BrokenLink>> {
    Ok(walk_store(store, None, &mut |_| {})
        .await?
        .map(|(seq, hash, _)| (seq, hash)))
}

async fn walk_store(
    store: &dyn crate::store::Store,
    at: Option<i64>,
    keep: &mut dyn FnMut(&AuditEvent),
) -> anyhow::Result<Result<(i64, String, Option<String>), crate::audit::BrokenLink>> {
    let (mut seq, mut hash, mut found) = (0, GENESIS_HASH.to_owned(), None);
    loop {
        let f = AuditFilter {
            after_seq: seq,
            limit: PAGE,
            ..Default::default()
        };
        let evs = store.audit_events(&f).await?;
        if evs.is_empty() {
            return Ok(Ok((seq, hash, found)));
        }
        if let Some(e) = at.and_then(|at| evs.iter().find(|e| e.seq == at)) {
            found = Some(e.hash.clone());
        }
        for e in evs.iter().filter(|e| at.is_none_or(|at| e.seq <= at)) {
            keep(e);
        }
        match verify_chain(&evs, seq, hash) {
            Ok((s, h)) => (seq, hash) = (s, h),
            Err(b) => return Ok(Err(b)),
        }
    }
}

pub async fn verify_db(db: &super::OfflineStore) -> anyhow::Result<()> {
    report(
        walk_db(db, None, &mut |_| {})
            .await?
            .map(|(seq, hash, _)| (seq, hash)),
    )
}

/// Verifies the whole chain in the database at `path` and returns the hash
/// of event `at` (an evidence pack's head), or an error naming the break;
/// `keep` sees every event up to `at`.
pub async fn verified_hash_at(
    db: &super::OfflineStore,
    at: i64,
    keep: &mut dyn FnMut(&AuditEvent),
) -> anyhow::Result<String> {
    match walk_db(db, Some(at), keep).await? {
        Ok((_, _, Some(hash))) => Ok(hash),
        Ok((_, _, None)) => bail!("the audit log has no event {at}"),
        Err(b) => bail!("audit chain broken at event {}: {}", b.seq, b.problem),
    }
}

pub async fn tail(
    c: &Client,
    agent: Option<String>,
    task: Option<String>,
    action: Option<String>,
    follow: bool,
) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    for (k, v) in [("agent", agent), ("task", task), ("action", action)] {
        if let Some(v) = v {
            extra.push((k, v));
        }
    }
    use std::io::Write;
    let mut after = 0;
    loop {
        let evs = page(c, after, &extra).await?;
        let mut out = std::io::stdout().lock();
        for ev in &evs {
            if writeln!(out, "{}", serde_json::to_string(ev)?).is_err() {
                // The reader went away (`| head`): stop quietly.
                return Ok(());
            }
            after = ev.seq;
        }
        drop(out);
        if evs.is_empty() {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
