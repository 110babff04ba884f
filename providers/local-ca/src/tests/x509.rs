use keygate_provider_api::{Provider, Revocability, RevokeOutcome};
use serde_json::json;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

use super::*;
use crate::x509::serial_for_lease;

fn parse_pem(pem: &str) -> Vec<u8> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    pem.contents
}

#[tokio::test]
async fn x509_svid_lifecycle() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let req = x509_req("lease-x509-1");
    let issued = ca.issue(&req).await.unwrap();
    assert_eq!(issued.revocability, Revocability::Revocable);
    assert!(issued.expires_at <= req.expires_at);
    let cred = &issued.credential;
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/agent/{AGENT}");
    assert_eq!(public(cred, "spiffe_id"), spiffe_id);
    assert_eq!(public(cred, "ca_bundle"), ca.ca_certificate_pem());

    let cert_der = parse_pem(&public(cred, "certificate"));
    let (_, cert) = parse_x509_certificate(&cert_der).unwrap();
    let ca_der = parse_pem(ca.ca_certificate_pem());
    let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();

    // SPIFFE X.509-SVID profile.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names = &san.value.general_names;
    assert_eq!(names.len(), 1);
    assert!(matches!(names[0], GeneralName::URI(u) if u == spiffe_id));
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    assert!(cert.validity().not_after.timestamp() <= req.expires_at.unix_timestamp());
    assert_eq!(
        cert.validity().not_after.timestamp(),
        issued.expires_at.unix_timestamp()
    );
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert_eq!(cert.issuer(), ca_cert.subject());

    // Serial: derived from the lease id, and what the handle and field say.
    let serial = hex::encode(serial_for_lease(&req.lease_id));
    assert_eq!(hex::encode(cert.raw_serial()), serial);
    assert_eq!(public(cred, "serial"), serial);
    assert_eq!(issued.handle.0["kind"], "x509_svid");
    assert_eq!(issued.handle.0["serial"], serial.as_str());
    assert_eq!(
        issued.handle.0["expires_at"],
        issued.expires_at.unix_timestamp()
    );
    OffsetDateTime::parse(
        &public(cred, "expires_at"),
        &::time::format_description::well_known::Rfc3339,
    )
    .unwrap();

    // The private key is PKCS#8 and belongs to the certificate.
    let key_pem = secret(cred, "private_key");
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(
        key.public_key_raw(),
        cert.public_key().subject_public_key.data.as_ref()
    );

    let presented = json!({"x509_svid": public(cred, "certificate")});
    let v = ca.verify(&presented).await.unwrap();
    assert!(v.valid, "{v:?}");
    assert_eq!(v.subject.as_deref(), Some(spiffe_id.as_str()));
    assert_eq!(v.expires_at, Some(issued.expires_at));

    let revoke = revoke_req(&req, Some(issued.handle.clone()));
    assert_eq!(ca.revoke(&revoke).await.unwrap(), RevokeOutcome::Revoked);
    let v = ca.verify(&presented).await.unwrap();
    assert_eq!((v.valid, v.reason.as_deref()), (false, Some("revoked")));
    assert_eq!(crl_serials(&ca).await, vec![serial.clone()]);
    assert_eq!(
        ca.revoke(&revoke).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
    assert_eq!(
        ca.revoke(&revoke_req(&req, None)).await.unwrap(),
        RevokeOutcome::Revoked,
        "jti was new"
    );
    assert_eq!(
        ca.revoke(&revoke_req(&req, None)).await.unwrap(),
        RevokeOutcome::AlreadyGone
    );
}

/// The serials in the CA's current CRL, after checking its signature and
/// that the PEM and DER forms agree.
pub(crate) async fn crl_serials(ca: &LocalCa) -> Vec<String> {
    let (ct, der) = doc(ca, "crl.der").await;
    assert_eq!(ct, "application/pkix-crl");
    let (ct, pem) = doc(ca, "crl.pem").await;
    assert_eq!(ct, "application/x-pem-file");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    assert_eq!(pem.label, "X509 CRL");
    let (_, from_pem) = parse_x509_crl(&pem.contents).unwrap();
    let (_, crl) = parse_x509_crl(&der).unwrap();
    assert_eq!(
        from_pem.iter_revoked_certificates().count(),
        crl.iter_revoked_certificates().count()
    );

    let ca_der = parse_pem(ca.ca_certificate_pem());
    let (_, ca_cert) = parse_x509_certificate(&ca_der).unwrap();
    crl.verify_signature(ca_cert.public_key()).unwrap();
    assert_eq!(crl.issuer(), ca_cert.subject());
    assert!(crl.next_update().unwrap().timestamp() > crl.last_update().timestamp());
    assert!(
        from_pem.crl_number().unwrap() > crl.crl_number().unwrap(),
        "crl numbers grow"
    );
    let mut serials: Vec<_> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    serials.sort();
    serials
}

#[tokio::test]
async fn ca_certificate_profile() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let der = parse_pem(ca.ca_certificate_pem());
    let (_, cert) = parse_x509_certificate(&der).unwrap();
    assert!(cert.is_ca());
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cn, format!("Keygate local CA {TRUST_DOMAIN}"));
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(life >= 3650 * 86400, "{life}");
    cert.verify_signature(None).unwrap();
    let (ct, body) = doc(&ca, "bundle.pem").await;
    assert_eq!(
        (ct.as_str(), body.as_slice()),
        ("application/x-pem-file", ca.ca_certificate_pem().as_bytes())
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for key in [&fx.cfg.key_file, &fx.cfg.jwt_key_file] {
            assert_eq!(
                std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }
}

#[tokio::test]
async fn verify_rejects_foreign_and_malformed_certificates() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let other_fx = Fixture::new();
    let other = other_fx.open().await;
    let foreign = other.issue(&x509_req("lease-foreign")).await.unwrap();
    let v = ca
        .verify(&json!({"x509_svid": public(&foreign.credential, "certificate")}))
        .await
        .unwrap();
    assert_eq!(
        (v.valid, v.reason.as_deref()),
        (false, Some("bad_signature"))
    );
    // The CA certificate is signed by the CA but is no SVID.
    let v = ca
        .verify(&json!({"x509_svid": ca.ca_certificate_pem()}))
        .await
        .unwrap();
    assert!(!v.valid);

    let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
    for presented in [
        json!("text"),
        json!({}),
        json!({"x509_svid": 5}),
        json!({"x509_svid": "not pem"}),
        json!({"x509_svid": garbage}),
        json!({"x509_svid": ca.ca_certificate_pem(), "extra": 1}),
    ] {
        let v = ca.verify(&presented).await.unwrap();
        assert_eq!(
            (v.valid, v.reason.as_deref()),
            (false, Some("malformed")),
            "{presented}"
        );
    }
}

#[tokio::test]
async fn x509_not_after_never_exceeds_the_lease() {
    let fx = Fixture::new();
    let ca = fx.open().await;
    let mut req = x509_req("lease-frac");
    req.expires_at = OffsetDateTime::now_utc() + ::time::Duration::milliseconds(120_900);
    let issued = ca.issue(&req).await.unwrap();
    assert!(issued.expires_at <= req.expires_at);
    assert_eq!(
        issued.expires_at.unix_timestamp(),
        req.expires_at.unix_timestamp()
    );
    req.expires_at = OffsetDateTime::now_utc() - ::time::Duration::seconds(1);
    assert_invalid_params(ca.issue(&req).await, "expired");
}
