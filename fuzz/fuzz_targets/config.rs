//! Config parsing: any text is a config or a list of problems with file:line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    // Every variable is "set", so that *_env keys are exercised too.
    let env = |name: &str| Some(format!("http://127.0.0.1:9/{name}"));
    if let Err(e) = smee_relay::config::parse(text, "fuzz.toml", &env) {
        assert!(!e.to_string().is_empty());
    }
});
