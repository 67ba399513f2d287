//! How the process asks the C allocator to treat large buffers.
//!
//! A webhook can be megabytes, and each one passes through a few buffers of about its size
//! (the SSE frame, the decoded body, the spool's pages). glibc's malloc serves such sizes from
//! `mmap` and returns them on free, but after the first free it raises that threshold to the
//! freed size, so later large buffers come from the heap, where a freed hole is kept rather than
//! returned and the next buffer often does not fit it. Resident memory then climbs with every
//! large event instead of falling back (BENCHMARKS.md has the measurements). Fixing the
//! threshold keeps large buffers on `mmap`, so memory is given back as soon as an event has
//! passed.

/// Buffers at least this large are mapped on their own and unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// Apply the allocator settings. Call once, first thing in `main`.
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists, and a rejected setting (return value 0) just leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A size as people write it, for flags and the config alike: `1GiB`, `512MiB`, `64KiB`,
/// `10MB` or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, crate::error::Invalid> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (write it like 512MiB or 1GiB)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)").into()),
    };
    number
        .checked_mul(multiplier)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a usable size").into())
}
