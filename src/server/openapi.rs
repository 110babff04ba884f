//! The OpenAPI 3.1 document (`GET /openapi.json`) and the route table it is
//! generated from. Every route is registered through `routes!`, which takes
//! the method and path from the handler's `#[utoipa::path]` attribute: a
//! route cannot exist without being described, nor be described at another
//! path than it is served on. What every operation shares (the error
//! answers, who may call) is added here by tag, once.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ERROR_CODES, OAUTH_ERROR_CODES};
use super::{AppState, admin, agent, approvals, governance, incidents, ops, reviews};

/// Tags: who calls an operation, which decides how it authenticates.
pub const AGENT: &str = "agent";
pub const OAUTH: &str = "oauth";
pub const OPERATOR: &str = "operator";
pub const PUBLIC: &str = "public";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keygate",
        description = "Credential broker for AI agents. Agents authenticate at `/oauth/token` and call the `agent` operations with the session token (`Bearer`, or `DPoP` when bound); operators call the `operator` operations with their bearer token. Every refusal is `{\"error\": <ErrorCode>, \"message\"}` (the token endpoint: `{\"error\": <OAuthErrorCode>, \"error_description\"}`)."
    ),
    components(schemas(ErrorBody, OAuthErrorBody, ErrorCode, OAuthErrorCode)),
    tags(
        (name = "agent", description = "An agent in an open task (session token)"),
        (name = "oauth", description = "OAuth 2.0 token, introspection and revocation endpoints"),
        (name = "operator", description = "Operators: admin, secops, approver, auditor (bearer token)"),
        (name = "public", description = "Health, metrics and discovery; no authentication"),
    )
)]
struct ApiDoc;

/// Every route of the API, each with its description.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::jwks))
        .routes(routes!(ops::metadata))
        .routes(routes!(document))
        .routes(routes!(agent::token))
        .routes(routes!(agent::introspect))
        .routes(routes!(agent::revoke_token))
        .routes(routes!(agent::whoami))
        .routes(routes!(agent::request_credential))
        .routes(routes!(agent::release))
        .routes(routes!(agent::renew))
        .routes(routes!(agent::complete))
        .routes(routes!(admin::register, admin::list_agents))
        .routes(routes!(admin::show_agent, admin::update_agent))
        .routes(routes!(admin::agent_action))
        .routes(routes!(governance::agent_compliance))
        .routes(routes!(reviews::exclude))
        .routes(routes!(reviews::include))
        .routes(routes!(reviews::start, reviews::list))
        .routes(routes!(reviews::show))
        .routes(routes!(reviews::item))
        .routes(routes!(reviews::decide))
        .routes(routes!(reviews::ascode_plan))
        .routes(routes!(reviews::ascode_apply))
        .routes(routes!(reviews::people))
        .routes(routes!(reviews::depart))
        .routes(routes!(governance::findings))
        .routes(routes!(governance::registry))
        .routes(routes!(governance::maturity))
        .routes(routes!(governance::sweep))
        .routes(routes!(governance::evidence))
        .routes(routes!(governance::policy))
        .routes(routes!(governance::policy_diff))
        .routes(routes!(governance::policy_reload))
        .routes(routes!(approvals::list))
        .routes(routes!(approvals::show))
        .routes(routes!(approvals::decide))
        .routes(routes!(approvals::redeem))
        .routes(routes!(approvals::slack_interaction))
        .routes(routes!(admin::list_leases))
        .routes(routes!(admin::revoke))
        .routes(routes!(admin::revocation))
        .routes(routes!(admin::list_fences))
        .routes(routes!(admin::lift_fence))
        .routes(routes!(incidents::list))
        .routes(routes!(incidents::show))
        .routes(routes!(incidents::resolve))
        .routes(routes!(admin::audit))
        .routes(routes!(ops::provider_verify))
        .routes(routes!(ops::provider_document))
}

/// The document as JSON, built once.
pub fn document_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let (_, mut api) = routes().split_for_parts();
        // After the routes: what every operation shares is added to each.
        Contract.modify(&mut api);
        api.to_pretty_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialize");
            r#"{"error": "internal", "message": "the OpenAPI document does not serialize; see the log"}"#.to_owned()
        })
    })
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = PUBLIC,
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
pub async fn document() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
}

/// A refusal: a stable code and a message that never holds a secret.
#[derive(ToSchema)]
#[allow(dead_code)] // a schema: the answer itself is built by `ApiError`
pub struct ErrorBody {
    pub error: ErrorCode,
    pub message: String,
    /// `policy_denied`: the ids of the policies that decided.
    pub policies: Option<Vec<String>>,
}

/// A token endpoint refusal (RFC 6749 §5.2).
#[derive(ToSchema)]
#[allow(dead_code)] // a schema: the answer itself is built by the token handler
pub struct OAuthErrorBody {
    pub error: OAuthErrorCode,
    pub error_description: String,
}

/// The stable codes of the JSON API's refusals (`ERROR_CODES`).
pub struct ErrorCode;
/// The token endpoint's codes (`OAUTH_ERROR_CODES`).
pub struct OAuthErrorCode;

fn string_enum(values: &[&str], description: &str) -> utoipa::openapi::schema::Schema {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values.iter().copied()))
        .description(Some(description))
        .into()
}

impl utoipa::PartialSchema for ErrorCode {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        string_enum(ERROR_CODES, "A refusal's stable code").into()
    }
}
impl ToSchema for ErrorCode {}

impl utoipa::PartialSchema for OAuthErrorCode {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        string_enum(
            OAUTH_ERROR_CODES,
            "A token endpoint refusal's code (RFC 6749 §5.2, RFC 8693, RFC 9449)",
        )
        .into()
    }
}
impl ToSchema for OAuthErrorCode {}

/// What every operation shares, by tag: its security and its refusals.
struct Contract;

impl Modify for Contract {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("An agent's session token from `/oauth/token`; a DPoP-bound one is sent as `Authorization: DPoP <token>` with a `DPoP` proof (RFC 9449)"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "operator",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An operator token whose SHA-256 is in `[[operators]]`",
                    ))
                    .build(),
            ),
        );
        let error = |what: &str, schema: &str| {
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            schema,
                        ))))
                        .build(),
                )
                .build()
        };
        for item in api.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
                &mut item.put,
            ]
            .into_iter()
            .flatten()
            {
                let tag = op
                    .tags
                    .as_ref()
                    .and_then(|t| t.first())
                    .cloned()
                    .unwrap_or_default();
                let scheme = match tag.as_str() {
                    AGENT => Some("session"),
                    OPERATOR => Some("operator"),
                    _ => None,
                };
                if let Some(s) = scheme {
                    op.security = Some(vec![SecurityRequirement::new::<_, _, &str>(s, [])]);
                }
                let body = if tag == OAUTH {
                    "OAuthErrorBody"
                } else {
                    "ErrorBody"
                };
                let responses = &mut op.responses.responses;
                for (code, what) in [
                    ("4XX", "Refused: the body says why"),
                    ("5XX", "The broker or a backend failed"),
                ] {
                    responses
                        .entry(code.to_owned())
                        .or_insert_with(|| error(what, body).into());
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_registered_through_the_documented_table() {
        // A plain `.route(...)` in the server would serve an undocumented
        // path; the only routes are those `routes()` registers.
        let server = include_str!("../server.rs");
        assert!(
            !server.contains(".route("),
            "src/server.rs registers a route outside openapi::routes()"
        );
        for file in [
            include_str!("admin.rs"),
            include_str!("agent.rs"),
            include_str!("approvals.rs"),
            include_str!("governance.rs"),
            include_str!("incidents.rs"),
            include_str!("ops.rs"),
            include_str!("reviews.rs"),
        ] {
            assert!(!file.contains(".route("));
            // Every handler is documented (and so registered by `routes!`).
            let handlers = file.matches("\npub async fn ").count();
            let documented = file.matches("#[utoipa::path(").count();
            let middleware = [
                "log_requests",
                "limit_by_address",
                "json_errors",
                "not_found",
            ]
            .iter()
            .filter(|m| file.contains(&format!("pub async fn {m}(")))
            .count();
            assert_eq!(handlers - middleware, documented, "an undocumented handler");
        }
    }

    #[test]
    fn every_code_an_error_is_built_with_is_listed() {
        // `ApiError::new(status, "code", …)` anywhere in the server: the
        // code is the first string literal after the call opens.
        for (name, file) in [
            ("admin.rs", include_str!("admin.rs")),
            ("agent.rs", include_str!("agent.rs")),
            ("approvals.rs", include_str!("approvals.rs")),
            ("auth.rs", include_str!("auth.rs")),
            ("error.rs", include_str!("error.rs")),
            ("governance.rs", include_str!("governance.rs")),
            ("incidents.rs", include_str!("incidents.rs")),
            ("ops.rs", include_str!("ops.rs")),
            ("reviews.rs", include_str!("reviews.rs")),
        ] {
            for (i, _) in file.match_indices("ApiError::new(") {
                let rest = &file[i..];
                if rest.starts_with("ApiError::new(status, code") {
                    continue; // the constructor itself
                }
                let open = rest.find('"').unwrap();
                let code = &rest[open + 1..];
                let code = &code[..code.find('"').unwrap()];
                assert!(
                    ERROR_CODES.contains(&code),
                    "{name}: `{code}` is not in ERROR_CODES"
                );
            }
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_operation_answered_and_secured() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().unwrap();
        let mut operations = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|k| k.starts_with('2')),
                    "{method} {path} documents no success"
                );
                assert!(responses.contains_key("4XX"), "{method} {path}");
                let tag = op["tags"][0].as_str().unwrap();
                if tag == AGENT || tag == OPERATOR {
                    assert!(op["security"].is_array(), "{method} {path} has no security");
                }
            }
        }
        assert!(operations >= 52, "only {operations} operations");
        // Operation ids are unique (clients generate method names from them).
        let mut ids = std::collections::BTreeSet::new();
        for item in paths.values() {
            for op in item.as_object().unwrap().values() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_owned()), "operationId `{id}` twice");
            }
        }
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        assert_eq!(codes.as_array().unwrap().len(), ERROR_CODES.len());
    }
}
