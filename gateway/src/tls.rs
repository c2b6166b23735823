//! HTTPS with the workshop's own certificate.
//!
//! The gateway terminates TLS itself (rustls, ring) with the certificate
//! chain and private key the instructor already has (`gateway.tls_cert`,
//! `gateway.tls_key`). This module:
//!
//! - loads and checks the pair before anything is served ([`load`]): an
//!   unreadable file, a file without PEM certificates or key, a key rustls
//!   cannot use, a key that is not the certificate's: each is a [`TlsError`]
//!   naming the file, and the gateway refuses to start;
//! - reloads it without a restart ([`watch`]) on SIGHUP and whenever either
//!   file (or its folder entry, so a renamed-into-place or re-pointed symlink
//!   counts) changes. Only new handshakes see the new certificate: open
//!   connections, websockets included, go on. A renewal that does not load
//!   keeps the certificate being served and says why in the log;
//! - answers plain HTTP on a second address with a redirect to HTTPS
//!   ([`redirect_app`], `gateway.redirect_addr`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use sha2::{Digest, Sha256};

/// The certificate chain and key files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate and key cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("the TLS certificate file {path} is not valid PEM: {why}")]
    BadCertPem { path: PathBuf, why: String },
    #[error("the TLS certificate file {path} holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks, the full chain)")]
    NoCert { path: PathBuf },
    #[error("the TLS certificate file {path} does not start with a valid certificate: {why}")]
    BadCert { path: PathBuf, why: String },
    #[error("the TLS key file {path} holds no usable private key (expected one PEM `-----BEGIN ... PRIVATE KEY-----` block): {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("the TLS key {key} does not belong to the certificate {cert}: {why}")]
    Mismatch { cert: PathBuf, key: PathBuf, why: String },
}

/// A checked certificate and key, ready to serve.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate, hex, for the log.
    pub fingerprint: String,
    /// The files' bytes, to tell a real change from a touch.
    contents: (Vec<u8>, Vec<u8>),
}

/// Reads and checks the pair: PEM certificates (leaf first), one PEM private
/// key, and the key must be the leaf's.
pub fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let read = |what, path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source });
    let cert_pem = read("certificate file", &files.cert)?;
    let key_pem = read("key file", &files.key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertPem { path: files.cert.clone(), why: e.to_string() })?;
    let Some(leaf) = chain.first() else { return Err(TlsError::NoCert { path: files.cert.clone() }) };
    let fingerprint = hex::encode(Sha256::digest(leaf.as_ref()));
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey { path: files.key.clone(), why: e.to_string() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::BadKey { path: files.key.clone(), why: e.to_string() })?;
    let mismatch = |why: String| TlsError::Mismatch { cert: files.cert.clone(), key: files.key.clone(), why };
    match rustls::sign::CertifiedKey::new(chain.clone(), signing).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(mismatch("the certificate's public key is not the key's".into()))
        }
        Err(e) => return Err(TlsError::BadCert { path: files.cert.clone(), why: e.to_string() }),
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| mismatch(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded { config: Arc::new(config), fingerprint, contents: (cert_pem, key_pem) })
}

/// How long the files must be quiet before a reload: a renewal writes the
/// certificate and the key one after the other.
const SETTLE: Duration = Duration::from_millis(300);

/// Reloads `served` from `files` on SIGHUP and whenever the files change,
/// for as long as the process runs. `current` is what is served now. A file
/// watch that cannot be set up (no inotify left) is logged; SIGHUP still works.
pub fn watch(files: TlsFiles, served: RustlsConfig, current: Loaded) -> std::io::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = match file_watch(&files, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch the TLS files for renewals ({e}); reload with SIGHUP after replacing them");
            None
        }
    };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut current = current;
        loop {
            let why = tokio::select! {
                _ = hangup.recv() => "SIGHUP",
                Some(()) = rx.recv() => {
                    // Wait for the writes to settle.
                    while tokio::time::timeout(SETTLE, rx.recv()).await.is_ok_and(|m| m.is_some()) {}
                    "the files changed"
                }
            };
            reload(&files, &served, &mut current, why);
        }
    });
    Ok(())
}

/// Watches the folders of the certificate and the key (so a file renamed
/// into place or a re-pointed symlink counts), sending on `changed` when an
/// entry of either name changes.
fn file_watch(files: &TlsFiles, changed: tokio::sync::mpsc::UnboundedSender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let names: Vec<_> = [&files.cert, &files.key].iter().filter_map(|p| p.file_name().map(ToOwned::to_owned)).collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let ours = event.is_ok_and(|e| {
            !e.kind.is_access() && e.paths.iter().any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)))
        });
        if ours {
            let _ = changed.send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = [&files.cert, &files.key].iter().map(|p| folder(p)).collect();
    dirs.dedup();
    for dir in &dirs {
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

/// The folder a file's directory entry is in (`.` for a bare name).
fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn reload(files: &TlsFiles, served: &RustlsConfig, current: &mut Loaded, why: &str) {
    match load(files) {
        Ok(next) if next.contents == current.contents => {
            tracing::debug!(why, "TLS files unchanged; nothing to reload");
        }
        Ok(next) => {
            served.reload_from_config(next.config.clone());
            tracing::info!(
                why,
                cert = %files.cert.display(),
                sha256 = %next.fingerprint,
                "serving the renewed TLS certificate"
            );
            *current = next;
        }
        Err(e) => tracing::error!(
            why,
            sha256 = %current.fingerprint,
            "the renewed TLS certificate cannot be used, keeping the one being served: {e}"
        ),
    }
}

/// The plain-HTTP app on `gateway.redirect_addr`: every request is sent to
/// the same host and path over HTTPS on `https_port`.
pub fn redirect_app(https_port: u16) -> axum::Router {
    axum::Router::new().fallback(move |headers: axum::http::HeaderMap, uri: Uri| async move {
        redirect(&headers, &uri, https_port)
    })
}

fn redirect(headers: &axum::http::HeaderMap, uri: &Uri, https_port: u16) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(|h| h.parse::<axum::http::uri::Authority>().ok());
    let Some(host) = host else {
        return (StatusCode::BAD_REQUEST, "this address only redirects to HTTPS, and the request names no Host\n").into_response();
    };
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Redirect::permanent(&format!("https://{}{port}{path}", host.host())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
        let files = TlsFiles { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn every_bad_pair_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = pair(dir.path(), "a");
        assert!(load(&good).is_ok());
        let other = pair(dir.path(), "b");

        let missing = TlsFiles { cert: dir.path().join("none.crt"), key: good.key.clone() };
        let e = load(&missing).err().unwrap().to_string();
        assert!(e.contains("none.crt") && e.contains("cannot read"), "{e}");

        std::fs::write(dir.path().join("junk.crt"), "not a certificate").unwrap();
        let junk = TlsFiles { cert: dir.path().join("junk.crt"), key: good.key.clone() };
        let e = load(&junk).err().unwrap().to_string();
        assert!(e.contains("junk.crt") && e.contains("no certificate"), "{e}");

        let swapped = TlsFiles { cert: good.cert.clone(), key: good.cert.clone() };
        let e = load(&swapped).err().unwrap().to_string();
        assert!(e.contains("a.crt") && e.contains("no usable private key"), "{e}");

        let mismatched = TlsFiles { cert: good.cert.clone(), key: other.key.clone() };
        let e = load(&mismatched).err().unwrap().to_string();
        assert!(e.contains("b.key") && e.contains("a.crt") && e.contains("does not belong"), "{e}");
    }

    #[test]
    fn redirects_keep_host_and_path() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(header::HOST, "comfy.example.org:80".parse().unwrap());
        let to = |port| {
            let r = redirect(&headers, &"/user/3/?a=b".parse().unwrap(), port);
            (r.status(), r.headers()[header::LOCATION].to_str().unwrap().to_string())
        };
        assert_eq!(to(443), (StatusCode::PERMANENT_REDIRECT, "https://comfy.example.org/user/3/?a=b".into()));
        assert_eq!(to(8443).1, "https://comfy.example.org:8443/user/3/?a=b");
        let none = redirect(&axum::http::HeaderMap::new(), &"/".parse().unwrap(), 443);
        assert_eq!(none.status(), StatusCode::BAD_REQUEST);
    }
}
