//! Both listeners against clients that hold sockets without using them, as an
//! attacker with a few idle connections would: a slow header is cut off, an
//! idle keep-alive connection is closed, silent sockets on the mTLS listener
//! delay no other client, and the connection limit holds.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::{Setup, TestBroker};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; `None` if it is still open
/// after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().map(|()| got)
}

async fn start(connections: &str, tls: Option<&std::path::Path>) -> TestBroker {
    let mut extra = format!("[server.connections]\n{connections}\n");
    if let Some(d) = tls {
        extra.push_str(&format!(
            "[server.tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server-key.pem\"\nclient_ca_file = \"{d}/ca.pem\"\ntrust_domain = \"keygate.test\"\n",
            d = d.display()
        ));
    }
    TestBroker::start_with(Setup {
        extra_config: extra,
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let b = start(
        "header_read_timeout_secs = 1\nidle_timeout_secs = 2\n",
        None,
    )
    .await;

    // A request whose headers never end.
    let mut slow = TcpStream::connect(b.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection that never finishes its headers must be closed"
    );

    // A keep-alive connection that answered one request, then sits idle.
    let mut idle = TcpStream::connect(b.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection must be closed");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "the request itself was answered: {}",
        String::from_utf8_lossy(&got)
    );

    // The server still serves.
    assert_eq!(b.get("/healthz", None).await.status, 200);
}

#[tokio::test]
async fn the_connection_limit_holds_and_frees_up() {
    let b = start("max_connections = 2\nheader_read_timeout_secs = 3\n", None).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Give the server a moment to take both sockets.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(1000))
        .build()
        .unwrap();
    assert!(
        quick.get(b.url("/healthz")).send().await.is_err(),
        "a third connection must wait while two are held"
    );
    // The held sockets time out; the next client is served.
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
        .get(b.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(held);
}

#[tokio::test]
async fn silent_sockets_on_the_mtls_listener_delay_no_one() {
    let dir = std::env::temp_dir().join(format!("keygate-conn-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "conn test ca");
    let ca_cert = p.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(p, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    // A long handshake deadline: handshakes done one at a time would make
    // every client wait for the silent sockets' deadlines in turn.
    let mut b = start("tls_handshake_timeout_secs = 60\n", Some(&dir)).await;
    let mtls = b.stdout_line("keygate mtls listening on ").await;

    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(mtls.trim()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_cert.pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client
        .get(format!("https://{}/healthz", mtls.trim()))
        .send()
        .await
        .expect("served while two sockets sit silent");
    assert_eq!(r.status(), 200);
    drop(silent);
    let _ = std::fs::remove_dir_all(&dir);
}
