//! The credential handed to an agent: named fields, some public, some secret.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// One field of a credential.
pub enum CredentialField {
    /// Safe to log and audit (a certificate, an expiry, a username).
    Public(serde_json::Value),
    /// Secret material (a private key, a token, a password). Only ever exposed
    /// when the credential is serialised into the response to its agent.
    Secret(SecretString),
    /// Secret structured data (a KV secret's fields, with their JSON types),
    /// held as JSON text and exposed to the agent as that JSON.
    SecretJson(SecretString),
}

impl fmt::Debug for CredentialField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Public(v) => f.debug_tuple("Public").field(v).finish(),
            Self::Secret(_) => f.write_str("Secret([REDACTED])"),
            Self::SecretJson(_) => f.write_str("SecretJson([REDACTED])"),
        }
    }
}

/// A minted credential: an ordered map of named fields.
///
/// It deliberately does not implement `Serialize`: the only way to turn the
/// secret parts into bytes is [`Credential::expose_to_agent`], which the
/// broker calls once, when writing the agent's HTTP response.
#[derive(Default)]
pub struct Credential {
    fields: BTreeMap<String, CredentialField>,
}

impl Credential {
    /// An empty credential.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a public field.
    pub fn public(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields
            .insert(name.to_owned(), CredentialField::Public(value.into()));
        self
    }

    /// Adds a secret field.
    pub fn secret(mut self, name: &str, value: SecretString) -> Self {
        self.fields
            .insert(name.to_owned(), CredentialField::Secret(value));
        self
    }

    /// Adds a secret field holding structured data; its JSON types (numbers,
    /// objects) reach the agent as they are.
    pub fn secret_json(mut self, name: &str, value: serde_json::Value) -> Self {
        self.fields.insert(
            name.to_owned(),
            CredentialField::SecretJson(SecretString::from(value.to_string())),
        );
        self
    }

    /// Looks a field up.
    pub fn get(&self, name: &str) -> Option<&CredentialField> {
        self.fields.get(name)
    }

    /// The names of the fields.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// The public fields only, safe for logs and audit.
    pub fn public_view(&self) -> serde_json::Value {
        let map = self
            .fields
            .iter()
            .filter_map(|(k, v)| match v {
                CredentialField::Public(v) => Some((k.clone(), v.clone())),
                CredentialField::Secret(_) | CredentialField::SecretJson(_) => None,
            })
            .collect();
        serde_json::Value::Object(map)
    }

    /// Every field, secrets included, as JSON for the agent's response. Call
    /// it only where the value goes straight to the agent.
    pub fn expose_to_agent(&self) -> serde_json::Value {
        let map =
            self.fields
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        CredentialField::Public(v) => v.clone(),
                        CredentialField::Secret(s) => {
                            serde_json::Value::String(s.expose_secret().to_owned())
                        }
                        CredentialField::SecretJson(s) => serde_json::from_str(s.expose_secret())
                            .unwrap_or(serde_json::Value::Null),
                    };
                    (k.clone(), v)
                })
                .collect();
        serde_json::Value::Object(map)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.fields.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_public_view_hide_secrets() {
        let c = Credential::new()
            .public("certificate", "CERT")
            .secret("private_key", SecretString::from("TOPSECRET"));
        let dbg = format!("{c:?}");
        assert!(dbg.contains("CERT"));
        assert!(!dbg.contains("TOPSECRET"), "{dbg}");
        assert!(!c.public_view().to_string().contains("TOPSECRET"));
        assert_eq!(c.expose_to_agent()["private_key"], "TOPSECRET");
    }
}
