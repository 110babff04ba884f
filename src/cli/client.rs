//! A small HTTP client for the admin API.

use anyhow::{Context, bail};
use reqwest::{Method, RequestBuilder, Response};

use super::Remote;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(remote: &Remote) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(90))
                .build()?,
            base: remote.server.trim_end_matches('/').to_owned(),
            token: std::env::var("KEYGATE_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Whether `e` says the broker did not answer at all (refused, or a
    /// kept-alive connection found closed), as while it restarts, rather
    /// than answering no.
    pub fn no_answer(e: &reqwest::Error) -> bool {
        e.is_connect() || e.is_request()
    }

    /// Sends and turns an error answer into a readable error.
    pub async fn send(&self, rb: RequestBuilder) -> anyhow::Result<Response> {
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach the broker at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let code = body["error"].as_str().unwrap_or("error");
        let msg = body["message"].as_str().unwrap_or("");
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            " (set KEYGATE_TOKEN to an operator token)"
        } else {
            ""
        };
        bail!("{status}: {code}: {msg}{hint}")
    }

    pub async fn json(&self, rb: RequestBuilder) -> anyhow::Result<serde_json::Value> {
        Ok(self.send(rb).await?.json().await?)
    }

    /// A list endpoint: one page, or with `--all` every page (following
    /// `Keygate-Next-Cursor`). A page that is not the end is said on
    /// stderr, so nobody takes it for the whole list.
    pub async fn list(
        &self,
        path: &str,
        mut query: Vec<(&'static str, String)>,
        page: &super::Page,
    ) -> anyhow::Result<serde_json::Value> {
        query.push(("limit", page.limit.clamp(1, 1000).to_string()));
        let mut all = Vec::new();
        loop {
            let resp = self
                .send(self.request(reqwest::Method::GET, path).query(&query))
                .await?;
            let next = resp
                .headers()
                .get("keygate-next-cursor")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let rows: Vec<serde_json::Value> = resp.json().await?;
            all.extend(rows);
            match next {
                Some(cursor) if page.all => {
                    query.retain(|(k, _)| *k != "cursor");
                    query.push(("cursor", cursor));
                }
                Some(cursor) => {
                    eprintln!(
                        "more rows follow: --all to list every page, or `cursor={cursor}` for the next"
                    );
                    break;
                }
                None => break,
            }
        }
        Ok(serde_json::Value::Array(all))
    }
}
