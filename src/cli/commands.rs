//! What each CLI command does.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use secrecy::ExposeSecret;

use super::client::Client;
use super::{
    AgentsCmd, ApprovalsCmd, AuditCmd, Cli, Command, EvidenceCmd, FencesCmd, GovernanceCmd,
    KeysCmd, LeasesCmd, PeopleCmd, PolicyCmd, ReviewsCmd, StoreCmd,
};

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, listen } => crate::server::serve(&config, listen).await,
        Command::Agents { cmd, remote } => agents(&Client::new(&remote)?, cmd).await,
        Command::Leases {
            cmd:
                LeasesCmd::List {
                    agent,
                    task,
                    state,
                    provider,
                    page,
                },
            remote,
        } => {
            let c = Client::new(&remote)?;
            let mut q = Vec::new();
            for (k, v) in [
                ("agent", agent),
                ("task", task),
                ("state", state),
                ("provider", provider),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            print_json(&c.list("/v1/leases", q, &page).await?)
        }
        Command::Revoke {
            agent,
            team,
            provider,
            all,
            reason,
            suspend,
            revoke_older_sessions,
            timeout,
            remote,
        } => {
            let body = serde_json::json!({
                "agent": agent, "team": team, "provider": provider, "all": all,
                "reason": reason, "suspend": suspend, "wait": 0,
                "revoke_older_sessions": revoke_older_sessions,
            });
            revoke(&Client::new(&remote)?, body, timeout).await
        }
        Command::Fences { cmd, remote } => fences(&Client::new(&remote)?, cmd).await,
        Command::Incidents { cmd, remote } => {
            super::incidents::run(&Client::new(&remote)?, cmd).await
        }
        Command::Approvals { cmd, remote } => approvals(&Client::new(&remote)?, cmd).await,
        Command::CredentialProcess(args) => super::credential_process::run(args).await,
        Command::Exec(args) => {
            let code = super::exec::run(args).await?;
            // The task is completed and the files are gone: exit as the
            // command did.
            std::process::exit(code)
        }
        Command::Store {
            cmd:
                StoreCmd::Migrate {
                    from,
                    to,
                    to_password,
                    ca_revocations,
                },
        } => super::migrate::run(&from, &to, to_password.as_ref(), &ca_revocations).await,
        Command::Audit {
            cmd: AuditCmd::Verify { db },
            remote,
        } => match db.location {
            Some(_) => super::audit::verify_db(&db).await,
            None => super::audit::verify_remote(&Client::new(&remote)?).await,
        },
        Command::Audit {
            cmd:
                AuditCmd::Tail {
                    agent,
                    task,
                    action,
                    follow,
                },
            remote,
        } => super::audit::tail(&Client::new(&remote)?, agent, task, action, follow).await,
        Command::Plan { files, remote } => {
            let c = Client::new(&remote)?;
            let v = c
                .json(
                    c.request(Method::POST, "/v1/ascode/plan")
                        .json(&agent_files(&files)?),
                )
                .await?;
            print_json(&v)?;
            if v["changes"].as_u64().unwrap_or(0) > 0 {
                // Changes pending: CI fails the step or posts the plan.
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Apply { files, remote } => {
            let c = Client::new(&remote)?;
            let v = c
                .json(
                    c.request(Method::POST, "/v1/ascode/apply")
                        .json(&agent_files(&files)?),
                )
                .await?;
            print_json(&v)
        }
        Command::Reviews { cmd, remote } => reviews(&Client::new(&remote)?, cmd).await,
        Command::People { cmd, remote } => {
            let c = Client::new(&remote)?;
            let v = match cmd {
                PeopleCmd::List => c.json(c.request(Method::GET, "/v1/people")).await?,
                PeopleCmd::Depart { email, reason } => {
                    c.json(
                        c.request(Method::POST, &format!("/v1/people/{email}/depart"))
                            .json(&serde_json::json!({ "reason": reason.unwrap_or_default() })),
                    )
                    .await?
                }
            };
            print_json(&v)
        }
        Command::Governance { cmd, remote } => {
            let c = Client::new(&remote)?;
            let v = match cmd {
                GovernanceCmd::Findings { agent, open } => {
                    let mut q = vec![("open", open.to_string())];
                    if let Some(a) = agent {
                        q.push(("agent", a));
                    }
                    c.json(c.request(Method::GET, "/v1/findings").query(&q))
                        .await?
                }
                GovernanceCmd::Sweep => {
                    c.json(c.request(Method::POST, "/v1/governance/sweep"))
                        .await?
                }
            };
            print_json(&v)
        }
        Command::Policy {
            cmd: PolicyCmd::Test { dir, cases },
            ..
        } => policy_test(&dir, &cases),
        Command::Policy { cmd, remote } => {
            let c = Client::new(&remote)?;
            let v = match cmd {
                PolicyCmd::Show => c.json(c.request(Method::GET, "/v1/policy")).await?,
                PolicyCmd::Diff { dir } => {
                    let files = policy_files(&dir)?;
                    let body = serde_json::json!({ "files": files });
                    c.json(c.request(Method::POST, "/v1/policy/diff").json(&body))
                        .await?
                }
                PolicyCmd::Reload => c.json(c.request(Method::POST, "/v1/policy/reload")).await?,
                PolicyCmd::Test { .. } => unreachable!("handled above"),
            };
            print_json(&v)
        }
        Command::Evidence {
            cmd: Some(EvidenceCmd::Verify { dir, db }),
            ..
        } => super::evidence::verify(&dir, db.location.is_some().then_some(&db)).await,
        Command::Evidence {
            cmd: None,
            from: Some(from),
            to: Some(to),
            out: Some(out),
            remote,
        } => super::evidence::write(&Client::new(&remote)?, &from, &to, &out).await,
        Command::Evidence { .. } => {
            bail!(
                "give `--from`, `--to` and `--out` to write a pack, or `verify <dir>` to check one"
            )
        }
        Command::Maturity { remote } => {
            let c = Client::new(&remote)?;
            let v = c.json(c.request(Method::GET, "/v1/maturity")).await?;
            eprintln!("overall: {}", v["level"].as_str().unwrap_or("-"));
            print_json(&v)
        }
        Command::Keys {
            cmd: KeysCmd::Generate { alg, out },
        } => {
            if out.exists() {
                bail!("`{}` exists; refusing to overwrite a key", out.display());
            }
            let (pem, public) = crate::identity::generate_agent_key(&alg)?;
            crate::identity::write_private_file(&out, pem.expose_secret())
                .with_context(|| format!("writing `{}`", out.display()))?;
            eprintln!(
                "private key written to {} (mode 0600); register the public JWKS below",
                out.display()
            );
            print_json(&serde_json::json!({ "keys": [public.jwk] }))
        }
    }
}

/// `keygate policy test`: every case against the set in `dir`.
fn policy_test(dir: &std::path::Path, cases: &std::path::Path) -> anyhow::Result<()> {
    let engine = crate::policy::PolicyEngine::load(dir)?;
    let text =
        std::fs::read_to_string(cases).with_context(|| format!("reading `{}`", cases.display()))?;
    let file: crate::policy::cases::CasesFile =
        toml::from_str(&text).with_context(|| format!("parsing `{}`", cases.display()))?;
    if file.cases.is_empty() {
        bail!("no [[case]] in `{}`", cases.display());
    }
    let outcomes = crate::policy::cases::run(&engine, &file);
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    for o in &outcomes {
        match &o.failure {
            None => println!("ok    {}", o.name),
            Some(why) => println!("FAIL  {}: {why}", o.name),
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} policy cases failed (policy set {})",
            outcomes.len(),
            engine.hash()
        );
    }
    println!(
        "{} policy cases passed (policy set {})",
        outcomes.len(),
        engine.hash()
    );
    Ok(())
}

/// The `*.cedar` and `*.cedarschema` files of `dir`, by name.
fn policy_files(
    dir: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading `{}`", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".cedar") || name.ends_with(".cedarschema") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading `{}`", path.display()))?;
            files.insert(name, text);
        }
    }
    if files.is_empty() {
        bail!("no *.cedar file in `{}`", dir.display());
    }
    Ok(files)
}

/// Prints JSON to stdout; a closed pipe (`| head`) ends quietly.
pub(super) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(v)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

async fn agents(c: &Client, cmd: AgentsCmd) -> anyhow::Result<()> {
    let status = |id: &str, action: &str, reason: Option<String>| {
        c.request(Method::POST, &format!("/v1/agents/{id}/{action}"))
            .json(&serde_json::json!({ "reason": reason }))
    };
    let v = match cmd {
        AgentsCmd::Register { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading `{}`", file.display()))?;
            let spec: serde_json::Value = if file.extension().is_some_and(|e| e == "json") {
                serde_json::from_str(&text)?
            } else {
                toml::from_str(&text).with_context(|| format!("parsing `{}`", file.display()))?
            };
            c.json(c.request(Method::POST, "/v1/agents").json(&spec))
                .await?
        }
        AgentsCmd::List { page } => {
            let v = c.list("/v1/agents", Vec::new(), &page).await?;
            println!(
                "{:<32} {:<14} {:<10} {:<4} {:<5} SPONSOR",
                "ID", "TEAM", "STATUS", "TIER", "ENV"
            );
            for a in v.as_array().into_iter().flatten() {
                println!(
                    "{:<32} {:<14} {:<10} {:<4} {:<5} {}",
                    a["id"].as_str().unwrap_or(""),
                    a["team"].as_str().unwrap_or(""),
                    a["status"].as_str().unwrap_or(""),
                    a["risk_tier"],
                    a["environment"].as_str().unwrap_or(""),
                    a["sponsor"].as_str().unwrap_or(""),
                );
            }
            return Ok(());
        }
        AgentsCmd::Show { id } => {
            c.json(c.request(Method::GET, &format!("/v1/agents/{id}")))
                .await?
        }
        AgentsCmd::Export { format } => {
            let rows: Vec<crate::governance::evidence::RegistryRow> = c
                .send(c.request(Method::GET, "/v1/registry"))
                .await?
                .json()
                .await?;
            if format == "json" {
                return print_json(&serde_json::to_value(rows)?);
            }
            let mut w = csv::Writer::from_writer(std::io::stdout().lock());
            for r in &rows {
                w.serialize(r)?;
            }
            w.flush()?;
            return Ok(());
        }
        AgentsCmd::Compliance { id } => {
            c.json(c.request(Method::GET, &format!("/v1/agents/{id}/compliance")))
                .await?
        }
        AgentsCmd::Exclude { id, scope, reason } => {
            c.json(
                c.request(Method::POST, &format!("/v1/agents/{id}/exclusions"))
                    .json(&serde_json::json!({ "scope": scope, "reason": reason })),
            )
            .await?
        }
        AgentsCmd::Include { id, scope, reason } => {
            c.json(
                c.request(
                    Method::DELETE,
                    &format!("/v1/agents/{id}/exclusions/{scope}"),
                )
                .json(&serde_json::json!({ "reason": reason.unwrap_or_default() })),
            )
            .await?
        }
        AgentsCmd::Suspend { id, reason } => c.json(status(&id, "suspend", reason)).await?,
        AgentsCmd::Resume { id, reason } => c.json(status(&id, "resume", reason)).await?,
        AgentsCmd::Decommission { id, reason } => {
            c.json(status(&id, "decommission", reason)).await?
        }
    };
    print_json(&v)
}

async fn revoke(c: &Client, body: serde_json::Value, timeout: u64) -> anyhow::Result<()> {
    let first = c
        .json(c.request(Method::POST, "/v1/revocations").json(&body))
        .await?;
    let id = first["revocation_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let found = first["found"].as_u64().unwrap_or(0);
    eprintln!(
        "revocation {id}: {} session(s) ended; {found} live lease(s) queued",
        first["tasks_ended"]
    );
    print_fences(&first);
    let fences_failed = !first["fence_failures"].as_array().is_none_or(Vec::is_empty);
    let bar = indicatif::ProgressBar::new(found);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} leases confirmed {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let mut last = first;
    // The last look the broker did not answer, while none has since.
    let mut unanswered: Option<anyhow::Error> = None;
    loop {
        let done = last["revoked"].as_u64().unwrap_or(0) + last["expiring"].as_u64().unwrap_or(0);
        bar.set_position(done);
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if last["pending"].as_u64().unwrap_or(0) == 0 || left.is_zero() {
            break;
        }
        // Answered the moment every lease is settled, or after a second
        // with the progress so far (one count of the leases a second; the
        // timeout may be passed by less than that second).
        let look = c
            .json(c.request(Method::GET, &format!("/v1/revocations/{id}?wait=1")))
            .await;
        last = match look {
            Ok(v) => {
                bar.set_message("");
                unanswered = None;
                v
            }
            // The broker restarting: its revocations resume when it is
            // back (the queue is in its store), so look again until then.
            Err(e) if e.downcast_ref().is_some_and(Client::no_answer) => {
                bar.set_message("(the broker is unreachable: looking again)");
                unanswered = Some(e);
                tokio::time::sleep(Duration::from_secs(1).min(left)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
    }
    bar.finish_and_clear();
    print_json(&last)?;
    let pending = last["pending"].as_u64().unwrap_or(0);
    if let Some(e) = unanswered {
        return Err(e.context(format!(
            "{pending} lease(s) were still pending when the broker last answered; it resumes them when it is back"
        )));
    }
    if pending > 0 {
        bail!(
            "{pending} lease(s) still pending; the broker keeps retrying (see `keygate leases list --state revoking`)"
        );
    }
    if last["expiring"].as_u64().unwrap_or(0) > 0 {
        eprintln!(
            "note: `expiring` leases are on backends that cannot revoke; they live until their expiry"
        );
    }
    if fences_failed {
        bail!(
            "some fences could not be put up (see `fence_failures`); repeat the revocation to retry them"
        );
    }
    Ok(())
}

/// Says which roles an emergency revocation fenced, and how.
fn print_fences(report: &serde_json::Value) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    for f in report["fences"].as_array().into_iter().flatten() {
        eprintln!(
            "fenced {} ({} `{}`, fence {}): {}",
            s(&f["target"]),
            s(&f["provider"]),
            s(&f["name"]),
            s(&f["id"]),
            s(&f["description"])
        );
    }
    for f in report["fence_failures"].as_array().into_iter().flatten() {
        eprintln!(
            "NOT fenced {} ({} `{}`): {}",
            f["target"].as_str().unwrap_or("-"),
            s(&f["provider"]),
            f["name"].as_str().unwrap_or("-"),
            s(&f["error"])
        );
    }
}

async fn fences(c: &Client, cmd: FencesCmd) -> anyhow::Result<()> {
    let v = match cmd {
        FencesCmd::List {
            revocation,
            active,
            page,
        } => {
            let mut q = vec![("active", active.to_string())];
            if let Some(r) = revocation {
                q.push(("revocation", r));
            }
            c.list("/v1/fences", q, &page).await?
        }
        FencesCmd::Lift { id, reason } => {
            let path = format!("/v1/fences/{id}/lift");
            let body = serde_json::json!({ "reason": reason });
            c.json(c.request(Method::POST, &path).json(&body)).await?
        }
    };
    print_json(&v)
}

async fn approvals(c: &Client, cmd: ApprovalsCmd) -> anyhow::Result<()> {
    let decide = |id: String, decision: &str, reason: Option<String>| {
        let body = serde_json::json!({ "decision": decision, "reason": reason });
        c.request(Method::POST, &format!("/v1/approvals/{id}/decision"))
            .json(&body)
    };
    let answer = match cmd {
        ApprovalsCmd::List { state, agent, page } => {
            let mut q = Vec::new();
            if state != "all" {
                q.push(("state", state));
            }
            if let Some(a) = agent {
                q.push(("agent", a));
            }
            c.list("/v1/approvals", q, &page).await?
        }
        ApprovalsCmd::Show { id } => {
            c.json(c.request(Method::GET, &format!("/v1/approvals/{id}")))
                .await?
        }
        ApprovalsCmd::Approve { id, reason } => c.json(decide(id, "approve", reason)).await?,
        ApprovalsCmd::Deny { id, reason } => c.json(decide(id, "deny", Some(reason))).await?,
    };
    print_json(&answer)
}

async fn reviews(c: &Client, cmd: ReviewsCmd) -> anyhow::Result<()> {
    let v = match cmd {
        ReviewsCmd::Start { name, team, due } => {
            let due_days = due
                .map(|d| {
                    d.trim_end_matches('d')
                        .parse::<u32>()
                        .with_context(|| format!("`--due {d}`: a number of days, like `14d`"))
                })
                .transpose()?;
            c.json(
                c.request(Method::POST, "/v1/reviews")
                    .json(&serde_json::json!({ "name": name, "team": team, "due_days": due_days })),
            )
            .await?
        }
        ReviewsCmd::List => c.json(c.request(Method::GET, "/v1/reviews")).await?,
        ReviewsCmd::Show { campaign } => {
            c.json(c.request(Method::GET, &format!("/v1/reviews/{campaign}")))
                .await?
        }
        ReviewsCmd::Item { id } => {
            c.json(c.request(Method::GET, &format!("/v1/reviews/items/{id}")))
                .await?
        }
        ReviewsCmd::Decide {
            item,
            attest,
            narrow,
            retire,
            note,
        } => {
            let decision = match (attest, narrow.is_empty(), retire) {
                (true, true, false) => "attest",
                (false, false, false) => "narrow",
                (false, true, true) => "retire",
                _ => bail!("say exactly one of --attest, --narrow SCOPES, --retire"),
            };
            c.json(
                c.request(Method::POST, &format!("/v1/reviews/items/{item}/decision"))
                    .json(&serde_json::json!({ "decision": decision, "scopes": narrow, "note": note })),
            )
            .await?
        }
    };
    print_json(&v)
}

/// The agent files of a folder (not its subfolders), by name.
fn agent_files(f: &super::AgentFiles) -> anyhow::Result<serde_json::Value> {
    let files = crate::ascode::format::read_folder(&f.dir)
        .with_context(|| format!("reading the agent files in `{}`", f.dir.display()))?;
    Ok(serde_json::json!({ "files": files, "prune": f.prune }))
}
