//! How the header of an `events` row (everything of a stored event but its body) is encoded.
//! Every event's row is written once and, while its route is behind, read back once: a fixed
//! binary layout, where JSON's escaping and parsing of every header cost about as much again
//! (BENCHMARKS.md, "Issue 19, seventeenth session").
//!
//! Rows written before format version 3 hold the header as JSON (`{"received_ms":…}`); they are
//! still read. A binary header starts with [`TAG`], a byte no JSON document starts with. Then,
//! integers little-endian and each text as a `u32` length and its UTF-8:
//!
//! `received_ms` u64, a flags byte (bit 0: an SSE id follows, bit 1: a smee timestamp, bit 2: a
//! body stored in pieces, its length), the timestamp (u64) and the length (u64) where flagged,
//! the channel, the SSE id where flagged, the number of headers (u32) and each name and value,
//! the number of query pairs (u32) and each name and value.

use super::{EventHeader, EventHeaderRef};

/// The first byte of a binary header.
const TAG: u8 = 1;

const HAS_SSE_ID: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;
const HAS_CHUNKED_LEN: u8 = 4;

/// Append `header` to `out`.
pub(super) fn encode(header: &EventHeaderRef<'_>, out: &mut Vec<u8>) {
    let flags = if header.sse_id.is_some() {
        HAS_SSE_ID
    } else {
        0
    } | if header.timestamp_ms.is_some() {
        HAS_TIMESTAMP
    } else {
        0
    } | if header.chunked_len.is_some() {
        HAS_CHUNKED_LEN
    } else {
        0
    };
    out.push(TAG);
    out.extend_from_slice(&header.received_ms.to_le_bytes());
    out.push(flags);
    if let Some(t) = header.timestamp_ms {
        out.extend_from_slice(&t.to_le_bytes());
    }
    if let Some(len) = header.chunked_len {
        out.extend_from_slice(&len.to_le_bytes());
    }
    text(out, header.channel);
    if let Some(id) = header.sse_id {
        text(out, id);
    }
    for pairs in [header.headers, header.query] {
        // Bounded by what a frame can carry, far below 4 Gi pairs.
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (name, value) in pairs {
            text(out, name);
            text(out, value);
        }
    }
}

fn text(out: &mut Vec<u8>, s: &str) {
    // A header row holds texts from one frame, bounded far below 4 GiB by the frame limit.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A header in either layout; `None` if it is neither (damaged).
pub(super) fn decode(bytes: &[u8]) -> Option<EventHeader> {
    if bytes.first() != Some(&TAG) {
        return serde_json::from_slice(bytes).ok();
    }
    let mut r = Reader(&bytes[1..]);
    let received_ms = r.u64()?;
    let flags = r.take(1)?[0];
    let timestamp_ms = if flags & HAS_TIMESTAMP != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let chunked_len = if flags & HAS_CHUNKED_LEN != 0 {
        Some(r.u64()?)
    } else {
        None
    };
    let channel = r.text()?;
    let sse_id = if flags & HAS_SSE_ID != 0 {
        Some(r.text()?)
    } else {
        None
    };
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

/// What is left of a header being decoded.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn text(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        Some(std::str::from_utf8(self.take(len)?).ok()?.to_string())
    }

    fn pairs(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.u32()? as usize;
        // Each pair takes at least 8 bytes: a damaged count cannot reserve more than the row.
        let mut pairs = Vec::with_capacity(n.min(self.0.len() / 8));
        for _ in 0..n {
            pairs.push((self.text()?, self.text()?));
        }
        Some(pairs)
    }
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
