//! The store engine the harness runs on, chosen once for every test binary
//! by `KEYGATE_TEST_STORE` (`sqlite`, the default). Everything a test does
//! to a store below the API — its URL, tampering with audit rows, moving
//! dates — goes through here, so a second engine adds its branch here and
//! the tests stay as they are.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use super::TestBroker;

/// A store engine the harness can run a broker on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
}

/// The engine chosen by `KEYGATE_TEST_STORE`; an unknown one is an error,
/// never a silent fallback.
pub fn engine() -> Engine {
    match std::env::var("KEYGATE_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sqlite") => Engine::Sqlite,
        Ok(other) => {
            panic!("KEYGATE_TEST_STORE=`{other}`: this harness runs the `sqlite` engine only")
        }
    }
}

impl Engine {
    /// The `[store] url` of a fresh store for a broker living in `dir`.
    pub fn url(self, dir: &Path) -> String {
        match self {
            Self::Sqlite => format!("sqlite://{}/keygate.db", dir.display()),
        }
    }
}

impl TestBroker {
    /// Runs `sql` against the broker's store as someone with write access
    /// to it would; `?` placeholders, bound as text, in order. Returns the
    /// rows affected, or the store's refusal.
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
        }
    }
}
