//! `keygate store migrate`: a SQLite deployment moved to PostgreSQL loses
//! nothing — agents, tasks, leases, the audit chain (verified before and
//! after) and the local CA's revocations — and a broker on the copy goes on
//! where the old one stopped.

use serde_json::json;

use crate::common;
use common::{Setup, TestAgent, TestBroker};

#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_store_moves_to_postgresql_with_everything() {
    let mut b = TestBroker::prepare(Setup::default());
    let sqlite = b.dir.join("own.db");
    b.set_store_table(&format!("url = \"sqlite://{}\"", sqlite.display()));
    b.start_again().await;
    let agent = TestAgent::new("mover", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let kept = b.x509(&s.token, Some(600)).await;
    let released = b.x509(&s.token, Some(600)).await;
    let path = format!("/v1/credentials/{}", released["lease_id"].as_str().unwrap());
    b.call(reqwest::Method::DELETE, &path, Some(&s.token), None)
        .await
        .expect(200);
    common::eventually("the released certificate revoked", || async {
        let v = b
            .verify(&json!({ "x509_svid": released["credential"]["certificate"] }))
            .await;
        (v["reason"] == "revoked").then_some(())
    })
    .await;
    let agents_before = b.admin_get("/v1/agents").await;
    let leases_before = b.leases("limit=1000").await;

    let pg = common::store::cluster();
    let name = format!("kg_migrate_{}", uuid::Uuid::new_v4().simple());
    let url = pg.create_database(&name);
    std::fs::write(b.dir.join("pg-password"), &pg.password).unwrap();
    let password = format!("file:{}", b.dir.join("pg-password").display());
    let ca = format!("ca={}", b.dir.join("ca/revocations.jsonl").display());
    let args = [
        "store",
        "migrate",
        "--from",
        sqlite.to_str().unwrap(),
        "--to",
        url.as_str(),
        "--to-password",
        password.as_str(),
        "--ca-revocations",
        ca.as_str(),
    ];

    // Not while a broker serves from the file.
    let (ok, text) = migrate(&b, &args).await;
    assert!(!ok, "{text}");
    assert!(text.contains("another keygate process"), "{text}");
    assert!(text.contains("stop the broker first"), "{text}");

    b.stop_gracefully().await;
    let (ok, text) = migrate(&b, &args).await;
    assert!(ok, "{text}");
    assert!(text.contains("audit chain intact in both"), "{text}");
    assert!(!text.contains(&pg.password), "{text}");
    // Twice is refused: the copy is there already.
    let (ok, text) = migrate(&b, &args).await;
    assert!(!ok, "{text}");
    assert!(text.contains("migrate into a new database"), "{text}");

    b.set_store_table(&format!("url = \"{url}\"\npassword = \"{password}\""));
    b.start_again().await;
    assert_eq!(b.admin_get("/v1/agents").await, agents_before);
    assert_eq!(b.leases("limit=1000").await, leases_before);
    // The revoked certificate stays revoked; the kept one is valid; the
    // open task goes on.
    let v = b
        .verify(&json!({ "x509_svid": released["credential"]["certificate"] }))
        .await;
    assert_eq!(v["reason"], "revoked", "{v}");
    let v = b
        .verify(&json!({ "x509_svid": kept["credential"]["certificate"] }))
        .await;
    assert_eq!(v["valid"], true, "{v}");
    b.x509(&s.token, Some(60)).await;
    let out = b.cli(&["audit", "verify"], Some(&b.ops.auditor)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn migrate(b: &TestBroker, args: &[&str]) -> (bool, String) {
    let out = b.cli(args, None).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
