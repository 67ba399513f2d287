//! The HTTP transport under `eventsource-client`, with the idle watchdog built in.
//!
//! `eventsource-client` 0.18 brings no HTTP client of its own; it asks for an `HttpTransport`.
//! This one is reqwest, so the binary has one HTTP and TLS stack, and it is where "no bytes for
//! `idle_timeout`" is noticed: every wait for the response head and for each body chunk is
//! bounded, and a wait that runs out ends the stream with [`IdleTimeout`]. A half-open TCP
//! connection (the peer vanished, nothing says so) looks exactly like that, and smee pings
//! every 30 s, so silence means the connection is dead.

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use launchdarkly_sdk_transport::{
    ByteStream, HttpTransport, Request, Response, ResponseFuture, TransportError,
};
use sync_wrapper::{SyncFuture, SyncStream};

/// No bytes arrived for the idle timeout: the connection is presumed dead.
#[derive(Debug, thiserror::Error)]
#[error("no bytes received for {} (idle timeout); the connection is presumed dead", humantime::format_duration(*.0))]
pub struct IdleTimeout(pub Duration);

/// A reqwest error with its URL removed (the URL holds the channel id, a secret), shown with
/// its causes: "error sending request" alone does not say "connection refused".
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::forward::error_chain(.0))]
struct RequestError(reqwest::Error);

/// Streams a channel over reqwest, ending the stream after `idle_timeout` of silence.
#[derive(Clone)]
pub struct WatchdogTransport {
    /// Shared connection pool and TLS config.
    client: reqwest::Client,
    /// How long a silent connection is trusted.
    idle_timeout: Duration,
}

impl WatchdogTransport {
    pub fn new(client: reqwest::Client, idle_timeout: Duration) -> Self {
        Self {
            client,
            idle_timeout,
        }
    }
}

impl HttpTransport for WatchdogTransport {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        let client = self.client.clone();
        let idle = self.idle_timeout;
        Box::pin(SyncFuture::new(async move {
            let (parts, body) = request.into_parts();
            let mut outgoing = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers);
            if let Some(body) = body {
                outgoing = outgoing.body(body);
            }
            let response = tokio::time::timeout(idle, outgoing.send())
                .await
                .map_err(|_| TransportError::new(IdleTimeout(idle)))?
                .map_err(|e| TransportError::new(RequestError(e.without_url())))?;

            let mut head = Response::builder().status(response.status());
            if let Some(headers) = head.headers_mut() {
                *headers = response.headers().clone();
            }
            let body: ByteStream = Box::pin(SyncStream::new(with_idle_timeout(
                response.bytes_stream(),
                idle,
            )));
            head.body(body).map_err(TransportError::new)
        }))
    }
}

/// Yields the chunks of `body`; if none arrives within `idle`, yields [`IdleTimeout`] and ends.
fn with_idle_timeout(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, TransportError>> + Send {
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(idle, body.next()).await {
            Err(_) => Some((Err(TransportError::new(IdleTimeout(idle))), None)),
            Ok(None) => None,
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Some(Err(e))) => Some((
                Err(TransportError::new(RequestError(e.without_url()))),
                None,
            )),
        }
    })
}
