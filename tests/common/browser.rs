//! Headless Chromium for the console's browser tests, driven through
//! Debian's ChromeDriver (both installed by `scripts/install-peers`). A
//! missing driver or browser fails the test: it is never skipped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::error::{CmdError, ErrorStatus};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

fn is_stale(e: &CmdError) -> bool {
    // ChromeDriver says so in two ways: the standard stale element error,
    // or, when the page is replaced while it reads the node, an "unknown
    // error" from DevTools that the node left the document.
    matches!(e, CmdError::Standard(w)
        if w.error == ErrorStatus::StaleElementReference
            || (w.error == ErrorStatus::UnknownError
                && w.message.contains("does not belong to the document")))
}

/// A browser session; dropping it ends ChromeDriver and its Chromium.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chromium() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Chromium is not installed: run scripts/install-peers (apt-get install chromium chromium-driver)")
}

impl Browser {
    pub async fn start() -> Self {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: run scripts/install-peers (apt-get install chromium-driver)");
        let profile =
            std::env::temp_dir().join(format!("keygate-chromium-{}", uuid::Uuid::new_v4()));
        // As this machine's probe found: without the background-networking
        // flags Chromium keeps dialling out, and the closed network refuses it.
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }
        });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let attempt = ClientBuilder::rustls()
                .unwrap()
                .capabilities(caps.as_object().unwrap().clone())
                .connect(&url)
                .await;
            match attempt {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("ChromeDriver did not start a headless Chromium: {e}"),
            }
        };
        Self {
            client,
            driver,
            profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    /// The text of the first element matching `css`. A page that refreshes
    /// itself (the revocation progress page does) can be between two
    /// documents when it is asked: the element is missing from the one still
    /// loading, or replaced between finding it and reading it. Either is
    /// asked again (for up to two seconds, well past a reload), never taken
    /// as an answer; an element still missing after that fails the test.
    pub async fn text(&self, css: &str) -> String {
        let mut missing = None;
        for _ in 0..40 {
            match self.client.find(Locator::Css(css)).await {
                Ok(e) => match e.text().await {
                    Ok(t) => return t,
                    Err(e) if is_stale(&e) => {}
                    Err(e) => panic!("reading `{css}`: {e}"),
                },
                Err(e) if is_stale(&e) => {}
                Err(CmdError::Standard(w)) if w.error == ErrorStatus::NoSuchElement => {
                    missing = Some(w)
                }
                Err(e) => panic!("finding `{css}` on {}: {e}", self.path().await),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match missing {
            Some(e) => panic!(
                "no `{css}` on {}: {e}\n{}",
                self.path().await,
                self.source().await
            ),
            None => panic!("`{css}` kept being replaced while it was read"),
        }
    }

    /// Whether anything matches `css`.
    pub async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .is_empty()
    }

    pub async fn fill(&self, css: &str, value: &str) {
        let e = self.client.find(Locator::Css(css)).await.unwrap();
        e.clear().await.unwrap();
        e.send_keys(value).await.unwrap();
    }

    pub async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no `{css}` to click: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// Clicks what submits a form or follows a link, and waits until the
    /// next page has replaced this one (a click does not wait for it).
    pub async fn submit(&self, css: &str) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        self.click(css).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while old.tag_name().await.is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "clicking `{css}` did not lead to another page"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.client
            .wait()
            .for_element(Locator::Css("body"))
            .await
            .unwrap();
    }

    pub async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    pub async fn path(&self) -> String {
        let u = self.client.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }

    /// Signs in to the console at `base` with an operator token.
    pub async fn sign_in(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui/login")).await;
        self.fill("#token", token).await;
        self.submit("form.login button").await;
    }

    /// A screenshot to `KEYGATE_SCREENSHOTS/<name>.png`, when that is set
    /// (the README's pictures are taken this way).
    pub async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("KEYGATE_SCREENSHOTS") {
            let png = self.client.screenshot().await.unwrap();
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = client.close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
