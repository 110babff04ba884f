//! References to Keygate's own root secrets (a Vault AppRole secret id, a
//! Slack signing secret): config holds `env:NAME`, `file:PATH` or
//! `aws-sm:SECRET-ID`, never the value, and the value is read at the point of
//! use, so a rotated secret is picked up without a restart.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretString;

use crate::ProviderError;

/// Where a secret lives. Its `Display` is the reference itself, safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `env:NAME`: an environment variable of the broker process.
    Env(String),
    /// `file:PATH`: a file's content, without its trailing newline.
    File(PathBuf),
    /// `aws-sm:SECRET-ID`: an AWS Secrets Manager secret (name or ARN),
    /// its current version.
    AwsSecretsManager(String),
}

impl SecretRef {
    /// The scheme, as written before the colon.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Env(_) => "env",
            Self::File(_) => "file",
            Self::AwsSecretsManager(_) => "aws-sm",
        }
    }
}

impl FromStr for SecretRef {
    type Err = ProviderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A value that is not a reference may be the secret itself, pasted
        // where its reference belongs: the message never repeats it.
        let invalid = |why: &str| {
            ProviderError::InvalidParams(format!(
                "a secret reference is not valid (its value is not shown: it may be a secret): {why}"
            ))
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| invalid("write `env:NAME`, `file:PATH` or `aws-sm:SECRET-ID`"))?;
        if rest.is_empty() {
            return Err(invalid("nothing follows the scheme"));
        }
        match scheme {
            "env" => Ok(Self::Env(rest.to_owned())),
            "file" => Ok(Self::File(PathBuf::from(rest))),
            "aws-sm" => Ok(Self::AwsSecretsManager(rest.to_owned())),
            other if other.len() <= 16 && other.bytes().all(|b| b.is_ascii_lowercase()) => {
                Err(invalid(&format!(
                    "unknown scheme `{other}` (expected `env`, `file` or `aws-sm`)"
                )))
            }
            _ => Err(invalid(
                "unknown scheme (expected `env:NAME`, `file:PATH` or `aws-sm:SECRET-ID`)",
            )),
        }
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(name) => write!(f, "env:{name}"),
            Self::File(path) => write!(f, "file:{}", path.display()),
            Self::AwsSecretsManager(id) => write!(f, "aws-sm:{id}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A backend that stores secrets Keygate reads by reference (`aws-sm`).
#[async_trait]
pub trait SecretSource: Send + Sync + 'static {
    /// The reference scheme it serves, e.g. `aws-sm`.
    fn scheme(&self) -> &'static str;

    /// Reads the current value of the secret `id`.
    async fn read(&self, id: &str) -> Result<SecretString, ProviderError>;
}

/// Reads secret references: `env` and `file` itself, other schemes through
/// the [`SecretSource`]s it was given.
#[derive(Default, Clone)]
pub struct SecretResolver {
    sources: BTreeMap<&'static str, Arc<dyn SecretSource>>,
}

impl fmt::Debug for SecretResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretResolver")
            .field("sources", &self.sources.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretResolver {
    /// A resolver for `env` and `file` references only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend for its scheme (replacing an earlier one).
    pub fn with_source(mut self, source: Arc<dyn SecretSource>) -> Self {
        self.sources.insert(source.scheme(), source);
        self
    }

    /// Reads the secret a reference names, now.
    pub async fn resolve(&self, r: &SecretRef) -> Result<SecretString, ProviderError> {
        match r {
            SecretRef::Env(name) => std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(SecretString::from)
                .ok_or_else(|| {
                    ProviderError::InvalidParams(format!(
                        "secret `{r}`: the environment variable is not set or empty"
                    ))
                }),
            SecretRef::File(path) => {
                // Root secrets are a few bytes: a blocking read is fine here.
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ProviderError::InvalidParams(format!("secret `{r}`: cannot read it: {e}"))
                })?;
                let value = text.strip_suffix('\n').unwrap_or(&text);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(ProviderError::InvalidParams(format!(
                        "secret `{r}`: the file is empty"
                    )));
                }
                Ok(SecretString::from(value.to_owned()))
            }
            SecretRef::AwsSecretsManager(id) => match self.sources.get(r.scheme()) {
                Some(source) => source.read(id).await,
                None => Err(ProviderError::Unsupported(format!(
                    "secret `{r}`: this broker has no `{}` secret source (build with the `aws` feature and configure it)",
                    r.scheme()
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn parses_and_prints_references() {
        for text in [
            "env:VAULT_SECRET_ID",
            "file:/run/secrets/x",
            "aws-sm:prod/vault",
        ] {
            let r: SecretRef = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(
            "aws-sm:arn:aws:secretsmanager:us-east-1:1:secret:x"
                .parse::<SecretRef>()
                .unwrap(),
            SecretRef::AwsSecretsManager("arn:aws:secretsmanager:us-east-1:1:secret:x".into())
        );
        for (bad, needle) in [
            ("plain-value", "write `env:NAME`"),
            ("env:", "nothing follows"),
            ("vault:kv/x", "unknown scheme `vault`"),
            ("Zx8Q~secret:tail", "unknown scheme (expected"),
        ] {
            let err = bad.parse::<SecretRef>().unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
            // A pasted secret is never repeated back.
            if bad != "env:" {
                assert!(!err.contains(bad), "{bad}: {err}");
            }
        }
    }

    #[tokio::test]
    async fn resolves_env_and_file_and_refuses_unknown_sources() {
        let dir = std::env::temp_dir().join(format!("kg-secret-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cr3t\n").unwrap();
        let resolver = SecretResolver::new();
        let v = resolver.resolve(&SecretRef::File(file)).await.unwrap();
        assert_eq!(v.expose_secret(), "s3cr3t");
        let v = resolver
            .resolve(&SecretRef::Env("PATH".into()))
            .await
            .unwrap();
        assert!(!v.expose_secret().is_empty());
        let missing = SecretRef::Env("KEYGATE_TEST_SURELY_UNSET_VARIABLE".into());
        assert!(resolver.resolve(&missing).await.is_err());
        let err = resolver
            .resolve(&SecretRef::AwsSecretsManager("x".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unsupported(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
