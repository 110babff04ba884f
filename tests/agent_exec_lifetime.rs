//! `keygate exec` over time: credentials refreshed under the running
//! command (a refresh waiting for approval holds up neither signals nor the
//! command's exit), and the broker restarting while exec waits for an
//! approval or completes its task.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::agent_exec::{
    UNTIL_TERM, agent, all_revoked, approve_and_see_it_run, command_started, exec, exec_waiting,
    exec_waiting_up_to, leases_of, rest_of, terminate,
};
use crate::common;
use common::{Setup, TestBroker, eventually};

/// The broker restarted (SIGTERM, then started again on the same address)
/// while `keygate exec` waits for an approval: the long-poll is answered
/// `pending` as the broker stops, exec keeps asking until it is back (the
/// approval waits in its store), and an approval decided after the
/// restart runs the command.
#[tokio::test(flavor = "multi_thread")]
async fn exec_waits_for_its_approval_across_a_broker_restart() {
    let mut b = TestBroker::start_with(Setup::default()).await;
    b.listen = b.addr.to_string();
    let (agent, key) = agent(&b, "exec-restart").await;
    let (mut child, id, mut lines) = exec_waiting(
        &b,
        &agent,
        &key,
        &[],
        "test -f \"$KEYGATE_PAYMENTS_CA_CERTIFICATE_FILE\"",
    )
    .await;
    b.stop_gracefully().await;
    b.start_again().await;
    if let Some(gave_up) = child.try_wait().unwrap() {
        let mut said = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            said.push(line);
        }
        panic!("keygate exec gave up while the broker restarted ({gave_up}): {said:?}");
    }
    approve_and_see_it_run(&b, &agent, &mut child, &id).await;
}

/// The broker stopped for good while `keygate exec` waits for an approval:
/// when `--approval-timeout` runs out, exec runs nothing and says the broker
/// was unreachable, not that nobody decided.
#[tokio::test(flavor = "multi_thread")]
async fn exec_says_the_broker_was_unreachable_when_its_wait_runs_out() {
    let mut b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-gone").await;
    let (mut child, id, mut lines) =
        exec_waiting_up_to(&b, &agent, &key, &[], "touch ran.txt", "4").await;
    b.stop_gracefully().await;
    // The wait runs out, then completing the task is asked again for 30 s.
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut said = Vec::new();
    while let Ok(Some(line)) = lines.next_line().await {
        said.push(line);
    }
    assert_eq!(status.code(), Some(1), "{said:?}");
    let said = said.join("\n");
    assert!(
        said.contains(&format!(
            "approval {id} for scope `payments-ca`: the broker was unreachable when the wait ran out"
        )),
        "{said}"
    );
    assert!(!b.dir.join("ran.txt").exists(), "the command ran");
    assert!(
        said.contains("the broker did not answer; asking again to complete task"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_lived_credential_is_refreshed_under_the_running_command() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-fresh").await;
    // Every USR1, the certificate file's first serial line is noted.
    let script = r#"trap 'cksum < "$KEYGATE_X509_SVID_CERTIFICATE_FILE" >> seen.txt' USR1
        cksum < "$KEYGATE_X509_SVID_CERTIFICATE_FILE" > seen.txt
        i=0; while [ $i -lt 120 ]; do sleep 0.1; i=$((i+1)); done"#;
    let out = exec(
        &b,
        &agent,
        &key,
        &[
            "--scope",
            "x509-svid",
            "--credential-ttl",
            "6",
            "--refresh-signal",
            "USR1",
        ],
        script,
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = std::fs::read_to_string(b.dir.join("seen.txt")).unwrap();
    let sums: std::collections::BTreeSet<&str> = seen.lines().collect();
    assert!(sums.len() >= 2, "the file never changed: {seen}");
    let leases = leases_of(&b, &agent).await;
    assert!(leases.len() >= 2, "not issued again: {leases:?}");
    // Those that ran out before the command ended expired; the rest were
    // revoked with the task.
    eventually("every lease of the agent ended", || async {
        let leases = leases_of(&b, &agent).await;
        let ended = leases
            .iter()
            .all(|l| l["state"] == "revoked" || l["state"] == "expired");
        (ended && leases.iter().any(|l| l["state"] == "revoked")).then_some(())
    })
    .await;
}

/// A refresh waiting for a sensitive scope's new approval does not hold up
/// the rest: a signal reaches the command at once, the command's exit ends
/// exec with its code, and the task is completed (it used to wait out the
/// refresh's approval first, up to `--approval-timeout`).
#[tokio::test(flavor = "multi_thread")]
async fn a_refresh_waiting_for_approval_holds_up_no_signal_and_no_exit() {
    let b = TestBroker::start_with(Setup::default()).await;
    let (agent, key) = agent(&b, "exec-refwait").await;
    let (mut child, first, _lines) =
        exec_waiting(&b, &agent, &key, &["--credential-ttl", "6"], UNTIL_TERM).await;
    b.post(
        &format!("/v1/approvals/{first}/decision"),
        Some(&b.ops.approver),
        &json!({ "decision": "approve", "reason": "exec test" }),
    )
    .await
    .expect(200);
    command_started(&b).await;
    // At two thirds of its life the certificate is asked for again, which
    // waits for a new approval.
    eventually("the refresh's approval", || async {
        let pending = b
            .admin_get(&format!(
                "/v1/approvals?state=pending&kind=credential&agent={}",
                agent.id
            ))
            .await;
        pending
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] != first.as_str())
            .then_some(())
    })
    .await;
    let status = terminate(
        &mut child,
        15,
        "keygate exec ends with its command, not with the refresh",
    )
    .await;
    assert_eq!(status.code(), Some(3));
    assert!(
        b.dir.join("term.txt").exists(),
        "the signal never reached the command"
    );
    all_revoked(&b, &agent).await;
}

/// The command ends while the broker restarts: exec asks again to complete
/// the task until the broker is back, so its credentials are revoked then,
/// not left to their TTL.
#[tokio::test(flavor = "multi_thread")]
async fn the_task_is_completed_after_a_broker_restart_at_the_commands_exit() {
    let mut b = TestBroker::start_with(Setup::default()).await;
    b.listen = b.addr.to_string();
    let (agent, key) = agent(&b, "exec-endrestart").await;
    let script = r#"echo started > started.txt
        while [ ! -f go.txt ]; do sleep 0.1; done"#;
    let mut child = exec(&b, &agent, &key, &["--scope", "x509-svid"], script)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    command_started(&b).await;
    b.stop_gracefully().await;
    std::fs::write(b.dir.join("go.txt"), "").unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("the broker did not answer") {
                return;
            }
        }
        panic!("exec never said it would ask again")
    })
    .await
    .unwrap();
    b.start_again().await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exec completes the task once the broker is back")
        .unwrap();
    let rest = rest_of(&mut lines).await;
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(
        rest.contains("completed; its credentials are revoked"),
        "{rest}"
    );
    all_revoked(&b, &agent).await;
}
