//! Replaying an [`Event`] as an HTTP request to a target.
//!
//! The request is a POST to the target URL with the event's query appended, its headers (already
//! cleaned by the wire decoder) and its exact body bytes; `content-length` is computed by the
//! HTTP client from the body. Redirects are not followed: a POST must not silently become a GET.
//!
//! Plain-http targets (a port on this machine, the usual case) get hyper's pooled client
//! directly; https targets (Slack, a remote service) get reqwest. Both sit behind
//! [`Forwarder::deliver`], so either can be replaced here alone.
//!
//! Credentials in the target URL (`http://user:pw@host/hook`) go as `Authorization: Basic`
//! on both paths, as curl sends them; they replace an `authorization` header the event may
//! carry, because the operator who wrote the URL meant them for this target.
//!
//! [`ForwardError`] sorts failures into retryable (the target is down, slow, or says "later")
//! and permanent (it refused this request, or the event cannot be made into one), which is all
//! a retry loop needs to know.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::event::Event;
use crate::secret::{ExposeSecret as _, SecretString};
use crate::url::TargetUrl;

/// How much of an error response body goes into the log.
const ERROR_BODY_PREVIEW: usize = 200;

/// A delivery that the target accepted (2xx).
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub status: StatusCode,
    pub elapsed: Duration,
    /// Taken as delivered without a call, and why (a Port report for a run whose reporting
    /// ended): the delivery line says so rather than a status no one answered.
    pub not_sent: Option<&'static str>,
}

/// A delivery that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The target answered, but not with 2xx.
    #[error("target answered {status}{}{}", moved_suffix(.location), preview_suffix(.body))]
    Status {
        status: StatusCode,
        /// How long `Retry-After` asked us to wait, if it did.
        retry_after: Option<Duration>,
        /// Where a 3xx answer points (a password in it shown as `***`): a redirect is not
        /// followed (the event would be posted somewhere the config never named), so the
        /// message says where to point the target instead.
        location: Option<String>,
        /// The start of the response body, for the log.
        body: String,
    },
    /// No whole answer (status, headers and body) within the target timeout.
    #[error("target did not answer in full within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Could not connect, or the connection broke.
    #[error("cannot reach target: {0}")]
    Connection(String),
    /// Reached, and refused for a reason the operator may fix without a restart (Port's API
    /// refusing the credentials): tried again, as a connection failure is, but not said to be
    /// one (helper-146: "cannot reach target: Port refused the credentials").
    #[error("{0}")]
    Refused(String),
    /// The event itself cannot be made into a request (its query makes the URL longer than a
    /// request line may be): no later attempt can send it either.
    #[error("cannot send this event to the target: {0}")]
    Request(String),
}

fn moved_suffix(location: &Option<String>) -> String {
    match location {
        Some(location) => format!(
            " to {location} (redirects are not followed: if events belong there, make it the target URL)"
        ),
        None => String::new(),
    }
}

fn preview_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl ForwardError {
    /// What a failed request of reqwest's was: a timeout (after `timeout`), a request that
    /// cannot be made at all (its URL no `http::Uri` takes: no later attempt can send it
    /// either), or a connection that failed. Said without the URL, which may hold a secret or
    /// a sender's 100 KB (helper-143: a run id that long made each line 100 KB, and retried
    /// its report, and every report behind it, for a day as if Port were down).
    pub fn from_reqwest(error: reqwest::Error, timeout: Duration) -> Self {
        if error.is_timeout() {
            ForwardError::Timeout(timeout)
        } else if error.is_builder() {
            ForwardError::Request(crate::error::chain(&error.without_url()))
        } else {
            ForwardError::Connection(crate::error::chain(&error.without_url()))
        }
    }

    /// Whether trying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ForwardError::Status { status, .. } => {
                status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
            }
            ForwardError::Timeout(_) | ForwardError::Connection(_) | ForwardError::Refused(_) => {
                true
            }
            ForwardError::Request(_) => false,
        }
    }

    /// The HTTP status, when the target answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ForwardError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The wait the target asked for with `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ForwardError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Replays events to one target.
#[derive(Clone, Debug)]
pub struct Forwarder {
    /// Where events go.
    target: TargetUrl,
    /// Keeps connections to the target alive between deliveries.
    engine: Engine,
    /// How long one delivery may take, answer included.
    timeout: Duration,
    /// `Basic ...` from the URL's credentials, computed once (sensitive: Debug hides it).
    authorization: Option<HeaderValue>,
    /// What the target's error answers may echo that the log must not show
    /// ([`TargetUrl::secrets`]), computed once.
    secrets: Vec<SecretString>,
}

/// The HTTP client for one target, by scheme.
#[derive(Clone, Debug)]
enum Engine {
    /// Plain http, the usual target (a port on this machine): hyper's pooled client, which
    /// reqwest itself is built on, without reqwest's per-request layers (redirect and retry
    /// policies that parse the URL twice, boxed bodies, timeouts). `examples/http_client_cost.rs`
    /// measures the difference on loopback; BENCHMARKS.md has the figures.
    Plain(Box<Plain>),
    /// https (Slack, a remote target): reqwest, for rustls and the platform's certificates.
    Tls(reqwest::Client),
}

/// The plain-http engine.
#[derive(Clone, Debug)]
struct Plain {
    client: Client<HttpConnector, Full<Bytes>>,
    /// The target as hyper takes it, parsed once: an event with no query (nearly every one)
    /// is posted to it as it is, without copying and parsing the URL again. `None` if it does
    /// not parse, which each delivery then reports.
    uri: Option<http::Uri>,
}

/// A target's answer, whichever engine fetched it.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    /// `Location` of a 3xx answer, for the error.
    location: Option<String>,
    body: Bytes,
}

impl Forwarder {
    pub fn new(target: TargetUrl, timeout: Duration) -> Result<Self, reqwest::Error> {
        let engine = if target.is_plain_http() {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
            connector.set_nodelay(true);
            let client = Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(connector);
            let uri = target.with_query(&[]).as_str().parse().ok();
            Engine::Plain(Box::new(Plain { client, uri }))
        } else {
            // https targets and Slack honour HTTPS_PROXY/NO_PROXY, unless on this machine
            // (crate::http::client_builder_for).
            let client = crate::http::client_builder_for(&target.with_query(&[]))
                .timeout(timeout)
                .build()?;
            Engine::Tls(client)
        };
        Ok(Self {
            authorization: target.authorization(),
            secrets: spellings(target.secrets()),
            target,
            engine,
            timeout,
        })
    }

    /// The target's path is a secret too (a Slack webhook's): its segments are hidden in
    /// what an error answer echoes, as its password and query are.
    pub fn with_secret_path(mut self) -> Self {
        let mut secrets: Vec<String> = (self.secrets.iter())
            .map(|s| s.expose_secret().to_string())
            .collect();
        secrets.extend(self.target.path_secrets());
        self.secrets = spellings(secrets);
        self
    }

    pub fn target(&self) -> &TargetUrl {
        &self.target
    }

    /// POST one event to the target, with `extra` headers (such as a delivery id) added.
    pub async fn deliver(
        &self,
        event: &Event,
        extra: &[(&str, &str)],
    ) -> Result<Delivered, ForwardError> {
        let started = Instant::now();
        let mut headers = headers(event, extra);
        if let Some(authorization) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, authorization.clone());
        }
        // hyper sends an empty POST body with no length at all; a strict server answers 411.
        if event.body.is_empty() {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        let answer = match &self.engine {
            Engine::Plain(plain) => {
                let uri = match &plain.uri {
                    Some(uri) if event.query.is_empty() => Ok(uri.clone()),
                    _ => {
                        let url = self.target.with_query(&event.query);
                        sendable(&url)?;
                        url.as_str()
                            .parse()
                            .map_err(|e: http::uri::InvalidUri| broken(&e))
                    }
                };
                let exchange = post_plain(&plain.client, uri, headers, event.body.clone());
                // A timer per delivery, dropped with it. Keeping one for the next delivery saves
                // tokio's wake of its own loop per event (a new timer earlier than its next
                // wake), but then fires after the last delivery of a lull and wakes an idle relay
                // about three times per event (BENCHMARKS.md, sixteenth session): not kept.
                match tokio::time::timeout(self.timeout, exchange).await {
                    Ok(answer) => answer?,
                    Err(_) => return Err(ForwardError::Timeout(self.timeout)),
                }
            }
            Engine::Tls(client) => {
                let url = self.target.with_query(&event.query);
                sendable(&url)?;
                post_tls(client, url, headers, event.body.clone())
                    .await
                    .map_err(|e| ForwardError::from_reqwest(e, self.timeout))?
            }
        };
        if answer.status.is_success() {
            return Ok(Delivered {
                status: answer.status,
                elapsed: started.elapsed(),
                not_sent: None,
            });
        }
        Err(ForwardError::Status {
            status: answer.status,
            retry_after: answer.retry_after,
            location: answer.location.map(|location| self.hidden(location)),
            body: self.preview(&answer.body),
        })
    }

    /// `text` with each of the target's secrets in it written `***`, ASCII case ignored (a
    /// percent-encoding echoed in lower-case hex).
    fn hidden(&self, mut text: String) -> String {
        for secret in &self.secrets {
            let secret = secret.expose_secret().to_ascii_lowercase();
            let lower = text.to_ascii_lowercase();
            if !lower.contains(&secret) {
                continue;
            }
            // The same byte offsets in both: only ASCII letters changed case.
            let mut out = String::with_capacity(text.len());
            let mut last = 0;
            for (at, _) in lower.match_indices(&secret) {
                out.push_str(&text[last..at]);
                out.push_str("***");
                last = at + secret.len();
            }
            out.push_str(&text[last..]);
            text = out;
        }
        text
    }

    /// The start of an error answer's `body`, for the log: its first [`ERROR_BODY_PREVIEW`]
    /// bytes, with the target's secrets it echoes written `***` and control characters as
    /// escapes (it reaches terminals through `events show`). Looked for in a window one
    /// secret longer, so that none is cut in half and shown in part.
    fn preview(&self, body: &[u8]) -> String {
        let longest = (self.secrets.iter())
            .map(|s| s.expose_secret().len())
            .max()
            .unwrap_or(0);
        let window = &body[..body.len().min(ERROR_BODY_PREVIEW + longest)];
        let text = self.hidden(String::from_utf8_lossy(window).into_owned());
        let mut end = text.len().min(ERROR_BODY_PREVIEW);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        crate::text::escape_control(text[..end].trim()).into_owned()
    }
}

/// Each of `secrets` as an answer may spell it: as it is, JSON-escaped (`\/`, as PHP's
/// `json_encode` writes `/`) and HTML-escaped (`&amp;`); longest first, so that a secret
/// holding another is hidden whole.
fn spellings(secrets: Vec<String>) -> Vec<SecretString> {
    let mut all: Vec<String> = Vec::with_capacity(secrets.len() * 3);
    for secret in secrets {
        let json = (secret.replace('\\', "\\\\"))
            .replace('/', "\\/")
            .replace('"', "\\\"");
        let html = (secret.replace('&', "&amp;"))
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;");
        all.extend([json, html, secret]);
    }
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
    all.dedup();
    all.into_iter().map(SecretString::from).collect()
}

/// The longest URL an HTTP request may carry here (hyper's limit, `http::Uri`'s).
const MAX_URL: usize = 65_534;

/// Whether `url` (the target's, with an event's query) fits in a request; if not, no attempt
/// can ever send the event.
fn sendable(url: &reqwest::Url) -> Result<(), ForwardError> {
    let len = url.as_str().len();
    if len > MAX_URL {
        return Err(ForwardError::Request(format!(
            "uri too long: the target URL with this event's query is {len} bytes, more than \
             the {MAX_URL} an HTTP request may carry"
        )));
    }
    Ok(())
}

/// A failure to reach the target, with its causes.
fn broken(e: &dyn std::error::Error) -> ForwardError {
    ForwardError::Connection(crate::error::chain(e))
}

/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an unused connection to a target is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// One POST over plain http. The answer is read to the end so the connection can be reused.
async fn post_plain(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: Result<http::Uri, ForwardError>,
    mut headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, ForwardError> {
    if !headers.contains_key(http::header::USER_AGENT) {
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(crate::http::USER_AGENT),
        );
    }
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri?;
    *request.headers_mut() = headers;
    let response = client.request(request).await.map_err(|e| broken(&e))?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        retry_after: retry_after(&parts.headers),
        location: location(parts.status, &parts.headers),
        body: answer_kept(body).await,
    })
}

/// How much of a target's answer is read. Only an error's first [`ERROR_BODY_PREVIEW`] bytes
/// are used; a small answer is read to its end so that its connection can be used again.
const ANSWER_KEPT: usize = 16 << 10;

/// The first [`ANSWER_KEPT`] bytes of an answer's body; the rest is not read (its connection is
/// then closed, not reused). A body that breaks off is what arrived before. Reading it whole
/// let a target answering with gigabytes (again at every retry) take the relay's memory.
async fn answer_kept<B>(mut body: B) -> Bytes
where
    B: hyper::body::Body + Unpin,
    B::Data: bytes::Buf,
{
    let mut kept = bytes::BytesMut::new();
    while kept.len() < ANSWER_KEPT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    use bytes::Buf as _;
                    let take = data.remaining().min(ANSWER_KEPT - kept.len());
                    kept.extend_from_slice(&data.copy_to_bytes(take));
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    kept.freeze()
}

/// One POST over https with reqwest (its client adds the user agent).
async fn post_tls(
    client: &reqwest::Client,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, reqwest::Error> {
    let response = client.post(url).headers(headers).body(body).send().await?;
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let location = location(status, response.headers());
    let body = answer_kept(http::Response::from(response).into_body()).await;
    Ok(Answer {
        status,
        retry_after,
        location,
        body,
    })
}

/// Where a redirect points, escaped and with any password hidden, for the error message.
fn location(status: StatusCode, headers: &HeaderMap) -> Option<String> {
    if !status.is_redirection() {
        return None;
    }
    let value = headers.get(http::header::LOCATION)?;
    let text = String::from_utf8_lossy(value.as_bytes());
    Some(crate::text::escape_control(&crate::url::shown_text(&text, false)).into_owned())
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

fn headers(event: &Event, extra: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(event.headers.len() + extra.len());
    let all = event
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .chain(extra.iter().copied());
    for (name, value) in all {
        // The wire decoder only lets valid headers through; this guards events from elsewhere.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// `Retry-After` as a wait from now: delta-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2026
/// 07:28:00 GMT`; one in the past means no wait). Unbounded here: a route caps it
/// (`--max-retry-after`). Anything else is ignored (the route's own backoff applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    parse_retry_after_at(value, std::time::SystemTime::now())
}

fn parse_retry_after_at(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time", for the cap to judge.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::http::HeaderMap as AxumHeaders;
    use axum::routing::post;

    fn event(headers: &[(&str, &str)]) -> Event {
        Event {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: Bytes::from_static(b"{}"),
            ..Event::default()
        }
    }

    async fn serve(app: Router) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }

    fn forwarder(url: &str, timeout: Duration) -> Forwarder {
        Forwarder::new(url.parse().unwrap(), timeout).unwrap()
    }

    /// A target that moved answered 301 and the dead letter did not say where to. Then
    /// (helper-113): the place it named kept its query, often a token, in the WARN line.
    #[tokio::test]
    async fn regression_a_redirect_names_its_location_with_the_password_hidden() {
        let app = Router::new().route(
            "/hook",
            post(|| async {
                (
                    http::StatusCode::MOVED_PERMANENTLY,
                    [(
                        "location",
                        "http://bob:hunter2@127.0.0.1:1/new-hook?token=SECRET",
                    )],
                    "",
                )
            }),
        );
        let port = serve(app).await;
        let error = forwarder(
            &format!("http://127.0.0.1:{port}/hook"),
            Duration::from_secs(5),
        )
        .deliver(&event(&[]), &[])
        .await
        .unwrap_err();
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "target answered 301 Moved Permanently to http://bob:***@127.0.0.1:1/new-hook?… \
             (redirects are not followed: if events belong there, make it the target URL)"
        );
    }

    /// Regression (helper-114): a target that answered 500 with a page echoing the request
    /// (`Cannot POST /in?token=... auth=Basic ...`) put its own token and Basic credentials in
    /// the WARN line, `/healthz` and `events list`.
    #[tokio::test]
    async fn regression_an_error_page_echoing_the_request_showed_the_target_s_secrets() {
        let app = Router::new().route(
            "/in",
            post(|uri: http::Uri, headers: HeaderMap| async move {
                let auth = headers["authorization"].to_str().unwrap().to_string();
                let page = format!(
                    "{}Cannot POST {uri} auth={auth}\x1b]0;t\x07",
                    "x".repeat(140)
                );
                (http::StatusCode::INTERNAL_SERVER_ERROR, page)
            }),
        );
        let port = serve(app).await;
        let error = forwarder(
            &format!("http://carol:CAROL%2FPW@127.0.0.1:{port}/in?token=CAROLTOK&team=platform"),
            Duration::from_secs(5),
        )
        .deliver(&event(&[]), &[])
        .await
        .unwrap_err();
        let said = error.to_string();
        for secret in ["CAROL", "CAROLTOK", "Y2Fyb2w6Q0FST0wvUFc=", "platform"] {
            assert!(!said.contains(secret), "{secret} in {said}");
        }
        // The preview is as long as before, and says where the secrets were; a control
        // character in it is an escape (it reaches `events show` and `replay --to` as is).
        assert!(
            said.contains("Cannot POST /in?*** auth=Basic ***\\x1b]0;t\\x07"),
            "{said}"
        );
    }

    /// Regression (helper-115): an echo spelled otherwise got through: JSON-escaped
    /// (`a\/b`), percent-encoded in lower-case hex, HTML-escaped, a query key alone, a
    /// redirect's `Location`; and a Slack webhook's path (its secret) was not hidden at all.
    #[test]
    fn regression_an_echo_spelled_otherwise_showed_the_target_s_secrets() {
        let target =
            "http://bob:Sup3r%2Fpw@127.0.0.1:1/in?token=a%2Fb%2Bc%3Dd&h=x%3Cy%26zz&S3cretKeyOnly";
        let forwarder = forwarder(target, Duration::from_secs(1));
        for echo in [
            r#"{"pw":"Sup3r\/pw","q":"a\/b+c=d"}"#,
            "token=a%2fb%2bc%3dd",
            "h=x&lt;y&amp;zz",
            "keys: S3cretKeyOnly",
            "Location: /new/Sup3r/pw",
        ] {
            let hidden = forwarder.hidden(echo.to_string());
            for secret in ["Sup3r", "a%2f", "a\\/b", "x&lt;y", "S3cretKeyOnly"] {
                assert!(
                    !hidden.contains(secret),
                    "{secret} in {hidden} (from {echo})"
                );
            }
        }
        let slack = forwarder_with_path("http://127.0.0.1:1/services/T0ABC/B0DEF/XXXXSLACKSECRET");
        let hidden = slack.hidden("Cannot POST /services/T0ABC/B0DEF/XXXXSLACKSECRET".into());
        assert!(
            !hidden.contains("XXXXSLACKSECRET") && !hidden.contains("B0DEF"),
            "{hidden}"
        );
    }

    fn forwarder_with_path(url: &str) -> Forwarder {
        forwarder(url, Duration::from_secs(1)).with_secret_path()
    }

    #[tokio::test]
    async fn a_refusal_reports_status_retry_after_and_the_start_of_the_body() {
        let app = Router::new().route(
            "/hook",
            post(|| async {
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    [("retry-after", "7")],
                    " busy \n",
                )
            }),
        );
        let port = serve(app).await;
        let target = forwarder(
            &format!("http://127.0.0.1:{port}/hook"),
            Duration::from_secs(5),
        );
        let error = target.deliver(&event(&[]), &[]).await.unwrap_err();
        assert!(error.is_retryable());
        assert_eq!(error.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(
            error.to_string(),
            "target answered 503 Service Unavailable: busy"
        );
    }

    #[tokio::test]
    async fn the_events_own_user_agent_is_kept_and_ours_fills_in_when_it_has_none() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders| {
                let tx = tx.clone();
                async move {
                    tx.send(headers["user-agent"].to_str().unwrap().to_string())
                        .unwrap();
                }
            }),
        );
        let port = serve(app).await;
        let target = forwarder(
            &format!("http://127.0.0.1:{port}/hook"),
            Duration::from_secs(5),
        );
        target
            .deliver(&event(&[("user-agent", "GitHub-Hookshot/abc")]), &[])
            .await
            .unwrap();
        target.deliver(&event(&[]), &[]).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "GitHub-Hookshot/abc");
        assert_eq!(rx.recv().await.unwrap(), crate::http::USER_AGENT);
    }

    #[tokio::test]
    async fn the_targets_own_query_is_kept_with_and_without_the_events() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(move |uri: http::Uri| {
                let tx = tx.clone();
                async move { tx.send(uri.to_string()).unwrap() }
            }),
        );
        let port = serve(app).await;
        let target = forwarder(
            &format!("http://127.0.0.1:{port}/hook?token=t"),
            Duration::from_secs(5),
        );
        let with_query = Event {
            query: vec![("a".into(), "1 2".into())],
            ..event(&[])
        };
        target.deliver(&event(&[]), &[]).await.unwrap();
        target.deliver(&with_query, &[]).await.unwrap();
        target.deliver(&event(&[]), &[]).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "/hook?token=t");
        assert_eq!(rx.recv().await.unwrap(), "/hook?token=t&a=1+2");
        assert_eq!(rx.recv().await.unwrap(), "/hook?token=t");
    }

    /// Regression: an event whose query made the URL longer than an HTTP request line may be
    /// (a hostile or broken frame) was a "cannot reach target" error, retried for a whole
    /// --max-retry-age while every event queued behind it waited.
    #[tokio::test]
    async fn an_event_whose_url_cannot_be_sent_is_refused_at_once_not_retried() {
        let app = Router::new().route("/hook", post(|| async {}));
        let port = serve(app).await;
        let huge = Event {
            query: vec![("q".into(), "x".repeat(70_000))],
            ..event(&[])
        };
        for url in [
            format!("http://127.0.0.1:{port}/hook"),
            // Nothing listens there: the request fails before any connection is tried.
            "https://127.0.0.1:9/hook".to_string(),
        ] {
            let target = forwarder(&url, Duration::from_secs(5));
            let error = target.deliver(&huge, &[]).await.unwrap_err();
            assert!(!error.is_retryable(), "{url}: {error}");
            assert!(
                error
                    .to_string()
                    .contains("uri too long: the target URL with this event's query is 700"),
                "{error}"
            );
            assert!(
                error
                    .to_string()
                    .starts_with("cannot send this event to the target: "),
                "{url}: {error}"
            );
        }
        let target = forwarder(
            &format!("http://127.0.0.1:{port}/hook"),
            Duration::from_secs(5),
        );
        target.deliver(&event(&[]), &[]).await.unwrap();
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |v: &str| parse_retry_after_at(v, now);
        assert_eq!(at(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(at("999999999"), Some(Duration::from_secs(999_999_999)));
        assert_eq!(
            at("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX)),
            "beyond u64 is still a wait, for the cap to shorten"
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(at(&later), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(at(&earlier), Some(Duration::ZERO));
        assert_eq!(at("soon"), None);
        assert_eq!(at("-5"), None);
        assert_eq!(at(""), None);
    }

    #[tokio::test]
    async fn credentials_in_the_url_go_as_basic_auth() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders| {
                let tx = tx.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string());
                    tx.send(auth).unwrap();
                }
            }),
        );
        let port = serve(app).await;
        let target = forwarder(
            &format!("http://alice:wonder%20land@127.0.0.1:{port}/hook"),
            Duration::from_secs(5),
        );
        // The URL's credentials win over an authorization header the event carries.
        target
            .deliver(&event(&[("authorization", "Bearer from-the-sender")]), &[])
            .await
            .unwrap();
        assert_eq!(
            rx.recv().await.unwrap().as_deref(),
            Some("Basic YWxpY2U6d29uZGVyIGxhbmQ="),
            "base64 of alice:wonder land"
        );
        assert!(!format!("{target:?}").contains("wonder"), "{target:?}");
    }

    #[tokio::test]
    async fn the_reqwest_engine_sends_the_credentials_too() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders| {
                let tx = tx.clone();
                async move {
                    let auth = headers
                        .get_all("authorization")
                        .iter()
                        .map(|v| v.to_str().unwrap().to_string())
                        .collect::<Vec<_>>();
                    tx.send(auth).unwrap();
                }
            }),
        );
        let port = serve(app).await;
        // The engine https targets get, pointed at a plain-http server (no certificate to
        // trust in a test): the same request path, credentials included.
        let https = forwarder("https://bob:pw@127.0.0.1:1/hook", Duration::from_secs(5));
        assert!(matches!(https.engine, Engine::Tls(_)));
        let target = Forwarder {
            target: format!("http://bob:pw@127.0.0.1:{port}/hook")
                .parse()
                .unwrap(),
            ..https
        };
        target.deliver(&event(&[]), &[]).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap(),
            ["Basic Ym9iOnB3"],
            "one header, base64 of bob:pw"
        );
    }

    /// A target that accepts connections and holds them open, after writing `answer` (if any)
    /// once it has read the request: a hung target, or one that stalls mid-answer. Its port.
    async fn holding_target(answer: Option<&'static [u8]>) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                if let Some(answer) = answer {
                    let mut request = [0; 4096];
                    let _ = socket.read(&mut request).await;
                    socket.write_all(answer).await.unwrap();
                }
                held.push(socket);
            }
        });
        port
    }

    #[tokio::test]
    async fn a_target_that_never_answers_times_out() {
        let port = holding_target(None).await;
        let timeout = Duration::from_millis(200);
        let target = forwarder(&format!("http://127.0.0.1:{port}/hook"), timeout);
        let error = target.deliver(&event(&[]), &[]).await.unwrap_err();
        assert!(
            matches!(error, ForwardError::Timeout(t) if t == timeout),
            "{error}"
        );
        assert!(error.is_retryable());
    }

    /// Each delivery is bounded from its own start, after quick ones and after one that timed
    /// out alike (a timer kept between deliveries, tried in the sixteenth session, had to be
    /// moved for each).
    #[tokio::test]
    async fn each_delivery_has_its_own_deadline() {
        let app = Router::new().route(
            "/hook",
            post(|headers: http::HeaderMap| async move {
                if headers.contains_key("x-hold") {
                    std::future::pending::<()>().await;
                }
                "ok"
            }),
        );
        let port = serve(app).await;
        let timeout = Duration::from_millis(300);
        let target = forwarder(&format!("http://127.0.0.1:{port}/hook"), timeout);
        let plain = event(&[]);
        let quick = || target.deliver(&plain, &[]);
        let held = || target.deliver(&plain, &[("x-hold", "1")]);
        quick().await.unwrap();
        // Longer than the timeout in all, each well within it.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            quick().await.unwrap();
        }
        let started = Instant::now();
        let error = held().await.unwrap_err();
        assert!(matches!(error, ForwardError::Timeout(_)), "{error}");
        assert!(started.elapsed() >= timeout, "not before its own deadline");
        // After a timeout, the next delivery gets a whole timeout again, and another hold
        // times out again.
        quick().await.unwrap();
        let started = Instant::now();
        assert!(matches!(held().await, Err(ForwardError::Timeout(_))));
        assert!(started.elapsed() >= timeout);
    }

    /// `--target-timeout` has no upper bound: a deadline past what an `Instant` holds means no
    /// deadline. The kept timer of the sixteenth session added it to `now` and panicked the
    /// route (which then delivered nothing, while `/healthz` said ok).
    #[tokio::test]
    async fn regression_a_timeout_too_large_for_an_instant_means_no_deadline() {
        let app = Router::new().route("/hook", post(|| async { "ok" }));
        let port = serve(app).await;
        let target = forwarder(&format!("http://127.0.0.1:{port}/hook"), Duration::MAX);
        for _ in 0..2 {
            target.deliver(&event(&[]), &[]).await.unwrap();
        }
    }

    /// A target that sends its status and then stalls the body times out like one that never
    /// answers, and the message does not claim it never answered (it said "did not answer").
    #[tokio::test]
    async fn regression_a_stalled_body_is_a_timeout_that_says_the_answer_was_not_whole() {
        let port = holding_target(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")).await;
        let timeout = Duration::from_millis(300);
        let target = forwarder(&format!("http://127.0.0.1:{port}/hook"), timeout);
        let error = target.deliver(&event(&[]), &[]).await.unwrap_err();
        assert!(matches!(error, ForwardError::Timeout(_)), "{error}");
        assert_eq!(
            error.to_string(),
            "target did not answer in full within 300ms"
        );
    }

    /// Regression: a target's answer was read whole to keep 200 bytes of it, so one answering
    /// `500` with an endless (or a gigabytes long) body took the relay's memory, again at every
    /// retry, and its refusal was reported as a timeout. Both engines.
    #[tokio::test]
    async fn regression_an_endless_answer_was_read_whole() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0; 4096];
                    let _ = socket.read(&mut request).await;
                    let head = b"HTTP/1.1 500 Internal Server Error\r\n\
                                 content-length: 1099511627776\r\n\r\n";
                    let _ = socket.write_all(head).await;
                    let chunk = vec![b'x'; 64 << 10];
                    // Until the relay stops reading and closes the connection.
                    while socket.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        let timeout = Duration::from_secs(20);
        let plain = forwarder(&format!("http://127.0.0.1:{port}/hook"), timeout);
        let tls = Forwarder {
            target: plain.target.clone(),
            ..forwarder("https://127.0.0.1:1/hook", timeout)
        };
        for target in [plain, tls] {
            let started = Instant::now();
            let error = target.deliver(&event(&[]), &[]).await.unwrap_err();
            assert!(
                matches!(&error, ForwardError::Status { status, body, .. }
                    if status.as_u16() == 500 && body.len() == ERROR_BODY_PREVIEW),
                "{error}"
            );
            assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        }
    }

    /// Regression (helper-143): a URL no request can carry (a Port report's, with a run id of
    /// 100 KB) failed as "cannot reach target: builder error for url (...)", retried as if
    /// Port were down, each line carrying the URL whole.
    #[tokio::test]
    async fn regression_a_url_no_request_can_carry_was_retried_as_unreachable() {
        let url = format!("http://127.0.0.1:1/{}", "R".repeat(70_000));
        let client = crate::http::client_builder().build().unwrap();
        let error = client.get(&url).send().await.unwrap_err();
        let error = ForwardError::from_reqwest(error, Duration::from_secs(1));
        assert!(matches!(error, ForwardError::Request(_)), "{error}");
        assert!(!error.is_retryable());
        assert!(!error.to_string().contains("RRRR"), "{error}");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_retryable_connection_error_over_http_and_https() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        for scheme in ["http", "https"] {
            let target = forwarder(
                &format!("{scheme}://127.0.0.1:{port}/hook"),
                Duration::from_secs(5),
            );
            let error = target.deliver(&event(&[]), &[]).await.unwrap_err();
            assert!(
                matches!(error, ForwardError::Connection(_)),
                "{scheme}: {error}"
            );
            assert!(error.is_retryable());
            assert!(
                error.to_string().contains("refused"),
                "{scheme}: the cause is named: {error}"
            );
        }
    }
}
