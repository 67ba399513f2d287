//! TLS for `serve` (`--tls-cert`, `--tls-key`): loads the PEM files into a rustls config and
//! swaps in a fresh one on SIGHUP, so a renewed certificate is used without a restart. A reload
//! that fails keeps the old certificate. It does not accept connections (that is `mod.rs`).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain from {0}")]
    Cert(PathBuf, #[source] rustls::pki_types::pem::Error),
    #[error("no certificate in {0}")]
    NoCert(PathBuf),
    #[error("cannot read the private key from {0}")]
    Key(PathBuf, #[source] rustls::pki_types::pem::Error),
    #[error("the certificate and key do not make a TLS configuration")]
    Config(#[source] rustls::Error),
}

/// Where the certificate and key are, as PEM.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf.
    pub key: PathBuf,
}

/// The current configuration, replaced whole on reload.
pub(super) struct Tls {
    /// Where to reload from.
    files: TlsFiles,
    /// What new connections use.
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn load(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| TlsError::Cert(files.cert.clone(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(files.cert.clone(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Config)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    pub(super) fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(load(&files)?);
        Ok(Self { files, current })
    }

    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// Read the files again; on failure the old certificate stays.
    pub(super) fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}
