//! How the PostgreSQL engine connects: options from the store's URL and a
//! password given apart from it, and driver messages without the password.

use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;

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
