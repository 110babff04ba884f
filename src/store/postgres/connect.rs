//! How the PostgreSQL engine connects: options from the store's URL and a
//! password given apart from it, pools opened whole before the replica
//! serves, and driver messages without the password.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::store::{StoreError, StoreResult};

/// How to connect to `url` with `password`; a password in the URL is
/// refused (it would sit in the config in clear).
pub(crate) fn connect_options(
    url: &str,
    password: Option<&SecretString>,
) -> StoreResult<PgConnectOptions> {
    if url::Url::parse(url).is_ok_and(|u| u.password().is_some()) {
        return Err(StoreError::Invalid(
            "the store url carries a password: give it as `store.password`, a secret \
             reference (env:, file:, aws-sm:), so it is never written in the config"
                .into(),
        ));
    }
    let mut opts = PgConnectOptions::from_str(url).map_err(|e| {
        StoreError::Invalid(format!("store url: {}", redact(&e.to_string(), password)))
    })?;
    if let Some(p) = password {
        opts = opts.password(p.expose_secret());
    }
    Ok(opts.application_name("keygate"))
}

/// How long a pooled connection may sit idle before it is asked whether it
/// is still alive when next handed out.
const ASK_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A pool of `size` connections, every one of them opened now (together)
/// and kept open, so that a request does not open one on its way.
///
/// Opening one under load took seconds: the driver's SCRAM key derivation
/// (4,096 HMAC rounds) yields to the runtime every fifth round, and each
/// yield waits behind every task that is ready to run, so with 32 clients
/// at work a connection opened on demand stayed in `authentication` past
/// the 5 s acquire timeout and requests failed with 503s (the policy reload
/// under load on PostgreSQL, `tests/policy_reload.rs`). With the pool kept
/// full, a request waits only for a connection another one releases.
///
/// Neither a lifetime nor idleness ends a connection: the driver's defaults
/// (30 minutes of life, 10 idle) would close them and the replacements
/// would be opened wherever a request waits, under whatever load there is
/// then; opened together, they would also all reach their lifetime at
/// once. Only a connection that is lost (the database restarted or dropped
/// it) is opened again, and that one on the path of the request that finds
/// the pool short.
pub(super) async fn open_pool(opts: PgConnectOptions, size: u32) -> Result<PgPool, sqlx::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(size)
        .min_connections(size)
        .max_lifetime(None)
        .idle_timeout(None)
        // By default the driver asks every connection it hands out whether
        // it is alive: a round trip at the start of each transaction and
        // each statement run alone, when it already asks as each is given
        // back (and drops a broken one). Only one that sat idle for over a
        // second is asked again, so one the database dropped during a quiet
        // spell is replaced, not handed out; under load none sits that long
        // (one dropped then fails the one statement it is handed to, as one
        // in use would have). Side by side at 32 clients, X.509-SVIDs on
        // PostgreSQL: 1,224 and 1,203/s without the extra round trip, 1,157
        // and 1,034/s with it.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > ASK_AFTER_IDLE {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_lazy_with(opts);
    let mut opening: tokio::task::JoinSet<_> = (0..size)
        .map(|_| {
            let pool = pool.clone();
            async move { pool.acquire().await }
        })
        .collect();
    let mut opened = Vec::with_capacity(size as usize);
    while let Some(conn) = opening.join_next().await {
        match conn.map_err(|e| sqlx::Error::Io(std::io::Error::other(e))) {
            Ok(Ok(conn)) => opened.push(conn),
            Ok(Err(e)) | Err(e) => {
                // The others are stopped and what was opened is closed.
                opening.abort_all();
                drop(opened);
                pool.close().await;
                return Err(e);
            }
        }
    }
    drop(opened);
    Ok(pool)
}

/// A driver message with the password cut out, should a driver ever quote
/// it.
pub(super) fn redact(message: &str, password: Option<&SecretString>) -> String {
    match password {
        Some(p) if !p.expose_secret().is_empty() => {
            message.replace(p.expose_secret(), "[redacted]")
        }
        _ => message.to_owned(),
    }
}
