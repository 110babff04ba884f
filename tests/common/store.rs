//! The store engine the harness runs on, chosen once for every test binary
//! by `KEYGATE_TEST_STORE` (`sqlite`, the default, or `postgres`).
//! Everything a test does to a store below the API — its URL, tampering
//! with audit rows, moving dates — goes through here, so the tests stay as
//! they are whatever the engine.
//!
//! `postgres`: one throwaway cluster per test binary (started by the first
//! broker, stopped when the binary exits), one fresh database per broker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::OnceLock;

use super::TestBroker;
use super::peers::Postgres;

/// A store engine the harness can run a broker on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The engine chosen by `KEYGATE_TEST_STORE`; an unknown one is an error,
/// never a silent fallback.
pub fn engine() -> Engine {
    match std::env::var("KEYGATE_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sqlite") => Engine::Sqlite,
        Ok("postgres") => Engine::Postgres,
        Ok(other) => {
            panic!("KEYGATE_TEST_STORE=`{other}`: the harness runs `sqlite` or `postgres`")
        }
    }
}

/// This test binary's PostgreSQL cluster.
pub fn cluster() -> &'static Postgres {
    static CLUSTER: OnceLock<Postgres> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // Its own thread: the caller may be inside a runtime, where a
        // blocking start is not allowed.
        let pg = std::thread::spawn(Postgres::start_blocking)
            .join()
            .expect("starting PostgreSQL");
        pg.stop_when_process_exits();
        pg
    })
}

impl Engine {
    /// The `[store]` table's body for a fresh store of a broker living in
    /// `dir` (for PostgreSQL a new database, its password in a file there).
    pub fn store_toml(self, dir: &Path) -> String {
        match self {
            Self::Sqlite => format!("url = \"sqlite://{}/keygate.db\"", dir.display()),
            Self::Postgres => {
                let pg = cluster();
                let url = pg.create_database(&database_name(dir));
                let password = dir.join("store-password");
                std::fs::write(&password, &pg.password).unwrap();
                format!(
                    "url = \"{url}\"\npassword = \"file:{}\"",
                    password.display()
                )
            }
        }
    }

    /// The URL of the store of the broker living in `dir`, with the
    /// password where the engine has one (for a direct connection).
    pub fn url(self, dir: &Path) -> String {
        match self {
            Self::Sqlite => format!("sqlite://{}/keygate.db", dir.display()),
            Self::Postgres => {
                let pg = cluster();
                format!(
                    "postgres://postgres:{}@127.0.0.1:{}/{}",
                    pg.password,
                    pg.port,
                    database_name(dir)
                )
            }
        }
    }
}

/// Opens (creating on first use, reopening after) the engine's store for
/// the dir `dir`, in process, as the broker does.
pub async fn open_store(dir: &Path) -> std::sync::Arc<dyn keygate::store::Store> {
    match engine() {
        Engine::Sqlite => keygate::store::open(&Engine::Sqlite.url(dir))
            .await
            .unwrap(),
        Engine::Postgres => {
            let pg = cluster();
            let name = database_name(dir);
            if !dir.join("store-created").exists() {
                pg.create_database(&name);
                std::fs::write(dir.join("store-created"), "").unwrap();
            }
            let url = format!("postgres://postgres@127.0.0.1:{}/{name}", pg.port);
            let password = secrecy::SecretString::from(pg.password.clone());
            keygate::store::open_with(&url, Some(&password))
                .await
                .unwrap()
        }
    }
}

/// One database per broker dir (unique: the dir's random name).
fn database_name(dir: &Path) -> String {
    let name: String = dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("kg_{name}")
}

/// `?` placeholders as PostgreSQL's `$1, $2, …` (test SQL has no `?` in
/// its literals).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

impl TestBroker {
    /// Replaces the `[store]` table of the prepared config with `body`
    /// (a store of the test's own rather than the harness's).
    pub fn set_store_table(&self, body: &str) {
        let path = self.dir.join("keygate.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        let start = config.find("[store]\n").unwrap();
        let end = start + config[start..].find("\n\n").unwrap();
        let new = format!("{}[store]\n{body}{}", &config[..start], &config[end..]);
        std::fs::write(path, new).unwrap();
    }

    /// The CLI's arguments naming this broker's store for a check without
    /// the server (`--db`, and `--db-password` where the engine has one).
    pub fn store_args(&self) -> Vec<String> {
        match engine() {
            Engine::Sqlite => vec!["--db".into(), self.db_path().display().to_string()],
            Engine::Postgres => {
                let pg = cluster();
                vec![
                    "--db".into(),
                    format!(
                        "postgres://postgres@127.0.0.1:{}/{}",
                        pg.port,
                        database_name(&self.dir)
                    ),
                    "--db-password".into(),
                    format!("file:{}", self.dir.join("store-password").display()),
                ]
            }
        }
    }

    /// Runs `sql` against the broker's store as someone with write access
    /// to it would; `?` placeholders, bound in order (as integers where they
    /// are whole numbers, as text otherwise). Returns the rows affected, or
    /// the store's refusal.
    pub async fn store_exec(&self, sql: &str, binds: &[&str]) -> Result<u64, String> {
        match engine() {
            Engine::Sqlite => {
                let mut db = self.db().await;
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
                for v in binds {
                    q = q.bind(v.to_string());
                }
                let done = q.execute(&mut db).await.map_err(|e| e.to_string());
                sqlx::Connection::close(db).await.unwrap();
                done.map(|d| d.rows_affected())
            }
            Engine::Postgres => {
                use sqlx::Connection;
                let mut db = sqlx::PgConnection::connect(&Engine::Postgres.url(&self.dir))
                    .await
                    .unwrap();
                let mut q = sqlx::query(sqlx::AssertSqlSafe(numbered(sql)));
                // PostgreSQL types its parameters: whole numbers (times,
                // counts, sequence numbers) as BIGINT, the rest as text.
                for v in binds {
                    q = match v.parse::<i64>() {
                        Ok(n) => q.bind(n),
                        Err(_) => q.bind(v.to_string()),
                    };
                }
                let done = q.execute(&mut db).await.map_err(|e| e.to_string());
                db.close().await.unwrap();
                done.map(|d| d.rows_affected())
            }
        }
    }

    /// A count (`SELECT count(*) …`, `?` placeholders bound as text) read
    /// straight from the broker's store.
    pub async fn store_count(&self, sql: &str, binds: &[&str]) -> i64 {
        let sql = sqlx::AssertSqlSafe(match engine() {
            Engine::Sqlite => sql.to_owned(),
            Engine::Postgres => numbered(sql),
        });
        match engine() {
            Engine::Sqlite => {
                let mut db = self.db().await;
                let mut q = sqlx::query_scalar::<_, i64>(sql);
                for v in binds {
                    q = q.bind(v.to_string());
                }
                let n = q.fetch_one(&mut db).await.unwrap();
                sqlx::Connection::close(db).await.unwrap();
                n
            }
            Engine::Postgres => {
                use sqlx::Connection;
                let mut db = sqlx::PgConnection::connect(&Engine::Postgres.url(&self.dir))
                    .await
                    .unwrap();
                let mut q = sqlx::query_scalar::<_, i64>(sql);
                for v in binds {
                    q = q.bind(v.to_string());
                }
                let n = q.fetch_one(&mut db).await.unwrap();
                db.close().await.unwrap();
                n
            }
        }
    }

    /// What an attacker with write access does first: lift the guards
    /// that keep audit events append-only.
    pub async fn lift_audit_guards(&self) {
        match engine() {
            Engine::Sqlite => {
                for t in ["audit_events_no_update", "audit_events_no_delete"] {
                    self.store_exec(&format!("DROP TRIGGER IF EXISTS {t}"), &[])
                        .await
                        .unwrap();
                }
            }
            Engine::Postgres => {
                for t in ["audit_events_no_update", "audit_events_no_truncate"] {
                    self.store_exec(&format!("DROP TRIGGER IF EXISTS {t} ON audit_events"), &[])
                        .await
                        .unwrap();
                }
            }
        }
    }
}

/// Agent `a1`, active, as the store tests write it.
pub fn test_agent() -> keygate::model::Agent {
    serde_json::from_value(serde_json::json!({
        "id": "a1", "team": "t", "sponsor": "s@example.com", "risk_tier": 1,
        "environment": "test", "purpose": "p", "labels": {}, "status": "active",
        "auth_method": "private_key_jwt", "jwks": { "keys": [] },
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
        "last_used_at": null, "last_review_at": null,
    }))
    .expect("a valid agent")
}

/// Task `id` of agent `a1`, opened at `t` for an hour.
pub fn open_task(id: &str, t: time::OffsetDateTime) -> keygate::model::Task {
    keygate::model::Task {
        id: id.into(),
        agent_id: "a1".into(),
        description: String::new(),
        state: keygate::model::TaskState::Open,
        opened_at: t,
        expires_at: t + time::Duration::hours(1),
        ended_at: None,
        end_reason: None,
        parent_task_id: None,
        depth: 0,
        delegation_budget: 0,
        scopes: None,
        chain: Vec::new(),
        on_behalf_of: None,
    }
}
