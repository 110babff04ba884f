//! What a broker keeps, for leak scans: one scanner for every test that
//! promises a secret is kept nowhere. The store's bytes at rest are read by
//! engine (SQLite: the database with its WAL and shared-memory file), so a
//! second store engine adds its own reader here, not a copy per test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::TestBroker;

/// One place a broker keeps data, with its bytes.
pub struct Place {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl TestBroker {
    /// The store's bytes at rest, per file (the database must exist).
    pub fn store_at_rest(&self) -> Vec<Place> {
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

    /// Everything the broker keeps: the store at rest, its log, and the
    /// audit log as the API serves it.
    pub async fn everything_kept(&self) -> Vec<Place> {
        let mut out = self.store_at_rest();
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
