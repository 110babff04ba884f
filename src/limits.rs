//! Rate limits on every door (`governor`'s GCRA, keyed), and the
//! aggregation of failed authentications so that a flood of bad logins costs
//! one audit row per source and client per interval, not one fsync each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::config::RateLimitConfig;

/// The longest caller-claimed identifier kept as it is (in audit events,
/// logs and limiter keys); longer ones are cut and tagged with their hash.
pub const MAX_CLAIMED_ID: usize = 128;

/// The longest error message built from a parser's words about untrusted
/// input (which may quote that input back).
pub const MAX_PARSE_MESSAGE: usize = 400;

/// A parser's message about untrusted input, cut to
/// [`MAX_PARSE_MESSAGE`] bytes: serde quotes unknown field names and values,
/// and an attacker chooses how long those are.
pub fn clip_message(msg: &str) -> String {
    if msg.len() <= MAX_PARSE_MESSAGE {
        return msg.to_owned();
    }
    let mut cut = MAX_PARSE_MESSAGE;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (cut)", &msg[..cut])
}

/// A claimed identifier (a `client_id` nobody verified) made safe to keep:
/// at most [`MAX_CLAIMED_ID`] bytes, with a hash that still tells two long
/// ones apart.
pub fn claimed_label(id: &str) -> String {
    if id.len() <= MAX_CLAIMED_ID {
        return id.to_owned();
    }
    let mut cut = 64;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = hex::encode(Sha256::digest(id.as_bytes()));
    format!(
        "{}…[{} bytes, sha256 {}]",
        &id[..cut],
        id.len(),
        &digest[..16]
    )
}

/// A request refused by a limit: which one, and when to try again.
#[derive(Debug, Clone)]
pub struct Limited {
    /// `address`, `client`, `agent` or `usage`.
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl Limited {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
    }
}

/// The keyed limiters, each off when its rate is 0.
pub struct RateLimits {
    address: Option<DefaultKeyedRateLimiter<(&'static str, IpAddr)>>,
    client: Option<DefaultKeyedRateLimiter<String>>,
    agent: Option<DefaultKeyedRateLimiter<String>>,
    /// Per-agent usage quotas (`[[lifecycle]] max_credentials_per_minute`):
    /// one keyed limiter per distinct quota, made when first needed.
    quotas: Mutex<HashMap<u32, std::sync::Arc<DefaultKeyedRateLimiter<String>>>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(per_minute)?;
    let burst = NonZeroU32::new((per_minute / 10).max(1))?;
    Some(RateLimiter::keyed(
        Quota::per_minute(rate).allow_burst(burst),
    ))
}

impl RateLimits {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            address: limiter(cfg.per_address_per_minute),
            client: limiter(cfg.per_client_per_minute),
            agent: limiter(cfg.per_agent_per_minute),
            quotas: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        l: Option<&DefaultKeyedRateLimiter<K>>,
        key: &K,
        limit: &'static str,
    ) -> Result<(), Limited> {
        let Some(l) = l else { return Ok(()) };
        l.check_key(key).map_err(|not_until| Limited {
            limit,
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// One request from `source` to `door` (`token`, `introspect`, …).
    pub fn check_address(&self, door: &'static str, source: IpAddr) -> Result<(), Limited> {
        self.check(self.address.as_ref(), &(door, source), "address")
    }

    /// One token request claiming `client_id`.
    pub fn check_client(&self, client_id: &str) -> Result<(), Limited> {
        self.check(self.client.as_ref(), &claimed_label(client_id), "client")
    }

    /// One credential operation by `agent`.
    pub fn check_agent(&self, agent: &str) -> Result<(), Limited> {
        self.check(self.agent.as_ref(), &agent.to_owned(), "agent")
    }

    /// One credential for `agent` under its usage quota of `per_minute`
    /// (that many at once, refilled at that rate).
    pub fn check_agent_quota(&self, agent: &str, per_minute: u32) -> Result<(), Limited> {
        let Some(rate) = NonZeroU32::new(per_minute) else {
            return Ok(());
        };
        let l = match self.quotas.lock() {
            Ok(mut m) => m
                .entry(per_minute)
                .or_insert_with(|| std::sync::Arc::new(RateLimiter::keyed(Quota::per_minute(rate))))
                .clone(),
            // A poisoned map: refuse nothing rather than everything.
            Err(_) => return Ok(()),
        };
        self.check(Some(&*l), &agent.to_owned(), "usage")
    }

    /// Forgets keys whose limits are back to full (bounded memory).
    pub fn forget_idle(&self) {
        if let Ok(m) = self.quotas.lock() {
            for l in m.values() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
        if let Some(l) = &self.address {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&self.client, &self.agent].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// How many distinct (source, client, failure) keys are tracked before new
/// ones are counted under one catch-all key per source.
const MAX_TRACKED_FAILURES: usize = 10_000;

/// Failed authentications counted since the first of a burst was audited.
#[derive(Debug)]
struct Burst {
    since: Instant,
    suppressed: u64,
}

/// Failed authentications, aggregated: the first from a source for a client
/// with one reason in an interval is audited at once; the same failure again
/// is counted and audited as one event when the interval ends. A different
/// reason is a different burst, so no kind of failure goes unrecorded.
#[derive(Debug)]
pub struct AuthFailures {
    interval: Duration,
    bursts: Mutex<HashMap<(String, String, String), Burst>>,
}

/// One aggregated count, ready for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureCount {
    pub source: String,
    pub client_id: String,
    pub count: u64,
    pub error: String,
}

impl AuthFailures {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_secs(1)),
            bursts: Mutex::new(HashMap::new()),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Counts one failure; `true` when it is the first of its burst and must
    /// be audited now.
    pub fn record(&self, source: &str, client_id: &str, error: &str) -> bool {
        let Ok(mut bursts) = self.bursts.lock() else {
            return true;
        };
        let mut key = (
            source.to_owned(),
            claimed_label(client_id),
            claimed_label(error),
        );
        if !bursts.contains_key(&key) && bursts.len() >= MAX_TRACKED_FAILURES {
            key.1 = "(many clients)".to_owned();
            key.2 = "(many failures)".to_owned();
        }
        match bursts.get_mut(&key) {
            Some(b) => {
                b.suppressed += 1;
                false
            }
            None => {
                bursts.insert(
                    key,
                    Burst {
                        since: Instant::now(),
                        suppressed: 0,
                    },
                );
                true
            }
        }
    }

    /// Ends the bursts whose interval is over (all of them with `all`) and
    /// returns the counts not audited yet.
    pub fn drain(&self, all: bool) -> Vec<FailureCount> {
        let Ok(mut bursts) = self.bursts.lock() else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut out = Vec::new();
        bursts.retain(|(source, client, error), b| {
            if !all && now.duration_since(b.since) < self.interval {
                return true;
            }
            if b.suppressed > 0 {
                out.push(FailureCount {
                    source: source.clone(),
                    client_id: client.clone(),
                    count: b.suppressed,
                    error: error.clone(),
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn long_claimed_ids_are_cut_and_told_apart() {
        assert_eq!(claimed_label("agent-1"), "agent-1");
        let a = claimed_label(&"a".repeat(60_000));
        let b = claimed_label(&format!("{}b", "a".repeat(59_999)));
        assert!(a.len() < 200, "{a}");
        assert_ne!(a, b);
        let multibyte = claimed_label(&"é".repeat(100));
        assert!(multibyte.len() < 200);
    }

    #[test]
    fn the_first_failure_of_a_burst_is_kept_and_the_rest_counted() {
        let f = AuthFailures::new(Duration::from_secs(60));
        assert!(f.record("10.0.0.1", "x", "bad"));
        for _ in 0..199 {
            assert!(!f.record("10.0.0.1", "x", "bad"));
        }
        assert!(f.record("10.0.0.1", "x", "worse"), "another reason");
        assert!(f.record("10.0.0.2", "x", "bad"), "another source");
        assert!(f.drain(false).is_empty(), "the interval is not over");
        let counts = f.drain(true);
        assert_eq!(
            counts,
            vec![FailureCount {
                source: "10.0.0.1".into(),
                client_id: "x".into(),
                count: 199,
                error: "bad".into(),
            }]
        );
        assert!(f.record("10.0.0.1", "x", "bad"), "a new burst");
    }

    #[test]
    fn limits_refuse_past_the_burst_and_zero_turns_them_off() {
        let cfg = RateLimitConfig {
            per_address_per_minute: 60,
            per_client_per_minute: 0,
            ..RateLimitConfig::default()
        };
        let l = RateLimits::new(&cfg);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..6 {
            l.check_address("token", ip).unwrap();
        }
        let refused = l.check_address("token", ip).unwrap_err();
        assert_eq!(refused.limit, "address");
        assert!(refused.retry_after_secs() >= 1);
        l.check_address("introspect", ip).unwrap();
        for _ in 0..1000 {
            l.check_client("anyone").unwrap();
        }
    }
}
