//! The admin token and the internal secret.
//!
//! Taken from the configuration when set there (or in the environment);
//! otherwise generated once into `<data_dir>/secrets/` (mode 0600) and reused,
//! so a restarted gateway keeps working with gpu-tasks already running.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::distributions::Alphanumeric;
use rand::Rng;

/// A fresh random token of `len` alphanumeric characters.
pub fn random_token(len: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

/// The folder generated secrets live in.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets")
}

/// Returns `configured`, or the secret stored in `<data_dir>/secrets/<name>`,
/// creating it if there is none.
pub fn load_or_create(data_dir: &Path, name: &str, configured: Option<&str>) -> std::io::Result<String> {
    if let Some(value) = configured.filter(|v| !v.is_empty()) {
        return Ok(value.to_string());
    }
    let path = dir(data_dir).join(name);
    match std::fs::read_to_string(&path) {
        Ok(value) if !value.trim().is_empty() => return Ok(value.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let value = random_token(40);
    write_private(&path, &value, false)?;
    Ok(value)
}

/// Writes (or appends to) a file only its owner can read.
pub fn write_private(path: &Path, text: &str, append: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        file.write_all(b"\n")?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("gw-secrets-{}", random_token(8)));
        let a = load_or_create(&dir, "internal-secret", None).unwrap();
        let b = load_or_create(&dir, "internal-secret", None).unwrap();
        assert_eq!(a, b);
        assert_eq!(load_or_create(&dir, "internal-secret", Some("given")).unwrap(), "given");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("secrets/internal-secret")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
