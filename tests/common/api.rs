//! The broker's HTTP API as agents and operators call it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{JWT_AUDIENCE, JWT_BEARER, Resp, Session, TestAgent, TestBroker};

impl TestBroker {
    /// Any request; `bearer` goes in `Authorization`, `body` as JSON.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let mut rb = self.http.request(method, self.url(path));
        if let Some(t) = bearer {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.unwrap();
        Resp {
            status: resp.status(),
            text: resp.text().await.unwrap(),
        }
    }

    pub async fn get(&self, path: &str, bearer: Option<&str>) -> Resp {
        self.call(Method::GET, path, bearer, None).await
    }

    pub async fn post(&self, path: &str, bearer: Option<&str>, body: &Value) -> Resp {
        self.call(Method::POST, path, bearer, Some(body)).await
    }

    /// `GET` as the admin; asserts 200.
    pub async fn admin_get(&self, path: &str) -> Value {
        self.get(path, Some(&self.ops.admin)).await.expect(200)
    }

    /// `POST` as the admin.
    pub async fn admin_post(&self, path: &str, body: &Value) -> Resp {
        self.post(path, Some(&self.ops.admin), body).await
    }

    /// `PATCH /v1/agents/{id}` as the admin.
    pub async fn patch_agent(&self, id: &str, body: &Value) -> Resp {
        self.call(
            Method::PATCH,
            &format!("/v1/agents/{id}"),
            Some(&self.ops.admin),
            Some(body),
        )
        .await
    }

    /// An RFC 8693 token exchange: `actor` takes over the task of the
    /// session `parent`, narrowed to `scope` (when given) for `ttl` seconds
    /// (when given). The answer, as the token endpoint gave it.
    pub async fn exchange(
        &self,
        parent: &str,
        actor: &TestAgent,
        scope: Option<&str>,
        ttl: Option<u64>,
    ) -> Resp {
        let assertion = actor.assertion();
        let ttl = ttl.map(|t| t.to_string());
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", parent),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("actor_token", assertion.as_str()),
            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        if let Some(t) = &ttl {
            form.push(("ttl", t));
        }
        self.token_form(&form).await
    }

    /// Registers `agent` in `team` (risk tier 2, dev); asserts 201.
    pub async fn register(&self, agent: &TestAgent, team: &str) -> Value {
        self.admin_post("/v1/agents", &agent.spec(team))
            .await
            .expect(201)
    }

    /// `POST /oauth/token` with raw form fields.
    pub async fn token_form(&self, form: &[(&str, &str)]) -> Resp {
        let resp = self
            .http
            .post(self.url("/oauth/token"))
            .form(form)
            .send()
            .await
            .unwrap();
        Resp {
            status: resp.status(),
            text: resp.text().await.unwrap(),
        }
    }

    /// The standard token request with a given assertion.
    pub async fn token_with_assertion(&self, client_id: &str, assertion: &str) -> Resp {
        self.token_form(&[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
            ("task", "integration test"),
        ])
        .await
    }

    /// Opens a task for `agent`; asserts success.
    pub async fn token(&self, agent: &TestAgent) -> Session {
        self.token_ttl(agent, None).await
    }

    /// Opens a task with a session `ttl` in seconds.
    /// A fresh agent of `team`, registered, with an open 30-minute task.
    pub async fn agent_with_task(&self, prefix: &str, team: &str) -> (TestAgent, Session) {
        let agent = TestAgent::new(prefix, "ES256");
        self.register(&agent, team).await;
        let s = self.token_ttl(&agent, Some(1800)).await;
        (agent, s)
    }

    pub async fn token_ttl(&self, agent: &TestAgent, ttl: Option<u64>) -> Session {
        let assertion = agent.assertion();
        let ttl = ttl.map(|t| t.to_string());
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", agent.id.as_str()),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
            ("task", "integration test"),
        ];
        if let Some(t) = &ttl {
            form.push(("ttl", t));
        }
        let v = self.token_form(&form).await.expect(200);
        assert_eq!(v["token_type"], "Bearer");
        Session {
            token: v["access_token"].as_str().unwrap().to_owned(),
            task_id: v["task_id"].as_str().unwrap().to_owned(),
        }
    }

    /// `POST /v1/credentials`.
    pub async fn credential(
        &self,
        session: &str,
        scope: &str,
        ttl: Option<u64>,
        params: Option<Value>,
    ) -> Resp {
        let mut body = json!({ "scope": scope });
        if let Some(t) = ttl {
            body["ttl"] = t.into();
        }
        if let Some(p) = params {
            body["params"] = p;
        }
        self.post("/v1/credentials", Some(session), &body).await
    }

    /// An X.509-SVID for the session; asserts 201.
    pub async fn x509(&self, session: &str, ttl: Option<u64>) -> Value {
        self.credential(session, "x509-svid", ttl, None)
            .await
            .expect(201)
    }

    /// A JWT-SVID for [`JWT_AUDIENCE`]; asserts 201.
    pub async fn jwt_svid(&self, session: &str, ttl: Option<u64>) -> Value {
        let params = json!({ "audience": JWT_AUDIENCE });
        self.credential(session, "jwt-svid", ttl, Some(params))
            .await
            .expect(201)
    }

    pub async fn complete(&self, session: &str) -> Resp {
        self.post("/v1/tasks/complete", Some(session), &json!({}))
            .await
    }

    /// `POST /v1/providers/ca/verify`; asserts 200.
    pub async fn verify(&self, presented: &Value) -> Value {
        self.post("/v1/providers/ca/verify", None, presented)
            .await
            .expect(200)
    }

    /// `GET /v1/leases?{query}` as the admin.
    /// `POST /oauth/introspect` as secops.
    pub async fn introspect(&self, token: &str) -> Value {
        self.http
            .post(self.url("/oauth/introspect"))
            .bearer_auth(&self.ops.secops)
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn leases(&self, query: &str) -> Vec<Value> {
        let v = self.admin_get(&format!("/v1/leases?{query}")).await;
        v.as_array().unwrap().clone()
    }

    /// One lease's current state.
    pub async fn lease_state(&self, lease_id: &str) -> String {
        let all = self.leases("limit=10000").await;
        let l = all
            .iter()
            .find(|l| l["id"] == lease_id)
            .unwrap_or_else(|| panic!("no lease {lease_id}"));
        l["state"].as_str().unwrap().to_owned()
    }

    /// Every audit event matching `query`, as the auditor.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        // Paged by sequence number: a busy test can log more than a page.
        let mut all: Vec<Value> = Vec::new();
        loop {
            let after = all.last().map_or(0, |e| e["seq"].as_i64().unwrap());
            let resp = self
                .get(
                    &format!("/v1/audit?limit=10000&after={after}&{query}"),
                    Some(&self.ops.auditor),
                )
                .await;
            assert_eq!(resp.status, StatusCode::OK, "{}", resp.text);
            let page: Vec<Value> = resp
                .text
                .lines()
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let full = page.len() == 10000;
            all.extend(page);
            if !full {
                return all;
            }
        }
    }
}
