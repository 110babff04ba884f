//! `keygate credential-process`: the AWS SDKs' `credential_process` for a
//! Keygate scope. Each call prints a fresh AWS session as the SDKs read it
//! (`Version: 1`, `Expiration`); the task is kept between calls in a private
//! cache file (0600), so an SDK refreshing its credentials does not open a
//! task each time. When the cached task has ended (completed, expired, or
//! ended by the kill switch), the next call opens a new one. Calls that
//! find no task to use (a cold cache, or the cached task ended) decide
//! under an exclusive lock on a file beside the cache (`<cache>.lock`), so
//! SDK processes starting at once open one task between them, not one
//! each.
//!
//! The cache holds the task's session token: it is the agent's own secret,
//! as its key file is, and lives beside it with the same permissions.

use std::path::PathBuf;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::exec::{AgentArgs, Refused, Session};

/// `keygate credential-process` options.
#[derive(Debug, clap::Args)]
pub struct CredentialProcessArgs {
    #[command(flatten)]
    pub agent: AgentArgs,
    /// The AWS scope.
    #[arg(long)]
    pub scope: String,
    /// Each session's lifetime in seconds (the scope's default when absent;
    /// STS allows 900 at least).
    #[arg(long)]
    pub credential_ttl: Option<u64>,
    /// The cached task's lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// What the task is for.
    #[arg(long, default_value = "aws credential_process")]
    pub task: String,
    /// Where the task is kept between calls (default:
    /// `$XDG_CACHE_HOME/keygate/` or `~/.cache/keygate/`, one file per
    /// agent and scope).
    #[arg(long)]
    pub cache_file: Option<PathBuf>,
}

/// The cache file's content.
#[derive(Serialize, Deserialize)]
struct Cached {
    server: String,
    agent: String,
    task_id: String,
    session_token: String,
    /// Unix seconds.
    task_expires_at: i64,
}

fn cache_path(args: &CredentialProcessArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.cache_file {
        return Ok(p.clone());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("no cache directory: set --cache-file")?;
    let name = format!(
        "credential-process-{}-{}.json",
        super::exec::var_part(&args.agent.agent).to_lowercase(),
        super::exec::var_part(&args.scope).to_lowercase()
    );
    Ok(base.join("keygate").join(name))
}

/// STS's shortest session: a credential the task's end would cut shorter
/// is refused.
const STS_MIN_SECS: u64 = 900;

/// How long a task must still live to hold one more session STS accepts
/// (a session is cut to its task's end), and a minute to spare.
const ROOM_NEEDED: u64 = STS_MIN_SECS + 60;

/// The cached task if it is this agent's on this broker and lives long
/// enough yet for a whole session; else a new task is opened.
fn load(path: &std::path::Path, args: &CredentialProcessArgs) -> Option<Session> {
    let text = std::fs::read_to_string(path).ok()?;
    let c: Cached = serde_json::from_str(&text).ok()?;
    let left = c.task_expires_at - OffsetDateTime::now_utc().unix_timestamp();
    let fresh = left > i64::try_from(ROOM_NEEDED).unwrap_or(i64::MAX);
    (fresh && c.server == args.agent.server && c.agent == args.agent.agent)
        .then(|| Session::resume(&args.agent, SecretString::from(c.session_token), c.task_id).ok())
        .flatten()
}

/// Creates the cache's directory if it is not there yet, private (0700);
/// one that exists is the user's and keeps its permissions (the cache file
/// itself is 0600 either way).
fn cache_dir(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir)
            .with_context(|| format!("creating `{}`", dir.display()))?;
    }
    Ok(())
}

/// How long a call waits for another to finish opening the task before it
/// goes on without the lock (a lock file someone else holds open in a
/// shared directory must not hang every SDK call).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// An exclusive lock on `<cache>.lock`, held until dropped; `None` when it
/// cannot be had (the file cannot be opened, or it stays held past
/// [`LOCK_WAIT`]): the call then goes on alone, as without one.
async fn lock(path: &std::path::Path) -> Option<std::fs::File> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let mut open = std::fs::OpenOptions::new();
    // Nothing is ever written to it: it exists to be locked.
    open.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    let file = open.open(&name).ok()?;
    let until = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Some(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                super::exec::note!(
                    "keygate: `{}` stays locked; opening a task without waiting for it",
                    std::path::Path::new(&name).display()
                );
                return None;
            }
            Err(std::fs::TryLockError::Error(e)) => {
                super::exec::note!(
                    "keygate: cannot lock `{}` ({e}); opening a task without it",
                    std::path::Path::new(&name).display()
                );
                return None;
            }
        }
    }
}

/// The cached task, or a new one opened and cached, decided under the
/// cache's lock; whether it came from the cache. `ended`: the id of a
/// cached task found ended, not to be used again (another call may have
/// opened and cached a new one meanwhile, which is used).
async fn session(
    path: &std::path::Path,
    args: &CredentialProcessArgs,
    ended: Option<&str>,
) -> anyhow::Result<(Session, bool)> {
    let usable = |s: &Session| Some(s.task_id.as_str()) != ended;
    // A task to use needs no lock: only calls that would open one wait.
    if let Some(s) = load(path, args).filter(usable) {
        return Ok((s, true));
    }
    cache_dir(path)?;
    let _held = lock(path).await;
    // Another call may have opened one while this one waited.
    if let Some(s) = load(path, args).filter(usable) {
        return Ok((s, true));
    }
    let s = Session::open(&args.agent, &args.task, Some(args.ttl)).await?;
    store(path, args, &s)?;
    Ok((s, false))
}

fn store(path: &std::path::Path, args: &CredentialProcessArgs, s: &Session) -> anyhow::Result<()> {
    let c = Cached {
        server: args.agent.server.clone(),
        agent: args.agent.agent.clone(),
        task_id: s.task_id.clone(),
        session_token: s.token().expose_secret().to_owned(),
        task_expires_at: OffsetDateTime::now_utc().unix_timestamp() + s.expires_in as i64,
    };
    super::exec::write_private(path, serde_json::to_string(&c)?.as_bytes())
}

/// Prints the `credential_process` JSON for the scope.
pub async fn run(args: CredentialProcessArgs) -> anyhow::Result<()> {
    if args.agent.dpop {
        bail!(
            "--dpop binds a task to a key that lives in one process, and credential-process keeps its task between calls in a file: use `keygate exec --dpop` for a DPoP-bound task"
        );
    }
    if args.ttl < ROOM_NEEDED {
        bail!(
            "--ttl {} leaves no room for a session: a task must be able to hold the shortest session STS issues ({STS_MIN_SECS} s) with a minute to spare, so at least {ROOM_NEEDED} s",
            args.ttl
        );
    }
    let path = cache_path(&args)?;
    let wait = std::time::Duration::from_secs(600);
    let (s, cached) = session(&path, &args, None).await?;
    let (session, cred) = match s.credential(&args.scope, args.credential_ttl, wait).await {
        Ok(c) => (s, c),
        // The cached task ended (or the token is no longer good): a new
        // task, or the one another call opened meanwhile. Anything else is
        // the answer.
        Err(e) if cached && e.downcast_ref::<Refused>().is_some_and(|r| r.status == 401) => {
            let (s, _) = session(&path, &args, Some(&s.task_id)).await?;
            let c = s.credential(&args.scope, args.credential_ttl, wait).await?;
            (s, c)
        }
        Err(e) => return Err(e),
    };
    match process_json(&args.scope, &cred) {
        Ok(out) => {
            println!("{}", serde_json::to_string(&out)?);
            Ok(())
        }
        Err(e) => {
            // Not an AWS session: nothing the SDK can use may stay alive.
            if let Some(lease) = cred["lease_id"].as_str()
                && let Err(r) = session.release(lease).await
            {
                super::exec::note!("keygate: releasing lease {lease}: {r:#}");
            }
            Err(e)
        }
    }
}

/// The SDKs' shape of an AWS session credential.
fn process_json(scope: &str, cred: &Value) -> anyhow::Result<Value> {
    let c = &cred["credential"];
    let field = |k: &str| c[k].as_str();
    let (Some(id), Some(secret)) = (field("access_key_id"), field("secret_access_key")) else {
        bail!("scope `{scope}` is not an AWS session (its credential has no access_key_id)");
    };
    let mut out = json!({ "Version": 1, "AccessKeyId": id, "SecretAccessKey": secret });
    if let Some(t) = field("session_token") {
        out["SessionToken"] = t.into();
    }
    if let Some(e) = field("expiration").or(cred["expires_at"].as_str()) {
        out["Expiration"] = e.into();
    }
    Ok(out)
}
