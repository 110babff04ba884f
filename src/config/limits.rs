//! `[limits]` and `[server.connections]`: what one client, address or agent
//! may take of the broker.

use serde::Deserialize;

/// `[limits]`: rate limits (GCRA, through `governor`) on every door. Each
/// allows a burst of a tenth of its per-minute rate (at least 1); `0` turns a
/// limit off. Refusals answer 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per minute from one source address to each of
    /// `/oauth/token`, `/oauth/introspect`, `/oauth/revoke` and the Slack hook.
    pub per_address_per_minute: u32,
    /// Token requests per minute that claim one `client_id`.
    pub per_client_per_minute: u32,
    /// Credential requests, renewals, releases and approval redeems per
    /// minute by one agent.
    pub per_agent_per_minute: u32,
    /// Credential approvals one task may have waiting at once.
    pub max_pending_approvals_per_task: u32,
    /// Credential approvals one agent may have waiting at once.
    pub max_pending_approvals_per_agent: u32,
    /// The same failed authentication (source, client id, reason) is audited
    /// at once the first time, then as one count per this many seconds.
    pub auth_failure_interval_secs: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_address_per_minute: 6000,
            per_client_per_minute: 600,
            per_agent_per_minute: 6000,
            max_pending_approvals_per_task: 5,
            max_pending_approvals_per_agent: 20,
            auth_failure_interval_secs: 10,
        }
    }
}

/// `[server.connections]`: what one client may hold of the broker's sockets.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Connections served at once per listener; further clients wait.
    pub max_connections: usize,
    /// A request's headers must arrive within this (slowloris).
    pub header_read_timeout_secs: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_secs: u64,
    /// The mTLS listener's TLS handshake must finish within this.
    pub tls_handshake_timeout_secs: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            tls_handshake_timeout_secs: 10,
        }
    }
}
