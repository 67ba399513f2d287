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
//! ([`Cluster::claim`]), and one NATS gave to another instance is withdrawn from the local
//! route, not attempted ([`Cluster::taken_away`]). While NATS cannot be asked, the route waits.
//!
//! The lease counts from before the message arrived ([`Cluster::arrive`]): NATS started its
//! ack wait when it sent the message, which this instance cannot see, but not before the
//! message was published (its stream timestamp), so the count starts there. A message that
//! arrives too late for that to leave much (a redelivery, a backlog, a connection that
//! stalled with it on the way) is renewed at once; one NATS gave to another instance
//! meanwhile is not taken at all, and one NATS cannot be asked about waits as above. The
//! count uses the two machines' clocks: one running behind NATS's makes it start later, at
//! the arrival at worst.
//!
//! A copy that ends up delivered here anyway (the attempt under way as a stall began), or
//! that finds the route's floor past it because another instance delivered it meanwhile, is
//! not acked here: NATS takes the ack of any delivery of a message, and a late one would
//! release the route while the holder waits out its pace ([`Cluster::acked_by_another`],
//! [`Cluster::still_ours`]).
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
    /// From when NATS holds the message for this instance for the ack wait at least: when
    /// the last renewal it confirmed was sent (at first, when the message was published).
    /// None: not known (the message is older than this process's clock can count back).
    confirmed: Option<Instant>,
    /// When the message arrived: with `confirmed`, how long this instance has gone without
    /// word from NATS, which decides whether it still renews ([`Lease::extends`]).
    arrived: Instant,
    /// NATS delivered the message again since (to another instance, or to this one, which
    /// then takes it afresh): this copy must not be attempted.
    lost: bool,
}

impl Lease {
    /// Whether it holds for a while yet: confirmed within two thirds of `ack_wait`, which
    /// leaves a third for the attempt to start before NATS could give it to another.
    fn held(&self, ack_wait: Duration) -> bool {
        !self.lost
            && self
                .confirmed
                .is_some_and(|confirmed| confirmed.elapsed() < ack_wait * 2 / 3)
    }

    /// Whether a renewal still extends the lease, or only asks whether NATS gave the message
    /// to another: renewals stop once a whole `ack_wait` passed without one confirmed since
    /// the arrival. NATS then lets the ack wait run out whatever reaches it; otherwise a stall
    /// of only the way back (renewals reach NATS, its answers do not) would keep extending a
    /// lease this instance cannot use, holding the route cluster-wide until the connection
    /// drops (minutes).
    fn extends(&self, ack_wait: Duration) -> bool {
        let heard = self.confirmed.map_or(self.arrived, |c| c.max(self.arrived));
        heard.elapsed() < ack_wait
    }

    /// Take in what a renewal learned; whether that changed anything.
    fn learn(&mut self, renewal: Renewal) -> bool {
        match renewal {
            Renewal::Confirmed { sent } => self.confirmed = Some(sent),
            Renewal::Lost => self.lost = true,
            Renewal::Failed => return false,
        }
        true
    }
}

/// Why [`Cluster::renewing`] did not finish its work.
pub(super) enum Interrupted {
    /// The stop came first.
    Stopped,
    /// NATS gave the message to another delivery.
    Lost,
}

/// What one renewal learned.
enum Renewal {
    /// NATS confirmed it, and the message is still this instance's: held from `sent`.
    Confirmed { sent: Instant },
    /// NATS delivered the message again since.
    Lost,
    /// NATS did not answer in time: nothing learned.
    Failed,
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
    /// The lease on `message` as it reaches this instance: counted from its publication,
    /// and renewed at once if that leaves too little (see the module header). None: NATS
    /// gave it to another delivery since, and it must not be taken.
    pub(super) async fn arrive(
        &self,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
    ) -> Option<Lease> {
        let arrived = Instant::now();
        let Ok(info) = message.info() else {
            // Not a JetStream message: nothing to lease.
            return Some(Lease {
                confirmed: Some(arrived),
                arrived,
                lost: false,
            });
        };
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let age = crate::clock::age(published_ms);
        let lease = Lease {
            confirmed: arrived.checked_sub(age),
            arrived,
            lost: false,
        };
        if lease.held(self.settings.ack_wait) {
            return Some(lease);
        }
        match self.renew(consumer, message, true).await {
            Renewal::Confirmed { sent } => Some(Lease {
                confirmed: Some(sent),
                arrived,
                lost: false,
            }),
            Renewal::Lost => None,
            // Held only once NATS confirms it ([`Cluster::claim`]).
            Renewal::Failed => Some(lease),
        }
    }

    /// How often a lease is renewed: well within the ack wait.
    pub(super) fn renew_every(&self) -> Duration {
        (self.settings.ack_wait / 3).max(Duration::from_millis(100))
    }

    /// When local `route`'s lease is next due for renewal: a third of the ack wait after it
    /// was last confirmed (now, if it never was or is overdue).
    pub(super) fn renewal_due(&self, route: &str) -> Instant {
        let now = Instant::now();
        let in_flight = self.in_flight.lock().expect("not poisoned");
        in_flight
            .get(route)
            .and_then(|taken| taken.lease.confirmed)
            .map_or(now, |confirmed| (confirmed + self.renew_every()).max(now))
    }

    /// Wait until local `route` may attempt `event`: at once for a delivery whose lease NATS
    /// confirmed recently (or one that is not a cluster delivery); while NATS cannot confirm
    /// it, until it can. `Err` says why the route must not attempt it at all: NATS gave it to
    /// another instance. The route then withdraws it (it finishes without being delivered),
    /// and [`Cluster::feed`] neither acks it nor moves the floor.
    pub async fn claim(&self, route: &str, event: &Event) -> Result<(), String> {
        let mut waited = None;
        self.watch(route, event, |standing| match standing {
            Standing::Local | Standing::Held => {
                if let Some(seq) = waited {
                    info!(route = %crate::spool::route_name(route), stream_seq = seq, "NATS confirmed this instance's hold on the delivery; attempting it again");
                }
                Some(Ok(()))
            }
            Standing::Lost { seq } => {
                let mut in_flight = self.in_flight.lock().expect("not poisoned");
                if let Some(taken) = in_flight.get_mut(route) {
                    taken.withdrawn = true;
                }
                Some(Err(format!(
                    "event {seq} in the cluster: its lease ran out while this instance could not reach NATS, and another instance has it now; not delivering it here"
                )))
            }
            Standing::Unsure { seq } => {
                if waited.replace(seq).is_none() {
                    info!(route = %crate::spool::route_name(route), stream_seq = seq, "cannot confirm with NATS that this instance still holds the delivery (another instance may have it); waiting for NATS before attempting it again");
                }
                None
            }
        })
        .await
    }

    /// Ends once NATS has given `event`, in flight on local `route`, to another instance
    /// (never, for anything else): a route waiting to retry it then withdraws it at once.
    pub async fn taken_away(&self, route: &str, event: &Event) {
        self.watch(route, event, |standing| {
            matches!(standing, Standing::Lost { .. }).then_some(())
        })
        .await
    }

    /// Wait until `decide` says something of where `event` on local `route` stands, asking
    /// again each time a renewal changes it.
    async fn watch<T>(
        &self,
        route: &str,
        event: &Event,
        mut decide: impl FnMut(Standing) -> Option<T>,
    ) -> T {
        loop {
            let changed = self.leases.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(decided) = decide(self.standing(route, event)) {
                return decided;
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
        } else if taken.lease.held(self.settings.ack_wait) {
            Standing::Held
        } else {
            Standing::Unsure { seq: taken.seq }
        }
    }

    /// Renew this instance's lease on `message`, in flight on local `route`, and learn whether
    /// it still holds it. One that fails or times out leaves the lease as it was (it goes
    /// stale, and the route waits: [`Cluster::claim`]); after a whole ack wait of that, only
    /// the second half is done ([`Lease::extends`]).
    pub(super) async fn renew_lease(
        &self,
        route: &str,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
    ) {
        let extend = {
            let in_flight = self.in_flight.lock().expect("not poisoned");
            let Some(taken) = in_flight.get(route) else {
                return;
            };
            taken.lease.extends(self.settings.ack_wait)
        };
        let renewal = self.renew(consumer, message, extend).await;
        let learned = {
            let mut in_flight = self.in_flight.lock().expect("not poisoned");
            in_flight
                .get_mut(route)
                .is_some_and(|taken| taken.lease.learn(renewal))
        };
        if learned {
            self.leases.notify_waiters();
        }
    }

    /// Renew `lease` on `message` once the local route is done with it (the alerts it
    /// produced wait to be published), as [`Cluster::renew_lease`] does before: confirmed,
    /// and no longer extended after a whole ack wait without an answer. False once NATS gave
    /// the message to another delivery.
    pub(super) async fn renew_own(
        &self,
        lease: &mut Lease,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
    ) -> bool {
        let extend = lease.extends(self.settings.ack_wait);
        lease.learn(self.renew(consumer, message, extend).await);
        !lease.lost
    }

    /// One renewal of `message`: a progress ack NATS confirms (unless not to `extend`), then
    /// the consumer's last delivery. Each step waits at most the renewal period.
    async fn renew(
        &self,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
        extend: bool,
    ) -> Renewal {
        let Ok(ours) = message.info().map(|info| info.consumer_sequence) else {
            return Renewal::Failed;
        };
        let patience = self.renew_every();
        let sent = Instant::now();
        if extend {
            let renewed =
                tokio::time::timeout(patience, message.double_ack_with(AckKind::Progress));
            if !matches!(renewed.await, Ok(Ok(()))) {
                return Renewal::Failed;
            }
        }
        // A renewal is confirmed whether or not the message is still this instance's (NATS
        // renews whichever delivery of it is pending): the consumer tells.
        match self.ours(consumer, ours).await {
            None => Renewal::Failed,
            Some(false) => Renewal::Lost,
            Some(true) if extend => Renewal::Confirmed { sent },
            // Not extended: NATS gives it to another (or again to this instance) once the
            // ack wait runs out, and a renewal then learns so.
            Some(true) => Renewal::Failed,
        }
    }

    /// Run `work` (a body fetch) while keeping `lease` on `message` renewed as
    /// [`Cluster::renew_own`] does: a fetch slower than the ack wait (a large body, a slow
    /// link) otherwise let NATS give the message to another instance, whose fetch was as
    /// slow, and so on, the route never delivering it (helper-107). `Err` if `stop` came
    /// first, or NATS gave the message to another delivery meanwhile.
    pub(super) async fn renewing<T>(
        &self,
        lease: &mut Lease,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
        stop: &tokio_util::sync::CancellationToken,
        work: impl std::future::Future<Output = T>,
    ) -> Result<T, Interrupted> {
        let every = self.renew_every();
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Err(Interrupted::Stopped),
                done = &mut work => return Ok(done),
                _ = renew.tick() => {
                    let renewed = stop
                        .run_until_cancelled(self.renew_own(lease, consumer, message))
                        .await;
                    match renewed {
                        None => return Err(Interrupted::Stopped),
                        Some(false) => return Err(Interrupted::Lost),
                        Some(true) => {}
                    }
                }
            }
        }
    }

    /// Whether this instance's delivery of `message` is still the consumer's last one (None:
    /// NATS did not answer in time).
    pub(super) async fn still_ours(
        &self,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
    ) -> Option<bool> {
        let ours = message.info().ok()?.consumer_sequence;
        self.ours(consumer, ours).await
    }

    /// Whether the consumer delivered nothing after its delivery number `ours`.
    async fn ours(&self, consumer: &consumer::PullConsumer, ours: u64) -> Option<bool> {
        let asked = tokio::time::timeout(self.renew_every(), consumer.get_info());
        let Ok(Ok(now)) = asked.await else {
            return None;
        };
        Some(now.delivered.consumer_sequence <= ours)
    }

    /// Whether the ack of `message`, delivered here under `lease`, would be another's to give:
    /// NATS gave the message to another instance since (a stall), which delivers it and
    /// paces its ack; this one's would release the route early. Asked of NATS only when the
    /// lease does not tell (it was not confirmed lately), and again each second while NATS
    /// does not answer: until it does, nobody can say whose ack it is (helper-109: taking no
    /// answer for "ours" acked a late copy). The caller bounds the wait by its stop.
    pub(super) async fn acked_by_another(
        &self,
        lease: &Lease,
        consumer: &consumer::PullConsumer,
        message: &jetstream::Message,
    ) -> bool {
        if lease.lost {
            return true;
        }
        if lease.held(self.settings.ack_wait) {
            return false;
        }
        loop {
            if let Some(ours) = self.still_ours(consumer, message).await {
                return !ours;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
