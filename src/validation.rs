//! Continuous validation: every agent's behaviour, watched as it happens.
//! The broker reports what it sees (credential requests and their
//! denials, failed logins, task opens with their source address) to
//! [`Validation::observe`], which keeps per-agent signals in memory over
//! sliding windows (per-second buckets, and per detector a running value
//! updated as buckets enter and leave its window: constant work per
//! observation) and answers with the `[[detectors]]` that fired. The
//! broker then responds (`validation/respond.rs`): an incident in the audit
//! log, and for `suspend` the kill switch for that agent.
//!
//! Signals are per replica and start empty at each start (what an agent
//! "has used before" is relearned during `warm_up_observations`); the
//! incidents they raise are durable, in the audit log every replica reads.

mod config;
mod respond;

pub use config::{Action, DetectorConfig, Severity, Signal, ValidationConfig, validate};
pub use respond::{Incident, IncidentState};

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

/// The most agents whose signals are kept; beyond it new agents are not
/// watched until the broker restarts (a flood of made-up client ids must
/// not grow memory without bound: failed logins are observed only for
/// registered agents, and this is the backstop).
const MAX_AGENTS: usize = 100_000;

/// What the broker saw an agent do.
#[derive(Debug, Clone)]
pub enum Observation {
    /// A credential request: `denied` when policy said no.
    Request {
        scope: String,
        denied: bool,
        source: Option<IpAddr>,
    },
    /// A failed authentication claiming the agent's id.
    AuthFailure { source: Option<IpAddr> },
    /// A task opened (a successful authentication).
    TaskOpened { source: Option<IpAddr> },
}

/// One second of an agent's observations, folded.
#[derive(Debug, Default)]
struct Bucket {
    sec: i64,
    requests: u32,
    denials: u32,
    failures: u32,
    /// Scopes asked for and source addresses, with how often.
    scopes: Vec<(String, u32)>,
    sources: Vec<(IpAddr, u32)>,
}

fn bump<K: PartialEq>(list: &mut Vec<(K, u32)>, key: K) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => list.push((key, 1)),
    }
}

/// One detector's running view of one agent: the value over its window,
/// kept up to date as observations arrive and buckets leave the window
/// (constant work per observation, whatever the window holds).
#[derive(Debug, Default)]
struct Running {
    /// Absolute index of the first bucket inside the window.
    cursor: u64,
    count: u64,
    /// For the distinct signals: each value in the window, with how often.
    distinct: HashMap<String, u32>,
}

#[derive(Debug, Default)]
struct AgentSignals {
    buckets: VecDeque<Bucket>,
    /// Absolute index of `buckets[0]`.
    base: u64,
    /// Per detector, in `detectors` order.
    running: Vec<Running>,
    /// Networks (/24 for IPv4, /48 for IPv6) and scopes seen since the
    /// last reset, and how many observations taught them.
    networks: BTreeSet<String>,
    scopes: BTreeSet<String>,
    learned: u32,
    /// Per detector: until when it stays quiet after firing.
    quiet_until: HashMap<String, i64>,
}

/// What `obs` (or a bucket of `n` such) adds to a counting signal.
fn counted(signal: Signal, obs: &Observation) -> u64 {
    match (signal, obs) {
        (Signal::Denials, Observation::Request { denied: true, .. })
        | (Signal::CredentialRequests, Observation::Request { .. })
        | (Signal::FailedAuth, Observation::AuthFailure { .. }) => 1,
        _ => 0,
    }
}

/// The bucket's share of a counting signal.
fn bucket_count(signal: Signal, b: &Bucket) -> u64 {
    u64::from(match signal {
        Signal::Denials => b.denials,
        Signal::CredentialRequests => b.requests,
        Signal::FailedAuth => b.failures,
        _ => 0,
    })
}

/// The value `obs` brings to a distinct signal.
fn distinct_key(signal: Signal, obs: &Observation) -> Option<String> {
    match (signal, obs) {
        (Signal::DistinctScopes, Observation::Request { scope, .. }) => Some(scope.clone()),
        (Signal::SourceAddresses, o) => source_of(o).map(|ip| ip.to_string()),
        _ => None,
    }
}

/// A detector that fired, with what it saw.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub detector: DetectorConfig,
    pub agent: String,
    /// The observed value (a count, or 1 for a novelty).
    pub observed: u64,
    /// What the value was compared with, in words.
    pub evidence: serde_json::Value,
}

/// The signals of every agent, and the detectors over them.
#[derive(Debug)]
pub struct Validation {
    config: ValidationConfig,
    detectors: Vec<DetectorConfig>,
    agents: Mutex<HashMap<String, AgentSignals>>,
}

fn network(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

fn source_of(obs: &Observation) -> Option<IpAddr> {
    match obs {
        Observation::Request { source, .. }
        | Observation::AuthFailure { source }
        | Observation::TaskOpened { source } => *source,
    }
}

impl Validation {
    pub fn new(config: ValidationConfig, detectors: Vec<DetectorConfig>) -> Self {
        Self {
            config,
            detectors,
            agents: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any detector is configured (nothing is kept otherwise).
    pub fn enabled(&self) -> bool {
        !self.detectors.is_empty()
    }

    /// Whether incidents only record what would have been done.
    pub fn dry_run(&self, d: &DetectorConfig) -> bool {
        self.config.dry_run || d.dry_run
    }

    /// Records `obs` for `agent` at `now` (unix seconds) and returns the
    /// detectors it makes fire. A detector that fired stays quiet for its
    /// window, so one burst raises one incident.
    pub fn observe(&self, agent: &str, obs: Observation, now: i64) -> Vec<Trigger> {
        if !self.enabled() {
            return Vec::new();
        }
        let Ok(mut agents) = self.agents.lock() else {
            return Vec::new();
        };
        if !agents.contains_key(agent) && agents.len() >= MAX_AGENTS {
            return Vec::new();
        }
        let a = agents.entry(agent.to_owned()).or_default();
        if a.running.len() != self.detectors.len() {
            a.running = self.detectors.iter().map(|_| Running::default()).collect();
            a.running
                .iter_mut()
                .for_each(|r| r.cursor = a.base + a.buckets.len() as u64);
        }
        // This second's bucket takes the observation (a clock that stepped
        // back adds to the latest one).
        if a.buckets.back().is_none_or(|b| b.sec < now) {
            a.buckets.push_back(Bucket {
                sec: now,
                ..Bucket::default()
            });
        }
        if let Some(b) = a.buckets.back_mut() {
            match &obs {
                Observation::Request { scope, denied, .. } => {
                    b.requests += 1;
                    b.denials += u32::from(*denied);
                    bump(&mut b.scopes, scope.clone());
                }
                Observation::AuthFailure { .. } => b.failures += 1,
                Observation::TaskOpened { .. } => {}
            }
            if let Some(ip) = source_of(&obs) {
                bump(&mut b.sources, ip);
            }
        }
        // Each detector adds the observation and lets go of the buckets
        // that left its window.
        for (d, r) in self.detectors.iter().zip(a.running.iter_mut()) {
            r.count += counted(d.signal, &obs);
            if let Some(k) = distinct_key(d.signal, &obs) {
                *r.distinct.entry(k).or_insert(0) += 1;
            }
            let edge = now - d.window_secs as i64;
            while let Some(b) = r
                .cursor
                .checked_sub(a.base)
                .and_then(|i| a.buckets.get(i as usize))
                .filter(|b| b.sec <= edge)
            {
                r.count = r.count.saturating_sub(bucket_count(d.signal, b));
                let leaving: Vec<String> = match d.signal {
                    Signal::DistinctScopes => b.scopes.iter().map(|(k, _)| k.clone()).collect(),
                    Signal::SourceAddresses => {
                        b.sources.iter().map(|(k, _)| k.to_string()).collect()
                    }
                    _ => Vec::new(),
                };
                let counts: Vec<u32> = match d.signal {
                    Signal::DistinctScopes => b.scopes.iter().map(|(_, n)| *n).collect(),
                    Signal::SourceAddresses => b.sources.iter().map(|(_, n)| *n).collect(),
                    _ => Vec::new(),
                };
                for (k, n) in leaving.into_iter().zip(counts) {
                    if let Some(c) = r.distinct.get_mut(&k) {
                        *c = c.saturating_sub(n);
                        if *c == 0 {
                            r.distinct.remove(&k);
                        }
                    }
                }
                r.cursor += 1;
            }
        }
        // Buckets every detector is past are gone.
        let oldest = a.running.iter().map(|r| r.cursor).min().unwrap_or(a.base);
        while a.base < oldest && a.buckets.pop_front().is_some() {
            a.base += 1;
        }
        // Novelties are judged before this observation is learned.
        let warm = a.learned >= self.config.warm_up_observations;
        let net = source_of(&obs).map(network);
        let new_network = warm && net.as_ref().is_some_and(|n| !a.networks.contains(n));
        let new_scope = warm
            && matches!(&obs, Observation::Request { scope, denied: false, .. } if !a.scopes.contains(scope));
        if let Some(n) = net
            && !matches!(obs, Observation::AuthFailure { .. })
        {
            a.networks.insert(n);
        }
        if let Observation::Request {
            scope,
            denied: false,
            ..
        } = &obs
        {
            a.scopes.insert(scope.clone());
        }
        if !matches!(obs, Observation::AuthFailure { .. }) {
            a.learned = a.learned.saturating_add(1);
        }

        let mut fired = Vec::new();
        for (d, r) in self.detectors.iter().zip(&a.running) {
            if a.quiet_until.get(&d.name).is_some_and(|t| *t > now) {
                continue;
            }
            let (observed, hit) = match d.signal {
                Signal::Denials | Signal::CredentialRequests | Signal::FailedAuth => {
                    (r.count, r.count > u64::from(d.threshold))
                }
                Signal::DistinctScopes | Signal::SourceAddresses => {
                    let n = r.distinct.len() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::NewSourceNetwork => (u64::from(new_network), new_network),
                Signal::NewScope => (u64::from(new_scope), new_scope),
            };
            if !hit {
                continue;
            }
            a.quiet_until
                .insert(d.name.clone(), now + d.window_secs as i64);
            let evidence = match d.signal {
                Signal::NewSourceNetwork => serde_json::json!({
                    "network": source_of(&obs).map(network),
                    "known_networks": a.networks.len().saturating_sub(1),
                }),
                Signal::NewScope => serde_json::json!({
                    "scope": match &obs { Observation::Request { scope, .. } => Some(scope), _ => None },
                    "known_scopes": a.scopes.len().saturating_sub(1),
                }),
                _ => serde_json::json!({
                    "observed": observed,
                    "threshold": d.threshold,
                    "window_secs": d.window_secs,
                }),
            };
            fired.push(Trigger {
                detector: d.clone(),
                agent: agent.to_owned(),
                observed,
                evidence,
            });
        }
        fired
    }

    /// Forgets what `agent` (every agent with `None`) has been seen to use,
    /// so a legitimate change of its policy or registry entry is learned
    /// again instead of raising novelties (seed 003). Counting windows are
    /// kept: a burst is a burst whatever the policy says.
    pub fn relearn(&self, agent: Option<&str>) {
        let Ok(mut agents) = self.agents.lock() else {
            return;
        };
        let reset = |a: &mut AgentSignals| {
            a.networks.clear();
            a.scopes.clear();
            a.learned = 0;
        };
        match agent {
            Some(id) => {
                if let Some(a) = agents.get_mut(id) {
                    reset(a);
                }
            }
            None => agents.values_mut().for_each(reset),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn detector(name: &str, signal: Signal, threshold: u32, window_secs: u64) -> DetectorConfig {
        DetectorConfig {
            name: name.into(),
            signal,
            threshold,
            window_secs,
            severity: Severity::High,
            action: Action::Record,
            dry_run: false,
        }
    }

    fn request(scope: &str, denied: bool, ip: &str) -> Observation {
        Observation::Request {
            scope: scope.into(),
            denied,
            source: Some(ip.parse().unwrap()),
        }
    }

    /// The running values of `agent`, per detector.
    fn values(v: &Validation, agent: &str) -> Vec<u64> {
        let agents = v.agents.lock().unwrap();
        let a = &agents[agent];
        v.detectors
            .iter()
            .zip(&a.running)
            .map(|(d, r)| match d.signal {
                Signal::DistinctScopes | Signal::SourceAddresses => r.distinct.len() as u64,
                _ => r.count,
            })
            .collect()
    }

    #[test]
    fn running_values_match_a_recount_of_the_window() {
        let detectors = vec![
            detector("d", Signal::Denials, u32::MAX, 7),
            detector("r", Signal::CredentialRequests, u32::MAX, 3),
            detector("f", Signal::FailedAuth, u32::MAX, 11),
            detector("s", Signal::DistinctScopes, u32::MAX, 5),
            detector("a", Signal::SourceAddresses, u32::MAX, 2),
        ];
        let v = Validation::new(ValidationConfig::default(), detectors.clone());
        let mut seen: Vec<(i64, Observation)> = Vec::new();
        let mut x: u64 = 42;
        let mut now = 1_000;
        for _ in 0..2_000 {
            // A small linear congruential walk: times that step 0 to 2 s,
            // a few scopes and addresses, some denials and failures.
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            now += (x >> 60) as i64 % 3;
            let ip = format!("10.0.{}.1", (x >> 40) % 4);
            let obs = match (x >> 33) % 4 {
                0 => Observation::AuthFailure {
                    source: Some(ip.parse().unwrap()),
                },
                1 => Observation::TaskOpened {
                    source: Some(ip.parse().unwrap()),
                },
                k => Observation::Request {
                    scope: format!("s{}", (x >> 20) % 5),
                    denied: k == 3,
                    source: Some(ip.parse().unwrap()),
                },
            };
            v.observe("a", obs.clone(), now);
            seen.push((now, obs));
            let recount: Vec<u64> = detectors
                .iter()
                .map(|d| {
                    let inside = seen.iter().filter(|(t, _)| *t > now - d.window_secs as i64);
                    match d.signal {
                        Signal::DistinctScopes | Signal::SourceAddresses => inside
                            .filter_map(|(_, o)| distinct_key(d.signal, o))
                            .collect::<BTreeSet<_>>()
                            .len()
                            as u64,
                        _ => inside.map(|(_, o)| counted(d.signal, o)).sum(),
                    }
                })
                .collect();
            assert_eq!(values(&v, "a"), recount, "at {now}");
        }
        // What every window has left behind is gone.
        let agents = v.agents.lock().unwrap();
        assert!(agents["a"].buckets.len() <= 12);
    }

    #[test]
    fn a_burst_fires_once_per_window_and_old_events_fall_out() {
        let v = Validation::new(
            ValidationConfig::default(),
            vec![detector("denials", Signal::Denials, 3, 60)],
        );
        let mut fired = 0;
        for i in 0..10 {
            fired += v
                .observe("a", request("s", true, "10.0.0.1"), 1000 + i)
                .len();
        }
        assert_eq!(fired, 1, "one burst, one trigger");
        // After the window, three more denials stay under the threshold.
        for i in 0..3 {
            assert!(
                v.observe("a", request("s", true, "10.0.0.1"), 2000 + i)
                    .is_empty()
            );
        }
        // Another agent's denials are its own.
        for i in 0..3 {
            assert!(
                v.observe("b", request("s", true, "10.0.0.1"), 2000 + i)
                    .is_empty()
            );
        }
    }

    #[test]
    fn novelties_wait_for_the_warm_up_and_are_relearned_after_a_change() {
        let v = Validation::new(
            ValidationConfig {
                warm_up_observations: 3,
                ..ValidationConfig::default()
            },
            vec![
                detector("net", Signal::NewSourceNetwork, 0, 60),
                detector("scope", Signal::NewScope, 0, 60),
            ],
        );
        for i in 0..3 {
            assert!(
                v.observe("a", request("s", false, "10.0.0.1"), i)
                    .is_empty()
            );
        }
        // The same /24 and scope: nothing new.
        assert!(
            v.observe("a", request("s", false, "10.0.0.9"), 10)
                .is_empty()
        );
        let t = v.observe("a", request("other", false, "192.168.7.1"), 11);
        let names: Vec<_> = t.iter().map(|t| t.detector.name.as_str()).collect();
        assert_eq!(names, ["net", "scope"]);
        // A policy change: what is used next is learned, not flagged.
        v.relearn(Some("a"));
        for i in 0..3 {
            assert!(
                v.observe(
                    "a",
                    request(&format!("new-{i}"), false, "172.16.0.1"),
                    100 + i
                )
                .is_empty()
            );
        }
    }
}
