//! What this process's commits queued, kept in memory for its routes to take without reading it
//! back from the spool.
//!
//! Every commit that queues deliveries reports them ([`Enqueued`]: what it queued, per route, and
//! the spool's seq counter before and after). The writer hands each one over here, oldest first.
//! A route that knows its whole queue up to a seq counter (it delivered everything it read, and
//! its read or its last take ended there) takes from the entry that starts at that counter, and
//! every entry that follows it without a gap, in one go. Every queueing, by any process, takes
//! the next seqs in its transaction, so a chain of entries without a gap is the whole queue over
//! its seqs. Anything else means a read: the entry was dropped for room, or a commit queued more
//! than would fit (it hands over nothing and the chain starts again after it), or another
//! process queued something (the counter moved without an entry here).
//!
//! The chain keeps entries only for the routes that take from it (a route behind by more than
//! the chain holds reads, and its reads reach past what is handed over meanwhile), and lets an
//! entry go once every one of them has taken past it, or for room ([`HANDOVER_BYTES`]): it
//! holds a backlog, not a history, and an idle relay none.
//!
//! At high rates a route's backlog is this chain: taking it costs neither a read transaction
//! (and the page reads of a small cache) nor a hand-off to the blocking pool and back.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::{Arc, MutexGuard};

use super::{Enqueued, Queued};

/// How many bytes of events the chain holds at most ([`held_bytes`], once per route an event is
/// queued on), and so the most one commit hands over. A route further behind than this reads
/// its queue back: for 1 KiB events on smee.io's wire, about 60 events. Small, because what it
/// holds adds to the relay's peak memory in a burst: 512 KiB raised (a)'s peak RSS by 1 to 2 MiB,
/// past its budget in one round, 128 KiB by about 0.4 (BENCHMARKS.md, "Issue 19, fifteenth
/// session").
///
/// [`held_bytes`]: crate::event::Event::held_bytes
pub(super) const HANDOVER_BYTES: usize = 128 << 10;

/// The chain of what this process's commits queued (see the module's header).
#[derive(Default)]
pub struct Handover {
    chain: Mutex<Chain>,
}

#[derive(Default)]
struct Chain {
    /// Oldest first; each entry starts at or after where the one before ended.
    entries: VecDeque<Arc<Enqueued>>,
    /// The bytes the entries hold ([`Enqueued::held_bytes`]), at most [`HANDOVER_BYTES`].
    bytes: usize,
    /// Where the last entry handed over ended (also once it is let go): a route that knows its
    /// queue up to there has nothing to take. `None` before the first entry and after a commit
    /// too large to hand over.
    end: Option<u64>,
    /// Per route that takes from the chain, the counter its last take left it knowing its
    /// queue up to: the entries that end at or before every one of them are let go.
    takers: Vec<(String, u64)>,
}

impl Chain {
    /// `route` knows its queue up to `known` (`None`: it reads, and takes nothing for now); let
    /// go of the entries no taker needs any more, and return them (oldest first).
    fn taken(&mut self, route: &str, known: Option<u64>) -> Vec<Arc<Enqueued>> {
        let at = self.takers.iter().position(|(r, _)| r == route);
        match (at, known) {
            (Some(at), Some(known)) => self.takers[at].1 = known,
            (None, Some(known)) => self.takers.push((route.to_string(), known)),
            (Some(at), None) => {
                self.takers.swap_remove(at);
            }
            (None, None) => {}
        }
        let needed = self.takers.iter().map(|&(_, known)| known).min();
        let mut gone = Vec::new();
        while let Some(first) = self.entries.front() {
            if needed.is_some_and(|needed| first.seq_after > needed) {
                break;
            }
            self.bytes -= first.held_bytes;
            gone.extend(self.entries.pop_front());
        }
        gone
    }
}

/// What a route takes from the chain ([`Handover::take`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// The route's whole queue from the counter it knew up to the counter given, in order.
    /// `more`: something was queued past it (the take stopped at the route's read limits, or
    /// at a gap in the chain).
    Queue {
        queued: Vec<Queued>,
        known: u64,
        more: bool,
    },
    /// Nothing was queued in this process since the counter the route knows.
    Nothing,
    /// The chain cannot tell: read the queue from the spool.
    Read,
}

impl Handover {
    fn chain(&self) -> MutexGuard<'_, Chain> {
        self.chain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand over what the next commit (in commit order) queued; `None` if it queued more than
    /// would fit, which breaks the chain.
    pub(super) fn push(&self, enqueued: Option<Arc<Enqueued>>) {
        let mut chain = self.chain();
        let Some(enqueued) = enqueued else {
            *chain = Chain::default();
            return;
        };
        // Commits are handed over in their order; one out of it would break the search below.
        if chain.end.is_some_and(|end| end > enqueued.seq_before) {
            *chain = Chain::default();
        }
        // Also a commit that queued nothing moves the end: past a gap before it (a commit told
        // out of order, another process's), a route that knew its queue up to the old end
        // must read, not take it for nothing queued.
        chain.end = Some(enqueued.seq_after);
        if enqueued.seq_after == enqueued.seq_before || chain.takers.is_empty() {
            // Nothing to keep; or every route reads (or none has read yet): a route's next
            // read reaches past this entry, and after that read it takes what follows it.
            return;
        }
        chain.bytes += enqueued.held_bytes;
        chain.entries.push_back(enqueued);
        while chain.bytes > HANDOVER_BYTES {
            let Some(oldest) = chain.entries.pop_front() else {
                break;
            };
            chain.bytes -= oldest.held_bytes;
        }
    }

    /// `route`'s queue after the seq counter `from`, up to which the route knows its whole
    /// queue: at most `limit` events, and past the first at most `limit_bytes` of bodies (the
    /// limits of a read).
    pub fn take(&self, route: &str, from: u64, limit: usize, limit_bytes: usize) -> Taken {
        let mut chain = self.chain();
        let Some(end) = chain.end else {
            return Taken::Read;
        };
        if end == from {
            chain.taken(route, Some(from));
            return Taken::Nothing;
        }
        let at = chain.entries.partition_point(|e| e.seq_before < from);
        if chain.entries.get(at).is_none_or(|e| e.seq_before != from) {
            return Taken::Read;
        }
        // The entries taken, [at, at + n), and the counter they end at.
        let (mut n, mut known, mut events, mut bytes) = (0, from, 0, 0);
        for entry in chain.entries.range(at..) {
            if entry.seq_before != known {
                break;
            }
            let theirs = theirs(entry, route);
            events += theirs.len();
            bytes += theirs
                .iter()
                .map(|q| q.event.event.body.len())
                .sum::<usize>();
            known = entry.seq_after;
            n += 1;
            if events >= limit || bytes >= limit_bytes {
                break;
            }
        }
        // What every taker has now taken is let go (it ends at or before `known`, so it is
        // the front of what this route took): its events are moved out rather than copied,
        // unless something else still holds the entry. The rest stays for other takers.
        let gone = chain.taken(route, Some(known));
        let (mut queued, popped) = (Vec::with_capacity(events), gone.len());
        for entry in gone.into_iter().skip(at) {
            match Arc::try_unwrap(entry) {
                Ok(mut entry) => {
                    if let Some(at) = entry.routes.iter().position(|(r, _)| r == route) {
                        queued.append(&mut entry.routes.swap_remove(at).1);
                    }
                }
                Err(entry) => queued.extend_from_slice(theirs(&entry, route)),
            }
        }
        for entry in chain
            .entries
            .range(at.max(popped) - popped..at + n - popped)
        {
            queued.extend_from_slice(theirs(entry, route));
        }
        Taken::Queue {
            queued,
            known,
            // Past a gap, what follows is read, but it is known to be there: the route must
            // not wait for the next append to come for it.
            more: end > known,
        }
    }

    /// `route` is about to read its queue: what is handed over from now on is kept for it (its
    /// read may not reach it).
    pub fn reading(&self, route: &str) {
        let mut chain = self.chain();
        let end = chain.end.unwrap_or(0);
        chain.taken(route, Some(end));
    }

    /// `route` read its queue and knows it whole up to the seq counter `known` (`None`: the
    /// read stopped at its limits, and it reads again): it takes from there next.
    pub fn read(&self, route: &str, known: Option<u64>) {
        self.chain().taken(route, known);
    }

    /// `route` takes no more (it stopped): what it has not taken is let go, unless another
    /// route needs it.
    pub fn leave(&self, route: &str) {
        self.chain().taken(route, None);
    }
}

/// What `entry` queued on `route`.
fn theirs<'a>(entry: &'a Enqueued, route: &str) -> &'a [Queued] {
    let theirs = entry.routes.iter().find(|(r, _)| r == route);
    theirs.map_or(&[], |(_, queued)| queued)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::spool::StoredEvent;

    /// An entry queueing `ids` (one seq each, from `seq_before`) on `route`, bodies of `size`.
    fn entry(seq_before: u64, route: &str, ids: &[u64], size: usize) -> Arc<Enqueued> {
        let queued = ids
            .iter()
            .zip(seq_before..)
            .map(|(&id, seq)| Queued {
                seq,
                event: StoredEvent {
                    id,
                    received_ms: 0,
                    channel: "c".into(),
                    event: Event {
                        body: vec![b'x'; size].into(),
                        ..Event::default()
                    },
                },
                attempts: 0,
            })
            .collect::<Vec<_>>();
        Arc::new(Enqueued {
            seq_before,
            seq_after: seq_before + ids.len() as u64,
            held_bytes: queued.iter().map(|q| q.event.event.held_bytes()).sum(),
            routes: vec![(route.to_string(), queued)],
        })
    }

    /// A chain `routes` take from, each knowing its queue up to the counter given.
    fn taking(routes: &[(&str, u64)]) -> Handover {
        let handover = Handover::default();
        for &(route, known) in routes {
            handover.read(route, Some(known));
        }
        handover
    }

    /// What `route` takes from `from` on, within a read's usual limits.
    fn take(handover: &Handover, route: &str, from: u64) -> Taken {
        handover.take(route, from, 256, 1 << 20)
    }

    fn ids(taken: &Taken) -> (Vec<u64>, u64, bool) {
        match taken {
            Taken::Queue {
                queued,
                known,
                more,
            } => (queued.iter().map(|q| q.event.id).collect(), *known, *more),
            other => panic!("expected a queue, got {other:?}"),
        }
    }

    #[test]
    fn a_route_takes_every_entry_after_what_it_knows_in_one_go() {
        let chain = || {
            let handover = taking(&[("r", 0)]);
            handover.push(Some(entry(0, "r", &[1, 2], 10)));
            handover.push(Some(entry(2, "r", &[3], 10)));
            handover.push(Some(entry(3, "other", &[4], 10)));
            handover.push(Some(entry(4, "r", &[5], 10)));
            handover
        };
        let handover = chain();
        let taken = take(&handover, "r", 0);
        assert_eq!(ids(&taken), (vec![1, 2, 3, 5], 5, false));
        assert_eq!(take(&handover, "r", 5), Taken::Nothing);
        let handover = chain();
        let taken = take(&handover, "r", 2);
        assert_eq!(ids(&taken), (vec![3, 5], 5, false));
        // An entry of other routes only still moves what the route knows.
        let handover = chain();
        let taken = take(&handover, "other", 4);
        assert_eq!(ids(&taken), (vec![], 5, false));
    }

    #[test]
    fn a_take_stops_at_the_read_limits_at_an_entry_boundary() {
        let handover = taking(&[("r", 0)]);
        for n in 0..4 {
            handover.push(Some(entry(n * 2, "r", &[n * 2 + 1, n * 2 + 2], 100)));
        }
        assert_eq!(
            ids(&handover.take("r", 0, 3, 1 << 20)),
            (vec![1, 2, 3, 4], 4, true)
        );
        assert_eq!(ids(&handover.take("r", 4, 256, 150)), (vec![5, 6], 6, true));
        assert_eq!(
            ids(&handover.take("r", 6, 256, 150)),
            (vec![7, 8], 8, false)
        );
    }

    #[test]
    fn a_gap_or_an_unknown_start_means_a_read() {
        let handover = Handover::default();
        assert_eq!(take(&handover, "r", 0), Taken::Read);
        handover.read("r", Some(0));
        handover.push(Some(entry(0, "r", &[1], 10)));
        // Another process queued seqs 1 and 2: this entry starts past them.
        handover.push(Some(entry(3, "r", &[4], 10)));
        let taken = take(&handover, "r", 0);
        assert_eq!(ids(&taken), (vec![1], 1, true));
        // A route that knows its queue up to 3 takes past the gap.
        let taken = take(&handover, "s", 3);
        assert_eq!(ids(&taken), (vec![], 4, false));
        assert_eq!(take(&handover, "r", 1), Taken::Read);
        assert_eq!(take(&handover, "t", 2), Taken::Read);
        // Once "r" has read up to 4, it has nothing to take.
        assert_eq!(take(&handover, "r", 4), Taken::Nothing);
        // A commit that queued nothing changes nothing.
        handover.push(Some(entry(4, "r", &[], 10)));
        assert_eq!(take(&handover, "r", 4), Taken::Nothing);
        // A commit too large to hand over: everything before it is no use any more.
        handover.push(None);
        assert_eq!(take(&handover, "r", 4), Taken::Read);
    }

    #[test]
    fn what_every_taker_took_is_let_go_and_the_chain_still_ends_where_it_did() {
        let handover = taking(&[("a", 0)]);
        handover.push(Some(entry(0, "a", &[1], 10)));
        handover.push(Some(entry(1, "b", &[2], 10)));
        assert_eq!(ids(&take(&handover, "a", 0)), (vec![1], 2, false));
        // Only "a" takes so far: what it took is let go, though "b" (which reads) had some.
        assert_eq!(handover.chain().entries.len(), 0);
        assert_eq!(handover.chain().bytes, 0);
        assert_eq!(take(&handover, "a", 2), Taken::Nothing);
        handover.push(Some(entry(2, "b", &[3], 10)));
        handover.push(Some(entry(3, "a", &[4], 10)));
        assert_eq!(ids(&take(&handover, "b", 2)), (vec![3], 4, false));
        // "a" has not taken 2..4 yet: kept for it.
        assert_eq!(handover.chain().entries.len(), 2);
        assert_eq!(ids(&take(&handover, "a", 2)), (vec![4], 4, false));
        assert_eq!(handover.chain().entries.len(), 0);
        // A route that stopped holds nothing back.
        handover.push(Some(entry(4, "a", &[5], 10)));
        handover.leave("b");
        assert_eq!(handover.chain().entries.len(), 1);
        handover.leave("a");
        assert_eq!(handover.chain().entries.len(), 0);
    }

    /// Found by review: a commit that queued nothing, handed over after a gap (an older
    /// commit told after it, so never handed over), left the chain's end before the gap, and a
    /// route that knew its queue up to there was told nothing was queued: it waited idle with
    /// the gap's events queued.
    #[test]
    fn regression_a_commit_that_queued_nothing_after_a_gap_hid_the_gap() {
        let handover = taking(&[("r", 0)]);
        handover.push(Some(entry(0, "r", &[1], 10)));
        assert_eq!(ids(&take(&handover, "r", 0)), (vec![1], 1, false));
        // Seq 1 -> 2 queued on "r" by a commit never handed over; then a commit that appended
        // an event queued on no route.
        handover.push(Some(Arc::new(Enqueued {
            seq_before: 2,
            seq_after: 2,
            ..Enqueued::default()
        })));
        assert_eq!(take(&handover, "r", 1), Taken::Read);
    }

    #[test]
    fn entries_are_kept_only_while_a_route_takes() {
        let handover = Handover::default();
        handover.push(Some(entry(0, "r", &[1], 10)));
        assert_eq!(handover.chain().entries.len(), 0);
        // Its read reached past seq 1.
        handover.read("r", Some(1));
        assert_eq!(take(&handover, "r", 1), Taken::Nothing);
        handover.push(Some(entry(1, "r", &[2], 10)));
        assert_eq!(handover.chain().entries.len(), 1);
        // A read that stopped at its limits: the route reads again next.
        handover.read("r", None);
        assert_eq!(handover.chain().entries.len(), 0);
        handover.push(Some(entry(2, "r", &[3], 10)));
        assert_eq!(handover.chain().entries.len(), 0);
    }

    #[test]
    fn what_is_handed_over_while_a_route_reads_is_kept_for_it() {
        let handover = Handover::default();
        handover.push(Some(entry(0, "r", &[1], 10)));
        handover.reading("r");
        // Committed after the read's transaction began: not in the read.
        handover.push(Some(entry(1, "r", &[2], 10)));
        handover.read("r", Some(1));
        assert_eq!(ids(&take(&handover, "r", 1)), (vec![2], 2, false));
    }

    #[test]
    fn an_entry_held_elsewhere_is_copied_not_moved() {
        let handover = taking(&[("r", 0)]);
        let held = entry(0, "r", &[1, 2], 10);
        handover.push(Some(held.clone()));
        handover.push(Some(entry(2, "r", &[3], 10)));
        let taken = take(&handover, "r", 0);
        assert_eq!(ids(&taken), (vec![1, 2, 3], 3, false));
        assert_eq!(held.routes[0].1.len(), 2);
    }

    #[test]
    fn the_oldest_entries_are_dropped_for_room() {
        let handover = taking(&[("r", 0)]);
        // Each entry holds a quarter of the bound.
        let size = HANDOVER_BYTES / 4 - Event::default().held_bytes();
        for n in 0..6 {
            handover.push(Some(entry(n, "r", &[n + 1], size)));
        }
        assert_eq!(handover.chain().entries.len(), 4);
        assert!(handover.chain().bytes <= HANDOVER_BYTES);
        // Another route takes from 2 on; "r", behind, reads.
        assert_eq!(
            ids(&handover.take("s", 2, 256, usize::MAX)),
            (vec![], 6, false)
        );
        assert_eq!(handover.take("r", 0, 256, usize::MAX), Taken::Read);
        assert_eq!(handover.take("r", 1, 256, usize::MAX), Taken::Read);
    }

    #[test]
    fn a_route_that_reads_holds_nothing_back() {
        let handover = taking(&[("r", 0)]);
        handover.push(Some(entry(0, "r", &[1], 10)));
        assert_eq!(ids(&take(&handover, "r", 0)), (vec![1], 1, false));
        handover.push(Some(entry(2, "r", &[3], 10)));
        // Another process queued seq 1: "r" reads; what is handed over until its read is
        // done is kept, and let go once the read reached past it.
        assert_eq!(take(&handover, "r", 1), Taken::Read);
        assert_eq!(handover.chain().entries.len(), 1);
        handover.read("r", Some(3));
        assert_eq!(handover.chain().entries.len(), 0);
        assert_eq!(take(&handover, "r", 3), Taken::Nothing);
    }
}
