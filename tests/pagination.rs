//! Lists never truncate silently: a full page says where the next one
//! starts (`Keygate-Next-Cursor`, `Link: rel="next"`), limits are clamped,
//! and the CLI follows the pages with `--all` or says that more follow.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;

use common::{Setup, TestAgent, TestBroker};
use serde_json::Value;

async fn page(b: &TestBroker, query: &str) -> (Vec<Value>, Option<String>, Option<String>) {
    let r = b
        .http
        .get(b.url(&format!("/v1/leases?{query}")))
        .bearer_auth(&b.ops.auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let (cursor, link) = (header("keygate-next-cursor"), header("link"));
    (r.json().await.unwrap(), cursor, link)
}

#[tokio::test]
async fn lease_lists_page_with_a_cursor_and_the_cli_follows_it() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    let agent = TestAgent::new("pages", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    for _ in 0..25 {
        b.x509(&s.token, Some(60)).await;
    }
    let filter = format!("agent={}", agent.id);

    let mut seen = BTreeSet::new();
    let mut query = format!("{filter}&limit=10");
    let mut pages = 0;
    loop {
        let (rows, cursor, link) = page(&b, &query).await;
        pages += 1;
        for r in &rows {
            assert!(
                seen.insert(r["id"].as_str().unwrap().to_owned()),
                "a row twice"
            );
        }
        match cursor {
            Some(c) => {
                assert_eq!(rows.len(), 10);
                let link = link.expect("a Link header with the cursor");
                assert!(
                    link.contains("rel=\"next\"") && link.contains("cursor="),
                    "{link}"
                );
                query = format!("{filter}&limit=10&cursor={}", urlencoding::encode(&c));
            }
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (25, 3));

    // Limits are clamped; a cursor the broker never gave is a clear error.
    let (rows, _, _) = page(&b, &format!("{filter}&limit=100000")).await;
    assert_eq!(rows.len(), 25);
    let r = b
        .get("/v1/leases?cursor=not-a-cursor", Some(&b.ops.auditor))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error(), "invalid_request");
    // A parameter of the wrong type is named in the error, on every list.
    for path in [
        "/v1/leases?limit=lots",
        "/v1/audit?limit=lots",
        "/v1/fences?limit=lots",
    ] {
        let r = b.get(path, Some(&b.ops.auditor)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(
            r.text
                .contains("the query is not valid: `limit`: invalid digit found in string"),
            "{path}: {}",
            r.text
        );
    }

    // The CLI: one page says more follow; --all lists them all.
    let out = b
        .cli(
            &["leases", "list", "--agent", &agent.id, "--limit", "10"],
            Some(&b.ops.auditor),
        )
        .await;
    assert!(out.status.success());
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 10);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more rows follow"));
    let out = b
        .cli(
            &[
                "leases", "list", "--agent", &agent.id, "--limit", "10", "--all",
            ],
            Some(&b.ops.auditor),
        )
        .await;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 25);
}

#[tokio::test]
async fn agent_lists_page_by_id() {
    let b = TestBroker::start_with(Setup::permissive()).await;
    for i in 0..5 {
        b.register(&TestAgent::new(&format!("paged-{i}"), "ES256"), "platform")
            .await;
    }
    let every = b.get("/v1/agents", Some(&b.ops.auditor)).await.expect(200);
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = ids(&every);
    assert!(all.len() >= 5 && all.is_sorted(), "{all:?}");

    let mut walked = Vec::new();
    let mut query = "limit=2".to_owned();
    loop {
        let r = b
            .http
            .get(b.url(&format!("/v1/agents?{query}")))
            .bearer_auth(&b.ops.auditor)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let next = r
            .headers()
            .get("keygate-next-cursor")
            .map(|v| v.to_str().unwrap().to_owned());
        walked.extend(ids(&r.json().await.unwrap()));
        match next {
            Some(c) => query = format!("limit=2&cursor={}", urlencoding::encode(&c)),
            None => break,
        }
    }
    assert_eq!(walked, all);

    let out = b
        .cli(&["agents", "list", "--limit", "2"], Some(&b.ops.auditor))
        .await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("more rows follow"));
    let out = b
        .cli(
            &["agents", "list", "--limit", "2", "--all"],
            Some(&b.ops.auditor),
        )
        .await;
    let table = String::from_utf8_lossy(&out.stdout);
    for id in &all {
        assert!(table.contains(id.as_str()), "{id} missing from\n{table}");
    }
    let r = b.get("/v1/agents?page=2", Some(&b.ops.auditor)).await;
    assert_eq!(r.status, 400, "{}", r.text);
}
