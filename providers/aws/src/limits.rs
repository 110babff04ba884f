//! AWS's limits on AssumeRole parameters, checked locally so a request AWS
//! would reject fails with a message naming what is wrong (and so the limits
//! hold against test servers that do not check them).

use keygate_provider_api::ProviderError;

/// Shortest STS session AWS issues.
pub(crate) const MIN_SESSION_SECS: u64 = 900;
/// Longest STS session AWS issues (a role's `MaxSessionDuration` ceiling).
pub(crate) const MAX_SESSION_SECS: u64 = 43_200;
/// AWS's default `MaxSessionDuration`, and the cap for role chaining.
pub(crate) const DEFAULT_MAX_SESSION_SECS: u64 = 3_600;
/// Longest inline session policy (plaintext characters).
pub(crate) const MAX_SESSION_POLICY_CHARS: usize = 2_048;
/// Most managed policy ARNs one AssumeRole takes.
pub(crate) const MAX_POLICY_ARNS: usize = 10;
/// Most session tags one AssumeRole takes.
pub(crate) const MAX_SESSION_TAGS: usize = 50;
const MAX_TAG_KEY_CHARS: usize = 128;
const MAX_TAG_VALUE_CHARS: usize = 256;

fn invalid(m: String) -> ProviderError {
    ProviderError::InvalidParams(m)
}

/// `[\w+=,.@-]`: the characters of role session names, source identities
/// and IAM policy names.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// A RoleSessionName: 2–64 characters of `[\w+=,.@-]`.
pub(crate) fn role_session_name(name: &str) -> Result<(), ProviderError> {
    if !(2..=64).contains(&name.len()) || !name.chars().all(is_name_char) {
        return Err(invalid(format!(
            "`{name}` cannot be an aws role session name (2-64 characters of letters, digits and `_+=,.@-`)"
        )));
    }
    Ok(())
}

/// A SourceIdentity: 2–64 characters of `[\w+=,.@-]`, not starting `aws:`.
pub(crate) fn source_identity(id: &str) -> Result<(), ProviderError> {
    if !(2..=64).contains(&id.len()) || !id.chars().all(is_name_char) {
        return Err(invalid(format!(
            "agent id `{id}` cannot be an aws source identity (2-64 characters of letters, digits and `_+=,.@-`)"
        )));
    }
    if id.to_ascii_lowercase().starts_with("aws:") {
        return Err(invalid(format!(
            "agent id `{id}` cannot be an aws source identity (it starts with `aws:`)"
        )));
    }
    Ok(())
}

/// The session duration for a lease of `ttl_secs`: AWS's 900 s minimum is
/// refused rather than raised, because a longer session would outlive the
/// lease the broker granted.
pub(crate) fn session_duration(ttl_secs: u64, max_session_secs: u64) -> Result<i32, ProviderError> {
    if ttl_secs < MIN_SESSION_SECS {
        return Err(invalid(format!(
            "aws sts sessions last at least {MIN_SESSION_SECS} s, but this lease was granted {ttl_secs} s \
             (the requested ttl, capped by the scope's max ttl and the task's remaining time); \
             ask for a ttl of at least {MIN_SESSION_SECS} s in a task with that much time left"
        )));
    }
    if ttl_secs > max_session_secs {
        return Err(invalid(format!(
            "a ttl of {ttl_secs} s is longer than the scope's `max_session_secs` ({max_session_secs} s)"
        )));
    }
    i32::try_from(ttl_secs).map_err(|_| invalid(format!("a ttl of {ttl_secs} s is too long")))
}

/// A scope's `max_session_secs`, and its max ttl against it.
pub(crate) fn session_limits(
    max_session_secs: u64,
    max_ttl_secs: u64,
) -> Result<(), ProviderError> {
    if !(MIN_SESSION_SECS..=MAX_SESSION_SECS).contains(&max_session_secs) {
        return Err(invalid(format!(
            "`max_session_secs` must be between {MIN_SESSION_SECS} and {MAX_SESSION_SECS}, got {max_session_secs}"
        )));
    }
    if max_ttl_secs < MIN_SESSION_SECS {
        return Err(invalid(format!(
            "`max_ttl_secs` is {max_ttl_secs}, but aws sts sessions last at least {MIN_SESSION_SECS} s, \
             so no lease of this scope could be issued"
        )));
    }
    if max_ttl_secs > max_session_secs {
        return Err(invalid(format!(
            "`max_ttl_secs` ({max_ttl_secs}) is longer than `max_session_secs` ({max_session_secs}); \
             raise the role's maximum session duration and `max_session_secs` together, or lower the ttl"
        )));
    }
    Ok(())
}

/// A session policy: JSON with a `Statement`, at most 2,048 characters once
/// whitespace is removed. Returns the compact text sent to AWS.
pub(crate) fn session_policy(text: &str) -> Result<String, ProviderError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("`session_policy` is not valid json: {e}")))?;
    if v.get("Statement").is_none() {
        return Err(invalid(
            "`session_policy` must be an iam policy document with a `Statement`".into(),
        ));
    }
    let compact = v.to_string();
    let chars = compact.chars().count();
    if chars > MAX_SESSION_POLICY_CHARS {
        return Err(invalid(format!(
            "`session_policy` is {chars} characters without whitespace; aws allows {MAX_SESSION_POLICY_CHARS}"
        )));
    }
    Ok(compact)
}

/// Managed session policy ARNs: at most 10, each an `arn:` of 20–2,048 characters.
pub(crate) fn policy_arns(arns: &[String]) -> Result<(), ProviderError> {
    if arns.len() > MAX_POLICY_ARNS {
        return Err(invalid(format!(
            "`policy_arns` lists {} policies; aws allows {MAX_POLICY_ARNS}",
            arns.len()
        )));
    }
    for arn in arns {
        if !arn.starts_with("arn:")
            || !(20..=2048).contains(&arn.len())
            || !arn.contains(":policy/")
        {
            return Err(invalid(format!("`{arn}` is not an iam policy arn")));
        }
    }
    Ok(())
}

/// A role ARN (`arn:<partition>:iam::<account>:role/<path/>name`). Returns
/// the role's name, which IAM calls take.
pub(crate) fn role_name(arn: &str) -> Result<&str, ProviderError> {
    let bad = || invalid(format!("`{arn}` is not an iam role arn"));
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    if partition.is_empty() || account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let name = resource
        .strip_prefix("role/")
        .and_then(|path| path.rsplit('/').next())
        .filter(|n| !n.is_empty() && n.len() <= 64 && n.chars().all(is_name_char))
        .ok_or_else(bad)?;
    Ok(name)
}

/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]`: the characters of session tag keys and values.
fn is_tag_char(c: char) -> bool {
    c.is_alphabetic()
        || c.is_numeric()
        || (c.is_whitespace() && !c.is_control())
        || "_.:/=+-@".contains(c)
}

/// Session tags: at most 50, keys 1–128 and values 0–256 characters of the
/// tag alphabet, keys unique ignoring case and not starting `aws:`.
pub(crate) fn session_tags(tags: &[(String, String)]) -> Result<(), ProviderError> {
    if tags.len() > MAX_SESSION_TAGS {
        return Err(invalid(format!(
            "{} session tags; aws allows {MAX_SESSION_TAGS} (keygate sets 5: agent, team, sponsor, task, environment)",
            tags.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in tags {
        let key_len = key.chars().count();
        if !(1..=MAX_TAG_KEY_CHARS).contains(&key_len) || !key.chars().all(is_tag_char) {
            return Err(invalid(format!(
                "session tag key `{key}` must be 1-{MAX_TAG_KEY_CHARS} letters, digits, spaces or `_.:/=+-@`"
            )));
        }
        if key.to_lowercase().starts_with("aws:") {
            return Err(invalid(format!(
                "session tag key `{key}` starts with `aws:`, which aws reserves"
            )));
        }
        if !seen.insert(key.to_lowercase()) {
            return Err(invalid(format!(
                "session tag key `{key}` appears twice (aws ignores case in tag keys)"
            )));
        }
        if value.chars().count() > MAX_TAG_VALUE_CHARS || !value.chars().all(is_tag_char) {
            return Err(invalid(format!(
                "session tag `{key}`: value `{value}` must be at most {MAX_TAG_VALUE_CHARS} letters, digits, spaces or `_.:/=+-@`"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "limits/tests.rs"]
mod tests;
