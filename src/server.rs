//! The HTTP API (axum): routing, start-up and shutdown. Handlers are thin:
//! they authenticate, parse, call the broker and shape the answer.

mod admin;
mod agent;
mod approvals;
pub(crate) mod auth;
mod error;
mod governance;
mod incidents;
mod listen;
mod openapi;
mod ops;
mod reviews;
pub mod tls;

use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;

use crate::broker::{Broker, seed_agents};
use crate::config::Config;
use crate::identity::SessionSigner;
use crate::lease::{LeaseEngine, Worker};
use crate::metrics::Metrics;
use crate::policy::PolicyEngine;
use crate::providers::Registry;

pub use auth::find_operator;
pub use error::{ApiError, parse_json, parse_query};
pub use ops::log_requests;
pub use tls::ClientConn;

/// Shared state of every handler.
pub type AppState = Arc<Broker>;

/// Builds the broker from config: store, policy, signing key, providers, and
/// the agents seeded from `registry.seed_dir`.
pub async fn build_broker(config: Config) -> anyhow::Result<Broker> {
    // First what can fail without a side effect: provider tables, policies,
    // and every secret reference, resolved now (a missing Slack secret is a
    // start-up error, not a 500 at the first click).
    crate::providers::check_configs(&config)?;
    let policy_files = PolicyEngine::read_dir(&config.policy.dir)?;
    let policy = PolicyEngine::from_files(&policy_files)?;
    if policy.is_empty() {
        tracing::warn!(dir = %config.policy.dir.display(), "no policies loaded: every credential request will be denied");
    }
    let resolver = crate::providers::secret_resolver(&config).await?;
    for (setting, reference) in config.secret_references() {
        resolver
            .resolve(&reference)
            .await
            .map_err(|e| anyhow::anyhow!("`{setting}` ({reference}) cannot be read: {e}"))?;
    }
    let store_password =
        match &config.store.password {
            Some(reference) => Some(resolver.resolve(reference).await.map_err(|e| {
                anyhow::anyhow!("`store.password` ({reference}) cannot be read: {e}")
            })?),
            None => None,
        };
    let store = crate::store::open_with(&config.store.url, store_password.as_ref()).await?;
    check_providers_kept(store.as_ref(), &config).await?;
    // From here on this process serves: SQLite takes its file's lock,
    // PostgreSQL counts it among the live replicas.
    let leases = LeaseEngine::default();
    store.register_replica(leases.boot_id()).await?;
    // With provisioning approval on, files on disk that differ from the set
    // already active in the store are not simply made active by a start:
    // the broker starts on the active set and then reloads the files as a
    // reload would (below), so a widening waits for its approval.
    let (policy, policy_files, reload_disk) = match store.published_policy(policy.hash()).await? {
        Some((_, active)) if config.provisioning.require_approval => {
            match PolicyEngine::from_files(&active) {
                Ok(p) => (p, active, true),
                Err(e) => {
                    tracing::warn!(error = %e, "the policy set active in the store does not load; starting on the files on disk");
                    (policy, policy_files, false)
                }
            }
        }
        _ => (policy, policy_files, false),
    };
    // The set this replica starts with is every replica's (as a reload).
    store.publish_policy(policy.hash(), &policy_files).await?;
    let signer = SessionSigner::open(&config.sessions.signing_key_file, &config.server.issuer)?;
    let registry = Registry::build(&config, &resolver, store.revocation_journal()).await?;
    let config_federation = config.federation.issuers.clone();
    let config_limits = config.limits;
    let validation =
        crate::validation::Validation::new(config.validation, config.detectors.clone());
    // Every reference resolves through the same resolver (`aws-sm:` too).
    let notifier = crate::notify::Notifier::new(
        config.notify.clone(),
        config.public_url().to_owned(),
        resolver,
    )?;
    let broker = Broker {
        config,
        store,
        policy: crate::policy::PolicyHandle::new(policy),
        signer,
        registry,
        leases,
        metrics: Arc::new(Metrics::default()),
        notifier: Arc::new(notifier),
        federation: crate::identity::Federation::new(config_federation)?,
        approvals_changed: Arc::new(tokio::sync::Notify::new()),
        limits: crate::limits::RateLimits::new(&config_limits),
        auth_failures: crate::limits::AuthFailures::new(std::time::Duration::from_secs(
            config_limits.auth_failure_interval_secs,
        )),
        validation,
        revocation_looks: Default::default(),
        stopping: Default::default(),
        agents_changed: Default::default(),
        fences_changing: Default::default(),
    };
    if broker.validation.enabled() {
        let n = broker
            .validation
            .restore(broker.store.validation_states().await?);
        if n > 0 {
            tracing::info!(
                agents = n,
                "continuous validation: read back what agents were learned to do"
            );
        }
    }
    if reload_disk {
        let done = broker
            .reload_policy(&crate::audit::Actor::System, &Default::default())
            .await
            .map_err(|e| anyhow::anyhow!("reloading the policy files on disk: {e}"))?;
        match &done.held {
            Some(a) => {
                tracing::warn!(approval = %a.id, dir = %broker.config.policy.dir.display(), "the policy files on disk widen the active set: held for provisioning approval; the broker runs on the active set")
            }
            None => {
                tracing::info!(hash = %broker.policy.current().hash(), "the policy files on disk changed since the last run: reloaded")
            }
        }
    }
    if let Some(dir) = broker.config.registry.seed_dir.clone() {
        let n = seed_agents(&broker, &dir).await?;
        if n > 0 {
            tracing::info!(count = n, dir = %dir.display(), "registered seed agents");
        }
    }
    Ok(broker)
}

/// The cursor after a full page (`None`: the list ended here).
pub(crate) fn next_cursor<T>(
    rows: &[T],
    limit: Option<u32>,
    key: impl Fn(&T) -> (time::OffsetDateTime, &str),
) -> Option<String> {
    let last = rows.last()?;
    (rows.len() == crate::model::page_size(limit) as usize).then(|| {
        let (at, id) = key(last);
        crate::model::Cursor::of(at, id)
    })
}

/// A list page: when more rows follow, `Keygate-Next-Cursor` carries the
/// cursor and `Link: <…&cursor=…>; rel="next"` the next page's address, so a
/// full page never passes for the whole list.
pub(crate) fn paged(
    body: impl axum::response::IntoResponse,
    path: &str,
    query: Option<&str>,
    next: Option<String>,
) -> axum::response::Response {
    let mut resp = body.into_response();
    if let Some(cursor) = next {
        let mut q: Vec<(String, String)> =
            serde_urlencoded::from_str(query.unwrap_or_default()).unwrap_or_default();
        q.retain(|(k, _)| k != "cursor");
        q.push(("cursor".into(), cursor.clone()));
        let link = format!(
            "<{path}?{}>; rel=\"next\"",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        );
        let headers = resp.headers_mut();
        if let (Ok(c), Ok(l)) = (
            axum::http::HeaderValue::from_str(&cursor),
            axum::http::HeaderValue::from_str(&link),
        ) {
            headers.insert("keygate-next-cursor", c);
            headers.insert(axum::http::header::LINK, l);
        }
    }
    resp
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let limit = state.config.server.body_limit_bytes;
    let (router, _) = openapi::routes().split_for_parts();
    router
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            ops::limit_by_address,
        ))
        .layer(axum::middleware::from_fn(ops::json_errors))
        .layer(axum::middleware::from_fn(ops::log_requests))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Arc::clone(&state))
        // The web console's pages are HTML with their own headers and
        // errors; rate limiting per address applies to them too.
        .merge(crate::console::router(Arc::clone(&state)).layer(
            axum::middleware::from_fn_with_state(state, ops::limit_by_address),
        ))
}

/// Runs the broker until SIGINT/SIGTERM. Prints `keygate listening on ADDR`
/// on stdout once the socket is bound, for scripts and tests.
pub async fn serve(config_path: &Path, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let mut config = Config::load(config_path)?;
    crate::init_logging(config.server.log_format);
    if let Some(addr) = listen {
        config.server.listen = addr;
    }
    let broker = Arc::new(build_broker(config).await?);
    let worker = Arc::new(Worker {
        store: broker.store.clone(),
        registry: broker.registry.clone(),
        config: broker.config.leases.clone(),
        metrics: broker.metrics.clone(),
        engine: broker.leases.clone(),
    });
    // The reaper's first pass resumes what a previous run left: orphaned
    // pending leases, expired tasks, the revocation queue.
    worker.reap_once().await?;
    // So does the first governance sweep: what fell due while the broker
    // was down is acted on before it serves again.
    governance_pass(
        &broker,
        std::time::Duration::from_secs(broker.config.governance.sweep_interval_secs.max(1)),
    )
    .await;
    // Sweepers start after that pass, so they see its orphans as queued.
    worker.spawn_sweepers();
    tokio::spawn(Arc::clone(&worker).run_queue());
    tokio::spawn(worker.run_reaper());
    tokio::spawn(
        Arc::clone(&broker.notifier).run(broker.store.clone(), broker.leases.boot_id().to_owned()),
    );
    tokio::spawn(close_stale_approvals(Arc::clone(&broker)));
    tokio::spawn(flush_auth_failures(Arc::clone(&broker)));
    tokio::spawn(run_governance(Arc::clone(&broker)));
    tokio::spawn(reload_on_sighup(Arc::clone(&broker)));
    // Agents changed through other replicas are followed from the log's
    // head now, before this one serves: an earlier change was relearned by
    // the replicas running then, and reaches this one through their
    // snapshots.
    let mut seen = None;
    broker.follow_agent_changes(&mut seen).await?;
    tokio::spawn(follow_policy(Arc::clone(&broker), seen));
    tokio::spawn(snapshot_validation(Arc::clone(&broker)));
    let listener = TcpListener::bind(broker.config.server.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, issuer = %broker.config.server.issuer, policy_hash = %broker.policy.current().hash(), "keygate ready");
    println!("keygate listening on {addr}");
    let app = router(Arc::clone(&broker));
    let limits = broker.config.server.connections;
    if let Some(tls) = &broker.config.server.tls {
        let tls_listener = TcpListener::bind(tls.listen).await?;
        let acceptor = tls::acceptor(tls)?;
        let tls_addr = tls_listener.local_addr()?;
        tracing::info!(addr = %tls_addr, trust_domain = %tls.trust_domain, "mTLS listener ready");
        println!("keygate mtls listening on {tls_addr}");
        let tls_app = app.clone();
        // Stops with the plain listener (below), whose end ends `main`.
        let stopping = Arc::clone(&broker);
        tokio::spawn(listen::serve(
            tls_listener,
            Some(acceptor),
            tls_app,
            limits,
            async move { stopping.stopping.begun().await },
        ));
    }
    let stop = async {
        shutdown_signal().await;
        // Requests waiting for something answer now, with what they have,
        // rather than holding the drain below until it cuts them.
        broker.stopping.begin();
    };
    listen::serve(listener, None, app, limits, stop).await;
    // What agents were learned to do since the last snapshot is kept.
    save_validation(&broker).await;
    // Counted failures not yet in the audit log go in before exit.
    if let Err(e) = broker.flush_auth_failures(true).await {
        tracing::error!(error = %e, "auditing counted authentication failures failed");
    }
    // Providers release what they hold of their own (Vault: the login).
    for (_, p) in broker.registry.providers() {
        p.shutdown().await;
    }
    Ok(())
}

/// Saves what continuous validation learned of each agent, every
/// `snapshot_secs` (one transaction per pass, never per request).
async fn snapshot_validation(broker: AppState) {
    if !broker.validation.enabled() {
        return;
    }
    loop {
        tokio::time::sleep(broker.validation.snapshot_every()).await;
        save_validation(&broker).await;
    }
}

async fn save_validation(broker: &AppState) {
    let saved = broker.validation.take_snapshots();
    if saved.is_empty() {
        return;
    }
    let write = async {
        let mut tx = broker.store.begin().await?;
        let t = crate::model::now();
        for s in &saved {
            tx.save_validation_state(s, t).await?;
        }
        tx.commit().await
    };
    if let Err(e) = write.await {
        broker.validation.unsaved(&saved);
        tracing::error!(error = %e, agents = saved.len(), "saving continuous validation's learning failed");
    }
}

/// Audits counted authentication failures once their interval ends, and
/// lets rate limiters forget idle keys.
async fn flush_auth_failures(broker: AppState) {
    let every = broker.auth_failures.interval();
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = broker.flush_auth_failures(false).await {
            tracing::error!(error = %e, "auditing counted authentication failures failed");
        }
        broker.limits.forget_idle();
    }
}

/// Expires approvals nobody decided in time and cancels those whose task
/// ended, on the reaper's rhythm, and lifts fences whose sessions have all
/// expired, every tenth pass.
async fn close_stale_approvals(broker: AppState) {
    let every = std::time::Duration::from_secs(broker.config.leases.reaper_interval_secs.max(1));
    // Moot fences every tenth pass, at most once a minute apart: a fence
    // that cannot come down is retried without a log line every pass.
    let fence_every = (every * 10).min(std::time::Duration::from_secs(60));
    let mut fences_due = tokio::time::Instant::now();
    loop {
        if !holds_job(&broker, "approvals", 3 * every).await {
            tokio::time::sleep(every).await;
            continue;
        }
        if let Err(e) = broker.close_stale_approvals().await {
            tracing::error!(error = %e, "closing stale approvals failed");
        }
        if tokio::time::Instant::now() >= fences_due {
            fences_due = tokio::time::Instant::now() + fence_every;
            if let Err(e) = broker.lift_moot_fences().await {
                tracing::error!(error = %e, "lifting moot fences failed");
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Several replicas: every second, takes up the policy set another replica
/// made active, and relearns the agents changed through another (one
/// process: nothing to follow).
async fn follow_policy(broker: AppState, mut seen: Option<i64>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if let Err(e) = broker.follow_policy().await {
            tracing::error!(error = %e, "following the active policy set failed");
        }
        if let Err(e) = broker.follow_agent_changes(&mut seen).await {
            tracing::error!(error = %e, "following agents changed through other replicas failed");
        }
    }
}

/// SIGHUP reloads the policy directory, like `POST /v1/policy/reload`.
async fn reload_on_sighup(broker: AppState) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let actor = crate::audit::Actor::Operator("sighup".into());
            match broker
                .reload_policy(&actor, &crate::broker::PolicyFiles::default())
                .await
            {
                Err(e) => {
                    tracing::error!(error = %e, "policy reload on SIGHUP refused; the running set stays");
                }
                Ok(r) if r.held.is_some() => {
                    tracing::warn!(approval = %r.held.as_ref().map(|a| a.id.as_str()).unwrap_or_default(), "the new policy set widens access: it waits for provisioning approval");
                }
                Ok(_) => {}
            }
        }
    }
    #[cfg(not(unix))]
    let _ = broker;
}

/// Whether this replica runs the periodic job `name` now (one replica at a
/// time does; see `Store::claim_job`). A store error skips this turn.
async fn holds_job(broker: &AppState, name: &str, hold: std::time::Duration) -> bool {
    match broker
        .leases
        .claim_job(broker.store.as_ref(), name, hold)
        .await
    {
        Ok(held) => held,
        Err(e) => {
            tracing::error!(job = name, error = %e, "claiming a periodic job failed");
            false
        }
    }
}

/// The governance sweep every `governance.sweep_interval_secs` after the
/// first (at start), on one replica at a time.
async fn run_governance(broker: AppState) {
    let every = std::time::Duration::from_secs(broker.config.governance.sweep_interval_secs.max(1));
    loop {
        // The first pass ran before the broker served (`serve`).
        tokio::time::sleep(every).await;
        governance_pass(&broker, every).await;
    }
}

/// One governance sweep, if this replica holds the job.
async fn governance_pass(broker: &AppState, every: std::time::Duration) {
    if holds_job(broker, "governance", 2 * every).await {
        match broker.governance_sweep().await {
            Ok(r) if !(r.opened.is_empty() && r.closed.is_empty() && r.acted.is_empty()) => {
                tracing::info!(
                    agents = r.agents,
                    opened = r.opened.len(),
                    closed = r.closed.len(),
                    acted = r.acted.len(),
                    "governance sweep"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "governance sweep failed"),
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// Refuses to start without a provider the store still holds live
/// credentials of: its live leases could be neither revoked nor fenced,
/// and (PostgreSQL) its local CA's shared revocation list, kept by name,
/// would be served by no one, so a certificate or JWT-SVID it revoked
/// would pass again under a renamed provider. The names are the store's
/// keys. A provider listed in `[leases] abandoned_providers` is given up
/// instead, audited as such.
async fn check_providers_kept(
    store: &dyn crate::store::Store,
    config: &crate::config::Config,
) -> anyhow::Result<()> {
    let abandoned = &config.leases.abandoned_providers;
    if let Some(name) = abandoned.iter().find(|n| config.providers.contains_key(*n)) {
        anyhow::bail!(
            "`leases.abandoned_providers` names `{name}`, which is configured under [providers]: remove one or the other"
        );
    }
    let held = store.unexpired_holdings(crate::model::now()).await?;
    let mut missing = Vec::new();
    for h in held
        .iter()
        .filter(|h| !config.providers.contains_key(&h.provider))
    {
        let until = h
            .until
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| h.until.to_string());
        let mut what = Vec::new();
        if h.live_leases > 0 {
            what.push(format!(
                "{} live lease(s) (still to be revoked, or not expired)",
                h.live_leases
            ));
        }
        if h.revocations > 0 {
            what.push(format!(
                "{} revocation(s) its local CA still serves",
                h.revocations
            ));
        }
        let what = what.join(" and ");
        if abandoned.contains(&h.provider) {
            tracing::warn!(provider = %h.provider, held = %what, "provider abandoned by config: Keygate will not revoke what it still holds");
            let mut tx = store.begin().await?;
            tx.audit(
                crate::audit::AuditEvent::new(&crate::audit::Actor::System, "provider.abandoned")
                    .reason(format!(
                        "`{}` is listed in leases.abandoned_providers",
                        h.provider
                    ))
                    .details(serde_json::json!({
                        "provider": h.provider, "live_leases": h.live_leases,
                        "revocations": h.revocations, "last_expiry": until,
                    })),
            )
            .await?;
            tx.commit().await?;
            continue;
        }
        missing.push(format!(
            "provider `{}` is not configured, but the store holds {what} of it (the last expiring at {until})",
            h.provider
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{}: those could be neither revoked nor checked. Configure it again under the same name (a renamed provider keeps its name while it holds anything; revoke what it holds first), or give them up for good by listing it in `[leases] abandoned_providers`",
        missing.join("; ")
    )
}
