//! `keygate exec`: a command run inside a task. It opens the task, obtains
//! each scope (waiting out approvals), hands the credentials to the command
//! (`exec/env.rs`), keeps them fresh while it runs, forwards signals to it,
//! and completes the task when it exits — however it exits, and also when
//! `keygate exec` is told to stop — so every credential is revoked. If
//! `keygate exec` itself is killed with SIGKILL, the task's TTL ends it.
//!
//! Refresh: at two thirds of a credential's life it is renewed where its
//! backend allows, else issued again; its files are rewritten and the
//! command gets `--refresh-signal` (SIGHUP by default). Variables cannot
//! change under a running process: a command that outlives its credentials
//! reads the `_FILE` paths or `<scope>.json` again when signalled.

/// A line on stderr. Unlike `eprintln!`, a closed stderr (its reader, a
/// pipe, went away) is ignored: exec must still end its task.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

mod env;
mod refresh;
mod session;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde_json::Value;

use refresh::{Schedule, refresh_all, sleep_until, stamped};

pub use env::{Mapping, var_part, write_private};
pub use session::{AgentArgs, Refused, Session};

/// `keygate exec` options.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// A scope to obtain (repeat for several).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// What the task is for (recorded on the task and in the audit log).
    #[arg(long, default_value = "keygate exec")]
    pub task: String,
    /// The task's lifetime in seconds (the broker's default when absent);
    /// the command's credentials end with it at the latest.
    #[arg(long)]
    pub ttl: Option<u64>,
    /// Each credential's lifetime in seconds (the scope's default when
    /// absent).
    #[arg(long)]
    pub credential_ttl: Option<u64>,
    /// Name a variable yourself: NAME=SCOPE.FIELD (a file field gives its
    /// path).
    #[arg(long = "env", value_name = "NAME=SCOPE.FIELD")]
    pub env: Vec<Mapping>,
    /// Also give the command the session token (`KEYGATE_SESSION_TOKEN`),
    /// e.g. to ask for more credentials itself.
    #[arg(long)]
    pub pass_session: bool,
    /// How long to wait for approvers of a sensitive scope, in seconds.
    #[arg(long, default_value_t = 600)]
    pub approval_timeout: u64,
    /// The signal the command gets after its credentials were refreshed
    /// (`HUP`, `USR1`, `USR2`, or `none`).
    #[arg(long, default_value = "HUP", value_parser = ["HUP", "USR1", "USR2", "none"])]
    pub refresh_signal: String,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

/// Runs the command; returns its exit code (128 + signal when a signal
/// ended it), after the task was completed.
pub async fn run(args: ExecArgs) -> anyhow::Result<i32> {
    // Caught from the start, not only once the command runs: told to stop
    // while the task opens or a scope is obtained (an approval can take
    // minutes), exec runs nothing and still completes the task.
    let mut signals = Signals::new()?;
    // Not cut short by a signal: a task the broker opened must be known to
    // be completed. One that came meanwhile is acted on once it is open.
    let session = Session::open(&args.agent, &args.task, args.ttl).await?;
    note!("keygate: task {} opened", session.task_id);
    let outcome = match signals.pending() {
        Some(sig) => {
            note!("keygate: stopped by a signal while the task opened; the command was not run");
            Ok(128 + sig.as_raw())
        }
        None => run_in_task(&args, &session, &mut signals).await,
    };
    // However the command ended (or failed to start), the task ends and
    // the broker revokes everything it issued.
    match complete(&session, &mut signals).await {
        Ok(Completed::Now) => note!(
            "keygate: task {} completed; its credentials are revoked",
            session.task_id
        ),
        Ok(Completed::Before) => note!(
            "keygate: task {} had ended already (its ttl, a revocation); its credentials are revoked",
            session.task_id
        ),
        Err(e) => note!(
            "keygate: completing task {} failed ({e:#}); its ttl will end it",
            session.task_id
        ),
    }
    outcome
}

/// How long a broker that does not answer (restarting) is asked again to
/// complete the task.
const COMPLETE_FOR: Duration = Duration::from_secs(30);

enum Completed {
    Now,
    /// The broker no longer knew the session: the task had ended.
    Before,
}

/// Completes the task, asking again while the broker does not answer, for
/// up to [`COMPLETE_FOR`] or until another signal says stop.
async fn complete(session: &Session, signals: &mut Signals) -> anyhow::Result<Completed> {
    let deadline = tokio::time::Instant::now() + COMPLETE_FOR;
    let mut told = false;
    loop {
        let e = match session.complete().await {
            Ok(()) => return Ok(Completed::Now),
            Err(e) if e.downcast_ref::<Refused>().is_some_and(|r| r.status == 401) => {
                return Ok(Completed::Before);
            }
            Err(e) => e,
        };
        let unanswered = e
            .downcast_ref::<reqwest::Error>()
            .is_some_and(crate::cli::client::Client::no_answer);
        if !unanswered || tokio::time::Instant::now() >= deadline {
            return Err(e);
        }
        if !told {
            note!(
                "keygate: the broker did not answer; asking again to complete task {} for up to {} s",
                session.task_id,
                COMPLETE_FOR.as_secs()
            );
            told = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = signals.next() => {
                return Err(e.context("stopped by a signal while the broker did not answer"));
            }
        }
    }
}

async fn run_in_task(
    args: &ExecArgs,
    session: &Session,
    signals: &mut Signals,
) -> anyhow::Result<i32> {
    let wait = Duration::from_secs(args.approval_timeout);
    let mut creds: BTreeMap<String, Value> = BTreeMap::new();
    for scope in &args.scopes {
        let v = tokio::select! {
            v = session.credential(scope, args.credential_ttl, wait) => v?,
            sig = signals.next() => {
                note!("keygate: stopped by a signal while obtaining `{scope}`; the command was not run");
                return Ok(128 + sig.as_raw());
            }
        };
        creds.insert(scope.clone(), stamped(v));
    }
    // 0700, removed when dropped (any return from here on).
    let dir = tempfile::Builder::new()
        .prefix("keygate-exec-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("creating the credentials directory")?;
    let vars = env::materialize(dir.path(), &creds, &args.env)?;
    let (program, rest) = args
        .command
        .split_first()
        .context("no command given after --")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest)
        .envs(&vars)
        .env("KEYGATE_TASK_ID", &session.task_id)
        .env("KEYGATE_CREDENTIALS_DIR", dir.path())
        .env_remove("KEYGATE_SESSION_TOKEN");
    if args.pass_session {
        cmd.env("KEYGATE_SESSION_TOKEN", session.token().expose_secret());
    }
    // Told to stop while the files were written: nothing runs.
    if let Some(sig) = signals.pending() {
        note!("keygate: stopped by a signal before the command ran; it was not run");
        return Ok(128 + sig.as_raw());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{program}`"))?;
    let pid = child.id().context("the command exited at once")?;
    let refresh_signal = match args.refresh_signal.as_str() {
        "HUP" => Some(rustix::process::Signal::HUP),
        "USR1" => Some(rustix::process::Signal::USR1),
        "USR2" => Some(rustix::process::Signal::USR2),
        _ => None,
    };
    let mut schedule = Schedule::default();
    let mut refreshing: Option<std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>> = None;
    loop {
        let next = match refreshing {
            Some(_) => None,
            None => schedule.next(&creds),
        };
        tokio::select! {
            status = child.wait() => {
                // A refresh still running is dropped with its request.
                let status = status?;
                use std::os::unix::process::ExitStatusExt;
                return Ok(status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1));
            }
            sig = signals.next() => {
                // The command decides what a signal means; it is told.
                send(pid, sig);
            }
            () = sleep_until(next), if next.is_some() => {
                let due = schedule.due(&creds);
                refreshing = Some(Box::pin(refresh_all(session, due, args.credential_ttl, wait)));
            }
            done = async {
                match refreshing.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            } => {
                refreshing = None;
                if schedule.settle(&mut creds, done) {
                    // Not fatal: the command keeps running on what it has
                    // (its directory may have been removed under it).
                    match env::materialize(dir.path(), &creds, &args.env) {
                        Ok(_) => {
                            if let Some(s) = refresh_signal {
                                send(pid, s);
                            }
                        }
                        Err(e) => note!("keygate: writing the refreshed credentials failed: {e:#}"),
                    }
                }
            }
        }
    }
}

fn send(pid: u32, sig: rustix::process::Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // The command may have exited meanwhile: nothing to tell then.
    let _ = rustix::process::kill_process(pid, sig);
}

/// The signals `keygate exec` passes on to the command.
struct Signals(Vec<(rustix::process::Signal, tokio::signal::unix::Signal)>);

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use rustix::process::Signal as S;
        use tokio::signal::unix::{SignalKind, signal};
        let mut out = Vec::new();
        for (s, k) in [
            (S::INT, SignalKind::interrupt()),
            (S::TERM, SignalKind::terminate()),
            (S::HUP, SignalKind::hangup()),
            (S::QUIT, SignalKind::quit()),
            (S::USR1, SignalKind::user_defined1()),
            (S::USR2, SignalKind::user_defined2()),
        ] {
            out.push((s, signal(k)?));
        }
        Ok(Self(out))
    }

    /// A signal that has come already, if any (without waiting).
    fn pending(&mut self) -> Option<rustix::process::Signal> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        self.0
            .iter_mut()
            .find_map(|(s, sig)| sig.poll_recv(&mut cx).is_ready().then_some(*s))
    }

    async fn next(&mut self) -> rustix::process::Signal {
        let futures = self
            .0
            .iter_mut()
            .map(|(s, sig)| {
                let s = *s;
                Box::pin(async move {
                    sig.recv().await;
                    s
                })
            })
            .collect::<Vec<_>>();
        select_all(futures).await
    }
}

/// The first of `futures` to finish.
async fn select_all<F: std::future::Future + Unpin>(mut futures: Vec<F>) -> F::Output {
    std::future::poll_fn(|cx| {
        for f in &mut futures {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
