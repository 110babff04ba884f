//! The web console over plain HTTP, for what a test needs to see without a
//! browser: where a page sends a session, and what a page says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::TestBroker;

/// An operator's console session over plain HTTP (no browser needed to
/// see where the console sends it).
pub struct ConsoleClient {
    http: reqwest::Client,
    cookie: String,
}

impl ConsoleClient {
    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// Posts the sign-in form as the sign-in page set it up: the status,
    /// and the session cookie or the page.
    async fn post_sign_in(b: &TestBroker, token: &str) -> (u16, Result<String, String>) {
        let http = Self::http();
        let page = http.get(b.url("/ui/login")).send().await.unwrap();
        let login = page.headers()["set-cookie"].to_str().unwrap();
        let login = login.split(';').next().unwrap().to_owned();
        let nonce = login.split_once('=').unwrap().1.to_owned();
        let r = http
            .post(b.url("/ui/login"))
            .header("cookie", &login)
            .form(&[("token", token), ("login_csrf", &nonce), ("next", "/ui")])
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let session = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|c| c.to_str().ok())
            .find(|c| c.starts_with("keygate_console="))
            .map(|c| c.split(';').next().unwrap().to_owned());
        match session {
            Some(c) => (status, Ok(c)),
            None => (status, Err(r.text().await.unwrap())),
        }
    }

    pub async fn sign_in(b: &TestBroker, token: &str) -> Self {
        let (status, cookie) = Self::post_sign_in(b, token).await;
        assert_eq!(status, 303, "{cookie:?}");
        Self {
            http: Self::http(),
            cookie: cookie.unwrap(),
        }
    }

    /// A refused sign-in: its status and page.
    pub async fn try_sign_in(b: &TestBroker, token: &str) -> (u16, String) {
        let (status, page) = Self::post_sign_in(b, token).await;
        (status, page.expect_err("signed in"))
    }

    /// GETs a console page with the session's cookie.
    async fn fetch(&self, b: &TestBroker, path: &str) -> reqwest::Response {
        self.http
            .get(b.url(path))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    /// A console page: its status and where it redirects.
    pub async fn get(&self, b: &TestBroker, path: &str) -> (u16, Option<String>) {
        let r = self.fetch(b, path).await;
        let location = r
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        (r.status().as_u16(), location)
    }

    /// A console page's status and body (after no redirect).
    pub async fn page(&self, b: &TestBroker, path: &str) -> (u16, String) {
        let r = self.fetch(b, path).await;
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Posts a console form as its page would (`page`, whose anti-forgery
    /// token goes with it): the status and body.
    pub async fn submit(
        &self,
        b: &TestBroker,
        page: &str,
        action: &str,
        fields: &[(&str, &str)],
    ) -> (u16, String) {
        let (status, html) = self.page(b, page).await;
        assert_eq!(status, 200, "{html}");
        let csrf = html
            .split(r#"name="csrf" value=""#)
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no anti-forgery token on {page}"))
            .to_owned();
        let mut form: Vec<(&str, &str)> = vec![("csrf", &csrf)];
        form.extend_from_slice(fields);
        let r = self
            .http
            .post(b.url(action))
            .header("cookie", &self.cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}
