//! A minimal Microsoft Graph stand-in over HTTPS: `addPassword`,
//! `removePassword` and reading an application's `passwordCredentials`,
//! with Graph's documented request and response shapes (`secretText` only in
//! the `addPassword` answer, `keyId`, `endDateTime`, `hint`, error bodies
//! `{"error": {"code", "message"}}`). Every call must carry a bearer token
//! that verifies (RS256) against the token server's JWKS, with Graph's
//! audience and the token server's issuer; others get 401.
//!
//! Tests drive it directly: add apps and passwords behind Keygate's back,
//! ask whether a secret still works, hold an `addPassword` answer (to crash
//! the broker mid-issue), or simulate an outage (503 to everything).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One password credential of an application, as the fake keeps it.
#[derive(Debug, Clone)]
pub struct Password {
    pub key_id: String,
    pub display_name: Option<String>,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
    pub hint: String,
    pub secret: String,
}

/// One call the fake answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// The token verification Graph does.
struct Verifier {
    keys: JwkSet,
    validation: Validation,
}

struct FakeState {
    apps: Mutex<BTreeMap<String, Vec<Password>>>,
    calls: Mutex<Vec<Call>>,
    verifier: Verifier,
    outage: AtomicBool,
    /// Calls to throttle first (429, `Retry-After: 1`, `TooManyRequests`).
    throttled: std::sync::atomic::AtomicUsize,
    /// When set, `addPassword` adds the password, then waits for this
    /// before answering.
    hold_add: Mutex<Option<Arc<Notify>>>,
}

/// A running fake; stops when dropped.
pub struct GraphFake {
    /// The base URL Keygate is configured with (`…/v1.0`).
    pub url: String,
    /// Its origin: Graph's token audience here.
    pub resource: String,
    state: Arc<FakeState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for GraphFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({ "error": { "code": code, "message": message,
        "innerError": { "date": rfc3339(OffsetDateTime::now_utc()), "request-id": uuid::Uuid::new_v4().to_string() } } });
    (status, axum::Json(body)).into_response()
}

impl Password {
    /// The documented JSON shape; the secret only where Graph returns it.
    fn to_json(&self, with_secret: bool) -> Value {
        json!({
            "customKeyIdentifier": null,
            "displayName": self.display_name,
            "endDateTime": rfc3339(self.end),
            "hint": self.hint,
            "keyId": self.key_id,
            "secretText": if with_secret { Value::from(self.secret.clone()) } else { Value::Null },
            "startDateTime": rfc3339(self.start),
        })
    }
}

/// A fresh Entra-looking client secret: `xyz8Q~` and 34 more characters.
fn new_secret() -> String {
    let a = uuid::Uuid::new_v4().simple().to_string();
    let b = uuid::Uuid::new_v4().simple().to_string();
    format!("{}8Q~{}{}", &a[..3], &a[3..], &b[..5])
}

impl GraphFake {
    /// Serves on 127.0.0.1 with `tls`, trusting tokens signed by the keys
    /// at `jwks_url` and issued by `issuer`.
    pub async fn start(
        tls: Arc<tokio_rustls::rustls::ServerConfig>,
        http: &reqwest::Client,
        jwks_url: &str,
        issuer: &str,
    ) -> Self {
        let keys: JwkSet = http
            .get(jwks_url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("fetching the token server's jwks: {e}"))
            .json()
            .await
            .unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let resource = format!("https://{addr}");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[resource.as_str()]);
        validation.set_issuer(&[issuer]);
        validation.leeway = 5;
        let state = Arc::new(FakeState {
            apps: Mutex::new(BTreeMap::new()),
            calls: Mutex::new(Vec::new()),
            verifier: Verifier { keys, validation },
            outage: AtomicBool::new(false),
            throttled: std::sync::atomic::AtomicUsize::new(0),
            hold_add: Mutex::new(None),
        });
        let app = Router::new()
            .route("/v1.0/applications/{id}", get(get_application))
            .route("/v1.0/applications/{id}/{action}", post(application_action))
            .with_state(Arc::clone(&state));
        let server = super::https::serve(tcp, app, tls);
        Self {
            url: format!("{resource}/v1.0"),
            resource,
            state,
            server,
        }
    }

    /// Registers an application (by object id) with no passwords.
    pub fn add_app(&self, object_id: &str) {
        self.state
            .apps
            .lock()
            .unwrap()
            .entry(object_id.to_owned())
            .or_default();
    }

    /// Adds a password behind Keygate's back (a CI secret, a leftover);
    /// returns its key id.
    pub fn add_password(&self, app: &str, display_name: &str, end: OffsetDateTime) -> String {
        let p = Password {
            key_id: uuid::Uuid::new_v4().to_string(),
            display_name: Some(display_name.to_owned()),
            start: OffsetDateTime::now_utc(),
            end,
            hint: "abc".into(),
            secret: new_secret(),
        };
        let key_id = p.key_id.clone();
        self.state
            .apps
            .lock()
            .unwrap()
            .get_mut(app)
            .unwrap_or_else(|| panic!("no app {app} in the graph fake"))
            .push(p);
        key_id
    }

    /// The app's passwords now.
    pub fn passwords(&self, app: &str) -> Vec<Password> {
        self.state
            .apps
            .lock()
            .unwrap()
            .get(app)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `secret` is a password of `app` that Entra would accept now.
    pub fn secret_works(&self, app: &str, secret: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        self.passwords(app)
            .iter()
            .any(|p| p.secret == secret && p.start <= now && now < p.end)
    }

    /// Whether `token` is a token the token server signed for `audience`
    /// that has not expired (what a resource server would check).
    pub fn token_valid_for(&self, token: &str, audience: &str) -> bool {
        let v = &self.state.verifier;
        let mut validation = v.validation.clone();
        validation.set_audience(&[audience]);
        verify(&v.keys, &validation, token).is_ok()
    }

    /// Every call answered so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Answers 503 to everything while on.
    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
    }

    /// Throttles the next `n` calls as Graph does: HTTP 429 with
    /// `Retry-After` and the error code `TooManyRequests`.
    pub fn throttle_next(&self, n: usize) {
        self.state.throttled.store(n, Ordering::SeqCst);
    }

    /// Makes the next `addPassword` add its password and then wait, without
    /// answering, until the returned handle is notified (or forever).
    pub fn hold_next_add(&self) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        *self.state.hold_add.lock().unwrap() = Some(Arc::clone(&n));
        n
    }
}

fn verify(keys: &JwkSet, validation: &Validation, token: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("the token names no key")?;
    let jwk = keys
        .find(&kid)
        .ok_or("the token's key is not in the jwks")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    jsonwebtoken::decode::<Value>(token, &key, validation)
        .map(|d| d.claims)
        .map_err(|e| e.to_string())
}

impl FakeState {
    fn record(&self, method: &str, path: String, status: StatusCode) {
        self.calls.lock().unwrap().push(Call {
            method: method.into(),
            path,
            status: status.as_u16(),
        });
    }

    /// Outage and bearer checks every call goes through.
    fn gate(&self, headers: &HeaderMap) -> Option<Response> {
        if self
            .throttled
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let mut r = graph_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Too many requests are being made. Please try again later.",
            );
            r.headers_mut().insert("retry-after", "1".parse().unwrap());
            return Some(r);
        }
        if self.outage.load(Ordering::SeqCst) {
            return Some(graph_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "serviceNotAvailable",
                "The service is temporarily unavailable. Please retry later.",
            ));
        }
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(token) = bearer else {
            return Some(graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "Access token is empty.",
            ));
        };
        let v = &self.verifier;
        match verify(&v.keys, &v.validation, token) {
            Ok(_) => None,
            Err(why) => Some(graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                &format!("Access token validation failure: {why}"),
            )),
        }
    }
}

fn not_found(id: &str) -> Response {
    graph_error(
        StatusCode::NOT_FOUND,
        "Request_ResourceNotFound",
        &format!(
            "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
        ),
    )
}

async fn get_application(
    State(s): State<Arc<FakeState>>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let resp = s.gate(&headers).unwrap_or_else(|| {
        let apps = s.apps.lock().unwrap();
        match apps.get(&id) {
            None => not_found(&id),
            Some(passwords) => {
                let creds: Vec<Value> = passwords.iter().map(|p| p.to_json(false)).collect();
                let body = if q.get("$select").map(String::as_str) == Some("passwordCredentials") {
                    json!({ "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#applications(passwordCredentials)/$entity", "passwordCredentials": creds })
                } else {
                    json!({ "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#applications/$entity", "id": id, "passwordCredentials": creds })
                };
                (StatusCode::OK, axum::Json(body)).into_response()
            }
        }
    });
    s.record("GET", format!("/applications/{id}"), resp.status());
    resp
}

async fn application_action(
    State(s): State<Arc<FakeState>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let resp = match s.gate(&headers) {
        Some(r) => r,
        None => match action.as_str() {
            "addPassword" => add_password(&s, &id, &body).await,
            "removePassword" => remove_password(&s, &id, &body),
            _ => graph_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("Resource not found for the segment '{action}'."),
            ),
        },
    };
    s.record(
        "POST",
        format!("/applications/{id}/{action}"),
        resp.status(),
    );
    resp
}

async fn add_password(s: &FakeState, id: &str, body: &str) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(body) else {
        return graph_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Unable to read JSON request payload.",
        );
    };
    let pc = &req["passwordCredential"];
    let now = OffsetDateTime::now_utc();
    let end = match pc["endDateTime"].as_str() {
        None => now + time::Duration::days(730),
        Some(t) => match OffsetDateTime::parse(t, &Rfc3339) {
            Ok(t) if t > now => t,
            _ => {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidKeyEndDate",
                    "Key credential end date is invalid.",
                );
            }
        },
    };
    let secret = new_secret();
    let p = Password {
        key_id: uuid::Uuid::new_v4().to_string(),
        display_name: pc["displayName"].as_str().map(str::to_owned),
        start: now,
        end,
        hint: secret[..3].to_owned(),
        secret,
    };
    let answer = p.to_json(true);
    {
        let mut apps = s.apps.lock().unwrap();
        let Some(passwords) = apps.get_mut(id) else {
            return not_found(id);
        };
        passwords.push(p);
    }
    let hold = s.hold_add.lock().unwrap().take();
    if let Some(n) = hold {
        n.notified().await;
    }
    let mut answer = answer;
    answer["@odata.context"] =
        "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.passwordCredential".into();
    (StatusCode::OK, axum::Json(answer)).into_response()
}

fn remove_password(s: &FakeState, id: &str, body: &str) -> Response {
    let key_id = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["keyId"].as_str().map(str::to_owned));
    let Some(key_id) = key_id else {
        return graph_error(StatusCode::BAD_REQUEST, "BadRequest", "keyId is required.");
    };
    let mut apps = s.apps.lock().unwrap();
    let Some(passwords) = apps.get_mut(id) else {
        return not_found(id);
    };
    let before = passwords.len();
    passwords.retain(|p| p.key_id != key_id);
    if passwords.len() == before {
        return graph_error(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            &format!("No password credential found with keyId '{key_id}'."),
        );
    }
    StatusCode::NO_CONTENT.into_response()
}
