//! `keygate credential-process`: an AWS SDK's `credential_process` on a
//! Keygate scope, against moto. Each call prints a working session in the
//! SDKs' shape; calls share one task through a private cache file; when the
//! task is ended, the next call opens another.

use crate::common;

use aws_credential_types::Credentials;
use common::aws::{Moto, role_arn};
use common::{TestAgent, TestBroker};
use serde_json::{Value, json};

fn scopes() -> String {
    format!(
        r#"
[[scopes]]
name = "reports"
provider = "aws"
max_ttl_secs = 3600
params = {{ kind = "assume_role", role_arn = "{}" }}
"#,
        role_arn("reports")
    ) + common::config::DEFAULT_SCOPES
}

async fn process(b: &TestBroker, agent: &TestAgent, scope: &str) -> (bool, String, String) {
    process_cached(b, agent, scope, &b.dir.join("cache/process.json")).await
}

async fn process_cached(
    b: &TestBroker,
    agent: &TestAgent,
    scope: &str,
    cache: &std::path::Path,
) -> (bool, String, String) {
    let key = b.dir.join("agent.pem");
    std::fs::write(&key, &agent.pem).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["credential-process", "--server", &b.url("")])
        .args(["--agent", &agent.id, "--key-file", key.to_str().unwrap()])
        .args(["--scope", scope, "--credential-ttl", "900"])
        .args(["--cache-file", cache.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The role session's name (the task id) of a printed session.
async fn session_name(moto: &Moto, printed: &str) -> String {
    let v: Value = serde_json::from_str(printed).unwrap();
    assert_eq!(v["Version"], 1, "{v}");
    assert!(v["Expiration"].as_str().is_some(), "{v}");
    let creds = Credentials::new(
        v["AccessKeyId"].as_str().unwrap(),
        v["SecretAccessKey"].as_str().unwrap(),
        v["SessionToken"].as_str().map(str::to_owned),
        None,
        "credential-process",
    );
    let who = moto
        .sts_as(creds)
        .get_caller_identity()
        .send()
        .await
        .unwrap();
    who.arn().unwrap().rsplit('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn sdk_refreshes_share_one_task_until_it_ends() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let agent = TestAgent::new("sdk", "ES256");
    b.register(&agent, "platform").await;

    let (ok, first, err) = process(&b, &agent, "reports").await;
    assert!(ok, "{err}");
    let task = session_name(&moto, &first).await;
    assert!(task.starts_with("tk_"), "{task}");
    let (ok, second, err) = process(&b, &agent, "reports").await;
    assert!(ok, "{err}");
    assert_ne!(first, second, "a fresh session each call");
    assert_eq!(
        session_name(&moto, &second).await,
        task,
        "one task for both"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let cache = b.dir.join("cache/process.json");
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(
            mode_of(&b.dir.join("cache")) & 0o7777,
            0o700,
            "a new cache dir is private"
        );
        // A cache file in a directory that exists leaves the directory as
        // it was (a first cut made /tmp 0700).
        let shared = b.dir.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let (ok, _, err) = process_cached(&b, &agent, "reports", &shared.join("c.json")).await;
        assert!(ok, "{err}");
        assert_eq!(
            mode_of(&shared) & 0o7777,
            0o1777,
            "the directory's mode changed"
        );
        // A file someone made beforehand where a fixed temporary name
        // would be is never written into (the session token would be theirs).
        let planted = shared.join("c2.tmp");
        std::fs::write(&planted, "planted").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (ok, _, err) = process_cached(&b, &agent, "reports", &shared.join("c2.json")).await;
        assert!(ok, "{err}");
        assert_eq!(std::fs::read_to_string(&planted).unwrap(), "planted");
        assert_eq!(mode_of(&shared.join("c2.json")) & 0o777, 0o600);
    }
    // SDK processes starting at once on a cold cache: each gets a session
    // (their cache writes never share a temporary file), all of one task:
    // the first to take the cache's lock opens it, the others find it
    // cached.
    let cold = b.dir.join("cold/c.json");
    let call = || process_cached(&b, &agent, "reports", &cold);
    let (one, two, three, four) = tokio::join!(call(), call(), call(), call());
    let mut tasks = std::collections::BTreeSet::new();
    for (ok, out, err) in [one, two, three, four] {
        assert!(ok, "{err}");
        tasks.insert(session_name(&moto, &out).await);
    }
    assert_eq!(tasks.len(), 1, "one task opened between them: {tasks:?}");
    assert!(!tasks.contains(&task), "the cold cache's task is its own");

    // The kill switch ends the task: the next calls open another, one
    // between them (whoever comes second finds it cached).
    let body = json!({ "agent": agent.id, "reason": "rotate" });
    b.post("/v1/revocations", Some(&b.ops.secops), &body)
        .await
        .expect(200);
    let ((ok, third, err), (ok2, fourth, err2)) = tokio::join!(
        process(&b, &agent, "reports"),
        process(&b, &agent, "reports")
    );
    assert!(ok && ok2, "{err}{err2}");
    let reopened = session_name(&moto, &third).await;
    assert_ne!(reopened, task);
    assert_eq!(session_name(&moto, &fourth).await, reopened);

    // A scope that is not an AWS session is refused, saying so.
    let (ok, out, err) = process(&b, &agent, "x509-svid").await;
    assert!(!ok, "{out}");
    assert!(err.contains("not an AWS session"), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "{err}");
    // …and what it issued does not stay alive in the cached task.
    let leases: serde_json::Value = b
        .http
        .get(b.url(&format!("/v1/leases?agent={}", agent.id)))
        .bearer_auth(&b.ops.auditor)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let svids: Vec<_> = leases
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["scope"] == "x509-svid")
        .collect();
    assert_eq!(svids.len(), 1, "{leases}");
    assert_eq!(svids[0]["state"], "revoked", "{leases}");
}

/// A Python with boto3: the one `scripts/install-peers` installed moto into
/// (moto depends on boto3). Missing, it fails the test with the fix.
/// A cached task too close to its end to hold a whole session (STS refuses
/// one shorter than 900 s) is not used: the call opens a new task instead
/// of failing for the last quarter hour of every task; and a `--ttl` that
/// could never hold one is refused, saying why.
#[tokio::test]
async fn a_task_near_its_end_gives_way_to_a_new_one() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let agent = TestAgent::new("sdk-late", "ES256");
    b.register(&agent, "platform").await;
    let (ok, first, err) = process(&b, &agent, "reports").await;
    assert!(ok, "{err}");
    let task = session_name(&moto, &first).await;
    // Ten minutes left in the task, in the store and in the cache alike.
    let left = common::unix_now() + 600;
    b.store_exec(
        "UPDATE tasks SET expires_at = ? WHERE id = ?",
        &[&left.to_string(), &task],
    )
    .await
    .unwrap();
    let cache = b.dir.join("cache/process.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
    c["task_expires_at"] = json!(left);
    std::fs::write(&cache, c.to_string()).unwrap();
    let (ok, second, err) = process(&b, &agent, "reports").await;
    assert!(ok, "{err}");
    assert_ne!(session_name(&moto, &second).await, task, "a new task");

    let key = b.dir.join("agent.pem");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["credential-process", "--server", &b.url("")])
        .args(["--agent", &agent.id, "--key-file", key.to_str().unwrap()])
        .args(["--scope", "reports", "--ttl", "600"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leaves no room for a session"), "{err}");
}

fn moto_python() -> String {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import boto3"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 cannot import boto3: run scripts/install-peers (it installs moto[server], which brings boto3)"
    );
    "python3".to_owned()
}

#[tokio::test]
async fn boto3_reads_the_session_through_its_credential_process() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let agent = TestAgent::new("boto", "ES256");
    b.register(&agent, "platform").await;
    let key = b.dir.join("agent.pem");
    std::fs::write(&key, &agent.pem).unwrap();
    let config = b.dir.join("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile kg]\nregion = us-east-1\ncredential_process = {} credential-process --server {} --agent {} --key-file {} --scope reports --credential-ttl 900 --cache-file {}\n",
            env!("CARGO_BIN_EXE_keygate"),
            b.url(""),
            agent.id,
            key.display(),
            b.dir.join("cache.json").display()
        ),
    )
    .unwrap();
    let python = moto_python();
    let out = tokio::process::Command::new(&python)
        .args([
            "-c",
            "import boto3,sys; s = boto3.Session(profile_name='kg'); \
             print(s.client('sts', endpoint_url=sys.argv[1]).get_caller_identity()['Arn'])",
            &moto.url,
        ])
        .env("AWS_CONFIG_FILE", &config)
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/keygate-test-aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .output()
        .await
        .unwrap();
    let arn = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{arn}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        arn.trim()
            .starts_with("arn:aws:sts::123456789012:assumed-role/reports/tk_"),
        "{arn}"
    );
}

#[tokio::test]
async fn keygate_exec_hands_an_aws_session_to_its_command() {
    let moto = Moto::start().await;
    moto.create_role("reports").await;
    let b = TestBroker::start_with(moto.setup(&scopes())).await;
    let agent = TestAgent::new("exec-aws", "ES256");
    b.register(&agent, "platform").await;
    let key = b.dir.join("agent.pem");
    std::fs::write(&key, &agent.pem).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["exec", "--server", &b.url(""), "--agent", &agent.id])
        .args(["--key-file", key.to_str().unwrap()])
        .args(["--scope", "reports", "--ttl", "3600", "--credential-ttl", "900"])
        .args([
            "--",
            "sh",
            "-c",
            "printf '%s\\n%s\\n%s\\n' \"$AWS_ACCESS_KEY_ID\" \"$AWS_SECRET_ACCESS_KEY\" \"$AWS_SESSION_TOKEN\" > aws.txt",
        ])
        .current_dir(&b.dir)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(b.dir.join("aws.txt")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let printed = json!({
        "Version": 1, "AccessKeyId": lines[0], "SecretAccessKey": lines[1], "SessionToken": lines[2],
        "Expiration": "2099-01-01T00:00:00Z",
    })
    .to_string();
    // The session the command got works at AWS (moto) as the role, for its
    // task; AWS cannot revoke it (it lives until its expiry, and the lease
    // says so), but the task is over.
    assert!(session_name(&moto, &printed).await.starts_with("tk_"));
    let leases = b.leases(&format!("agent={}", agent.id)).await;
    assert!(
        leases.iter().all(|l| l["state"] == "expiring"),
        "{leases:?}"
    );
}
