//! URL types that validate once and display safely.
//!
//! A smee channel URL is a capability: whoever knows it can read every webhook sent to it. So
//! [`ChannelUrl`] never prints its id in full (only the first 4 characters), and the full URL is
//! reached only through [`ChannelUrl::expose`], which makes every use that could leak it visible
//! in review. [`TargetUrl`] is where webhooks are replayed to; it is not secret, but the
//! credentials it may carry (`http://user:pw@host/hook`) are: they are taken out of the URL,
//! sent as Basic auth (as curl does), and shown as `user:***` wherever the URL is displayed.

use std::fmt;
use std::str::FromStr;

use reqwest::Url;

/// Why a URL argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a URL ({0})")]
    Parse(String),
    /// Written without `http://` (`localhost:3000/hook`, `127.0.0.1:3000`): the text is not
    /// echoed, since a channel URL is a secret.
    #[error(
        "not a full URL: it needs http:// or https:// in front (such as \
         http://127.0.0.1:3000/hook)"
    )]
    NoScheme,
    /// A channel written without `http://`: its example is a channel's.
    #[error(
        "not a full URL: it needs https:// or http:// in front (such as \
         https://smee.io/YourChannelId)"
    )]
    ChannelNoScheme,
    /// An API base URL written without `http://`: its example is an API's (a webhook target's
    /// would mislead).
    #[error(
        "not a full URL: it needs https:// or http:// in front (such as https://api.github.com, \
         or https://HOST/api/v3 for GitHub Enterprise Server)"
    )]
    ApiNoScheme,
    /// A server's `/new`, which makes a new channel for each request (so each reconnect).
    #[error(
        "this is the server's /new, which makes a new channel for every connection: run \
         `smee-relay new --server URL` once and use the channel URL it prints"
    )]
    NewPage,
    #[error("scheme must be http or https, not {0}")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("port 0 is not a port you can connect to")]
    PortZero,
    /// `http://bob:1234/S3cret@host/`: a password holding `/` makes the URL another one (host
    /// `bob`, port 1234), which would get the events.
    #[error(
        "the path holds an `@`: a password with `/` in it? Write `/` in a password as %2F (and \
         an `@` meant in the path as %40)"
    )]
    AtInPath,
    /// A newline, tab or other control character inside it: the parser would drop it silently.
    #[error("the URL holds a control character (a stray newline or tab?): remove it")]
    Control,
}

/// Parse an absolute http(s) URL with a host and a usable port.
pub fn parse_http_url(text: &str) -> Result<Url, UrlError> {
    // The parser drops a tab or newline inside without a word (and encodes other control
    // characters): a URL other than the one written.
    // (Around it, as the parser does, C0 controls and spaces are trimmed.)
    if (text.trim_matches(|c: char| c <= ' ').chars()).any(char::is_control) {
        return Err(UrlError::Control);
    }
    // `host:port/path` parses as a URL whose scheme is the host (or, for an IP address or a
    // bare host, not at all): what is missing then is the scheme. `mailto:x` has one.
    let no_scheme = |e: String| {
        if text.contains("://") || text.trim().is_empty() {
            UrlError::Parse(e)
        } else {
            UrlError::NoScheme
        }
    };
    let url = Url::parse(text).map_err(|e| no_scheme(e.to_string()))?;
    // The URL parser drops leading spaces and control characters before the scheme.
    let trimmed = text.trim_start_matches(|c: char| c <= ' ');
    let after_scheme = trimmed.get(url.scheme().len()..).unwrap_or("");
    // After the "scheme": a port, or a password followed by `@host` (`bob:pw@host/x`).
    if !text.contains("://")
        && after_scheme.strip_prefix(':').is_some_and(|rest| {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            // `mailto:me@example.com` has a scheme; `bob:pw@host:80` and `bob:pw@host/x` lack it.
            rest.starts_with(|c: char| c.is_ascii_digit())
                || authority
                    .split_once('@')
                    .is_some_and(|(_, host)| host.contains(':') || rest.len() > authority.len())
        })
    {
        return Err(UrlError::NoScheme);
    }
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

/// What makes two URLs one channel (the spool's lock keys on it): scheme, host (any case),
/// port (a default one or not) and path (a trailing slash or not, an unreserved character
/// percent-escaped or not); never the query.
pub fn identity(url: &Url) -> String {
    // `Url` already lower-cases the scheme and a domain host and drops a default port.
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = unreserved_unescaped(url.path());
    let path = path.trim_end_matches('/');
    format!("{}://{host}{port}{path}", url.scheme())
}

/// `path` with each percent-escape of an unreserved character (`%6C` for `l`) written as the
/// character, as RFC 3986 (6.2.2.2) says they are equivalent: a server reads `/ch%61nnel` as
/// `/channel`, so the two must be one channel (helper-122: with the escape, a second relay of
/// the same channel took the lock and every event went out twice). Other escapes stay (with
/// their hex digits in upper case, as the URL parser leaves those it makes).
fn unreserved_unescaped(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return path.into();
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(b as char);
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
                i += 3;
            }
            None => {
                let c = path[i..].chars().next().expect("within the path");
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out.into()
}

/// Text given as a URL but refused, safe to repeat in a message: a password in it (`user:pw@`)
/// shown as `***`, and, for a channel (`channel`: its id is a secret), its last path segment
/// [`redact`]ed and no query, as [`ChannelUrl`] shows a valid one; for a target, its query
/// elided (`?…`).
pub fn shown_text(text: &str, channel: bool) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    // Where the userinfo ends: at the last `@` with a `:` before it, since a password may
    // hold `/`, `#` or `?` unencoded (a base64 token's `/`); in a URL that parses, looked for
    // before its query only (`bob:1234/S3cret@host` parses, as host `bob`, port 1234). An
    // `@` in a path after a port (`h:8080/a@b`) is taken for one too: hidden, not shown.
    let (userinfo, rest) = if Url::parse(text).is_ok() {
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        match rest[..end].rsplit_once('@') {
            Some((userinfo, _)) if userinfo.contains(':') || !userinfo.contains('/') => {
                (Some(userinfo), &rest[userinfo.len() + 1..])
            }
            _ => (None, rest),
        }
    } else {
        match rest.rsplit_once('@') {
            Some((userinfo, after)) if userinfo.contains(':') => (Some(userinfo), after),
            _ => (None, rest),
        }
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, path) = rest.split_at(end);
    let authority = match userinfo {
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => host.to_string(),
    };
    let path = match channel {
        true => {
            let path = path
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_end_matches('/');
            // No path, no `/` (helper-155: `notaurl` was repeated as `notaurl/`).
            match path.rsplit_once('/') {
                Some((parent, id)) => format!("{parent}/{}", redact(id)),
                None => String::new(),
            }
        }
        // A target's query often carries a token: left out, as [`TargetUrl::shown`] does.
        false => match path.split_once('?') {
            Some((before, _)) => format!("{before}?…"),
            None => path.to_string(),
        },
    };
    format!("{scheme}{authority}{path}")
}

/// A listening address (`--listen`, `--metrics-listen`, `metrics_listen`): an IP address and
/// a port. A host name is refused with the form to use, not resolved: which of its addresses
/// would be bound is not for a resolver to decide.
pub fn parse_listen(text: &str) -> Result<std::net::SocketAddr, crate::error::Invalid> {
    text.trim().parse().map_err(|_| {
        let form = match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                format!(" (for this host on all interfaces 0.0.0.0:{port}, for loopback only 127.0.0.1:{port})")
            }
            _ => String::new(),
        };
        format!(
            "{text:?} is not an IP address and port such as 127.0.0.1:9464 or [::1]:9464{form}"
        )
        .into()
    })
}

/// Check a NATS server list as `async-nats` reads it (`nats://a:4222,tls://b:4222`; a bare
/// `host:port` means `nats://`), so a typo is refused when the config is read, by `check` as by
/// `run`, not when `run` connects. The URLs are not repeated in the message: they may hold a
/// password; the server's place in the list says which one.
pub fn check_nats_urls(text: &str) -> Result<(), crate::error::Invalid> {
    let servers: Vec<&str> = text.split(',').map(str::trim).collect();
    if servers.iter().all(|s| s.is_empty()) {
        return Err("no server: give nats://HOST:PORT (comma-separate several)".into());
    }
    let many = servers.len() > 1;
    for (n, server) in servers.iter().enumerate() {
        let which = if many {
            format!("server {} of {}: ", n + 1, servers.len())
        } else {
            String::new()
        };
        let problem = nats_server_problem(server);
        if let Some(problem) = problem {
            return Err(format!(
                "{which}{problem} (expected nats://HOST:PORT, tls://, ws:// or wss://; \
                 comma-separate several servers)"
            )
            .into());
        }
    }
    Ok(())
}

/// What is wrong with one server address of a NATS list, if anything.
fn nats_server_problem(server: &str) -> Option<String> {
    if server.is_empty() {
        return Some("empty (a stray comma?)".into());
    }
    let parsed = if server.contains("://") {
        Url::parse(server)
    } else {
        Url::parse(&format!("nats://{server}"))
    };
    let url = match parsed {
        Ok(url) => url,
        Err(e) => return Some(format!("not a URL ({e})")),
    };
    if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
        return Some(format!(
            "scheme must be nats, tls, ws or wss, not {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some("no host".into());
    }
    if url.port() == Some(0) {
        return Some("port 0 is not a port you can connect to".into());
    }
    None
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
        let url = parse_http_url(text).map_err(|e| match e {
            UrlError::NoScheme => UrlError::ChannelNoScheme,
            e => e,
        })?;
        if url
            .path_segments()
            .and_then(|mut s| s.rfind(|s| !s.is_empty()))
            // Any case: Express (smee.io's older server) routes `/NEW` to `/new` too.
            .is_some_and(|last| last.eq_ignore_ascii_case("new"))
        {
            return Err(UrlError::NewPage);
        }
        Ok(ChannelUrl(url))
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
///
/// Displays (and debug-prints) with its password as `***`; that form also names the target's
/// route in the spool, logs and `/metrics`, so the password is never stored or shown.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetUrl {
    /// The URL requests go to, without user or password (those travel in `Authorization`).
    url: Url,
    /// The user and password from the URL, percent-decoded: sent as Basic auth. A secret.
    credentials: Option<Credentials>,
}

/// `user:password` from a URL. Debug never shows the password.
#[derive(Clone, PartialEq, Eq)]
struct Credentials {
    /// As written in the URL (percent-encoded), for display.
    shown_user: String,
    /// Decoded, for the header.
    user: String,
    /// Decoded, for the header; empty when the URL has none (curl sends `user:` then too).
    password: String,
    /// Whether the URL had a password at all (`user@` shows as is, `user:pw@` as `user:***@`).
    has_password: bool,
}

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
    /// target already has). It carries no credentials: see [`TargetUrl::authorization`].
    pub fn with_query(&self, query: &[(String, String)]) -> Url {
        let mut url = self.url.clone();
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Whether requests to it would go to `channel` itself (a loop: each event posted back).
    pub fn is_channel(&self, channel: &ChannelUrl) -> bool {
        identity(&self.url) == identity(channel.expose())
    }

    /// Whether the URL holds a password (which nothing writes to disk or shows).
    pub fn has_password(&self) -> bool {
        self.credentials.as_ref().is_some_and(|c| c.has_password)
    }

    /// Whether requests to it go in the clear (`http`), as to a port on this machine.
    pub fn is_plain_http(&self) -> bool {
        self.url.scheme() == "http"
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.url.path()
    }

    /// How log lines name the target: `host:port/path`, with `user:***@` in front when the URL
    /// has credentials (the port is always shown, so two local services are told apart).
    pub fn short(&self) -> String {
        // An IPv6 host comes with its brackets.
        let host = self.url.host_str().unwrap_or("");
        let port = self
            .url
            .port_or_known_default()
            .map(|p| format!(":{p}"))
            .unwrap_or_default();
        format!("{}{host}{port}{}", self.userinfo(), self.url.path())
    }

    /// The URL as a person reads it in a summary, with `user:***@` for credentials and the
    /// query left out (`?…`): a query often carries a token (`?token=...`).
    pub fn shown(&self) -> String {
        let mut url = self.url.clone();
        let elided = url.query().is_some_and(|q| !q.is_empty());
        url.set_query(None);
        url.set_fragment(None);
        let text = url.as_str();
        let text = match text.split_once("://") {
            Some((scheme, rest)) => format!("{scheme}://{}{rest}", self.userinfo()),
            None => text.to_owned(),
        };
        if elided { format!("{text}?…") } else { text }
    }

    /// `Authorization: Basic ...` for the credentials in the URL, if it had any. Marked
    /// sensitive, so http's Debug does not print it.
    pub fn authorization(&self) -> Option<http::HeaderValue> {
        use base64::Engine as _;
        let c = self.credentials.as_ref()?;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
        let mut value = http::HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// What an answer of the target may echo that no log may show, longest first: its
    /// password, its Basic credentials, its query whole and each value in it (or key alone)
    /// of four bytes or more (as sent and decoded). A debug page or an echo service repeats
    /// the request.
    pub fn secrets(&self) -> Vec<String> {
        use base64::Engine as _;
        let mut secrets = Vec::new();
        if let Some(c) = self.credentials.as_ref().filter(|c| c.has_password) {
            secrets.push(c.password.clone());
            secrets.push(
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.user, c.password)),
            );
        }
        if let Some(query) = self.url.query() {
            secrets.push(query.to_string());
            for pair in query.split('&') {
                // A key alone (`?S3cretToken`) is the token.
                let value = pair.split_once('=').map_or(pair, |(_, value)| value);
                secrets.push(value.to_string());
                let decoded = percent_encoding::percent_decode_str(&value.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned();
                secrets.push(decoded);
            }
        }
        secrets.retain(|s| s.len() >= 4);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        secrets
    }

    /// The path's segments of four bytes or more, for a URL whose path is the secret (a Slack
    /// webhook's `/services/T…/B…/X…`): what [`TargetUrl::secrets`] leaves out of an ordinary
    /// target.
    pub fn path_secrets(&self) -> Vec<String> {
        (self.url.path().split('/'))
            .filter(|segment| segment.len() >= 4)
            .map(String::from)
            .collect()
    }

    /// `user:***@`, `user@` or nothing.
    fn userinfo(&self) -> String {
        match &self.credentials {
            Some(c) if c.has_password => format!("{}:***@", c.shown_user),
            Some(c) => format!("{}@", c.shown_user),
            None => String::new(),
        }
    }
}

impl FromStr for TargetUrl {
    type Err = UrlError;
    fn from_str(text: &str) -> Result<Self, UrlError> {
        let mut url = parse_http_url(text)?;
        if url.path().contains('@') {
            return Err(UrlError::AtInPath);
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let credentials =
            (!url.username().is_empty() || url.password().is_some()).then(|| Credentials {
                shown_user: url.username().to_string(),
                user: decode(url.username()),
                password: decode(url.password().unwrap_or("")),
                has_password: url.password().is_some(),
            });
        // An http(s) URL with a host always accepts these.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(TargetUrl { url, credentials })
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.url.as_str();
        match url.split_once("://") {
            Some((scheme, rest)) => write!(f, "{scheme}://{}{rest}", self.userinfo()),
            None => f.write_str(url),
        }
    }
}

impl fmt::Debug for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TargetUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `events replay --to 'http://host/hook?token=SECRET'` printed the token in its summary.
    #[test]
    fn regression_a_token_in_a_replay_targets_query_was_printed() {
        let to: TargetUrl = "http://bob:hunter2@127.0.0.1:4000/hook?token=SECRET#x"
            .parse()
            .unwrap();
        assert_eq!(to.shown(), "http://bob:***@127.0.0.1:4000/hook?…");
        let plain: TargetUrl = "https://example.com/hook".parse().unwrap();
        assert_eq!(plain.shown(), "https://example.com/hook");
    }

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
            "http://".parse::<TargetUrl>(),
            Err(UrlError::Parse(_))
        ));
        assert_eq!("nope".parse::<TargetUrl>(), Err(UrlError::NoScheme));
        assert_eq!(
            " \u{1}localhost:1".parse::<TargetUrl>(),
            Err(UrlError::NoScheme)
        );
        assert_eq!(
            "mailto:me@example.com".parse::<TargetUrl>(),
            Err(UrlError::Scheme("mailto".into()))
        );
        assert_eq!(
            "http://127.0.0.1:0/".parse::<TargetUrl>(),
            Err(UrlError::PortZero)
        );
        assert_eq!(TargetUrl::local(0, "/"), Err(UrlError::PortZero));
    }

    /// Regression: `-t localhost:3000/hook` was refused with "scheme must be http or https,
    /// not localhost", and `-t 127.0.0.1:3000/hook` with "relative URL without a base": neither
    /// says that `http://` is missing.
    #[test]
    fn regression_a_url_without_its_scheme_was_not_said_to_lack_one() {
        for text in [
            "localhost:4567/hook",
            "10.0.0.5:4567/hook",
            "smee.io/AbCd1234",
        ] {
            let said = text.parse::<TargetUrl>().unwrap_err().to_string();
            assert!(
                said.contains("needs http:// or https:// in front"),
                "{text}: {said}"
            );
            // A channel URL is a secret: the message does not repeat it.
            let said = text.parse::<ChannelUrl>().unwrap_err().to_string();
            assert!(!said.contains(text), "{said}");
        }
    }

    /// Regression: `--metrics-listen localhost:9464` said only "invalid socket address syntax".
    #[test]
    fn regression_a_host_name_to_listen_on_got_no_hint() {
        let said = parse_listen("localhost:9464").unwrap_err().to_string();
        assert!(said.contains("127.0.0.1:9464"), "{said}");
        assert!(said.contains("\"localhost:9464\""), "{said}");
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            "[::1]:80".parse::<std::net::SocketAddr>().unwrap()
        );
        assert!(parse_listen("9464").is_err());
    }

    /// Regression (helper-115): `http://bob:1234/S3cret@127.0.0.1:1/x` (a password holding
    /// `/`) parsed as host `bob`, port 1234: logged whole, and the events sent there.
    #[test]
    fn regression_a_password_with_a_slash_made_another_valid_url() {
        assert_eq!(
            "http://bob:1234/S3cret@127.0.0.1:1/x".parse::<TargetUrl>(),
            Err(UrlError::AtInPath)
        );
        assert!(
            "http://bob:1234%2FS3cret@127.0.0.1:1/x"
                .parse::<TargetUrl>()
                .is_ok()
        );
        assert!(
            "http://127.0.0.1:1/users/%40me"
                .parse::<TargetUrl>()
                .is_ok()
        );
    }

    /// Regression (helper-114): a control character inside a URL (a stray newline in a config
    /// string, `\u0001`) was dropped or percent-encoded by the URL parser without a word, so
    /// the relay posted somewhere the user never wrote; the README says it is refused.
    #[test]
    fn regression_a_control_character_inside_a_url_was_taken() {
        for text in [
            "http://127.0.0.1:3000/a\nb",
            "http://127.0.0.1:3000/a\u{1}b",
            "http://127.0.\t0.1/",
        ] {
            assert_eq!(parse_http_url(text), Err(UrlError::Control), "{text:?}");
        }
        // Around it, blanks are trimmed as before.
        assert!(parse_http_url(" http://127.0.0.1:3000/a\n").is_ok());
    }

    /// Regression (helper-114): a refused target whose password held `/`, `#` or `?` (a base64
    /// token's `/`) was cut at it, taken for the host, and shown; so was a scheme-relative
    /// redirect's (`//user:pw@host/`).
    #[test]
    fn regression_a_password_with_a_slash_was_shown() {
        for (given, shown) in [
            ("http://bob:BAD/PW4@h/x?token=T", "http://bob:***@h/x?…"),
            ("http://bob:BAD#PW9@h/x?token=T", "http://bob:***@h/x?…"),
            ("http://bob:BAD?PW@h/x", "http://bob:***@h/x"),
            (
                "http://ruser:RPW6/x@127.0.0.1/",
                "http://ruser:***@127.0.0.1/",
            ),
            (
                "//ruser:RPW1@127.0.0.1:1/x?token=T",
                "//ruser:***@127.0.0.1:1/x?…",
            ),
            // A URL that parses keeps its `@` in the path or query where it is.
            ("http://h/a@b?email=a@b", "http://h/a@b?…"),
            (
                "http://bob:1234/S3cret@127.0.0.1:1/x",
                "http://bob:***@127.0.0.1:1/x",
            ),
            ("http://h/users/@me", "http://h/users/@me"),
        ] {
            assert_eq!(shown_text(given, false), shown, "{given}");
        }
    }

    /// Regression: a refused URL was repeated whole: `invalid value 'smee.io/AbCdSECRET' for
    /// '[CHANNEL_URL]'`, `forward target "bob:hunter2@host/x"`: a channel's id and a target's
    /// password in the terminal and the logs. And `bob:pw@host` was not seen to lack `http://`.
    /// Then (helper-113): a refused target, or a redirect's `Location`, kept its query (a token).
    #[test]
    fn regression_a_refused_url_was_repeated_with_its_secrets() {
        assert_eq!(
            shown_text("smee.io/AbCdSECRETSECRET", true),
            "smee.io/AbCd…"
        );
        assert_eq!(
            shown_text("smee.io/x/AbCdSECRET/?token=SECRET", true),
            "smee.io/x/AbCd…"
        );
        assert_eq!(
            shown_text("bob:hunter2@127.0.0.1:21412/x", false),
            "bob:***@127.0.0.1:21412/x"
        );
        assert_eq!(
            shown_text("http://bob:hunter2@127.0.0.1:99999/x?q=1", false),
            "http://bob:***@127.0.0.1:99999/x?…"
        );
        assert_eq!(shown_text("ftp://x/y", false), "ftp://x/y");
        // helper-155: a value with no path was repeated with a `/` the user never typed.
        assert_eq!(shown_text("notaurl", true), "notaurl");
        assert_eq!(shown_text("https://smee.io", true), "https://smee.io");
        assert_eq!(
            "bob:hunter2@127.0.0.1:21412/x".parse::<TargetUrl>(),
            Err(UrlError::NoScheme)
        );
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

    #[test]
    fn credentials_are_sent_as_basic_auth_and_shown_redacted() {
        let t: TargetUrl = "http://alice:s%3Acret@127.0.0.1:3000/hook?x=1"
            .parse()
            .unwrap();
        assert_eq!(t.to_string(), "http://alice:***@127.0.0.1:3000/hook?x=1");
        assert_eq!(
            format!("{t:?}"),
            "TargetUrl(http://alice:***@127.0.0.1:3000/hook?x=1)"
        );
        assert_eq!(t.short(), "alice:***@127.0.0.1:3000/hook");
        assert_eq!(
            t.with_query(&[]).as_str(),
            "http://127.0.0.1:3000/hook?x=1",
            "the request URL carries no credentials"
        );
        let auth = t.authorization().unwrap();
        assert!(auth.is_sensitive());
        // base64("alice:s:cret"): the password is percent-decoded, as curl does.
        assert_eq!(auth.to_str().unwrap(), "Basic YWxpY2U6czpjcmV0");
        let user_only: TargetUrl = "https://bot@example.com/h".parse().unwrap();
        assert_eq!(user_only.to_string(), "https://bot@example.com/h");
        assert_eq!(user_only.short(), "bot@example.com:443/h");
        assert_eq!(
            user_only.authorization().unwrap().to_str().unwrap(),
            "Basic Ym90Og=="
        );
        let plain = TargetUrl::local(3000, "/hook").unwrap();
        assert!(plain.authorization().is_none());
        assert_eq!(plain.short(), "127.0.0.1:3000/hook");
    }

    /// What `async-nats` accepts passes; what it would refuse at connect is refused here, with
    /// the server's place in the list and no password.
    #[test]
    fn nats_urls_are_checked_as_the_client_reads_them() {
        for ok in [
            "nats://10.0.0.1:4222",
            "nats://a:4222, nats://b:4222",
            "tls://app:hunter2@nats.example:4222",
            "ws://h:80,wss://h:443",
            "host:4222",
        ] {
            assert_eq!(check_nats_urls(ok), Ok(()), "{ok}");
        }
        let e = check_nats_urls("htp://host:4222").unwrap_err().0;
        assert!(
            e.contains(r#"scheme must be nats, tls, ws or wss, not "htp""#),
            "{e}"
        );
        let e = check_nats_urls("nats://a:4222, nats://bad host:4222")
            .unwrap_err()
            .0;
        assert!(e.starts_with("server 2 of 2: not a URL"), "{e}");
        let e = check_nats_urls("nats://u:hunter2@a:4222,").unwrap_err().0;
        assert!(e.contains("server 2 of 2: empty"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(
            check_nats_urls(" , ")
                .unwrap_err()
                .0
                .starts_with("no server")
        );
        assert!(check_nats_urls("nats://:4222").is_err());
    }
}
