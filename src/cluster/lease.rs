//! A cluster delivery's lease. NATS gives a route's message in flight to one instance at a
//! time, for the ack wait, and that instance renews it (progress acks) while its local route
//! delivers and retries. A renewal NATS never gets (the instance's network stalled, NATS is
//! down) lets the ack wait run out, and NATS gives the message to another instance, which
//! delivers it; the first one must not attempt it again, or the target gets it twice, the
//! second time after what the cluster delivered since.
//!
//! So renewals here are confirmed by NATS, and each is followed by asking the consumer whether
//! it delivered the message again since ([`Cluster::renew_lease`]). A local route attempts a
//! cluster delivery only while a renewal was confirmed within two thirds of the ack wait
//! ([`Cluster::claim`]; the first attempt counts from when the message was queued locally,
//! which is after the floor's KV read: a stall that begins as the message arrives delays that
//! read, a known gap stated in ARCHITECTURE.md),
//! and one NATS gave to another instance is withdrawn from the local route, not attempted
//! ([`Cluster::taken_away`]). While NATS cannot be asked, the route waits.
//!
//! What this leaves: an attempt already under way when the network stalls may still reach the
//! target beside the other instance's (as the delivery in flight at a `kill -9` does); the
//! delivery id (`x-smee-relay-delivery`) is the same on both.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use tokio::time::Instant;
use tracing::info;

use super::Cluster;
use crate::event::Event;

/// What this instance knows of its hold on the cluster delivery a local route has in flight.
pub(super) struct Lease {
    /// When the last renewal NATS confirmed was sent (at first, when the message was queued
    /// locally, after the floor read):
    /// NATS holds the message for this instance until at least the ack wait after it.
    confirmed: Instant,
    /// NATS delivered the message again since (to another instance, or to this one, which
    /// then takes it afresh): this copy must not be attempted.
    lost: bool,
}

impl Lease {
    /// Taken now.
    pub(super) fn taken() -> Lease {
        Lease {
            confirmed: Instant::now(),
            lost: false,
        }
    }
}

/// Where a local route's cluster delivery stands.
enum Standing {
    /// Not a cluster delivery (or no longer in flight): the route decides alone.
    Local,
    /// Held: a renewal was confirmed recently.
    Held,
    /// No renewal confirmed for a while: NATS may have given it to another instance.
    Unsure { seq: u64 },
    /// NATS gave it to another delivery.
    Lost { seq: u64 },
}

impl Cluster {
    /// Wait until local `route` may attempt `event`: at once for a delivery whose lease NATS
    /// confirmed recently (or one that is not a cluster delivery); while NATS cannot confirm
    /// it, until it can. `Err` says why the route must not attempt it at all: NATS gave it to
    /// another instance. The route then withdraws it (it finishes without being delivered),
    /// and [`Cluster::feed`] neither acks it nor moves the floor.
    pub async fn claim(&self, route: &str, event: &Event) -> Result<(), String> {
        let mut waited = None;
        loop {
            let changed = self.leases.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.standing(route, event) {
                Standing::Local | Standing::Held => {
                    if let Some(seq) = waited {
                        info!(route = %crate::spool::route_name(route), stream_seq = seq, "NATS confirmed this instance's hold on the delivery; attempting it again");
                    }
                    return Ok(());
                }
                Standing::Lost { seq } => {
                    let mut in_flight = self.in_flight.lock().expect("not poisoned");
                    if let Some(taken) = in_flight.get_mut(route) {
                        taken.withdrawn = true;
                    }
                    return Err(format!(
                        "event {seq} in the cluster: its lease ran out while this instance could not reach NATS, and another instance has it now; not delivering it here"
                    ));
                }
                Standing::Unsure { seq } => {
                    if waited.replace(seq).is_none() {
                        info!(route = %crate::spool::route_name(route), stream_seq = seq, "cannot confirm with NATS that this instance still holds the delivery (another instance may have it); waiting for NATS before attempting it again");
                    }
                }
            }
            changed.await;
        }
    }

    /// Ends once NATS has given `event`, in flight on local `route`, to another instance
    /// (never, for anything else): a route waiting to retry it then withdraws it at once.
    pub async fn taken_away(&self, route: &str, event: &Event) {
        loop {
            let changed = self.leases.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Standing::Lost { .. } = self.standing(route, event) {
                return;
            }
            changed.await;
        }
    }

    fn standing(&self, route: &str, event: &Event) -> Standing {
        let in_flight = self.in_flight.lock().expect("not poisoned");
        let Some(taken) = in_flight.get(route).filter(|taken| taken.event == *event) else {
            return Standing::Local;
        };
        if taken.lease.lost {
            Standing::Lost { seq: taken.seq }
        } else if taken.lease.confirmed.elapsed() < self.settings.ack_wait * 2 / 3 {
            Standing::Held
        } else {
            Standing::Unsure { seq: taken.seq }
        }
    }

    /// Renew this instance's lease on `message`, in flight on local `route`, and learn whether
    /// it still holds it: a progress ack NATS confirms, then the consumer's last delivery. Each
    /// step waits at most `patience`; one that fails or times out leaves the lease as it was
    /// (it goes stale, and the route waits: [`Cluster::claim`]).
    pub(super) async fn renew_lease(
        &self,
        route: &str,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
        patience: Duration,
    ) {
        let Ok(ours) = message.info().map(|info| info.consumer_sequence) else {
            return;
        };
        let sent = Instant::now();
        let renewed = tokio::time::timeout(patience, message.double_ack_with(AckKind::Progress));
        if !matches!(renewed.await, Ok(Ok(()))) {
            return;
        }
        // A renewal is confirmed whether or not the message is still this instance's (NATS
        // renews whichever delivery of it is pending): the consumer tells.
        let Ok(Ok(now)) = tokio::time::timeout(patience, consumer.get_info()).await else {
            return;
        };
        {
            let mut in_flight = self.in_flight.lock().expect("not poisoned");
            let Some(taken) = in_flight.get_mut(route) else {
                return;
            };
            if now.delivered.consumer_sequence > ours {
                taken.lease.lost = true;
            } else {
                taken.lease.confirmed = sent;
            }
        }
        self.leases.notify_waiters();
    }
}
