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
//! `SMEE_RELAY_NO_SYMBOL_ORDER=1` turns it off. A linker that does not take the option (GNU ld
//! or gold: `-Clinker-features=-lld`, `-fuse-ld=bfd`, a distribution's rustc) or a missing
//! list turns it off too, with a warning saying so, rather than failing the link: the order only
//! saves memory.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=packaging/symbol-order.txt");
    println!("cargo:rerun-if-env-changed=SMEE_RELAY_NO_SYMBOL_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
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
    if !order.is_file() {
        // A list put back with its old mtime (`mv`, `cp -p`) would not look changed to
        // rerun-if-changed on the file; the folder's entry changes.
        println!("cargo:rerun-if-changed=packaging");
        println!(
            "cargo:warning=symbol order off: {} is missing, so the relay's code stays scattered \
             over the binary (megabytes more resident); `packaging/symbol-order.sh generate` \
             makes it",
            order.display()
        );
        return;
    }
    // -Xlinker passes each argument whole: `-Wl,` would split a path holding a comma.
    let args = [
        "-Xlinker".to_string(),
        format!("--symbol-ordering-file={}", order.display()),
        "-Xlinker".to_string(),
        "--no-warn-symbol-ordering".to_string(),
    ];
    if let Err(why) = linker_takes(&target, Path::new(&out_dir), &args) {
        println!(
            "cargo:warning=symbol order off: the linker does not take --symbol-ordering-file \
             (lld does: Rust's default here), so the relay's code stays scattered over the \
             binary (megabytes more resident); SMEE_RELAY_NO_SYMBOL_ORDER=1 builds without it \
             and without this warning ({why})"
        );
        return;
    }
    for arg in args {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}

/// Links an empty program with the flags and linker this build uses plus `args`: the only way
/// to know what the linker takes (GNU ld refuses the option, and the link would fail).
fn linker_takes(target: &str, out_dir: &Path, args: &[String]) -> Result<(), String> {
    let source = out_dir.join("symbol_order_probe.rs");
    std::fs::write(&source, "fn main() {}\n").map_err(|e| e.to_string())?;
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let mut probe = Command::new(rustc);
    probe
        .args(["--crate-name", "symbol_order_probe", "--edition", "2021"])
        .args(["--target", target, "-o"])
        .arg(out_dir.join("symbol_order_probe"))
        .arg(&source);
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    probe.args(flags.split('\x1f').filter(|flag| !flag.is_empty()));
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        probe.arg(format!("-Clinker={linker}"));
    }
    probe.args(args.iter().map(|arg| format!("-Clink-arg={arg}")));
    let output = probe.output().map_err(|e| e.to_string())?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .map(|line| line.trim().trim_start_matches("= note:").trim())
        // The linker's own complaint, not rustc's echo of the command line.
        .find(|line| line.contains("symbol-ordering-file") && line.contains("option"))
        .unwrap_or("the probe link failed");
    Err(reason.to_string())
}
