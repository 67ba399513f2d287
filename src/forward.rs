//! Replaying an [`Event`] as an HTTP request to a target.
//!
//! The request is a POST to the target URL with the event's query appended, its headers (already
//! cleaned by the wire decoder) and its exact body bytes; `content-length` is computed by the
//! HTTP client from the body. Redirects are not followed: a POST must not silently become a GET.
//!
//! [`ForwardError`] sorts failures into retryable (the target is down, slow, or says "later")
//! and permanent (it refused this request), which is all a retry loop needs to know.

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::event::Event;
use crate::url::TargetUrl;

/// How much of an error response body goes into the log.
const ERROR_BODY_PREVIEW: usize = 200;

/// A delivery that the target accepted (2xx).
#[derive(Debug, Clone, Copy)]
pub struct Delivered {
    pub status: StatusCode,
    pub elapsed: Duration,
}

/// A delivery that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The target answered, but not with 2xx.
    #[error("target answered {status}{}", preview_suffix(.body))]
    Status {
        status: StatusCode,
        /// How long `Retry-After` asked us to wait, if it did.
        retry_after: Option<Duration>,
        /// The start of the response body, for the log.
        body: String,
    },
    /// No answer within the target timeout.
    #[error("target did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Could not connect, or the connection broke.
    #[error("cannot reach target: {0}")]
    Connection(String),
}

fn preview_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl ForwardError {
    /// Whether trying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ForwardError::Status { status, .. } => {
                status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429)
            }
            ForwardError::Timeout(_) | ForwardError::Connection(_) => true,
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
    client: reqwest::Client,
    /// How long one delivery may take, answer included.
    timeout: Duration,
}

impl Forwarder {
    pub fn new(target: TargetUrl, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = crate::http::client_builder()
            .no_proxy()
            .timeout(timeout)
            .build()?;
        Ok(Self {
            target,
            client,
            timeout,
        })
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
        let response = self
            .client
            .post(self.target.with_query(&event.query))
            .headers(headers(event, extra))
            .body(event.body.clone())
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = response.status();
        if status.is_success() {
            // Read the answer to the end so the connection can be reused.
            let _ = response.bytes().await;
            return Ok(Delivered {
                status,
                elapsed: started.elapsed(),
            });
        }
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response.bytes().await.unwrap_or_default();
        let body = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_PREVIEW)])
            .trim()
            .to_string();
        Err(ForwardError::Status {
            status,
            retry_after,
            body,
        })
    }

    fn classify(&self, error: reqwest::Error) -> ForwardError {
        if error.is_timeout() {
            ForwardError::Timeout(self.timeout)
        } else {
            ForwardError::Connection(error_chain(&error.without_url()))
        }
    }
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

/// `Retry-After` as seconds; the HTTP-date form is rare from local targets and is ignored.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// An error and its causes on one line: reqwest's own message alone is often just
/// "error sending request".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
