//! `keygate policy test`: the shipped policies pass their shipped cases, and
//! a wrong case fails with a message a reviewer can act on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn run(cases: &Path) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["policy", "test"])
        .arg(root.join("config/policies"))
        .arg("--cases")
        .arg(cases)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_shipped_policies_pass_their_cases() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy-cases.toml");
    let (ok, text) = run(&cases);
    assert!(ok, "{text}");
    assert!(text.contains("policy cases passed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn a_wrong_case_fails_readably() {
    let dir = std::env::temp_dir().join(format!("keygate-cases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = dir.join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "tier-3 for half an hour"
agent = { team = "platform", risk_tier = 3, environment = "prod" }
scope = { name = "jwt-svid", provider = "ca", max_ttl = 3600 }
ttl = 1800
expect = "allow"

[[case]]
name = "allowed, but by the policy named"
agent = { team = "platform", risk_tier = 2, environment = "dev" }
scope = { name = "x509-svid", provider = "ca", max_ttl = 3600 }
ttl = 60
expect = "allow"
policy = "finance-x509"
"#,
    )
    .unwrap();
    let (ok, text) = run(&cases);
    assert!(!ok, "{text}");
    assert!(
        text.contains(
            "FAIL  tier-3 for half an hour: expected allow, got deny (decided by tier3-short-ttl)"
        ),
        "{text}"
    );
    assert!(
        text.contains("allow as expected, but not by `finance-x509` (decided by platform-svids)"),
        "{text}"
    );
    assert!(text.contains("2 of 2 policy cases failed"), "{text}");
    // A typo in a case is a clear error, not a silent pass.
    std::fs::write(&cases, "[[case]]\nname = \"x\"\nexpect = \"maybe\"\n").unwrap();
    let (ok, text) = run(&cases);
    assert!(!ok && text.contains("parsing"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
