use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use keygate_provider_api::{Provider, RevokeOutcome, Verification};
use serde_json::json;

use super::*;

fn reason(v: &Verification) -> (bool, Option<&str>) {
    (v.valid, v.reason.as_deref())
}

fn b64_json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn decode_part(token: &str, i: usize) -> Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn jwt_svid_lifecycle() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let req = jwt_req("lease-jwt-1", json!("billing-api"));
    let issued = ca.issue(&req).await.unwrap();
    let cred = &issued.credential;
    let token = secret(cred, "token");
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/agent/{AGENT}");
    assert_eq!(public(cred, "spiffe_id"), spiffe_id);
    assert_eq!(public(cred, "jti"), req.lease_id);
    assert!(issued.expires_at <= req.expires_at);
    assert_eq!(
        issued.handle.0,
        json!({"kind": "jwt_svid", "jti": req.lease_id, "expires_at": issued.expires_at.unix_timestamp()})
    );

    let header = decode_part(&token, 0);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], ca.jwt_key_id());
    let claims = decode_part(&token, 1);
    assert_eq!(claims["sub"], spiffe_id.as_str());
    assert_eq!(claims["aud"], json!(["billing-api"]));
    assert_eq!(claims["jti"], req.lease_id.as_str());
    assert_eq!(claims["exp"], req.expires_at.unix_timestamp());
    assert!(claims["iat"].as_i64().unwrap() <= OffsetDateTime::now_utc().unix_timestamp());

    // A relying party with only the served JWKS accepts the token.
    let (ct, body) = doc(&ca, "jwks.json").await;
    assert_eq!(ct, "application/json");
    let jwks: JwkSet = serde_json::from_slice(&body).unwrap();
    let jwk = jwks.find(ca.jwt_key_id()).unwrap();
    let raw: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (
            raw["keys"][0]["use"].as_str(),
            raw["keys"][0]["alg"].as_str()
        ),
        (Some("sig"), Some("ES256"))
    );
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&["billing-api"]);
    jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .unwrap();

    let presented = json!({"jwt_svid": token, "audience": "billing-api"});
    let v = ca.verify(&presented).await.unwrap();
    assert_eq!(reason(&v), (true, None));
    assert_eq!(v.subject.as_deref(), Some(spiffe_id.as_str()));
    assert_eq!(v.expires_at, Some(issued.expires_at));
    let v = ca
        .verify(&json!({"jwt_svid": token, "audience": "ledger"}))
        .await
        .unwrap();
    assert_eq!(reason(&v), (false, Some("wrong_audience")));

    let revoke = revoke_req(&req, Some(issued.handle.clone()));
    assert_eq!(ca.revoke(&revoke).await.unwrap(), RevokeOutcome::Revoked);
    assert_eq!(
        reason(&ca.verify(&presented).await.unwrap()),
        (false, Some("revoked"))
    );
    assert_eq!(
        ca.revoke(&revoke).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
    let (_, body) = doc(&ca, "revoked.json").await;
    let revoked: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(revoked, json!({"serials": [], "jtis": [req.lease_id]}));
}

#[tokio::test]
async fn jwt_audience_rules() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let both = ca
        .issue(&jwt_req("lease-aud-1", json!(["billing-api", "ledger"])))
        .await
        .unwrap();
    let token = secret(&both.credential, "token");
    for aud in ["billing-api", "ledger"] {
        let v = ca
            .verify(&json!({"jwt_svid": token, "audience": aud}))
            .await
            .unwrap();
        assert!(v.valid, "{aud}");
    }
    assert_invalid_params(
        ca.issue(&jwt_req("lease-aud-2", json!("payroll"))).await,
        "`payroll`",
    );
    assert_invalid_params(
        ca.issue(&jwt_req("lease-aud-3", json!([]))).await,
        "`audience`",
    );
    let mut no_aud = jwt_req("lease-aud-4", json!("ledger"));
    no_aud.request_params = json!({});
    assert_invalid_params(ca.issue(&no_aud).await, "`audience`");
    // Without an allow-list any audience goes.
    let open = issue_req(
        "lease-aud-5",
        json!({"kind": "jwt_svid"}),
        json!({"audience": "anything"}),
        std::time::Duration::from_secs(60),
    );
    assert!(ca.issue(&open).await.is_ok());
}

#[tokio::test]
async fn jwt_verify_rejects_forgeries() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let issued = ca
        .issue(&jwt_req("lease-forge", json!("ledger")))
        .await
        .unwrap();
    let token = secret(&issued.credential, "token");
    let parts: Vec<&str> = token.split('.').collect();
    let check = |t: String| {
        let ca = &ca;
        async move {
            ca.verify(&json!({"jwt_svid": t, "audience": "billing-api"}))
                .await
                .unwrap()
        }
    };

    // Same signature, audience swapped in the payload.
    let mut claims = decode_part(&token, 1);
    claims["aud"] = json!(["billing-api"]);
    let swapped = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);
    assert_eq!(
        reason(&check(swapped).await),
        (false, Some("bad_signature"))
    );

    let none = format!(
        "{}.{}.",
        b64_json(&json!({"alg": "none", "typ": "JWT"})),
        b64_json(&claims)
    );
    assert_eq!(reason(&check(none).await), (false, Some("bad_signature")));

    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    assert_eq!(reason(&check(hs).await), (false, Some("bad_signature")));

    // Signed by another local CA's key.
    let other_fx = Fixture::new();
    let other = other_fx.open().await;
    let foreign = other
        .issue(&jwt_req("lease-forge", json!("billing-api")))
        .await
        .unwrap();
    assert_eq!(
        reason(&check(secret(&foreign.credential, "token")).await),
        (false, Some("bad_signature"))
    );

    for bad in ["", "a.b", "a.b.c", "x.y.z.w", "e30.e30.AAAA"] {
        assert_eq!(
            reason(&check(bad.to_owned()).await),
            (false, Some("malformed")),
            "{bad}"
        );
    }
    // A readable ES256 header with a signature of the wrong size.
    let short_sig = format!("{}.e30.AAAA", parts[0]);
    assert_eq!(
        reason(&check(short_sig).await),
        (false, Some("bad_signature"))
    );
    for presented in [
        json!({"jwt_svid": token}),
        json!({"jwt_svid": 1, "audience": "a"}),
        json!([token]),
    ] {
        let v = ca.verify(&presented).await.unwrap();
        assert_eq!(reason(&v), (false, Some("malformed")));
    }
}

#[tokio::test]
async fn jwt_expired() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let now = OffsetDateTime::now_utc();
    let aud = vec!["ledger".to_owned()];
    let token = ca
        .jwt
        .sign(
            "spiffe://example.org/agent/a",
            &aud,
            "lease-old",
            now - time::Duration::seconds(5),
            now - time::Duration::seconds(65),
        )
        .unwrap();
    use secrecy::ExposeSecret as _;
    let v = ca
        .verify(&json!({"jwt_svid": token.expose_secret(), "audience": "ledger"}))
        .await
        .unwrap();
    assert_eq!(reason(&v), (false, Some("expired")));
    assert_eq!(v.subject.as_deref(), Some("spiffe://example.org/agent/a"));
}
