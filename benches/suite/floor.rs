//! The crypto floor: what one credential costs in cryptography alone, with
//! the libraries Keygate uses, on one core. Keygate's CPU per request is
//! compared with it (the goal: at most 3×).
//!
//! - X.509-SVID: a P-256 key generated and serialized (the local CA's
//!   `LeafKey`, aws-lc-rs), a leaf certificate with a SPIFFE URI SAN signed
//!   by a P-256 CA (rcgen on aws-lc-rs, as the local CA),
//!   and one session token verified (`SessionSigner::verify_afresh`: what
//!   `verify` does the first time it sees a token; it remembers verified
//!   tokens, so the floor does not call it).
//! - JWT-SVID: one ES256 signature (`SessionSigner::sign`: aws-lc-rs with
//!   the key parsed once, as the local CA's JWT-SVIDs) and one session
//!   token verified.
//! - Task open: one ES256 client assertion verified and one session token
//!   signed.
//!
//! Beside it, outside the goal: one durable commit of one row, alone
//! ([`Commit`]), what a write costs on this machine before any of Keygate's
//! own work.

use std::time::{Duration, Instant};

use keygate::identity::{SessionClaims, SessionSigner};
use rcgen::{
    CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
};
use serde::Serialize;

/// Microseconds of one core per operation.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub x509_svid_us: f64,
    pub jwt_svid_us: f64,
    pub task_open_us: f64,
    /// Not crypto, and not in the goal: one durable commit of one small row
    /// on its own, as Keygate's store makes it ([`commit`]).
    pub commit: Commit,
}

/// One SQLite commit of one row, alone, from one task: the store Keygate
/// ships (sqlx, WAL, `synchronous=FULL`), so the fsync and sqlx's hand-off
/// to its SQLite thread and back.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    /// Wall time per commit.
    pub wall_us: f64,
    /// CPU time of this process (every thread) per commit.
    pub cpu_us: f64,
}

/// Measures [`Commit`] in `dir` for about 1.5 s.
async fn commit(dir: &std::path::Path) -> Commit {
    use sqlx::ConnectOptions as _;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let mut conn = SqliteConnectOptions::new()
        .filename(dir.join("floor-commit.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .expect("floor database");
    sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, v TEXT)")
        .execute(&mut conn)
        .await
        .expect("floor table");
    let (mut n, mut start, mut cpu) = (0u64, Instant::now(), 0.0);
    loop {
        sqlx::query("INSERT INTO t (id, v) VALUES (?, ?)")
            .bind(format!("row-{n}"))
            .bind("0123456789abcdef0123456789abcdef")
            .execute(&mut conn)
            .await
            .expect("floor insert");
        n += 1;
        // 50 to warm up, then the measured window.
        if n == 50 {
            (start, cpu) = (Instant::now(), crate::load::own_cpu_secs());
        } else if n > 50 && start.elapsed() >= Duration::from_millis(1500) {
            break;
        }
    }
    let n = n - 50;
    let wall = start.elapsed().as_secs_f64();
    let cpu = crate::load::own_cpu_secs() - cpu;
    Commit {
        wall_us: wall * 1e6 / n as f64,
        cpu_us: cpu * 1e6 / n as f64,
    }
}

/// Runs `op` for about `window` on this thread; microseconds per call.
fn per_call(window: Duration, mut op: impl FnMut()) -> f64 {
    for _ in 0..50 {
        op();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        for _ in 0..20 {
            op();
        }
        n += 20;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn claims(signer: &SessionSigner) -> SessionClaims {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    SessionClaims {
        iss: signer.issuer().to_owned(),
        sub: "spiffe://bench/agent".into(),
        aud: signer.issuer().to_owned(),
        iat: now,
        exp: now + 3600,
        jti: uuid::Uuid::new_v4().to_string(),
        task_id: "tk_bench".into(),
        act: None,
        cnf: None,
    }
}

/// Measures the floor on one core (the crypto on the calling thread,
/// blocking), then the commit.
pub async fn measure(dir: &std::path::Path) -> Floor {
    let window = Duration::from_millis(1500);
    let signer = SessionSigner::open(&dir.join("floor-session.pem"), "https://floor.invalid")
        .expect("session key");
    let token = signer.sign(&claims(&signer)).expect("sign");
    let verify = |token: &str| {
        signer.verify_afresh(token).expect("verify");
    };

    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("ca key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
    let now = time::OffsetDateTime::now_utc();
    let x509_svid_us = per_call(window, || {
        let key = keygate_provider_local_ca::LeafKey::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://bench/agent".to_owned().try_into().expect("uri"),
        )];
        p.not_before = now;
        p.not_after = now + time::Duration::minutes(10);
        let cert = p.signed_by(&key, &issuer).expect("leaf");
        std::hint::black_box((cert.der().len(), key.pem().len()));
        verify(&token);
    });
    let jwt_svid_us = per_call(window, || {
        std::hint::black_box(signer.sign(&claims(&signer)).expect("sign").len());
        verify(&token);
    });
    // A client assertion is an ES256 JWT like a session token: verifying
    // one costs what verifying a session token costs.
    let task_open_us = per_call(window, || {
        verify(&token);
        std::hint::black_box(signer.sign(&claims(&signer)).expect("sign").len());
    });
    Floor {
        x509_svid_us,
        jwt_svid_us,
        task_open_us,
        commit: commit(dir).await,
    }
}
