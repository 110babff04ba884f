//! Keygate: a credential broker for AI agents.
//!
//! See `ARCHITECTURE.md` for the map of modules. In one line each:
//! `config` reads keygate.toml; `store` persists state behind one interface;
//! `identity` verifies agents and signs session tokens; `policy` decides with
//! Cedar; `broker` implements agents, tasks, credentials and revocations;
//! `lease` runs the revocation queue and reaper; `audit` hash-chains events;
//! `notify` delivers approval requests to Slack and webhooks from an outbox;
//! `server` is the HTTP API; `cli` the command line.

pub mod ascode;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod config;
pub mod governance;
pub mod identity;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod providers;
pub mod server;
pub mod store;

/// The log filter when `RUST_LOG` is unset. vaultrs and rustify log every
/// non-2xx Vault answer at ERROR (a revoked token's 400 included); Keygate
/// reports what matters itself.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,hyper=warn,rustify=off,vaultrs=warn";

/// Installs the global `tracing` subscriber. `RUST_LOG` overrides the level.
pub fn init_logging(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
