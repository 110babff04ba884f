//! The `keygate` command line: `serve` runs the broker; every other command
//! talks to a running broker over its HTTP API.

mod audit;
mod client;
mod commands;
mod credential_process;
mod evidence;
mod exec;
mod incidents;
mod migrate;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use commands::run;

/// The variable that sets how many threads run the runtime's tasks.
const WORKERS_VAR: &str = "TOKIO_WORKER_THREADS";

/// The runtime every command runs on: `TOKIO_WORKER_THREADS` worker
/// threads if set (a whole number above 0; anything else is refused here,
/// where tokio itself would panic), otherwise one a core but one, and at
/// least one. The spare core is for what runs outside the runtime on every
/// write: SQLite's writer thread and its fsync. Given every core, a worker
/// woken by that thread wakes another to look for work, which finds none
/// and parks again: on two cores that doubled the thread switches per
/// credential at one client and cost about a fifth of its CPU (README,
/// Performance).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = match std::env::var(WORKERS_VAR) {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                anyhow::anyhow!("{WORKERS_VAR} must be a whole number above 0 (it is `{v}`)")
            })?,
        Err(std::env::VarError::NotPresent) => std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{WORKERS_VAR} must be a whole number above 0")
        }
    };
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "Credential broker for AI agents")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the broker is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Broker base URL.
    #[arg(
        long,
        env = "KEYGATE_SERVER",
        default_value = "http://127.0.0.1:8470",
        global = true
    )]
    pub server: String,
    // The operator token comes from KEYGATE_TOKEN only, never a flag, so it
    // stays out of shell history and process lists.
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve {
        /// Config file.
        #[arg(
            long,
            short,
            env = "KEYGATE_CONFIG",
            default_value = "config/keygate.toml"
        )]
        config: PathBuf,
        /// Override `server.listen` (e.g. 127.0.0.1:0 for a free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Manage the agent registry.
    Agents {
        #[command(subcommand)]
        cmd: AgentsCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// List leases.
    Leases {
        #[command(subcommand)]
        cmd: LeasesCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Emergency revocation (secops): end sessions and revoke live credentials.
    Revoke {
        #[arg(long, group = "selector")]
        agent: Option<String>,
        #[arg(long, group = "selector")]
        team: Option<String>,
        #[arg(long, group = "selector")]
        provider: Option<String>,
        #[arg(long, group = "selector")]
        all: bool,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Also suspend the matching agents.
        #[arg(long)]
        suspend: bool,
        /// On roles whose sessions cannot be revoked one by one (AWS), also
        /// deny every session issued before now, whoever holds it.
        #[arg(long)]
        revoke_older_sessions: bool,
        /// Seconds to follow progress before returning.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Incidents continuous validation opened (`[[detectors]]`).
    Incidents {
        #[command(subcommand)]
        cmd: IncidentsCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Fences put up by emergency revocations (deny policies on AWS roles).
    Fences {
        #[command(subcommand)]
        cmd: FencesCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Approval requests: list them, approve or deny (approver role).
    Approvals {
        #[command(subcommand)]
        cmd: ApprovalsCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Governance: findings and running the sweep now.
    Governance {
        #[command(subcommand)]
        cmd: GovernanceCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// What applying the agent files in a folder would change (agents
    /// created, changed field by field, retired; generated policies; scopes
    /// gained and lost). Exit code 2 when there are changes, 0 when none.
    Plan {
        #[command(flatten)]
        files: AgentFiles,
        #[command(flatten)]
        remote: Remote,
    },
    /// Make the registry and the generated policies match the agent files
    /// (admin); approvals apply as through the API.
    Apply {
        #[command(flatten)]
        files: AgentFiles,
        #[command(flatten)]
        remote: Remote,
    },
    /// Access review campaigns: start one, list, show, decide items.
    Reviews {
        #[command(subcommand)]
        cmd: ReviewsCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// The people directory: list it, mark someone departed.
    People {
        #[command(subcommand)]
        cmd: PeopleCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// The Cedar policy set: show, preview a change, reload without restart.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// The auditor's evidence pack for a period (seed 000's five items):
    /// `evidence --from 2026-10-01 --to 2026-12-31 --out pack/` writes CSV and
    /// JSON per item, report.html and manifest.json; `evidence verify pack/`
    /// checks one.
    #[command(args_conflicts_with_subcommands = true)]
    Evidence {
        #[command(subcommand)]
        cmd: Option<EvidenceCmd>,
        /// First day (YYYY-MM-DD) or instant (RFC 3339).
        #[arg(long, requires_all = ["to", "out"])]
        from: Option<String>,
        /// Last day, included (YYYY-MM-DD), or an instant (RFC 3339, excluded).
        #[arg(long)]
        to: Option<String>,
        /// Folder to write (created).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// The maturity score: every agent's level and the estate's, with the
    /// criteria that fail.
    Maturity {
        #[command(flatten)]
        remote: Remote,
    },
    /// Run a command inside a task (as an agent): its credentials in its
    /// environment and in private files, kept fresh while it runs, every
    /// one revoked when it exits. `keygate exec --agent ID --key-file PEM
    /// --scope S … -- COMMAND ARGS…`; exits with the command's code.
    Exec(exec::ExecArgs),
    /// Print an AWS scope's session as the AWS SDKs' `credential_process`
    /// reads it (`Version: 1`), keeping the task between calls in a private
    /// cache file.
    CredentialProcess(credential_process::CredentialProcessArgs),
    /// Move the store to another engine.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Read and verify the audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
        #[command(flatten)]
        remote: Remote,
    },
    /// Generate an agent key pair for `private_key_jwt`.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// Register an agent from a TOML or JSON file (see config/agents/).
    Register {
        /// Agent definition file.
        #[arg(long)]
        file: PathBuf,
    },
    /// List agents by id. One page (`--limit`) unless `--all`.
    List {
        #[command(flatten)]
        page: Page,
    },
    Show {
        id: String,
    },
    /// Seed 000's registry table for every agent: team, sponsor, permitted
    /// scopes, credential types, TTL, last use and review, state, maturity.
    Export {
        /// `csv` or `json`.
        #[arg(long, default_value = "csv", value_parser = ["csv", "json"])]
        format: String,
    },
    /// The agent's governance record: lifecycle policy, permitted scopes and
    /// their last use, compliance issues, maturity.
    Compliance {
        id: String,
    },
    /// Deny the agent SCOPE in the registry whatever policy says, revoking
    /// what it holds of it, until `include` lifts it (admin).
    Exclude {
        id: String,
        scope: String,
        #[arg(long)]
        reason: String,
    },
    /// Lift an exclusion: policy alone decides SCOPE again (admin).
    Include {
        id: String,
        scope: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Suspend {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Resume {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    Decommission {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCmd {
    /// Check a pack's files against its manifest; with `--db`, that its
    /// audit head is in that database's intact audit chain.
    Verify {
        dir: PathBuf,
        #[command(flatten)]
        db: OfflineStore,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// The active set's content hash.
    Show,
    /// What the policy files in DIR would change: scopes each agent gains
    /// and loses (whatever the hour), live leases no longer permitted.
    Diff { dir: PathBuf },
    /// Load the broker's policy directory again (admin); an invalid set is
    /// refused and the running one stays.
    Reload,
    /// Run policy test cases against the policy files in DIR, locally (no
    /// broker): each case's request and the decision it must get.
    Test {
        dir: PathBuf,
        /// The cases file (TOML; see config/policy-cases.toml).
        #[arg(long)]
        cases: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum GovernanceCmd {
    /// Findings (compliance issues the sweep recorded), oldest first.
    Findings {
        #[arg(long)]
        agent: Option<String>,
        /// Only those not resolved yet.
        #[arg(long)]
        open: bool,
    },
    /// Run the governance sweep now (admin).
    Sweep,
}

/// The agents folder of `plan` and `apply`.
#[derive(Debug, clap::Args)]
pub struct AgentFiles {
    /// Folder of agent files (`*.toml`, `*.yaml`) and the mapping table.
    #[arg(short = 'f', long = "file")]
    pub dir: PathBuf,
    /// Also retire agents an earlier apply managed that are no longer declared.
    #[arg(long)]
    pub prune: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReviewsCmd {
    /// Start a campaign: one item per agent (of `--team`) that may reach a
    /// scope, assigned to its sponsor or its team's lead (admin).
    Start {
        #[arg(long)]
        name: String,
        #[arg(long)]
        team: Option<String>,
        /// Due after this many days (`14` or `14d`; default
        /// `governance.review_due_days`).
        #[arg(long)]
        due: Option<String>,
    },
    /// Every campaign with its open and decided counts.
    List,
    /// A campaign (by id or name) and its items.
    Show { campaign: String },
    /// One item: the snapshot the reviewer judges, and the decisions so far.
    Item { id: String },
    /// Decide an item: exactly one of `--attest`, `--narrow`, `--retire`.
    Decide {
        item: String,
        #[arg(long, conflicts_with_all = ["narrow", "retire"])]
        attest: bool,
        /// Scopes to take away, comma-separated.
        #[arg(long, value_delimiter = ',', conflicts_with = "retire")]
        narrow: Vec<String>,
        #[arg(long)]
        retire: bool,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PeopleCmd {
    /// Everyone the directory knows, with who left and when.
    List,
    /// Mark a person departed: their agents need a new sponsor within
    /// `sponsor_reassign_within_days`, their operator token stops working
    /// (admin).
    Depart {
        email: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeasesCmd {
    /// List leases, newest first. One page (`--limit`, at most 1000) unless
    /// `--all`; a page that is not the end says so on stderr.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        provider: Option<String>,
        #[command(flatten)]
        page: Page,
    },
}

/// Paging of a list command.
#[derive(Debug, Clone, clap::Args)]
pub struct Page {
    /// Rows per page (1 to 1000).
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Follow every page to the end.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum IncidentsCmd {
    /// List incidents, newest first (secops, admin, auditor).
    List {
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only those not resolved yet.
        #[arg(long)]
        open: bool,
    },
    /// One incident: the detector, what it saw, what was done.
    Show { id: String },
    /// Close an incident (secops, admin). A suspended agent stays
    /// suspended: `keygate agents resume` is a decision of its own.
    Resolve {
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum FencesCmd {
    /// List fences (all, or only standing ones), oldest first. One page
    /// (`--limit`) unless `--all`.
    List {
        #[arg(long)]
        revocation: Option<String>,
        /// Only fences not lifted yet.
        #[arg(long)]
        active: bool,
        #[command(flatten)]
        page: Page,
    },
    /// Take a fence down (secops, admin).
    Lift {
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// List approvals (default: pending ones).
    List {
        /// pending, approved, denied, expired, cancelled, or `all`.
        #[arg(long, default_value = "pending")]
        state: String,
        #[arg(long)]
        agent: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Show one approval with its decisions and notifications.
    Show { id: String },
    /// Approve a request.
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a request; a denial ends it.
    Deny {
        id: String,
        /// Why (shown to the requester and recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// A store read directly, without the server (its files or its database).
#[derive(Debug, Clone, clap::Args)]
pub struct OfflineStore {
    /// The store: a SQLite file (`data/keygate.db`), or a store URL
    /// (`sqlite://…`, `postgres://user@host/db`), instead of asking the
    /// server.
    #[arg(long = "db")]
    pub location: Option<String>,
    /// PostgreSQL's password, by reference (`env:NAME` or `file:PATH`).
    #[arg(long = "db-password", requires = "location")]
    pub password: Option<keygate_provider_api::SecretRef>,
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy a SQLite store into a new PostgreSQL database: every row, the
    /// audit chain verified before and after. Stop the broker first (the
    /// copy holds the SQLite file's lock, and refuses while a broker does).
    Migrate {
        /// The SQLite store: `sqlite://data/keygate.db` or a path.
        #[arg(long)]
        from: String,
        /// The PostgreSQL store: `postgres://user@host:port/db` (empty;
        /// its schema is created).
        #[arg(long)]
        to: String,
        /// Its password, by reference (`env:NAME`, `file:PATH`).
        #[arg(long = "to-password")]
        to_password: Option<keygate_provider_api::SecretRef>,
        /// A local CA's revocation list to carry over, as `NAME=FILE`
        /// (its provider name and `revocation_file`); once per local CA.
        #[arg(long = "ca-revocations", value_name = "NAME=FILE")]
        ca_revocations: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain; exit 1 at the first broken link.
    Verify {
        #[command(flatten)]
        db: OfflineStore,
    },
    /// Print events as JSON lines.
    Tail {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// Keep polling for new events.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Write a private key (PKCS#8 PEM, mode 0600) and print the public JWKS.
    Generate {
        #[arg(long, default_value = "ES256", value_parser = ["ES256", "EdDSA"])]
        alg: String,
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
}
