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
pub mod console;
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
pub mod validation;

/// The log filter when `RUST_LOG` is unset. vaultrs and rustify log every
/// non-2xx Vault answer at ERROR (a revoked token's 400 included); Keygate
/// reports what matters itself.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,hyper=warn,rustify=off,vaultrs=warn";

/// Caps no `RUST_LOG` can lift: below these levels the AWS SDK logs the
/// canonical request it signs (with `x-amz-security-token`) and the wire
/// bodies (STS answers carry credentials), and HTTP clients log headers.
/// They only ever lower what `RUST_LOG` lets through, never raise it.
pub const LOG_CAPS: [(&str, tracing::Level); 6] = [
    ("aws_sigv4", tracing::Level::INFO),
    ("aws_smithy_runtime", tracing::Level::DEBUG),
    ("aws_smithy_runtime_api", tracing::Level::DEBUG),
    ("aws_smithy_http", tracing::Level::DEBUG),
    ("hyper", tracing::Level::INFO),
    ("h2", tracing::Level::INFO),
];

/// [`LOG_CAPS`] as a filter every event must also pass.
pub fn log_caps() -> tracing_subscriber::filter::Targets {
    LOG_CAPS.iter().fold(
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing_subscriber::filter::LevelFilter::TRACE),
        |t, (target, level)| t.with_target(*target, *level),
    )
}

/// The filter for `RUST_LOG` (or the default).
pub fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    rust_log
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LOG_FILTER))
}

/// Installs the global `tracing` subscriber. `RUST_LOG` overrides the level
/// (never past [`LOG_CAPS`]).
pub fn init_logging(format: config::LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person at a terminal, never into a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().finish().with(log_caps()).try_init(),
        config::LogFormat::Text => builder.finish().with(log_caps()).try_init(),
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `RUST_LOG=trace` still keeps the AWS SDK's signing and wire logs
    /// (which carry security tokens and STS answers) out.
    #[test]
    fn rust_log_trace_cannot_lift_the_caps() {
        let buf = Buf::default();
        let w = buf.clone();
        use tracing_subscriber::layer::SubscriberExt;
        let sub = tracing_subscriber::fmt()
            .with_env_filter(super::log_filter(Some("trace")))
            .with_writer(move || w.clone())
            .finish()
            .with(super::log_caps());
        tracing::subscriber::with_default(sub, || {
            tracing::trace!(target: "aws_sigv4::http_request::sign", "canonical request: x-amz-security-token:TOKEN-1");
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", "response body TOKEN-2");
            tracing::trace!(target: "keygate::broker", "keygate's own trace line");
            tracing::info!(target: "aws_sigv4::http_request::sign", "an info line passes");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("keygate's own trace line"), "{text}");
        assert!(text.contains("an info line passes"), "{text}");
        assert!(
            !text.contains("TOKEN-1") && !text.contains("TOKEN-2"),
            "{text}"
        );
    }
}
