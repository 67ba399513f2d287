//! Reconciliation with Port: closing the gaps smee.io leaves.
//!
//! smee.io keeps nothing: a change posted while no relay is connected (a restart, a network
//! cut, a lid closed) is gone, and with it a FIRING or RESOLVED alert. Port keeps the truth, so
//! at start, after every reconnection of a channel that feeds the pipeline, and every
//! `[port] reconcile` interval, the reconciler fetches the current entities of every blueprint
//! a rule watches and appends them to the spool as one synthetic event per blueprint (a
//! [`Snapshot`], channel [`CHANNEL`], header [`HEADER`]) on the pipeline route.
//!
//! The pipeline runner ([`super::runner`]) then judges each entity of the snapshot as if an
//! UPDATE from the stored alert state had arrived ([`judge_snapshot`]): a missed transition
//! sends its alert, noted as found by reconciliation and since when the gap lasted; an entity
//! with a firing alert that is no longer in Port resolves; nothing changed, nothing is sent.
//! Because the snapshot is an event in the spool, it is durable and ordered with the live
//! events, and judging it twice sends nothing twice. A live event newer than the snapshot wins:
//! an entity whose `updatedAt` is older than the last change judged for it is left alone.
//!
//! What this module must not do: send alerts itself or touch alert state (the runner does, in
//! one transaction with the event's mark), or log Port credentials.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::port_api::{PortClient, escape, preview};
use super::state::Phase;
use super::{Alert, AlertState, AlertStatus, PIPELINE_ROUTE, Pipeline, RuleFailure, port};
use crate::delivery::forward::ForwardError;
use crate::event::Event;
use crate::retry::BackoffPolicy;
use crate::source::status::ChannelStatus;
use crate::spool::writer::SpoolWriter;
use crate::spool::{Spool, SpoolError, Write};

/// The header that marks a snapshot. Only the relay sets `x-smee-relay-*` headers (the source
/// drops them from what senders post), so a webhook cannot pose as a snapshot.
pub const HEADER: &str = "x-smee-relay-reconcile";

/// The channel snapshots are stored under: `events list` shows it as their source.
pub const CHANNEL: &str = "port-reconciliation";

/// The interval when Port API credentials are configured and `reconcile` is not set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// The shortest interval accepted: each reconciliation reads whole blueprints from Port.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// The least time between two reads of Port when a gap asks for one: a channel that
/// reconnects again and again costs one read per this (as catch-up's `MIN_INTERVAL`). The
/// daemon's default; `SMEE_RELAY_RECONCILE_GAP_SPACING` changes it (tests, a lab Port).
pub const MIN_GAP_SPACING: Duration = Duration::from_secs(60);

/// How long the start's reconciliation waits for the first connection of a pipeline channel,
/// to cover it too.
const START_GRACE: Duration = Duration::from_secs(5);

/// Retrying a failed reconciliation: from 1 s up to 5 minutes (or what a 429 asks).
const RETRY: BackoffPolicy = BackoffPolicy {
    min: Duration::from_secs(1),
    max: Duration::from_secs(300),
};

/// More pages than this for one blueprint is a loop in Port's cursor, not a catalog.
const MAX_PAGES: usize = 10_000;

/// More entities than this in one blueprint is refused with a clear error: a snapshot is held
/// in memory and stored as one event.
const MAX_ENTITIES: usize = 200_000;

/// Where the reconciler keeps the last time it knew the relay was up (a clean stop, or a
/// reconciliation that succeeded): the start of the gap at the next start. A prefix no alert
/// state key has (rule names cannot hold control characters).
pub const ALIVE_KEY: &str = "\u{1e}reconcile\u{1f}alive";

/// Why a reconciliation ran: what the alerts it finds say.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Why {
    /// The strongest reason among those merged.
    pub kind: WhyKind,
    /// When the gap began (ms since the epoch), if known: the relay's last sign of life before
    /// a start, the moment a channel disconnected, the last reconciliation for an interval.
    pub since_ms: Option<u64>,
    /// The channels (redacted) whose reconnection asked for it.
    #[serde(default)]
    pub channels: Vec<String>,
}

/// The reasons, weakest first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhyKind {
    /// The interval came round: no gap was seen, but an event may have been lost on the way.
    #[default]
    Interval,
    /// A channel feeding the pipeline reconnected.
    Reconnect,
    /// The relay started.
    Start,
}

impl Why {
    /// Fold another reason into this one: the strongest kind, with the start of its gap (the
    /// earliest, between two of a kind). A reconnect's note names when the channel dropped,
    /// not when the interval's count began (helper-117: "disconnected since" the last
    /// reconciliation).
    pub fn merge(&mut self, other: Why) {
        use std::cmp::Ordering;
        self.since_ms = match other.kind.cmp(&self.kind) {
            Ordering::Greater => other.since_ms.or(self.since_ms),
            Ordering::Less => self.since_ms.or(other.since_ms),
            Ordering::Equal => match (self.since_ms, other.since_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        };
        self.kind = self.kind.max(other.kind);
        for channel in other.channels {
            if !self.channels.contains(&channel) {
                self.channels.push(channel);
            }
        }
    }

    /// What an alert found for this reason says, as of `at_ms` (when Port was read).
    pub fn note(&self, at_ms: u64) -> String {
        let since = self.since_ms.map(|since| {
            format!(
                "{} ({} before Port was read)",
                crate::clock::rfc3339_seconds(since),
                humantime::format_duration(Duration::from_secs(at_ms.saturating_sub(since) / 1000))
            )
        });
        match (self.kind, since) {
            (WhyKind::Start, Some(since)) => format!(
                "found by reconciliation after a gap: smee-relay was not receiving since {since}"
            ),
            (WhyKind::Start, None) => {
                "found by reconciliation at start (no earlier run recorded)".into()
            }
            (WhyKind::Reconnect, since) => format!(
                "found by reconciliation after a gap: channel {} reconnected, disconnected since {}",
                self.channels.join(", "),
                since.unwrap_or_else(|| "the relay started".into())
            ),
            (WhyKind::Interval, since) => format!(
                "found by periodic reconciliation: a change missed since {} with no gap seen (lost on the way?)",
                since.unwrap_or_else(|| "the relay started".into())
            ),
        }
    }
}

/// Port's timestamps (`updatedAt`, ISO 8601) in ms since the epoch.
pub fn port_time_ms(text: &str) -> Option<u64> {
    let (local, offset_s) = utc_offset(text.trim());
    let at = humantime::parse_rfc3339_weak(local).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i128;
    u64::try_from(ms - i128::from(offset_s) * 1000).ok()
}

/// An RFC 3339 time split into its local part and its offset east of UTC in seconds: `Z` or
/// `z`, `+01:00`, `-0130` (humantime reads UTC only: a time with another offset did not parse
/// and was not compared, helper-127). No offset reads as UTC.
fn utc_offset(text: &str) -> (&str, i64) {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return (local, 0);
    }
    for len in [6, 5] {
        // After the date (`YYYY-MM-DD`), whose dashes are no offset.
        let Some(at) = text.len().checked_sub(len).filter(|at| *at > 10) else {
            continue;
        };
        let (local, offset) = text.split_at(at);
        let sign = match offset.as_bytes()[0] {
            b'+' => 1,
            b'-' => -1,
            _ => continue,
        };
        let digits = if len == 6 {
            match offset[1..].split_once(':') {
                Some((h, m)) if h.len() == 2 => format!("{h}{m}"),
                _ => continue,
            }
        } else {
            offset[1..].to_string()
        };
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let (h, m): (i64, i64) = (
            digits[..2].parse().unwrap_or(0),
            digits[2..].parse().unwrap_or(0),
        );
        return (local, sign * (h * 3600 + m * 60));
    }
    (text, 0)
}

/// When a change happened as Port says: the entity's `updatedAt` after it, or for a deletion
/// the trigger's time (made [`credible`]).
pub fn change_time_ms(change: &port::Change) -> Option<u64> {
    let text = (change.after.as_ref())
        .and_then(|e| e.updated_at.as_deref())
        .or(change.trigger.at.as_deref())?;
    let read = port_time_ms(text);
    if read.is_none() {
        // Warned once per process: every change of such a sender would say it again.
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "a Port change's time {:?} is not an RFC 3339 time: such changes are judged without their order (said once)",
                crate::text::cut(&crate::text::escape_control(text), 64)
            );
        }
    }
    read.map(credible)
}

/// How far ahead of this host's clock Port's time may be (clocks drift a little).
const FUTURE_SLACK_MS: u64 = 5 * 60 * 1000;

/// A Port time more than [`FUTURE_SLACK_MS`] ahead of our clock is taken as now: an
/// `updatedAt` of 2099 would otherwise make every later change look older than it (stale) and
/// mute the entity's alerts until 2099. Warned once per process.
pub fn credible(ms: u64) -> u64 {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let now = crate::clock::now_ms();
    if ms <= now.saturating_add(FUTURE_SLACK_MS) {
        return ms;
    }
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        warn!(
            "Port gave a time ({}) more than 5 minutes ahead of this host's clock; such times are \
             taken as now, so they cannot make later changes look stale (check the clocks)",
            crate::clock::rfc3339_seconds(ms)
        );
    }
    now
}

/// One blueprint's entities as Port had them: the body of a synthetic event.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub blueprint: String,
    /// When the relay started reading them (ms since the epoch): an entity judged live after
    /// this time is not taken for deleted when it is missing.
    pub fetched_at_ms: u64,
    pub why: Why,
    /// The entities, as Port's API returned them.
    pub entities: Vec<Value>,
}

impl Snapshot {
    /// The snapshot as it travels through the spool.
    pub fn to_event(&self) -> Event {
        Event {
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (HEADER.into(), self.blueprint.clone()),
                // What `events list` shows as the event's kind.
                ("x-port-event".into(), "reconciliation".into()),
            ],
            body: serde_json::to_vec(self)
                .expect("a snapshot serialises")
                .into(),
            ..Event::default()
        }
    }
}

/// Whether a stored event is a snapshot: written by the reconciler under its own channel, with
/// the header only the relay sets.
pub fn is_snapshot(event: &crate::spool::StoredEvent) -> bool {
    event.channel == CHANNEL && event.event.header(HEADER).is_some()
}

/// Port's time of each entity's state in `event`, if it is a snapshot (by subject, the newest
/// `updatedAt` of its copies); `None` for any other event, or a snapshot that cannot be read.
pub fn entity_times(event: &crate::spool::StoredEvent) -> Option<HashMap<String, u64>> {
    if !is_snapshot(event) {
        return None;
    }
    let snapshot: Snapshot = serde_json::from_slice(&event.event.body).ok()?;
    let mut times = HashMap::new();
    for entity in &snapshot.entities {
        let (Some(identifier), Some(at)) = (
            entity["identifier"].as_str(),
            entity["updatedAt"].as_str().and_then(port_time_ms),
        ) else {
            continue;
        };
        let time = times
            .entry(subject(&snapshot.blueprint, identifier))
            .or_insert(at);
        *time = at.max(*time);
    }
    Some(times)
}

/// The last change judged for one entity, as the runner records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Its spool id.
    pub event: u64,
    /// Port's time of that change, when known.
    pub updated_ms: Option<u64>,
}

/// What [`judge_snapshot`] found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Alerts to send, each noted as found by reconciliation.
    pub alerts: Vec<Alert>,
    /// New alert states.
    pub states: BTreeMap<String, AlertState>,
    /// Entities judged, by subject (`blueprint\x1f identifier`), with Port's time of them.
    pub seen: Vec<(String, Option<u64>)>,
    /// Entities compared with the stored state.
    pub compared: usize,
    /// Entities left alone because a newer change had been judged already.
    pub newer_live: usize,
    /// Entities with an alert state that Port no longer has.
    pub deleted: usize,
    /// Rules that could not judge: (rule, entity, reason).
    pub skipped: Vec<(String, String, String)>,
    /// Rules whose jq condition failed.
    pub failed: Vec<RuleFailure>,
}

/// The subject key the runner keeps its marks under: blueprint and entity.
pub fn subject(blueprint: &str, entity: &str) -> String {
    format!("{blueprint}\u{1f}{entity}")
}

/// Judge snapshot event `id` against the alert states: each entity as an UPDATE from the
/// stored state, and each entity with an open alert that is missing as a deletion. Blocks
/// while a `when` condition runs (as [`Pipeline::evaluate`] does).
pub fn judge_snapshot(
    pipeline: &Pipeline,
    snapshot: &Snapshot,
    states: &HashMap<String, AlertState>,
    seen: &dyn Fn(&str) -> Option<Seen>,
    id: u64,
    now_ms: u64,
) -> Outcome {
    let mut out = Outcome::default();
    // States as this snapshot has changed them so far (an entity listed twice is judged once
    // against its first judgement).
    let current = |key: &str, out: &Outcome| {
        out.states
            .get(key)
            .or_else(|| states.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let note = snapshot.why.note(snapshot.fetched_at_ms);
    let blueprint = snapshot.blueprint.as_str();
    // An entity listed twice (cursor paging over data that changes) is judged by its newest
    // copy by `updatedAt`, the last listed among equals (helper-127: the first won).
    let mut newest: HashMap<&str, (usize, Option<u64>)> = HashMap::new();
    for (at, entity) in snapshot.entities.iter().enumerate() {
        let Some(identifier) = entity["identifier"].as_str() else {
            continue;
        };
        let updated = entity["updatedAt"].as_str().and_then(port_time_ms);
        match newest.entry(identifier) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert((at, updated));
            }
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                if updated >= slot.get().1 {
                    slot.insert((at, updated));
                }
            }
        }
    }
    let mut present = BTreeSet::new();
    for (at, entity) in snapshot.entities.iter().enumerate() {
        let Some(identifier) = entity["identifier"].as_str() else {
            continue;
        };
        if newest
            .get(identifier)
            .is_some_and(|(chosen, _)| *chosen != at)
        {
            continue;
        }
        present.insert(identifier.to_string());
        let key = subject(blueprint, identifier);
        let updated_ms = entity["updatedAt"]
            .as_str()
            .and_then(port_time_ms)
            .map(credible);
        if let Some(last) = seen(&key)
            && (last.event > id
                || matches!((updated_ms, last.updated_ms), (Some(now), Some(then)) if now < then))
        {
            // A change newer than this snapshot was judged already: it wins.
            out.newer_live += 1;
            continue;
        }
        let body = json!({
            "action": "UPDATE",
            "resourceType": "entity",
            "trigger": {"origin": "smee-relay reconciliation", "at": crate::clock::rfc3339_seconds(snapshot.fetched_at_ms)},
            "context": {"blueprint": blueprint, "entity": identifier},
            "diff": {"before": entity, "after": entity},
        });
        let Ok(change) = port::decode(body.to_string().as_bytes()) else {
            continue;
        };
        out.compared += 1;
        let judged = pipeline.judge(change, &|k| current(k, &out), now_ms);
        for mut alert in judged.alerts {
            if alert.status == AlertStatus::Resolved
                && let Some(fired) = current(&pipeline.alert_state_key(&alert), &out)
                    .fired
                    .and_then(|f| f.property)
                && let Some(property) = alert.property.as_mut()
            {
                // What fired, for "before": the state does not keep the entity itself.
                property.before = fired.after;
            } else if let Some(property) = alert.property.as_mut() {
                property.before = "?".into();
            }
            alert.note = Some(note.clone());
            out.alerts.push(alert);
        }
        for (key, mut state) in judged.states {
            // A hold this snapshot begins: its draft's "before" is the entity as it is (the
            // snapshot is judged as a change from itself), not a value before (helper-153: it
            // fired reading "87 → 87"). Unknown, as for the alerts above.
            let began = !matches!(current(&key, &out).phase, Phase::Pending { .. });
            if began
                && matches!(state.phase, Phase::Pending { .. })
                && let Some(draft) = state.draft.as_mut()
            {
                if let Some(property) = draft.property.as_mut() {
                    property.before = "?".into();
                }
                // Said when it fires, as an alert found at once is (helper-157).
                draft.note = Some(note.clone());
            }
            out.states.insert(key, state);
        }
        out.skipped.extend(judged.skipped);
        out.failed.extend(judged.failed);
        out.seen.push((key, updated_ms));
    }
    // Entities with an open alert of a rule on this blueprint that Port no longer has.
    let rules: Vec<&str> = pipeline
        .rules
        .iter()
        .filter(|r| r.blueprint.as_deref() == Some(blueprint))
        .map(|r| r.name.as_str())
        .collect();
    let mut gone: BTreeMap<String, AlertState> = BTreeMap::new();
    for (key, state) in states {
        let Some((rule, entity)) = key.split_once('\u{1f}') else {
            continue;
        };
        if rules.contains(&rule) && state.phase != Phase::Ok && !present.contains(entity) {
            gone.entry(entity.to_string())
                .or_insert_with(|| state.clone());
        }
    }
    for (entity, state) in gone {
        let key = subject(blueprint, &entity);
        if let Some(last) = seen(&key)
            && (last.event > id
                || last
                    .updated_ms
                    .is_some_and(|then| then > snapshot.fetched_at_ms))
        {
            // Judged after this snapshot was read (created since, say): not gone.
            out.newer_live += 1;
            continue;
        }
        let title = state
            .fired
            .as_ref()
            .or(state.draft.as_ref())
            .map(|a| a.title.clone());
        let body = json!({
            "action": "DELETE",
            "resourceType": "entity",
            "trigger": {"origin": "smee-relay reconciliation", "at": crate::clock::rfc3339_seconds(snapshot.fetched_at_ms)},
            "context": {"blueprint": blueprint, "entity": entity},
            "diff": {"before": {"identifier": entity, "title": title}, "after": null},
        });
        let Ok(change) = port::decode(body.to_string().as_bytes()) else {
            continue;
        };
        out.deleted += 1;
        let judged = pipeline.judge(change, &|k| current(k, &out), now_ms);
        for mut alert in judged.alerts {
            // What fired, for "before" (as for an UPDATE above): the value the alert was about.
            if alert.status == AlertStatus::Resolved
                && let Some(fired) = current(&pipeline.alert_state_key(&alert), &out)
                    .fired
                    .and_then(|f| f.property)
                && let Some(property) = alert.property.as_mut()
            {
                property.before = fired.after;
            }
            alert.note = Some(format!("entity deleted; {note}"));
            out.alerts.push(alert);
        }
        out.states.extend(judged.states);
        out.seen.push((key, Some(snapshot.fetched_at_ms)));
    }
    out
}

/// The blueprints the rules watch; rules with no blueprint cannot be reconciled (Port has no
/// cheap "every entity" read) and are left out.
pub fn watched_blueprints(pipeline: &Pipeline) -> BTreeSet<String> {
    pipeline
        .rules
        .iter()
        .filter_map(|r| r.blueprint.clone())
        .collect()
}

/// Channels that reconnected and want a reconciliation, merged until the reconciler takes
/// them. Shared by the daemon's channel watchers and the reconciler.
#[derive(Default)]
pub struct Gaps {
    /// The reasons not yet taken, merged.
    pending: Mutex<Option<Why>>,
    /// Wakes the reconciler.
    notify: Notify,
}

impl Gaps {
    /// A channel connected; `since_ms` is when its previous connection ended (`None` for its
    /// first connection, whose gap began when the relay last stopped).
    pub fn report(&self, channel: String, since_ms: Option<u64>) {
        let why = Why {
            kind: WhyKind::Reconnect,
            since_ms,
            channels: vec![channel],
        };
        let mut pending = self.pending.lock().expect("not poisoned");
        match pending.as_mut() {
            Some(p) => p.merge(why),
            None => *pending = Some(why),
        }
        drop(pending);
        self.notify.notify_one();
    }

    /// The next reasons, waiting for one.
    pub async fn next(&self) -> Why {
        loop {
            if let Some(why) = self.pending.lock().expect("not poisoned").take() {
                return why;
            }
            self.notify.notified().await;
        }
    }
}

/// Report every (re)connection of `status`'s channel to `gaps`, until `cancel`.
pub async fn watch_channel(status: Arc<ChannelStatus>, gaps: Arc<Gaps>, cancel: CancellationToken) {
    let mut connections = status.connections();
    // The source runs beside this watcher and may have connected before it subscribed.
    if *connections.borrow_and_update() > 0 {
        gaps.report(status.name.clone(), status.disconnected_at_ms());
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = connections.changed() => if changed.is_err() { return },
        }
        connections.borrow_and_update();
        gaps.report(status.name.clone(), status.disconnected_at_ms());
    }
}

/// Why a reconciliation failed. Each is retried with backoff; the daemon keeps running.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot read the entities of blueprint {blueprint} from Port: {}", port_reason(.cause))]
    Call {
        blueprint: String,
        /// Said in Port's words by [`port_reason`] (not a `#[source]`: its own wording is
        /// about a forwarding target).
        cause: ForwardError,
    },
    #[error("Port answered {status} for the entities of blueprint {blueprint}: {body}")]
    Status {
        blueprint: String,
        status: http::StatusCode,
        /// What a 429 asked to wait.
        retry_after: Option<Duration>,
        body: String,
    },
    #[error(
        "Port's answer for the entities of blueprint {blueprint} has no `entities` list: {body}"
    )]
    Shape { blueprint: String, body: String },
    #[error("Port's paging for blueprint {0} did not end after {MAX_PAGES} pages")]
    Paging(String),
    #[error("Port's paging for blueprint {0} gave the cursor {1:?} twice (a loop)")]
    CursorLoop(String, String),
    #[error(
        "blueprint {0} has more than {MAX_ENTITIES} entities in Port: too many to reconcile \
         (name a narrower blueprint in the rules)"
    )]
    TooMany(String),
    #[error("cannot store the snapshot in the spool")]
    Spool(#[source] SpoolError),
    #[error("the spool is full: the snapshot was refused")]
    Full,
}

impl ReconcileError {
    /// The status Port answered, if it answered one.
    fn status(&self) -> Option<http::StatusCode> {
        match self {
            ReconcileError::Status { status, .. } => Some(*status),
            ReconcileError::Call {
                cause: ForwardError::Status { status, .. },
                ..
            } => Some(*status),
            _ => None,
        }
    }

    /// Whether Port refused the request itself (a 4xx other than 401, 403 and 429: the
    /// blueprint does not exist, say): a configuration problem, not an outage to retry.
    pub fn is_configuration(&self) -> bool {
        self.status().is_some_and(|status| {
            status.is_client_error() && !matches!(status.as_u16(), 401 | 403 | 429)
        })
    }

    /// Whether Port refused the client's credentials: 401 or 403 from the entities, or from
    /// the token endpoint (which the client says in [`CREDENTIALS_REFUSED`]'s words).
    fn is_credentials(&self) -> bool {
        match self {
            ReconcileError::Call {
                cause: ForwardError::Refused(why),
                ..
            } => why.starts_with(crate::pipeline::port_api::CREDENTIALS_REFUSED),
            _ => self
                .status()
                .is_some_and(|status| matches!(status.as_u16(), 401 | 403)),
        }
    }

    /// How long Port asked to wait, if it did.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ReconcileError::Status { retry_after, .. } => *retry_after,
            ReconcileError::Call {
                cause: ForwardError::Status { retry_after, .. },
                ..
            } => *retry_after,
            _ => None,
        }
    }
}

/// What went wrong with a call to Port, in Port's words (a [`ForwardError`] speaks of a target).
fn port_reason(error: &ForwardError) -> String {
    match error {
        ForwardError::Status { status, body, .. } if body.is_empty() => {
            format!("Port answered {status}")
        }
        ForwardError::Status { status, body, .. } => format!("Port answered {status}: {body}"),
        ForwardError::Timeout(wait) => format!(
            "Port did not answer within {}",
            humantime::format_duration(*wait)
        ),
        // The client's own messages (refused credentials) already name Port.
        ForwardError::Refused(message) => message.clone(),
        ForwardError::Connection(message) if message.starts_with("Port ") => message.clone(),
        ForwardError::Connection(message) => format!("cannot reach Port: {message}"),
        ForwardError::Request(message) => format!("cannot send this call to Port: {message}"),
    }
}

/// Where the current entities come from: Port's API ([`PortClient`]); a scripted catalog in
/// the timer tests.
pub trait Catalog: Send + Sync {
    /// Every entity of `blueprint`, as Port has it now.
    fn entities<'a>(
        &'a self,
        blueprint: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Value>, ReconcileError>>;
}

impl Catalog for PortClient {
    fn entities<'a>(
        &'a self,
        blueprint: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Value>, ReconcileError>> {
        Box::pin(fetch(self, blueprint))
    }
}

/// Every entity of `blueprint`, following Port's `next` cursor where it pages.
pub async fn fetch(client: &PortClient, blueprint: &str) -> Result<Vec<Value>, ReconcileError> {
    let mut entities = Vec::new();
    let mut from: Option<String> = None;
    let mut cursors = std::collections::HashSet::new();
    for _ in 0..MAX_PAGES {
        let mut path = format!("/v1/blueprints/{}/entities", escape(blueprint));
        if let Some(cursor) = &from {
            path.push_str("?from=");
            path.push_str(&escape(cursor));
        }
        let answer = client
            .call(reqwest::Method::GET, &path, None)
            .await
            .map_err(|cause| ReconcileError::Call {
                blueprint: blueprint.into(),
                cause,
            })?;
        if !answer.status.is_success() {
            return Err(ReconcileError::Status {
                blueprint: blueprint.into(),
                status: answer.status,
                retry_after: answer.retry_after,
                body: preview(&answer.body),
            });
        }
        let mut parsed: Value = serde_json::from_str(&answer.body).unwrap_or_default();
        let Some(Value::Array(page)) = parsed.get_mut("entities").map(Value::take) else {
            return Err(ReconcileError::Shape {
                blueprint: blueprint.into(),
                body: preview(&answer.body),
            });
        };
        entities.extend(page);
        if entities.len() > MAX_ENTITIES {
            return Err(ReconcileError::TooMany(blueprint.into()));
        }
        match parsed["next"].as_str() {
            Some(next) if !next.is_empty() => {
                if !cursors.insert(next.to_string()) {
                    return Err(ReconcileError::CursorLoop(blueprint.into(), next.into()));
                }
                from = Some(next.to_string())
            }
            _ => return Ok(entities),
        }
    }
    Err(ReconcileError::Paging(blueprint.into()))
}

/// Read every watched blueprint and append the snapshots to the pipeline route, in one
/// commit. Returns how many entities were read.
async fn reconcile_once(
    client: &dyn Catalog,
    writer: &SpoolWriter,
    pipeline: &Pipeline,
    blueprints: &BTreeSet<String>,
    why: &Why,
) -> Result<usize, ReconcileError> {
    let mut snapshots = Vec::new();
    let mut read = 0;
    for blueprint in blueprints {
        let fetched_at_ms = crate::clock::now_ms();
        let entities = match client.entities(blueprint).await {
            Ok(entities) => entities,
            Err(e) if e.is_configuration() => {
                // Retrying cannot help: the rules name what Port does not have. The others
                // are still reconciled; this one is tried again at the next interval.
                let rules: Vec<&str> = pipeline
                    .rules
                    .iter()
                    .filter(|r| r.blueprint.as_deref() == Some(blueprint.as_str()))
                    .map(|r| r.name.as_str())
                    .collect();
                metrics::counter!("smee_relay_reconciliations_total", "result" => "config_error")
                    .increment(1);
                error!(
                    blueprint = %blueprint,
                    "Port reconciliation skips blueprint {blueprint} (rules {}): {}; check the \
                     rules' blueprint (Port's blueprint identifier) and the client's access; \
                     tried again at the next interval",
                    rules.join(", "),
                    crate::error::chain(&e)
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        read += entities.len();
        snapshots.push(
            Snapshot {
                blueprint: blueprint.clone(),
                fetched_at_ms,
                why: why.clone(),
                entities,
            }
            .to_event(),
        );
    }
    if snapshots.is_empty() {
        return Ok(0);
    }
    let ids = writer
        .append(
            CHANNEL,
            &[PIPELINE_ROUTE.to_string()],
            snapshots.into(),
            None,
        )
        .await
        .map_err(ReconcileError::Spool)?;
    if ids.iter().any(Option::is_none) {
        return Err(ReconcileError::Full);
    }
    Ok(read)
}

/// The last time the relay was known to be up, from the spool.
fn alive_since(spool: &Spool) -> Option<u64> {
    let states = spool.states().ok()?;
    let (_, bytes) = states.into_iter().find(|(k, _)| k == ALIVE_KEY)?;
    serde_json::from_slice(&bytes).ok()
}

async fn store_alive(writer: &SpoolWriter, at_ms: u64) {
    let write = Write::State {
        key: ALIVE_KEY.into(),
        value: Some(serde_json::to_vec(&at_ms).expect("a number serialises")),
    };
    if let Err(e) = writer.commit(vec![write]).await {
        warn!(
            "cannot record when the relay was last up: {}",
            crate::error::chain(&e)
        );
    }
}

/// Reconcile at start, on every gap reported to `gaps`, and every `interval`, until `cancel`.
/// A failure (Port down, 429, 5xx) is retried with backoff and keeps its reason, so the alerts
/// it eventually finds still say which gap they close.
// Each is a separate handle the daemon owns; a struct for them would only be unpacked here.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    spool: Arc<Spool>,
    writer: SpoolWriter,
    client: Arc<dyn Catalog>,
    interval: Duration,
    gap_spacing: Duration,
    rules: watch::Receiver<Arc<Pipeline>>,
    gaps: Arc<Gaps>,
    health: Arc<crate::counters::Counters>,
    restarted: bool,
    cancel: CancellationToken,
) {
    // A failing run stays said while a reconciler replaced by a reload takes over (until one
    // goes through); the daemon clears it when reconciliation stops for good.
    let started_since = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || alive_since(&spool))
            .await
            .ok()
            .flatten()
    };
    // Restarted by a reload (new credentials, a new interval), the relay was receiving all
    // along: its first read is no start's, and says so (helper-120: "not receiving since" the
    // reload).
    let mut why = Why {
        kind: if restarted {
            WhyKind::Interval
        } else {
            WhyKind::Start
        },
        since_ms: started_since,
        channels: Vec::new(),
    };
    // The channels feeding the pipeline connect just after the start: their first connection
    // is folded into the start's reconciliation (one read of Port, not two), waiting for it
    // a little.
    tokio::select! {
        _ = cancel.cancelled() => {
            store_alive(&writer, crate::clock::now_ms()).await;
            return;
        }
        _ = tokio::time::sleep(START_GRACE) => {}
        mut gap = gaps.next() => {
            if gap.since_ms.is_none() {
                gap.since_ms = started_since;
            }
            why.merge(gap);
        }
    }
    let mut backoff = RETRY.start();
    let mut warned_unwatched = false;
    loop {
        let pipeline = rules.borrow().clone();
        let blueprints = watched_blueprints(&pipeline);
        if !warned_unwatched && pipeline.rules.iter().any(|r| r.blueprint.is_none()) {
            warn!(
                "reconciliation reads only the blueprints rules name; a rule without one is judged on their entities too, and on live events of any other blueprint"
            );
            warned_unwatched = true;
        }
        // A stop does not wait for Port (a call may take its whole timeout): the snapshot not
        // yet stored is read again at the next start.
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => {
                store_alive(&writer, crate::clock::now_ms()).await;
                return;
            }
            result = reconcile_once(client.as_ref(), &writer, &pipeline, &blueprints, &why) => result,
        };
        let failed = result.is_err();
        let wait = match result {
            Ok(read) => {
                let now = crate::clock::now_ms();
                metrics::counter!("smee_relay_reconciliations_total", "result" => "ok")
                    .increment(1);
                metrics::gauge!("smee_relay_reconcile_last_success_seconds")
                    .set(now as f64 / 1000.0);
                info!(
                    reason = ?why.kind,
                    blueprints = blueprints.len(),
                    entities = read,
                    "Port reconciliation: read {} of {}; the pipeline compares them with the alert state",
                    crate::error::count(read, "entity", "entities"),
                    crate::error::count(blueprints.len(), "blueprint", "blueprints")
                );
                backoff.reset();
                health.reconcile_ok();
                store_alive(&writer, now).await;
                why = Why {
                    kind: WhyKind::Interval,
                    since_ms: Some(now),
                    channels: Vec::new(),
                };
                interval
            }
            Err(e) => {
                metrics::counter!("smee_relay_reconciliations_total", "result" => "error")
                    .increment(1);
                let wait = e.retry_after().unwrap_or_else(|| backoff.next_delay());
                let said = crate::error::chain(&e);
                let retry =
                    humantime::format_duration(Duration::from_millis(wait.as_millis() as u64));
                // Refused credentials are the user's to fix (a reload applies the fix): an
                // error, where an outage of Port is a warning.
                if e.is_credentials() {
                    error!(
                        "Port reconciliation failed: {said}; retrying in {retry} (alerts missed meanwhile are found then)"
                    );
                } else {
                    warn!(
                        "Port reconciliation failed: {said}; retrying in {retry} (alerts missed meanwhile are found then)"
                    );
                }
                health.reconcile_failed(&said);
                wait
            }
        };
        // The next call: at the interval (or the retry) with no gap; a gap brings it forward,
        // but never closer than MIN_GAP_SPACING to the last call, nor before a retry's wait
        // (a 429's, or the backoff) ends: a flapping channel must not hammer Port.
        let next = tokio::time::Instant::now() + wait;
        let earliest = if failed {
            next
        } else {
            (started + gap_spacing).min(next)
        };
        let mut gap_pending = false;
        loop {
            let deadline = if gap_pending { earliest } else { next };
            tokio::select! {
                _ = cancel.cancelled() => {
                    // A clean stop: the next start's gap begins now.
                    store_alive(&writer, crate::clock::now_ms()).await;
                    return;
                }
                _ = tokio::time::sleep_until(deadline) => break,
                mut gap = gaps.next() => {
                    if gap.since_ms.is_none() {
                        gap.since_ms = started_since;
                    }
                    why.merge(gap);
                    gap_pending = true;
                }
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// Log what the runner made of a snapshot (the runner calls this once it is committed).
pub fn report(blueprint: &str, id: u64, outcome: &Outcome) {
    metrics::counter!("smee_relay_reconcile_entities_total").increment(outcome.compared as u64);
    metrics::counter!("smee_relay_reconcile_newer_live_total").increment(outcome.newer_live as u64);
    for alert in &outcome.alerts {
        metrics::counter!(
            "smee_relay_reconcile_alerts_total",
            "rule" => alert.rule.clone(),
            "status" => alert.status.to_string()
        )
        .increment(1);
    }
    let line = format!(
        "reconciliation of blueprint {blueprint} (event {id}): {} compared, {} gone from Port, {} left to newer changes judged already, {} found",
        crate::error::count(outcome.compared, "entity", "entities"),
        outcome.deleted,
        outcome.newer_live,
        crate::error::count(outcome.alerts.len(), "alert", "alerts")
    );
    if outcome.alerts.is_empty() {
        info!(event = id, "{line}");
    } else {
        // Something was missed: worth more than an info line.
        warn!(event = id, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Limits;
    use std::collections::VecDeque;

    const BP: &str = "DeploymentConfig";

    /// A Port on 127.0.0.1 whose token endpoint answers `token` (status, body) and whose
    /// entities endpoint answers `entities` (status, body), both the same every time.
    async fn fake_port(token: (u16, String), entities: (u16, String)) -> PortClient {
        use axum::routing::{get, post};
        let reply = |(status, body): (u16, String)| {
            move || {
                let body = body.clone();
                async move {
                    (
                        http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        body,
                    )
                }
            }
        };
        let app = axum::Router::new()
            .route("/v1/auth/access_token", post(reply(token)))
            .route("/v1/blueprints/{bp}/entities", get(reply(entities)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        PortClient::new(super::super::port_api::PortApi {
            api_url: url,
            client_id: "id".into(),
            client_secret: crate::secret::SecretString::from("the-client-secret".to_string()),
        })
        .unwrap()
    }

    fn token_ok() -> (u16, String) {
        (200, r#"{"accessToken":"t","expiresIn":3600}"#.into())
    }

    /// Regression: Port's paging followed a cursor that came back again for 10 000 pages.
    #[tokio::test]
    async fn a_repeated_port_cursor_is_a_loop_error() {
        let client = fake_port(
            token_ok(),
            (
                200,
                r#"{"entities":[{"identifier":"a"}],"next":"c1"}"#.into(),
            ),
        )
        .await;
        let e = fetch(&client, BP).await.unwrap_err();
        assert!(matches!(e, ReconcileError::CursorLoop(..)), "{e}");
        assert!(e.to_string().contains("twice (a loop)"), "{e}");
    }

    /// Regression: Port's answers were read whole, whatever their size.
    #[tokio::test]
    async fn a_huge_port_answer_is_refused() {
        let client = fake_port(token_ok(), (200, "x".repeat(17 << 20))).await;
        let e = crate::error::chain(&fetch(&client, BP).await.unwrap_err());
        assert!(e.contains("larger than"), "{e}");
    }

    /// Regression: a token endpoint's error body (which may echo the client secret) was put in
    /// the error, Port's errors read "target answered", and refused credentials read "cannot
    /// reach target".
    #[tokio::test]
    async fn port_errors_say_port_and_never_show_the_token_endpoint_body() {
        let echo = r#"{"error":"bad","clientSecret":"the-client-secret"}"#.to_string();
        let client = fake_port((500, echo.clone()), (200, "{}".into())).await;
        let e = crate::error::chain(&fetch(&client, BP).await.unwrap_err());
        assert!(!e.contains("the-client-secret"), "{e}");
        assert!(e.contains("Port answered 500"), "{e}");
        assert!(!e.contains("target"), "{e}");

        let client = fake_port((401, echo), (200, "{}".into())).await;
        let e = crate::error::chain(&fetch(&client, BP).await.unwrap_err());
        assert!(!e.contains("the-client-secret"), "{e}");
        assert!(e.contains("Port refused the credentials (401)"), "{e}");
        assert!(!e.contains("cannot reach"), "{e}");

        let client = fake_port(token_ok(), (503, r#"{"down":1}"#.into())).await;
        let e = crate::error::chain(&fetch(&client, BP).await.unwrap_err());
        assert!(e.contains("Port answered 503"), "{e}");
    }

    fn pipeline() -> Pipeline {
        super::super::tests::with_rules(include_str!("../../tests/fixtures/port/rules.toml"))
    }

    fn entity(id: &str, cpu: u32, updated: &str) -> Value {
        json!({
            "identifier": id,
            "title": format!("Title {id}"),
            "blueprint": BP,
            "properties": {"cpuUtil": cpu, "healthStatus": "Healthy"},
            "updatedAt": updated,
        })
    }

    fn snapshot(entities: Vec<Value>) -> Snapshot {
        Snapshot {
            blueprint: BP.into(),
            fetched_at_ms: port_time_ms("2026-11-20T11:00:00Z").unwrap(),
            why: Why {
                kind: WhyKind::Reconnect,
                since_ms: port_time_ms("2026-11-20T10:30:00Z"),
                channels: vec!["http://x/Pipe…".into()],
            },
            entities,
        }
    }

    /// Judge `snapshot` as event `id`, and apply what it found to `states` and `seen`.
    fn judge(
        pipeline: &Pipeline,
        snapshot: &Snapshot,
        states: &mut HashMap<String, AlertState>,
        seen: &mut HashMap<String, Seen>,
        id: u64,
    ) -> Outcome {
        let marks = seen.clone();
        let out = judge_snapshot(
            pipeline,
            snapshot,
            states,
            &|k| marks.get(k).copied(),
            id,
            1,
        );
        for (key, state) in &out.states {
            states.insert(key.clone(), state.clone());
        }
        for (key, updated_ms) in &out.seen {
            seen.insert(
                key.clone(),
                Seen {
                    event: id,
                    updated_ms: *updated_ms,
                },
            );
        }
        out
    }

    fn said(out: &Outcome) -> Vec<String> {
        out.alerts
            .iter()
            .map(|a| format!("{} {} {}", a.status, a.rule, a.entity))
            .collect()
    }

    #[test]
    fn a_missed_transition_is_found_once_and_a_deleted_entity_resolves() {
        let pipeline = pipeline();
        let mut states = HashMap::new();
        let mut seen = HashMap::new();
        let t = |m: u32| format!("2026-11-20T10:{m:02}:00Z");

        let calm = snapshot(vec![entity("a", 60, &t(0)), entity("b", 10, &t(0))]);
        let out = judge(&pipeline, &calm, &mut states, &mut seen, 1);
        assert!(out.alerts.is_empty(), "nothing changed: nothing sent");
        assert_eq!(out.compared, 2);

        let hot = snapshot(vec![entity("a", 95, &t(5)), entity("b", 10, &t(0))]);
        let out = judge(&pipeline, &hot, &mut states, &mut seen, 2);
        assert_eq!(said(&out), ["FIRING cpu-high a"]);
        let note = out.alerts[0].note.as_deref().unwrap();
        assert!(
            note.starts_with("found by reconciliation after a gap")
                && note
                    .contains("disconnected since 2026-11-20T10:30:00Z (30m before Port was read)"),
            "{note}"
        );
        let property = out.alerts[0].property.as_ref().unwrap();
        assert_eq!(
            (property.before.as_str(), property.after.as_str()),
            ("?", "95")
        );

        // The same snapshot again (a replay, a second reconnect): nothing more.
        let out = judge(&pipeline, &hot, &mut states, &mut seen, 3);
        assert!(out.alerts.is_empty(), "{:?}", said(&out));

        let back = snapshot(vec![entity("a", 50, &t(9)), entity("b", 10, &t(0))]);
        let out = judge(&pipeline, &back, &mut states, &mut seen, 4);
        assert_eq!(said(&out), ["RESOLVED cpu-high a"]);
        let property = out.alerts[0].property.as_ref().unwrap();
        assert_eq!(
            (property.before.as_str(), property.after.as_str()),
            ("95", "50")
        );

        let hot_b = snapshot(vec![entity("a", 50, &t(9)), entity("b", 99, &t(10))]);
        assert_eq!(
            said(&judge(&pipeline, &hot_b, &mut states, &mut seen, 5)),
            ["FIRING cpu-high b"]
        );
        let deleted = snapshot(vec![entity("a", 50, &t(9))]);
        let out = judge(&pipeline, &deleted, &mut states, &mut seen, 6);
        assert_eq!(said(&out), ["RESOLVED cpu-high b"]);
        // Regression: the deleted entity's RESOLVED did not show the value that fired.
        let property = out.alerts[0].property.as_ref().unwrap();
        assert_eq!(
            (property.before.as_str(), property.after.as_str()),
            ("99", "-")
        );
        assert!(
            out.alerts[0]
                .note
                .as_deref()
                .unwrap()
                .starts_with("entity deleted; found by reconciliation"),
            "{:?}",
            out.alerts[0].note
        );
        assert_eq!(out.deleted, 1);
        // Gone stays gone: no second RESOLVED.
        assert!(
            judge(&pipeline, &deleted, &mut states, &mut seen, 7)
                .alerts
                .is_empty()
        );
    }

    /// Regression (helper-153): a hold a snapshot began kept the snapshot's change from the
    /// entity to itself as its draft, and fired reading "cpuUtil 87 → 87".
    #[test]
    fn regression_a_hold_begun_by_a_snapshot_fired_reading_87_to_87() {
        let pipeline = super::super::tests::with_rules(
            "[[rule]]\nname = \"cpu-high\"\nblueprint = \"DeploymentConfig\"\n\
             property = \"cpuUtil\"\nabove = 80\nfor = \"5m\"\n",
        );
        let mut states = HashMap::new();
        let mut seen = HashMap::new();
        let hot = snapshot(vec![entity("a", 87, "2026-11-20T10:05:00Z")]);
        let out = judge(&pipeline, &hot, &mut states, &mut seen, 1);
        assert!(out.alerts.is_empty(), "held, not fired: {:?}", said(&out));
        let held = &states[&super::super::state_key("cpu-high", "a")];
        assert!(matches!(held.phase, Phase::Pending { .. }), "{held:?}");
        let property = held.draft.as_ref().unwrap().property.as_ref().unwrap();
        assert_eq!(
            (property.before.as_str(), property.after.as_str()),
            ("?", "87")
        );
        // helper-157: it fired saying only "held for 5m", not how it was found.
        let note = held.draft.as_ref().unwrap().note.as_deref().unwrap();
        assert!(note.starts_with("found by reconciliation"), "{note}");
        // The same Port read again (a restart mid-hold) keeps the hold's beginning.
        let out = judge(&pipeline, &hot, &mut states, &mut seen, 2);
        assert!(out.alerts.is_empty(), "{:?}", said(&out));
        let held = &states[&super::super::state_key("cpu-high", "a")];
        let draft = held.draft.as_ref().unwrap();
        assert!(
            draft
                .note
                .as_deref()
                .unwrap()
                .starts_with("found by reconciliation")
        );
        assert_eq!(draft.property.as_ref().unwrap().before, "?");
    }

    #[test]
    fn a_live_event_newer_than_the_snapshot_wins() {
        let pipeline = pipeline();
        let mut states = HashMap::new();
        let mut seen = HashMap::new();
        // A live event judged at 10:20 (event 5) said cpu 95 and fired.
        let live = snapshot(vec![entity("a", 95, "2026-11-20T10:20:00Z")]);
        judge(&pipeline, &live, &mut states, &mut seen, 5);
        // The snapshot, read before that change reached Port's answer, still says 60.
        let stale = snapshot(vec![entity("a", 60, "2026-11-20T10:10:00Z")]);
        let out = judge(&pipeline, &stale, &mut states, &mut seen, 6);
        assert!(out.alerts.is_empty(), "{:?}", said(&out));
        assert_eq!((out.compared, out.newer_live), (0, 1));
        // A snapshot stored before the live event (a replay of an old one) loses too.
        let current = snapshot(vec![entity("a", 60, "2026-11-20T10:30:00Z")]);
        let out = judge(&pipeline, &current, &mut states, &mut seen, 4);
        assert_eq!((out.compared, out.newer_live), (0, 1));
        // An entity created live after the snapshot was read is missing from it, not deleted.
        let mut states2 = states.clone();
        let mut seen2 = seen.clone();
        let key = subject(BP, "a");
        seen2.insert(
            key,
            Seen {
                event: 6,
                updated_ms: port_time_ms("2026-11-20T11:00:01Z"),
            },
        );
        let out = judge(&pipeline, &snapshot(vec![]), &mut states2, &mut seen2, 7);
        assert!(out.alerts.is_empty(), "{:?}", said(&out));
    }

    /// Regression: an `updatedAt` in the future (2099) recorded as the entity's last change made
    /// every later change look stale, muting its alerts.
    #[test]
    fn a_future_updated_at_does_not_mute_later_changes() {
        let pipeline = pipeline();
        let mut states = HashMap::new();
        let mut seen = HashMap::new();
        judge(
            &pipeline,
            &snapshot(vec![entity("a", 60, "2099-01-01T00:00:00Z")]),
            &mut states,
            &mut seen,
            5,
        );
        let later = crate::clock::rfc3339_seconds(crate::clock::now_ms() + 1000);
        let out = judge(
            &pipeline,
            &snapshot(vec![entity("a", 95, &later)]),
            &mut states,
            &mut seen,
            6,
        );
        assert_eq!((out.compared, out.newer_live), (1, 0));
        assert_eq!(out.alerts.len(), 1, "{:?}", said(&out));
    }

    /// Regression (helper-127): an entity a snapshot listed twice (cursor paging over data
    /// that changes) was judged by its first copy, even when that one was older.
    #[test]
    fn regression_an_entity_listed_twice_was_judged_by_its_older_copy() {
        let pipeline = pipeline();
        let (mut states, mut seen) = (HashMap::new(), HashMap::new());
        let t = |s: u32| format!("2026-11-20T10:00:{s:02}Z");
        let calm = snapshot(vec![entity("a", 10, &t(0)), entity("b", 10, &t(0))]);
        judge(&pipeline, &calm, &mut states, &mut seen, 1);
        let twice = snapshot(vec![
            entity("a", 95, &t(1)),
            entity("b", 10, &t(1)),
            entity("a", 10, &t(5)),
            entity("b", 95, &t(5)),
        ]);
        let out = judge(&pipeline, &twice, &mut states, &mut seen, 2);
        let alerts = said(&out);
        assert!(
            alerts.iter().any(|a| a.ends_with(" b")) && !alerts.iter().any(|a| a.ends_with(" a")),
            "{alerts:?}"
        );
        assert_eq!(out.compared, 2);
    }

    #[test]
    fn port_times_read_as_port_writes_them() {
        assert_eq!(port_time_ms("1970-01-01T00:00:01.500Z"), Some(1_500));
        assert_eq!(port_time_ms("1970-01-01T00:01:00Z"), Some(60_000));
        assert_eq!(port_time_ms("yesterday"), None);
    }

    /// Regression (helper-127): a time with an offset other than `Z` (`+01:00`), or a
    /// lower-case `z`, did not parse, so it was not compared: an older change won over a
    /// newer one, and a stale snapshot fired.
    #[test]
    fn regression_a_time_with_an_offset_was_not_compared() {
        let utc = port_time_ms("2026-12-07T06:20:00Z");
        assert!(utc.is_some());
        for same in [
            "2026-12-07T07:20:00+01:00",
            "2026-12-07T05:20:00-01:00",
            "2026-12-07T06:20:00z",
            "2026-12-07T06:20:00+00:00",
            "2026-12-07T11:50:00+0530",
        ] {
            assert_eq!(port_time_ms(same), utc, "{same}");
        }
        assert_eq!(
            port_time_ms("2026-12-07T06:20:00.250+01:00"),
            utc.map(|ms| ms - 3_600_000 + 250)
        );
    }

    /// A catalog that answers from a script and tells the test when it was asked.
    struct Scripted {
        answers: Mutex<VecDeque<Result<Vec<Value>, ReconcileError>>>,
        asked: tokio::sync::mpsc::UnboundedSender<tokio::time::Instant>,
    }

    impl Catalog for Scripted {
        fn entities<'a>(
            &'a self,
            _blueprint: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Vec<Value>, ReconcileError>> {
            let _ = self.asked.send(tokio::time::Instant::now());
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Ok(vec![]));
            Box::pin(async move { answer })
        }
    }

    fn status(code: u16, retry_after: Option<Duration>) -> ReconcileError {
        ReconcileError::Status {
            blueprint: BP.into(),
            status: http::StatusCode::from_u16(code).unwrap(),
            retry_after,
            body: "{}".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_start_on_errors_with_backoff_every_interval_and_on_every_gap() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let gaps = Arc::new(Gaps::default());
        let health = Arc::new(crate::counters::Counters::default());
        let interval = Duration::from_secs(15 * 60);
        let t0 = tokio::time::Instant::now();
        let (task, cancel, mut asked) = spawn_reconciler(
            (&spool, &writer, &gaps, &health),
            vec![
                Err(status(500, None)),
                Err(status(429, Some(Duration::from_secs(7)))),
                Ok(vec![entity("a", 60, "2026-11-20T10:00:00Z")]),
            ],
            interval,
            false,
        );
        // At start (after waiting the grace for a first connection none reports); a 500 backs
        // off 1 to 2 s (jitter); a 429 waits what it asked.
        let first = asked.recv().await.unwrap();
        assert_eq!(first - t0, START_GRACE);
        let second = asked.recv().await.unwrap();
        assert!(
            (Duration::from_secs(1)..=Duration::from_secs(2)).contains(&(second - first)),
            "{:?}",
            second - first
        );
        // Regression (helper-117): failing, the reconciliation was only a log line; /healthz
        // says it now, until one goes through.
        let said = health.reconcile_line(crate::clock::now_ms());
        assert!(
            said.as_deref()
                .is_some_and(|s| s.starts_with("Port reconciliation failing for")),
            "{said:?}"
        );
        let third = asked.recv().await.unwrap();
        assert_eq!(third - second, Duration::from_secs(7));
        // Then every interval.
        let fourth = asked.recv().await.unwrap();
        assert_eq!(health.reconcile_line(crate::clock::now_ms()), None);
        assert_eq!(fourth - third, interval);
        // A gap (a channel reconnected) reconciles at once, whatever the interval says.
        tokio::time::sleep(Duration::from_secs(60)).await;
        gaps.report("http://x/Pipe…".into(), Some(1_000));
        let fifth = asked.recv().await.unwrap();
        assert_eq!(fifth - fourth, Duration::from_secs(60));

        cancel.cancel();
        task.await.unwrap();
        // What reached the spool: one snapshot per success, the first still saying "start"
        // (the failures kept their reason), the last "reconnect" since the channel dropped.
        let queued = spool.pending(PIPELINE_ROUTE, 0, 10).unwrap();
        let whys: Vec<Why> = queued
            .iter()
            .map(|q| {
                assert!(is_snapshot(&q.event));
                serde_json::from_slice::<Snapshot>(&q.event.event.body)
                    .unwrap()
                    .why
            })
            .collect();
        assert_eq!(whys.len(), 3, "{whys:?}");
        assert_eq!((whys[0].kind, whys[0].since_ms), (WhyKind::Start, None));
        assert_eq!(whys[1].kind, WhyKind::Interval);
        assert_eq!(
            (whys[2].kind, whys[2].since_ms),
            (WhyKind::Reconnect, Some(1_000))
        );
        assert!(
            alive_since(&spool).is_some(),
            "a clean stop records when the relay was last up"
        );

        // Regression (helper-120): restarted by a reload (new credentials), its first read
        // said "smee-relay was not receiving since" the reload, as a start would.
        let (task, cancel, mut asked) = spawn_reconciler(
            (&spool, &writer, &gaps, &health),
            vec![Ok(vec![entity("a", 60, "2026-11-20T10:00:00Z")])],
            interval,
            true,
        );
        asked.recv().await.unwrap();
        let queued = queued_at_least(&spool, 4).await;
        let why: Why = serde_json::from_slice::<Snapshot>(&queued[3].event.event.body)
            .unwrap()
            .why;
        assert_eq!(why.kind, WhyKind::Interval, "{why:?}");
        cancel.cancel();
        task.await.unwrap();
        drop(writer);
        thread.join().unwrap();
    }

    /// Regression: every start read Port twice (the start, then the first connection of the
    /// channel 30 ms later), and a reconnection called Port at once, through a 429's wait and
    /// the backoff.
    #[tokio::test(start_paused = true)]
    async fn reconnects_respect_the_429_wait_and_spacing_and_the_first_connection_folds_into_start()
    {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel();
        let catalog = Arc::new(Scripted {
            answers: Mutex::new(VecDeque::from([
                Ok(vec![entity("a", 60, "2026-11-20T10:00:00Z")]),
                Err(status(429, Some(Duration::from_secs(30)))),
            ])),
            asked: asked_tx,
        });
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline()));
        let gaps = Arc::new(Gaps::default());
        let health = Arc::new(crate::counters::Counters::default());
        let cancel = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            catalog,
            Duration::from_secs(15 * 60),
            MIN_GAP_SPACING,
            rules_rx,
            gaps.clone(),
            health.clone(),
            false,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(30)).await;
        gaps.report("http://x/Pipe…".into(), None);
        let first = asked.recv().await.unwrap();
        assert_eq!(first - t0, Duration::from_millis(30));
        // A reconnect right after: not before the spacing.
        tokio::time::sleep(Duration::from_secs(1)).await;
        gaps.report("http://x/Pipe…".into(), Some(5));
        let second = asked.recv().await.unwrap();
        assert_eq!(second - first, MIN_GAP_SPACING);
        // Port answered 429 (wait 30 s): a reconnect does not call before.
        gaps.report("http://x/Pipe…".into(), Some(6));
        let third = asked.recv().await.unwrap();
        assert_eq!(third - second, Duration::from_secs(30));
        cancel.cancel();
        task.await.unwrap();
        let queued = spool.pending(PIPELINE_ROUTE, 0, 10).unwrap();
        let whys: Vec<Why> = queued
            .iter()
            .map(|q| {
                serde_json::from_slice::<Snapshot>(&q.event.event.body)
                    .unwrap()
                    .why
            })
            .collect();
        assert_eq!(whys[0].kind, WhyKind::Start, "{whys:?}");
        assert_eq!(whys[0].channels, ["http://x/Pipe…"]);
        drop(writer);
        thread.join().unwrap();
    }

    /// A catalog that answers per blueprint: 404 for `Missing`.
    struct ByBlueprint;

    impl Catalog for ByBlueprint {
        fn entities<'a>(
            &'a self,
            blueprint: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Vec<Value>, ReconcileError>> {
            let answer = if blueprint == "Missing" {
                Err(ReconcileError::Status {
                    blueprint: blueprint.into(),
                    status: http::StatusCode::NOT_FOUND,
                    retry_after: None,
                    body: r#"{"error":"not_found"}"#.into(),
                })
            } else {
                Ok(vec![entity("a", 60, "2026-11-20T10:00:00Z")])
            };
            Box::pin(async move { answer })
        }
    }

    /// Regression: a blueprint Port does not have (404) failed the whole reconciliation, retried
    /// for ever as an outage; now it is skipped with an error and the others are reconciled.
    #[tokio::test]
    async fn a_blueprint_port_does_not_have_is_skipped_not_retried_as_an_outage() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let blueprints = BTreeSet::from(["Missing".to_string(), BP.to_string()]);
        let read = reconcile_once(
            &ByBlueprint,
            &writer,
            &pipeline(),
            &blueprints,
            &Why::default(),
        )
        .await
        .unwrap();
        assert_eq!(read, 1);
        let queued = spool.pending(PIPELINE_ROUTE, 0, 10).unwrap();
        assert_eq!(queued.len(), 1);
        let snapshot: Snapshot = serde_json::from_slice(&queued[0].event.event.body).unwrap();
        assert_eq!(snapshot.blueprint, BP);
        assert!(!status(500, None).is_configuration());
        assert!(!status(429, None).is_configuration());
        assert!(status(404, None).is_configuration());
        drop(writer);
        thread.join().unwrap();
    }

    /// A catalog that never answers (Port hanging until the call's timeout).
    struct Hanging;

    impl Catalog for Hanging {
        fn entities<'a>(
            &'a self,
            _blueprint: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Vec<Value>, ReconcileError>> {
            Box::pin(std::future::pending())
        }
    }

    /// Item: a stop waited for Port's answer (up to the call timeout, past the shutdown
    /// deadline); it no longer does, and still records when the relay was last up.
    #[tokio::test]
    async fn a_stop_does_not_wait_for_port() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path()).unwrap());
        let (writer, thread) = SpoolWriter::start(spool.clone(), Limits { max_bytes: 1 << 20 });
        let (_rules, rules_rx) = watch::channel(Arc::new(pipeline()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            Arc::new(Hanging),
            DEFAULT_INTERVAL,
            MIN_GAP_SPACING,
            rules_rx,
            Arc::new(Gaps::default()),
            Arc::default(),
            false,
            cancel.clone(),
        ));
        tokio::task::yield_now().await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stopped without waiting for Port")
            .unwrap();
        assert!(alive_since(&spool).is_some());
        drop(writer);
        thread.join().unwrap();
    }

    /// A reconciler on the spool (with its writer, gaps and health) whose calls to Port get
    /// `answers` in turn, judging for the test pipeline: its task, what stops it, and when it
    /// asked Port.
    fn spawn_reconciler(
        (spool, writer, gaps, health): (
            &Arc<Spool>,
            &SpoolWriter,
            &Arc<Gaps>,
            &Arc<crate::counters::Counters>,
        ),
        answers: Vec<Result<Vec<Value>, ReconcileError>>,
        interval: Duration,
        restarted: bool,
    ) -> (
        tokio::task::JoinHandle<()>,
        CancellationToken,
        tokio::sync::mpsc::UnboundedReceiver<tokio::time::Instant>,
    ) {
        let (asked_tx, asked) = tokio::sync::mpsc::unbounded_channel();
        let catalog = Arc::new(Scripted {
            answers: Mutex::new(VecDeque::from(answers)),
            asked: asked_tx,
        });
        // The reconciler only borrows the rules: they stay readable once the sender is gone.
        let (_, rules_rx) = watch::channel(Arc::new(pipeline()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            spool.clone(),
            writer.clone(),
            catalog,
            interval,
            MIN_GAP_SPACING,
            rules_rx,
            gaps.clone(),
            health.clone(),
            restarted,
            cancel.clone(),
        ));
        (task, cancel, asked)
    }

    /// The pipeline route's first `n` queued events, once there are `n` (the reconciler
    /// stores its snapshot after its read; time is paused, so the wait advances it).
    async fn queued_at_least(spool: &Spool, n: usize) -> Vec<crate::spool::Queued> {
        for _ in 0..1000 {
            let queued = spool.pending(PIPELINE_ROUTE, 0, 10).unwrap();
            if queued.len() >= n {
                return queued;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} snapshots queued");
    }

    /// Regression (helper-117): a channel that reconnected after a reconciliation said
    /// "disconnected since" the reconciliation's time (the interval's count, merged as the
    /// earlier start), not since it dropped.
    #[test]
    fn regression_a_reconnect_after_a_reconciliation_said_it_dropped_at_the_reconciliation() {
        let mut why = Why {
            kind: WhyKind::Interval,
            since_ms: Some(1_000),
            channels: Vec::new(),
        };
        why.merge(Why {
            kind: WhyKind::Reconnect,
            since_ms: Some(21_000),
            channels: vec!["http://x/A…".into()],
        });
        assert_eq!((why.kind, why.since_ms), (WhyKind::Reconnect, Some(21_000)));
        // Two reconnects: the earlier drop. A later interval changes nothing.
        why.merge(Why {
            kind: WhyKind::Reconnect,
            since_ms: Some(11_000),
            channels: vec!["http://x/B…".into()],
        });
        why.merge(Why {
            kind: WhyKind::Interval,
            since_ms: Some(500),
            channels: Vec::new(),
        });
        assert_eq!((why.kind, why.since_ms), (WhyKind::Reconnect, Some(11_000)));
        assert!(
            why.note(81_000)
                .contains("disconnected since 1970-01-01T00:00:11Z (1m 10s"),
            "{}",
            why.note(81_000)
        );
    }

    /// Every connection of a pipeline channel is a gap to close: the first one since the relay
    /// last stopped, each later one since its connection ended.
    #[tokio::test(start_paused = true)]
    async fn every_connection_of_a_channel_reports_a_gap_with_its_start() {
        let status = Arc::new(ChannelStatus::new(
            "http://x/Pipe…".into(),
            Duration::from_secs(90),
        ));
        let gaps = Arc::new(Gaps::default());
        let cancel = CancellationToken::new();
        // Connected before its watcher ran: still reported.
        status.set_connected(true);
        let watcher = tokio::spawn(watch_channel(status.clone(), gaps.clone(), cancel.clone()));
        let first = tokio::time::timeout(Duration::from_secs(60), gaps.next())
            .await
            .expect("the first connection is reported");
        assert_eq!(
            (first.kind, first.since_ms, first.channels.clone()),
            (WhyKind::Reconnect, None, vec!["http://x/Pipe…".to_string()])
        );
        status.set_connected(false);
        let dropped = status
            .disconnected_at_ms()
            .expect("the end of the connection is kept");
        status.set_connected(true);
        let second = gaps.next().await;
        assert_eq!(second.since_ms, Some(dropped));
        cancel.cancel();
        watcher.await.unwrap();
    }
}
