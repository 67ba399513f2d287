//! The handoff from a source to the spool's intake: a queue bounded by the bytes of the events
//! in it, not by their number.
//!
//! Owns one rule: the events a channel has read but the spool has not yet committed hold at
//! most `max_bytes` of memory (by [`Event::held_bytes`]). The room an event takes is given back
//! only when the intake says its batch is stored ([`Receiver::stored`]), so the bound covers
//! the batch being committed as well as what waits behind it. A source whose event does not
//! fit waits in [`Sender::send`]: it stops reading its connection, and the burst waits in the
//! kernel's socket buffer and on the server. Nothing is dropped and the order is kept (one
//! sender per channel; the semaphore is first come, first served).
//!
//! An event larger than the whole bound is charged the whole bound: it passes alone, once
//! everything before it is stored. This module decides nothing about what is stored or how;
//! it must not drop, reorder or copy an event.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::event::Event;

/// A queue for one channel's events, holding at most about `max_bytes` of them (read but not
/// yet stored). `max_bytes` is at least 1 and at most `u32::MAX`.
pub fn channel(max_bytes: usize) -> (Sender, Receiver) {
    let max_bytes = max_bytes.clamp(1, u32::MAX as usize);
    let room = Arc::new(Semaphore::new(max_bytes));
    let (events, rx) = mpsc::unbounded_channel();
    (
        Sender {
            events,
            room: room.clone(),
            max_bytes,
        },
        Receiver {
            events: rx,
            room,
            max_bytes,
            next: None,
            taken: 0,
        },
    )
}

/// The receiver is gone: nobody will store events any more.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// The source's end.
pub struct Sender {
    /// The events, each with the room it took. Unbounded itself: the room is the bound.
    events: mpsc::UnboundedSender<(Event, u32)>,
    /// Free bytes of the bound. An event's permits are forgotten when it is sent and added
    /// back by the receiver once it is stored.
    room: Arc<Semaphore>,
    /// The bound, and the most one event is charged.
    max_bytes: usize,
}

impl Sender {
    /// Queue `event`, first waiting until there is room for it. Fails only if the receiver is
    /// gone (then the event was not queued).
    pub async fn send(&self, event: Event) -> Result<(), Closed> {
        let weight = event.held_bytes().min(self.max_bytes) as u32;
        let permit = self.room.acquire_many(weight).await.map_err(|_| Closed)?;
        permit.forget();
        self.events.send((event, weight)).map_err(|_| Closed)
    }

    /// Bytes queued or taken by the receiver and not yet stored.
    pub fn in_flight(&self) -> usize {
        self.max_bytes - self.room.available_permits()
    }
}

/// The intake's end.
pub struct Receiver {
    events: mpsc::UnboundedReceiver<(Event, u32)>,
    /// See [`Sender::room`]; closed when the receiver is dropped, so that a waiting sender
    /// learns the receiver is gone.
    room: Arc<Semaphore>,
    /// The bound, for [`Receiver::in_flight`].
    max_bytes: usize,
    /// An event received that did not fit in the last batch: first in the next one.
    next: Option<(Event, u32)>,
    /// The room taken by the events handed out since the last [`Receiver::stored`].
    taken: usize,
}

impl Receiver {
    /// Wait for at least one event, then append to `batch` what is queued, in order, up to
    /// `max_events` events and `max_bytes` bytes. The first event is taken whatever its size,
    /// so an event larger than `max_bytes` goes alone. Returns how many were appended: 0 only
    /// when every sender is gone and nothing is left.
    pub async fn recv_batch(
        &mut self,
        batch: &mut Vec<Event>,
        max_events: usize,
        max_bytes: usize,
    ) -> usize {
        let first = match self.next.take() {
            Some(first) => first,
            None => match self.events.recv().await {
                Some(first) => first,
                None => return 0,
            },
        };
        let mut bytes = first.1 as usize;
        self.taken += bytes;
        batch.push(first.0);
        let mut added = 1;
        while added < max_events.max(1) {
            let Ok((event, weight)) = self.events.try_recv() else {
                break;
            };
            if bytes + weight as usize > max_bytes {
                self.next = Some((event, weight));
                break;
            }
            bytes += weight as usize;
            self.taken += weight as usize;
            batch.push(event);
            added += 1;
        }
        added
    }

    /// The events handed out so far are stored (or given up on): their room is free again.
    pub fn stored(&mut self) {
        self.room.add_permits(std::mem::take(&mut self.taken));
    }

    /// Events queued and not yet handed out.
    pub fn len(&self) -> usize {
        self.events.len() + usize::from(self.next.is_some())
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every sender is gone (events may still be queued).
    pub fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Bytes queued or handed out and not yet stored.
    pub fn in_flight(&self) -> usize {
        self.max_bytes - self.room.available_permits()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.room.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event whose [`Event::held_bytes`] is exactly `bytes` (at least the fixed share).
    fn event(n: u64, bytes: usize) -> Event {
        let mut event = Event {
            sse_id: Some(n.to_string()),
            ..Event::default()
        };
        let rest = bytes - event.held_bytes();
        event.body = vec![b'x'; rest].into();
        assert_eq!(event.held_bytes(), bytes);
        event
    }

    fn ids(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.sse_id.as_deref().unwrap().parse().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_sender_waits_when_the_bytes_are_taken_and_goes_on_once_they_are_stored() {
        let (tx, mut rx) = channel(1000);
        for n in 0..4 {
            tx.send(event(n, 250)).await.unwrap();
        }
        assert_eq!(tx.in_flight(), 1000);
        // Full: the next event waits (a semaphore with no room is pending on the first poll).
        let mut waiting = Box::pin(tx.send(event(4, 250)));
        assert!(futures::poll!(&mut waiting).is_pending());

        // A batch bounded by bytes: two of 250 fit in 600, the third is kept for the next one.
        let mut batch = Vec::new();
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 2);
        assert_eq!(ids(&batch), [0, 1]);
        // Taken, not stored: the room is still held, the sender still waits.
        assert!(futures::poll!(&mut waiting).is_pending());
        assert_eq!(rx.in_flight(), 1000);
        rx.stored();
        waiting.await.unwrap();
        assert_eq!(tx.in_flight(), 750);

        batch.clear();
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 2);
        assert_eq!(ids(&batch), [2, 3]);
        batch.clear();
        // The count bound holds too.
        assert_eq!(rx.recv_batch(&mut batch, 1, 600).await, 1);
        assert_eq!(ids(&batch), [4]);
        rx.stored();
        assert_eq!(rx.in_flight(), 0);
        drop(tx);
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 0);
    }

    #[tokio::test]
    async fn an_event_larger_than_the_bound_passes_alone_once_the_queue_is_empty() {
        let (tx, mut rx) = channel(1000);
        tx.send(event(0, 300)).await.unwrap();
        // Charged the whole bound: it waits for the room the first one holds.
        let mut huge = Box::pin(tx.send(event(1, 5000)));
        assert!(futures::poll!(&mut huge).is_pending());
        let mut batch = Vec::new();
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 1);
        rx.stored();
        huge.await.unwrap();
        assert_eq!(tx.in_flight(), 1000);
        // Larger than the batch bound too: it makes a batch of its own.
        batch.clear();
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 1);
        assert_eq!(ids(&batch), [1]);
        assert_eq!(batch[0].held_bytes(), 5000, "whole");
        rx.stored();
        tx.send(event(2, 300)).await.unwrap();
        batch.clear();
        assert_eq!(rx.recv_batch(&mut batch, 100, 600).await, 1);
        assert_eq!(ids(&batch), [2]);
    }

    #[tokio::test]
    async fn a_waiting_sender_learns_that_the_receiver_is_gone() {
        let (tx, rx) = channel(100);
        tx.send(event(0, 200)).await.unwrap();
        let waiting = tokio::spawn(async move { tx.send(event(1, 200)).await });
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(Closed));
    }
}
