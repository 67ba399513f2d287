//! Server-sent events, parsed as the bytes arrive (the WHATWG `text/event-stream` format).
//!
//! This replaces the parser of `eventsource-client`, which held every frame three times over
//! (the line being read, the event's data, and a clone of that data): a 10 MiB webhook, 13 MiB
//! as a base64 frame, grew the process by about 38 MiB against a budget of 30 (BENCHMARKS.md).
//! Here a frame's bytes are held once: a `data:` line is read into one buffer, and when it is the
//! frame's only data line (smee's case) that buffer becomes the frame's data without a copy.
//!
//! The rules, from the spec: lines end with CRLF, LF or CR; a leading UTF-8 BOM is dropped; a
//! line starting with `:` is a comment; `field: value` sets a field (one space after the colon
//! is dropped); `data` lines are joined with LF; `id` persists across frames unless it holds a
//! NUL; a blank line ends the frame, which is dispatched only if it has data. `retry` is ignored:
//! the source has its own backoff. Bytes that are not UTF-8 are replaced (U+FFFD), as the spec
//! says, rather than ending the connection.

use std::collections::VecDeque;

/// Frames larger than this are skipped (and reported) rather than buffered without end.
pub const MAX_FRAME: usize = 128 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The `event` field, or `message`.
    pub event: String,
    /// The last event id seen on this stream, if any.
    pub id: Option<String>,
    /// The `data` lines, joined with LF.
    pub data: String,
}

/// What the parser found in the bytes given to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Frame(Frame),
    /// A frame over [`MAX_FRAME`] was dropped; the id is the last one seen before or in it.
    Oversized {
        id: Option<String>,
        bytes: usize,
    },
}

/// The parser's state between chunks.
#[derive(Debug)]
pub struct Parser {
    /// The line read so far (no terminator).
    line: Vec<u8>,
    /// Bytes in the line so far, stored or not (a skipped line is still not blank).
    line_bytes: usize,
    /// The previous chunk ended with CR: a LF opening this one belongs to it.
    after_cr: bool,
    /// Whether the start of the stream (and a possible BOM) is behind us.
    started: bool,
    /// The frame's data so far; `None` until its first `data` line.
    data: Option<Vec<u8>>,
    /// The frame's `event` field.
    event: Option<String>,
    /// The last event id: it carries over to later frames, as the spec says.
    last_id: Option<String>,
    /// Bytes of the current frame, to enforce `max_frame`; `skipping` once over it.
    frame_bytes: usize,
    skipping: bool,
    /// The most a frame may hold ([`MAX_FRAME`]).
    max_frame: usize,
}

impl Default for Parser {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME)
    }
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// A parser that skips frames over `max_frame` bytes.
    pub fn with_limit(max_frame: usize) -> Self {
        Self {
            line: Vec::new(),
            line_bytes: 0,
            after_cr: false,
            started: false,
            data: None,
            event: None,
            last_id: None,
            frame_bytes: 0,
            skipping: false,
            max_frame,
        }
    }

    /// Whether a frame was begun but not finished (for "closed in the middle of a frame").
    pub fn mid_frame(&self) -> bool {
        self.line_bytes > 0 || self.data.is_some() || self.event.is_some() || self.skipping
    }

    /// Parse `chunk`, appending what it completes to `out`.
    pub fn feed(&mut self, mut chunk: &[u8], out: &mut VecDeque<Item>) {
        if !self.started {
            // The BOM may itself arrive split; wait for three bytes before deciding.
            if self.line.len() + chunk.len() < 3 && b"\xEF\xBB\xBF".starts_with(&self.line) {
                self.line.extend_from_slice(chunk);
                return;
            }
            self.started = true;
            self.frame_bytes = 0;
            self.line_bytes = 0;
            let mut head = std::mem::take(&mut self.line);
            head.extend_from_slice(chunk);
            let rest = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head).to_vec();
            return self.feed(&rest, out);
        }
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            self.take(&chunk[..end]);
            let crlf = chunk[end] == b'\r' && chunk.get(end + 1) == Some(&b'\n');
            if chunk[end] == b'\r' && end + 1 == chunk.len() {
                self.after_cr = true;
            }
            chunk = &chunk[end + if crlf { 2 } else { 1 }..];
            let line = std::mem::take(&mut self.line);
            let blank = std::mem::take(&mut self.line_bytes) == 0;
            self.line_done(line, blank, out);
        }
        self.take(chunk);
    }

    /// Add bytes to the current line, unless the frame is over the limit.
    fn take(&mut self, bytes: &[u8]) {
        self.line_bytes += bytes.len();
        self.frame_bytes += bytes.len();
        if self.frame_bytes > self.max_frame && !self.skipping {
            self.skipping = true;
            self.line = Vec::new();
            self.data = None;
        }
        if !self.skipping {
            self.line.extend_from_slice(bytes);
        }
    }

    fn line_done(&mut self, mut line: Vec<u8>, blank: bool, out: &mut VecDeque<Item>) {
        if self.skipping {
            if blank {
                out.push_back(Item::Oversized {
                    id: self.last_id.clone(),
                    bytes: self.frame_bytes,
                });
                self.reset_frame();
            }
            return;
        }
        if blank {
            return self.dispatch(out);
        }
        if line.first() == Some(&b':') {
            return; // a comment (smee's keep-alives are events, but other servers use these)
        }
        let (field_len, value_start) = match memchr::memchr(b':', &line) {
            Some(colon) if line.get(colon + 1) == Some(&b' ') => (colon, colon + 2),
            Some(colon) => (colon, colon + 1),
            None => (line.len(), line.len()),
        };
        match &line[..field_len] {
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push(b'\n');
                    data.extend_from_slice(&line[value_start..]);
                }
                None => {
                    // The line's own buffer becomes the data: no copy of a large frame.
                    line.drain(..value_start);
                    self.data = Some(line);
                }
            },
            b"event" => self.event = Some(text(line[value_start..].to_vec())),
            b"id" if !line[value_start..].contains(&0) => {
                self.last_id = Some(text(line[value_start..].to_vec()));
            }
            _ => {} // retry, or a field the spec says to ignore
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<Item>) {
        let event = self.event.take();
        if let Some(data) = self.data.take() {
            out.push_back(Item::Frame(Frame {
                event: event
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "message".into()),
                id: self.last_id.clone(),
                data: text(data),
            }));
        }
        self.reset_frame();
    }

    fn reset_frame(&mut self) {
        self.data = None;
        self.event = None;
        self.frame_bytes = 0;
        self.skipping = false;
    }
}

/// Bytes as text; invalid UTF-8 is replaced, and valid text (the usual case) is not copied.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]]) -> Vec<Item> {
        let mut parser = Parser::new();
        let mut out = VecDeque::new();
        for chunk in chunks {
            parser.feed(chunk, &mut out);
        }
        out.into()
    }

    fn frame(event: &str, id: Option<&str>, data: &str) -> Item {
        Item::Frame(Frame {
            event: event.into(),
            id: id.map(Into::into),
            data: data.into(),
        })
    }

    #[test]
    fn a_smee_stream() {
        let stream = b"event: ready\ndata: {}\n\nid: 17\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: ping\ndata: {}\n\n";
        assert_eq!(
            frames(&[stream]),
            vec![
                frame("ready", None, "{}"),
                frame("message", Some("17"), "{\"a\":1}"),
                frame("ping", Some("17"), "{}"),
            ]
        );
    }

    #[test]
    fn every_line_ending_and_any_split() {
        let stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata:d\r\r";
        let expected = vec![
            frame("message", None, "a\nb\nc"),
            frame("message", None, "d"),
        ];
        assert_eq!(frames(&[stream]), expected);
        // Split at every point, including between CR and LF.
        for at in 0..stream.len() {
            assert_eq!(
                frames(&[&stream[..at], &stream[at..]]),
                expected,
                "split at {at}"
            );
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames(&bytewise), expected);
    }

    #[test]
    fn fields_as_the_spec_says() {
        // No space after the colon; a field with no colon; an id with NUL is ignored; unknown
        // fields and retry are ignored; data with no frame end is not dispatched.
        let stream = b"data:x\ndata\nid: 1\nretry: 5\nfoo: bar\n\nid: a\0b\ndata: y\n\ndata: never";
        assert_eq!(
            frames(&[stream]),
            vec![
                frame("message", Some("1"), "x\n"),
                frame("message", Some("1"), "y")
            ]
        );
    }

    #[test]
    fn a_frame_without_data_is_not_dispatched_and_its_event_does_not_leak() {
        let stream = b"event: ping\n\ndata: z\n\n";
        assert_eq!(frames(&[stream]), vec![frame("message", None, "z")]);
    }

    #[test]
    fn a_leading_bom_is_dropped_even_when_split() {
        let stream = b"\xEF\xBB\xBFdata: a\n\n";
        assert_eq!(frames(&[stream]), vec![frame("message", None, "a")]);
        assert_eq!(
            frames(&[&stream[..1], &stream[1..2], &stream[2..]]),
            vec![frame("message", None, "a")]
        );
        // Only at the start of the stream.
        assert_eq!(
            frames(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]),
            vec![frame("message", None, "a")]
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(
            frames(&[b"data: a\xFFb\n\ndata: c\n\n"]),
            vec![
                frame("message", None, "a\u{FFFD}b"),
                frame("message", None, "c")
            ]
        );
    }

    #[test]
    fn an_oversized_frame_is_skipped_and_reported_and_the_next_one_parses() {
        let mut parser = Parser::with_limit(1000);
        let mut out = VecDeque::new();
        parser.feed(b"id: 9\ndata: ", &mut out);
        for _ in 0..100 {
            parser.feed(&[b'x'; 100], &mut out);
        }
        assert!(
            parser.line.capacity() <= 1000,
            "not buffered past the limit"
        );
        // More lines of the same frame are skipped too, up to its blank line.
        parser.feed(b"\ndata: more\n\ndata: next\n\n", &mut out);
        let items: Vec<Item> = out.into();
        assert!(matches!(&items[0], Item::Oversized { id: Some(id), .. } if id == "9"));
        assert_eq!(items[1], frame("message", Some("9"), "next"));
        assert!(!parser.mid_frame());
    }

    #[test]
    fn mid_frame_is_known() {
        let mut parser = Parser::new();
        let mut out = VecDeque::new();
        parser.feed(b"data: partial", &mut out);
        assert!(parser.mid_frame());
        parser.feed(b"\n\n", &mut out);
        assert!(!parser.mid_frame());
        assert_eq!(out.len(), 1);
    }
}
