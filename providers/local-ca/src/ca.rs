//! The CA itself: its key and self-signed certificate, and the CRLs it signs.

use std::fmt;
use std::fs;
use std::path::Path;

use keygate_provider_api::ProviderError;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationList,
    CertificateRevocationListParams, DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::keys;

/// How long a generated CA certificate is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Back-dating of `notBefore`, so peers with a slightly slow clock accept it.
const CA_BACKDATE: Duration = Duration::minutes(1);
/// How long a served CRL is good for; relying parties refetch after this.
const CRL_VALIDITY: Duration = Duration::hours(1);

/// The CA key with its certificate.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    /// The certificate's subject key identifier, repeated in each CRL's
    /// authority key identifier so relying parties can match them.
    key_id: Vec<u8>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("key_id", &hex::encode(&self.key_id))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One entry of a CRL.
pub(crate) struct CrlEntry {
    /// The serial's big-endian bytes.
    pub serial: Vec<u8>,
    pub revoked_at: OffsetDateTime,
}

impl Ca {
    /// Loads the CA from its files, creating key and certificate on first start.
    pub(crate) fn open(
        trust_domain: &str,
        key_file: &Path,
        cert_file: &Path,
    ) -> Result<Self, ProviderError> {
        // A certificate without its key can't sign anything, and replacing the
        // CA behind the operator's back would orphan every relying party.
        if !key_file.exists() && cert_file.exists() {
            return Err(ProviderError::Internal(format!(
                "ca certificate `{}` exists but its key file `{}` does not",
                cert_file.display(),
                key_file.display()
            )));
        }
        let key = keys::load_or_generate_key(key_file, "ca key")?;
        let mut cert_pem = None;
        if !cert_file.exists() {
            let pem = self_signed_cert(trust_domain, &key)?;
            // Another replica may write it first (then its is read below).
            if keys::create_file_atomic(cert_file, pem.as_bytes(), keys::PUBLIC_FILE_MODE)? {
                tracing::info!(path = %cert_file.display(), "generated ca certificate");
                cert_pem = Some(pem);
            }
        }
        let cert_pem = match cert_pem {
            Some(pem) => pem,
            None => {
                fs::read_to_string(cert_file).map_err(|e| keys::io_error("read", cert_file, &e))?
            }
        };
        let bad = |why: &str| {
            ProviderError::Internal(format!("ca certificate `{}`: {why}", cert_file.display()))
        };
        let cert_der = pem_to_der(&cert_pem).ok_or_else(|| bad("not a pem certificate"))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|_| bad("cannot parse it"))?;
        check_ca_cert(&cert, &key, trust_domain).map_err(|why| bad(&why))?;
        let key_id =
            subject_key_id(&cert).ok_or_else(|| bad("it has no subject key identifier"))?;
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
            key_id,
            not_after,
        })
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    pub(crate) fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub(crate) fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub(crate) fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Signs a CRL listing `entries`, valid from `now` for an hour.
    pub(crate) fn crl(
        &self,
        entries: Vec<CrlEntry>,
        number: u64,
        now: OffsetDateTime,
    ) -> Result<CertificateRevocationList, ProviderError> {
        let revoked_certs = entries
            .into_iter()
            .map(|e| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&e.serial),
                revocation_time: e.revoked_at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_VALIDITY,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::PreSpecified(self.key_id.clone()),
        };
        params
            .signed_by(&self.issuer)
            .map_err(|e| ProviderError::Internal(format!("cannot sign the crl: {e}")))
    }
}

fn self_signed_cert(trust_domain: &str, key: &KeyPair) -> Result<String, ProviderError> {
    let internal =
        |e: rcgen::Error| ProviderError::Internal(format!("cannot create the ca certificate: {e}"));
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keygate");
    dn.push(
        DnType::CommonName,
        format!("Keygate local CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    // Path length 0: this CA signs SVIDs only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let uri = format!("spiffe://{trust_domain}")
        .try_into()
        .map_err(internal)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.not_before = now - CA_BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    Ok(params.self_signed(key).map_err(internal)?.pem())
}

/// 16 random bytes as a positive serial of fixed length.
fn random_serial() -> [u8; 16] {
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial
}

fn check_ca_cert(
    cert: &X509Certificate<'_>,
    key: &KeyPair,
    trust_domain: &str,
) -> Result<(), String> {
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("it does not match the ca key file".into());
    }
    if !cert.is_ca() {
        return Err("it is not a ca certificate".into());
    }
    // Trust domain changes need a new CA: old SVIDs would name a domain the
    // served bundle no longer speaks for.
    let expected = format!("spiffe://{trust_domain}");
    let names_td = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::URI(u) if *u == expected))
        });
    if !names_td {
        return Err(format!(
            "it is not for trust domain `{trust_domain}`; move the old files away to create a new ca"
        ));
    }
    if cert.validity().not_after.to_datetime() <= OffsetDateTime::now_utc() {
        return Err("it has expired; move the old files away to create a new ca".into());
    }
    Ok(())
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// The DER of the first `CERTIFICATE` block of a PEM string.
pub(crate) fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    (pem.label == "CERTIFICATE").then_some(pem.contents)
}
