//! The HTTP client every outbound request uses, built one way.
//!
//! reqwest is built without a default TLS crypto provider so that the whole binary carries one
//! TLS stack (rustls with `ring`). That provider must be installed before any client is built;
//! [`client_builder`] does it, so no caller can forget.
//!
//! TLS trust is set once for the process ([`set_trust`]: `--cacert`, `--insecure`), before any
//! client is built, so every client (channels, https targets, Slack) trusts alike. Every client
//! shares one rustls config built here, whose verifier reads the system's CA certificates on the
//! first TLS handshake (once per process), not when a client is built: reading and parsing them
//! was most of the start-up's instructions, and an all-http relay never needs them. A failure to
//! read them fails that handshake (and is tried again on the next one), as it failed the
//! client's build before. Proxy
//! variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) are honoured by every client
//! built here, as reqwest reads them; plain-http targets go through hyper directly, without a
//! proxy (they are local services).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// How smee-relay names itself to the servers it calls.
pub const USER_AGENT: &str = concat!("smee-relay/", env!("CARGO_PKG_VERSION"));

/// A reqwest client builder with TLS ready, no redirects followed, and a connect timeout.
///
/// Redirects are not followed because every caller here either must see them (`new` reads the
/// `Location` of smee's redirect) or must not silently turn a POST into a GET (forwarding).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(USER_AGENT)
        .tls_backend_preconfigured(tls_config())
}

/// [`client_builder`] for requests to `url`. A request to this machine (a loopback address or
/// `localhost`) never goes through a proxy named in the environment (`HTTPS_PROXY`,
/// `ALL_PROXY`, ...), as in Go's net/http (and so gosmee): a proxy elsewhere cannot reach this
/// machine's loopback, and with a proxy set a local `serve` channel or Port stand-in failed.
pub fn client_builder_for(url: &reqwest::Url) -> reqwest::ClientBuilder {
    if is_loopback(url) {
        client_builder().no_proxy()
    } else {
        client_builder()
    }
}

/// Whether `url` names this machine: a loopback address (an IPv4 one mapped into IPv6 too) or
/// `localhost`. Names under `localhost` are left to the proxy, as Go does: not every resolver
/// keeps them on this machine.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // An IPv6 host comes with its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => host.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// The rustls config of every client: TLS 1.2 and 1.3, ALPN h2 and http/1.1 (what reqwest sets
/// up itself), and the process's trust ([`set_trust`]) behind a verifier that loads the system's
/// roots only when a handshake first needs them. Built once; a clone shares the verifier.
fn tls_config() -> rustls::ClientConfig {
    static CONFIG: OnceLock<rustls::ClientConfig> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            static INSTALL_PROVIDER: Once = Once::new();
            INSTALL_PROVIDER.call_once(|| {
                // Fails only if another provider was installed first, which is just as good.
                let _ = rustls::crypto::ring::default_provider().install_default();
            });
            let provider = CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
            let verifier: Arc<dyn ServerCertVerifier> = match TRUST.get() {
                Some(trust) if trust.insecure => Arc::new(AcceptAnything(provider.clone())),
                trust => Arc::new(LazyRoots {
                    provider: provider.clone(),
                    extra: trust.map(|t| t.extra_roots.clone()).unwrap_or_default(),
                    loaded: Mutex::new(None),
                }),
            };
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            config
        })
        .clone()
}

/// How many times this process has read the system's CA certificates (tests, and the debug log
/// line that says so, show that an all-http relay never does).
static ROOT_LOADS: AtomicUsize = AtomicUsize::new(0);

/// How many times this process has read the system's CA certificates.
pub fn system_roots_loaded() -> usize {
    ROOT_LOADS.load(Ordering::Relaxed)
}

/// reqwest's own verifier (rustls-platform-verifier: the system's CA certificates plus
/// `--cacert`), built on the first certificate to verify rather than with each client.
#[derive(Debug)]
struct LazyRoots {
    /// The crypto provider, for the signature checks that need no roots.
    provider: Arc<CryptoProvider>,
    /// `--cacert`'s certificates, trusted beside the system's.
    extra: Vec<CertificateDer<'static>>,
    /// The verifier once built; `None` until then, and again after a failed load, so that a
    /// trust store installed later is read on the next handshake.
    loaded: Mutex<Option<Arc<rustls_platform_verifier::Verifier>>>,
}

impl LazyRoots {
    fn verifier(&self) -> Result<Arc<rustls_platform_verifier::Verifier>, rustls::Error> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(verifier) = &*loaded {
            return Ok(verifier.clone());
        }
        ROOT_LOADS.fetch_add(1, Ordering::Relaxed);
        let verifier = Arc::new(rustls_platform_verifier::Verifier::new_with_extra_roots(
            self.extra.iter().cloned(),
            self.provider.clone(),
        )?);
        tracing::debug!("loaded the system's CA certificates for the first TLS connection");
        *loaded = Some(verifier.clone());
        Ok(verifier)
    }
}

impl ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `--insecure`: nothing is verified, as reqwest's own `danger_accept_invalid_certs` did.
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why an answer's body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer's body is larger than {limit} bytes, more than such an answer can be")]
    TooLarge { limit: usize },
    #[error("the answer's body broke off")]
    Read(#[source] reqwest::Error),
}

/// `response`'s body, refused once it passes `limit` bytes: a server's answer is input, and
/// a broken or hostile one must not fill memory.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// What every TLS client trusts beyond the system's roots.
struct Trust {
    /// From `--cacert FILE` (PEM, one or more certificates): a private CA.
    extra_roots: Vec<CertificateDer<'static>>,
    /// `--insecure`: no certificate is verified (a development proxy). Loudly warned about.
    insecure: bool,
}

static TRUST: OnceLock<Trust> = OnceLock::new();

/// Why a CA file (`--cacert`, or `cacert` in the config) could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path} ({setting})")]
    Read {
        setting: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} ({setting}) is not valid PEM: {reason}")]
    Parse {
        setting: String,
        path: String,
        /// The PEM reader's complaint, in words (its own shows byte values).
        reason: String,
    },
    #[error(
        "{path} ({setting}) holds no PEM certificate (-----BEGIN CERTIFICATE-----){}",
        if others.is_empty() { String::new() } else { format!(", only: {}", others.join(", ")) }
    )]
    Empty {
        setting: String,
        path: String,
        /// The labels of the PEM blocks it does hold (`PRIVATE KEY`), to tell a mixed-up file.
        others: Vec<String>,
    },
    /// A PEM block that is not a certificate TLS can use as a root.
    #[error("{path} ({setting}): certificate {number} is not a valid CA certificate")]
    Invalid {
        setting: String,
        path: String,
        /// 1-based, in the file's order.
        number: usize,
        #[source]
        source: rustls::Error,
    },
}

/// A CA file's certificates (PEM, one or more); `setting` names where the path came from
/// (`--cacert`, `the config's cacert`), for the error.
pub fn read_ca_file(
    path: &std::path::Path,
    setting: &str,
) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let shown = path.display().to_string();
    let setting = setting.to_string();
    let pem = std::fs::read(path).map_err(|source| TrustError::Read {
        setting: setting.clone(),
        path: shown.clone(),
        source,
    })?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::Parse {
            setting: setting.clone(),
            path: shown.clone(),
            reason: pem_reason(e),
        })?;
    if roots.is_empty() {
        return Err(TrustError::Empty {
            setting,
            path: shown,
            others: pem_labels(&pem),
        });
    }
    // As the verifier will read them: one it cannot use would fail every TLS connection later,
    // blaming the server.
    for (i, root) in roots.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(root.clone())
            .map_err(|source| TrustError::Invalid {
                setting: setting.clone(),
                path: shown.clone(),
                number: i + 1,
                source,
            })?;
    }
    Ok(roots)
}

/// A PEM reading error in words: its `Display` prints the lines it means as byte values.
fn pem_reason(error: rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    let text =
        |bytes: &[u8]| crate::text::escape_control(&String::from_utf8_lossy(bytes)).into_owned();
    match error {
        Error::MissingSectionEnd { end_marker } => {
            format!(
                "a block has no end line: -----END {}-----",
                text(&end_marker)
            )
        }
        Error::IllegalSectionStart { line } => format!("a bad BEGIN line: {}", text(&line)),
        other => other.to_string(),
    }
}

/// The labels of a file's PEM blocks (`-----BEGIN <label>-----`), in order, each once.
fn pem_labels(pem: &[u8]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(pem).lines() {
        if let Some(label) = line
            .trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        {
            let label = crate::text::escape_control(label).into_owned();
            if !labels.contains(&label) {
                labels.push(label);
            }
        }
    }
    labels
}

/// Trust `cacert`'s certificates too (the file, and the setting it came from), or (insecure)
/// nothing at all, in every client built from now on. Call once, before building clients;
/// later calls (and calls after the first client) are ignored.
pub fn set_trust(
    cacert: Option<(&std::path::Path, &str)>,
    insecure: bool,
) -> Result<(), TrustError> {
    let extra_roots = match cacert {
        Some((path, setting)) => read_ca_file(path, setting)?,
        None => Vec::new(),
    };
    if insecure {
        tracing::warn!(
            "--insecure: TLS certificates are NOT verified; anyone on the path can read and change \
             webhooks and secrets. Use --cacert FILE to trust a private CA instead."
        );
    }
    let _ = TRUST.set(Trust {
        extra_roots,
        insecure,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_told_from_others() {
        for (url, loopback) in [
            ("http://127.0.0.1:3000/x", true),
            ("http://127.8.9.1/", true),
            ("http://[::1]:8080/", true),
            ("http://localhost/", true),
            ("http://LocalHost./", true),
            ("http://[::ffff:127.0.0.1]:9/", true),
            ("http://api.localhost:9/", false),
            ("https://smee.io/abc", false),
            ("http://10.0.0.1/", false),
            ("http://[::2]/", false),
            ("http://localhost.example.com/", false),
        ] {
            let parsed: reqwest::Url = url.parse().unwrap();
            assert_eq!(is_loopback(&parsed), loopback, "{url}");
        }
    }

    /// A certificate for 127.0.0.1 signed by itself (no CA anyone trusts), PEM: (cert, key).
    fn self_signed(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
            ])
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package openssl) makes the test certificate");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        (
            std::fs::read(dir.join("cert.pem")).unwrap(),
            std::fs::read(dir.join("key.pem")).unwrap(),
        )
    }

    /// The roots are read lazily, but an https URL is verified as before: a server whose
    /// certificate no trusted CA signed is refused with a certificate error.
    #[tokio::test]
    async fn an_https_url_is_still_verified_once_the_roots_load_lazily() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path());
        let certs = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            // The client aborts the handshake: the server sees an error.
            acceptor.accept(stream).await.err()
        });

        let client = client_builder().build().unwrap();
        let error = client
            .get(format!("https://{addr}/"))
            .send()
            .await
            .expect_err("a self-signed certificate is not trusted");
        let chain = crate::error::chain(&error);
        assert!(chain.contains("invalid peer certificate"), "{chain}");
        assert!(chain.contains("UnknownIssuer"), "{chain}");
        assert!(handshakes.await.unwrap().is_some());
        assert!(system_roots_loaded() >= 1);
    }
}
