//! X.509-SVIDs: issuing leaf certificates and checking presented ones.

use keygate_provider_api::{ProviderError, Verification};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

use crate::ca::{self, Ca};
use crate::{keys, verdict};

/// Back-dating of `notBefore`, for relying parties with a slightly slow clock.
const LEAF_BACKDATE: Duration = Duration::seconds(30);

/// The serial a lease's certificate gets. Derived from the lease id, so the
/// broker can revoke a certificate whose handle it never recorded.
///
/// 16 bytes with the top bit cleared (a positive INTEGER) and the next bit set
/// (no leading zero byte is stripped), so the DER serial is always exactly
/// these bytes and its hex is stable.
pub(crate) fn serial_for_lease(lease_id: &str) -> [u8; 16] {
    let digest = Sha256::digest(format!("keygate-local-ca-serial:{lease_id}"));
    let mut serial = [0u8; 16];
    serial.copy_from_slice(&digest[..16]);
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

/// A freshly signed X.509-SVID.
pub(crate) struct Svid {
    pub cert_pem: String,
    pub key_pem: SecretString,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

/// Signs a leaf certificate for `spiffe_id`, valid until `expires_at` at most.
pub(crate) fn issue(
    ca: &Ca,
    spiffe_id: &str,
    lease_id: &str,
    expires_at: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<Svid, ProviderError> {
    // X.509 times have whole seconds; round down so the certificate never
    // outlives the lease.
    let not_after = expires_at
        .replace_nanosecond(0)
        .map_err(|e| ProviderError::Internal(e.to_string()))?;
    if not_after <= now {
        return Err(ProviderError::InvalidParams(
            "the lease has already expired (its ttl ran out before issue; X.509 and JWT times are whole seconds): ask for a longer ttl".into(),
        ));
    }
    if not_after > ca.not_after() {
        return Err(ProviderError::Internal(
            "the ca certificate expires before the lease; rotate the ca".into(),
        ));
    }
    let internal =
        |e: rcgen::Error| ProviderError::Internal(format!("cannot sign the x509-svid: {e}"));
    let serial = serial_for_lease(lease_id);
    let mut params = CertificateParams::default();
    // SPIFFE names the workload in the URI SAN only; with an empty subject
    // rcgen marks the SAN critical, as RFC 5280 requires.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        spiffe_id.to_owned().try_into().map_err(internal)?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = now - LEAF_BACKDATE;
    params.not_after = not_after;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.use_authority_key_identifier_extension = true;
    let key = keys::LeafKey::generate()?;
    let cert = params.signed_by(&key, ca.issuer()).map_err(internal)?;
    Ok(Svid {
        cert_pem: cert.pem(),
        key_pem: SecretString::from(key.pem()),
        serial_hex: hex::encode(serial),
        not_after,
    })
}

/// Checks a presented certificate PEM as a relying party would.
pub(crate) fn verify(
    ca: &Ca,
    cert_pem: &str,
    now: OffsetDateTime,
    is_revoked: impl Fn(&str) -> bool,
) -> Verification {
    let Some(der) = ca::pem_to_der(cert_pem) else {
        return verdict::invalid("malformed");
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return verdict::invalid("malformed");
    };
    let Ok((_, ca_cert)) = x509_parser::parse_x509_certificate(ca.cert_der()) else {
        return verdict::invalid("malformed");
    };
    if cert.verify_signature(Some(ca_cert.public_key())).is_err()
        || cert.issuer() != ca_cert.subject()
    {
        return verdict::invalid("bad_signature");
    }
    let subject = spiffe_id(&cert);
    let expires_at = cert.validity().not_after.to_datetime();
    let reason = if cert.is_ca() || subject.is_none() {
        // Signed by us but not an SVID: should never happen, never accept it.
        Some("malformed")
    } else if now >= expires_at {
        Some("expired")
    } else if now < cert.validity().not_before.to_datetime() {
        Some("not_yet_valid")
    } else if is_revoked(&hex::encode(cert.raw_serial())) {
        Some("revoked")
    } else {
        None
    };
    verdict::with_reason(reason, subject, Some(expires_at))
}

/// The serial (hex) of `der` when this CA, under its key now or an earlier
/// one, may have signed it: its issuer is this CA's name (a certificate of
/// another CA is not ours to judge).
///
/// The signature is deliberately not checked against today's key. A CA
/// rotated the documented way (old files moved away, a new key made under
/// the same name) keeps its revocation list, and an operator who keeps the
/// old certificate in a trust bundle while the old SVIDs run out must still
/// have the revoked ones refused. The answer only ever refuses: a stranger
/// naming this CA as issuer gains nothing by it, and serials derive from
/// lease ids, so none collides with a serial this CA revoked by chance.
pub(crate) fn serial_if_ours(ca: &Ca, der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).ok()?;
    (cert.issuer() == ca_cert.subject()).then(|| hex::encode(cert.raw_serial()))
}

/// The certificate's one `spiffe://` URI SAN; `None` if there is not exactly one.
fn spiffe_id(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) if u.starts_with("spiffe://") => Some(u.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_deterministic_positive_and_full_length() {
        let a = serial_for_lease("lease-1");
        assert_eq!(a, serial_for_lease("lease-1"));
        assert_ne!(a, serial_for_lease("lease-2"));
        for id in ["", "x", "lease-3", "0"] {
            let s = serial_for_lease(id);
            assert_eq!(s[0] & 0xc0, 0x40, "{id}");
        }
    }
}
