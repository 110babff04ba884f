//! `[validation]` and `[[detectors]]`.

use serde::{Deserialize, Serialize};

/// `[validation]`: what every detector shares.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Incidents record what would have been done, and nothing is done.
    pub dry_run: bool,
    /// Observations of an agent (requests, task opens) before its
    /// novelties (`new_scope`, `new_source_network`) count: what it does
    /// first, or first after a change to its policy or registry entry, is
    /// learned, not flagged.
    pub warm_up_observations: u32,
    /// How much each closed hour weighs in the learned request rate
    /// (`request_rate_baseline`): 0 < alpha <= 1, higher forgets sooner.
    pub baseline_alpha: f32,
    /// Hours a slot (an hour of the week, or of the day while the week is
    /// young) must have learned before the rate in it is judged.
    pub baseline_min_samples: u16,
    /// How often what each agent has been seen to do (networks, scopes,
    /// delegates, its learned rate) is saved to the store, so a restart
    /// does not start every agent's warm-up again. Windows are not saved.
    pub snapshot_secs: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            dry_run: false,
            warm_up_observations: 20,
            baseline_alpha: 0.2,
            baseline_min_samples: 3,
            snapshot_secs: 60,
        }
    }
}

/// What a detector watches, per agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Credential requests policy denied, in the window.
    Denials,
    /// Credential requests, in the window.
    CredentialRequests,
    /// Failed authentications claiming the agent, in the window.
    FailedAuth,
    /// Distinct scopes asked for, in the window.
    DistinctScopes,
    /// Distinct source addresses, in the window.
    SourceAddresses,
    /// A request or task from a network (/24, /48) the agent was not seen on.
    NewSourceNetwork,
    /// A credential granted for a scope the agent was not seen to use.
    NewScope,
    /// A delegation (token exchange) to an agent it was not seen to
    /// delegate to.
    NewDelegationTarget,
    /// Approvals of its requests a human denied, in the window.
    ApprovalDenials,
    /// Its credential requests that had to wait for a human, in the window.
    ApprovalRequests,
    /// Renewals of its credentials, in the window.
    Renewals,
    /// Credential requests this hour, against what the agent learned to do
    /// in this hour of the week: fires past `threshold` standard deviations.
    RequestRateBaseline,
}

impl Signal {
    fn counts(self) -> bool {
        !matches!(
            self,
            Self::NewSourceNetwork | Self::NewScope | Self::NewDelegationTarget
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// What happens when a detector fires (always: an incident in the audit
/// log, with the detector and its evidence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The incident only.
    Record,
    /// The incident, and a warning in the broker's log and metrics for
    /// whoever watches them.
    Alert,
    /// The agent's next credential requests need a human's approval (every
    /// scope, or only the sensitive ones even where policy would approve
    /// them itself: `step_up_scopes`) until an operator resolves the
    /// incident.
    StepUp,
    /// The kill switch for the agent: suspended, its tasks ended, its
    /// credentials revoked (fences where a provider needs them).
    Suspend,
}

/// Which requests a `step_up` sends to a human.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepUpScopes {
    /// Every scope.
    #[default]
    All,
    /// Sensitive scopes, with no automatic approval by policy.
    Sensitive,
}

/// One `[[detectors]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectorConfig {
    pub name: String,
    pub signal: Signal,
    /// A counting signal fires when it passes this within the window;
    /// novelties ignore it.
    #[serde(default)]
    pub threshold: u32,
    /// The window, and how long a detector that fired stays quiet for the
    /// agent.
    #[serde(default = "default_window")]
    pub window_secs: u64,
    pub severity: Severity,
    pub action: Action,
    /// This detector only records what it would do.
    #[serde(default)]
    pub dry_run: bool,
    /// For a novelty (`new_scope`, `new_source_network`,
    /// `new_delegation_target`): a value last seen longer ago than this
    /// counts as new again (`new_scope` with 30: a scope not used in 30
    /// days). Unset: once seen, known until the next change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_days: Option<u32>,
    /// `credential_requests` or `denials` of this scope only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// With `action = "step_up"`: which requests need a human.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_up_scopes: Option<StepUpScopes>,
}

fn default_window() -> u64 {
    300
}

/// Names unique and plain, windows positive, counting signals with a
/// threshold, the shared settings in range.
pub fn validate(v: &ValidationConfig, detectors: &[DetectorConfig]) -> Result<(), String> {
    if !(v.baseline_alpha > 0.0 && v.baseline_alpha <= 1.0) {
        return Err("`[validation]` `baseline_alpha` must be above 0 and at most 1".into());
    }
    if v.baseline_min_samples == 0 {
        return Err("`[validation]` `baseline_min_samples` must be at least 1".into());
    }
    if v.snapshot_secs == 0 {
        return Err("`[validation]` `snapshot_secs` must be at least 1".into());
    }
    let mut names = std::collections::BTreeSet::new();
    for d in detectors {
        if d.name.is_empty()
            || d.name.len() > 64
            || !d
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "`[[detectors]]` name `{}` must be 1 to 64 letters, digits, `-` or `_`",
                d.name
            ));
        }
        if !names.insert(d.name.as_str()) {
            return Err(format!("`[[detectors]]` `{}` is declared twice", d.name));
        }
        if d.window_secs == 0 || d.window_secs > 86_400 {
            return Err(format!(
                "`[[detectors]]` `{}`: `window_secs` must be 1 to 86400",
                d.name
            ));
        }
        if d.signal == Signal::FailedAuth && d.action == Action::Suspend {
            // Anyone who knows an agent's id can fail logins as it: a
            // suspension there would be a way to switch agents off.
            return Err(format!(
                "`[[detectors]]` `{}`: `failed_auth` cannot `suspend` (whoever knows the agent's id could fail logins to suspend it); use `alert` or `record`",
                d.name
            ));
        }
        if d.stale_after_days.is_some() && d.signal.counts() {
            return Err(format!(
                "`[[detectors]]` `{}`: `stale_after_days` applies to the novelties (`new_scope`, `new_source_network`, `new_delegation_target`) only",
                d.name
            ));
        }
        if d.stale_after_days == Some(0) {
            return Err(format!(
                "`[[detectors]]` `{}`: `stale_after_days` must be at least 1",
                d.name
            ));
        }
        if d.scope.is_some() && !matches!(d.signal, Signal::CredentialRequests | Signal::Denials) {
            return Err(format!(
                "`[[detectors]]` `{}`: `scope` applies to `credential_requests` and `denials` only",
                d.name
            ));
        }
        if d.step_up_scopes.is_some() && d.action != Action::StepUp {
            return Err(format!(
                "`[[detectors]]` `{}`: `step_up_scopes` applies to `action = \"step_up\"` only",
                d.name
            ));
        }
        if d.signal.counts() && d.threshold == 0 {
            return Err(format!(
                "`[[detectors]]` `{}`: a counting signal needs a `threshold` of at least 1 (it fires when the count passes it)",
                d.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(signal: Signal, threshold: u32, action: Action) -> DetectorConfig {
        DetectorConfig {
            name: "d".into(),
            signal,
            threshold,
            window_secs: 60,
            severity: Severity::Low,
            action,
            dry_run: false,
            stale_after_days: None,
            scope: None,
            step_up_scopes: None,
        }
    }

    #[test]
    fn detectors_that_cannot_work_or_could_be_abused_are_refused() {
        assert!(
            validate(
                &ValidationConfig::default(),
                &[d(Signal::Denials, 5, Action::Suspend)]
            )
            .is_ok()
        );
        assert!(
            validate(
                &ValidationConfig::default(),
                &[d(Signal::NewScope, 0, Action::Record)]
            )
            .is_ok()
        );
        let no_threshold = validate(
            &ValidationConfig::default(),
            &[d(Signal::Denials, 0, Action::Record)],
        );
        assert!(no_threshold.is_err_and(|e| e.contains("threshold")));
        let abusable = validate(
            &ValidationConfig::default(),
            &[d(Signal::FailedAuth, 3, Action::Suspend)],
        );
        assert!(abusable.is_err_and(|e| e.contains("cannot `suspend`")));
        let twice = validate(
            &ValidationConfig::default(),
            &[
                d(Signal::Denials, 1, Action::Record),
                d(Signal::Denials, 2, Action::Record),
            ],
        );
        assert!(twice.is_err_and(|e| e.contains("twice")));
    }
}
