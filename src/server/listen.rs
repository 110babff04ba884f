//! Serving connections on both listeners, with the limits a broker exposed
//! to its network needs: at most `max_connections` at once (further clients
//! wait in the kernel's backlog), a TLS handshake in its own task with a
//! deadline (a silent socket delays nobody else), request headers within
//! `header_read_timeout_secs` (no slowloris), and idle keep-alive connections
//! closed after `idle_timeout_secs`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::ClientConn;
use crate::config::ConnectionLimits;

/// How long a graceful shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` (over TLS when `tls` is set) until `shutdown`
/// completes, then lets requests in flight finish (up to 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else { break };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (app, tls, stopped) = (app.clone(), tls.clone(), stopped.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = tls else {
                let conn = ClientConn { addr, cert: None };
                serve_connection(tcp, conn, app, limits, stopped).await;
                return;
            };
            let handshake = Duration::from_secs(limits.tls_handshake_timeout_secs.max(1));
            match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Arc::new(c.as_ref().to_vec()));
                    let conn = ClientConn { addr, cert };
                    serve_connection(stream, conn, app, limits, stopped).await;
                }
                Ok(Err(e)) => tracing::info!(%addr, error = %e, "TLS handshake refused"),
                Err(_) => tracing::info!(%addr, "TLS handshake timed out"),
            }
        });
    }
    // New connections are refused from here, not left in the backlog to be
    // reset when the process exits.
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit: all of them back means all closed.
    let _ = tokio::time::timeout(DRAIN, permits.acquire_many(max as u32)).await;
}

/// When the connection was last busy, and how many requests are in flight.
#[derive(Debug)]
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection was last busy.
    fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// When to look again whether the connection is idle: a full idle period
/// from now while a request is in flight (a long poll), else from the last.
fn idle_deadline(activity: &Activity, idle: Duration) -> Instant {
    if activity.in_flight.load(Ordering::Relaxed) > 0 {
        Instant::now() + idle
    } else {
        activity.idle_since() + idle
    }
}

async fn serve_connection<I>(
    io: I,
    conn: ClientConn,
    app: Router,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let addr = conn.addr;
    let activity = Arc::new(Activity {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
    });
    let act = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(conn.clone()));
        let (app, act) = (app.clone(), Arc::clone(&act));
        act.in_flight.fetch_add(1, Ordering::Relaxed);
        async move {
            let resp = app.oneshot(req).await;
            act.in_flight.fetch_sub(1, Ordering::Relaxed);
            act.touch();
            resp
        }
    });
    let idle = Duration::from_secs(limits.idle_timeout_secs.max(1));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_secs.max(1)))
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let mut closing = false;
    loop {
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%addr, error = %e, "connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(idle_deadline(&activity, idle)), if !closing => {
                if activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_since() + idle <= Instant::now()
                {
                    tracing::debug!(%addr, "closing an idle connection");
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            changed = stopped.changed(), if !closing => {
                if changed.is_err() || *stopped.borrow() {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
