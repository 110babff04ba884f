#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

fn message(r: Result<impl std::fmt::Debug, ProviderError>) -> String {
    match r {
        Err(ProviderError::InvalidParams(m)) => m,
        other => panic!("expected invalid params, got {other:?}"),
    }
}

#[test]
fn session_names_and_source_identities() {
    for ok in [
        "tk_0195f3c2a8b47c3e9d8f6a1b2c3d4e5f",
        "ab",
        "a+b=c,d.e@f-g_h",
    ] {
        assert!(role_session_name(ok).is_ok(), "{ok}");
        assert!(source_identity(ok).is_ok(), "{ok}");
    }
    for bad in [
        "a",
        &"x".repeat(65),
        "has space",
        "slash/y",
        "colon:x",
        "é-agent",
    ] {
        assert!(role_session_name(bad).is_err(), "{bad}");
        assert!(source_identity(bad).is_err(), "{bad}");
    }
    assert!(message(source_identity("a b")).contains("`a b`"));
    // `aws:` cannot pass the charset anyway, but the prefix rule is AWS's own.
    assert!(source_identity("aws:x").is_err());
}

#[test]
fn durations() {
    assert_eq!(session_duration(900, 3600).unwrap(), 900);
    assert_eq!(session_duration(3600, 3600).unwrap(), 3600);
    let m = message(session_duration(899, 3600));
    assert!(m.contains("at least 900 s") && m.contains("899 s"), "{m}");
    assert!(message(session_duration(3601, 3600)).contains("`max_session_secs`"));
    assert!(session_limits(3600, 900).is_ok());
    assert!(session_limits(43_200, 43_200).is_ok());
    assert!(message(session_limits(899, 900)).contains("`max_session_secs`"));
    assert!(message(session_limits(43_201, 900)).contains("`max_session_secs`"));
    assert!(message(session_limits(3600, 600)).contains("at least 900 s"));
    assert!(message(session_limits(3600, 7200)).contains("longer than `max_session_secs`"));
}

#[test]
fn session_policies() {
    let doc = r#"{ "Version": "2012-10-17",
        "Statement": [ { "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*" } ] }"#;
    let compact = session_policy(doc).unwrap();
    assert!(!compact.contains(' '), "{compact}");
    assert!(message(session_policy("{not json")).contains("not valid json"));
    assert!(message(session_policy(r#"{"Version": "2012-10-17"}"#)).contains("`Statement`"));
    // Whitespace does not count; content does.
    let padded = format!("{}{}", " ".repeat(5000), doc);
    assert!(session_policy(&padded).is_ok());
    let resources: Vec<String> = (0..80)
        .map(|i| format!("arn:aws:s3:::bucket-number-{i}/*"))
        .collect();
    let big = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": "s3:GetObject", "Resource": resources }],
    });
    let m = message(session_policy(&big.to_string()));
    assert!(m.contains("aws allows 2048"), "{m}");
}

#[test]
fn policy_arn_lists() {
    let arn = |i: usize| format!("arn:aws:iam::123456789012:policy/p{i}");
    let ten: Vec<String> = (0..10).map(arn).collect();
    assert!(policy_arns(&ten).is_ok());
    let eleven: Vec<String> = (0..11).map(arn).collect();
    assert!(message(policy_arns(&eleven)).contains("aws allows 10"));
    assert!(policy_arns(&["arn:aws:iam::aws:policy/ReadOnlyAccess".into()]).is_ok());
    assert!(policy_arns(&["ReadOnlyAccess".into()]).is_err());
    assert!(policy_arns(&["arn:aws:iam::123456789012:role/not-a-policy".into()]).is_err());
}

#[test]
fn role_arns() {
    assert_eq!(
        role_name("arn:aws:iam::123456789012:role/reports").unwrap(),
        "reports"
    );
    assert_eq!(
        role_name("arn:aws-us-gov:iam::123456789012:role/team/a/reports-ro").unwrap(),
        "reports-ro"
    );
    for bad in [
        "reports",
        "arn:aws:iam::123456789012:user/bob",
        "arn:aws:iam::12345:role/x",
        "arn:aws:sts::123456789012:role/x",
        "arn:aws:iam:us-east-1:123456789012:role/x",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:iam::123456789012:role/bad name",
    ] {
        assert!(role_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn tags() {
    let t = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert!(
        session_tags(&[
            t("agent", "a-1"),
            t("sponsor", "x@example.com"),
            t("team", "Équipe 7")
        ])
        .is_ok()
    );
    assert!(session_tags(&[t("empty", "")]).is_ok());
    let m = message(session_tags(&[t("team", "red team!")]));
    assert!(m.contains("`team`") && m.contains("`red team!`"), "{m}");
    assert!(session_tags(&[t("team", &"x".repeat(257))]).is_err());
    assert!(session_tags(&[t("", "x")]).is_err());
    assert!(session_tags(&[t(&"k".repeat(129), "x")]).is_err());
    assert!(message(session_tags(&[t("aws:team", "x")])).contains("`aws:`"));
    assert!(message(session_tags(&[t("Team", "x"), t("team", "y")])).contains("twice"));
    let many: Vec<_> = (0..51).map(|i| t(&format!("k{i}"), "v")).collect();
    assert!(message(session_tags(&many)).contains("aws allows 50"));
    assert!(session_tags(&many[..50]).is_ok());
}
