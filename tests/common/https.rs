//! Small HTTPS servers for tests: a throwaway CA (rcgen) with a server
//! certificate for 127.0.0.1, and an axum router served behind it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost.
pub struct TestPki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_cert_der: Vec<u8>,
    pub server_key_pem: String,
    pub server_key_der: Vec<u8>,
}

impl TestPki {
    /// A new CA named `ca_name` and its server certificate.
    pub fn new(ca_name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_cert_der: cert.der().to_vec(),
            server_key_pem: key.serialize_pem(),
            server_key_der: key.serialize_der(),
        }
    }

    /// A rustls server configuration presenting the server certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert_der.clone().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key_der.clone().into()),
            )
            .unwrap();
        Arc::new(tls)
    }
}

/// Serves `app` over HTTPS with `tls` on `tcp` (bound by the caller, who
/// may need its address first).
pub fn serve(
    tcp: TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
) -> tokio::task::JoinHandle<()> {
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(tls),
    };
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

/// A TCP listener that completes the TLS handshake before handing the
/// connection to axum.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
