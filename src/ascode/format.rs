//! The declarative agent files: TOML or YAML, one agent per file or several
//! under `agents`, the registry's fields plus seed 001's `agent_policy`
//! block as written; and the mapping table (`mapping.toml` or
//! `mapping.yaml`) that says which scopes an action, tool or data scope
//! means. Errors name the file and line and never quote values.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::broker::AgentSpec;
use crate::model::{Delegation, Environment, FederatedSubject};

/// Names the mapping file may have.
pub const MAPPING_FILES: &[&str] = &["mapping.toml", "mapping.yaml", "mapping.yml"];

/// The label every agent an apply manages carries; `--prune` only ever
/// decommissions agents with it.
pub const MANAGED_LABEL: (&str, &str) = ("managed_by", "keygate-apply");

/// Which scopes an action, a tool or a data scope means.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default)]
    pub actions: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub tools: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub data: BTreeMap<String, DataScopes>,
}

impl Mapping {
    /// Drops the scopes this broker does not configure (seeding a shared
    /// folder under a config with other scopes); returns those dropped.
    pub fn retain_configured(&mut self, scopes: &BTreeSet<String>) -> BTreeSet<String> {
        let mut dropped = BTreeSet::new();
        let mut keep = |list: &mut Vec<String>| {
            list.retain(|s| {
                let configured = scopes.contains(s);
                if !configured {
                    dropped.insert(s.clone());
                }
                configured
            });
        };
        for l in self.actions.values_mut().chain(self.tools.values_mut()) {
            keep(l);
        }
        for d in self.data.values_mut() {
            keep(&mut d.read);
            keep(&mut d.write);
        }
        dropped
    }
}

/// The scopes reading, and writing, a data scope takes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataScopes {
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub write: Vec<String>,
}

/// Seed 001's `agent_policy` block.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPolicy {
    pub agent_id: Option<String>,
    pub sponsor: Option<String>,
    pub risk_tier: Option<u8>,
    #[serde(default)]
    pub allowed_actions: Vec<String>,
    #[serde(default)]
    pub denied_actions: Vec<String>,
    #[serde(default)]
    pub data_access: Vec<DataAccess>,
    #[serde(default)]
    pub tool_access: Vec<ToolAccess>,
    pub delegation: Option<PolicyDelegation>,
    pub credential: Option<CredentialSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataAccess {
    pub scope: String,
    pub access: Access,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolAccess {
    pub tool: String,
    pub allowed: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDelegation {
    pub allowed: bool,
    #[serde(default)]
    pub max_depth: u8,
    #[serde(default)]
    pub allowed_targets: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub rotation_days: Option<u32>,
    pub expires: Option<String>,
}

/// One agent as a file declares it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentDoc {
    id: Option<String>,
    team: Option<String>,
    sponsor: Option<String>,
    risk_tier: Option<u8>,
    environment: Option<Environment>,
    purpose: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    auth_method: Option<crate::model::AuthMethod>,
    jwks: Option<serde_json::Value>,
    /// Taken at registration only: later reviews set it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    last_review_at: Option<time::OffsetDateTime>,
    delegation: Option<Delegation>,
    federated: Option<FederatedSubject>,
    #[serde(default)]
    may_assert_users: bool,
    max_ttl_secs: Option<u64>,
    agent_policy: Option<AgentPolicy>,
}

/// A file of several agents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManyDoc {
    agents: Vec<AgentDoc>,
}

/// One declared agent: what the registry should hold, the scopes it is
/// allowed and denied, and where it came from.
#[derive(Debug, Clone)]
pub struct Declared {
    pub spec: AgentSpec,
    pub file: String,
    /// The line its declaration starts on.
    pub line: usize,
    /// SHA-256 of the file's content.
    pub sha256: String,
    /// Scopes its `agent_policy` allows and denies (`None`: no block, no
    /// generated policy).
    pub allowed: Option<BTreeSet<String>>,
    pub denied: BTreeSet<String>,
}

fn is_yaml(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml")
}

/// Parses `text` (TOML or YAML by file name) as `T`, with errors that say
/// where without quoting the file.
fn parse<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> Result<T, String> {
    if is_yaml(name) {
        yaml_serde::from_str(text)
            .map_err(|e| format!("`{name}`: {}", crate::config::describe_yaml_error(&e)))
    } else {
        toml::from_str(text)
            .map_err(|e| format!("`{name}`: {}", crate::config::describe_toml_error(&e, text)))
    }
}

/// The first line (1-based) that starts with `key` (after indentation and
/// a YAML `- `), else 1.
pub fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with(['=', ':'])
        })
        .map_or(1, |i| i + 1)
}

/// The first line (1-based) that mentions `needle` outside a comment, else 1.
fn line_containing(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| !l.trim_start().starts_with('#') && l.contains(needle))
        .map_or(1, |i| i + 1)
}

/// The agent files and mapping table of a folder (not its subfolders), by
/// file name: what `plan`, `apply` and start-up seeding read.
pub fn read_folder(dir: &std::path::Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".toml") || is_yaml(&name) {
            files.insert(name, std::fs::read_to_string(&path)?);
        }
    }
    Ok(files)
}

/// Reads the mapping table from `files`, if there is one.
pub fn mapping(files: &BTreeMap<String, String>) -> Result<Mapping, String> {
    let found: Vec<&String> = files
        .keys()
        .filter(|k| MAPPING_FILES.iter().any(|m| base(k) == *m))
        .collect();
    match found.as_slice() {
        [] => Ok(Mapping::default()),
        [one] => parse(one, &files[*one]),
        more => Err(format!(
            "more than one mapping file: {}",
            more.iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Every agent the files declare, checked against the mapping and the
/// configured scopes.
pub fn declared(
    files: &BTreeMap<String, String>,
    mapping: &Mapping,
    scopes: &BTreeSet<String>,
) -> Result<Vec<Declared>, String> {
    // Every scope the mapping names must exist.
    for (kind, table) in [("actions", &mapping.actions), ("tools", &mapping.tools)] {
        for (name, list) in table {
            if let Some(s) = list.iter().find(|s| !scopes.contains(*s)) {
                return Err(format!(
                    "mapping `{kind}.{name}`: no scope `{}` is configured",
                    crate::limits::claimed_label(s)
                ));
            }
        }
    }
    for (name, d) in &mapping.data {
        if let Some(s) = d.read.iter().chain(&d.write).find(|s| !scopes.contains(*s)) {
            return Err(format!(
                "mapping `data.{name}`: no scope `{}` is configured",
                crate::limits::claimed_label(s)
            ));
        }
    }
    let mut out = Vec::new();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for (name, text) in files {
        if MAPPING_FILES.contains(&base(name)) || !(name.ends_with(".toml") || is_yaml(name)) {
            continue;
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(format!(
                "file `{}`: names are letters, digits, `.`, `_`, `-` and `/`",
                crate::limits::claimed_label(name)
            ));
        }
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        let value: serde_json::Value = parse(name, text)?;
        let docs: Vec<AgentDoc> = if value.get("agents").is_some() {
            parse::<ManyDoc>(name, text)?.agents
        } else {
            vec![parse::<AgentDoc>(name, text)?]
        };
        for doc in docs {
            let d = declare(name, text, &sha256, doc, mapping)?;
            if let Some(other) = ids.insert(d.spec.id.clone(), name.clone()) {
                return Err(format!(
                    "agent `{}` is declared in both `{other}` and `{name}`",
                    d.spec.id
                ));
            }
            out.push(d);
        }
    }
    Ok(out)
}

fn declare(
    file: &str,
    text: &str,
    sha256: &str,
    doc: AgentDoc,
    mapping: &Mapping,
) -> Result<Declared, String> {
    let p = doc.agent_policy.clone().unwrap_or_default();
    let pick = |what: &str, a: Option<String>, b: Option<String>| match (a, b) {
        (Some(x), Some(y)) if x != y => Err(format!(
            "`{file}` line {}: `{what}` and `agent_policy.{what}` differ",
            line_of(text, what)
        )),
        (x, y) => Ok(x.or(y)),
    };
    let id_key = if doc.id.is_some() { "id" } else { "agent_id" };
    let id = pick("id", doc.id.clone(), p.agent_id.clone())?
        .ok_or_else(|| format!("`{file}`: an agent needs an `id` (or `agent_policy.agent_id`)"))?;
    let line = line_of(text, id_key);
    let at = |key: &str| format!("`{file}` line {}", line_of(text, key));
    let sponsor = pick("sponsor", doc.sponsor.clone(), p.sponsor.clone())?
        .ok_or_else(|| format!("{}: agent `{id}` needs a `sponsor`", at("agent_policy")))?;
    let risk_tier = match (doc.risk_tier, p.risk_tier) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "{}: `risk_tier` and `agent_policy.risk_tier` differ",
                at("risk_tier")
            ));
        }
        (a, b) => a
            .or(b)
            .ok_or_else(|| format!("`{file}`: agent `{id}` needs a `risk_tier` (1, 2 or 3)"))?,
    };
    let need = |v: Option<String>, key: &str| {
        v.ok_or_else(|| format!("`{file}`: agent `{id}` needs `{key}`"))
    };
    let mut labels = doc.labels.clone();
    labels.insert(MANAGED_LABEL.0.into(), MANAGED_LABEL.1.into());
    let mut delegation = doc.delegation.clone().unwrap_or_default();
    if let Some(d) = &p.delegation {
        if doc.delegation.is_some() {
            return Err(format!(
                "{}: both `delegation` and `agent_policy.delegation` are given",
                at("delegation")
            ));
        }
        delegation = if d.allowed {
            Delegation {
                max_depth: d.max_depth.max(1),
                targets: d.allowed_targets.clone(),
            }
        } else {
            Delegation::default()
        };
    }
    if let Some(c) = &p.credential {
        if !matches!(
            c.kind.as_str(),
            "oauth2_client_credentials" | "private_key_jwt"
        ) {
            return Err(format!(
                "{}: `credential.type` must be `oauth2_client_credentials` (private_key_jwt client assertions)",
                at("type")
            ));
        }
        if let Some(days) = c.rotation_days {
            labels.insert("credential_rotation_days".into(), days.to_string());
        }
        if let Some(exp) = &c.expires {
            time::OffsetDateTime::parse(exp, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    format!(
                        "{}: `credential.expires` must be an RFC 3339 time",
                        at("expires")
                    )
                })?;
            labels.insert("credential_expires".into(), exp.clone());
        }
    }
    let spec = AgentSpec {
        id: id.clone(),
        team: need(doc.team.clone(), "team")?,
        sponsor,
        risk_tier,
        environment: doc
            .environment
            .ok_or_else(|| format!("`{file}`: agent `{id}` needs `environment`"))?,
        purpose: need(doc.purpose.clone(), "purpose")?,
        labels,
        auth_method: doc
            .auth_method
            .unwrap_or(crate::model::AuthMethod::PrivateKeyJwt),
        jwks: doc
            .jwks
            .clone()
            .unwrap_or_else(|| serde_json::json!({ "keys": [] })),
        last_review_at: doc.last_review_at,
        delegation,
        federated: doc.federated.clone(),
        may_assert_users: doc.may_assert_users,
        max_ttl_secs: doc.max_ttl_secs,
    };
    spec.check()
        .map_err(|e| format!("`{file}` line {line}: agent `{id}`: {e}"))?;
    let (allowed, denied) = match &doc.agent_policy {
        None => (None, BTreeSet::new()),
        Some(p) => {
            let (a, d) = scopes_of(p, mapping, file, text)?;
            (Some(a), d)
        }
    };
    Ok(Declared {
        spec,
        file: file.to_owned(),
        line,
        sha256: sha256.to_owned(),
        allowed,
        denied,
    })
}

/// The scopes an `agent_policy` allows and denies, through the mapping.
fn scopes_of(
    p: &AgentPolicy,
    m: &Mapping,
    file: &str,
    text: &str,
) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
    let unknown = |kind: &str, name: &str| {
        format!(
            "`{file}` line {}: {kind} `{}` is not in the mapping table ({})",
            line_containing(text, name),
            crate::limits::claimed_label(name),
            MAPPING_FILES[0]
        )
    };
    let mut allowed = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for a in &p.allowed_actions {
        allowed.extend(
            m.actions
                .get(a)
                .ok_or_else(|| unknown("action", a))?
                .iter()
                .cloned(),
        );
    }
    for a in &p.denied_actions {
        denied.extend(
            m.actions
                .get(a)
                .ok_or_else(|| unknown("action", a))?
                .iter()
                .cloned(),
        );
    }
    for t in &p.tool_access {
        let s = m
            .tools
            .get(&t.tool)
            .ok_or_else(|| unknown("tool", &t.tool))?;
        if t.allowed { &mut allowed } else { &mut denied }.extend(s.iter().cloned());
    }
    for d in &p.data_access {
        let s = m
            .data
            .get(&d.scope)
            .ok_or_else(|| unknown("data scope", &d.scope))?;
        match d.access {
            Access::Read => allowed.extend(s.read.iter().cloned()),
            Access::Write => allowed.extend(s.read.iter().chain(&s.write).cloned()),
            Access::None => denied.extend(s.read.iter().chain(&s.write).cloned()),
        }
    }
    if let Some(both) = allowed.intersection(&denied).next() {
        return Err(format!(
            "`{file}` line {}: scope `{both}` is both allowed and denied by this agent's policy",
            line_of(text, "agent_policy")
        ));
    }
    Ok((allowed, denied))
}
