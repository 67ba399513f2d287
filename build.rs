//! Link step only: lays out the functions a relay runs side by side in the `dist` binary.
//!
//! The kernel maps a program's code up to 64 KiB at a time around each page it touches
//! (fault-around), so the code a relay runs, scattered over the binary's 10 MB of `.text`, kept
//! most of the binary resident. `packaging/symbol-order.txt` lists the functions that ran in a
//! profiled `dist` relay, hottest first (made by `packaging/symbol-order.sh generate`), and the
//! linker puts them first. Names carry the build's hashes, so the list fits only the `dist`
//! profile with this Cargo.lock and version; a name that no longer exists is skipped: a stale
//! list costs memory, never correctness (`packaging/symbol-order.sh check` says how stale).
//! Only for `dist` on x86_64 Linux, where Rust links with lld, which knows the option;
//! `SMEE_RELAY_NO_SYMBOL_ORDER=1` turns it off (another linker).

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=packaging/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=SMEE_RELAY_NO_SYMBOL_ORDER");
    let target = std::env::var("TARGET").unwrap_or_default();
    // OUT_DIR is <target dir>/<profile>/build/<package>-<hash>/out: Cargo tells a build
    // script its profile only as "debug" or "release".
    let out_dir = std::env::var("OUT_DIR").unwrap_or_default();
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(Path::file_name);
    if target != "x86_64-unknown-linux-gnu"
        || profile.is_none_or(|p| p != "dist")
        || std::env::var_os("SMEE_RELAY_NO_SYMBOL_ORDER").is_some()
    {
        return;
    }
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/symbol-order.txt");
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={},--no-warn-symbol-ordering",
        order.display()
    );
}
