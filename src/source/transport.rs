//! The HTTP transport under `eventsource-client`, and every workaround the crate needs, in one
//! place.
//!
//! `eventsource-client` 0.18 brings no HTTP client of its own; it asks for an `HttpTransport`.
//! This one is reqwest (one HTTP and TLS stack, rustls, for the whole binary), and it adds what
//! the crate does not do:
//!
//! - **Idle watchdog.** Every wait for the response head and for each body chunk is bounded by
//!   the idle timeout; a wait that runs out ends the stream with [`IdleTimeout`]. A half-open
//!   TCP connection looks exactly like that, and smee pings every 30 s.
//! - **Frame-aligned chunks.** The body is handed to the crate in pieces that never run past the
//!   end of an SSE frame (a blank line). The crate refuses some frames outright (a line that is
//!   not UTF-8, a frame of nothing but an empty `event:`) and then drops everything it had
//!   buffered after the refused line. Cut this way, that is only the rest of the refused frame:
//!   every byte after it is still here.
//! - **Resume in place.** After such a refusal the source asks for [`Transport::resume_next`]:
//!   the next "request" the crate makes gets the same, still open, response body, positioned
//!   after the refused frame. Nothing that followed it is lost, even on smee.io, which does not
//!   replay. (If the connection is gone by then, the source reconnects with `Last-Event-ID`.)
//! - **Frame size limit.** A frame over `max_frame` bytes is not passed on past the limit: the
//!   stream fails with [`FrameTooLarge`], its remaining bytes are skipped, and the source resumes
//!   after it. Memory for one frame is bounded by the limit whatever the sender does.
//!
//! This module must not interpret SSE fields (that is the crate's job): it only knows where
//! lines and frames end.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, StatusCode};
use launchdarkly_sdk_transport::{
    ByteStream, HttpTransport, Request, Response, ResponseFuture, TransportError,
};
use sync_wrapper::SyncFuture;
use tokio::time::{Instant, Sleep};

use super::status::ChannelStatus;

/// No bytes arrived for the idle timeout: the connection is presumed dead.
#[derive(Debug, thiserror::Error)]
#[error("no bytes received for {} (idle timeout); the connection is presumed dead", humantime::format_duration(*.0))]
pub struct IdleTimeout(pub Duration);

/// A frame grew past the limit; its bytes are skipped.
#[derive(Debug, thiserror::Error)]
#[error("a frame over the {} limit (--max-frame, or max_frame in the config)", crate::source::mib(*.limit))]
pub struct FrameTooLarge {
    /// The limit it went over.
    pub limit: usize,
}

/// The server closed the stream after part of a frame, at a line end (no blank line ended it).
/// The crate drops what it had of the frame and reports a plain end of stream, so the cut
/// frame would go unsaid; a cut in the middle of a line it reports itself.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server closed the stream in the middle of a frame (the partial frame is discarded; a \
     server that replays sends it again after the reconnect)"
)]
pub struct CutFrame;

/// A reqwest error with its URL removed (the URL holds the channel id, a secret), shown with
/// its causes: "error sending request" alone does not say "connection refused".
#[derive(Debug, thiserror::Error)]
#[error("{}", crate::error::chain(.0))]
pub struct RequestError(reqwest::Error);

/// The body bytes as they come off the connection (reqwest in production, a list in tests).
type RawBody = Pin<Box<dyn Stream<Item = Result<Bytes, TransportError>> + Send>>;

/// Streams a channel over reqwest for `eventsource-client`. Cheap to clone: clones share the
/// open connection, so that [`Transport::resume_next`] can hand it to the next client.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared connection pool and TLS config.
    client: reqwest::Client,
    /// How long a silent connection is trusted.
    idle: Duration,
    /// The most one frame may hold.
    max_frame: usize,
    /// Told about every chunk, for `/healthz`.
    status: Arc<ChannelStatus>,
    /// The open connection, if any: the crate reads it through a [`BodyHandle`].
    open: Mutex<Option<Open>>,
    /// The next request resumes the open connection instead of making a new one.
    resume: AtomicBool,
    /// Test only: bodies served instead of making requests.
    #[cfg(test)]
    canned: Mutex<std::collections::VecDeque<Vec<Bytes>>>,
}

/// An open response: what the crate needs to see again on a resume, and the body.
struct Open {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
}

impl Transport {
    pub fn new(
        client: reqwest::Client,
        idle: Duration,
        max_frame: usize,
        status: Arc<ChannelStatus>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                idle,
                max_frame,
                status,
                open: Mutex::new(None),
                resume: AtomicBool::new(false),
                #[cfg(test)]
                canned: Mutex::default(),
            }),
        }
    }

    /// The next request continues the open connection after the current frame (see the module
    /// notes). Returns false when there is no open connection to continue.
    pub fn resume_next(&self) -> bool {
        let mut open = self.inner.open.lock().expect("not poisoned");
        match open.as_mut() {
            Some(open) if !open.body.ended => {
                open.body.skip_rest_of_frame();
                self.inner.resume.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Close the open connection, if any.
    pub fn close(&self) {
        self.inner.resume.store(false, Ordering::Relaxed);
        *self.inner.open.lock().expect("not poisoned") = None;
    }

    /// Test only: serve a body made of these chunks (then silence) for the next request.
    #[cfg(test)]
    pub fn push_canned(&self, chunks: Vec<Bytes>) {
        self.inner.canned.lock().unwrap().push_back(chunks);
    }

    fn respond(
        &self,
        status: StatusCode,
        headers: HeaderMap,
    ) -> Result<Response<ByteStream>, TransportError> {
        let handle: ByteStream = Box::pin(BodyHandle {
            inner: self.inner.clone(),
        });
        let mut head = Response::builder().status(status);
        if let Some(h) = head.headers_mut() {
            *h = headers;
        }
        head.body(handle).map_err(TransportError::new)
    }
}

impl HttpTransport for Transport {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        if self.inner.resume.swap(false, Ordering::Relaxed) {
            let open = self.inner.open.lock().expect("not poisoned");
            if let Some(open) = open.as_ref() {
                let response = self.respond(open.status, open.headers.clone());
                return Box::pin(std::future::ready(response));
            }
        }
        // A new connection: whatever was open is finished with.
        *self.inner.open.lock().expect("not poisoned") = None;
        let this = self.clone();
        let idle = self.inner.idle;
        #[cfg(test)]
        if let Some(chunks) = self.inner.canned.lock().unwrap().pop_front() {
            // The connection stays open after the chunks, as a live channel's does.
            let raw: RawBody = Box::pin(futures::StreamExt::chain(
                futures::stream::iter(chunks.into_iter().map(Ok)),
                futures::stream::pending(),
            ));
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            *self.inner.open.lock().unwrap() = Some(Open {
                status: StatusCode::OK,
                headers: headers.clone(),
                body: Body::new(raw, idle, self.inner.max_frame),
            });
            return Box::pin(std::future::ready(this.respond(StatusCode::OK, headers)));
        }
        Box::pin(SyncFuture::new(async move {
            let (parts, body) = request.into_parts();
            let mut outgoing = this
                .inner
                .client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers);
            if let Some(body) = body {
                outgoing = outgoing.body(body);
            }
            let response = tokio::time::timeout(idle, outgoing.send())
                .await
                .map_err(|_| TransportError::new(IdleTimeout(idle)))?
                .map_err(|e| TransportError::new(RequestError(e.without_url())))?;
            this.inner.status.saw_bytes();
            let status = response.status();
            let headers = response.headers().clone();
            let raw: RawBody = Box::pin(futures::stream::StreamExt::map(
                response.bytes_stream(),
                |chunk| chunk.map_err(|e| TransportError::new(RequestError(e.without_url()))),
            ));
            *this.inner.open.lock().expect("not poisoned") = Some(Open {
                status,
                headers: headers.clone(),
                body: Body::new(raw, idle, this.inner.max_frame),
            });
            this.respond(status, headers)
        }))
    }
}

/// What the crate holds: a handle on the open body, which stays here when the crate lets go.
struct BodyHandle {
    inner: Arc<Inner>,
}

impl Stream for BodyHandle {
    type Item = Result<Bytes, TransportError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut open = self.inner.open.lock().expect("not poisoned");
        let Some(open) = open.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = open.body.poll_next(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.inner.status.saw_bytes();
        }
        polled
    }
}

/// The open body, cut at frame ends, with the idle watchdog and the frame size limit.
struct Body {
    raw: RawBody,
    /// Fires after `idle` of waiting for bytes.
    sleep: Pin<Box<Sleep>>,
    idle: Duration,
    /// Whether `sleep` was set for the current wait (a wait starts when the crate asks for
    /// bytes, not when the last bytes came: a slow consumer is not a dead connection).
    armed: bool,
    /// Bytes received, not yet handed on.
    pending: Bytes,
    /// Where lines and frames end.
    frames: FrameEnds,
    /// Bytes of the current frame handed on so far.
    frame_bytes: usize,
    max_frame: usize,
    /// Dropping bytes up to the end of the current frame (refused, or over the limit).
    skipping: bool,
    /// The last piece handed on ended a frame.
    at_frame_end: bool,
    /// The connection is finished (closed, failed or timed out).
    ended: bool,
}

impl Body {
    fn new(raw: RawBody, idle: Duration, max_frame: usize) -> Self {
        Self {
            raw,
            sleep: Box::pin(tokio::time::sleep(idle)),
            idle,
            armed: false,
            pending: Bytes::new(),
            frames: FrameEnds::default(),
            frame_bytes: 0,
            max_frame,
            skipping: false,
            at_frame_end: true,
            ended: false,
        }
    }

    /// The crate refused the frame it was reading: drop what is left of it.
    fn skip_rest_of_frame(&mut self) {
        if !self.at_frame_end {
            self.skipping = true;
        }
        self.frame_bytes = 0;
        self.at_frame_end = true;
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, TransportError>>> {
        loop {
            while !self.pending.is_empty() {
                let end = self.frames.next_frame_end(&self.pending);
                let piece = self.pending.split_to(end.unwrap_or(self.pending.len()));
                if self.skipping {
                    self.skipping = end.is_none();
                    continue;
                }
                self.frame_bytes += piece.len();
                if self.frame_bytes > self.max_frame {
                    self.skipping = end.is_none();
                    self.frame_bytes = 0;
                    self.at_frame_end = true;
                    return Poll::Ready(Some(Err(TransportError::new(FrameTooLarge {
                        limit: self.max_frame,
                    }))));
                }
                self.at_frame_end = end.is_some();
                if self.at_frame_end {
                    self.frame_bytes = 0;
                }
                self.armed = false;
                return Poll::Ready(Some(Ok(piece)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            if !self.armed {
                self.sleep.as_mut().reset(Instant::now() + self.idle);
                self.armed = true;
            }
            match self.raw.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.pending = chunk;
                    self.armed = false;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if !self.at_frame_end && !self.skipping {
                        return Poll::Ready(Some(Err(TransportError::new(CutFrame))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if self.sleep.as_mut().poll(cx).is_ready() {
                        self.ended = true;
                        return Poll::Ready(Some(Err(TransportError::new(IdleTimeout(self.idle)))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

use std::future::Future as _;

/// Finds where SSE frames end (a blank line), across chunks. Lines end with CRLF, LF or CR.
#[derive(Debug)]
struct FrameEnds {
    /// No byte but terminators since the last line end: the next terminator is a blank line.
    line_empty: bool,
    /// The last byte seen was CR: a LF right after it belongs to it.
    after_cr: bool,
}

impl Default for FrameEnds {
    fn default() -> Self {
        Self {
            line_empty: true,
            after_cr: false,
        }
    }
}

impl FrameEnds {
    /// The index just past the first frame end in `buf`, if there is one; the state then
    /// stands at that index. Otherwise the state covers all of `buf`.
    fn next_frame_end(&mut self, buf: &[u8]) -> Option<usize> {
        let mut next = 0;
        for pos in memchr::memchr2_iter(b'\n', b'\r', buf) {
            if pos > next {
                self.line_empty = false;
                self.after_cr = false;
            }
            next = pos + 1;
            if buf[pos] == b'\n' && self.after_cr {
                self.after_cr = false;
                continue;
            }
            self.after_cr = buf[pos] == b'\r';
            if self.line_empty {
                let mut end = pos + 1;
                if self.after_cr && buf.get(end) == Some(&b'\n') {
                    end += 1;
                    self.after_cr = false;
                }
                return Some(end);
            }
            self.line_empty = true;
        }
        if buf.len() > next {
            self.line_empty = false;
            self.after_cr = false;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cut `stream` (given in `chunks`) as the body does: (piece, ends a frame).
    fn cut(chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut ends = FrameEnds::default();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            while !rest.is_empty() {
                let end = ends.next_frame_end(rest);
                let at = end.unwrap_or(rest.len());
                out.push((rest[..at].to_vec(), end.is_some()));
                rest = &rest[at..];
            }
        }
        out
    }

    #[test]
    fn frames_end_at_blank_lines_with_any_line_ending() {
        let pieces = cut(&[b"id: 1\ndata: a\n\nid: 2\r\ndata: b\r\n\r\ndata: c\r\rdata: d"]);
        assert_eq!(
            pieces,
            vec![
                (b"id: 1\ndata: a\n\n".to_vec(), true),
                (b"id: 2\r\ndata: b\r\n\r\n".to_vec(), true),
                (b"data: c\r\r".to_vec(), true),
                (b"data: d".to_vec(), false),
            ]
        );
    }

    #[test]
    fn a_crlf_split_between_chunks_is_one_line_end() {
        // "a\r" | "\n\r" | "\n": the CR LF pairs are single line ends; the frame ends once.
        let pieces = cut(&[b"data: a\r", b"\n\r", b"\ndata: b\n\n"]);
        assert_eq!(
            pieces,
            vec![
                (b"data: a\r".to_vec(), false),
                (b"\n\r".to_vec(), true),
                (b"\ndata: b\n\n".to_vec(), true),
            ]
        );
    }

    #[test]
    fn every_split_finds_the_same_frame_ends() {
        let stream: &[u8] = b"id: 1\r\ndata: x\r\n\r\n: c\n\ndata: y\r\rdata: z\n\n";
        let whole: Vec<usize> = frame_end_offsets(&[stream]);
        assert_eq!(whole.len(), 4);
        for at in 0..stream.len() {
            let split = frame_end_offsets(&[&stream[..at], &stream[at..]]);
            assert_eq!(split.len(), whole.len(), "split at {at}");
            for (s, w) in split.iter().zip(&whole) {
                // Split between a CR and its LF, the frame ends at the CR (the LF follows).
                assert!(
                    *s == *w || (*s + 1 == *w && stream[*s] == b'\n'),
                    "split at {at}"
                );
            }
        }
    }

    /// What a body of `chunks` that then ends hands on: the pieces, then how it ends.
    async fn hand_on(chunks: &[&'static [u8]]) -> (Vec<u8>, Option<String>) {
        let raw: RawBody = Box::pin(futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Bytes::from_static(c)))
                .collect::<Vec<_>>(),
        ));
        let mut body = Body::new(raw, Duration::from_secs(60), 1 << 20);
        let mut bytes = Vec::new();
        loop {
            match std::future::poll_fn(|cx| body.poll_next(cx)).await {
                Some(Ok(piece)) => bytes.extend_from_slice(&piece),
                Some(Err(e)) => return (bytes, Some(e.to_string())),
                None => return (bytes, None),
            }
        }
    }

    /// Regression (an adversary's run): a stream closed right after a frame's last line, with no
    /// blank line after it, ended as a plain close: the crate drops the frame it was building
    /// without a word. Closed in the middle of a line, the crate said so.
    #[tokio::test]
    async fn regression_a_frame_cut_at_a_line_end_by_the_close_went_unsaid() {
        let (bytes, end) = hand_on(&[b"id: 2\ndata: {}\n\n", b"id: 3\ndata: {}\n"]).await;
        assert_eq!(bytes, b"id: 2\ndata: {}\n\nid: 3\ndata: {}\n");
        assert!(end.is_some_and(|e| e.contains("middle of a frame")));
        // Closed after whole frames: a plain end.
        assert_eq!(hand_on(&[b"data: {}\r\n\r\n"]).await.1, None);
        assert_eq!(hand_on(&[b"data: {}\r\r"]).await.1, None);
        assert_eq!(hand_on(&[]).await.1, None);
    }

    fn frame_end_offsets(chunks: &[&[u8]]) -> Vec<usize> {
        let mut offset = 0;
        let mut ends = Vec::new();
        for (piece, end) in cut(chunks) {
            offset += piece.len();
            if end {
                ends.push(offset);
            }
        }
        ends
    }
}
