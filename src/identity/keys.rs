//! P-256 / Ed25519 key handling: generation, PEM files, public JWKs.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::AuthError;

/// A public key as a JWK plus its `kid`.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub kid: String,
    pub jwk: serde_json::Value,
}

/// Builds the public JWK of a key pair; `kid` is the RFC 7638 thumbprint.
pub(crate) fn public_jwk(key: &KeyPair) -> Result<PublicKey, AuthError> {
    let raw = key.public_key_raw();
    let (members, alg) = if key.algorithm() == &PKCS_ECDSA_P256_SHA256 {
        if raw.len() != 65 || raw[0] != 4 {
            return Err(AuthError::Key(
                "unexpected P-256 public key encoding".into(),
            ));
        }
        let x = B64.encode(&raw[1..33]);
        let y = B64.encode(&raw[33..65]);
        (
            format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
            "ES256",
        )
    } else if key.algorithm() == &PKCS_ED25519 {
        let x = B64.encode(raw);
        (
            format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            "EdDSA",
        )
    } else {
        return Err(AuthError::Key(
            "only P-256 and Ed25519 keys are supported".into(),
        ));
    };
    let kid = B64.encode(Sha256::digest(members.as_bytes()));
    let mut jwk: serde_json::Value = serde_json::from_str(&members)
        .map_err(|e| AuthError::Key(format!("building the JWK: {e}")))?;
    jwk["kid"] = kid.clone().into();
    jwk["alg"] = alg.into();
    jwk["use"] = "sig".into();
    Ok(PublicKey { kid, jwk })
}

/// Generates a key for an agent: `ES256` (P-256) or `EdDSA` (Ed25519).
/// Returns the PKCS#8 PEM (secret) and the public JWK.
pub fn generate_agent_key(alg: &str) -> Result<(SecretString, PublicKey), AuthError> {
    let algo = match alg {
        "ES256" => &PKCS_ECDSA_P256_SHA256,
        "EdDSA" => &PKCS_ED25519,
        other => {
            return Err(AuthError::Key(format!(
                "cannot generate `{other}` keys (use ES256 or EdDSA)"
            )));
        }
    };
    let key = KeyPair::generate_for(algo).map_err(|e| AuthError::Key(e.to_string()))?;
    let public = public_jwk(&key)?;
    Ok((SecretString::from(key.serialize_pem()), public))
}

/// Loads a PKCS#8 PEM key from `path`, generating a P-256 key there first if
/// the file does not exist (mode 0600).
pub(crate) fn load_or_generate(path: &Path) -> Result<KeyPair, AuthError> {
    let io = |e: std::io::Error| AuthError::Key(format!("`{}`: {e}", path.display()));
    let mut pem = None;
    if !path.exists() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AuthError::Key(e.to_string()))?;
        let new = SecretString::from(key.serialize_pem());
        // Replicas starting together on shared files: the first one's key
        // is everyone's.
        if create_private(path, new.expose_secret()).map_err(io)? {
            pem = Some(new);
        }
    }
    let pem = match pem {
        Some(p) => p,
        None => SecretString::from(std::fs::read_to_string(path).map_err(io)?),
    };
    KeyPair::from_pem(pem.expose_secret())
        .map_err(|_| AuthError::Key(format!("`{}` is not a PKCS#8 PEM key", path.display())))
}

/// Creates a private file (owner-only) unless it exists, atomically even
/// against another process doing the same: a temporary file hard-linked
/// into place. Returns whether this call created it.
fn create_private(path: &Path, content: &str) -> std::io::Result<bool> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    write_private(&tmp, content)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes a private file atomically with owner-only permissions.
pub fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
