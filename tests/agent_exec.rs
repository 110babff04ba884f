//! `keygate exec`: the agent side of "revoked at task end". The real binary
//! runs a real command inside a task against a real broker: the command
//! gets its credentials (variables, private files), its exit code passes
//! through, signals reach it, a sensitive scope waits for its approval, a
//! short-lived credential is refreshed under it, and whenever it ends the
//! task is completed and every credential revoked.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::common;
use common::{Setup, TestAgent, TestBroker, eventually};

/// A registered agent with its key in a file in the broker's dir.
pub(super) async fn agent(b: &TestBroker, prefix: &str) -> (TestAgent, String) {
    let agent = TestAgent::new(prefix, "ES256");
    b.register(&agent, "platform").await;
    let key = b.dir.join(format!("{}.pem", agent.id));
    std::fs::write(&key, &agent.pem).unwrap();
    (agent, key.display().to_string())
}

/// `keygate exec` for `agent` with `args` before `--`, then `sh -c script`.
pub(super) fn exec(
    b: &TestBroker,
    agent: &TestAgent,
    key: &str,
    args: &[&str],
    script: &str,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
    cmd.arg("exec")
        .args(["--server", &b.url("")])
        .args(["--agent", &agent.id, "--key-file", key])
        .args(args)
        .args(["--", "sh", "-c", script])
        .current_dir(&b.dir)
        .env_remove("KEYGATE_SESSION_TOKEN")
        .kill_on_drop(true);
    cmd
}

pub(super) async fn leases_of(b: &TestBroker, agent: &TestAgent) -> Vec<Value> {
    b.leases(&format!("agent={}&limit=1000", agent.id)).await
}

pub(super) async fn all_revoked(b: &TestBroker, agent: &TestAgent) {
    eventually("every lease of the agent revoked", || async {
        let leases = leases_of(b, agent).await;
        (!leases.is_empty() && leases.iter().all(|l| l["state"] == "revoked")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_gets_its_credentials_and_they_die_with_it() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec").await;
    let script = r#"
        {
          echo "dir=$KEYGATE_CREDENTIALS_DIR"
          echo "dirmode=$(stat -c %a "$KEYGATE_CREDENTIALS_DIR")"
          echo "keymode=$(stat -c %a "$KEYGATE_X509_SVID_PRIVATE_KEY_FILE")"
          echo "cert=$CERT"
          echo "spiffe=$KEYGATE_X509_SVID_SPIFFE_ID"
          echo "task=$KEYGATE_TASK_ID"
          echo "session=${KEYGATE_SESSION_TOKEN:-none}"
          head -1 "$CERT"
        } > out.txt
        cp "$CERT" cert.pem
        exit 7
    "#;
    let out = exec(
        &b,
        &agent,
        &key,
        &[
            "--scope",
            "x509-svid",
            "--ttl",
            "600",
            "--env",
            "CERT=x509-svid.certificate",
        ],
        script,
    )
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "the command's code: {stderr}");
    let seen = std::fs::read_to_string(b.dir.join("out.txt")).unwrap();
    let get = |k: &str| {
        seen.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {seen}"))
            .to_owned()
    };
    assert_eq!(get("dirmode"), "700", "{seen}");
    assert_eq!(get("keymode"), "600", "{seen}");
    assert_eq!(
        get("spiffe"),
        format!("spiffe://keygate.test/agent/{}", agent.id)
    );
    assert_eq!(
        get("session"),
        "none",
        "the session token is not the command's"
    );
    assert!(seen.contains("-----BEGIN CERTIFICATE-----"), "{seen}");
    assert!(get("cert").starts_with(&get("dir")), "{seen}");
    // Gone with the command: the files, the task, every credential.
    assert!(
        !std::path::Path::new(&get("dir")).exists(),
        "the private dir is left"
    );
    all_revoked(&b, &agent).await;
    // It was a real certificate of the CA, and it is revoked there now.
    let cert = std::fs::read_to_string(b.dir.join("cert.pem")).unwrap();
    let v = b.verify(&json!({ "x509_svid": cert })).await;
    assert_eq!(v["reason"], "revoked", "{v}");
    let task = get("task");
    let ended = b.audit(&format!("task={task}&action=task.completed")).await;
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

/// A command that says it started (`started.txt`), then waits; told
/// SIGTERM, it says so (`term.txt`) and exits 3.
pub(super) const UNTIL_TERM: &str = r#"trap 'echo got-term > term.txt; exit 3' TERM
        echo started > started.txt
        while true; do sleep 0.1; done"#;

/// Waits until the command wrote `started.txt` in the broker's dir.
pub(super) async fn command_started(b: &TestBroker) {
    let started = b.dir.join("started.txt");
    eventually("the command to start", || async {
        started.exists().then_some(())
    })
    .await;
}

/// Sends SIGTERM to `keygate exec` and waits up to `secs` for it to end
/// (`what`: why it should, in a timeout's message).
pub(super) async fn terminate(
    child: &mut tokio::process::Child,
    secs: u64,
    what: &str,
) -> std::process::ExitStatus {
    let pid = child.id().unwrap().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(secs), child.wait())
        .await
        .expect(what)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_reaches_the_command_and_the_task_still_completes() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-sig").await;
    let mut child = exec(&b, &agent, &key, &["--scope", "x509-svid"], UNTIL_TERM)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    command_started(&b).await;
    let status = terminate(&mut child, 30, "keygate exec ends with its command").await;
    assert_eq!(status.code(), Some(3));
    assert_eq!(
        std::fs::read_to_string(b.dir.join("term.txt"))
            .unwrap()
            .trim(),
        "got-term"
    );
    all_revoked(&b, &agent).await;
}

/// Told to stop (SIGTERM, SIGINT) while a scope waits for approval, before
/// any command runs: exec runs nothing, exits 128 + the signal's number,
/// and still completes the task, so the credential it already had is
/// revoked.
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_while_exec_waits_for_approval_runs_nothing_and_ends_the_task() {
    let b = TestBroker::start_with(Setup::default()).await;
    for (signal, code) in [("-TERM", 143), ("-INT", 130)] {
        let (agent, key) = agent(&b, "exec-stopped").await;
        let (mut child, _, mut lines) =
            exec_waiting(&b, &agent, &key, &["--scope", "x509-svid"], "touch ran.txt").await;
        let pid = child.id().unwrap().to_string();
        Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("keygate exec stops when told to")
            .unwrap();
        assert_eq!(status.code(), Some(code), "{signal}");
        let rest = rest_of(&mut lines).await;
        assert!(
            rest.contains("stopped by a signal") && rest.contains("completed"),
            "{signal}: {rest}"
        );
        assert!(!b.dir.join("ran.txt").exists(), "the command ran");
        all_revoked(&b, &agent).await;
    }
}

/// What exec writes on stderr from here to its end.
pub(super) async fn rest_of(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) -> String {
    let mut rest = String::new();
    while let Ok(Some(l)) = lines.next_line().await {
        rest.push_str(&l);
        rest.push('\n');
    }
    rest
}

/// `keygate exec` asking for `payments-ca` with `first` before it, and the
/// approval id it names on stderr (the rest of stderr stays readable).
pub(super) async fn exec_waiting(
    b: &TestBroker,
    agent: &TestAgent,
    key: &str,
    first: &[&str],
    script: &str,
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    exec_waiting_up_to(b, agent, key, first, script, "60").await
}

/// [`exec_waiting`] with `--approval-timeout` `secs`.
pub(super) async fn exec_waiting_up_to(
    b: &TestBroker,
    agent: &TestAgent,
    key: &str,
    first: &[&str],
    script: &str,
    secs: &str,
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut args = first.to_vec();
    args.extend(["--scope", "payments-ca", "--approval-timeout", secs]);
    let mut child = exec(b, agent, key, &args, script)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let id = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("waits for approval ").nth(1) {
                return rest.split_whitespace().next().unwrap().to_owned();
            }
        }
        panic!("keygate exec never named the approval")
    })
    .await
    .unwrap();
    (child, id, lines)
}

/// An approver approves `id`; the waiting `keygate exec` runs its command,
/// which sees its certificate, and every credential is revoked after it.
pub(super) async fn approve_and_see_it_run(
    b: &TestBroker,
    agent: &TestAgent,
    child: &mut tokio::process::Child,
    id: &str,
) {
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "approve", "reason": "exec test" }),
    )
    .await
    .expect(200);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "the command saw its certificate");
    all_revoked(b, agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sensitive_scope_waits_for_its_approval() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-appr").await;
    // Its stderr is closed from here on (the reader is dropped): what exec
    // still has to say must not stop it (a first cut died of the EPIPE).
    let (mut child, id, _) = exec_waiting(
        &b,
        &agent,
        &key,
        &[],
        "test -f \"$KEYGATE_PAYMENTS_CA_CERTIFICATE_FILE\"",
    )
    .await;
    approve_and_see_it_run(&b, &agent, &mut child, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_or_a_kill_switch_while_exec_waits_runs_nothing_and_revokes_what_it_had() {
    let b = TestBroker::start_with(Setup::default()).await;
    // Denied: the command never runs; the SVID obtained first is revoked.
    let (denied, key) = agent(&b, "exec-deny").await;
    let (mut child, id, mut lines) = exec_waiting(
        &b,
        &denied,
        &key,
        &["--scope", "x509-svid"],
        "touch ran.txt",
    )
    .await;
    b.post(
        &format!("/v1/approvals/{id}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "deny", "reason": "not tonight" }),
    )
    .await
    .expect(200);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let rest = rest_of(&mut lines).await;
    assert!(rest.contains("denied"), "{rest}");
    assert!(!b.dir.join("ran.txt").exists(), "the command ran");
    all_revoked(&b, &denied).await;

    // The kill switch while it waits: the approval is cancelled with the
    // task, and exec says so instead of waiting out its timeout.
    let (killed, key) = agent(&b, "exec-killed").await;
    let (mut child, _, _) = exec_waiting(
        &b,
        &killed,
        &key,
        &["--scope", "x509-svid"],
        "touch ran2.txt",
    )
    .await;
    b.post(
        "/v1/revocations",
        Some(&b.ops.secops),
        &json!({ "agent": killed.id, "reason": "incident" }),
    )
    .await
    .expect(200);
    let status = tokio::time::timeout(Duration::from_secs(45), child.wait())
        .await
        .expect("exec waited out its approval timeout after the kill switch")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(!b.dir.join("ran2.txt").exists(), "the command ran");
    all_revoked(&b, &killed).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_scope_runs_nothing_and_ends_the_task() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-no").await;
    let out = exec(
        &b,
        &agent,
        &key,
        &["--scope", "x509-svid", "--scope", "no-such-scope"],
        "touch ran.txt",
    )
    .output()
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no-such-scope"), "{stderr}");
    assert!(!b.dir.join("ran.txt").exists(), "the command ran");
    // The first scope's credential was issued, and is revoked with the task.
    all_revoked(&b, &agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_killed_by_a_signal_still_ends_its_task() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-kill").await;
    let out = exec(&b, &agent, &key, &["--scope", "x509-svid"], "kill -KILL $$")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(128 + 9));
    all_revoked(&b, &agent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dpop_bound_run_keeps_working_and_its_token_alone_is_refused() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-dpop").await;
    // The command hands out its session token (as a careless tool might),
    // and lives through a refresh of a 6 s credential, which the DPoP-bound
    // session must re-issue with proofs of its own.
    let script = r#"printf %s "$KEYGATE_SESSION_TOKEN" > token.txt
        trap 'echo refreshed >> seen.txt' USR1
        i=0; while [ ! -f go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done"#;
    let child = exec(
        &b,
        &agent,
        &key,
        &[
            "--dpop",
            "--pass-session",
            "--scope",
            "x509-svid",
            "--credential-ttl",
            "6",
            "--refresh-signal",
            "USR1",
        ],
        script,
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let token_file = b.dir.join("token.txt");
    let token = eventually("the command wrote the token", || async {
        std::fs::read_to_string(&token_file)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await;
    // Copied elsewhere, the token alone is useless.
    for scheme in ["Bearer", "DPoP"] {
        let r = b
            .http
            .get(b.url("/v1/session"))
            .header("authorization", format!("{scheme} {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{scheme} without a proof");
    }
    let intro = b.introspect(&token).await;
    assert_eq!(intro["active"], true, "{intro}");
    assert_eq!(intro["token_type"], "DPoP", "{intro}");
    assert!(intro["cnf"]["jkt"].is_string(), "{intro}");
    // The refresh, signed by exec's key, happens while the command runs.
    let seen = b.dir.join("seen.txt");
    eventually("a refresh under DPoP", || async {
        seen.exists().then_some(())
    })
    .await;
    std::fs::write(b.dir.join("go"), "").unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(leases_of(&b, &agent).await.len() >= 2, "not issued again");
    eventually("every lease ended", || async {
        let leases = leases_of(&b, &agent).await;
        leases
            .iter()
            .all(|l| l["state"] == "revoked" || l["state"] == "expired")
            .then_some(())
    })
    .await;
}
