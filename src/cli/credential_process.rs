//! `keygate credential-process`: the AWS SDKs' `credential_process` for a
//! Keygate scope. Each call prints a fresh AWS session as the SDKs read it
//! (`Version: 1`, `Expiration`); the task is kept between calls in a private
//! cache file (0600), so an SDK refreshing its credentials does not open a
//! task each time. When the cached task has ended (completed, expired, or
//! ended by the kill switch), the next call opens a new one.
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

fn store(path: &std::path::Path, args: &CredentialProcessArgs, s: &Session) -> anyhow::Result<()> {
    // A directory that is not there yet is created private (0700); one
    // that exists is the user's and keeps its permissions (the cache file
    // itself is 0600 either way).
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
    let cached = match load(&path, &args) {
        Some(s) => match s.credential(&args.scope, args.credential_ttl, wait).await {
            Ok(c) => Some((s, c)),
            // The cached task ended (or the token is no longer good): a
            // new task below. Anything else is the answer.
            Err(e) if e.downcast_ref::<Refused>().is_some_and(|r| r.status == 401) => None,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let (session, cred) = match cached {
        Some(found) => found,
        None => {
            let s = Session::open(&args.agent, &args.task, Some(args.ttl)).await?;
            store(&path, &args, &s)?;
            let c = s.credential(&args.scope, args.credential_ttl, wait).await?;
            (s, c)
        }
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
