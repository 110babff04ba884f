//! Continuous validation: every agent's behaviour, watched as it happens.
//! The broker reports what it sees (credential requests and their
//! denials, failed logins, task opens with their source address) to
//! [`Validation::observe`], which keeps per-agent signals in memory over
//! sliding windows and answers with the `[[detectors]]` that fired. The
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
/// The most observations kept per agent (the longest window's worth,
/// capped).
const MAX_EVENTS: usize = 10_000;

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

#[derive(Debug, Clone)]
struct Event {
    at: i64,
    obs: Observation,
}

#[derive(Debug, Default)]
struct AgentSignals {
    events: VecDeque<Event>,
    /// Networks (/24 for IPv4, /48 for IPv6) and scopes seen since the
    /// last reset, and how many observations taught them.
    networks: BTreeSet<String>,
    scopes: BTreeSet<String>,
    learned: u32,
    /// Per detector: until when it stays quiet after firing.
    quiet_until: HashMap<String, i64>,
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
        let longest = self
            .detectors
            .iter()
            .map(|d| d.window_secs as i64)
            .max()
            .unwrap_or(0);
        while a.events.front().is_some_and(|e| e.at <= now - longest)
            || a.events.len() >= MAX_EVENTS
        {
            a.events.pop_front();
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
        a.events.push_back(Event {
            at: now,
            obs: obs.clone(),
        });

        let mut fired = Vec::new();
        for d in &self.detectors {
            if a.quiet_until.get(&d.name).is_some_and(|t| *t > now) {
                continue;
            }
            let since = now - d.window_secs as i64;
            let recent = || a.events.iter().filter(|e| e.at > since);
            let (observed, hit) = match d.signal {
                Signal::Denials => {
                    let n = recent()
                        .filter(|e| matches!(e.obs, Observation::Request { denied: true, .. }))
                        .count() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::CredentialRequests => {
                    let n = recent()
                        .filter(|e| matches!(e.obs, Observation::Request { .. }))
                        .count() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::FailedAuth => {
                    let n = recent()
                        .filter(|e| matches!(e.obs, Observation::AuthFailure { .. }))
                        .count() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::DistinctScopes => {
                    let n = recent()
                        .filter_map(|e| match &e.obs {
                            Observation::Request { scope, .. } => Some(scope.as_str()),
                            _ => None,
                        })
                        .collect::<BTreeSet<_>>()
                        .len() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::SourceAddresses => {
                    let n = recent()
                        .filter_map(|e| source_of(&e.obs))
                        .collect::<BTreeSet<_>>()
                        .len() as u64;
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
