//! A PostgreSQL store's connections: its pools are open whole before the
//! store is (none is opened on a request's path, where the driver's SCRAM
//! key derivation, yielding to the runtime every fifth of its 4,096
//! rounds, took seconds under load and requests failed with 503s); a
//! database that goes away and comes back is carried on with; a wrong
//! password stops the open without being repeated. SQLite has no
//! connections to lose: these return at once on it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use crate::common;
use crate::store_contract::{Db, db_path, open};
use common::store::{Engine, engine};
use keygate::store::Store;
use sqlx::Connection;

/// A store on PostgreSQL in a fresh dir (kept while the guard lives), an
/// administrator's connection, and the store's database name; `None` on
/// SQLite.
#[allow(clippy::type_complexity)]
async fn postgres_store() -> Option<(Db, Arc<dyn Store>, sqlx::PgConnection, String)> {
    if engine() != Engine::Postgres {
        return None;
    }
    let (dir, path) = db_path();
    let store = open(&path).await;
    let (db, name) = administrator(&path).await;
    Some((dir, store, db, name))
}

/// A connection to the cluster's `postgres` database, as an administrator,
/// and the name of the database of the store at `path`.
async fn administrator(path: &str) -> (sqlx::PgConnection, String) {
    let dir = std::path::Path::new(path).parent().unwrap();
    let mut url = url::Url::parse(&Engine::Postgres.url(dir)).unwrap();
    let name = url.path().trim_start_matches('/').to_owned();
    url.set_path("/postgres");
    (
        sqlx::PgConnection::connect(url.as_str()).await.unwrap(),
        name,
    )
}

/// `count(counted)` over the connections Keygate has open to the database
/// `name`: `*` counts them, `pg_terminate_backend(pid)` drops them and
/// counts those it dropped.
async fn keygate_connections(db: &mut sqlx::PgConnection, name: &str, counted: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count({counted}) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'keygate'"
    )))
    .bind(name)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_postgres_store_opens_its_whole_pool_before_it_is_used() {
    let Some((_dir, _store, mut db, name)) = postgres_store().await else {
        return;
    };
    let open = keygate_connections(&mut db, &name, "*").await;
    // Sixteen for requests, two for the audit chainer.
    assert!(open >= 18, "{open} connections open");
}

/// A database that goes away (every connection dropped, new ones refused)
/// and comes back: a read while it is away ends in an error, and once it is
/// back the connections it dropped, idle in the pool for over a second,
/// are replaced before they are handed out, so the next reads all succeed.
#[tokio::test]
async fn a_postgres_store_carries_on_when_its_database_comes_back() {
    let Some((_dir, store, mut db, name)) = postgres_store().await else {
        return;
    };
    store.ping().await.unwrap();
    let allow = |on: bool| format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {on}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(allow(false)))
        .execute(&mut db)
        .await
        .unwrap();
    let dropped = keygate_connections(&mut db, &name, "pg_terminate_backend(pid)").await;
    assert!(dropped >= 18, "{dropped} connections dropped");
    // Idle past the moment a pooled connection is asked again.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let away = tokio::time::timeout(std::time::Duration::from_secs(60), store.ping())
        .await
        .expect("a read while the database is away ends");
    assert!(away.is_err(), "a read while the database is away");
    sqlx::raw_sql(sqlx::AssertSqlSafe(allow(true)))
        .execute(&mut db)
        .await
        .unwrap();
    for i in 0..40 {
        store
            .ping()
            .await
            .unwrap_or_else(|e| panic!("read {i} once the database is back: {e}"));
    }
}

/// A wrong password stops the store from opening with an error that says
/// so without repeating the password, once (the pool's other connections,
/// opening together, are stopped and closed).
#[tokio::test]
async fn a_postgres_store_with_a_wrong_password_does_not_open() {
    if engine() != Engine::Postgres {
        return;
    }
    let (_dir, path) = db_path();
    drop(open(&path).await);
    let dir = std::path::Path::new(&path).parent().unwrap();
    let mut url = url::Url::parse(&Engine::Postgres.url(dir)).unwrap();
    url.set_password(None).unwrap();
    let wrong = secrecy::SecretString::from("not-the-password-0451".to_owned());
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        keygate::store::open_with(url.as_str(), Some(&wrong)),
    )
    .await
    .expect("the open ends");
    let Err(e) = opened else {
        panic!("a wrong password opened the store")
    };
    let msg = e.to_string();
    assert!(msg.contains("cannot connect to the store"), "{msg}");
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(!msg.contains("not-the-password-0451"), "{msg}");
}
