//! Key files: created once with owner-only permissions, reloaded on restart.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use keygate_provider_api::ProviderError;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use sha2::{Digest, Sha256};

/// File mode for private keys: readable by the broker's user only.
pub(crate) const KEY_FILE_MODE: u32 = 0o600;
/// File mode for public material (certificates).
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;

/// Loads a P-256 PKCS#8 PEM key, or generates and writes one if the file does
/// not exist yet. `what` names the key in errors ("ca key", "jwt key").
pub(crate) fn load_or_generate_key(path: &Path, what: &str) -> Result<KeyPair, ProviderError> {
    if path.exists() {
        let pem =
            fs::read_to_string(path).map_err(|e| io_error(&format!("read {what}"), path, &e))?;
        // The error from rcgen is not echoed: it may quote the file's content.
        let key = KeyPair::from_pem(&pem).map_err(|_| {
            ProviderError::Internal(format!(
                "{what} file `{}` is not a pkcs#8 pem private key",
                path.display()
            ))
        })?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(ProviderError::Internal(format!(
                "{what} file `{}` does not hold a p-256 key",
                path.display()
            )));
        }
        return Ok(key);
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ProviderError::Internal(format!("cannot generate {what}: {e}")))?;
    if !create_file_atomic(path, key.serialize_pem().as_bytes(), KEY_FILE_MODE)? {
        // Another replica starting beside this one on shared files wrote
        // it first: use that one, so both sign with the same key.
        return load_or_generate_key(path, what);
    }
    tracing::info!(path = %path.display(), "generated {what}");
    Ok(key)
}

/// Creates `path` with `contents` unless it exists, atomically even against
/// another process doing the same (a temporary file hard-linked into
/// place). Returns whether this call created it.
pub(crate) fn create_file_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<bool, ProviderError> {
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, &e))?;
    let mut tmp = tmp_path(path).into_os_string();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut file = open_for_write(&tmp, mode).map_err(|e| io_error("create", &tmp, &e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", &tmp, &e))?;
    drop(file);
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(&dir).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("link into place", path, &e)),
    }
}

/// A fresh P-256 key pair for one SVID.
pub(crate) fn generate_leaf_key() -> Result<KeyPair, ProviderError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ProviderError::Internal(format!("cannot generate a key pair: {e}")))
}

/// The JWT key id: base64url of the first 16 bytes of SHA-256 over the
/// public key's SubjectPublicKeyInfo DER. 128 bits is plenty to tell keys
/// apart and keeps headers short.
pub(crate) fn key_id(spki_der: &[u8]) -> String {
    use base64::Engine as _;
    let digest = Sha256::digest(spki_der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
}

/// Writes `contents` to `path` via a temporary file and a rename, so a crash
/// never leaves a half-written key behind, then syncs the directory so the
/// new name survives a power cut.
pub(crate) fn write_file_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), ProviderError> {
    let dir = parent_dir(path);
    fs::create_dir_all(&dir).map_err(|e| io_error("create directory", &dir, &e))?;
    let tmp = tmp_path(path);
    let mut file = open_for_write(&tmp, mode).map_err(|e| io_error("create", &tmp, &e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("write", &tmp, &e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| io_error("rename into place", path, &e))?;
    sync_dir(&dir)
}

/// The directory a file lives in; `.` for a bare file name.
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a directory entry change (create, rename) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ProviderError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("sync directory", dir, &e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// An error about a file, naming the file and the operation but no content.
pub(crate) fn io_error(op: &str, path: &Path, e: &std::io::Error) -> ProviderError {
    ProviderError::Internal(format!("cannot {op} `{}`: {e}", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn open_for_write(path: &Path, mode: u32) -> std::io::Result<fs::File> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        opts.mode(mode);
        let file = opts.open(path)?;
        // `mode` only applies when the file is created; a leftover temp file
        // from a crash keeps its old mode unless we set it again.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        let _ = mode;
        opts.open(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_generated_once_then_reloaded() {
        let dir = std::env::temp_dir().join(format!("keygate-keys-{}", uuid::Uuid::new_v4()));
        let path = dir.join("nested").join("k.pem");
        let a = load_or_generate_key(&path, "test key").unwrap();
        let b = load_or_generate_key(&path, "test key").unwrap();
        assert_eq!(a.public_key_raw(), b.public_key_raw());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, KEY_FILE_MODE);
        }
        fs::write(&path, "not a key").unwrap();
        let err = load_or_generate_key(&path, "test key")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("not a key"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
