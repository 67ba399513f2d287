//! A route's delivered floor in KV (`floor.route_<hash>`): the last stream sequence delivered
//! on the route, and which stream that sequence counts in.
//!
//! Stream sequences start again at 1 when the stream is created anew (deleted by an operator,
//! `nats stream rm`, or lost with NATS's data while the KV bucket stayed). A floor of the old
//! stream would then pass every new message below it for "delivered already", silently, until
//! the new stream's sequence caught up (helper-148: 18 events and their alerts lost, listed
//! delivered). So the floor names its stream by the stream's creation time, and a floor of
//! another stream counts as none. A floor written before it named its stream (`"SEQ"`) counts
//! as the current stream's unless it is above the stream's last sequence, which no floor of
//! the current stream can be.

use bytes::Bytes;

/// A floor as read from KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Floor {
    /// The last stream sequence delivered on the route.
    pub seq: u64,
    /// The creation time of the stream `seq` counts in (ns since the epoch); `None` in a floor
    /// written before floors named their stream.
    pub stream: Option<u64>,
}

impl Floor {
    /// A floor's KV value: `"SEQ CREATED"`, or `"SEQ"`.
    pub fn parse(value: &[u8]) -> Option<Floor> {
        let text = std::str::from_utf8(value).ok()?;
        let (seq, stream) = match text.split_once(' ') {
            Some((seq, stream)) => (seq, Some(stream.parse().ok()?)),
            None => (text, None),
        };
        Some(Floor {
            seq: seq.parse().ok()?,
            stream,
        })
    }

    /// The KV value of a floor at `seq` of the stream created at `stream` (0: not known).
    pub fn value(seq: u64, stream: u64) -> Bytes {
        match stream {
            0 => Bytes::from(seq.to_string()),
            stream => Bytes::from(format!("{seq} {stream}")),
        }
    }

    /// Whether this floor counts in the stream created at `created` whose last sequence is
    /// `last` (see the module header).
    pub fn of_stream(&self, created: u64, last: u64) -> bool {
        match self.stream {
            Some(stream) => stream == created,
            None => self.seq <= last,
        }
    }
}

/// A stream's creation time as floors name it.
pub(super) fn created_ns(info: &async_nats::jetstream::stream::Info) -> u64 {
    u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_names_its_stream_and_an_old_one_is_read_too() {
        let floor = Floor::parse(&Floor::value(330, 17)).unwrap();
        assert_eq!(
            floor,
            Floor {
                seq: 330,
                stream: Some(17)
            }
        );
        assert!(floor.of_stream(17, 400));
        assert!(!floor.of_stream(18, 400), "a stream created anew");
        let old = Floor::parse(b"330").unwrap();
        assert_eq!(old.stream, None);
        assert!(old.of_stream(18, 330));
        assert!(!old.of_stream(18, 18), "above the stream's last sequence");
        assert_eq!(Floor::parse(b"330 x"), None);
        assert_eq!(Floor::parse(b""), None);
        assert_eq!(&Floor::value(5, 0)[..], b"5");
    }
}
