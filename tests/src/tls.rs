//! Certificates made at test time, never committed: a test CA (rcgen) that
//! issues the gateway's certificate for `localhost` / `127.0.0.1` with a
//! chosen serial, clients that trust it, and the serial of the certificate a
//! server actually presents.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SerialNumber};

/// A certificate authority that exists for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what clients (and gpu-task) trust.
    pub pem: String,
}

/// The files a gateway serves HTTPS with, and the CA file that verifies them.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().expect("a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "comfy-multi test CA");
        let pem = params.self_signed(&key).expect("a CA certificate").pem();
        TestCa { issuer: Issuer::new(params, key), pem }
    }

    /// A certificate for localhost / 127.0.0.1 with `serial`, and its key, PEM.
    /// The certificate file holds the full chain (leaf, then CA), as a
    /// workshop's `fullchain.pem` does.
    pub fn issue(&self, serial: u64) -> (String, String) {
        let key = KeyPair::generate().expect("a key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("leaf params");
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&key, &self.issuer).expect("a leaf certificate");
        (format!("{}{}", cert.pem(), self.pem), key.serialize_pem())
    }

    /// Issues a certificate with `serial` into `dir` (`gateway.crt`,
    /// `gateway.key`, `ca.crt`), replacing what is there.
    pub fn write(&self, dir: &Path, serial: u64) -> TlsFiles {
        let files = TlsFiles { cert: dir.join("gateway.crt"), key: dir.join("gateway.key"), ca: dir.join("ca.crt") };
        let (cert, key) = self.issue(serial);
        std::fs::write(&files.key, key).unwrap();
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.ca, &self.pem).unwrap();
        files
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// A client that trusts the CA in `ca_pem`, makes a new connection per
/// request (so each sees the certificate served now), follows no redirects,
/// and keeps the peer certificate ([`served_serial`]).
pub fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM"))
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client")
}

/// The serial number of the certificate `url`'s server presents to a
/// new connection of `client` (made by [`client`]).
pub async fn served_serial(client: &reqwest::Client, url: &str) -> anyhow::Result<u64> {
    let res = client.get(url).send().await?;
    let info = res.extensions().get::<reqwest::tls::TlsInfo>().ok_or_else(|| anyhow::anyhow!("no TLS info"))?;
    let der = info.peer_certificate().ok_or_else(|| anyhow::anyhow!("no peer certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)?;
    u64::try_from(cert.tbs_certificate.serial.clone()).map_err(|e| anyhow::anyhow!("serial too large: {e:?}"))
}

/// A `wss` connection (rustls with ring, trusting `ca_pem`).
pub type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens the websocket `url` (`wss://localhost:PORT/...`) with
/// `Authorization: Bearer <bearer>`, trusting the CA in `ca_pem`.
pub async fn connect_wss(ca_pem: &str, url: &str, bearer: &str) -> anyhow::Result<Wss> {
    use rustls::pki_types::pem::PemObject;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {bearer}").parse()?);
    let host = request.uri().host().ok_or_else(|| anyhow::anyhow!("{url} names no host"))?.to_string();
    let port = request.uri().port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let name = rustls::pki_types::ServerName::try_from(host)?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
    let (socket, _) = tokio_tungstenite::client_async(request, tls).await?;
    Ok(socket)
}
