//! Port payload decoding: any body is a change or a clear refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let _ = smee_relay::pipeline::port::decode(body);
});
