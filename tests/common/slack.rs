//! A small stand-in for Slack's hosted Web API (no Slack can run here):
//! `chat.postMessage` and `chat.update` with bearer-token checks and Slack's
//! `{"ok": …}` answers, `response_url` endpoints, and a generic webhook
//! receiver. It records every call so tests can assert what Keygate sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub headers: HeaderMap,
    pub raw: Vec<u8>,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    /// `chat.postMessage` calls to fail with HTTP 500 before succeeding.
    fail_posts: AtomicUsize,
    bot_token: String,
}

pub struct SlackFake {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

async fn web_api(
    State(s): State<Arc<Inner>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> (StatusCode, Json<Value>) {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    s.calls.lock().unwrap().push(Call {
        path: format!("/api/{method}"),
        headers: headers.clone(),
        raw: raw.to_vec(),
        body: body.clone(),
    });
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != format!("Bearer {}", s.bot_token) {
        return (
            StatusCode::OK,
            Json(json!({ "ok": false, "error": "invalid_auth" })),
        );
    }
    match method.as_str() {
        "chat.postMessage" => {
            if s.fail_posts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({ "ok": false })),
                );
            }
            if body["channel"].as_str().unwrap_or_default().is_empty() {
                return (
                    StatusCode::OK,
                    Json(json!({ "ok": false, "error": "channel_not_found" })),
                );
            }
            let n = s.calls.lock().unwrap().len();
            (
                StatusCode::OK,
                Json(json!({
                    "ok": true, "channel": "C0KEYGATE",
                    "ts": format!("1700000000.{n:06}"), "message": { "text": body["text"] },
                })),
            )
        }
        "chat.update" => {
            if body["ts"].as_str().is_none() {
                return (
                    StatusCode::OK,
                    Json(json!({ "ok": false, "error": "message_not_found" })),
                );
            }
            (
                StatusCode::OK,
                Json(json!({ "ok": true, "channel": body["channel"], "ts": body["ts"] })),
            )
        }
        _ => (
            StatusCode::OK,
            Json(json!({ "ok": false, "error": "unknown_method" })),
        ),
    }
}

async fn record(
    State(s): State<Arc<Inner>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    s.calls.lock().unwrap().push(Call {
        path: format!("/{rest}"),
        headers,
        raw: raw.to_vec(),
        body,
    });
    StatusCode::OK
}

impl SlackFake {
    pub async fn start(bot_token: &str) -> Self {
        let inner = Arc::new(Inner {
            bot_token: bot_token.to_owned(),
            ..Inner::default()
        });
        let app = axum::Router::new()
            .route("/api/{method}", post(web_api))
            .route("/{*rest}", post(record))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, inner }
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// A `response_url` for one click.
    pub fn response_url(&self, n: u32) -> String {
        format!("http://{}/actions/{n}", self.addr)
    }

    pub fn webhook_url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Makes the next `n` `chat.postMessage` calls fail with HTTP 500.
    pub fn fail_next_posts(&self, n: usize) {
        self.inner.fail_posts.store(n, Ordering::SeqCst);
    }

    pub fn calls(&self, path: &str) -> Vec<Call> {
        self.inner
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }
}

/// A Slack `block_actions` click, form-encoded as Slack sends it.
pub fn click_body(user: &str, action: &str, approval: &str, response_url: &str) -> String {
    let payload = json!({
        "type": "block_actions",
        "user": { "id": user, "username": user.to_lowercase(), "team_id": "T0001" },
        "api_app_id": "A0001",
        "container": { "type": "message", "message_ts": "1700000000.000100" },
        "channel": { "id": "C0KEYGATE", "name": "payments-approvals" },
        "response_url": response_url,
        "actions": [{
            "type": "button", "block_id": "keygate", "action_id": action,
            "value": approval, "action_ts": "1700000001.000200",
        }],
    });
    format!(
        "payload={}",
        urlencoding::encode(&serde_json::to_string(&payload).unwrap())
    )
}

pub fn slack_signature(secret: &str, ts: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts an interaction as Slack would: signed with `secret` at `ts`.
pub async fn post_click(
    b: &super::TestBroker,
    body: &str,
    secret: Option<&str>,
    ts: i64,
) -> super::Resp {
    let mut rb = b
        .http
        .post(b.url("/v1/hooks/slack/interactions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .body(body.to_owned());
    if let Some(s) = secret {
        rb = rb.header("x-slack-signature", slack_signature(s, ts, body));
    }
    let resp = rb.send().await.unwrap();
    super::Resp {
        status: resp.status(),
        text: resp.text().await.unwrap(),
    }
}
