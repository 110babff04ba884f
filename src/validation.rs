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
//! Windows are per replica and start empty at each start. What an agent
//! has been seen to do (networks, scopes, delegates, its learned hourly
//! rate) is saved to the store every `snapshot_secs` and read back at
//! start, so a restart does not put every agent back in its warm-up. The
//! incidents detectors raise are durable, in the audit log every replica
//! reads.

mod baseline;
mod config;
mod forget;
mod respond;
mod snapshot;

pub use crate::model::StepUp;
pub use config::{
    Action, DetectorConfig, Severity, Signal, StepUpScopes, ValidationConfig, validate,
};
pub use respond::{Incident, IncidentState};
pub use snapshot::Snapshot;

use baseline::Baseline;
use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// A delegation (token exchange) to `target`.
    Delegated {
        target: String,
        source: Option<IpAddr>,
    },
    /// A human denied an approval of the agent's request.
    ApprovalDenied,
    /// One of its credential requests now waits for a human.
    ApprovalRequested,
    /// A credential of the agent's renewed.
    Renewed { source: Option<IpAddr> },
}

/// One second of an agent's observations, folded.
#[derive(Debug, Default)]
struct Bucket {
    sec: i64,
    requests: u32,
    denials: u32,
    failures: u32,
    approval_denials: u32,
    approval_requests: u32,
    renewals: u32,
    /// Scopes of the denied requests, with how often.
    denied_scopes: Vec<(String, u32)>,
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

/// What an agent has been seen to do since its last change: saved in
/// snapshots, forgotten on a change of its policy or registry entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Learned {
    /// Networks (/24 for IPv4, /48 for IPv6), granted scopes and
    /// delegation targets seen, each with when it was last seen (unix s).
    networks: BTreeMap<String, i64>,
    scopes: BTreeMap<String, i64>,
    #[serde(default)]
    delegates: BTreeMap<String, i64>,
    /// How many observations taught them.
    observations: u32,
    /// The learned hourly request rate (with a `request_rate_baseline`
    /// detector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    baseline: Option<Baseline>,
}

/// The most of each novelty kept per agent: past it an agent's novelties
/// are no longer learned (and so keep being flagged), instead of memory
/// growing without bound.
const MAX_LEARNED: usize = 4_096;

fn learn(seen: &mut BTreeMap<String, i64>, value: String, now: i64) {
    if let Some(t) = seen.get_mut(&value) {
        *t = (*t).max(now);
    } else if seen.len() < MAX_LEARNED {
        seen.insert(value, now);
    }
}

/// For a novelty's evidence: how many other values were known, and when
/// this one was last seen if it was (a stale value).
fn known(seen: &BTreeMap<String, i64>, last: Option<Option<i64>>) -> (usize, Option<String>) {
    let last = last.flatten();
    let others = seen.len().saturating_sub(usize::from(last.is_none()));
    (
        others,
        last.map(|t| crate::model::rfc3339(crate::model::from_unix(t))),
    )
}

/// Whether a novelty detector takes a value last seen at `last` (`None`:
/// never) as new at `now`: never seen, or not for `stale_after_days`.
fn novel(d: &DetectorConfig, last: Option<i64>, now: i64) -> bool {
    match (last, d.stale_after_days) {
        (None, _) => true,
        (Some(t), Some(days)) => now - t > i64::from(days) * 86_400,
        (Some(_), None) => false,
    }
}

#[derive(Debug, Default)]
struct AgentSignals {
    buckets: VecDeque<Bucket>,
    /// Absolute index of `buckets[0]`.
    base: u64,
    /// Per detector, in `detectors` order.
    running: Vec<Running>,
    learned: Learned,
    /// Changed since the last snapshot.
    dirty: bool,
    /// Per detector: until when it stays quiet after firing.
    quiet_until: HashMap<String, i64>,
}

/// What `obs` adds to a detector's counting signal (of its `scope` only,
/// when it names one).
fn counted(d: &DetectorConfig, obs: &Observation) -> u64 {
    if let (Some(only), Observation::Request { scope, .. }) = (&d.scope, obs)
        && only != scope
    {
        return 0;
    }
    match (d.signal, obs) {
        (Signal::Denials, Observation::Request { denied: true, .. })
        | (Signal::CredentialRequests, Observation::Request { .. })
        | (Signal::FailedAuth, Observation::AuthFailure { .. })
        | (Signal::ApprovalDenials, Observation::ApprovalDenied)
        | (Signal::ApprovalRequests, Observation::ApprovalRequested)
        | (Signal::Renewals, Observation::Renewed { .. }) => 1,
        _ => 0,
    }
}

/// The count of `key` in a bucket's per-value list.
fn count_of(list: &[(String, u32)], key: &str) -> u32 {
    list.iter()
        .find(|(k, _)| k == key)
        .map(|(_, n)| *n)
        .unwrap_or(0)
}

/// The bucket's share of a detector's counting signal.
fn bucket_count(d: &DetectorConfig, b: &Bucket) -> u64 {
    u64::from(match (d.signal, &d.scope) {
        (Signal::Denials, Some(s)) => count_of(&b.denied_scopes, s),
        (Signal::CredentialRequests, Some(s)) => count_of(&b.scopes, s),
        (Signal::Denials, None) => b.denials,
        (Signal::CredentialRequests, None) => b.requests,
        (Signal::FailedAuth, _) => b.failures,
        (Signal::ApprovalDenials, _) => b.approval_denials,
        (Signal::ApprovalRequests, _) => b.approval_requests,
        (Signal::Renewals, _) => b.renewals,
        _ => 0,
    })
}

/// The value `obs` brings to a distinct signal.
fn distinct_key(signal: Signal, obs: &Observation) -> Option<String> {
    match (signal, obs) {
        (Signal::DistinctScopes, Observation::Request { scope, .. }) => Some(scope.clone()),
        (Signal::SourceAddresses, o) if teaches(o) => source_of(o).map(|ip| ip.to_string()),
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
    /// A file holding the unix seconds validation takes for now (tests
    /// only: see [`Validation::now`]).
    clock: Option<std::path::PathBuf>,
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
        | Observation::TaskOpened { source }
        | Observation::Delegated { source, .. }
        | Observation::Renewed { source } => *source,
        Observation::ApprovalDenied | Observation::ApprovalRequested => None,
    }
}

/// Whether the observation is the agent's own doing (and so teaches what
/// it normally does): a failed login may be anyone's, a denied approval a
/// human's.
fn teaches(obs: &Observation) -> bool {
    !matches!(
        obs,
        Observation::AuthFailure { .. } | Observation::ApprovalDenied
    )
}

impl Validation {
    pub fn new(config: ValidationConfig, detectors: Vec<DetectorConfig>) -> Self {
        // Debug builds only (what the tests run): a release build's clock
        // cannot be moved by its environment.
        let clock = if cfg!(debug_assertions) {
            std::env::var_os("KEYGATE_TEST_VALIDATION_CLOCK").map(std::path::PathBuf::from)
        } else {
            None
        };
        Self {
            config,
            detectors,
            agents: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// Now, in unix seconds: the system's, or in a debug build started
    /// with `KEYGATE_TEST_VALIDATION_CLOCK=<file>`, the number in that file
    /// (so a test can play an agent's week in seconds). Only continuous
    /// validation reads it; sessions and credentials keep real time.
    pub fn now(&self) -> i64 {
        self.clock
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| crate::model::now().unix_timestamp())
    }

    /// How often what agents learned is saved.
    pub fn snapshot_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.snapshot_secs.max(1))
    }

    fn keeps_baseline(&self) -> bool {
        self.detectors
            .iter()
            .any(|d| d.signal == Signal::RequestRateBaseline)
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
                    if *denied {
                        bump(&mut b.denied_scopes, scope.clone());
                    }
                }
                Observation::ApprovalRequested => b.approval_requests += 1,
                Observation::AuthFailure { .. } => b.failures += 1,
                Observation::ApprovalDenied => b.approval_denials += 1,
                Observation::Renewed { .. } => b.renewals += 1,
                Observation::TaskOpened { .. } | Observation::Delegated { .. } => {}
            }
            if let Some(ip) = source_of(&obs).filter(|_| teaches(&obs)) {
                bump(&mut b.sources, ip);
            }
        }
        // Each detector adds the observation and lets go of the buckets
        // that left its window.
        for (d, r) in self.detectors.iter().zip(a.running.iter_mut()) {
            r.count += counted(d, &obs);
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
                r.count = r.count.saturating_sub(bucket_count(d, b));
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
        let l = &mut a.learned;
        let warm = l.observations >= self.config.warm_up_observations;
        // Only what the agent did is new about it: anyone who knows its id
        // can fail a login as it, from anywhere (`teaches`).
        let net = source_of(&obs).filter(|_| teaches(&obs)).map(network);
        // Per novelty: whether the observation has one, and when its value
        // was last seen.
        let last = |seen: &BTreeMap<String, i64>, k: &str| seen.get(k).copied();
        let seen_network = net.as_ref().map(|n| last(&l.networks, n));
        let seen_scope = match &obs {
            Observation::Request {
                scope,
                denied: false,
                ..
            } => Some(last(&l.scopes, scope)),
            _ => None,
        };
        let seen_delegate = match &obs {
            Observation::Delegated { target, .. } => Some(last(&l.delegates, target)),
            _ => None,
        };
        let deviation = match (&obs, self.keeps_baseline()) {
            (Observation::Request { .. }, true) => l
                .baseline
                .get_or_insert_with(|| Baseline::new(now))
                .request(
                    now,
                    self.config.baseline_alpha,
                    self.config.baseline_min_samples,
                ),
            _ => None,
        };
        if teaches(&obs) {
            if let Some(n) = net {
                learn(&mut l.networks, n, now);
            }
            match &obs {
                Observation::Request {
                    scope,
                    denied: false,
                    ..
                } => learn(&mut l.scopes, scope.clone(), now),
                Observation::Delegated { target, .. } => {
                    learn(&mut l.delegates, target.clone(), now)
                }
                _ => {}
            }
            l.observations = l.observations.saturating_add(1);
            a.dirty = true;
        }

        let mut fired = Vec::new();
        for (d, r) in self.detectors.iter().zip(&a.running) {
            if a.quiet_until.get(&d.name).is_some_and(|t| *t > now) {
                continue;
            }
            let (observed, hit) = match d.signal {
                Signal::Denials
                | Signal::CredentialRequests
                | Signal::FailedAuth
                | Signal::ApprovalDenials
                | Signal::ApprovalRequests
                | Signal::Renewals => (r.count, r.count > u64::from(d.threshold)),
                Signal::DistinctScopes | Signal::SourceAddresses => {
                    let n = r.distinct.len() as u64;
                    (n, n > u64::from(d.threshold))
                }
                Signal::NewSourceNetwork | Signal::NewScope | Signal::NewDelegationTarget => {
                    let seen = match d.signal {
                        Signal::NewSourceNetwork => seen_network,
                        Signal::NewScope => seen_scope,
                        _ => seen_delegate,
                    };
                    let hit = warm && seen.is_some_and(|last| novel(d, last, now));
                    (u64::from(hit), hit)
                }
                Signal::RequestRateBaseline => match &deviation {
                    // Fired this hour already, before a restart read the
                    // baseline back (the quiet period is not saved).
                    _ if a
                        .learned
                        .baseline
                        .as_ref()
                        .is_some_and(|b| b.fired_this_hour(&d.name)) =>
                    {
                        (0, false)
                    }
                    Some(dev) => (u64::from(dev.observed), dev.sigmas > d.threshold as f32),
                    None => (0, false),
                },
            };
            if !hit {
                continue;
            }
            let mut quiet = now + d.window_secs as i64;
            if let (Signal::RequestRateBaseline, Some(b)) = (d.signal, &mut a.learned.baseline) {
                // One incident per unusual hour.
                quiet = quiet.max(b.hour_ends());
                b.mark_fired(&d.name);
                a.dirty = true;
            }
            a.quiet_until.insert(d.name.clone(), quiet);
            let l = &a.learned;
            let evidence = match d.signal {
                Signal::NewSourceNetwork => {
                    let (n, last_seen) = known(&l.networks, seen_network);
                    serde_json::json!({
                        "network": source_of(&obs).map(network),
                        "known_networks": n,
                        "last_seen": last_seen,
                    })
                }
                Signal::NewScope => {
                    let (n, last_seen) = known(&l.scopes, seen_scope);
                    serde_json::json!({
                        "scope": match &obs { Observation::Request { scope, .. } => Some(scope), _ => None },
                        "known_scopes": n,
                        "last_seen": last_seen,
                    })
                }
                Signal::NewDelegationTarget => {
                    let (n, last_seen) = known(&l.delegates, seen_delegate);
                    serde_json::json!({
                        "target": match &obs { Observation::Delegated { target, .. } => Some(target), _ => None },
                        "known_targets": n,
                        "last_seen": last_seen,
                    })
                }
                Signal::RequestRateBaseline => serde_json::json!({
                    "baseline": deviation,
                    "threshold_sigmas": d.threshold,
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
}

#[cfg(test)]
mod tests;
