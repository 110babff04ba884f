//! The three Microsoft Graph calls Keygate makes on an app registration:
//! `addPassword`, `removePassword`, and reading its `passwordCredentials`.

use keygate_provider_api::ProviderError;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

use crate::error;
use crate::identity::KeygateCredential;

/// Graph, as Keygate's own identity.
#[derive(Debug)]
pub(crate) struct Graph {
    http: reqwest::Client,
    /// The versioned base, with a trailing slash (`…/v1.0/`).
    base: Url,
    scope: String,
    credential: KeygateCredential,
}

/// A password Graph just added. `secret` is returned by `addPassword` only.
pub(crate) struct NewPassword {
    pub key_id: String,
    pub end: OffsetDateTime,
    pub secret: SecretString,
}

/// A password as Graph lists it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswordInfo {
    pub key_id: String,
    pub display_name: Option<String>,
    pub end: Option<OffsetDateTime>,
}

/// What `removePassword` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    Removed,
    /// No such password (or no such app): counts as revoked.
    NotFound,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AddPasswordBody<'a> {
    password_credential: PasswordCredentialIn<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PasswordCredentialIn<'a> {
    display_name: &'a str,
    #[serde(with = "time::serde::rfc3339")]
    end_date_time: OffsetDateTime,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RemovePasswordBody<'a> {
    key_id: &'a str,
}

/// `addPassword`'s answer; the secret goes straight into a secret type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddedPassword {
    key_id: String,
    secret_text: Option<SecretString>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    end_date_time: Option<OffsetDateTime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplicationPasswords {
    #[serde(default)]
    password_credentials: Vec<ListedPassword>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedPassword {
    key_id: String,
    display_name: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    end_date_time: Option<OffsetDateTime>,
}

impl Graph {
    pub(crate) fn new(
        http: reqwest::Client,
        endpoint: &Url,
        scope: String,
        credential: KeygateCredential,
    ) -> Self {
        let mut base = endpoint.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Self {
            http,
            base,
            scope,
            credential,
        }
    }

    /// `…/applications/{id}{suffix}`. Application ids are checked guids at
    /// config load, so they need no escaping.
    fn app_url(&self, app: &str, suffix: &str) -> Result<Url, ProviderError> {
        self.base
            .join(&format!("applications/{app}{suffix}"))
            .map_err(|e| ProviderError::Internal(format!("cannot build a graph url: {e}")))
    }

    /// Sends `req` with Keygate's bearer token; returns the status and body.
    async fn send(
        &self,
        operation: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), ProviderError> {
        let token = self.credential.token(&self.scope).await?;
        let resp = req
            .bearer_auth(token.token.secret())
            .send()
            .await
            .map_err(|e| error::from_transport(operation, &e))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| error::from_transport(operation, &e))?;
        Ok((status, body.to_vec()))
    }

    /// Adds a password named `display_name` that Entra disables at `end`.
    pub(crate) async fn add_password(
        &self,
        app: &str,
        display_name: &str,
        end: OffsetDateTime,
    ) -> Result<NewPassword, ProviderError> {
        let body = AddPasswordBody {
            password_credential: PasswordCredentialIn {
                display_name,
                end_date_time: end,
            },
        };
        let req = self
            .http
            .post(self.app_url(app, "/addPassword")?)
            .json(&body);
        let (status, bytes) = self.send("addPassword", req).await?;
        if status != 200 {
            return Err(error::from_graph("addPassword", status, &bytes));
        }
        // The body holds the secret: a parse error must not quote it.
        let added: AddedPassword = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::Internal(format!(
                "graph `addPassword` answered 200 with an unexpected body (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let secret = added
            .secret_text
            .filter(|s| !s.expose_secret().is_empty())
            .ok_or_else(|| {
                ProviderError::Internal(format!(
                    "graph `addPassword` added password `{}` but returned no `secretText`",
                    added.key_id
                ))
            })?;
        Ok(NewPassword {
            end: added.end_date_time.unwrap_or(end),
            key_id: added.key_id,
            secret,
        })
    }

    /// Removes the password `key_id` from the app.
    pub(crate) async fn remove_password(
        &self,
        app: &str,
        key_id: &str,
    ) -> Result<Removal, ProviderError> {
        let req = self
            .http
            .post(self.app_url(app, "/removePassword")?)
            .json(&RemovePasswordBody { key_id });
        match self.send("removePassword", req).await? {
            (200 | 204, _) => Ok(Removal::Removed),
            (404, _) => Ok(Removal::NotFound),
            // Graph does not document its answer for a key the app no
            // longer holds: a plain refusal is checked against the app's
            // current passwords before it counts as an error.
            (400, body) => {
                let held = self.passwords(app).await?;
                if held.iter().any(|p| p.key_id.eq_ignore_ascii_case(key_id)) {
                    Err(error::from_graph("removePassword", 400, &body))
                } else {
                    Ok(Removal::NotFound)
                }
            }
            (status, body) => Err(error::from_graph("removePassword", status, &body)),
        }
    }

    /// The app's passwords (`passwordCredentials`; Graph never lists their
    /// secrets).
    pub(crate) async fn passwords(&self, app: &str) -> Result<Vec<PasswordInfo>, ProviderError> {
        let mut url = self.app_url(app, "")?;
        url.query_pairs_mut()
            .append_pair("$select", "passwordCredentials");
        let (status, body) = self.send("get application", self.http.get(url)).await?;
        if status != 200 {
            return Err(error::from_graph("get application", status, &body));
        }
        let app: ApplicationPasswords = serde_json::from_slice(&body).map_err(|e| {
            ProviderError::Internal(format!(
                "graph answered an application read with an unexpected body: {e}"
            ))
        })?;
        Ok(app
            .password_credentials
            .into_iter()
            .map(|p| PasswordInfo {
                key_id: p.key_id,
                display_name: p.display_name,
                end: p.end_date_time,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn documented_shapes_parse() {
        // Graph's documented addPassword answer.
        let added: AddedPassword = serde_json::from_str(
            r#"{"customKeyIdentifier":null,"displayName":"keygate:a:tk_1:ls_1",
                "endDateTime":"2026-11-24T10:00:00Z","hint":"Y6c",
                "keyId":"f0b0b335-1d71-4883-8f98-567911bfdca6",
                "secretText":"Y6c8Q~not-a-real-secret","startDateTime":"2026-11-24T09:00:00.1234567Z"}"#,
        )
        .unwrap();
        assert_eq!(added.key_id, "f0b0b335-1d71-4883-8f98-567911bfdca6");
        assert_eq!(
            added.secret_text.unwrap().expose_secret(),
            "Y6c8Q~not-a-real-secret"
        );
        assert_eq!(added.end_date_time.unwrap().unix_timestamp(), 1_795_514_400);
        // An application read with 7-digit fractions, as Graph writes them.
        let app: ApplicationPasswords = serde_json::from_str(
            r#"{"@odata.context":"x","passwordCredentials":[
                {"customKeyIdentifier":null,"displayName":null,"endDateTime":"2027-01-01T00:00:00.1234567Z",
                 "hint":"abc","keyId":"k1","secretText":null,"startDateTime":"2026-01-01T00:00:00Z"}]}"#,
        )
        .unwrap();
        assert_eq!(app.password_credentials.len(), 1);
        assert!(app.password_credentials[0].display_name.is_none());
        assert!(app.password_credentials[0].end_date_time.is_some());
        let body = serde_json::to_value(AddPasswordBody {
            password_credential: PasswordCredentialIn {
                display_name: "keygate:a:t:l",
                end_date_time: OffsetDateTime::from_unix_timestamp(1_795_514_400).unwrap(),
            },
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"passwordCredential": {"displayName": "keygate:a:t:l", "endDateTime": "2026-11-24T10:00:00Z"}})
        );
    }
}
