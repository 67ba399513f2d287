//! [`Event`]: the one type every stage passes on.
//!
//! An event is one webhook as the sender made it: headers, query and the exact body bytes. The
//! source builds it from a smee frame, the spool stores it, and each route reads it. Nothing
//! downstream ever needs the smee frame again, so the wire format stays inside `source`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// One webhook, decoded from the channel and ready to replay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The SSE `id:` the channel gave this frame. smee.io restarts the counter on every
    /// connection, so it is only good for logs that tie a delivery to what the channel sent.
    pub sse_id: Option<String>,
    /// When the channel server received the webhook (milliseconds since the epoch), if it said.
    /// Used for end-to-end latency and for the age of an event, never for ordering.
    pub timestamp_ms: Option<u64>,
    /// The webhook's headers that are safe to replay, lower-cased, in the order the channel
    /// sent them. Hop-by-hop, `host`, `content-length` and smee's own keys are already gone.
    pub headers: Vec<(String, String)>,
    /// Query parameters of the original request, appended to the target URL on replay.
    pub query: Vec<(String, String)>,
    /// The body bytes exactly as the sender signed them (see `source::wire` for where they
    /// come from).
    pub body: Bytes,
}

/// The header of an alert the pipeline made ("cpu-high FIRING"): the relay's own, never
/// taken from a frame (the source drops `x-smee-relay-*` headers).
pub const ALERT_HEADER: &str = "x-smee-relay-alert";

impl Event {
    /// The first value of header `name` (lower-case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// About how many bytes of memory this event holds: its body, its strings, and a fixed
    /// share for the struct and each allocation. What bounds the events read but not yet
    /// stored (`source::queue`) and the size of a spool commit; an estimate, never zero, so
    /// that a flood of empty events is bounded too.
    pub fn held_bytes(&self) -> usize {
        /// The struct itself and its allocations' headers, per event and per string pair.
        const PER_EVENT: usize = 128;
        const PER_PAIR: usize = 64;
        let pairs = |pairs: &[(String, String)]| -> usize {
            pairs
                .iter()
                .map(|(n, v)| n.len() + v.len() + PER_PAIR)
                .sum()
        };
        PER_EVENT
            + self.body.len()
            + self.sse_id.as_ref().map_or(0, String::len)
            + pairs(&self.headers)
            + pairs(&self.query)
    }

    /// A short label for logs: the event kind a human would look for first
    /// (`x-github-event=push`), if the sender said one.
    pub fn kind(&self) -> Option<String> {
        // An alert the pipeline made is named as such ("cpu-high FIRING"), not by the entity
        // change's `action` in its body (helper-138: alert rows read `UPDATE`).
        if let Some(alert) = self.header(ALERT_HEADER) {
            return Some(crate::text::cut(alert, 64).to_string());
        }
        /// A sender chooses the value: one of 60 KB would fill every log line and `events
        /// list` row of its delivery (helper-121).
        const KIND_MAX: usize = 64;
        const KIND_HEADERS: [&str; 3] = ["x-github-event", "x-gitlab-event", "x-port-event"];
        KIND_HEADERS.iter().find_map(|name| {
            self.header(name)
                .map(|v| format!("{name}={}", crate::text::cut(v, KIND_MAX)))
        })
    }
}
