//! What the cluster knows about its events, for `smee-relay events` in cluster mode: the frames
//! in the stream (each stored once, numbered by its stream sequence, the id shown), and per
//! route whether each is delivered (at or below the route's floor: its consumer's ack floor or
//! the floor kept in KV), in flight (the one message its consumer has out), pending, or dead (a
//! dead letter the instance that gave up recorded in KV under `dead.<route>.<stream seq>`, so
//! every instance sees it). An event in flight shows the attempts of the instance holding it
//! and its last failure, which that instance records after each failed attempt under
//! `trying.<route>` (one in flight per route). A replay publishes a copy on the route's own replay subject: it
//! goes behind what is queued, and the route's consumer (one message in flight cluster-wide)
//! has exactly one instance deliver it.
//!
//! It reads NATS and publishes replays; it must not deliver anything, nor touch a local spool.

use std::collections::HashMap;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::{Cluster, Envelope, NatsError};
use crate::event::Event;

/// How many stream messages `events list` reads back at most, looking for rows.
const SCAN: u64 = 10_000;

/// How far apart the instances' clocks may be: `events replay --since` reads originals this
/// much older than the window before it stops, since the stream is in receipt order only as
/// far as the clocks of the instances that published agree.
const CLOCK_SKEW: u64 = 60_000;

/// The KV key of the dead letter of stream message `seq` on the route hashed `hash`.
pub(super) fn dead_key(hash: &str, seq: u64) -> String {
    format!("dead.{hash}.{seq}")
}

/// The KV key of the attempts at the delivery in flight on the route hashed `hash`.
pub(super) fn trying_key(hash: &str) -> String {
    format!("trying.{hash}")
}

/// How the delivery in flight on a route is going, as the instance holding it recorded after
/// its last failed attempt: `events list` on any instance says why an event is stuck.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Trying {
    /// The stream message it is about: a record of an earlier one is not shown.
    pub stream_seq: u64,
    /// Attempts made by the instance holding it.
    pub attempts: u32,
    /// The target's last answer, if it answered.
    pub status: Option<u16>,
    /// Why the last attempt failed.
    pub error: String,
}

/// A delivery a route gave up on, as recorded in the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The route as shown (its target; no channel key).
    pub route: String,
    /// The route's key hashed: names its consumer and its replay subject.
    pub route_hash: String,
    /// The stream message that was not delivered.
    pub stream_seq: u64,
    /// The target's last answer, if it answered.
    pub status: Option<u16>,
    /// Why it was given up on.
    pub error: String,
    /// Attempts made by the instance that gave up.
    pub attempts: u32,
    /// When it was given up on (ms since the epoch).
    pub at_ms: u64,
    /// The stream message that replays it, once replayed (0: a replay is being published).
    pub replayed_as: Option<u64>,
    /// When `events purge --dead` gave up on it for good (ms since the epoch): kept, so that
    /// `events list` says it was not delivered rather than calling it delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_ms: Option<u64>,
}

/// Where one event's delivery to one route stands, cluster-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Queued: behind the route's floor and what is in flight.
    Pending,
    /// An instance holds it and is delivering it.
    InFlight,
    /// Done (at or below the route's floor).
    Delivered,
    /// Given up on by the instance that held it; replayable from any instance.
    Dead,
    /// A dead letter replayed (its copy is another row, `replay of` it).
    Replayed,
    /// A dead letter purged (`events purge --dead`): never delivered, and no longer replayed
    /// by `--dead`.
    Purged,
}

/// What `events list --status` keeps, in cluster mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Pending or in flight: not yet delivered.
    Pending,
    InFlight,
    Delivered,
    /// Dead letters not yet replayed or purged.
    Dead,
    Replayed,
    Purged,
}

impl Filter {
    fn keeps(self, state: State) -> bool {
        match self {
            Filter::Pending => matches!(state, State::Pending | State::InFlight),
            Filter::InFlight => state == State::InFlight,
            Filter::Delivered => state == State::Delivered,
            Filter::Dead => state == State::Dead,
            Filter::Replayed => state == State::Replayed,
            Filter::Purged => state == State::Purged,
        }
    }

    /// Whether only rows of recorded dead letters can match (found from KV, not the stream).
    fn dead_only(self) -> bool {
        matches!(self, Filter::Dead | Filter::Replayed | Filter::Purged)
    }
}

/// One frame in the stream.
#[derive(Clone)]
pub struct ClusterEvent {
    /// Its stream sequence: the event's id in cluster mode.
    pub seq: u64,
    /// The subject it was published on (a channel's, or a route's replay subject).
    pub subject: String,
    /// The channel as shown (secret parts redacted).
    pub channel: String,
    /// When the instance that published it first received it (ms since the epoch).
    pub received_ms: u64,
    pub event: Event,
    /// For a replay: the stream sequence it replays.
    pub replay_of: Option<u64>,
}

/// One (event, route) of `events list` in cluster mode.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The stream sequence.
    pub id: u64,
    pub received_ms: u64,
    pub channel: String,
    /// The route as shown.
    pub route: String,
    pub status: State,
    /// For a dead letter, or one in flight that failed: the attempts made, the target's last
    /// answer and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `x-github-event=push` and the like, when the event says.
    pub kind: Option<String>,
    /// A replay: the stream sequence it replays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<u64>,
    /// A dead letter replayed: the stream sequence of its replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_as: Option<u64>,
}

/// What `events replay` re-queues in cluster mode.
pub enum Which {
    /// These stream sequences, on every route that delivered or gave up on them.
    Ids(Vec<u64>),
    /// Every dead letter not yet replayed.
    Dead,
    /// Every frame received since `since_ms` (ms since the epoch), on every route done with
    /// it. Never what the relay produced (alerts, Port reports, published under
    /// [`super::produced_key`] of each of `produced`): replaying received frames must not
    /// re-alert, and an alert is re-sent only when its id is asked for.
    ReceivedSince {
        since_ms: u64,
        /// The routes whose produced messages are skipped (`alerts`, `port-reports`): named
        /// by the caller, since this module must not know the pipeline's routes.
        produced: Vec<String>,
    },
}

/// What a cluster `events replay` did.
#[derive(Debug)]
pub struct Replayed {
    /// Deliveries queued again.
    pub queued: usize,
    /// Dead letters not replayed: the stream no longer holds their event.
    pub gone: usize,
}

/// Why a cluster `events` command failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "no event {0} in the cluster's stream (in cluster mode ids are stream sequences, as `smee-relay events list` shows; older events may have expired)"
    )]
    NoEvent(u64),
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// A route as the cluster knows it.
struct Route {
    label: String,
    hash: String,
    /// The subjects its consumer reads.
    subjects: Vec<String>,
    /// The last stream sequence known delivered (or given up on).
    floor: u64,
    /// The stream sequence out with an instance, if any.
    in_flight: Option<u64>,
    /// Its holder's attempts so far, if one failed.
    trying: Option<Trying>,
}

/// The routes and the dead letters, read once per command.
struct View {
    routes: Vec<Route>,
    /// (route hash, stream seq) -> the dead letter and its KV revision.
    dead: HashMap<(String, u64), (DeadLetter, u64)>,
}

impl View {
    /// Where `event` stands on each route that reads its subject.
    fn rows(&self, event: &ClusterEvent) -> Vec<Row> {
        let kind = crate::spool::event_kind(&event.event);
        self.routes
            .iter()
            .filter(|route| route.subjects.contains(&event.subject))
            .map(|route| {
                let dead = self.dead.get(&(route.hash.clone(), event.seq));
                let status = match dead {
                    Some((d, _)) if d.replayed_as.is_some() => State::Replayed,
                    Some((d, _)) if d.purged_ms.is_some() => State::Purged,
                    Some(_) => State::Dead,
                    None if event.seq <= route.floor => State::Delivered,
                    None if route.in_flight == Some(event.seq) => State::InFlight,
                    None => State::Pending,
                };
                let trying = route
                    .trying
                    .as_ref()
                    .filter(|t| status == State::InFlight && t.stream_seq == event.seq);
                Row {
                    id: event.seq,
                    received_ms: event.received_ms,
                    channel: event.channel.clone(),
                    route: route.label.clone(),
                    status,
                    attempts: dead.map(|(d, _)| d.attempts).or(trying.map(|t| t.attempts)),
                    last_status: dead
                        .and_then(|(d, _)| d.status)
                        .or(trying.and_then(|t| t.status)),
                    last_error: dead
                        .map(|(d, _)| d.error.clone())
                        .or(trying.map(|t| t.error.clone())),
                    kind: kind.clone(),
                    replay_of: event.replay_of,
                    replayed_as: dead.and_then(|(d, _)| d.replayed_as),
                }
            })
            .collect()
    }
}

fn nats(e: impl Into<async_nats::Error>) -> NatsError {
    NatsError(e.into())
}

impl Cluster {
    async fn view(&self) -> Result<View, NatsError> {
        let stream = self.js.get_stream(&self.stream_name).await.map_err(nats)?;
        let (created, last) = (
            super::floor::created_ns(stream.cached_info()),
            stream.cached_info().state.last_sequence,
        );
        let mut consumers = stream.consumers();
        let mut routes = Vec::new();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(nats)?;
            let Some(hash) = info.name.strip_prefix("route_") else {
                continue;
            };
            let mut subjects = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                subjects.push(info.config.filter_subject.clone());
            }
            // A floor of an earlier stream (created anew since) says nothing of this one's.
            let kept = match self.kv.get(format!("floor.{}", info.name)).await {
                Ok(Some(floor)) => super::floor::Floor::parse(&floor)
                    .filter(|floor| floor.of_stream(created, last))
                    .map_or(0, |floor| floor.seq),
                Ok(None) => 0,
                Err(e) => return Err(nats(e)),
            };
            let in_flight = (info.num_ack_pending > 0).then_some(info.delivered.stream_sequence);
            let trying = match in_flight {
                Some(_) => match self.kv.get(trying_key(hash)).await {
                    Ok(Some(value)) => serde_json::from_slice::<Trying>(&value).ok(),
                    Ok(None) => None,
                    Err(e) => return Err(nats(e)),
                },
                None => None,
            };
            routes.push(Route {
                label: info
                    .config
                    .description
                    .clone()
                    .unwrap_or_else(|| info.name.clone()),
                hash: hash.to_string(),
                subjects,
                floor: kept.max(info.ack_floor.stream_sequence),
                in_flight,
                trying,
            });
        }
        routes.sort_by(|a, b| a.label.cmp(&b.label));
        let mut dead = HashMap::new();
        let mut keys = self.kv.keys().await.map_err(nats)?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(nats)?;
            if key.starts_with("dead.") {
                names.push(key);
            }
        }
        for key in names {
            let Some(entry) = self.kv.entry(key).await.map_err(nats)? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if let Ok(letter) = serde_json::from_slice::<DeadLetter>(&entry.value) {
                dead.insert(
                    (letter.route_hash.clone(), letter.stream_seq),
                    (letter, entry.revision),
                );
            }
        }
        Ok(View { routes, dead })
    }

    /// Stream message `seq`, if the stream still has it and it is a relay frame.
    pub async fn event(&self, seq: u64) -> Result<Option<ClusterEvent>, NatsError> {
        let stream = self.js.get_stream(&self.stream_name).await.map_err(nats)?;
        let message = match stream.get_raw_message(seq).await {
            Ok(message) => message,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(nats(e)),
        };
        let envelope = match self
            .open_envelope(Some(&message.headers), &message.payload)
            .await
        {
            Ok(envelope) => envelope,
            Err(super::OpenError::Invalid(_)) => return Ok(None),
            Err(super::OpenError::Fetch(e)) => return Err(NatsError(e)),
        };
        Ok(Some(ClusterEvent {
            seq,
            subject: message.subject.to_string(),
            channel: envelope.channel,
            received_ms: envelope.received_ms,
            event: envelope.event,
            replay_of: envelope.replay_of,
        }))
    }

    /// The stream's first and last sequence.
    async fn bounds(&self) -> Result<(u64, u64), NatsError> {
        let stream = self.js.get_stream(&self.stream_name).await.map_err(nats)?;
        let state = &stream.cached_info().state;
        Ok((state.first_sequence, state.last_sequence))
    }

    /// `events list`: the last `limit` (event, route) rows, oldest first, with `status` only.
    pub async fn list(&self, status: Option<Filter>, limit: usize) -> Result<Vec<Row>, NatsError> {
        let view = self.view().await?;
        let wanted = |row: &Row| status.is_none_or(|filter| filter.keeps(row.status));
        let mut groups: Vec<Vec<Row>> = Vec::new();
        let mut found = 0;
        let take = |event: ClusterEvent, groups: &mut Vec<Vec<Row>>| {
            let rows: Vec<Row> = view.rows(&event).into_iter().filter(&wanted).collect();
            let count = rows.len();
            groups.push(rows);
            count
        };
        if status.is_some_and(Filter::dead_only) {
            // Dead letters are few and anywhere in the stream: read them, not the stream.
            let mut seqs: Vec<u64> = view.dead.keys().map(|(_, seq)| *seq).collect();
            seqs.sort_unstable();
            seqs.dedup();
            for seq in seqs.into_iter().rev() {
                if found >= limit {
                    break;
                }
                if let Some(event) = self.event(seq).await? {
                    found += take(event, &mut groups);
                }
            }
        } else {
            let (first, last) = self.bounds().await?;
            let mut seq = last;
            while seq >= first.max(1) && found < limit && last - seq < SCAN {
                if let Some(event) = self.event(seq).await? {
                    found += take(event, &mut groups);
                }
                seq -= 1;
            }
        }
        let mut rows: Vec<Row> = groups.into_iter().rev().flatten().collect();
        if rows.len() > limit {
            rows.drain(..rows.len() - limit);
        }
        Ok(rows)
    }

    /// `events show`: one event and where it stands on each route.
    pub async fn show(&self, seq: u64) -> Result<(ClusterEvent, Vec<Row>), InspectError> {
        let event = self.event(seq).await?.ok_or(InspectError::NoEvent(seq))?;
        let view = self.view().await?;
        let rows = view.rows(&event);
        Ok((event, rows))
    }

    /// `events replay` without `--to`: re-queue cluster-wide, behind what is queued, in order.
    /// A dead letter is claimed first (compare-and-set on its KV entry), so two people
    /// replaying at once re-queue it once. Returns how many deliveries were re-queued, and
    /// with `--dead` how many dead letters were left because their event is gone.
    pub async fn replay(&self, which: Which) -> Result<Replayed, InspectError> {
        let mut gone = 0;
        let view = self.view().await?;
        // (route hash, the event), in stream order.
        let mut chosen: Vec<(String, ClusterEvent)> = Vec::new();
        let pick = |event: ClusterEvent, chosen: &mut Vec<(String, ClusterEvent)>| {
            for row in view.rows(&event) {
                let replayed = row.replayed_as.is_some();
                let done = matches!(row.status, State::Delivered | State::Dead | State::Purged);
                if done && !replayed {
                    let hash = view
                        .routes
                        .iter()
                        .find(|r| r.label == row.route && r.subjects.contains(&event.subject))
                        .map(|r| r.hash.clone());
                    if let Some(hash) = hash {
                        chosen.push((hash, event.clone()));
                    }
                }
            }
        };
        match which {
            Which::Dead => {
                let mut seqs: Vec<u64> = view
                    .dead
                    .values()
                    .filter(|(d, _)| d.replayed_as.is_none() && d.purged_ms.is_none())
                    .map(|(d, _)| d.stream_seq)
                    .collect();
                seqs.sort_unstable();
                seqs.dedup();
                for seq in seqs {
                    // Expired, or the stream was created anew: said, and the rest replayed
                    // (helper-154: one such letter failed the whole replay).
                    let Some(event) = self.event(seq).await? else {
                        gone += view
                            .dead
                            .values()
                            .filter(|(d, _)| {
                                d.stream_seq == seq
                                    && d.replayed_as.is_none()
                                    && d.purged_ms.is_none()
                            })
                            .count();
                        continue;
                    };
                    for row in view.rows(&event) {
                        if row.status == State::Dead && row.replayed_as.is_none() {
                            let hash = view
                                .routes
                                .iter()
                                .find(|r| {
                                    r.label == row.route && r.subjects.contains(&event.subject)
                                })
                                .map(|r| r.hash.clone());
                            if let Some(hash) = hash {
                                chosen.push((hash, event.clone()));
                            }
                        }
                    }
                }
            }
            Which::Ids(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                let mut events = Vec::new();
                for id in ids {
                    events.push(self.event(id).await?.ok_or(InspectError::NoEvent(id))?);
                }
                for event in events {
                    pick(event, &mut chosen);
                }
            }
            Which::ReceivedSince {
                since_ms: since,
                produced,
            } => {
                let produced: Vec<String> = produced
                    .iter()
                    .map(|route| self.subject(&super::produced_key(route)))
                    .collect();
                let (first, last) = self.bounds().await?;
                let mut events = Vec::new();
                let mut seq = last;
                while seq >= first.max(1) {
                    match self.event(seq).await? {
                        // A replay copy keeps its original's receive time, wherever it sits
                        // in the stream: it neither counts as received in the window (its
                        // original does, and is replayed itself) nor says where to stop.
                        Some(event) if event.replay_of.is_some() => {}
                        // What the relay produced is not a received frame. Its receive time is
                        // when it was produced, which says nothing of where received frames
                        // stop: skipped before the stop check.
                        Some(event) if produced.contains(&event.subject) => {}
                        // Originals are in receipt order, give or take the instances' clocks:
                        // the scan goes that much further back before it stops.
                        Some(event) if event.received_ms < since.saturating_sub(CLOCK_SKEW) => {
                            break;
                        }
                        Some(event) if event.received_ms < since => {}
                        Some(event) => events.push(event),
                        None => {}
                    }
                    seq -= 1;
                }
                for event in events.into_iter().rev() {
                    pick(event, &mut chosen);
                }
            }
        }
        let mut queued = 0;
        for (hash, event) in chosen {
            let key = dead_key(&hash, event.seq);
            let claim = view.dead.get(&(hash.clone(), event.seq)).cloned();
            if let Some((mut letter, revision)) = claim.clone() {
                letter.replayed_as = Some(0);
                match self.kv.update(&key, to_bytes(&letter), revision).await {
                    Ok(_) => {}
                    // Someone else is replaying it.
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(nats(e).into()),
                }
            }
            let published = self.publish_replay(&hash, &event).await;
            match (published, claim) {
                (Ok(seq), Some((mut letter, _))) => {
                    letter.replayed_as = Some(seq);
                    self.kv.put(&key, to_bytes(&letter)).await.map_err(nats)?;
                }
                (Ok(_), None) => {}
                (Err(e), Some((letter, _))) => {
                    // Not re-queued: leave it replayable.
                    let _ = self.kv.put(&key, to_bytes(&letter)).await;
                    return Err(e.into());
                }
                (Err(e), None) => return Err(e.into()),
            }
            queued += 1;
        }
        Ok(Replayed { queued, gone })
    }

    /// Publish a copy of `event` on the replay subject of the route hashed `hash`: its new
    /// stream sequence.
    async fn publish_replay(&self, hash: &str, event: &ClusterEvent) -> Result<u64, NatsError> {
        let envelope = Envelope {
            channel: event.channel.clone(),
            received_ms: event.received_ms,
            event: event.event.clone(),
            replay_of: Some(event.seq),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        // Never a duplicate of the original (or of an earlier replay).
        let ack = self
            .publish_envelope(
                self.replay_subject(hash),
                format!("replay.{hash}.{}.{nanos}", event.seq),
                &envelope,
            )
            .await
            .map_err(|e| match e {
                super::PublishError::Nats(e) => e,
                refused => NatsError(refused.into()),
            })?;
        Ok(ack.sequence)
    }

    /// `events purge --dead`: give up on the cluster's dead letters for good (`--dead` no
    /// longer replays them; `list` shows them `purged`, not delivered). Also forgets, whatever
    /// their state, the records of dead letters whose message the stream no longer holds (aged
    /// out by `max_age`, or deleted): nothing can list or replay them, and without this the
    /// bucket would keep every dead letter ever recorded.
    pub async fn purge_dead(&self) -> Result<Purged, NatsError> {
        let view = self.view().await?;
        let mut done = Purged::default();
        for ((hash, seq), (letter, revision)) in &view.dead {
            if self.event(*seq).await?.is_none() {
                match self
                    .kv
                    .purge_expect_revision(dead_key(hash, *seq), Some(*revision))
                    .await
                {
                    Ok(()) => done.forgotten += 1,
                    // Changed by someone else just now: left for the next purge.
                    Err(e) if e.kind() == kv::PurgeErrorKind::WrongLastRevision => {}
                    Err(e) => return Err(nats(e)),
                }
                continue;
            }
            if letter.replayed_as.is_some() || letter.purged_ms.is_some() {
                continue;
            }
            let mut letter = letter.clone();
            letter.purged_ms = Some(crate::clock::now_ms());
            match self
                .kv
                .update(dead_key(hash, *seq), to_bytes(&letter), *revision)
                .await
            {
                Ok(_) => done.purged += 1,
                // Being replayed, or purged, by someone else just now.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(nats(e)),
            }
        }
        Ok(done)
    }
}

/// What `events purge --dead` did in the cluster.
#[derive(Clone, Copy, Debug, Default)]
pub struct Purged {
    /// Dead letters given up on now.
    pub purged: usize,
    /// Records of dead letters whose message the stream no longer holds, removed.
    pub forgotten: usize,
}

fn to_bytes(letter: &DeadLetter) -> Bytes {
    Bytes::from(serde_json::to_vec(letter).expect("a dead letter serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, subject: &str) -> ClusterEvent {
        ClusterEvent {
            seq,
            subject: subject.into(),
            channel: "https://smee.io/abc…".into(),
            received_ms: 1,
            event: Event::default(),
            replay_of: None,
        }
    }

    fn route(
        label: &str,
        hash: &str,
        subjects: &[&str],
        floor: u64,
        in_flight: Option<u64>,
    ) -> Route {
        Route {
            label: label.into(),
            hash: hash.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            floor,
            in_flight,
            trying: None,
        }
    }

    #[test]
    fn each_route_reading_the_subject_says_where_the_event_stands() {
        let letter = DeadLetter {
            route: "b".into(),
            route_hash: "hb".into(),
            stream_seq: 3,
            status: Some(400),
            error: "target answered 400".into(),
            attempts: 1,
            at_ms: 1,
            replayed_as: Some(9),
            purged_ms: None,
        };
        let view = View {
            routes: vec![
                route("a", "ha", &["ch", "replay.ha"], 4, Some(5)),
                route("b", "hb", &["ch", "replay.hb"], 2, None),
                route("other", "ho", &["other-ch"], 100, None),
            ],
            dead: HashMap::from([(("hb".to_string(), 3), (letter, 7))]),
        };
        let states = |seq: u64, subject: &str| -> Vec<(String, State)> {
            view.rows(&event(seq, subject))
                .into_iter()
                .map(|r| (r.route, r.status))
                .collect()
        };
        // At or below the floor: delivered; the one out: in flight; the rest pending. A route
        // of another channel has no row.
        assert_eq!(
            states(3, "ch"),
            [
                ("a".into(), State::Delivered),
                ("b".into(), State::Replayed)
            ]
        );
        assert_eq!(
            states(5, "ch"),
            [("a".into(), State::InFlight), ("b".into(), State::Pending)]
        );
        // A replay is one route's only.
        assert_eq!(states(9, "replay.hb"), [("b".into(), State::Pending)]);
        let dead = &view.rows(&event(3, "ch"))[1];
        assert_eq!(
            (dead.last_status, dead.attempts, dead.replayed_as),
            (Some(400), Some(1), Some(9))
        );
    }
}
