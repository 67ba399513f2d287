//! The smee wire format: turning one SSE `data:` payload into an [`Event`].
//!
//! A smee webhook frame is one JSON object: every request header (lower-cased) at the top level,
//! plus smee's own keys `body`, `query`, `timestamp`, and on some servers `rawdata` (raw body as a
//! string) or `bodyB` (raw body, base64). The body is taken, in order of preference, from `bodyB`,
//! `rawdata`, or the exact text of `body` as it stands in the frame. That last one is never
//! parsed and re-serialised: key order, number format and escapes survive, which is what keeps a
//! sender's signature valid through the relay.
//!
//! Decoding is pure: it returns the event plus the list of headers it refused, and the caller
//! logs them with the event id. This keeps the rules testable without a connection.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::event::Event;

/// The header a subscriber sends to receive exact bodies (`bodyB`).
pub const RAW_OPT_IN: &str = "x-smee-relay-raw";

/// smee's own keys: they describe the request, they are not headers of it.
const SMEE_KEYS: [&str; 5] = ["body", "query", "timestamp", "rawdata", "bodyB"];

/// Headers that must not be replayed: hop-by-hop headers belong to the connection the channel
/// server saw, `host` names the channel server, `content-length` is recomputed for the new body,
/// and `expect` (curl's `100-continue` for a large body) was the channel server's to answer:
/// the body is whole now, and a target may answer it with 417.
pub(crate) const NEVER_FORWARDED: [&str; 9] = [
    "host",
    "content-length",
    "expect",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// The prefix of every header the relay itself sets on what it sends (`x-smee-relay-delivery`,
/// `-alert`, `-recovered`, and `x-smee-relay-raw` on subscriptions). A sender could post them
/// to pass for the relay, so they are never taken from a frame.
pub(crate) const OWN_HEADER_PREFIX: &str = "x-smee-relay-";

/// Why a frame could not become an event at all. The event is skipped; the connection goes on.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The `data:` payload is not JSON (a truncated frame usually ends up here).
    #[error("data is not valid JSON ({0})")]
    NotJson(serde_json::Error),
    /// The payload is JSON, but not the object smee sends.
    #[error("data is a JSON {0}, expected an object")]
    NotAnObject(&'static str),
    /// `bodyB` is present but is not base64.
    #[error("bodyB is not valid base64 ({0})")]
    BadBodyB(base64::DecodeError),
    /// `bodyB` or `rawdata` is present but is not a string.
    #[error("{0} is not a string")]
    RawBodyNotString(&'static str),
    /// `bodyB` or `rawdata` is a string with an escape that is no character (`\ud800`).
    #[error("{0} is a JSON string that is not Unicode: {LONE_SURROGATE}")]
    RawBodyNotUnicode(&'static str),
}

/// A header (or query parameter) that was in the frame but will not be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    /// The value is a number, object, array, bool or null: a header value is always a string.
    NonStringHeader { name: String, json: &'static str },
    /// The name is not a valid HTTP header name.
    InvalidHeaderName { name: String },
    /// The value holds CR, LF, NUL or another byte HTTP forbids: a header injection attempt or
    /// a broken sender. The value itself is not reported; it may be a secret.
    InvalidHeaderValue { name: String },
    /// A query parameter whose value is an object or null, which has no URL form.
    UnsupportedQueryValue { name: String },
    /// `query` is not an object of parameters (a string, a number, an array): none is kept.
    QueryNotAnObject { json: &'static str },
    /// A header only the relay may set (`x-smee-relay-*`): a sender posted it.
    OwnHeader { name: String },
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::NonStringHeader {
                name,
                json: "string",
            } => write!(
                f,
                "header {name:?} dropped: its value is a JSON string that is not Unicode: \
                 {LONE_SURROGATE}"
            ),
            Dropped::NonStringHeader { name, json } => {
                write!(
                    f,
                    "header {name:?} dropped: its value is a JSON {json}, not a string"
                )
            }
            Dropped::InvalidHeaderName { name } => {
                write!(f, "header {name:?} dropped: not a valid HTTP header name")
            }
            Dropped::InvalidHeaderValue { name } => write!(
                f,
                "header {name:?} dropped: its value contains CR, LF or another forbidden byte"
            ),
            Dropped::OwnHeader { name } => write!(
                f,
                "header {name:?} dropped: only smee-relay itself sets x-smee-relay-* headers"
            ),
            Dropped::QueryNotAnObject { json } => write!(
                f,
                "query dropped: it is a JSON {json}, not an object of parameters (smee's shape)"
            ),
            Dropped::UnsupportedQueryValue { name } => {
                write!(
                    f,
                    "query parameter {name:?} dropped: its value has no URL form"
                )
            }
        }
    }
}

/// A decoded frame: the event, and what was left out of it.
#[derive(Debug)]
pub struct Decoded {
    /// The event to spool and deliver.
    pub event: Event,
    /// Headers and query parameters the frame had but the event does not, for one warning each.
    pub dropped: Vec<Dropped>,
}

/// Decode the `data:` payload of one smee webhook frame.
pub fn decode(sse_id: Option<&str>, data: &str) -> Result<Decoded, WireError> {
    let fields = parse_object(data)?;

    let mut headers = Vec::new();
    let mut query = Vec::new();
    let mut dropped = Vec::new();
    let mut timestamp_ms = None;
    let mut body_text: Option<&RawValue> = None;
    let mut rawdata: Option<&RawValue> = None;
    let mut body_b: Option<&RawValue> = None;
    // Headers the request's own `Connection:` names are hop-by-hop too (RFC 9110 7.6.1): they
    // belonged to the connection the channel server saw, like the fixed list.
    let listed: Vec<String> = fields
        .0
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .filter_map(|(_, raw)| json_string(raw))
        .flat_map(|value| {
            value
                .split(',')
                .map(|token| token.trim().to_ascii_lowercase())
                .filter(|token| !token.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();

    for (name, raw) in fields.0 {
        match name.as_ref() {
            "body" => body_text = Some(raw),
            "rawdata" => rawdata = Some(raw),
            "bodyB" => body_b = Some(raw),
            "timestamp" => timestamp_ms = parse_timestamp(raw),
            "query" => decode_query(raw, &mut query, &mut dropped),
            _ if listed.iter().any(|l| name.eq_ignore_ascii_case(l)) => {}
            _ => decode_header(name, raw, &mut headers, &mut dropped),
        }
    }

    let body = if let Some(raw) = body_b {
        let text = raw_body_text(raw, "bodyB")?;
        Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(WireError::BadBodyB)?,
        )
    } else if let Some(raw) = rawdata {
        let text = raw_body_text(raw, "rawdata")?;
        Bytes::from(text.into_owned())
    } else if let Some(raw) = body_text {
        Bytes::copy_from_slice(raw.get().as_bytes())
    } else {
        Bytes::new()
    };

    Ok(Decoded {
        event: Event {
            sse_id: sse_id.map(str::to_owned),
            timestamp_ms,
            headers,
            query,
            body,
        },
        dropped,
    })
}

fn parse_object(data: &str) -> Result<Fields<'_>, WireError> {
    serde_json::from_str(data).or_else(|error| {
        // Only on failure, a second look to say what it is instead (an array, a number...).
        let value: &RawValue = serde_json::from_str(data).map_err(WireError::NotJson)?;
        match json_kind(value) {
            "object" => Err(WireError::NotJson(error)),
            other => Err(WireError::NotAnObject(other)),
        }
    })
}

fn decode_header(
    name: Cow<'_, str>,
    raw: &RawValue,
    headers: &mut Vec<(String, String)>,
    dropped: &mut Vec<Dropped>,
) {
    let name = name.to_ascii_lowercase();
    if NEVER_FORWARDED.contains(&name.as_str()) || name.starts_with("proxy-") {
        return;
    }
    if name.starts_with(OWN_HEADER_PREFIX) {
        dropped.push(Dropped::OwnHeader { name });
        return;
    }
    let Some(value) = json_string(raw) else {
        if !SMEE_KEYS.contains(&name.as_str()) {
            dropped.push(Dropped::NonStringHeader {
                name,
                json: json_kind(raw),
            });
        }
        return;
    };
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        dropped.push(Dropped::InvalidHeaderName { name });
    } else if http::HeaderValue::from_bytes(value.as_bytes()).is_err() {
        dropped.push(Dropped::InvalidHeaderValue { name });
    } else {
        headers.push((name, value.into_owned()));
    }
}

fn decode_query(raw: &RawValue, query: &mut Vec<(String, String)>, dropped: &mut Vec<Dropped>) {
    let Ok(serde_json::Value::Object(params)) = serde_json::from_str(raw.get()) else {
        // `null` is no parameters; anything else was meant as some (helper-137: a query sent
        // as a string was dropped without a word).
        match json_kind(raw) {
            "null" => {}
            json => dropped.push(Dropped::QueryNotAnObject { json }),
        }
        return;
    };
    for (name, value) in params {
        let values = match value {
            serde_json::Value::Array(items) => items,
            single => vec![single],
        };
        for value in values {
            match value {
                serde_json::Value::String(s) => query.push((name.clone(), s)),
                serde_json::Value::Number(n) => query.push((name.clone(), n.to_string())),
                serde_json::Value::Bool(b) => query.push((name.clone(), b.to_string())),
                _ => dropped.push(Dropped::UnsupportedQueryValue { name: name.clone() }),
            }
        }
    }
}

fn parse_timestamp(raw: &RawValue) -> Option<u64> {
    match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The text of `bodyB` or `rawdata` (`field`), which must be a JSON string.
fn raw_body_text<'a>(raw: &'a RawValue, field: &'static str) -> Result<Cow<'a, str>, WireError> {
    json_string(raw).ok_or(match json_kind(raw) {
        "string" => WireError::RawBodyNotUnicode(field),
        _ => WireError::RawBodyNotString(field),
    })
}

/// Why a JSON string may not decode: serde_json refuses an escaped surrogate without its pair.
const LONE_SURROGATE: &str =
    "an escape of half a character (a lone surrogate such as \\ud800) that nothing can decode";

/// The decoded text of a JSON string, or `None` when the value is not a string.
/// A JSON string's text: borrowed from the frame when it has no escapes (as base64 never
/// does: serde's `Cow<str>` would copy it, a second frame-sized buffer for a large body).
fn json_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    if !raw.get().starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(raw.get()) {
        Ok(text) => Some(Cow::Borrowed(text)),
        Err(_) => serde_json::from_str::<String>(raw.get())
            .ok()
            .map(Cow::Owned),
    }
}

fn json_kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "bool",
        Some(b'n') => "null",
        _ => "number",
    }
}

/// The members of a JSON object in document order, values left as raw text.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        decode(Some("1"), data).expect("frame decodes").event
    }

    #[test]
    fn body_text_is_kept_byte_for_byte() {
        let body = r#"{"z":1,"a":"caf\u00e9 \/ é","n":1.0,"big":12345678901234567890,"e":1e5}"#;
        let data = format!(r#"{{"content-type":"application/json","body":{body},"timestamp":1}}"#);
        assert_eq!(event(&data).body, body.as_bytes());
    }

    #[test]
    fn raw_bodies_win_over_parsed_body() {
        let e = event(r#"{"body":{"a":1},"rawdata":"a=1&b=2"}"#);
        assert_eq!(e.body, "a=1&b=2");
        let e = event(r#"{"body":{"a":1},"rawdata":"x","bodyB":"AAEC/w=="}"#);
        assert_eq!(e.body.as_ref(), [0u8, 1, 2, 255]);
    }

    #[test]
    fn missing_body_is_empty() {
        assert!(event(r#"{"x-a":"1"}"#).body.is_empty());
    }

    #[test]
    fn smee_keys_and_hop_by_hop_headers_are_not_headers() {
        let e = event(
            r#"{"host":"smee.io","content-length":"9","connection":"close","transfer-encoding":"chunked",
               "expect":"100-continue",
               "proxy-authorization":"x","te":"trailers","x-github-event":"push","timestamp":1700000000000,
               "query":{},"body":{}}"#,
        );
        assert_eq!(e.headers, vec![("x-github-event".into(), "push".into())]);
        assert_eq!(e.timestamp_ms, Some(1_700_000_000_000));
    }

    /// Bug: headers named in the request's `Connection:` header (hop-by-hop by that listing)
    /// were forwarded to targets; only the fixed hop-by-hop list was stripped.
    #[test]
    fn headers_listed_in_connection_are_hop_by_hop_and_not_forwarded() {
        let e = event(
            r#"{"x-before":"1","Connection":"keep-alive, X-Before ,x-after","x-after":"2",
               "x-github-event":"push","query":{},"body":{"a":1}}"#,
        );
        assert_eq!(e.headers, vec![("x-github-event".into(), "push".into())]);
        assert_eq!(e.body.as_ref(), br#"{"a":1}"#);
        // smee's own keys are never headers: naming them changes nothing.
        let e = event(r#"{"connection":"body, query","query":{"q":"1"},"body":{"a":1}}"#);
        assert_eq!(e.body.as_ref(), br#"{"a":1}"#);
        assert_eq!(e.query, vec![("q".into(), "1".into())]);
    }

    #[test]
    fn header_injection_is_dropped_and_reported() {
        let d = decode(
            None,
            r#"{"x-ok":"1","x-evil":"a\r\nx-injected: 1","bad name":"v","x-num":5,"body":{}}"#,
        )
        .unwrap();
        assert_eq!(d.event.headers, vec![("x-ok".into(), "1".into())]);
        assert_eq!(
            d.dropped,
            vec![
                Dropped::InvalidHeaderValue {
                    name: "x-evil".into()
                },
                Dropped::InvalidHeaderName {
                    name: "bad name".into()
                },
                Dropped::NonStringHeader {
                    name: "x-num".into(),
                    json: "number"
                },
            ]
        );
    }

    /// Issue 16 item 9: a sender could pass for the relay by posting its headers.
    #[test]
    fn regression_the_relays_own_headers_are_never_taken_from_a_frame() {
        let d = decode(
            Some("1"),
            r#"{"x-smee-relay-delivery":"forged","X-Smee-Relay-Alert":"forged","x-smee-relay-raw":"1",
               "x-smee-relay-recovered":"github","x-smee-relay-future":"x","x-smee-relayed":"kept","body":{}}"#,
        )
        .unwrap();
        assert_eq!(
            d.event.headers,
            vec![("x-smee-relayed".into(), "kept".into())]
        );
        assert_eq!(d.dropped.len(), 5);
        assert!(d.dropped.iter().all(
            |x| matches!(x, Dropped::OwnHeader { name } if name.starts_with("x-smee-relay-"))
        ));
    }

    #[test]
    fn regression_a_query_that_is_no_object_was_dropped_without_a_word() {
        let decoded = decode(Some("1"), r#"{"query":"x=1&y=2","body":{}}"#).unwrap();
        assert!(decoded.event.query.is_empty());
        assert_eq!(
            decoded.dropped,
            [Dropped::QueryNotAnObject { json: "string" }]
        );
        let decoded = decode(Some("1"), r#"{"query":null,"body":{}}"#).unwrap();
        assert!(decoded.dropped.is_empty(), "null is no parameters");
    }

    #[test]
    fn query_values_flatten_in_order() {
        let e = event(r#"{"query":{"a":"1","b":["2","3"],"c":4,"d":{"x":1}}}"#);
        assert_eq!(
            e.query,
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".into(), "2".into()),
                ("b".into(), "3".into()),
                ("c".into(), "4".into())
            ]
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(
            decode(None, "not json"),
            Err(WireError::NotJson(_))
        ));
        assert!(matches!(
            decode(None, r#"{"body":"#),
            Err(WireError::NotJson(_))
        ));
        assert!(matches!(
            decode(None, "[1,2]"),
            Err(WireError::NotAnObject("array"))
        ));
        assert!(matches!(
            decode(None, r#"{"bodyB":"!!"}"#),
            Err(WireError::BadBodyB(_))
        ));
        assert!(matches!(
            decode(None, r#"{"rawdata":3}"#),
            Err(WireError::RawBodyNotString(_))
        ));
        // Said as what it is, not "not a string" (an adversary's run found both said so).
        let lone = decode(None, r#"{"rawdata":"\ud800"}"#).unwrap_err();
        assert!(matches!(lone, WireError::RawBodyNotUnicode("rawdata")));
        assert!(lone.to_string().contains("lone surrogate"), "{lone}");
        let header = decode(None, r#"{"x-sur":"\ud800","body":{}}"#)
            .unwrap()
            .dropped;
        assert_eq!(header.len(), 1);
        let said = header[0].to_string();
        assert!(
            said.contains("lone surrogate") && !said.contains("not a string"),
            "{said}"
        );
        assert!(matches!(decode(None, ""), Err(WireError::NotJson(_))));
    }
}
