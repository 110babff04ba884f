//! The optional mTLS listener: TLS with client certificates chaining to a
//! configured trust bundle, for agents that authenticate with an X.509-SVID
//! (RFC 8705 `tls_client_auth`). A client certificate is optional at the TLS
//! layer; the token endpoint decides what it proves.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore};

use crate::config::TlsConfig;

/// Who is on the other end of a connection: its address and, over mTLS,
/// the leaf certificate it presented (DER).
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub addr: SocketAddr,
    pub cert: Option<Arc<Vec<u8>>>,
}

/// The TLS acceptor of the mTLS listener: its certificate, and client
/// certificates verified against the trust bundle (optional at the TLS
/// layer; the token endpoint decides what one proves).
pub fn acceptor(cfg: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    Ok(TlsAcceptor::from(server_config(cfg)?))
}

fn server_config(cfg: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .with_context(|| format!("server.tls.cert_file `{}`", cfg.cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert_file `{}`", cfg.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("server.tls.key_file `{}`", cfg.key_file.display()))?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.client_ca_file).with_context(|| {
        format!(
            "server.tls.client_ca_file `{}`",
            cfg.client_ca_file.display()
        )
    })? {
        roots.add(c?)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// The SPIFFE ID of a verified client certificate: its one `spiffe://` URI
/// SAN, in `trust_domain`.
pub fn spiffe_id(der: &[u8], trust_domain: &str) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the client certificate cannot be parsed".to_owned())?;
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                        Some((*u).to_owned())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [id] = uris.as_slice() else {
        return Err(format!(
            "the client certificate must carry exactly one spiffe:// URI SAN (found {})",
            uris.len()
        ));
    };
    let prefix = format!("spiffe://{trust_domain}/");
    if !id.starts_with(&prefix) {
        return Err(format!(
            "SPIFFE ID `{id}` is not in trust domain `{trust_domain}`"
        ));
    }
    Ok(id.clone())
}

/// `x5t#S256`: base64url SHA-256 of the certificate (RFC 8705 §3.1).
pub fn thumbprint(der: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}
