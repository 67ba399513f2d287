//! Property: whatever write the process or the machine dies at, the spool keeps every event
//! whose append was committed, and every route's queue keeps its order; the operation cut by
//! the crash is either wholly there or wholly absent.
//!
//! A backend stands between redb and the file and stops after a random number of writes (the
//! crash). The file as the disk would have it then (what was synced, plus a random prefix of
//! the writes since) is opened as a fresh spool and compared with a model of what was
//! acknowledged. With the write-ahead log, its file is taken as it is at the crash (a record
//! counts only once synced).

use std::ops::Bound;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proptest::prelude::*;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

use super::backend::Factory;
use super::{Limits, Outcome, Spool, Write, route_key};
use crate::event::Event;

#[derive(Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

/// The disk as the backend saw it.
#[derive(Debug, Default)]
struct Disk {
    /// The file's contents at the last sync.
    synced: Vec<u8>,
    /// Writes since, in order.
    unsynced: Vec<Op>,
    /// Writes until the crash (`None`: no crash planned).
    writes_left: Option<usize>,
    crashed: bool,
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(offset, data) => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => image.resize(*len as usize, 0),
    }
}

impl Disk {
    /// What the disk holds after the crash: the synced image and the first `kept` writes since.
    fn image(&self, kept: usize) -> Vec<u8> {
        let mut image = self.synced.clone();
        for op in self.unsynced.iter().take(kept) {
            apply(&mut image, op);
        }
        image
    }
}

#[derive(Debug)]
struct Crashing {
    inner: FileBackend,
    disk: Arc<Mutex<Disk>>,
}

fn crash() -> std::io::Error {
    std::io::Error::other("simulated crash")
}

impl Crashing {
    fn gate(&self, op: Op, then: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let mut disk = self.disk.lock().unwrap();
        if disk.crashed {
            return Err(crash());
        }
        if let Some(left) = &mut disk.writes_left {
            if *left == 0 {
                disk.crashed = true;
                return Err(crash());
            }
            *left -= 1;
        }
        then()?;
        disk.unsynced.push(op);
        Ok(())
    }
}

impl StorageBackend for Crashing {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.gate(Op::SetLen(len), || self.inner.set_len(len))
    }
    fn sync_data(&self) -> std::io::Result<()> {
        // No real fsync: the model is the durability.
        let mut disk = self.disk.lock().unwrap();
        if disk.crashed {
            return Err(crash());
        }
        let ops = std::mem::take(&mut disk.unsynced);
        for op in &ops {
            apply(&mut disk.synced, op);
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.gate(Op::Write(offset, data.to_vec()), || {
            self.inner.write(offset, data)
        })
    }
    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }
    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// What the test does to the spool.
#[derive(Clone, Debug)]
enum Step {
    /// Append this many events, queued on both routes.
    Append(usize),
    /// The head of this route is delivered (or, with `false`, given up on).
    Finish(usize, bool),
    /// What the write-ahead log holds goes into the file ([`Spool::checkpoint`]).
    Checkpoint,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1usize..4).prop_map(Step::Append),
        (0usize..2, any::<bool>()).prop_map(|(r, ok)| Step::Finish(r, ok)),
        Just(Step::Checkpoint),
    ]
}

const ROOM: Limits = Limits { max_bytes: 1 << 30 };

fn routes() -> [String; 2] {
    [
        route_key("0123456789abcdef", "http://127.0.0.1:1/a"),
        route_key("fedcba9876543210", "http://127.0.0.1:1/b"),
    ]
}

fn event(n: usize) -> Event {
    Event {
        sse_id: Some(n.to_string()),
        timestamp_ms: None,
        headers: vec![("x-n".into(), n.to_string())],
        query: vec![],
        // Some bodies are stored in pieces, so those paths crash too.
        body: Bytes::from(vec![
            b'a' + (n % 26) as u8;
            if n.is_multiple_of(5) { 70_000 } else { 100 }
        ]),
    }
}

/// Each route's queue, as the `x-n` header of each pending event, in order.
fn queues(spool: &Spool) -> Vec<Vec<usize>> {
    routes()
        .iter()
        .map(|route| {
            spool
                .pending(route, 0, usize::MAX)
                .unwrap()
                .iter()
                .map(|q| {
                    assert_eq!(
                        q.event.event,
                        event(q.event.event.headers[0].1.parse().unwrap())
                    );
                    q.event.event.headers[0].1.parse().unwrap()
                })
                .collect()
        })
        .collect()
}

/// Run `steps` until the crash, each write through the write-ahead log if `logged` (as the
/// writer thread writes); returns the queues acknowledged before the step that failed, and
/// what they would be had it succeeded.
fn run(spool: &Spool, steps: &[Step], logged: bool) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let mut model: Vec<Vec<usize>> = vec![Vec::new(), Vec::new()];
    let mut next = 0;
    for step in steps {
        let mut after = model.clone();
        let write = match step {
            Step::Append(n) => {
                let events: Vec<Event> = (next..next + n).map(event).collect();
                for queue in &mut after {
                    queue.extend(next..next + n);
                }
                next += n;
                Write::Append {
                    channel: "c".into(),
                    routes: routes().to_vec(),
                    events: events.into(),
                    cursor: None,
                }
            }
            Step::Finish(r, ok) => {
                let Ok(head) = spool.pending(&routes()[*r], 0, 1) else {
                    return (model, after);
                };
                let Some(head) = head.into_iter().next() else {
                    continue;
                };
                after[*r].remove(0);
                Write::Mark {
                    route: routes()[*r].clone(),
                    seq: head.seq,
                    event: head.event.id,
                    outcome: if *ok {
                        Outcome::Delivered { status: 200 }
                    } else {
                        Outcome::Dead {
                            status: Some(400),
                            error: "no".into(),
                        }
                    },
                }
            }
            Step::Checkpoint => {
                if spool.checkpoint().is_err() {
                    return (model.clone(), model);
                }
                continue;
            }
        };
        let written = if logged {
            spool.write_logged(&[write], ROOM).map(drop)
        } else {
            spool.write(&[write], ROOM).map(drop)
        };
        if written.is_err() {
            return (model, after);
        }
        model = after;
    }
    (model.clone(), model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_crash_points_in_the_spool_lose_nothing_and_keep_order(
        steps in proptest::collection::vec(step(), 1..24),
        crash_after in 0usize..400,
        kept_fraction in 0.0f64..=1.0,
        logged in any::<bool>(),
    ) {
        let live = tempfile::tempdir().unwrap();
        let disk = Arc::new(Mutex::new(Disk::default()));
        let factory = {
            let disk = disk.clone();
            Factory::wrapping(move |inner| {
                // Each open starts from the file as it is.
                let len = inner.len().unwrap();
                let mut synced = vec![0; len as usize];
                inner.read(0, &mut synced).unwrap();
                let mut d = disk.lock().unwrap();
                d.synced = synced;
                d.unsynced.clear();
                Box::new(Crashing { inner, disk: disk.clone() })
            })
        };
        let spool = Spool::open_with(live.path(), factory).unwrap();
        disk.lock().unwrap().writes_left = Some(crash_after);
        let (before, after) = run(&spool, &steps, logged);

        let image = {
            let disk = disk.lock().unwrap();
            let kept = (disk.unsynced.len() as f64 * kept_fraction) as usize;
            disk.image(kept)
        };
        // The log as the crash leaves it: its writes are synced before they count.
        let log = std::fs::read(live.path().join(super::wal::FILE_NAME)).unwrap();
        drop(spool);
        let restarted = tempfile::tempdir().unwrap();
        std::fs::write(restarted.path().join(super::FILE_NAME), image).unwrap();
        std::fs::write(restarted.path().join(super::wal::FILE_NAME), log).unwrap();
        let spool = Spool::open(restarted.path()).unwrap();
        let found = queues(&spool);
        prop_assert!(
            found == before || found == after,
            "after the crash: {found:?}; acknowledged: {before:?}; with the step cut by the crash: {after:?}"
        );
    }
}
