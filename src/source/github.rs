//! GitHub's REST API as a second source of webhooks: the deliveries GitHub kept of one
//! repository or organisation hook, turned into [`Event`]s marked as recovered.
//!
//! smee.io keeps nothing: what GitHub posted while no relay listened is gone from the channel,
//! but GitHub keeps every hook delivery for days. This module lists them
//! (`GET …/hooks/{id}/deliveries`, newest first, paged by the `cursor` of the `Link` header),
//! and fetches one in full (`GET …/deliveries/{id}`: `request.headers`, `request.payload`).
//!
//! What a recovered event is: GitHub's API returns the payload parsed, not the bytes it signed,
//! so the body is the payload re-serialised as compact JSON (form-encoded as `payload=…` when the
//! hook posts forms), the `x-hub-signature*` headers are dropped (they could not verify), and
//! `x-smee-relay-recovered: github` is added.
//!
//! Rate limits are obeyed: an answer with `x-ratelimit-remaining: 0` makes the next request wait
//! until `x-ratelimit-reset`; a 403 or 429 with `retry-after` (a secondary limit) or with the
//! primary limit exhausted is retried after the wait. No wait is longer than
//! [`MAX_RATE_WAIT`]: beyond it the run stops with an error that says when to try again.
//!
//! This module does not know the spool: comparing with what is stored, and storing, is the
//! caller's (`service::catch_up`). The token is a [`SecretString`], never logged.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::Deserialize;
use tokio::time::Instant;

use crate::event::Event;
use crate::secret::{ExposeSecret as _, SecretString};

/// The header a recovered event carries, with the value `github`.
pub const RECOVERED_HEADER: &str = "x-smee-relay-recovered";

/// The header that names a GitHub delivery (its GUID; a redelivery has the same one).
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// The longest rate-limit wait obeyed; a longer one ends the run with an error.
pub const MAX_RATE_WAIT: Duration = Duration::from_secs(15 * 60);

/// How many times one request is tried when GitHub answers with a rate limit.
const RATE_LIMITED_ATTEMPTS: u32 = 5;

/// The largest delivery detail read: GitHub caps a payload at 25 MB; headers and JSON escaping
/// come on top.
const DETAIL_BODY_MAX: usize = 32 * 1024 * 1024;

/// The largest page of the delivery list read (100 short summaries are a few tens of KB).
const LIST_BODY_MAX: usize = 4 * 1024 * 1024;

/// More list pages than this (100 deliveries each) is a loop in GitHub's cursor, not a history.
const MAX_LIST_PAGES: usize = 1000;

/// GitHub's default API (GitHub Enterprise Server: `https://HOST/api/v3`).
pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// Whose hook: a repository's or an organisation's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookOwner {
    /// `OWNER/REPO`.
    Repo { owner: String, repo: String },
    /// An organisation.
    Org(String),
}

impl HookOwner {
    /// `OWNER/REPO` as a repository; anything else is refused with what is expected.
    pub fn repo(text: &str) -> Result<Self, crate::error::Invalid> {
        match text.split_once('/') {
            Some((owner, repo)) if valid_name(owner) && valid_name(repo) => Ok(Self::Repo {
                owner: owner.into(),
                repo: repo.into(),
            }),
            _ => Err(format!("{text:?} is not OWNER/REPO (e.g. octo-org/octo-repo)").into()),
        }
    }

    /// An organisation's login.
    pub fn org(text: &str) -> Result<Self, crate::error::Invalid> {
        if valid_name(text) {
            Ok(Self::Org(text.into()))
        } else {
            Err(format!("{text:?} is not an organisation login").into())
        }
    }
}

impl std::fmt::Display for HookOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Repo { owner, repo } => write!(f, "repository {owner}/{repo}"),
            Self::Org(org) => write!(f, "organisation {org}"),
        }
    }
}

/// A login or repository name: what GitHub allows, so a name cannot change the request path.
fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text != "."
        && text != ".."
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// One hook whose deliveries can be read.
#[derive(Clone, Debug)]
pub struct HookConfig {
    /// The repository or organisation the hook belongs to.
    pub owner: HookOwner,
    /// The hook's id (in the hook's settings URL).
    pub hook: u64,
    /// The API base, e.g. `https://api.github.com` or `https://ghe.example.com/api/v3`.
    pub api_url: reqwest::Url,
    /// A token that may read the hook (`admin:repo_hook` / `admin:org_hook`, or a fine-grained
    /// token with webhooks read). A secret.
    pub token: SecretString,
}

/// A channel's catch-up after each gap (`[channel.github_catch_up]`).
#[derive(Clone, Debug)]
pub struct CatchUp {
    /// The hook whose deliveries reach this channel.
    pub hook: HookConfig,
    /// How far back each run looks (deliveries older than this are not compared). Keep it
    /// within how long the spool keeps delivered events (`--retain`), or older deliveries no
    /// longer in the spool would be recovered again.
    pub since: Duration,
}

/// Read a token from `path`; a relative path not found as given is looked up in
/// `credentials` (systemd's `$CREDENTIALS_DIRECTORY`: `LoadCredential=github-token:/path`).
/// One trailing newline is not part of the token.
pub fn read_token_file(
    path: &std::path::Path,
    credentials: Option<&std::path::Path>,
) -> Result<SecretString, crate::error::Invalid> {
    let found = match credentials {
        Some(dir) if path.is_relative() && !path.exists() => dir.join(path),
        _ => path.to_owned(),
    };
    let text = std::fs::read_to_string(&found)
        .map_err(|e| format!("cannot read the token file {}: {e}", found.display()))?;
    let token = text.strip_suffix('\n').unwrap_or(&text);
    let token = token.strip_suffix('\r').unwrap_or(token);
    if token.is_empty() || http::HeaderValue::from_str(token).is_err() {
        return Err(format!(
            "the token file {} holds no token (empty, or control characters)",
            found.display()
        )
        .into());
    }
    Ok(SecretString::from(token.to_string()))
}

/// Why GitHub's deliveries could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("cannot build the HTTP client for the GitHub API")]
    Client(#[source] reqwest::Error),
    #[error("cannot reach the GitHub API at {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "the GitHub API refused the token ({status}{message}): check the token (`--token-env` / \
         `--token-file`, or `token_env` / `token_file` in the config's \
         `[channel.github_catch_up]`); it needs admin:repo_hook or admin:org_hook, or webhooks \
         read access"
    )]
    Unauthorized { status: u16, message: String },
    #[error("the GitHub API answered {status} for {url}{message}")]
    Status {
        status: u16,
        url: String,
        message: String,
    },
    #[error(
        "the GitHub API rate limit allows the next request in {}, more than the {} catch-up \
         waits; run it again later",
        humantime::format_duration(*wait),
        humantime::format_duration(MAX_RATE_WAIT)
    )]
    RateLimited { wait: Duration },
    #[error("the GitHub API answer from {url} is not what was expected")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the GitHub API's answer from {url}")]
    Body {
        url: String,
        #[source]
        source: crate::http::BodyError,
    },
    #[error("the GitHub API's delivery list at {url} {why}; run again with a shorter --since")]
    Paging { url: String, why: String },
    #[error("the GitHub API base URL {0:?} cannot take a path")]
    BadApiUrl(String),
}

impl GithubError {
    /// Whether the error is about one delivery (its detail is gone, or unreadable), so the
    /// others can still be recovered; the others (the token, the rate limit, GitHub down)
    /// concern every request.
    pub fn concerns_one_delivery(&self) -> bool {
        match self {
            GithubError::Status { status, .. } => {
                (400..500).contains(status) && !matches!(status, 401 | 403 | 429)
            }
            GithubError::Decode { .. } => true,
            GithubError::Body { source, .. } => {
                matches!(source, crate::http::BodyError::TooLarge { .. })
            }
            _ => false,
        }
    }
}

/// One entry of a hook's delivery list.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DeliverySummary {
    /// GitHub's id of this delivery attempt (a redelivery has its own).
    pub id: u64,
    /// The delivery's GUID: `x-github-delivery`, shared by redeliveries.
    pub guid: String,
    /// When GitHub delivered it (RFC 3339).
    pub delivered_at: String,
    /// Whether this attempt was a redelivery of an earlier GUID.
    #[serde(default)]
    pub redelivery: bool,
    /// `x-github-event`.
    #[serde(default)]
    pub event: String,
    /// The payload's `action`, if it has one.
    #[serde(default)]
    pub action: Option<String>,
    /// What the receiver (smee.io) answered.
    #[serde(default)]
    pub status_code: u16,
}

impl DeliverySummary {
    /// `delivered_at` in ms since the epoch, if it parses.
    pub fn delivered_ms(&self) -> Option<u64> {
        humantime::parse_rfc3339_weak(&self.delivered_at)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
    }
}

#[derive(Deserialize)]
struct DeliveryDetail {
    request: DeliveryRequest,
}

#[derive(Deserialize)]
struct DeliveryRequest {
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    payload: serde_json::Value,
}

/// A client for one hook's deliveries.
pub struct HookClient {
    /// The hook and credentials.
    config: HookConfig,
    /// The HTTP client (rustls, the process's trust).
    http: reqwest::Client,
    /// Obeys the rate limits GitHub announces.
    limiter: RateLimiter,
}

impl HookClient {
    pub fn new(config: HookConfig) -> Result<Self, GithubError> {
        let http = crate::http::client_builder_for(&config.api_url)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(GithubError::Client)?;
        Ok(Self {
            config,
            http,
            limiter: RateLimiter::default(),
        })
    }

    /// What the hook is, for messages.
    pub fn describe(&self) -> String {
        format!("hook {} of {}", self.config.hook, self.config.owner)
    }

    /// `…/hooks/{id}/deliveries` with `rest` path segments after it.
    fn url(&self, rest: &[&str]) -> Result<reqwest::Url, GithubError> {
        let mut url = self.config.api_url.clone();
        let bad = || GithubError::BadApiUrl(shown(&self.config.api_url));
        {
            let mut path = url.path_segments_mut().map_err(|_| bad())?;
            path.pop_if_empty();
            match &self.config.owner {
                HookOwner::Repo { owner, repo } => path.extend(["repos", owner, repo]),
                HookOwner::Org(org) => path.extend(["orgs", org]),
            };
            path.extend(["hooks", &self.config.hook.to_string(), "deliveries"]);
            path.extend(rest);
        }
        Ok(url)
    }

    /// The hook's deliveries made at `since_ms` or later, oldest first. Stops paging at the
    /// first page that reaches back before `since_ms`.
    /// An entry that does not decode is not fatal: it is in [`Listing::unreadable`].
    pub async fn deliveries(&mut self, since_ms: u64) -> Result<Listing, GithubError> {
        let mut out = Vec::new();
        let mut unreadable = Vec::new();
        let mut cursor: Option<String> = None;
        let mut cursors = std::collections::HashSet::new();
        for _ in 0..MAX_LIST_PAGES {
            let mut url = self.url(&[])?;
            url.query_pairs_mut().append_pair("per_page", "100");
            if let Some(cursor) = &cursor {
                url.query_pairs_mut().append_pair("cursor", cursor);
            }
            let (headers, body) =
                self.get(url.clone(), LIST_BODY_MAX)
                    .await
                    .map_err(|e| match e {
                        // GitHub answers 404, not 403, for a hook the token may not read.
                        GithubError::Status {
                            status: 404,
                            url,
                            message,
                        } => GithubError::Status {
                            status: 404,
                            url,
                            message: format!(
                                "{message}; check the repo/org and hook id, and that the token can \
                             read the hook (admin:repo_hook / admin:org_hook)"
                            ),
                        },
                        e => e,
                    })?;
            let page: Vec<serde_json::Value> =
                serde_json::from_slice(&body).map_err(|source| GithubError::Decode {
                    url: shown(&url),
                    source,
                })?;
            let mut reached_since = page.is_empty();
            for entry in page {
                let delivery = match DeliverySummary::deserialize(&entry) {
                    Ok(delivery) => delivery,
                    Err(e) => {
                        unreadable.push(format!(
                            "list entry (id {}, guid {}): {e}",
                            entry["id"], entry["guid"]
                        ));
                        continue;
                    }
                };
                // A time that does not parse is kept: better compared than lost.
                if delivery.delivered_ms().is_some_and(|ms| ms < since_ms) {
                    reached_since = true;
                    continue;
                }
                out.push(delivery);
            }
            cursor = next_cursor(&headers);
            match &cursor {
                _ if reached_since => return Ok(Listing::new(out, unreadable)),
                None => return Ok(Listing::new(out, unreadable)),
                Some(next) if !cursors.insert(next.clone()) => {
                    return Err(GithubError::Paging {
                        url: shown(&url),
                        why: format!("gave the cursor {next:?} twice (a loop)"),
                    });
                }
                Some(_) => {}
            }
        }
        Err(GithubError::Paging {
            url: shown(&self.url(&[])?),
            why: format!("did not end after {MAX_LIST_PAGES} pages"),
        })
    }
}

/// A hook's deliveries since a time.
#[derive(Debug, Default)]
pub struct Listing {
    /// Oldest first.
    pub deliveries: Vec<DeliverySummary>,
    /// Entries that did not decode (what could be read of them, and why): one bad entry does
    /// not hide the others.
    pub unreadable: Vec<String>,
}

impl Listing {
    fn new(deliveries: Vec<DeliverySummary>, unreadable: Vec<String>) -> Self {
        Self {
            deliveries: oldest_first(deliveries),
            unreadable,
        }
    }
}

/// Deliveries in the order they were sent.
fn oldest_first(mut out: Vec<DeliverySummary>) -> Vec<DeliverySummary> {
    {
        // GitHub lists newest first; events go in in the order they were sent. Equal times keep
        // GitHub's order of ids.
        out.sort_by_key(|d| (d.delivered_ms().unwrap_or(0), d.id));
    }
    out
}

impl HookClient {
    /// One delivery as the event GitHub posted (see the module header for what differs).
    pub async fn event(
        &mut self,
        delivery: &DeliverySummary,
        ignore_events: &[String],
    ) -> Result<Option<Event>, GithubError> {
        let url = self.url(&[&delivery.id.to_string()])?;
        let (_, body) = self.get(url.clone(), DETAIL_BODY_MAX).await?;
        let detail: DeliveryDetail =
            serde_json::from_slice(&body).map_err(|source| GithubError::Decode {
                url: shown(&url),
                source,
            })?;
        let event = recovered_event(detail.request, delivery);
        let ignored = !ignore_events.is_empty()
            && event
                .header("x-github-event")
                .is_some_and(|name| ignore_events.iter().any(|i| i.eq_ignore_ascii_case(name)));
        Ok((!ignored).then_some(event))
    }

    /// GET `url` with the token, obeying rate limits; the headers and body of a 2xx answer.
    /// A body past `limit` bytes is an error.
    async fn get(
        &mut self,
        url: reqwest::Url,
        limit: usize,
    ) -> Result<(HeaderMap, bytes::Bytes), GithubError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limiter.ready().await?;
            // reqwest's error would show the whole URL (a password in it too): `url` says it.
            let request = |e: reqwest::Error| GithubError::Request {
                url: shown(&url),
                source: e.without_url(),
            };
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(self.config.token.expose_secret())
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28")
                .send()
                .await
                .map_err(request)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let now_s = crate::clock::now_ms() / 1000;
            let body = crate::http::read_capped(response, limit)
                .await
                .map_err(|source| GithubError::Body {
                    url: shown(&url),
                    source,
                })?;
            if (200..300).contains(&status) {
                self.limiter.saw(&headers, now_s);
                return Ok((headers, body));
            }
            if let Some(wait) = rate_limit_wait(status, &headers, now_s)
                && attempt < RATE_LIMITED_ATTEMPTS
            {
                // Too long to wait: the error says so; a "waiting" line first contradicted it
                // (helper-121).
                if wait > MAX_RATE_WAIT {
                    return Err(GithubError::RateLimited { wait });
                }
                self.limiter.wait_for(wait);
                tracing::warn!(
                    "GitHub API rate limit ({status}): waiting {} before trying again",
                    humantime::format_duration(wait)
                );
                continue;
            }
            let message = without_token(api_message(&body), self.config.token.expose_secret());
            return Err(match status {
                // A 403 that is no rate limit: the token lacks the permission (helper-121: it
                // came with no hint).
                401 | 403 => GithubError::Unauthorized { status, message },
                _ => GithubError::Status {
                    status,
                    url: shown(&url),
                    message,
                },
            });
        }
    }
}

/// The URL for a message: without its query (cursors are long and say nothing) and without
/// any user or password it carries (`--api-url https://user:pass@ghe/...`: secrets).
fn shown(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    if !url.username().is_empty() || url.password().is_some() {
        let _ = url.set_username("");
        let _ = url.set_password(None);
        return url.to_string().replacen("://", "://[redacted]@", 1);
    }
    url.to_string()
}

/// `message` with every occurrence of `token` replaced: GitHub's error messages may quote
/// what was sent.
fn without_token(message: String, token: &str) -> String {
    if token.is_empty() {
        message
    } else {
        message.replace(token, "[redacted token]")
    }
}

/// `: <GitHub's message>`, if the answer has one.
fn api_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_slice::<Message>(body)
        .map(|m| {
            let text: String = m.message.chars().filter(|c| !c.is_control()).collect();
            format!(": {text}")
        })
        .unwrap_or_default()
}

/// The `cursor` of the `rel="next"` link, if there is a next page.
fn next_cursor(headers: &HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == r#"rel="next""#)
            .then_some(())?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let url = reqwest::Url::parse(target).ok()?;
        url.query_pairs()
            .find(|(k, _)| k == "cursor")
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    })
}

/// How long to wait before trying again, when an answer is a rate limit: a 403 or 429 with
/// `retry-after` (secondary limits), or with the primary limit used up
/// (`x-ratelimit-remaining: 0`, until `x-ratelimit-reset`). `None`: not a rate limit.
pub fn rate_limit_wait(status: u16, headers: &HeaderMap, now_s: u64) -> Option<Duration> {
    if status != 403 && status != 429 {
        return None;
    }
    let number =
        |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    if let Some(seconds) = number("retry-after") {
        return Some(Duration::from_secs(seconds.max(1)));
    }
    if number("x-ratelimit-remaining") == Some(0) {
        let reset = number("x-ratelimit-reset")?;
        return Some(Duration::from_secs(reset.saturating_sub(now_s).max(1)));
    }
    None
}

/// Keeps requests within what GitHub announced: after an answer that used up the limit, the
/// next request waits until the reset. A wait beyond [`MAX_RATE_WAIT`] is an error, but only
/// when a request has to wait: a run whose last answer used up the limit still succeeds.
#[derive(Debug, Default)]
pub struct RateLimiter {
    /// No request before this; with how long that was when it was set (for the message).
    not_before: Option<(Instant, Duration)>,
}

impl RateLimiter {
    /// Wait until a request may be made; an error, at once, if that is beyond the bound.
    pub async fn ready(&mut self) -> Result<(), GithubError> {
        if let Some((at, wait)) = self.not_before.take() {
            if wait > MAX_RATE_WAIT {
                return Err(GithubError::RateLimited { wait });
            }
            tokio::time::sleep_until(at).await;
        }
        Ok(())
    }

    /// Take note of a successful answer's rate-limit headers.
    pub fn saw(&mut self, headers: &HeaderMap, now_s: u64) {
        let number =
            |name: &str| -> Option<u64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
        if number("x-ratelimit-remaining") == Some(0)
            && let Some(reset) = number("x-ratelimit-reset")
        {
            self.wait_for(Duration::from_secs(reset.saturating_sub(now_s).max(1)));
        }
    }

    /// The next request waits `wait`. GitHub's headers are input: a wait too long for the clock
    /// (`retry-after: 18446744073709551615`) must not overflow it; beyond the bound it is an
    /// error in [`Self::ready`] anyway, so the deadline is clamped just past it.
    pub fn wait_for(&mut self, wait: Duration) {
        let clamped = wait.min(MAX_RATE_WAIT + Duration::from_secs(1));
        self.not_before = Some((Instant::now() + clamped, wait));
    }
}

/// The event GitHub posted, as well as the API can give it back.
fn recovered_event(request: DeliveryRequest, delivery: &DeliverySummary) -> Event {
    use super::wire::{NEVER_FORWARDED, OWN_HEADER_PREFIX};
    let mut headers = Vec::new();
    for (name, value) in &request.headers {
        let name = name.to_ascii_lowercase();
        let Some(value) = value.as_str() else {
            continue;
        };
        if NEVER_FORWARDED.contains(&name.as_str())
            || name.starts_with("proxy-")
            || name.starts_with(OWN_HEADER_PREFIX)
            // Signed over bytes the API no longer has: they would only fail verification.
            || name.starts_with("x-hub-signature")
            || http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_str(value).is_err()
        {
            continue;
        }
        headers.push((name, value.to_string()));
    }
    // The GUID is what later runs compare; make sure it is there, as the list said it.
    if !headers.iter().any(|(n, _)| n == DELIVERY_HEADER) {
        headers.push((DELIVERY_HEADER.into(), delivery.guid.clone()));
    }
    headers.push((RECOVERED_HEADER.into(), "github".into()));
    let json = serde_json::to_string(&request.payload).unwrap_or_else(|_| "null".into());
    let form = headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.starts_with("application/x-www-form-urlencoded"));
    let body = if form {
        let mut url = reqwest::Url::parse("http://form/").expect("a valid URL");
        url.query_pairs_mut().append_pair("payload", &json);
        url.query().unwrap_or("").to_string()
    } else {
        json
    };
    Event {
        sse_id: None,
        timestamp_ms: delivery.delivered_ms(),
        headers,
        query: Vec::new(),
        body: body.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn rate_limits_are_told_apart_from_refusals() {
        let now = 1_000_000;
        assert_eq!(
            rate_limit_wait(403, &headers(&[("retry-after", "30")]), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            rate_limit_wait(
                429,
                &headers(&[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "1000090")
                ]),
                now
            ),
            Some(Duration::from_secs(90))
        );
        // A 403 that is no rate limit (no permission) is an error, not a wait.
        assert_eq!(
            rate_limit_wait(403, &headers(&[("x-ratelimit-remaining", "4999")]), now),
            None
        );
        assert_eq!(
            rate_limit_wait(500, &headers(&[("retry-after", "5")]), now),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_up_limit_makes_the_next_request_wait_until_the_reset() {
        let mut limiter = RateLimiter::default();
        let now_s = 1_000_000;
        limiter.saw(
            &headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "1000120"),
            ]),
            now_s,
        );
        let start = Instant::now();
        limiter.ready().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(120));
        // Once waited, the next request goes at once.
        let start = Instant::now();
        limiter.ready().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Remaining requests: no wait.
        limiter.saw(&headers(&[("x-ratelimit-remaining", "12")]), now_s);
        limiter.ready().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_beyond_the_bound_is_an_error_at_once() {
        let mut limiter = RateLimiter::default();
        // Noted without error: no request may need to wait.
        limiter.saw(
            &headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "5000"),
            ]),
            1000,
        );
        let start = Instant::now();
        let e = limiter.ready().await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(matches!(e, GithubError::RateLimited { .. }), "{e}");
        assert!(e.to_string().contains("run it again later"), "{e}");
        // A secondary limit within the bound is waited out.
        limiter.wait_for(MAX_RATE_WAIT);
        limiter.ready().await.unwrap();
        assert_eq!(start.elapsed(), MAX_RATE_WAIT);
    }

    /// Regression: an absurd `retry-after` or `x-ratelimit-reset` overflowed `Instant` and
    /// panicked the catch-up (the daemon's task died silently).
    #[tokio::test(start_paused = true)]
    async fn an_absurd_rate_limit_wait_is_an_error_not_a_panic() {
        for wait in [
            rate_limit_wait(403, &headers(&[("retry-after", "18446744073709551615")]), 5),
            rate_limit_wait(
                429,
                &headers(&[
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "18446744073709551615"),
                ]),
                5,
            ),
        ] {
            let mut limiter = RateLimiter::default();
            limiter.wait_for(wait.unwrap());
            let e = limiter.ready().await.unwrap_err();
            assert!(e.to_string().contains("run it again later"), "{e}");
        }
        let mut limiter = RateLimiter::default();
        limiter.saw(
            &headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "18446744073709551615"),
            ]),
            5,
        );
        assert!(limiter.ready().await.is_err());
    }

    #[test]
    fn the_next_cursor_comes_from_the_link_header() {
        let link = r#"<https://api.github.com/repos/o/r/hooks/1/deliveries?per_page=100&cursor=v1_12>; rel="next", <https://api.github.com/x?cursor=v1_1>; rel="prev""#;
        assert_eq!(
            next_cursor(&headers(&[("link", link)])).as_deref(),
            Some("v1_12")
        );
        let last = r#"<https://api.github.com/x?cursor=v1_1>; rel="prev""#;
        assert_eq!(next_cursor(&headers(&[("link", last)])), None);
        assert_eq!(next_cursor(&HeaderMap::new()), None);
    }

    #[test]
    fn a_recovered_event_is_compact_json_without_signatures_and_marked() {
        let request: DeliveryRequest = serde_json::from_str(
            r#"{"headers":{"Accept":"*/*","X-GitHub-Delivery":"g-1","X-GitHub-Event":"push",
                "X-Hub-Signature":"sha1=x","X-Hub-Signature-256":"sha256=y","Host":"smee.io",
                "content-type":"application/json","X-Smee-Relay-Alert":"forged"},
                "payload":{ "ref" : "refs/heads/main", "n": [1, 2] }}"#,
        )
        .unwrap();
        let summary = DeliverySummary {
            id: 7,
            guid: "g-1".into(),
            delivered_at: "2026-11-29T10:00:00Z".into(),
            redelivery: false,
            event: "push".into(),
            action: None,
            status_code: 502,
        };
        let event = recovered_event(request, &summary);
        assert_eq!(&event.body[..], br#"{"ref":"refs/heads/main","n":[1,2]}"#);
        assert_eq!(event.header("x-github-delivery"), Some("g-1"));
        assert_eq!(event.header(RECOVERED_HEADER), Some("github"));
        for gone in [
            "x-hub-signature",
            "x-hub-signature-256",
            "host",
            "x-smee-relay-alert",
        ] {
            assert_eq!(event.header(gone), None, "{gone}");
        }
        assert_eq!(event.timestamp_ms, Some(1_795_946_400_000));

        let form: DeliveryRequest = serde_json::from_str(
            r#"{"headers":{"content-type":"application/x-www-form-urlencoded"},
                "payload":{"a":"b c&d"}}"#,
        )
        .unwrap();
        let event = recovered_event(form, &summary);
        assert_eq!(&event.body[..], b"payload=%7B%22a%22%3A%22b+c%26d%22%7D");
        assert_eq!(event.header("x-github-delivery"), Some("g-1"));
    }

    /// Regression: GitHub's error `message` echoing the token, and an API URL with a password,
    /// were printed verbatim.
    #[tokio::test]
    async fn the_token_and_url_passwords_never_reach_an_error() {
        use axum::routing::get;
        let app = axum::Router::new().fallback(get(|| async {
            (
                http::StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"message":"token ghp_secret_value is not valid here"}"#,
            )
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut client = HookClient::new(HookConfig {
            owner: HookOwner::org("o").unwrap(),
            hook: 1,
            api_url: format!("http://user:url-password@{addr}/api")
                .parse()
                .unwrap(),
            token: SecretString::from("ghp_secret_value".to_string()),
        })
        .unwrap();
        let e = crate::error::chain(&client.deliveries(0).await.unwrap_err());
        assert!(!e.contains("ghp_secret_value"), "{e}");
        assert!(!e.contains("url-password"), "{e}");
        assert!(e.contains("422") && e.contains("[redacted token]"), "{e}");
    }

    #[test]
    fn names_cannot_leave_their_path_segment() {
        assert!(HookOwner::repo("octo-org/octo.repo_1").is_ok());
        for bad in ["octo", "a/b/c", "../x", "a/..", "a b/c", "/x"] {
            assert!(HookOwner::repo(bad).is_err(), "{bad}");
        }
        assert!(HookOwner::org("a/b").is_err());
    }
}
