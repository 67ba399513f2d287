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
