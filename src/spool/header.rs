//! How the header of an `events` row (everything of a stored event but its body) is encoded.
//! Every event's row is written once and, while its route is behind, read back once: a fixed
//! binary layout, where JSON's escaping and parsing of every header cost about as much again
//! (BENCHMARKS.md, "Issue 19, seventeenth session").
//!
//! Rows written before format version 3 hold the header as JSON (`{"received_ms":…}`); they are
//! still read. A binary header starts with [`TAG`], a byte no JSON document starts with. Then
//! ([`super::bin`]: integers little-endian, each text as a `u32` length and its UTF-8):
//!
//! `received_ms` u64, a flags byte (bit 0: an SSE id follows, bit 1: a smee timestamp, bit 2: a
//! body stored in pieces, its length), the timestamp (u64) and the length (u64) where flagged,
//! the channel, the SSE id where flagged, the number of headers (u32) and each name and value,
//! the number of query pairs (u32) and each name and value.

use super::bin::{Reader, flags, put_pairs, put_text};
use super::{EventHeader, EventHeaderRef};

/// The first byte of a binary header.
const TAG: u8 = 1;

const HAS_SSE_ID: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;
const HAS_CHUNKED_LEN: u8 = 4;

/// Append `header` to `out`.
pub(super) fn encode(header: &EventHeaderRef<'_>, out: &mut Vec<u8>) {
    let flags = flags(&[
        (header.sse_id.is_some(), HAS_SSE_ID),
        (header.timestamp_ms.is_some(), HAS_TIMESTAMP),
        (header.chunked_len.is_some(), HAS_CHUNKED_LEN),
    ]);
    out.push(TAG);
    out.extend_from_slice(&header.received_ms.to_le_bytes());
    out.push(flags);
    if let Some(t) = header.timestamp_ms {
        out.extend_from_slice(&t.to_le_bytes());
    }
    if let Some(len) = header.chunked_len {
        out.extend_from_slice(&len.to_le_bytes());
    }
    put_text(out, header.channel);
    if let Some(id) = header.sse_id {
        put_text(out, id);
    }
    put_pairs(out, header.headers);
    put_pairs(out, header.query);
}

/// A header in either layout; `None` if it is neither (damaged).
pub(super) fn decode(bytes: &[u8]) -> Option<EventHeader> {
    if bytes.first() != Some(&TAG) {
        return serde_json::from_slice(bytes).ok();
    }
    let mut r = Reader(&bytes[1..]);
    let received_ms = r.u64()?;
    let flags = r.u8()?;
    let timestamp_ms = r.u64_if(flags & HAS_TIMESTAMP != 0)?;
    let chunked_len = r.u64_if(flags & HAS_CHUNKED_LEN != 0)?;
    let channel = r.text()?;
    let sse_id = r.text_if(flags & HAS_SSE_ID != 0)?;
    let headers = r.pairs()?;
    let query = r.pairs()?;
    r.0.is_empty().then_some(EventHeader {
        received_ms,
        channel,
        sse_id,
        timestamp_ms,
        headers,
        query,
        chunked_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Pairs = Vec<(String, String)>;

    fn pairs() -> impl Strategy<Value = Pairs> {
        proptest::collection::vec((any::<String>(), any::<String>()), 0..4)
    }

    fn any_header() -> impl Strategy<Value = EventHeader> {
        (
            any::<u64>(),
            any::<String>(),
            any::<Option<String>>(),
            any::<Option<u64>>(),
            pairs(),
            pairs(),
            any::<Option<u64>>(),
        )
            .prop_map(
                |(received_ms, channel, sse_id, timestamp_ms, headers, query, chunked_len)| {
                    EventHeader {
                        received_ms,
                        channel,
                        sse_id,
                        timestamp_ms,
                        headers,
                        query,
                        chunked_len,
                    }
                },
            )
    }

    fn encoded(h: &EventHeader) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &EventHeaderRef {
                received_ms: h.received_ms,
                channel: &h.channel,
                sse_id: h.sse_id.as_deref(),
                timestamp_ms: h.timestamp_ms,
                headers: &h.headers,
                query: &h.query,
                chunked_len: h.chunked_len,
            },
            &mut out,
        );
        out
    }

    proptest! {
        #[test]
        fn a_header_reads_back_as_written(h in any_header()) {
            prop_assert_eq!(decode(&encoded(&h)), Some(h));
        }

        #[test]
        fn a_header_written_as_json_before_format_3_still_reads(h in any_header()) {
            prop_assert_eq!(decode(&serde_json::to_vec(&h).unwrap()), Some(h));
        }

        #[test]
        fn a_cut_or_damaged_header_is_none_never_a_panic(h in any_header(), cut in 0usize..64, flip in any::<(usize, u8)>()) {
            let row = encoded(&h);
            let cut = cut.min(row.len().saturating_sub(1));
            prop_assert!(decode(&row[..cut]).is_none());
            let mut damaged = row.clone();
            let at = flip.0 % damaged.len();
            damaged[at] ^= flip.1 | 1;
            let _ = decode(&damaged);
        }
    }
}
