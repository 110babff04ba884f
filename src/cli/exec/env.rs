//! How a credential reaches the command `keygate exec` runs: variables in
//! its environment and files in a private directory.
//!
//! For every scope, every field of its credential is a variable
//! `KEYGATE_<SCOPE>_<FIELD>` (upper case, anything but letters and digits
//! as `_`), and the whole credential is a file `<scope>.json`; certificates
//! and keys (`certificate`, `private_key`, `ca_bundle`, `ca_chain`) are PEM
//! files instead of variables, their paths in `KEYGATE_<SCOPE>_<FIELD>_FILE`.
//! The tools' own conventions are followed where a credential's fields say
//! what it is: AWS keys (`access_key_id`, `secret_access_key`,
//! `session_token`, `region`) as `AWS_ACCESS_KEY_ID`, … and a Vault token
//! (`token` with `vault_addr`) as `VAULT_TOKEN` and `VAULT_ADDR` — unless two
//! scopes would claim the same name (then neither does; map them with
//! `--env`). `--env NAME=scope.field` names any field's variable itself (a
//! file field gets its path).
//!
//! The directory is 0700 and its files 0600; files are rewritten in place
//! (a new file renamed over the old) when a credential is refreshed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

/// Fields delivered as files.
const FILE_FIELDS: [&str; 4] = ["certificate", "private_key", "ca_bundle", "ca_chain"];

/// A tool's convention: the fields that say a credential is its kind, and
/// each field's standard variable.
type Convention = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

/// The standard variables of well-known credentials, applied when every
/// one of the needed fields is present.
const CONVENTIONS: [Convention; 2] = [
    (
        &["access_key_id", "secret_access_key"],
        &[
            ("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"),
            ("region", "AWS_REGION"),
        ],
    ),
    (
        &["token", "vault_addr"],
        &[("token", "VAULT_TOKEN"), ("vault_addr", "VAULT_ADDR")],
    ),
];

/// `--env NAME=scope.field`, parsed.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub name: String,
    pub scope: String,
    pub field: String,
}

impl std::str::FromStr for Mapping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}`: give NAME=SCOPE.FIELD");
        let (name, target) = s.split_once('=').ok_or_else(bad)?;
        let (scope, field) = target.rsplit_once('.').ok_or_else(bad)?;
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid || scope.is_empty() || field.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_owned(),
            scope: scope.to_owned(),
            field: field.to_owned(),
        })
    }
}

/// A name fit for a variable: upper case, `_` for anything else.
pub fn var_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The fields of one credential response, as strings.
fn fields(response: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(obj) = response["credential"].as_object() {
        for (k, v) in obj {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            out.insert(k.clone(), text);
        }
    }
    out
}

/// Writes `content` to `path` (0600) through a temporary file renamed over
/// it, so a reader never sees half a credential. The temporary file is a
/// new one of a random name (created exclusively, 0600): two writers at
/// once never share it, and a file someone else made beforehand (in a
/// shared directory) is never written into.
pub fn write_private(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".keygate-")
        .tempfile_in(dir)
        .with_context(|| format!("writing into `{}`", dir.display()))?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing `{}`", path.display()))?;
    Ok(())
}

/// Writes the credentials' files into `dir` and returns the variables for
/// the command. `credentials` maps each scope to its credential response.
pub fn materialize(
    dir: &Path,
    credentials: &BTreeMap<String, Value>,
    mappings: &[Mapping],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut files: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    for (scope, response) in credentials {
        let f = fields(response);
        let prefix = format!("KEYGATE_{}", var_part(scope));
        write_private(
            &dir.join(format!("{scope}.json")),
            serde_json::to_string_pretty(response)?.as_bytes(),
        )?;
        for (field, value) in &f {
            if FILE_FIELDS.contains(&field.as_str()) {
                let path = dir.join(format!("{scope}.{field}.pem"));
                write_private(&path, value.as_bytes())?;
                vars.insert(
                    format!("{prefix}_{}_FILE", var_part(field)),
                    path.display().to_string(),
                );
                files.insert((scope.clone(), field.clone()), path);
            } else {
                vars.insert(format!("{prefix}_{}", var_part(field)), value.clone());
            }
        }
    }
    // Conventions: only where exactly one scope claims the names.
    for (needs, names) in CONVENTIONS {
        let claiming: Vec<&String> = credentials
            .iter()
            .filter(|(_, r)| {
                let f = fields(r);
                needs.iter().all(|n| f.contains_key(*n))
            })
            .map(|(s, _)| s)
            .collect();
        if let [scope] = claiming.as_slice() {
            let f = fields(&credentials[*scope]);
            for (field, name) in names {
                if let Some(v) = f.get(*field) {
                    vars.insert((*name).to_owned(), v.clone());
                }
            }
        } else if claiming.len() > 1 {
            let names: Vec<&str> = names.iter().map(|(_, n)| *n).collect();
            super::note!(
                "keygate: scopes {claiming:?} would all set {}; none does (use --env)",
                names.join(", ")
            );
        }
    }
    for m in mappings {
        let Some(response) = credentials.get(&m.scope) else {
            bail!("--env {}: `{}` is not one of the --scope", m.name, m.scope);
        };
        let value = match files.get(&(m.scope.clone(), m.field.clone())) {
            Some(path) => path.display().to_string(),
            None => fields(response).remove(&m.field).with_context(|| {
                format!(
                    "--env {}: the `{}` credential has no field `{}`",
                    m.name, m.scope, m.field
                )
            })?,
        };
        vars.insert(m.name.clone(), value);
    }
    Ok(vars)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_become_variables_files_and_conventions() {
        let dir = std::env::temp_dir().join(format!("kg-exec-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let creds = BTreeMap::from([
            (
                "x509-svid".to_owned(),
                json!({ "lease_id": "ls_1", "credential": {
                    "certificate": "CERT", "private_key": "KEY", "spiffe_id": "spiffe://t/agent/a" } }),
            ),
            (
                "aws-reports".to_owned(),
                json!({ "lease_id": "ls_2", "credential": {
                    "access_key_id": "AKIA", "secret_access_key": "S", "session_token": "T" } }),
            ),
        ]);
        let m: Mapping = "CERT_PATH=x509-svid.certificate".parse().unwrap();
        let vars = materialize(&dir, &creds, &[m]).unwrap();
        assert_eq!(vars["AWS_ACCESS_KEY_ID"], "AKIA");
        assert_eq!(vars["AWS_SESSION_TOKEN"], "T");
        assert_eq!(vars["KEYGATE_AWS_REPORTS_SECRET_ACCESS_KEY"], "S");
        assert_eq!(vars["KEYGATE_X509_SVID_SPIFFE_ID"], "spiffe://t/agent/a");
        let key = &vars["KEYGATE_X509_SVID_PRIVATE_KEY_FILE"];
        assert_eq!(std::fs::read_to_string(key).unwrap(), "KEY");
        assert!(!vars.contains_key("KEYGATE_X509_SVID_PRIVATE_KEY"));
        assert_eq!(
            vars["CERT_PATH"],
            vars["KEYGATE_X509_SVID_CERTIFICATE_FILE"]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!("x=y".parse::<Mapping>().is_err());
        assert!("1X=a.b".parse::<Mapping>().is_err());
        let unknown: Mapping = "X=nope.f".parse().unwrap();
        assert!(materialize(&dir, &creds, &[unknown]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
