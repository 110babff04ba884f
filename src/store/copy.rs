//! Copying a SQLite store into a fresh PostgreSQL one (`keygate store
//! migrate`): every table and every row, the audit chain as it is (same
//! sequence numbers, same hashes), in one PostgreSQL transaction, so the
//! copy is whole or nothing.
//!
//! The copy is driven by the two schemas, not a list kept by hand: every
//! SQLite table must exist in PostgreSQL with every one of its columns (a
//! column the copy could not place is an error, never a silent drop), and
//! each value is converted to the PostgreSQL column's type. Tables go in
//! foreign-key order, rows in insertion order (a task's parent first).

use std::collections::{BTreeMap, BTreeSet};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, Column, ConnectOptions, Connection, QueryBuilder, Row};

use super::{StoreError, StoreResult};

/// The revocation list of a local CA, copied into the shared table.
pub struct CaRevocations {
    /// The provider instance's name in config.
    pub provider: String,
    /// Its `revocation_file` (JSON lines).
    pub file: std::path::PathBuf,
}

/// What was copied, table by table.
#[derive(Debug, Default)]
pub struct Copied {
    pub rows: BTreeMap<String, u64>,
    pub ca_revocations: u64,
}

/// Rows per INSERT.
const BATCH: usize = 500;

/// Copies the SQLite store at `from` into the (migrated, empty) PostgreSQL
/// store `to`. `progress` is told each table's size, then every batch.
pub async fn sqlite_to_postgres(
    from: &str,
    to: PgConnectOptions,
    cas: &[CaRevocations],
    progress: &mut dyn FnMut(Progress<'_>),
) -> StoreResult<Copied> {
    let mut src = SqliteConnectOptions::new()
        .filename(from)
        .read_only(true)
        .connect()
        .await?;
    let mut dst = PgConnection::connect_with(&to).await?;
    let tables = sqlite_tables(&mut src).await?;
    let pg_columns = pg_columns(&mut dst).await?;
    let order = fk_order(&mut dst, &tables).await?;
    let mut tx = dst.begin().await?;
    let mut copied = Copied::default();
    for table in &order {
        let types = pg_columns.get(table).ok_or_else(|| {
            StoreError::Invalid(format!(
                "table `{table}` of the SQLite store has no place in PostgreSQL"
            ))
        })?;
        let any: Option<i64> =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT 1 FROM \"{table}\" LIMIT 1")))
                .fetch_optional(&mut *tx)
                .await?;
        if any.is_some() {
            return Err(StoreError::Invalid(format!(
                "the PostgreSQL store is not empty (table `{table}` has rows): migrate into a new database"
            )));
        }
        let total: i64 =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM \"{table}\"")))
                .fetch_one(&mut src)
                .await?;
        progress(Progress::Table {
            table,
            rows: total as u64,
        });
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM \"{table}\" ORDER BY rowid"
        )))
        .fetch_all(&mut src)
        .await?;
        let Some(first) = rows.first() else {
            copied.rows.insert(table.clone(), 0);
            continue;
        };
        let columns: Vec<String> = first
            .columns()
            .iter()
            .map(|c| plain(c.name()).map(str::to_owned))
            .collect::<StoreResult<_>>()?;
        let mut kinds = Vec::with_capacity(columns.len());
        for c in &columns {
            kinds.push(*types.get(c).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "column `{table}.{c}` of the SQLite store has no place in PostgreSQL"
                ))
            })?);
        }
        for chunk in rows.chunks(BATCH) {
            let mut q = QueryBuilder::new(format!(
                "INSERT INTO \"{table}\" ({}) ",
                columns
                    .iter()
                    .map(|c| format!("\"{c}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let mut failed = None;
            q.push_values(chunk, |mut b, row| {
                for (i, kind) in kinds.iter().enumerate() {
                    let bound = match kind {
                        Kind::Int => row.try_get::<Option<i64>, _>(i).map(|v| {
                            b.push_bind(v);
                        }),
                        Kind::Bool => row.try_get::<Option<i64>, _>(i).map(|v| {
                            b.push_bind(v.map(|n| n != 0));
                        }),
                        Kind::Text => row.try_get::<Option<String>, _>(i).map(|v| {
                            b.push_bind(v);
                        }),
                    };
                    if let Err(e) = bound {
                        failed.get_or_insert(format!("`{table}.{}`: {e}", columns[i]));
                        b.push_bind(None::<String>);
                    }
                }
            });
            if let Some(e) = failed {
                return Err(StoreError::Corrupt(e));
            }
            q.build().execute(&mut *tx).await?;
            progress(Progress::Rows {
                table,
                done: chunk.len() as u64,
            });
        }
        copied.rows.insert(table.clone(), rows.len() as u64);
    }
    for ca in cas {
        copied.ca_revocations += copy_ca_list(&mut tx, ca).await?;
    }
    tx.commit().await?;
    Ok(copied)
}

/// Where the copy is.
pub enum Progress<'a> {
    /// A table starts, with its number of rows.
    Table { table: &'a str, rows: u64 },
    /// `done` more rows of it were copied.
    Rows { table: &'a str, done: u64 },
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Bool,
    Text,
}

/// The store's tables. Their names and their columns' go into SQL text
/// (quoted), so anything but a plain name is refused.
async fn sqlite_tables(src: &mut SqliteConnection) -> StoreResult<Vec<String>> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx_%' ORDER BY name",
    )
    .fetch_all(src)
    .await?;
    for t in &tables {
        plain(t)?;
    }
    Ok(tables)
}

fn plain(name: &str) -> StoreResult<&str> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(name)
    } else {
        Err(StoreError::Corrupt(format!(
            "the SQLite store has an unexpected table or column `{name}`"
        )))
    }
}

async fn pg_columns(
    dst: &mut PgConnection,
) -> StoreResult<BTreeMap<String, BTreeMap<String, Kind>>> {
    let rows = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, data_type::text AS d \
         FROM information_schema.columns WHERE table_schema = current_schema()",
    )
    .fetch_all(dst)
    .await?;
    let mut out: BTreeMap<String, BTreeMap<String, Kind>> = BTreeMap::new();
    for r in rows {
        let kind = match r.try_get::<String, _>("d")?.as_str() {
            "bigint" | "integer" | "smallint" => Kind::Int,
            "boolean" => Kind::Bool,
            _ => Kind::Text,
        };
        out.entry(r.try_get("t")?)
            .or_default()
            .insert(r.try_get("c")?, kind);
    }
    Ok(out)
}

/// `tables` with every table after those its foreign keys name.
async fn fk_order(dst: &mut PgConnection, tables: &[String]) -> StoreResult<Vec<String>> {
    let edges = sqlx::query(
        "SELECT conrelid::regclass::text AS child, confrelid::regclass::text AS parent \
         FROM pg_constraint WHERE contype = 'f' AND connamespace = current_schema()::regnamespace",
    )
    .fetch_all(dst)
    .await?;
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in edges {
        let (child, parent): (String, String) = (e.try_get("child")?, e.try_get("parent")?);
        if child != parent {
            parents.entry(child).or_default().insert(parent);
        }
    }
    let mut order: Vec<String> = Vec::new();
    let mut left: Vec<&String> = tables.iter().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|t| {
            let ready = parents
                .get(*t)
                .is_none_or(|ps| ps.iter().all(|p| order.contains(p) || !tables.contains(p)));
            if ready {
                order.push((*t).clone());
            }
            !ready
        });
        if left.len() == before {
            return Err(StoreError::Invalid(
                "the PostgreSQL schema's foreign keys form a cycle".into(),
            ));
        }
    }
    Ok(order)
}

/// One local CA's revocation file into `ca_revocations`.
async fn copy_ca_list(tx: &mut PgConnection, ca: &CaRevocations) -> StoreResult<u64> {
    #[derive(serde::Deserialize)]
    struct Line {
        serial: Option<String>,
        jti: Option<String>,
        expires_at: i64,
        #[serde(default)]
        revoked_at: i64,
    }
    let text = std::fs::read_to_string(&ca.file)
        .map_err(|e| StoreError::Invalid(format!("cannot read `{}`: {e}", ca.file.display())))?;
    let mut n = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        // A torn last line is what a crash mid-append leaves; that revoke
        // was never confirmed (the CA skips it too).
        let Ok(l) = serde_json::from_str::<Line>(line) else {
            tracing::warn!(file = %ca.file.display(), line = i + 1, "skipping an unreadable revocation record");
            continue;
        };
        for (kind, key) in [("serial", l.serial), ("jti", l.jti)] {
            let Some(key) = key else { continue };
            sqlx::query(
                "INSERT INTO ca_revocations (provider, kind, key, expires_at, revoked_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&ca.provider)
            .bind(kind)
            .bind(key)
            .bind(l.expires_at)
            .bind(l.revoked_at)
            .execute(&mut *tx)
            .await?;
            n += 1;
        }
    }
    Ok(n)
}
