//! Parsing of scope parameters (config) and request parameters (the agent's).
//!
//! Parsed by hand rather than through serde so every mistake gets a message
//! naming the offending key.

use keygate_provider_api::ProviderError;
use serde_json::{Map, Value};

/// What a scope mints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScopeKind {
    /// An X.509-SVID: certificate plus private key.
    X509Svid,
    /// A JWT-SVID, optionally limited to some audiences.
    JwtSvid { audiences: Option<Vec<String>> },
}

/// Parses `[scopes.params]`: `{"kind": "x509_svid"}` or
/// `{"kind": "jwt_svid", "audiences": [...]}`.
pub(crate) fn parse_scope(params: &Value) -> Result<ScopeKind, ProviderError> {
    let obj = params.as_object().ok_or_else(|| {
        invalid("scope params must be a table with a `kind` (`x509_svid` or `jwt_svid`)".into())
    })?;
    let kind = match obj.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(_) => return Err(invalid("scope param `kind` must be a string".into())),
        None => {
            return Err(invalid(
                "scope params need a `kind` (`x509_svid` or `jwt_svid`)".into(),
            ));
        }
    };
    match kind {
        "x509_svid" => {
            only_keys(obj, &["kind"], "scope param", kind)?;
            Ok(ScopeKind::X509Svid)
        }
        "jwt_svid" => {
            only_keys(obj, &["kind", "audiences"], "scope param", kind)?;
            let audiences = match obj.get("audiences") {
                None => None,
                Some(v) => {
                    let list = string_list(v).ok_or_else(|| {
                        invalid(
                            "scope param `audiences` must be a list of non-empty strings".into(),
                        )
                    })?;
                    if list.is_empty() {
                        return Err(invalid(
                            "scope param `audiences` is empty, so nothing could be issued; omit it to allow any audience"
                                .into(),
                        ));
                    }
                    Some(list)
                }
            };
            Ok(ScopeKind::JwtSvid { audiences })
        }
        other => Err(invalid(format!(
            "unknown credential kind `{other}` (expected `x509_svid` or `jwt_svid`)"
        ))),
    }
}

/// X.509-SVID requests take no parameters.
pub(crate) fn check_x509_request(params: &Value) -> Result<(), ProviderError> {
    match params {
        Value::Null => Ok(()),
        Value::Object(obj) => only_keys(obj, &[], "request param", "x509_svid"),
        _ => Err(invalid("request params must be an object".into())),
    }
}

/// The audiences a JWT-SVID request asks for: `{"audience": "a"}` or
/// `{"audience": ["a", "b"]}`, each within the scope's allow-list if it has one.
pub(crate) fn requested_audiences(
    params: &Value,
    allowed: Option<&[String]>,
) -> Result<Vec<String>, ProviderError> {
    let obj = params
        .as_object()
        .ok_or_else(|| invalid("a jwt_svid request needs an `audience` parameter".into()))?;
    only_keys(obj, &["audience"], "request param", "jwt_svid")?;
    let value = obj
        .get("audience")
        .ok_or_else(|| invalid("a jwt_svid request needs an `audience` parameter".into()))?;
    let mut audiences = match value {
        Value::String(s) if !s.is_empty() => vec![s.clone()],
        v => string_list(v).filter(|l| !l.is_empty()).ok_or_else(|| {
            invalid("request param `audience` must be a non-empty string or list of strings".into())
        })?,
    };
    audiences.dedup();
    if let Some(allowed) = allowed
        && let Some(bad) = audiences.iter().find(|a| !allowed.contains(a))
    {
        return Err(invalid(format!(
            "audience `{bad}` is not allowed by this scope"
        )));
    }
    Ok(audiences)
}

/// A JSON array of non-empty strings, or `None` if it is anything else.
fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
        .collect()
}

fn only_keys(
    obj: &Map<String, Value>,
    allowed: &[&str],
    what: &str,
    kind: &str,
) -> Result<(), ProviderError> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(invalid(format!("unknown {what} `{k}` for kind `{kind}`"))),
        None => Ok(()),
    }
}

fn invalid(msg: String) -> ProviderError {
    ProviderError::InvalidParams(msg)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            parse_scope(&json!({"kind": "x509_svid"})).unwrap(),
            ScopeKind::X509Svid
        );
        assert_eq!(
            parse_scope(&json!({"kind": "jwt_svid"})).unwrap(),
            ScopeKind::JwtSvid { audiences: None }
        );
        assert_eq!(
            parse_scope(&json!({"kind": "jwt_svid", "audiences": ["a"]})).unwrap(),
            ScopeKind::JwtSvid {
                audiences: Some(vec!["a".into()])
            }
        );
        let cases = [
            (json!(null), "`kind`"),
            (json!({}), "`kind`"),
            (json!({"kind": 3}), "`kind`"),
            (json!({"kind": "ssh_cert"}), "`ssh_cert`"),
            (json!({"kind": "x509_svid", "ttl": 5}), "`ttl`"),
            (
                json!({"kind": "x509_svid", "audiences": ["a"]}),
                "`audiences`",
            ),
            (json!({"kind": "jwt_svid", "audiences": "a"}), "`audiences`"),
            (json!({"kind": "jwt_svid", "audiences": []}), "`audiences`"),
            (
                json!({"kind": "jwt_svid", "audiences": [""]}),
                "`audiences`",
            ),
        ];
        for (params, needle) in cases {
            let err = parse_scope(&params).unwrap_err();
            assert!(matches!(err, ProviderError::InvalidParams(_)), "{params}");
            assert!(err.to_string().contains(needle), "{params}: {err}");
        }
    }

    #[test]
    fn audiences() {
        let allow = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            requested_audiences(&json!({"audience": "a"}), None).unwrap(),
            vec!["a"]
        );
        assert_eq!(
            requested_audiences(&json!({"audience": ["a", "b"]}), Some(&allow)).unwrap(),
            vec!["a", "b"]
        );
        for bad in [
            json!(null),
            json!({}),
            json!({"audience": ""}),
            json!({"audience": []}),
            json!({"audience": [1]}),
            json!({"audience": "a", "x": 1}),
        ] {
            assert!(requested_audiences(&bad, None).is_err(), "{bad}");
        }
        let err = requested_audiences(&json!({"audience": ["a", "c"]}), Some(&allow)).unwrap_err();
        assert!(err.to_string().contains("`c`"), "{err}");
        assert!(check_x509_request(&json!({})).is_ok());
        assert!(check_x509_request(&json!(null)).is_ok());
        assert!(check_x509_request(&json!({"audience": "a"})).is_err());
    }
}
