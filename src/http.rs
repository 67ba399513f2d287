//! The HTTP client every outbound request uses, built one way.
//!
//! reqwest is built without a default TLS crypto provider so that the whole binary carries one
//! TLS stack (rustls with `ring`). That provider must be installed before any client is built;
//! [`client_builder`] does it, so no caller can forget.

use std::sync::Once;
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
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .user_agent(USER_AGENT)
}
