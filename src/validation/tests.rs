//! Continuous validation's windows and novelties, against a recount.

#![allow(clippy::unwrap_used)]

use super::*;
use std::collections::BTreeSet;

fn detector(name: &str, signal: Signal, threshold: u32, window_secs: u64) -> DetectorConfig {
    DetectorConfig {
        name: name.into(),
        signal,
        threshold,
        window_secs,
        severity: Severity::High,
        action: Action::Record,
        dry_run: false,
        stale_after_days: None,
        scope: None,
        step_up_scopes: None,
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
        detector("n", Signal::Renewals, u32::MAX, 4),
        detector("q", Signal::ApprovalRequests, u32::MAX, 6),
        DetectorConfig {
            scope: Some("s1".into()),
            ..detector("sr", Signal::CredentialRequests, u32::MAX, 5)
        },
        DetectorConfig {
            scope: Some("s2".into()),
            ..detector("sd", Signal::Denials, u32::MAX, 9)
        },
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
        let obs = match (x >> 33) % 6 {
            5 => Observation::ApprovalRequested,
            0 => Observation::AuthFailure {
                source: Some(ip.parse().unwrap()),
            },
            4 => Observation::Renewed {
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
                    _ => inside.map(|(_, o)| counted(d, o)).sum(),
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

/// 2025-12-01 00:00 UTC, a Monday.
const MONDAY: i64 = 1_764_547_200;

/// One simulated week of an agent that works weekdays 9 to 17 (five or
/// six requests an hour) and asks for one thing some nights.
fn working_week(v: &Validation, agent: &str, week: i64) -> usize {
    let mut fired = 0;
    for day in 0..7 {
        for hour in 0..24 {
            let t = MONDAY + week * 7 * 86_400 + day * 86_400 + hour * 3600;
            let n = match (day, hour) {
                (0..=4, 9..=16) => 5 + (day + hour) % 2,
                (_, 2) if day % 3 == 0 => 1,
                _ => 0,
            };
            for i in 0..n {
                fired += v
                    .observe(agent, request("s3", false, "10.0.0.1"), t + i * 300)
                    .len();
            }
        }
    }
    fired
}

fn baseline_detector() -> DetectorConfig {
    detector("rate", Signal::RequestRateBaseline, 4, 60)
}

#[test]
fn a_normal_week_raises_nothing_and_a_night_burst_is_caught_at_once() {
    let v = Validation::new(ValidationConfig::default(), vec![baseline_detector()]);
    assert_eq!(working_week(&v, "a", 0), 0);
    assert_eq!(working_week(&v, "a", 1), 0, "the second week is as normal");
    assert_eq!(working_week(&v, "a", 2), 0);
    // Tuesday 03:00 of week four (each hour of the week has learned three
    // times): a burst. It fires at the request that
    // passes four deviations, once for the hour.
    let t = MONDAY + 21 * 86_400 + 86_400 + 3 * 3600;
    let mut at = None;
    for i in 0..40 {
        let fired = v.observe("a", request("s3", false, "10.0.0.1"), t + i);
        if !fired.is_empty() {
            assert!(at.is_none(), "one incident per unusual hour");
            at = Some(i);
            let ev = &fired[0].evidence;
            assert_eq!(ev["baseline"]["basis"], "hour_of_week", "{ev}");
        }
    }
    assert!(at.is_some_and(|i| i < 10), "fired at request {at:?}");
}

#[test]
fn the_baseline_is_relearned_after_a_change_and_saved_in_snapshots() {
    let v = Validation::new(ValidationConfig::default(), vec![baseline_detector()]);
    working_week(&v, "a", 0);
    // Saved, read back by another process: the burst is still caught.
    let saved = v.take_snapshots();
    assert_eq!(saved.len(), 1);
    assert!(v.take_snapshots().is_empty(), "nothing changed since");
    let restarted = Validation::new(ValidationConfig::default(), vec![baseline_detector()]);
    assert_eq!(restarted.restore(saved), 1);
    let night = MONDAY + 7 * 86_400 + 3 * 3600;
    let burst = |v: &Validation| {
        (0..40)
            .map(|i| {
                v.observe("a", request("s3", false, "10.0.0.1"), night + i)
                    .len()
            })
            .sum::<usize>()
    };
    assert_eq!(burst(&restarted), 1);
    // Saved again mid-hour and read back by a third process: the hour has
    // had its incident, and a burst in the next hour has its own.
    let again = Validation::new(ValidationConfig::default(), vec![baseline_detector()]);
    assert_eq!(again.restore(restarted.take_snapshots()), 1);
    assert_eq!(burst(&again), 0, "one incident per unusual hour");
    let next = |v: &Validation| {
        (0..40)
            .map(|i| {
                v.observe("a", request("s3", false, "10.0.0.1"), night + 3600 + i)
                    .len()
            })
            .sum::<usize>()
    };
    assert_eq!(next(&again), 1);
    // A legitimate change: what the agent does next is learned, not judged.
    v.relearn(Some("a"));
    assert_eq!(burst(&v), 0);
    // A snapshot that cannot be read is dropped, not fatal.
    let garbage = Snapshot {
        agent: "b".into(),
        state: "{not json".into(),
    };
    assert_eq!(restarted.restore(vec![garbage]), 0);
}

#[test]
fn delegation_targets_and_denied_approvals_are_signals() {
    let v = Validation::new(
        ValidationConfig {
            warm_up_observations: 2,
            ..ValidationConfig::default()
        },
        vec![
            detector("delegate", Signal::NewDelegationTarget, 0, 60),
            detector("denied", Signal::ApprovalDenials, 1, 60),
        ],
    );
    let delegated = |target: &str| Observation::Delegated {
        target: target.into(),
        source: None,
    };
    assert!(v.observe("a", delegated("b"), 1).is_empty());
    assert!(v.observe("a", delegated("b"), 2).is_empty());
    assert!(v.observe("a", delegated("b"), 3).is_empty());
    let t = v.observe("a", delegated("c"), 4);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].evidence["target"], "c");
    // Denied approvals are a human's doing: they teach nothing, and two in
    // the window pass a threshold of one.
    assert!(v.observe("a", Observation::ApprovalDenied, 5).is_empty());
    let t = v.observe("a", Observation::ApprovalDenied, 6);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].detector.name, "denied");
}

#[test]
fn a_scope_not_used_for_its_stale_days_is_new_again() {
    let mut stale = detector("stale-scope", Signal::NewScope, 0, 60);
    stale.stale_after_days = Some(30);
    let v = Validation::new(
        ValidationConfig {
            warm_up_observations: 1,
            ..ValidationConfig::default()
        },
        vec![stale, detector("new-scope", Signal::NewScope, 0, 60)],
    );
    let day = 86_400;
    assert!(
        v.observe("a", request("s", false, "10.0.0.1"), 0)
            .is_empty()
    );
    assert!(
        v.observe("a", request("s", false, "10.0.0.1"), 10 * day)
            .is_empty()
    );
    // Thirty days after its last use (day 10), not after its first.
    assert!(
        v.observe("a", request("s", false, "10.0.0.1"), 39 * day)
            .is_empty()
    );
    let t = v.observe("a", request("s", false, "10.0.0.1"), 70 * day);
    let names: Vec<_> = t.iter().map(|t| t.detector.name.as_str()).collect();
    assert_eq!(names, ["stale-scope"], "only the detector that forgets");
    assert_eq!(t[0].evidence["known_scopes"], 1);
    assert!(t[0].evidence["last_seen"].is_string(), "{}", t[0].evidence);
    assert!(
        config::validate(
            &ValidationConfig::default(),
            &[DetectorConfig {
                stale_after_days: Some(3),
                ..detector("d", Signal::Denials, 1, 60)
            }]
        )
        .is_err_and(|e| e.contains("novelties"))
    );
}

#[test]
fn a_firing_whose_response_was_not_recorded_fires_again() {
    let v = Validation::new(
        ValidationConfig::default(),
        vec![detector("burst", Signal::Denials, 2, 60)],
    );
    let deny = |at: i64| {
        v.observe("a", request("s3", true, "10.0.0.1"), MONDAY + at)
            .len()
    };
    assert_eq!((0..3).map(deny).sum::<usize>(), 1);
    assert_eq!(deny(3), 0, "quiet for its window once it fired");
    // Its incident could not be committed: not kept quiet.
    v.not_fired("a", "burst");
    assert_eq!(deny(4), 1);
}
