//! `GET /openapi.json` describes exactly what the broker serves: every
//! documented operation is routed (probed on the running binary, with a
//! positive control for an unrouted path and a wrong method), and the
//! agent-facing answers carry the fields their schemas require.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Setup, TestAgent, TestBroker};
use serde_json::Value;

/// Whether the router answered "no such route": the fallback's 404 (its
/// message is `no such endpoint`) or a 405 for a method it does not serve.
async fn unrouted(b: &TestBroker, method: &str, path: &str) -> bool {
    let r = b
        .http
        .request(method.parse().unwrap(), b.url(path))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    status == 405 || (status == 404 && body["message"] == "no such endpoint")
}

#[tokio::test]
async fn every_documented_operation_is_served_and_nothing_else_answers() {
    let b = TestBroker::start().await;
    let r = b.http.get(b.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let doc: Value = r.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(
        paths.contains_key("/openapi.json"),
        "the document describes itself"
    );
    let mut probed = 0;
    for (template, item) in paths {
        // Path parameters get a value no resource has.
        let path: String = template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "probe-x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            assert!(
                !unrouted(&b, &method.to_uppercase(), &path).await,
                "{method} {template} is documented but not served"
            );
            probed += 1;
        }
    }
    assert!(probed >= 52, "{probed} operations");
    // The probe can tell: an unrouted path and an unserved method say so.
    assert!(unrouted(&b, "GET", "/v1/not-a-route").await);
    assert!(unrouted(&b, "DELETE", "/v1/tasks/complete").await);
}

/// The names a schema declares, and those it requires.
fn fields(doc: &Value, schema: &str) -> (Vec<String>, Vec<String>) {
    let s = &doc["components"]["schemas"][schema];
    let props = s["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {schema}"))
        .keys()
        .cloned()
        .collect();
    let required = s["required"]
        .as_array()
        .map(|r| r.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    (props, required)
}

fn agrees(doc: &Value, schema: &str, answer: &Value) {
    let (props, required) = fields(doc, schema);
    let obj = answer.as_object().unwrap();
    for k in obj.keys() {
        assert!(
            props.contains(k),
            "{schema} does not declare `{k}`: {answer}"
        );
    }
    for k in &required {
        assert!(obj.contains_key(k), "{schema} requires `{k}`: {answer}");
    }
}

#[tokio::test]
async fn agent_answers_agree_with_their_schemas() {
    use reqwest::Method;
    let b = TestBroker::start_with(Setup::permissive()).await;
    let doc = b.get("/openapi.json", None).await.expect(200);
    let agent = TestAgent::new("schema-agent", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(600)).await;
    let whoami = b.get("/v1/session", Some(&s.token)).await.expect(200);
    agrees(&doc, "WhoAmI", &whoami);
    agrees(&doc, "Task", &whoami["task"]);
    let cred = b.x509(&s.token, Some(60)).await;
    agrees(&doc, "IssuedBody", &cred);
    let lease = cred["lease_id"].as_str().unwrap();
    let body = serde_json::json!({ "increment": 30 });
    let refusal = b
        .post(
            &format!("/v1/credentials/{lease}/renew"),
            Some(&s.token),
            &body,
        )
        .await
        .expect(400);
    agrees(&doc, "ErrorBody", &refusal);
    let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap();
    assert!(codes.contains(&refusal["error"]));
    let path = format!("/v1/credentials/{lease}");
    let released = b
        .call(Method::DELETE, &path, Some(&s.token), None)
        .await
        .expect(200);
    agrees(&doc, "ReleasedLease", &released);
    let done = b
        .call(Method::POST, "/v1/tasks/complete", Some(&s.token), None)
        .await
        .expect(200);
    agrees(&doc, "CompletedTask", &done);
    let task = whoami["task"]["id"].as_str().unwrap();
    for l in b.leases(&format!("task={task}")).await {
        agrees(&doc, "Lease", &l);
    }
}
