//! The HTTP client every outbound request uses, built one way.
//!
//! reqwest is built without a default TLS crypto provider so that the whole binary carries one
//! TLS stack (rustls with `ring`). That provider must be installed before any client is built;
//! [`client_builder`] does it, so no caller can forget.
//!
//! TLS trust is set once for the process ([`set_trust`]: `--cacert`, `--insecure`), before any
//! client is built, so every client (channels, https targets, Slack) trusts alike. Proxy
//! variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) are honoured by every client
//! built here, as reqwest reads them; plain-http targets go through hyper directly, without a
//! proxy (they are local services).

use std::sync::{Once, OnceLock};
use std::time::Duration;

/// How smee-relay names itself to the servers it calls.
pub const USER_AGENT: &str = concat!("smee-relay/", env!("CARGO_PKG_VERSION"));

/// A reqwest client builder with TLS ready, no redirects followed, and a connect timeout.
///
/// Redirects are not followed because every caller here either must see them (`new` reads the
/// `Location` of smee's redirect) or must not silently turn a POST into a GET (forwarding).
pub fn client_builder() -> reqwest::ClientBuilder {
    static INSTALL_PROVIDER: Once = Once::new();
    INSTALL_PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is just as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(USER_AGENT);
    if let Some(trust) = TRUST.get() {
        for cert in &trust.extra_roots {
            builder = builder.add_root_certificate(cert.clone());
        }
        builder = builder.danger_accept_invalid_certs(trust.insecure);
    }
    builder
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
    extra_roots: Vec<reqwest::Certificate>,
    /// `--insecure`: no certificate is verified (a development proxy). Loudly warned about.
    insecure: bool,
}

static TRUST: OnceLock<Trust> = OnceLock::new();

/// Why `--cacert` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read --cacert {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--cacert {path} holds no PEM certificate")]
    Parse {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("--cacert {path} holds no PEM certificate")]
    Empty { path: String },
}

/// Trust `cacert`'s certificates too, or (insecure) nothing at all, in every client built from
/// now on. Call once, before building clients; later calls are ignored.
pub fn set_trust(cacert: Option<&std::path::Path>, insecure: bool) -> Result<(), TrustError> {
    let mut extra_roots = Vec::new();
    if let Some(path) = cacert {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
            path: shown.clone(),
            source,
        })?;
        extra_roots =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| TrustError::Parse {
                path: shown.clone(),
                source,
            })?;
        if extra_roots.is_empty() {
            return Err(TrustError::Empty { path: shown });
        }
    }
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
