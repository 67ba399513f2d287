//! URL types that validate once and display safely.
//!
//! A smee channel URL is a capability: whoever knows it can read every webhook sent to it. So
//! [`ChannelUrl`] never prints its id in full (only the first 4 characters), and the full URL is
//! reached only through [`ChannelUrl::expose`], which makes every use that could leak it visible
//! in review. [`TargetUrl`] is where webhooks are replayed to; it is not secret.

use std::fmt;
use std::str::FromStr;

use reqwest::Url;

/// Why a URL argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL ({0})")]
    Parse(String),
    #[error("scheme must be http or https, not {0}")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("port 0 is not a port you can connect to")]
    PortZero,
}

/// Parse an absolute http(s) URL with a host and a usable port.
pub fn parse_http_url(text: &str) -> Result<Url, UrlError> {
    let url = Url::parse(text).map_err(|e| UrlError::Parse(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(url.scheme().to_string()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(UrlError::NoHost);
    }
    if url.port() == Some(0) {
        return Err(UrlError::PortZero);
    }
    Ok(url)
}

/// A smee channel URL, e.g. `https://smee.io/AbCdEf123`. Displays as `https://smee.io/AbCd…`.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelUrl(Url);

impl ChannelUrl {
    /// The full URL, with the channel id. Only for making requests; never for logs.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// The channel id (the last path segment) shortened to its first 4 characters.
    pub fn redacted_id(&self) -> String {
        let id = self
            .0
            .path_segments()
            .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
            .unwrap_or("");
        redact(id)
    }
}

/// The first 4 characters of a secret, then an ellipsis: enough to tell two apart in a log.
pub fn redact(secret: &str) -> String {
    let shown: String = secret.chars().take(4).collect();
    if shown.len() < secret.len() {
        format!("{shown}…")
    } else {
        shown
    }
}

impl FromStr for ChannelUrl {
    type Err = UrlError;
    fn from_str(text: &str) -> Result<Self, UrlError> {
        parse_http_url(text).map(ChannelUrl)
    }
}

impl fmt::Display for ChannelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.0;
        let mut prefix = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        if let Some(port) = url.port() {
            prefix.push_str(&format!(":{port}"));
        }
        let path = url.path();
        let parent = path.trim_end_matches('/');
        let parent = &parent[..parent.rfind('/').map_or(0, |i| i + 1)];
        write!(f, "{prefix}{parent}{}", self.redacted_id())
    }
}

impl fmt::Debug for ChannelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelUrl({self})")
    }
}

/// Where webhooks are replayed to, e.g. `http://127.0.0.1:3000/webhook`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl(Url);

impl TargetUrl {
    /// The target on this machine at `port` and `path`, as `--port` and `--path` describe it.
    pub fn local(port: u16, path: &str) -> Result<Self, UrlError> {
        if port == 0 {
            return Err(UrlError::PortZero);
        }
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://127.0.0.1:{port}{slash}{path}").parse()
    }

    /// The URL to request for an event with these query parameters (appended to any the
    /// target already has).
    pub fn with_query(&self, query: &[(String, String)]) -> Url {
        let mut url = self.0.clone();
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Whether requests to it go in the clear (`http`), as to a port on this machine.
    pub fn is_plain_http(&self) -> bool {
        self.0.scheme() == "http"
    }

    /// The path and query, for a short log line.
    pub fn path(&self) -> &str {
        self.0.path()
    }
}

impl FromStr for TargetUrl {
    type Err = UrlError;
    fn from_str(text: &str) -> Result<Self, UrlError> {
        parse_http_url(text).map(TargetUrl)
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_id_is_redacted_everywhere_it_prints() {
        let url: ChannelUrl = "https://smee.io/AbCdEfGh123".parse().unwrap();
        assert_eq!(url.to_string(), "https://smee.io/AbCd…");
        assert_eq!(format!("{url:?}"), "ChannelUrl(https://smee.io/AbCd…)");
        let url: ChannelUrl = "http://127.0.0.1:3333/x/secret-id/".parse().unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:3333/x/secr…");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert_eq!(
            "ftp://x/y".parse::<ChannelUrl>(),
            Err(UrlError::Scheme("ftp".into()))
        );
        assert!(matches!(
            "nope".parse::<TargetUrl>(),
            Err(UrlError::Parse(_))
        ));
        assert_eq!(
            "http://127.0.0.1:0/".parse::<TargetUrl>(),
            Err(UrlError::PortZero)
        );
        assert_eq!(TargetUrl::local(0, "/"), Err(UrlError::PortZero));
    }

    #[test]
    fn local_target_and_query() {
        let t = TargetUrl::local(3000, "hook").unwrap();
        assert_eq!(t.to_string(), "http://127.0.0.1:3000/hook");
        let q = vec![("a b".to_string(), "1&2".to_string())];
        assert_eq!(
            t.with_query(&q).as_str(),
            "http://127.0.0.1:3000/hook?a+b=1%262"
        );
    }
}
