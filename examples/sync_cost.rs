//! What one durable write costs this machine's CPU, at an everyday rate (issue 19's workload (b):
//! one write every 5 ms, so each starts from an idle CPU, as a relay's commits do at 200
//! events/s). The relay's spool commits one event in redb as about a dozen scattered 4 KiB page
//! writes and one `fdatasync` (strace of workload (b)); a write-ahead log would append the
//! event's bytes and `fdatasync`. This times both shapes, and the 5 ms sleep alone, in CPU
//! (user and system) per write of this thread, so BENCHMARKS.md can say how much of the relay's
//! CPU per event any design that keeps the spool's promise must spend, and how much the page
//! count adds.
//!
//! Usage: `sync_cost DIR [WRITES]` (a 10 MiB file is made in DIR, on the disk to measure, and
//! removed; WRITES per shape, default 400). Prints one line per shape.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::time::Duration;

/// The file's size: pages are overwritten within it, as redb reuses freed pages.
const FILE_PAGES: u64 = 2560;
const PAGE: usize = 4096;

/// One shape of durable write: the file, and the write's number (where it lands).
type Write = fn(&File, u64);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, writes) = match &args[..] {
        [_, dir] => (dir, 400),
        [_, dir, writes] => (dir, writes.parse().expect("WRITES: a number")),
        _ => panic!("usage: sync_cost DIR [WRITES]"),
    };
    let path = Path::new(dir).join(format!("sync_cost-{}.dat", std::process::id()));
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("create the file in DIR");
    let zeros = vec![0u8; PAGE];
    for page in 0..FILE_PAGES {
        file.write_all_at(&zeros, page * PAGE as u64).unwrap();
    }
    file.sync_all().unwrap();
    let shapes: [(&str, Write); 4] = [
        ("the 5 ms sleep alone", |_, _| {}),
        ("append 1.5 KiB, fdatasync", append),
        ("overwrite 1 page, fdatasync", |file, n| pages(file, n, 1)),
        ("overwrite 11 scattered pages, fdatasync", |file, n| {
            pages(file, n, 11)
        }),
    ];
    let mut sleep_cost = 0.0;
    for (name, write) in shapes {
        let before = thread_cpu_ns();
        for n in 0..writes {
            write(&file, n);
            std::thread::sleep(Duration::from_millis(5));
        }
        let per = (thread_cpu_ns() - before) as f64 / 1e3 / writes as f64;
        if sleep_cost == 0.0 {
            sleep_cost = per;
            println!("{name}: {per:.0} µs of CPU per 5 ms sleep");
        } else {
            println!(
                "{name}: {per:.0} µs of CPU per write and sleep, {:.0} µs more than the sleep",
                per - sleep_cost
            );
        }
    }
    drop(file);
    std::fs::remove_file(&path).unwrap();
}

/// Appends after the 10 MiB written at the start (so the file grows, as a log does).
fn append(file: &File, n: u64) {
    let record = [b'x'; 1536];
    let at = FILE_PAGES * PAGE as u64 + n * record.len() as u64;
    file.write_all_at(&record, at).unwrap();
    file.sync_data().unwrap();
}

/// Overwrites `count` pages spread over the file (no two next to each other), then syncs.
fn pages(file: &File, n: u64, count: u64) {
    let page = [b'y'; PAGE];
    for k in 0..count {
        let at = (n * 7919 + k * 104_729) % FILE_PAGES;
        file.write_all_at(&page, at * PAGE as u64).unwrap();
    }
    file.sync_data().unwrap();
}

/// This thread's time on a CPU so far, in nanoseconds (the scheduler's count: finer than the
/// clock ticks of `/proc/self/stat`).
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    stat.split_whitespace().next().unwrap().parse().unwrap()
}
