//! An agent's learned request rate: per hour of the week (UTC), an
//! exponentially weighted mean and variance of how many credential requests
//! it made in that hour, learned as each hour closes. The hour in progress
//! is compared with its slot as requests arrive, so a burst is caught at
//! the request that makes it one, not when the hour ends.
//!
//! An hour-of-week slot learns once a week; until it has
//! `baseline_min_samples`, the hour-of-day slot (which learns every day)
//! stands in, and until that has them too the agent is warming up and
//! nothing is judged. The deviation is measured in standard deviations,
//! with a floor of the Poisson noise of the mean (√mean, at least 1): an
//! agent that makes exactly six requests every hour is not flagged for
//! making eight.

use serde::{Deserialize, Serialize};

/// Hours in a week; Monday 00:00 UTC is slot 0.
const WEEK: usize = 168;
/// The most closed hours one observation folds in: past two weeks of
/// silence every slot has already learned the agent was quiet.
const MAX_FOLD: i64 = 2 * WEEK as i64;

/// Mean and variance of one slot, and how many hours taught them (saved
/// as `[mean, var, n]`: 192 of them per agent in every snapshot).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(from = "(f32, f32, u16)", into = "(f32, f32, u16)")]
pub(super) struct Slot {
    mean: f32,
    var: f32,
    n: u16,
}

impl From<(f32, f32, u16)> for Slot {
    fn from((mean, var, n): (f32, f32, u16)) -> Self {
        // A snapshot edited by hand cannot poison the arithmetic.
        let finite = |x: f32| if x.is_finite() { x.max(0.0) } else { 0.0 };
        Self {
            mean: finite(mean),
            var: finite(var),
            n,
        }
    }
}

impl From<Slot> for (f32, f32, u16) {
    fn from(s: Slot) -> Self {
        (s.mean, s.var, s.n)
    }
}

impl Slot {
    fn learn(&mut self, x: f32, alpha: f32) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let d = x - self.mean;
            let step = alpha * d;
            self.mean += step;
            self.var = (1.0 - alpha) * (self.var + d * step);
        }
        self.n = self.n.saturating_add(1);
    }

    /// The spread a deviation is measured in.
    fn spread(&self) -> f32 {
        self.var
            .max(0.0)
            .sqrt()
            .max(self.mean.max(0.0).sqrt())
            .max(1.0)
    }
}

/// One agent's baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Baseline {
    /// The hour being counted (unix seconds / 3600) and its requests so far.
    hour: i64,
    count: u32,
    week: Vec<Slot>,
    day: Vec<Slot>,
    /// The rate detectors that fired in the hour being counted (saved with
    /// the rest, so a restart within the hour does not fire them again:
    /// one incident per unusual hour).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    fired: Vec<String>,
}

/// What the hour in progress is compared with.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Deviation {
    /// `hour_of_week` or `hour_of_day` (while the week is still young).
    pub basis: &'static str,
    pub slot: usize,
    pub samples: u16,
    pub baseline_mean: f32,
    pub baseline_stddev: f32,
    pub observed: u32,
    /// (observed − mean) / stddev.
    pub sigmas: f32,
}

fn hour_of_week(hour: i64) -> usize {
    // The epoch fell on a Thursday: 72 hours after a Monday 00:00.
    (hour + 72).rem_euclid(WEEK as i64) as usize
}

impl Baseline {
    pub fn new(now: i64) -> Self {
        Self {
            hour: now.div_euclid(3600),
            count: 0,
            week: vec![Slot::default(); WEEK],
            day: vec![Slot::default(); 24],
            fired: Vec::new(),
        }
    }

    /// Whether `detector` fired in the hour being counted.
    pub fn fired_this_hour(&self, detector: &str) -> bool {
        self.fired.iter().any(|d| d == detector)
    }

    /// `detector`'s firing in the hour being counted did not count.
    pub fn unmark_fired(&mut self, detector: &str) {
        self.fired.retain(|d| d != detector);
    }

    /// `detector` fired in the hour being counted.
    pub fn mark_fired(&mut self, detector: &str) {
        if !self.fired_this_hour(detector) {
            self.fired.push(detector.to_owned());
        }
    }

    /// Whether a snapshot read back has the shape this version keeps.
    pub fn well_formed(&self) -> bool {
        self.week.len() == WEEK && self.day.len() == 24
    }

    /// Closes the hours before `now`'s (each hour with no request learns a
    /// zero: quiet is part of the pattern). A clock that stepped back keeps
    /// counting the current hour.
    fn advance(&mut self, now: i64, alpha: f32) {
        let hour = now.div_euclid(3600);
        if hour <= self.hour {
            return;
        }
        let first_quiet = (self.hour + 1).max(hour - MAX_FOLD);
        if hour - self.hour <= MAX_FOLD {
            self.learn(self.hour, self.count as f32, alpha);
        }
        for h in first_quiet..hour {
            self.learn(h, 0.0, alpha);
        }
        self.hour = hour;
        self.count = 0;
        self.fired.clear();
    }

    fn learn(&mut self, hour: i64, x: f32, alpha: f32) {
        let w = hour_of_week(hour);
        self.week[w].learn(x, alpha);
        self.day[w % 24].learn(x, alpha);
    }

    /// Counts a request at `now` and compares the hour so far with what
    /// the agent usually does in this hour (`None` while warming up).
    pub fn request(&mut self, now: i64, alpha: f32, min_samples: u16) -> Option<Deviation> {
        self.advance(now, alpha);
        self.count = self.count.saturating_add(1);
        let w = hour_of_week(self.hour);
        let (basis, slot, s) = if self.week[w].n >= min_samples {
            ("hour_of_week", w, self.week[w])
        } else if self.day[w % 24].n >= min_samples {
            ("hour_of_day", w % 24, self.day[w % 24])
        } else {
            return None;
        };
        let spread = s.spread();
        Some(Deviation {
            basis,
            slot,
            samples: s.n,
            baseline_mean: s.mean,
            baseline_stddev: spread,
            observed: self.count,
            sigmas: (self.count as f32 - s.mean) / spread,
        })
    }

    /// When the hour being counted ends (unix seconds).
    pub fn hour_ends(&self) -> i64 {
        (self.hour + 1) * 3600
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MONDAY: i64 = 1_764_547_200; // 2025-12-01 00:00 UTC, a Monday

    #[test]
    fn monday_midnight_utc_is_slot_zero() {
        assert_eq!(hour_of_week(MONDAY / 3600), 0);
        assert_eq!(hour_of_week(MONDAY / 3600 + 167), 167);
        assert_eq!(hour_of_week(MONDAY / 3600 + 168), 0);
    }

    #[test]
    fn a_steady_hour_learns_its_mean_and_quiet_hours_learn_zero() {
        let mut b = Baseline::new(MONDAY);
        for day in 0..5 {
            let t = MONDAY + day * 86_400 + 10 * 3600;
            for i in 0..6 {
                b.request(t + i * 60, 0.3, 3);
            }
        }
        b.advance(MONDAY + 5 * 86_400, 0.3);
        let ten = b.day[10];
        assert_eq!(ten.n, 5);
        assert!((ten.mean - 6.0).abs() < 1e-3, "{ten:?}");
        // Every other hour of those days was quiet.
        assert!(b.day[3].mean.abs() < 1e-6 && b.day[3].n == 5);
        // Six an hour at ten is normal; fifty is not.
        let mut probe = b.clone();
        let d = (0..6)
            .map(|i| probe.request(MONDAY + 5 * 86_400 + 10 * 3600 + i, 0.3, 3))
            .last()
            .flatten()
            .unwrap();
        assert!(d.sigmas <= 0.0, "{d:?}");
        let d = (0..50)
            .map(|i| b.request(MONDAY + 5 * 86_400 + 10 * 3600 + i, 0.3, 3))
            .last()
            .flatten()
            .unwrap();
        assert!(d.sigmas > 10.0, "{d:?}");
        assert_eq!(d.basis, "hour_of_day");
    }

    #[test]
    fn a_snapshot_is_compact_and_reads_back() {
        let mut b = Baseline::new(MONDAY);
        for i in 0..30 {
            b.request(MONDAY + i * 1800, 0.3, 3);
        }
        let text = serde_json::to_string(&b).unwrap();
        assert!(text.len() < 4_000, "{} bytes", text.len());
        let back: Baseline = serde_json::from_str(&text).unwrap();
        assert!(back.well_formed());
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }

    #[test]
    fn a_long_silence_folds_a_bounded_number_of_hours() {
        let mut b = Baseline::new(MONDAY);
        b.request(MONDAY, 0.3, 3);
        b.advance(MONDAY + 365 * 86_400, 0.3);
        assert!(b.week.iter().all(|s| s.n == 2 && s.mean.abs() < 1e-6));
    }
}
