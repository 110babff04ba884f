//! A small stand-in for Slack's hosted Web API (no Slack can run here):
//! `chat.postMessage` and `chat.update` with bearer-token checks and Slack's
//! `{"ok": …}` answers, `response_url` endpoints, and a generic webhook
//! receiver. It records every call so tests can assert what Keygate sent.
//!
//! Faithful where Keygate's behaviour depends on it (Slack's documented
//! answers): Block Kit limits (at most 50 blocks, section text 3000
//! characters, button text 75, button value 2000, `action_id` 255, a
//! top-level `text` or blocks) answered with `ok: false, invalid_blocks`;
//! rate limiting as HTTP 429 with `Retry-After`; a `response_url` that
//! takes at most five answers, then 404 `expired_url`.
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
    /// When it arrived.
    pub at: std::time::Instant,
    pub headers: HeaderMap,
    pub raw: Vec<u8>,
    pub body: Value,
}

#[derive(Default)]
struct Inner {
    calls: Mutex<Vec<Call>>,
    /// `chat.postMessage` calls to fail with HTTP 500 before succeeding.
    fail_posts: AtomicUsize,
    /// Web API calls to answer 429 (`Retry-After: retry_after`) first.
    rate_limited: AtomicUsize,
    retry_after: AtomicUsize,
    /// Webhook deliveries to `/hook` to answer with HTTP 503 first.
    fail_hooks: AtomicUsize,
    /// Answers given per `response_url`.
    answers: Mutex<std::collections::HashMap<String, usize>>,
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
) -> (StatusCode, HeaderMap, Json<Value>) {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    s.calls.lock().unwrap().push(Call {
        at: std::time::Instant::now(),
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
            HeaderMap::new(),
            Json(json!({ "ok": false, "error": "invalid_auth" })),
        );
    }
    if s.rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            s.retry_after
                .load(Ordering::SeqCst)
                .to_string()
                .parse()
                .unwrap(),
        );
        return (
            StatusCode::TOO_MANY_REQUESTS,
            h,
            Json(json!({ "ok": false, "error": "ratelimited" })),
        );
    }
    if let Some(why) = block_kit_problem(&body) {
        return (
            StatusCode::OK,
            HeaderMap::new(),
            Json(json!({ "ok": false, "error": "invalid_blocks", "errors": [why] })),
        );
    }
    let (status, body) = answer(&s, &method, &body);
    (status, HeaderMap::new(), body)
}

/// What Slack's Block Kit validation would refuse in a message, if anything.
fn block_kit_problem(body: &Value) -> Option<String> {
    let blocks = body["blocks"].as_array();
    if body["text"].as_str().is_none_or(str::is_empty) && blocks.is_none_or(Vec::is_empty) {
        return Some("no_text: a message needs `text` or blocks".into());
    }
    let blocks = blocks?;
    if blocks.len() > 50 {
        return Some(format!("{} blocks, at most 50", blocks.len()));
    }
    for b in blocks {
        if b["type"] == "section" {
            let n = b["text"]["text"].as_str().map_or(0, |t| t.chars().count());
            if n > 3000 {
                return Some(format!("section text of {n} characters, at most 3000"));
            }
        }
        for e in b["elements"].as_array().into_iter().flatten() {
            if e["type"] != "button" {
                continue;
            }
            let len = |v: &Value| v.as_str().map_or(0, |t| t.chars().count());
            if len(&e["text"]["text"]) > 75 {
                return Some("button text over 75 characters".into());
            }
            if len(&e["value"]) > 2000 {
                return Some("button value over 2000 characters".into());
            }
            if len(&e["action_id"]) > 255 {
                return Some("action_id over 255 characters".into());
            }
        }
    }
    None
}

fn answer(s: &Inner, method: &str, body: &Value) -> (StatusCode, Json<Value>) {
    match method {
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
) -> (StatusCode, &'static str) {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let path = format!("/{rest}");
    s.calls.lock().unwrap().push(Call {
        at: std::time::Instant::now(),
        path: path.clone(),
        headers,
        raw: raw.to_vec(),
        body,
    });
    if path == "/hook"
        && s.fail_hooks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "down");
    }
    // A `response_url` takes five answers, then is gone.
    if path.starts_with("/actions/") {
        let mut answers = s.answers.lock().unwrap();
        let n = answers.entry(path).or_default();
        *n += 1;
        if *n > 5 {
            return (StatusCode::NOT_FOUND, "expired_url");
        }
    }
    (StatusCode::OK, "ok")
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

    /// Answers the next `n` webhook deliveries with HTTP 503.
    pub fn fail_next_hooks(&self, n: usize) {
        self.inner.fail_hooks.store(n, Ordering::SeqCst);
    }

    /// Answers the next `n` Web API calls with 429 and `Retry-After: secs`.
    pub fn rate_limit_next(&self, n: usize, secs: usize) {
        self.inner.retry_after.store(secs, Ordering::SeqCst);
        self.inner.rate_limited.store(n, Ordering::SeqCst);
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
