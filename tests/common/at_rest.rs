//! What a broker keeps, for leak scans: one scanner for every test that
//! promises a secret is kept nowhere. The store's bytes at rest are read by
//! engine — SQLite: the database with its WAL and shared-memory file;
//! PostgreSQL: every row as text (values too long for a page are stored
//! compressed, so a byte scan alone could miss them), the database's files
//! and the cluster's write-ahead log — not a copy per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::TestBroker;

/// One place a broker keeps data, with its bytes.
pub struct Place {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(hay, needle).is_some()
}

impl TestBroker {
    /// The store's bytes at rest, per place (the store must exist).
    pub async fn store_at_rest(&self) -> Vec<Place> {
        if super::store::engine() == super::store::Engine::Postgres {
            return self.postgres_at_rest().await;
        }
        let mut out = Vec::new();
        for (name, file) in [
            ("store", "keygate.db"),
            ("store wal", "keygate.db-wal"),
            ("store shm", "keygate.db-shm"),
        ] {
            match std::fs::read(self.dir.join(file)) {
                Ok(bytes) => out.push(Place { name, bytes }),
                Err(e) => assert_ne!(name, "store", "the database exists: {e}"),
            }
        }
        out
    }

    /// PostgreSQL's share: every table's rows as text, then the raw files
    /// of the database and of the cluster's WAL.
    async fn postgres_at_rest(&self) -> Vec<Place> {
        use sqlx::{Connection, Row};
        let url = super::store::Engine::Postgres.url(&self.dir);
        let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        assert!(tables.iter().any(|t| t == "leases"), "the store exists");
        let mut rows = Vec::new();
        for t in &tables {
            let sql = format!("SELECT COALESCE(string_agg(t::text, E'\\n'), '') FROM \"{t}\" t");
            let text: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut db)
                .await
                .unwrap();
            rows.extend_from_slice(text.as_bytes());
            rows.push(b'\n');
        }
        let row = sqlx::query(
            "SELECT current_setting('data_directory') AS dir, \
             (SELECT oid::text FROM pg_database WHERE datname = current_database()) AS oid",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        let (data, oid): (String, String) = (row.get("dir"), row.get("oid"));
        db.close().await.unwrap();
        // This database's files, and the cluster's WAL segments written
        // since this broker's store was made (older ones hold only other
        // tests' databases).
        let born = std::fs::metadata(self.dir.join("keygate.toml"))
            .and_then(|m| m.modified())
            .unwrap();
        let mut files = Vec::new();
        for (dir, recent_only) in [
            (format!("{data}/base/{oid}"), false),
            (format!("{data}/pg_wal"), true),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file() && (!recent_only || meta.modified().is_ok_and(|m| m >= born)) {
                    files.extend(std::fs::read(entry.path()).unwrap_or_default());
                }
            }
        }
        vec![
            Place {
                name: "store rows",
                bytes: rows,
            },
            Place {
                name: "store files",
                bytes: files,
            },
        ]
    }

    /// Everything the broker keeps: the store at rest, its log, and the
    /// audit log as the API serves it.
    pub async fn everything_kept(&self) -> Vec<Place> {
        let mut out = self.store_at_rest().await;
        out.push(Place {
            name: "server log",
            bytes: self.log().into_bytes(),
        });
        out.push(Place {
            name: "audit api",
            bytes: serde_json::to_vec(&self.audit("").await).unwrap(),
        });
        out
    }

    /// Asserts that none of `secrets` is kept anywhere, and — so that an
    /// empty or unreadable place cannot pass — that `control` (something
    /// the broker must keep, such as a lease id) is in the store and in the
    /// audit log.
    pub async fn assert_kept_nowhere(&self, secrets: &[&str], control: &str) {
        let places = self.everything_kept().await;
        for kind in ["store", "audit api"] {
            assert!(
                places
                    .iter()
                    .filter(|p| p.name.starts_with(kind))
                    .any(|p| contains(&p.bytes, control.as_bytes())),
                "the control `{control}` is not in the {kind}: the scan reads the wrong bytes"
            );
        }
        for secret in secrets {
            assert!(!secret.is_empty(), "an empty secret proves nothing");
            for p in &places {
                assert!(
                    !contains(&p.bytes, secret.as_bytes()),
                    "a secret leaked into the {}",
                    p.name
                );
            }
        }
    }
}
