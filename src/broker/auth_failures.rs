//! Failed authentications: counted, logged with a claimed client id cut to
//! a safe length, and audited — the first of a kind at once, repeats as one
//! counted event per interval.

use super::Broker;
use super::sessions::OAuthError;
use crate::audit::{Actor, AuditEvent};

impl Broker {
    /// Counts, logs and audits a failed token request, with the client id
    /// the caller claimed (if any; cut to a safe length). The first failure
    /// from a source for a client in an interval is audited at once; the
    /// rest of the burst as one count when the interval ends
    /// ([`Broker::flush_auth_failures`]).
    pub async fn record_auth_failure(
        &self,
        source: Option<std::net::IpAddr>,
        claimed: Option<String>,
        e: &OAuthError,
    ) {
        self.metrics.auth("failure");
        let claimed = claimed.map(|c| crate::limits::claimed_label(&c));
        let source = source.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        let failure = format!(
            "{}: {}",
            e.error,
            crate::limits::claimed_label(&e.description)
        );
        tracing::info!(client_id = ?claimed, %source, error = e.error, reason = %failure, "authentication failed");
        if !self
            .auth_failures
            .record(&source, claimed.as_deref().unwrap_or(""), &failure)
        {
            return;
        }
        let mut ev = AuditEvent::new(&Actor::Unauthenticated(claimed.clone()), "auth.token")
            .failure(failure)
            .details(serde_json::json!({ "source": source }));
        if let Some(c) = &claimed {
            ev = ev.agent(c);
        }
        if let Err(err) = self.audit_alone(ev).await {
            tracing::error!(error = %err, "cannot audit an authentication failure");
        }
    }

    /// Counts and audits a failed operator authentication (an unknown
    /// token at the API or the console's sign-in, a departed operator's
    /// token at the API) as token failures are:
    /// the first of a burst at once, repeats as one counted event when the
    /// interval ends, so a flood of bad tokens cannot fill the audit log.
    pub async fn record_operator_auth_failure(
        &self,
        source: Option<std::net::IpAddr>,
        operator: Option<&str>,
        why: &str,
    ) {
        self.metrics.auth("failure");
        let source = source.map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        tracing::info!(%source, ?operator, reason = %why, "operator authentication failed");
        if !self
            .auth_failures
            .record(&source, operator.unwrap_or(""), why)
        {
            return;
        }
        let ev = AuditEvent::new(
            &Actor::Unauthenticated(operator.map(str::to_owned)),
            "operator.auth",
        )
        .failure(why.to_owned())
        .details(serde_json::json!({ "source": source }));
        if let Err(err) = self.audit_alone(ev).await {
            tracing::error!(error = %err, "cannot audit an operator authentication failure");
        }
    }

    /// Audits the failures counted since the first of each burst (all of
    /// them with `all`, at shutdown): one `auth.token_failures` event per
    /// source and client. Returns how many events were written.
    pub async fn flush_auth_failures(&self, all: bool) -> super::BrokerResult<usize> {
        let counts = self.auth_failures.drain(all);
        if counts.is_empty() {
            return Ok(0);
        }
        let mut tx = self.store.begin().await?;
        for c in &counts {
            let claimed = (!c.client_id.is_empty()).then(|| c.client_id.clone());
            let mut ev = AuditEvent::new(
                &Actor::Unauthenticated(claimed.clone()),
                "auth.token_failures",
            )
            .failure(c.error.clone())
            .details(serde_json::json!({
                "source": c.source, "count": c.count,
                "interval_secs": self.auth_failures.interval().as_secs(),
            }));
            if let Some(cid) = claimed {
                ev = ev.agent(&cid);
            }
            tx.audit(ev).await?;
        }
        tx.commit().await?;
        Ok(counts.len())
    }
}
