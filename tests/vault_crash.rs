//! An operator's bad day against a real OpenBao on raft: Keygate killed
//! (-9) again and again while it mints Vault tokens, restarted at once
//! (often in the same second). Afterwards every lease is resolved, no token
//! carrying a Keygate lease is alive unless its lease is, and Keygate's own
//! logins do not pile up. Also: agents' tokens outlive Keygate's login, a
//! refused path does not cost a login, and a non-renewable token's renewal
//! is a clear 400.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::peers::Storage;
use common::vault::{VaultPeers, broker_setup};
use common::{TestAgent, TestBroker};
use serde_json::{Value, json};

/// Live tokens of Keygate's AppRole (its own logins).
async fn keygate_logins(peers: &VaultPeers) -> Vec<Value> {
    peers
        .live_tokens()
        .await
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| {
            d["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("auth/approle/login"))
        })
        .collect()
}

#[tokio::test]
async fn a_crash_loop_leaves_no_vault_token_or_login_behind() {
    let peers = VaultPeers::start(Storage::Raft).await;
    let mut b = TestBroker::start_with(broker_setup(&peers)).await;
    let agent = TestAgent::new("crashy", "ES256");
    b.register(&agent, "platform").await;
    for cycle in 0..20u64 {
        let s = b.token_ttl(&agent, Some(3600)).await;
        let minted = Arc::new(AtomicUsize::new(0));
        let mut storm = Vec::new();
        for _ in 0..6 {
            let (http, url, token) = (b.http.clone(), b.url("/v1/credentials"), s.token.clone());
            let minted = minted.clone();
            storm.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let r = http
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&json!({ "scope": "vault-token", "ttl": 600 }))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 201 => {
                            minted.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        // The kill lands mid-storm however slow the machine: after this
        // cycle's first credential, plus a varying delay.
        common::eventually("a credential minted this cycle", || {
            let minted = minted.clone();
            async move { (minted.load(Ordering::SeqCst) > 0).then_some(()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(17 * (cycle % 7))).await;
        b.restart().await; // kill -9, then start on the same state at once
        for h in storm {
            let _ = h.await;
        }
    }
    // Within 30 s of the last restart: nothing pending or being revoked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let leases = loop {
        let leases = b.leases(&format!("agent={}", agent.id)).await;
        let open: Vec<&Value> = leases
            .iter()
            .filter(|l| l["state"] == "pending" || l["state"] == "revoking")
            .collect();
        if open.is_empty() {
            break leases;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unresolved after 30 s: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(leases.len() >= 20, "the storm minted: {}", leases.len());
    // No live token whose lease Keygate does not hold as active.
    let active: BTreeSet<String> = leases
        .iter()
        .filter(|l| l["state"] == "active")
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    let strays: Vec<String> = peers
        .live_keygate_tokens()
        .await
        .into_iter()
        .filter(|l| !active.contains(l))
        .collect();
    assert!(
        strays.is_empty(),
        "tokens alive without an active lease: {strays:?}"
    );
    // At most one live Keygate login: the running process's.
    let logins = keygate_logins(&peers).await;
    assert!(
        logins.len() <= 1,
        "{} keygate logins alive: {logins:?}",
        logins.len()
    );
    // Resolved orphans say why.
    let orphans = b.audit("action=lease.revoked").await;
    assert!(
        orphans.iter().all(|e| e["details"]["result"].is_string()),
        "{orphans:?}"
    );
}

#[tokio::test]
async fn agents_tokens_live_their_lease_and_refusals_cost_no_login() {
    let peers = VaultPeers::start(Storage::Dev).await;
    let mut setup = broker_setup(&peers);
    // A scope whose policy Keygate's role may not grant, and a non-renewable one.
    setup.scopes = Some(format!(
        "{}\n[[scopes]]\nname = \"vault-forbidden\"\nprovider = \"vault\"\nmax_ttl_secs = 600\nparams = {{ kind = \"kv\", path = \"forbidden/x\" }}\n\n[[scopes]]\nname = \"vault-once\"\nprovider = \"vault\"\nmax_ttl_secs = 600\nparams = {{ kind = \"token\", policies = [\"agent-reader\"], renewable = false }}\n\n[[scopes]]\nname = \"vault-writer\"\nprovider = \"vault\"\nmax_ttl_secs = 600\nparams = {{ kind = \"token\", policies = [\"agent-writer\"] }}\n",
        setup.scopes.unwrap()
    ));
    let mut b = TestBroker::start_with(setup).await;
    // A scope granting a policy the token role does not allow: said once,
    // clearly, at start.
    let warned = common::eventually("the start-up warning", || async {
        b.log()
            .lines()
            .find(|l| l.contains("vault-writer") && l.contains("agent-writer"))
            .map(str::to_owned)
    })
    .await;
    assert!(
        warned.contains("token role `keygate-agent` allows"),
        "{warned}"
    );
    let agent = TestAgent::new("lives", "ES256");
    b.register(&agent, "platform").await;
    let s = b.token_ttl(&agent, Some(3600)).await;
    let tok = b
        .credential(&s.token, "vault-token", Some(600), None)
        .await
        .expect(201);
    let agent_token = tok["credential"]["token"].as_str().unwrap().to_owned();

    // Six refused reads: errors, and no new Keygate login each.
    let before = keygate_logins(&peers).await.len();
    for _ in 0..6 {
        let r = b
            .credential(&s.token, "vault-forbidden", Some(60), None)
            .await;
        assert_eq!(r.status, 502, "{}", r.text);
    }
    assert_eq!(keygate_logins(&peers).await.len(), before);

    // Renewal of a non-renewable token: 400 not_renewable, not 502.
    let once = b
        .credential(&s.token, "vault-once", Some(600), None)
        .await
        .expect(201);
    let r = b
        .post(
            &format!(
                "/v1/credentials/{}/renew",
                once["lease_id"].as_str().unwrap()
            ),
            Some(&s.token),
            &json!({ "increment": 60 }),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "not_renewable");

    // A graceful stop revokes Keygate's login; the agent's token lives on.
    b.stop_gracefully().await;
    assert!(
        keygate_logins(&peers).await.is_empty(),
        "the login is revoked"
    );
    assert!(
        peers.token_works(&agent_token).await,
        "the agent's token lives its lease, not Keygate's login"
    );
    // Restarted, Keygate still revokes it by accessor at release.
    b.restart().await;
    let r = b
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/credentials/{}", tok["lease_id"].as_str().unwrap()),
            Some(&s.token),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!peers.token_works(&agent_token).await);
}
