//! The conformance suite every Keygate provider passes, compiled once per
//! provider (as rustls runs one API suite against each crypto provider).
//!
//! A provider's test gives the suite a provider, a [`Case`] per scope kind,
//! and a [`Check`]: "does this credential work against the real backend
//! now?". [`run`] then checks, against the real backend:
//!
//! 1. issue → the credential works, and `expires_at` ≤ the requested expiry
//!    (and the backend's own remaining TTL ≤ the requested TTL, where the
//!    check can read it); a credential that can only expire, whose lifetime
//!    the backend fixes, may instead live up to the scope's `max_ttl`;
//! 2. revoke → the credential no longer works (for revocable credentials;
//!    a credential that can only expire must say until when, and a brokered
//!    read must say there was nothing to revoke);
//! 3. revoking twice answers as the first revoke did, revoking something
//!    never issued says nothing lives, and revoking by lease id alone
//!    (`handle: None`, an issue that crashed before its handle was
//!    recorded) kills what was created or says how long it lives;
//! 4. no secret value appears in the `Debug` output of the credential, the
//!    issue result, the handle or any error, nor in anything the provider
//!    logged meanwhile (a capturing `tracing` subscriber at TRACE level is
//!    installed around every provider call).
//!
//! Failures are returned as a readable list, never a panic, so the caller's
//! test decides how to fail.

mod capture;

use std::future::Future;
use std::time::Duration;

use keygate_provider_api::{
    AgentInfo, CredentialField, IssueRequest, Issued, Provider, Revocability, RevokeHandle,
    RevokeOutcome, RevokeRequest, ScopeSpec,
};
use serde_json::Value;
use time::OffsetDateTime;
use tracing::instrument::WithSubscriber;

pub use capture::LogCapture;

/// Asks the real backend whether a credential works now. The credential is
/// given as the agent would receive it (secrets exposed).
pub trait Check: Send + Sync {
    /// `Ok(true)` when the backend accepts the credential now.
    fn works(&self, credential: &Value) -> impl Future<Output = Result<bool, String>> + Send;

    /// The backend's own remaining lifetime of the credential, where it can
    /// be read (a token's `ttl`, a lease's `ttl`). `None` when unknown.
    fn backend_ttl(&self, _credential: &Value) -> impl Future<Output = Option<Duration>> + Send {
        async { None }
    }
}

/// A [`Check`] from a closure taking the exposed credential.
pub struct FnCheck<F>(pub F);

impl<F, Fut> Check for FnCheck<F>
where
    F: Fn(Value) -> Fut + Send + Sync,
    Fut: Future<Output = bool> + Send,
{
    fn works(&self, credential: &Value) -> impl Future<Output = Result<bool, String>> + Send {
        let fut = (self.0)(credential.clone());
        async move { Ok(fut.await) }
    }
}

/// One scope to put through the suite.
#[derive(Debug, Clone)]
pub struct Case {
    /// The scope as the provider sees it.
    pub scope: ScopeSpec,
    /// Per-request parameters the agent would send.
    pub request_params: Value,
    /// The lease TTL to request (keep it well under the scope's `max_ttl`).
    pub ttl: Duration,
    /// A handle naming something this provider never issued (or that is long
    /// gone), e.g. a made-up accessor or serial. Revoking it must succeed.
    pub never_issued: Option<RevokeHandle>,
}

/// What a run saw, for the caller's own assertions and messages.
#[derive(Debug, Default)]
pub struct Report {
    /// The checks that passed, in order.
    pub passed: Vec<String>,
    /// The checks that failed, with why.
    pub failed: Vec<String>,
    /// How many distinct secret values were searched for in the output.
    pub secrets_checked: usize,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            self.passed.push(name.to_owned());
        } else {
            self.failed.push(format!("{name}: {}", why()));
        }
    }

    /// `Ok` when every check passed; otherwise every failure, one a line.
    pub fn into_result(self) -> Result<Self, String> {
        if self.failed.is_empty() {
            Ok(self)
        } else {
            Err(self.failed.join("\n"))
        }
    }
}

/// The agent every conformance lease is issued to.
pub fn test_agent() -> AgentInfo {
    AgentInfo {
        id: "conformance-agent".into(),
        team: "conformance".into(),
        sponsor: "owner@keygate.test".into(),
        environment: "test".into(),
        risk_tier: 2,
    }
}

/// Logged through the capture first, to prove it captures.
const CAPTURE_MARKER: &str = "conformance log capture is on";

/// How long [`run`] waits for a revoked credential to stop working.
const REVOKE_DEADLINE: Duration = Duration::from_secs(15);

/// Runs the whole suite for one case.
pub async fn run(provider: &dyn Provider, case: &Case, check: &impl Check) -> Report {
    let mut suite = Suite::new(provider, case);
    suite
        .logs
        .around(async { tracing::trace!("{CAPTURE_MARKER}") })
        .await;
    // A task spawned outside any call's subscriber (as a provider's
    // background renewer is) must be captured too.
    let spawned = format!("conformance spawned-task capture {}", nonce());
    let line = spawned.clone();
    let _ = tokio::spawn(async move { tracing::trace!("{line}") }).await;
    let issued = match suite.logs.around(provider.issue(&suite.req)).await {
        Ok(i) => i,
        Err(e) => {
            suite
                .report
                .check("issue", false, || format!("{e} ({e:?})"));
            return suite.report;
        }
    };
    suite.report.check("issue", true, String::new);
    suite.debug(&issued);
    suite.debug(&issued.credential);
    let exposed = issued.credential.expose_to_agent();
    suite.check_issued(&issued, &exposed, check).await;
    suite.check_revocations(&issued, &exposed, check).await;
    suite.check_orphan(check).await;
    suite.check_expired_lease(&issued).await;
    let secrets = secret_values(&issued);
    let logs = suite.logs.text();
    suite.report.check(
        "logs of spawned tasks were captured",
        logs.contains(&spawned),
        || "a task spawned outside the provider's calls logged unseen: install no other global tracing subscriber in a conformance test binary".into(),
    );
    check_no_leaks(
        &mut suite.report,
        &secrets,
        &suite.debug_text,
        &issued.handle,
        &logs,
    );
    suite.report
}

/// One run's state: the request, the log capture, the text to search.
struct Suite<'a> {
    provider: &'a dyn Provider,
    case: &'a Case,
    req: IssueRequest,
    /// When the issue started (a bound for backend-fixed lifetimes).
    issued_from: OffsetDateTime,
    logs: LogCapture,
    report: Report,
    debug_text: String,
}

impl<'a> Suite<'a> {
    fn new(provider: &'a dyn Provider, case: &'a Case) -> Self {
        let req = IssueRequest {
            lease_id: format!("ls_conformance_{}", nonce()),
            task_id: format!("tk_conformance_{}", nonce()),
            agent: test_agent(),
            scope: case.scope.clone(),
            ttl: case.ttl,
            expires_at: OffsetDateTime::now_utc() + case.ttl,
            request_params: case.request_params.clone(),
        };
        Self {
            provider,
            case,
            issued_from: req.expires_at - case.ttl,
            req,
            logs: LogCapture::new(),
            report: Report::default(),
            debug_text: String::new(),
        }
    }

    fn debug(&mut self, v: &dyn std::fmt::Debug) {
        self.debug_text.push_str(&format!("{v:?}\n"));
    }

    fn revoke_req(
        &self,
        handle: Option<RevokeHandle>,
        lease: &str,
        issued: &Issued,
    ) -> RevokeRequest {
        RevokeRequest {
            lease_id: lease.to_owned(),
            scope: self.case.scope.clone(),
            handle,
            expires_at: issued.expires_at,
        }
    }

    async fn check_issued(&mut self, issued: &Issued, exposed: &Value, check: &impl Check) {
        let has_secret = !secret_values(issued).is_empty();
        self.report
            .check("credential has a secret field", has_secret, || {
                format!("no secret field in {:?}", issued.credential)
            });
        // A credential that can only expire may keep the lifetime its
        // backend gave it, up to the scope's max_ttl (see `IssueRequest::ttl`).
        let (want, lease) = match issued.revocability {
            Revocability::ExpiresAt => (
                self.issued_from + self.case.scope.max_ttl,
                self.case.scope.max_ttl,
            ),
            _ => (self.req.expires_at, self.case.ttl),
        };
        self.report.check(
            "expires_at within the lease",
            issued.expires_at <= want,
            || format!("{} is after {want}", issued.expires_at),
        );
        check_works(&mut self.report, check, exposed, true, "works after issue").await;
        let muted = tracing::subscriber::NoSubscriber::default();
        if let Some(ttl) = check.backend_ttl(exposed).with_subscriber(muted).await {
            self.report
                .check("backend ttl within the lease", ttl <= lease, || {
                    format!("backend says {ttl:?}, the lease allows {lease:?}")
                });
        }
    }

    async fn check_revocations(&mut self, issued: &Issued, exposed: &Value, check: &impl Check) {
        let lease_id = self.req.lease_id.clone();
        let req = self.revoke_req(Some(issued.handle.clone()), &lease_id, issued);
        let first = self.logs.around(self.provider.revoke(&req)).await;
        self.debug(&first);
        check_first_revoke(&mut self.report, issued, &first);
        if issued.revocability == Revocability::Revocable {
            check_works(
                &mut self.report,
                check,
                exposed,
                false,
                "no longer works after revoke",
            )
            .await;
        }
        let second = self.logs.around(self.provider.revoke(&req)).await;
        self.debug(&second);
        // Again: nothing is left, or (a backend that cannot revoke) it
        // still lives until the same time, never longer.
        let again_ok = match (issued.revocability, &second) {
            (Revocability::Revocable, Ok(RevokeOutcome::Revoked | RevokeOutcome::AlreadyGone)) => {
                true
            }
            (Revocability::ExpiresAt, Ok(RevokeOutcome::LivesUntil(t))) => *t <= issued.expires_at,
            (
                Revocability::ExpiresAt | Revocability::NotApplicable,
                Ok(RevokeOutcome::AlreadyGone),
            ) => true,
            _ => false,
        };
        self.report
            .check("revoke twice answers as the first did", again_ok, || {
                format!(
                    "revocability {:?}, second revoke said {second:?}",
                    issued.revocability
                )
            });
        if let Some(h) = self.case.never_issued.clone() {
            let req = self.revoke_req(Some(h), &format!("ls_never_{}", nonce()), issued);
            let r = self.logs.around(self.provider.revoke(&req)).await;
            self.debug(&r);
            // Nothing was issued: nothing can live on.
            self.report.check(
                "revoke of something never issued: nothing lives",
                matches!(r, Ok(RevokeOutcome::AlreadyGone | RevokeOutcome::Revoked)),
                || format!("{r:?}"),
            );
        }
    }

    /// The write-ahead contract: an issue whose handle was never recorded
    /// (a crash between the backend's answer and Keygate's commit) is
    /// revoked by lease id alone, `handle: None`. What it created must then
    /// be dead, or reported as living until a time no later than its end.
    async fn check_orphan(&mut self, check: &impl Check) {
        let mut req = self.req.clone();
        req.lease_id = format!("ls_orphan_{}", nonce());
        let issued = match self.logs.around(self.provider.issue(&req)).await {
            Ok(i) => i,
            Err(e) => {
                return self
                    .report
                    .check("issue for the orphan check", false, || format!("{e}"));
            }
        };
        self.debug(&issued);
        let exposed = issued.credential.expose_to_agent();
        let orphan = RevokeRequest {
            lease_id: req.lease_id.clone(),
            scope: self.case.scope.clone(),
            handle: None,
            expires_at: req.expires_at,
        };
        let r = self.logs.around(self.provider.revoke(&orphan)).await;
        self.debug(&r);
        match (&r, issued.revocability) {
            // "Gone" must be true: a backend that can revoke must have.
            (Ok(RevokeOutcome::Revoked | RevokeOutcome::AlreadyGone), Revocability::Revocable) => {
                check_works(
                    &mut self.report,
                    check,
                    &exposed,
                    false,
                    "no longer works after a revoke without its handle",
                )
                .await;
            }
            (
                Ok(RevokeOutcome::AlreadyGone),
                Revocability::NotApplicable | Revocability::ExpiresAt,
            ) => {
                self.report
                    .check("revoke without its handle", true, String::new);
            }
            // An orphan the backend cannot find is honestly bounded: it
            // lives until a time still ahead (the provider documents how it
            // bounds it, e.g. a role's max ttl).
            (Ok(RevokeOutcome::LivesUntil(t)), _) => {
                let now = OffsetDateTime::now_utc();
                self.report.check(
                    "an orphan it cannot find is bounded by a time ahead",
                    *t > now,
                    || format!("lives until {t}, which is not after now ({now})"),
                );
            }
            _ => self.report.check("revoke without its handle", false, || {
                format!(
                    "revocability {:?}, revoke by lease id alone said {r:?}",
                    issued.revocability
                )
            }),
        }
        // Clean up as the broker would once it learnt the handle: nothing
        // this check created outlives the run.
        let with_handle = RevokeRequest {
            handle: Some(issued.handle.clone()),
            ..orphan
        };
        let _ = self.logs.around(self.provider.revoke(&with_handle)).await;
    }

    /// An error path: a lease that has already expired must not be issued,
    /// and whatever the provider says about it must hold no secret.
    async fn check_expired_lease(&mut self, issued: &Issued) {
        let mut bad = self.req.clone();
        bad.lease_id = format!("ls_expired_{}", nonce());
        bad.expires_at = OffsetDateTime::now_utc() - Duration::from_secs(60);
        bad.ttl = Duration::ZERO;
        let r = self.logs.around(self.provider.issue(&bad)).await;
        self.report
            .check("an expired lease is not issued", r.is_err(), || {
                "it was issued".into()
            });
        match r {
            Ok(extra) => {
                let req = self.revoke_req(Some(extra.handle), &bad.lease_id, issued);
                let _ = self.provider.revoke(&req).await;
            }
            Err(e) => {
                self.debug(&e);
                self.debug_text.push_str(&format!("{e}\n"));
            }
        }
    }
}

fn check_first_revoke(
    report: &mut Report,
    issued: &Issued,
    first: &Result<RevokeOutcome, keygate_provider_api::ProviderError>,
) {
    let ok = match (issued.revocability, first) {
        (Revocability::Revocable, Ok(RevokeOutcome::Revoked)) => true,
        (Revocability::ExpiresAt, Ok(RevokeOutcome::LivesUntil(t))) => *t <= issued.expires_at,
        (Revocability::NotApplicable, Ok(RevokeOutcome::AlreadyGone)) => true,
        _ => false,
    };
    report.check("revoke answers as the revocability promised", ok, || {
        format!(
            "revocability {:?}, revoke said {first:?}",
            issued.revocability
        )
    });
}

async fn check_works(
    report: &mut Report,
    check: &impl Check,
    cred: &Value,
    want: bool,
    name: &str,
) {
    // A backend may take a moment to apply a revocation; poll, don't sleep.
    let deadline = tokio::time::Instant::now() + REVOKE_DEADLINE;
    loop {
        // The check's own calls (an SDK signing with the credential) are not
        // the provider's logs: they run without any subscriber.
        let muted = tracing::subscriber::NoSubscriber::default();
        match check.works(cred).with_subscriber(muted).await {
            Ok(got) if got == want => return report.check(name, true, String::new),
            Ok(got) if want || tokio::time::Instant::now() >= deadline => {
                return report.check(name, false, || format!("the backend says works = {got}"));
            }
            Err(e) => {
                return report.check(name, false, || format!("the backend check failed: {e}"));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn check_no_leaks(
    report: &mut Report,
    secrets: &[String],
    debug: &str,
    handle: &RevokeHandle,
    logs: &str,
) {
    report.secrets_checked = secrets.len();
    let handle = handle.0.to_string();
    for (where_, text) in [
        ("debug output and errors", debug),
        ("the revoke handle", &handle),
        ("logs", logs),
    ] {
        let leaked = secrets.iter().any(|s| text.contains(s.as_str()));
        report.check(&format!("no secret in {where_}"), !leaked, || {
            // Where, without the secret: the start of the first line with it.
            let line = text
                .lines()
                .find(|l| secrets.iter().any(|s| l.contains(s.as_str())))
                .unwrap_or_default();
            let mut shown = line.to_owned();
            for s in secrets {
                shown = shown.replace(s.as_str(), "[SECRET]");
            }
            let shown: String = shown.chars().take(240).collect();
            format!("a secret value appears in {where_}: {shown}")
        });
    }
    report.check("logs were captured", logs.contains(CAPTURE_MARKER), || {
        "the log capture saw nothing; the leak check would prove nothing".into()
    });
}

/// Every secret field's value (and, for multi-line values such as PEM keys,
/// each substantial line), to search for in output.
fn secret_values(issued: &Issued) -> Vec<String> {
    let exposed = issued.credential.expose_to_agent();
    let mut out = Vec::new();
    for name in issued.credential.field_names() {
        // Structured secrets: every string inside them.
        if let Some(CredentialField::SecretJson(_)) = issued.credential.get(name) {
            let mut stack: Vec<&Value> = exposed.get(name).into_iter().collect();
            while let Some(v) = stack.pop() {
                match v {
                    Value::String(s) => out.push(s.clone()),
                    Value::Array(a) => stack.extend(a),
                    Value::Object(o) => stack.extend(o.values()),
                    _ => {}
                }
            }
            continue;
        }
        if let Some(CredentialField::Secret(_)) = issued.credential.get(name)
            && let Some(v) = exposed.get(name).and_then(Value::as_str)
        {
            out.push(v.to_owned());
            out.extend(
                v.lines()
                    .map(str::trim)
                    .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                    .map(str::to_owned),
            );
        }
    }
    out.retain(|s| s.len() >= 6);
    out.sort();
    out.dedup();
    out
}

fn nonce() -> String {
    let t = OffsetDateTime::now_utc().unix_timestamp_nanos();
    format!("{t:x}")
}
