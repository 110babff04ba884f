//! The load generator: N concurrent clients, each calling one operation in
//! a loop, either for a warm-up plus a fixed duration (throughput and
//! latency) or until a number of calls is done (filling a store).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one measured run did.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub clients: usize,
    pub requests: usize,
    pub seconds: f64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU time (user + system) the server under test spent per measured
    /// request, when one is watched ([`watch`]).
    pub cpu_ms_per_req: Option<f64>,
    /// The machine's idle share (all cores, `/proc/stat`) over the
    /// measured window: what neither the servers nor the load generator
    /// used.
    pub idle_share: Option<f64>,
    /// Context switches of the watched server's threads (voluntary and
    /// not) per measured request: how often a request's work went to
    /// sleep and was woken.
    pub switches_per_req: Option<f64>,
    /// How many measured windows these figures are the median of.
    pub windows: usize,
}

/// Machine-wide (idle, total) jiffies so far (`/proc/stat`, first line;
/// iowait counts as idle).
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((idle, v.iter().take(8).sum()))
}

/// The median of each figure over several windows of the same run (for
/// two, their mean); requests and seconds add up.
pub fn median(runs: &[Stats]) -> Stats {
    fn mid(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    let of = |f: fn(&Stats) -> f64| mid(runs.iter().map(f).collect());
    let opt = |f: fn(&Stats) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| mid(v))
    };
    Stats {
        clients: runs.first().map_or(0, |r| r.clients),
        requests: runs.iter().map(|r| r.requests).sum(),
        seconds: runs.iter().map(|r| r.seconds).sum(),
        per_sec: of(|r| r.per_sec),
        p50_ms: of(|r| r.p50_ms),
        p99_ms: of(|r| r.p99_ms),
        max_ms: of(|r| r.max_ms),
        cpu_ms_per_req: opt(|r| r.cpu_ms_per_req),
        idle_share: opt(|r| r.idle_share),
        switches_per_req: opt(|r| r.switches_per_req),
        windows: runs.iter().map(|r| r.windows).sum(),
    }
}

/// The server process the next timed runs charge CPU time to (0: none).
static WATCHED: AtomicU32 = AtomicU32::new(0);

/// Charges the CPU time of process `pid` to the next timed runs.
pub fn watch(pid: Option<u32>) {
    WATCHED.store(pid.unwrap_or(0), Ordering::SeqCst);
}

/// The process's user + system CPU time so far, in seconds
/// (`/proc/<pid>/stat` fields 14 and 15, in clock ticks).
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its ")".
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Context switches of every thread of process `pid` so far
/// (`/proc/<pid>/task/*/status`; threads that ended meanwhile are lost,
/// the server's are long-lived, and a window that lost more than it
/// counted reports none).
fn switches(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// This process's user + system CPU time so far, in seconds.
pub fn own_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).expect("/proc/self/stat")
}

impl Stats {
    fn of(clients: usize, mut lat: Vec<Duration>, seconds: f64) -> Self {
        lat.sort();
        let pct = |p: f64| {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
            lat[i].as_secs_f64() * 1000.0
        };
        Self {
            clients,
            requests: lat.len(),
            seconds,
            per_sec: lat.len() as f64 / seconds,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            cpu_ms_per_req: None,
            idle_share: None,
            switches_per_req: None,
            windows: 1,
        }
    }
}

/// Runs `clients` loops of `op(client index)` for `warm` plus `secs`;
/// the calls started after the warm-up are measured.
pub async fn timed<F, Fut>(clients: usize, warm: Duration, secs: Duration, op: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let measure_from = Instant::now() + warm;
    let end = measure_from + secs;
    // The watched server's CPU time over the measured window.
    let pid = WATCHED.load(Ordering::SeqCst);
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let (start, machine, sw) = (cpu_secs(pid), machine_jiffies(), switches(pid));
        tokio::time::sleep_until(end.into()).await;
        let used = (pid != 0).then(|| Some(cpu_secs(pid)? - start?)).flatten();
        // A thread that ended inside the window takes its switches with it:
        // a total lower than at the start is no figure, not a wrapped one.
        let sw = (pid != 0)
            .then(|| switches(pid)?.checked_sub(sw?))
            .flatten();
        let idle = match (machine, machine_jiffies()) {
            (Some((i0, t0)), Some((i1, t1))) if t1 > t0 => {
                Some((i1 - i0) as f64 / (t1 - t0) as f64)
            }
            _ => None,
        };
        (used, idle, sw)
    });
    let mut handles = Vec::new();
    for i in 0..clients {
        let op = Arc::clone(&op);
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                op(i).await;
                if t0 >= measure_from {
                    lat.push(t0.elapsed());
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("load client panicked"));
    }
    let mut stats = Stats::of(clients, all, secs.as_secs_f64());
    if let Ok((used, idle, sw)) = cpu.await {
        stats.idle_share = idle;
        if stats.requests > 0 {
            let n = stats.requests as f64;
            stats.cpu_ms_per_req = used.map(|u| u * 1000.0 / n);
            stats.switches_per_req = sw.map(|s| s as f64 / n);
        }
    }
    stats
}

/// `GET url` from `clients` loops, each answer a 200 (for [`timed`]).
pub async fn get(
    http: &reqwest::Client,
    url: String,
    clients: usize,
    warm: Duration,
    secs: Duration,
) -> Stats {
    let h = http.clone();
    timed(clients, warm, secs, move |_| {
        let req = h.get(&url);
        async move {
            let r = req.send().await.expect("server unreachable");
            assert_eq!(r.status(), 200, "GET failed");
            let _ = r.bytes().await;
        }
    })
    .await
}

/// Calls `op(call number)` `total` times from `clients` loops; returns what
/// each call returned, in call-number order.
pub async fn fill<F, Fut, T>(clients: usize, total: usize, op: F) -> Vec<T>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let (op, next) = (Arc::new(op), Arc::new(AtomicUsize::new(0)));
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (op, next) = (Arc::clone(&op), Arc::clone(&next));
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                out.push((n, op(n).await));
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(total);
    for h in handles {
        all.extend(h.await.expect("fill client panicked"));
    }
    all.sort_by_key(|(n, _)| *n);
    all.into_iter().map(|(_, v)| v).collect()
}

/// An agent's `private_key_jwt` assertions for the load: its key parsed
/// once, as a long-lived agent holds it, and a fresh `jti` and `iat` per
/// call (the claims and header of `keygate::identity::sign_client_assertion`,
/// which parses the PEM on every call). Both systems' task-open loops sign
/// with it, so what the load generator spends per call on the two shared
/// cores is the same small amount for either.
pub struct Assertions {
    signer: keygate_provider_api::jws::Es256Signer,
    kid: Option<String>,
    agent: String,
    audience: String,
}

impl Assertions {
    pub fn new(
        key: &secrecy::SecretString,
        kid: Option<&str>,
        agent: &str,
        audience: &str,
    ) -> Self {
        use secrecy::ExposeSecret;
        let pair = rcgen::KeyPair::from_pem(key.expose_secret()).expect("the agent's PKCS#8 key");
        Self {
            signer: keygate_provider_api::jws::Es256Signer::from_pkcs8(pair.serialized_der())
                .expect("a P-256 key"),
            kid: kid.map(str::to_owned),
            agent: agent.to_owned(),
            audience: audience.to_owned(),
        }
    }

    /// A fresh assertion, valid for 60 s.
    pub fn next(&self) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "iss": self.agent, "sub": self.agent, "aud": self.audience,
            "iat": now, "exp": now + 60,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        self.signer
            .sign(self.kid.as_deref(), Some("JWT"), &claims)
            .expect("sign")
    }
}
