//! `keygate store migrate`: a SQLite deployment moved to PostgreSQL. The
//! source's audit chain is verified first, everything is copied in one
//! transaction, and the copy's chain is verified and must end at the same
//! head.

use std::path::Path;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::store::copy::{CaRevocations, Progress};

pub async fn run(
    from: &str,
    to: &str,
    to_password: Option<&keygate_provider_api::SecretRef>,
    cas: &[String],
) -> anyhow::Result<()> {
    let path = from.strip_prefix("sqlite://").unwrap_or(from);
    if !Path::new(path).is_file() {
        bail!("no SQLite store at `{path}`");
    }
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        bail!("`--to` must be a PostgreSQL store url (postgres://user@host:port/db)");
    }
    let cas = cas
        .iter()
        .map(|c| {
            let (provider, file) = c
                .split_once('=')
                .with_context(|| format!("`--ca-revocations {c}`: give NAME=FILE"))?;
            if !Path::new(file).is_file() {
                bail!("`--ca-revocations {c}`: no file `{file}`");
            }
            Ok(CaRevocations {
                provider: provider.to_owned(),
                file: file.into(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let password = match to_password {
        Some(r) => Some(
            keygate_provider_api::SecretResolver::new()
                .resolve(r)
                .await
                .map_err(|e| anyhow::anyhow!("`--to-password` ({r}) cannot be read: {e}"))?,
        ),
        None => None,
    };

    // The source, brought to the current schema, and held: no broker may
    // write to it while it is copied.
    let source = crate::store::open(&format!("sqlite://{path}")).await?;
    source
        .register_replica("keygate-store-migrate")
        .await
        .context("stop the broker first")?;
    let head = match super::audit::verify_store(source.as_ref()).await? {
        Ok(h) => h,
        Err(b) => bail!(
            "the source's audit chain is broken at event {}: {}; nothing copied",
            b.seq,
            b.problem
        ),
    };
    eprintln!("source: audit chain intact, {} events", head.0);

    // The destination, created and migrated by the engine itself.
    let dest = crate::store::open_with(to, password.as_ref()).await?;
    if dest.audit_head().await?.is_some() {
        bail!("the PostgreSQL store already has an audit log: migrate into a new database");
    }
    let opts = crate::store::postgres_options(to, password.as_ref())?;
    let style = ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let copied = crate::store::copy::sqlite_to_postgres(path, opts, &cas, &mut |p| match p {
        Progress::Table { table, rows } => {
            if let Some(b) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(rows).with_style(style.clone());
            b.set_message(table.to_owned());
            bar = Some(b);
        }
        Progress::Rows { done, .. } => {
            if let Some(b) = &bar {
                b.inc(done);
            }
        }
    })
    .await?;
    if let Some(b) = bar.take() {
        b.finish();
    }

    let copy_head = match super::audit::verify_store(dest.as_ref()).await? {
        Ok(h) => h,
        Err(b) => bail!(
            "the copy's audit chain is broken at event {}: {}",
            b.seq,
            b.problem
        ),
    };
    if copy_head != head {
        bail!(
            "the copy's audit chain ends at event {} ({}), the source's at {} ({})",
            copy_head.0,
            copy_head.1,
            head.0,
            head.1
        );
    }
    let rows: u64 = copied.rows.values().sum();
    println!(
        "copied {rows} rows of {} tables and {} CA revocations; audit chain intact in both, {} events, head {}",
        copied.rows.len(),
        copied.ca_revocations,
        head.0,
        head.1
    );
    println!("now point `store.url` at the PostgreSQL store and start the broker");
    Ok(())
}
