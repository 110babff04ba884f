//! The web console in a real browser (headless Chromium through
//! ChromeDriver) against the real `keygate` binary: an approver signs in
//! and approves, and the agent redeems; a justification with `<script>`
//! stays text; an approver has no kill switch; SecOps pulls the kill
//! switch on an agent and watches every lease revoked; an auditor filters
//! the registry and verifies the audit chain; a form posted from another
//! site, or without its token, is refused, and a signed-out session is over.

use std::time::Duration;

use fantoccini::Locator;
use serde_json::{Value, json};

use crate::common;
use common::browser::Browser;
use common::{Setup, TestAgent, TestBroker, eventually};

const PERMIT_PAYMENTS: &str = r#"
@id("test-permit-payments")
permit (principal, action == Keygate::Action::"request_credential", resource == Keygate::Scope::"payments-ca");
"#;

async fn start() -> TestBroker {
    let mut setup = Setup::permissive();
    setup
        .policies
        .push(("payments.cedar".into(), PERMIT_PAYMENTS.into()));
    TestBroker::start_with(setup).await
}

fn base(b: &TestBroker) -> String {
    format!("http://{}", b.addr)
}

/// Opens a task for a new agent of `team`: the agent and its session.
async fn agent_with_task(b: &TestBroker, name: &str, team: &str) -> (TestAgent, String) {
    let agent = TestAgent::new(name, "ES256");
    b.register(&agent, team).await;
    let s = b.token(&agent).await;
    (agent, s.token)
}

#[tokio::test]
async fn an_approver_approves_in_the_console_and_the_agent_redeems_while_script_stays_text() {
    let b = start().await;
    let (agent, token) = agent_with_task(&b, "payer", "platform").await;
    let hostile = "<script>document.title='pwned'</script> pay invoice 42";
    let pending = b
        .post(
            "/v1/credentials",
            Some(&token),
            &json!({ "scope": "payments-ca", "ttl": 300, "justification": hostile }),
        )
        .await
        .expect(202);
    let id = pending["approval_id"].as_str().unwrap().to_owned();

    let br = Browser::start().await;
    br.sign_in(&base(&b), &b.ops.approver).await;
    assert_eq!(br.path().await, "/ui");
    assert!(br.text("header").await.contains("test-approver"));
    // An approver has no kill switch, and cannot open it by its address.
    assert!(
        !br.has("nav a.danger").await,
        "an approver sees the kill switch"
    );
    // Nor the registry, which the API keeps from approvers too.
    assert!(!br.has("nav a[href='/ui/agents']").await);
    br.goto(&format!("{}/ui/agents", base(&b))).await;
    assert!(br.text("p.error").await.contains("roles do not allow"));
    br.goto(&format!("{}/ui/kill", base(&b))).await;
    assert!(
        br.text("p.error").await.contains("roles do not allow"),
        "{}",
        br.source().await
    );

    br.goto(&format!("{}/ui/approvals", base(&b))).await;
    br.screenshot("approvals").await;
    br.submit(&format!("a[href='/ui/approvals/{id}']")).await;
    // The justification is shown as the agent wrote it, and nothing ran.
    let shown = br.text("dd.text").await;
    assert!(shown.contains("<script>"), "{shown}");
    assert!(
        !br.has("main script").await,
        "the justification became markup"
    );
    assert_ne!(br.client.title().await.unwrap(), "pwned");
    assert!(br.source().await.contains("&lt;script&gt;"));
    br.screenshot("approval").await;

    br.fill("#reason", "invoice 42 checked").await;
    br.submit("button[value='approve']").await;
    assert_eq!(br.text("dd span.state").await, "approved");
    let issued = b
        .post(
            &format!("/v1/approvals/{id}/redeem"),
            Some(&token),
            &json!({}),
        )
        .await
        .expect(201);
    assert!(issued["lease_id"].is_string(), "{issued}");
    // Decided through the console, by the signed-in operator, on the record.
    let decided = b.audit("action=approval.decision").await;
    let ev = decided.last().unwrap();
    assert_eq!(ev["actor"], "operator:test-approver");
    assert_eq!(ev["details"]["channel"], "console");
    assert_eq!(ev["agent"], agent.id.as_str());
    br.close().await;
}

#[tokio::test]
async fn secops_pulls_the_kill_switch_on_an_agent_and_watches_every_lease_revoked() {
    let b = start().await;
    let (agent, token) = agent_with_task(&b, "runaway", "platform").await;
    let (_, bystander) = agent_with_task(&b, "bystander", "platform").await;
    for t in [&token, &token, &bystander] {
        b.post(
            "/v1/credentials",
            Some(t),
            &json!({ "scope": "x509-svid", "ttl": 600 }),
        )
        .await
        .expect(201);
    }
    let br = Browser::start().await;
    br.sign_in(&base(&b), &b.ops.secops).await;
    br.submit("nav a.danger").await;
    assert_eq!(br.path().await, "/ui/kill");
    br.click("input[value='agent']").await;
    br.fill("#target", &agent.id).await;
    br.fill("#reason", "runaway loop").await;
    br.submit("form.kill button").await;
    // The confirmation names what will be revoked.
    let warning = br.text("p.warn").await;
    assert!(
        warning.contains("2 live credentials") && warning.contains("1 agent"),
        "{warning}"
    );
    br.screenshot("kill-switch-confirm").await;
    br.submit("form.kill button.danger").await;
    assert!(br.path().await.starts_with("/ui/revocations/rv_"));
    // The page refreshes itself until every lease is confirmed.
    eventually("the progress page says all revoked", || async {
        br.text("p.status")
            .await
            .contains("All revoked")
            .then_some(())
    })
    .await;
    assert!(br.text("p.status").await.contains("2 of 2"));
    br.screenshot("kill-switch-progress").await;
    let leases = b.leases(&format!("agent={}", agent.id)).await;
    assert!(leases.iter().all(|l| l["state"] == "revoked"), "{leases:?}");
    assert_eq!(b.get("/v1/session", Some(&token)).await.status, 401);
    // The bystander kept its credential and its session.
    assert_eq!(b.get("/v1/session", Some(&bystander)).await.status, 200);
    let ev = b.audit("action=revocation.emergency").await;
    assert_eq!(ev.last().unwrap()["actor"], "operator:test-secops");
    br.close().await;
}

#[tokio::test]
async fn an_auditor_filters_the_registry_and_verifies_the_audit_chain() {
    let b = start().await;
    let (research, _) = agent_with_task(&b, "researcher", "research").await;
    agent_with_task(&b, "builder", "platform").await;
    let br = Browser::start().await;
    br.sign_in(&base(&b), &b.ops.auditor).await;
    br.goto(&format!("{}/ui/agents", base(&b))).await;
    assert!(br.text("p.count").await.starts_with("2 of 2"));
    // The environments offered are the registry's own.
    for (env, offered) in [
        ("dev", true),
        ("test", true),
        ("prod", true),
        ("staging", false),
    ] {
        let css = format!("#environment option[value='{env}']");
        assert_eq!(br.has(&css).await, offered, "{env}");
    }
    br.client
        .find(Locator::Css("#team"))
        .await
        .unwrap()
        .select_by_value("research")
        .await
        .unwrap();
    br.submit("form.filters button").await;
    assert_eq!(
        br.path().await,
        "/ui/agents?team=research&status=&tier=&environment=&issue="
    );
    assert!(br.text("p.count").await.starts_with("1 of 2"));
    assert_eq!(br.text("tbody td a").await, research.id);
    br.screenshot("agents").await;
    br.submit("tbody td a").await;
    assert!(br.text("main").await.contains("Permitted scopes"));
    // An auditor reads; it cannot change an agent's state.
    assert!(!br.has("form.actions").await);

    br.goto(&format!("{}/ui/audit/verify", base(&b))).await;
    assert!(
        br.text("p.ok").await.starts_with("Chain intact"),
        "{}",
        br.source().await
    );
    br.goto(&format!("{}/ui/audit?action=agent.registered", base(&b)))
        .await;
    assert_eq!(
        br.client
            .find_all(Locator::Css("tbody tr"))
            .await
            .unwrap()
            .len(),
        2
    );
    br.screenshot("audit").await;
    br.close().await;
}

/// A page on another origin that posts the kill switch form to the console
/// as soon as it loads.
async fn hostile_site(target: &str) -> String {
    let page = format!(
        r#"<!doctype html><html><body>
<form id="f" method="post" action="{target}/ui/kill/confirm">
<input name="by" value="all"><input name="reason" value="forged"><input name="csrf" value="guess">
</form><script>document.getElementById('f').submit();</script></body></html>"#
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/")
}

#[tokio::test]
async fn forged_forms_are_refused_and_signing_out_ends_the_session() {
    let b = start().await;
    let (agent, token) = agent_with_task(&b, "target", "platform").await;
    b.post(
        "/v1/credentials",
        Some(&token),
        &json!({ "scope": "x509-svid", "ttl": 600 }),
    )
    .await
    .expect(201);
    let br = Browser::start().await;
    // A wrong token is refused with a clear message.
    br.sign_in(&base(&b), "kgop-not-a-real-token").await;
    assert!(br.text("p.error").await.contains("not an operator's"));
    br.sign_in(&base(&b), &b.ops.secops).await;
    assert_eq!(br.path().await, "/ui");

    // Another site makes the signed-in browser post the kill switch.
    br.goto(&hostile_site(&base(&b)).await).await;
    // It did post (the browser left the hostile page for the console),
    // without the session: `SameSite=Strict` kept the cookie home.
    eventually("the forged form was posted", || async {
        let u = br.client.current_url().await.unwrap();
        (u.port() == Some(b.addr.port())).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        br.path().await.starts_with("/ui/login"),
        "{}",
        br.path().await
    );
    assert!(
        b.audit("action=revocation.emergency").await.is_empty(),
        "a forged form pulled the kill switch"
    );
    assert_eq!(b.get("/v1/session", Some(&token)).await.status, 200);

    // The same with the session cookie outside the browser: without the
    // form's token, or from another origin, refused.
    br.goto(&format!("{}/ui/kill", base(&b))).await;
    let csrf = br
        .client
        .find(Locator::Css("input[name='csrf']"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let cookie = br
        .client
        .get_named_cookie("keygate_console")
        .await
        .unwrap()
        .value()
        .to_owned();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post = |csrf: &str, origin: Option<&str>| {
        let mut r = http
            .post(format!("{}/ui/kill/confirm", base(&b)))
            .header("cookie", format!("keygate_console={cookie}"))
            .form(&[
                ("by", "agent"),
                ("target", agent.id.as_str()),
                ("reason", "direct post"),
                ("csrf", csrf),
            ]);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let r = post("", None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("anti-forgery token"));
    let r = post(&csrf, Some("http://evil.example")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(b.audit("action=revocation.emergency").await.is_empty());
    // The positive control: the same post with its token goes through.
    let r = post(&csrf, Some(&base(&b))).await.unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_eq!(b.audit("action=revocation.emergency").await.len(), 1);

    // Signing out ends the session for every copy of the cookie.
    br.goto(&format!("{}/ui", base(&b))).await;
    br.submit("form.signout button").await;
    assert!(br.path().await.starts_with("/ui/login"));
    let r = http
        .get(format!("{}/ui/agents", base(&b)))
        .header("cookie", format!("keygate_console={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/ui/login")
    );
    // No token, cookie or credential reached a page or the log.
    let log = b.log();
    for secret in [b.ops.secops.as_str(), cookie.as_str()] {
        assert!(!log.contains(secret));
        assert!(
            !b.audit("")
                .await
                .iter()
                .any(|e: &Value| e.to_string().contains(secret))
        );
    }
    let signed: Vec<String> = b
        .audit("")
        .await
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("console."))
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(signed, ["console.signed_in", "console.signed_out"]);
    br.close().await;
}

#[tokio::test]
async fn an_operator_signs_in_through_the_oidc_issuer_with_pkce() {
    let oidc = common::oidc::OidcIssuer::start().await;
    // The issuer sends the browser back to the console's public address,
    // so the broker listens where its config says.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut b = TestBroker::prepare(Setup {
        extra_config: format!(
            r#"
[notify]
public_url = "http://127.0.0.1:{port}"

[[federation.issuers]]
name = "corp"
issuer = "{issuer}"
audience = "keygate-console"
algorithms = ["RS256"]
users = true

[console]
oidc_issuer = "corp"

[[operators]]
name = "oidc-secops"
roles = ["secops"]
token_sha256 = "{unused}"
oidc_subject = "johndoe"
"#,
            issuer = oidc.issuer,
            unused = common::config::sha256_hex(&uuid::Uuid::new_v4().to_string()),
        ),
        ..Setup::permissive()
    });
    b.listen = format!("127.0.0.1:{port}");
    b.start_again().await;
    let base = base(&b);

    let br = Browser::start().await;
    br.goto(&format!("{base}/ui/login?next=%2Fui%2Fincidents"))
        .await;
    assert_eq!(br.text("a.oidc").await, "Sign in with corp");
    br.click("a.oidc").await;
    // The issuer signs `johndoe` in and sends the browser back; the console
    // checks state, PKCE and nonce and moves on to where it was going.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while br.path().await != "/ui/incidents" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not signed in: at {}\n{}",
            br.client.current_url().await.unwrap(),
            br.source().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(br.text("header").await.contains("oidc-secops"));
    let signed = b.audit("action=console.signed_in").await;
    assert_eq!(signed.last().unwrap()["actor"], "operator:oidc-secops");
    assert_eq!(signed.last().unwrap()["details"]["method"], "oidc");

    // A callback this browser did not start is refused.
    br.goto(&format!(
        "{base}/ui/login/oidc/callback?code=forged&state=0000"
    ))
    .await;
    assert!(
        br.text("p.error").await.contains("did not start here")
            || br.text("p.error").await.contains("state does not match"),
        "{}",
        br.source().await
    );
    // A state that differs from this browser's is refused too.
    br.goto(&format!("{base}/ui/login")).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let started = http
        .get(format!("{base}/ui/login/oidc"))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 303);
    let flow = started.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        flow.contains("HttpOnly") && flow.contains("SameSite=Lax"),
        "{flow}"
    );
    let location = started.headers()["location"].to_str().unwrap();
    assert!(
        location.contains("code_challenge_method=S256") && location.contains("nonce="),
        "{location}"
    );
    let cookie = flow.split(';').next().unwrap();
    let r = http
        .get(format!(
            "{base}/ui/login/oidc/callback?code=x&state=not-the-state"
        ))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("state does not match"));
    br.close().await;
}

#[tokio::test]
async fn a_sponsor_attests_an_item_assigned_to_her_and_downloads_the_evidence_pack() {
    let (b, people) = common::governance::start("").await;
    let agent = TestAgent::new("reviewed", "ES256");
    b.register(&agent, "platform").await;
    b.admin_post("/v1/reviews", &json!({ "name": "2026-Q4" }))
        .await
        .expect(201);
    let br = Browser::start().await;
    // Olga is the agent's sponsor: the item waits for her.
    br.sign_in(&base(&b), &people.olga).await;
    br.goto(&format!("{}/ui/reviews", base(&b))).await;
    let mine = br.text("main table").await;
    assert!(mine.contains(&agent.id), "{mine}\n{}", br.source().await);
    br.screenshot("reviews").await;
    br.submit("main table tbody a").await;
    br.fill("#note", "still needed for the nightly build").await;
    br.submit("button[value='attest']").await;
    assert_eq!(br.text("dd span.state").await, "attested");
    let items = b
        .get("/v1/reviews/2026-Q4", Some(&b.ops.auditor))
        .await
        .expect(200);
    let item = &items["items"][0];
    assert_eq!(item["state"], "attested", "{item}");
    assert_eq!(item["decisions"][0]["by"], "olga");

    // She is an auditor too: the evidence pack for today, as a download.
    let cookie = br
        .client
        .get_named_cookie("keygate_console")
        .await
        .unwrap()
        .value()
        .to_owned();
    let day = time::OffsetDateTime::now_utc().date();
    let http = reqwest::Client::new();
    let get = |format: &'static str| {
        http.get(format!(
            "{}/ui/evidence?from={day}&to={day}&format={format}",
            base(&b)
        ))
        .header("cookie", format!("keygate_console={cookie}"))
        .send()
    };
    let r = get("json").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment"),
    );
    let pack: Value = r.json().await.unwrap();
    assert!(
        pack["summary"]["review_items_decided"].as_u64().unwrap() >= 1,
        "{}",
        pack["summary"]
    );
    let html = get("html").await.unwrap().text().await.unwrap();
    assert!(html.contains("Agent identity evidence"), "{html:.200}");
    br.close().await;
}
