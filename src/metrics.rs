//! Prometheus metrics served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which limit refused: `address`, `client` or `agent`.
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LevelLabels {
    /// A maturity level: `initial` … `optimizing`.
    pub level: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabels {
    /// A configured `[[detectors]]` name.
    pub detector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: String,
    pub outcome: String,
}

/// The broker's counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub authentications: Family<OutcomeLabels, Counter>,
    pub credentials: Family<ScopeLabels, Counter>,
    pub revocations: Family<OutcomeLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub maturity: Family<LevelLabels, Gauge>,
    pub incidents: Family<DetectorLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let authentications = Family::<OutcomeLabels, Counter>::default();
        let credentials = Family::<ScopeLabels, Counter>::default();
        let revocations = Family::<OutcomeLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let maturity = Family::<LevelLabels, Gauge>::default();
        let incidents = Family::<DetectorLabels, Counter>::default();
        registry.register(
            "incidents",
            "Incidents continuous validation opened, by detector",
            incidents.clone(),
        );
        registry.register(
            "agents_by_maturity",
            "Agents (not decommissioned) at each maturity level, as of the last governance sweep",
            maturity.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by the limit that refused them",
            rate_limited.clone(),
        );
        registry.register(
            "authentications",
            "Token endpoint calls by outcome",
            authentications.clone(),
        );
        registry.register(
            "credentials",
            "Credential requests by scope and outcome",
            credentials.clone(),
        );
        registry.register(
            "revocation_attempts",
            "Provider revocation attempts by outcome",
            revocations.clone(),
        );
        Self {
            registry,
            authentications,
            credentials,
            revocations,
            rate_limited,
            maturity,
            incidents,
        }
    }
}

impl Metrics {
    pub fn incident(&self, detector: &str) {
        self.incidents
            .get_or_create(&DetectorLabels {
                detector: detector.into(),
            })
            .inc();
    }

    pub fn auth(&self, outcome: &str) {
        self.authentications
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn credential(&self, scope: &str, outcome: &str) {
        self.credentials
            .get_or_create(&ScopeLabels {
                scope: scope.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn revocation(&self, outcome: &str) {
        self.revocations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn limited(&self, limit: &str) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                limit: limit.into(),
            })
            .inc();
    }

    pub fn set_maturity(&self, level: &str, agents: usize) {
        self.maturity
            .get_or_create(&LevelLabels {
                level: level.into(),
            })
            .set(i64::try_from(agents).unwrap_or(i64::MAX));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
