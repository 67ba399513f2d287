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
    if text.starts_with('-') {
        return Err(format!("{text:?}: a size cannot be negative").into());
    }
    if !number.is_empty() && unit.starts_with(['.', ',']) {
        return Err(format!("{text:?}: whole numbers only (write 1536MiB, not 1.5GiB)").into());
    }
    let number: u64 = number
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => format!("{text:?} is too large a size"),
            _ => format!("{text:?} is not a size (write it like 512MiB or 1GiB)"),
        })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "unknown size unit {:?} (use KiB, MiB or GiB; or KB, MB, GB for powers of 1000)",
                unit.trim()
            )
            .into());
        }
    };
    number
        .checked_mul(multiplier)
        .filter(|n| *n > 0)
        .ok_or_else(|| match number {
            0 => format!("{text:?} is not a usable size").into(),
            _ => format!("{text:?} is too large a size").into(),
        })
}
