//! The smee frame decoder: any `data:` payload (and any SSE id) decodes or is refused, never
//! panics; a decoded event never carries a header the relay sets itself or one HTTP forbids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smee_relay::source::wire;

fuzz_target!(|input: &[u8]| {
    // The eventsource-client hands the source valid UTF-8 only.
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // The first line, if any, stands for the SSE id; the rest is the data.
    let (id, data) = match text.split_once('\n') {
        Some((id, data)) => (Some(id), data),
        None => (None, text),
    };
    if let Ok(decoded) = wire::decode(id, data) {
        for (name, value) in &decoded.event.headers {
            assert!(!name.starts_with("x-smee-relay-"), "{name}");
            assert!(
                http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                "{name}"
            );
            assert!(http::HeaderValue::from_str(value).is_ok(), "{name}");
        }
    }
});
