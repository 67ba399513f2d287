//! The Port pipeline: decode an entity change, diff it, evaluate rules with alert state, and
//! produce alerts.
//!
//! ```text
//! Event --verify--> --port::decode--> Change --rules::judge--> Verdict --state::step--> Alert
//!                                          \--diff--> what else changed (shown in the alert)
//! ```
//!
//! [`reconcile`] closes the gaps smee.io leaves: it reads Port's current entities back after a
//! gap and stores them as snapshots the runner judges like events (as UPDATEs from the stored
//! state). [`port_api`] is Port's API client, shared with the run reporter downstream.
//!
//! [`Pipeline::evaluate`] is pure apart from `when` conditions, which run in a bounded jq
//! worker process ([`jq::JqEngine`]): it takes an event, the current alert states and the time,
//! and returns the alerts to send and the states to store. It blocks while a `when` condition
//! runs (at most the jq time budget per rule), so callers run it off the async workers. The [`runner`] persists
//! both in one spool transaction, together with marking the event done, so an event delivered
//! twice never alerts twice and a restart neither re-alerts nor forgets.

pub mod diff;
pub mod jq;
pub mod port;
pub mod port_api;
pub mod reconcile;
pub mod rules;
pub mod runner;
pub mod signature;
pub mod state;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use port::{Action, Change};
use rules::{Rule, Verdict};
use signature::{SignatureError, Verifier};
use state::{Phase, Transition};

/// FIRING or RESOLVED.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

impl std::fmt::Display for AlertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AlertStatus::Firing => "FIRING",
            AlertStatus::Resolved => "RESOLVED",
        })
    }
}

/// One property change, as an alert shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShownChange {
    pub property: String,
    pub before: String,
    pub after: String,
}

/// Something to tell people: a rule started or stopped firing for an entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub status: AlertStatus,
    pub rule: String,
    pub severity: String,
    /// The entity identifier.
    pub entity: String,
    /// The entity title (or identifier).
    pub title: String,
    pub blueprint: Option<String>,
    /// The watched property and its values around the change, for property rules.
    pub property: Option<ShownChange>,
    /// The condition in words: `above 80 (clears below 70)`.
    pub threshold: String,
    /// The other properties that changed in the same event.
    pub other_changes: Vec<ShownChange>,
    /// `CREATE`, `UPDATE`, `DELETE`.
    pub action: String,
    pub triggered_by: Option<String>,
    pub triggered_at: Option<String>,
    /// The entity's page in Port.
    pub entity_url: Option<String>,
    /// Properties whose value is an http(s) URL (dashboards, error trackers...).
    pub links: Vec<(String, String)>,
    /// Why, when it is not the condition itself (e.g. "entity deleted", "held for 5m").
    pub note: Option<String>,
}

/// The route name the pipeline reads its events from.
pub const PIPELINE_ROUTE: &str = "pipeline";

/// The route alerts are queued on: the alert outbox, which `notify` delivers.
pub const ALERT_ROUTE: &str = "alerts";

impl Alert {
    /// The alert's one-line headline: `FIRING cpu-high: Notification Service Production`.
    pub fn headline(&self) -> String {
        // The title is Port's, anyone's who may edit the entity: no line breaks, no
        // reversed text in a header or a notification (helper-127).
        format!(
            "{} {}: {}",
            self.status,
            self.rule,
            crate::text::escape_control(&self.title)
        )
    }

    /// An alert as it travels through the spool: JSON in an event body.
    pub fn to_event(&self) -> Event {
        Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (
                    crate::event::ALERT_HEADER.into(),
                    format!("{} {}", self.rule, self.status),
                ),
            ],
            query: vec![],
            body: serde_json::to_vec(self)
                .expect("an alert serialises")
                .into(),
        }
    }
}

/// An alert state as stored: the phase, and for a pending alert the alert to send when the
/// hold is over (the event that started it may be long gone by then).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub phase: Phase,
    pub draft: Option<Alert>,
    /// The last alert sent, kept so a resolve can say what fired.
    pub fired: Option<Alert>,
}

/// Why `alert` (fired or held by `rule`) is no longer the rule's: it is on a blueprint the rule
/// no longer watches (its `blueprint` changed), so no change will resolve or fire it.
fn moved_away(rule: &Rule, alert: &Alert) -> Option<String> {
    match (&rule.blueprint, &alert.blueprint) {
        (Some(now), Some(was)) if now != was => {
            Some(format!("its rule now watches blueprint {now}, not {was}"))
        }
        _ => None,
    }
}

/// `draft` of a rule whose hold began with `held`: its property's value from before the hold
/// (helper-146: a change of another property during the hold made it read "cpuUtil 91 → 91"),
/// and who and when began it, with why it was sent (helper-157: a change during the hold, or
/// the start's reconciliation of an unchanged Port, became "Triggered", and a hold begun by
/// reconciliation lost its note).
fn since_hold(held: Option<&Alert>, mut draft: Alert) -> Alert {
    let Some(held) = held else {
        return draft;
    };
    if let (Some(began), Some(now)) = (held.property.as_ref(), draft.property.as_mut())
        && began.property == now.property
    {
        now.before = began.before.clone();
    }
    draft.triggered_by = held.triggered_by.clone();
    draft.triggered_at = held.triggered_at.clone();
    draft.note = held.note.clone();
    draft
}

/// Whether `draft`, held by `rule`, was judged under a condition the rule no longer has (a
/// reload changed it while the alert was held). It ends without firing when its time comes:
/// the value it holds may not meet the rule now (helper-138: 87 fired "above 80" under a rule
/// changed to above 90). The entity's next change is judged under the new condition (a change
/// to `for` alone applies to the held alert as it is).
fn stale_condition(rule: &Rule, draft: &Alert) -> bool {
    draft.threshold != rule.threshold()
}

/// The key of an alert state: rule and entity. Every key has the entity after its first
/// `<US>` (the cluster shards by it); what comes before starts with the rule's name.
pub fn state_key(rule: &str, entity: &str) -> String {
    format!("{rule}\u{1f}{entity}")
}

/// The key of `rule`'s state for `entity` of `blueprint`. An identifier is unique only within
/// its blueprint: a rule without `blueprint` watches them all, so its key names the blueprint
/// too (`rule<GS>blueprint<US>entity`). A rule with one needs not, and keeps [`state_key`].
fn rule_state_key(rule: &Rule, blueprint: Option<&str>, entity: &str) -> String {
    match (&rule.blueprint, blueprint) {
        (None, Some(blueprint)) => per_blueprint_key(&rule.name, blueprint, entity),
        _ => state_key(&rule.name, entity),
    }
}

/// The key of a rule without `blueprint` for `entity` of `blueprint`: `rule<GS>blueprint<US>entity`.
fn per_blueprint_key(rule: &str, blueprint: &str, entity: &str) -> String {
    state_key(&format!("{rule}\u{1d}{blueprint}"), entity)
}

/// Where `rule`'s state for `entity` of `blueprint` may be under the other form of key
/// ([`rule_state_key`]), to be taken over and moved by the entity's next change: a rule that
/// has no `blueprint` now may have a state stored before states were kept per blueprint, or
/// while it had one; a rule that has one now, a state stored while it had none (helper-138: a
/// rule given a blueprint forgot its FIRING alerts, which never resolved, and fired again).
fn other_state_key(rule: &Rule, blueprint: Option<&str>, entity: &str) -> Option<String> {
    match (&rule.blueprint, blueprint) {
        (None, Some(_)) => Some(state_key(&rule.name, entity)),
        (Some(_), Some(blueprint)) => Some(per_blueprint_key(&rule.name, blueprint, entity)),
        (_, None) => None,
    }
}

/// The rule's name in a state key.
fn rule_of(key: &str) -> &str {
    key.split(['\u{1d}', '\u{1f}']).next().unwrap_or("")
}

/// What the pipeline made of one event.
#[derive(Debug)]
pub enum Evaluation {
    /// Not a Port entity change: nothing to do (it is still forwarded).
    NotPort(String),
    /// JSON the parser cannot take (see [`port::NotPort::BeyondLimits`]): not judged, and said.
    Unreadable(String),
    /// The signature did not verify: never evaluated.
    Rejected(SignatureError),
    Evaluated {
        change: Box<Change>,
        alerts: Vec<Alert>,
        /// New states to store (only those that changed).
        states: BTreeMap<String, AlertState>,
        /// Rules that could not judge: (rule, entity, reason).
        skipped: Vec<(String, String, String)>,
        /// Rules whose jq condition failed for this event (an error, or a time, memory or
        /// recursion bound exceeded): (rule, entity, kind, reason). Their state is unchanged.
        failed: Vec<RuleFailure>,
    },
}

/// What the rules made of one change ([`Pipeline::judge`]).
#[derive(Debug)]
pub struct Judged {
    /// The change judged.
    pub change: Change,
    /// Alerts to send.
    pub alerts: Vec<Alert>,
    /// New states to store (only those that changed).
    pub states: BTreeMap<String, AlertState>,
    /// Rules that could not judge: (rule, entity, reason).
    pub skipped: Vec<(String, String, String)>,
    /// Rules whose jq condition failed.
    pub failed: Vec<RuleFailure>,
}

/// A rule whose evaluation failed for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleFailure {
    /// The rule's name (a metrics label: names are few and chosen by the operator).
    pub rule: String,
    /// The entity it failed on, for the log line.
    pub entity: String,
    /// A fixed word (`timeout`, `bound`, `error`, ...), used as a metrics label.
    pub kind: &'static str,
    /// What happened, in words.
    pub reason: String,
}

/// The compiled pipeline: rules, signature check, links.
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub rules: Vec<Rule>,
    pub verifier: Option<Verifier>,
    /// Base URL of the Port app, for entity links.
    pub app_url: String,
    /// Runs `when` conditions within their time and memory bounds.
    pub jq: jq::JqEngine,
    /// Record, for each judged event that carries a run id (an Automation's WEBHOOK), what
    /// came of it ([`runner::EventVerdict`]), in the commit that settles the event: the
    /// actions route reports exactly that to Port (`[port] report_automation_runs`). Off,
    /// nothing is recorded (nobody would read and remove it).
    pub record_verdicts: bool,
}

impl Pipeline {
    /// The event's signature, judged at `received_ms` (fine when no secret is configured).
    pub fn check_signature(&self, event: &Event, received_ms: u64) -> Result<(), SignatureError> {
        match &self.verifier {
            Some(verifier) => verifier.verify(
                event.header("x-port-signature"),
                event.header("x-port-timestamp"),
                &event.body,
                received_ms,
            ),
            None => Ok(()),
        }
    }

    /// Evaluate one event against the current states at `now_ms`. `received_ms` is when the
    /// event reached the channel: the signature's age is judged against it, not against now,
    /// so an event delayed by an outage, a backlog or a replay still verifies, while an old
    /// signed body posted afresh does not (see [`received_ms`]).
    pub fn evaluate(
        &self,
        event: &Event,
        current: &dyn Fn(&str) -> AlertState,
        now_ms: u64,
        received_ms: u64,
    ) -> Evaluation {
        if let Err(e) = self.check_signature(event, received_ms) {
            return Evaluation::Rejected(e);
        }
        let change = match port::decode(&event.body) {
            Ok(change) => change,
            Err(e @ (port::NotPort::BeyondLimits(_) | port::NotPort::TooLarge(_))) => {
                return Evaluation::Unreadable(e.to_string());
            }
            // With a client secret, only a body Port signed gets here: Port's own event, which
            // cannot be shrugged off as another sender's (helper-146: it was listed delivered).
            Err(e @ port::NotPort::NotJson(_)) if self.verifier.is_some() => {
                return Evaluation::Unreadable(format!("signed by Port, yet the {e}"));
            }
            Err(e) => return Evaluation::NotPort(e.to_string()),
        };
        if change.entity().is_none() {
            return Evaluation::NotPort("the change names no entity".into());
        }
        let judged = self.judge(change, current, now_ms);
        Evaluation::Evaluated {
            change: Box::new(judged.change),
            alerts: judged.alerts,
            states: judged.states,
            skipped: judged.skipped,
            failed: judged.failed,
        }
    }

    /// Judge one decoded change that names an entity (a live one, or one the reconciliation
    /// made from Port's current state) against the current states at `now_ms`.
    pub fn judge(
        &self,
        change: Change,
        current: &dyn Fn(&str) -> AlertState,
        now_ms: u64,
    ) -> Judged {
        let entity = change.entity().unwrap_or("").to_owned();
        let changed = diff::properties(&change);
        let mut alerts = Vec::new();
        let mut states = BTreeMap::new();
        let mut skipped = Vec::new();
        let mut failed = Vec::new();
        for rule in self.rules.iter().filter(|r| r.watches(&change)) {
            let key = rule_state_key(rule, change.blueprint(), &entity);
            let mut state = current(&key);
            let mut moved = false;
            if state == AlertState::default()
                && let Some(other) = other_state_key(rule, change.blueprint(), &entity)
            {
                let old = current(&other);
                // Its alert names the blueprint of this change (or none, as before alerts
                // named one): it is this entity's.
                let of = old.fired.as_ref().or(old.draft.as_ref());
                let ours = of
                    .and_then(|alert| alert.blueprint.as_deref())
                    .is_none_or(|blueprint| change.blueprint() == Some(blueprint));
                if old != AlertState::default() && ours {
                    state = old;
                    states.insert(other, AlertState::default());
                    moved = true;
                }
            }
            let draft = self.alert(rule, &change, &changed, AlertStatus::Firing);
            let (phase, transition) = if change.action == Action::Delete {
                state::entity_deleted(state.phase)
            } else {
                let verdict = rule.judge(&change, &self.jq);
                match &verdict {
                    Verdict::Skip(reason) => {
                        skipped.push((rule.name.clone(), entity.clone(), reason.clone()));
                    }
                    Verdict::Failed { kind, reason } => failed.push(RuleFailure {
                        rule: rule.name.clone(),
                        entity: entity.clone(),
                        kind,
                        reason: reason.clone(),
                    }),
                    _ => {}
                }
                state::step(state.phase, &verdict, rule.hold, now_ms)
            };
            let before = state.clone();
            let draft = match before.phase {
                Phase::Pending { .. } => since_hold(before.draft.as_ref(), draft),
                _ => draft,
            };
            state.phase = phase;
            match transition {
                Some(Transition::Fire) => {
                    state.fired = Some(draft.clone());
                    state.draft = None;
                    alerts.push(draft);
                }
                Some(Transition::Resolve) => {
                    let mut resolved = self.alert(rule, &change, &changed, AlertStatus::Resolved);
                    if change.action == Action::Delete {
                        resolved.note = Some("entity deleted".into());
                    }
                    state.fired = None;
                    alerts.push(resolved);
                }
                None => {
                    state.draft = matches!(phase, Phase::Pending { .. }).then_some(draft);
                }
            }
            if state != before || moved {
                states.insert(key, state);
            }
        }
        Judged {
            change,
            alerts,
            states,
            skipped,
            failed,
        }
    }

    /// The rule named `name`, if the config still has it.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.name == name)
    }

    /// The key of the state `alert` was judged under (its rule's, for its entity).
    pub fn alert_state_key(&self, alert: &Alert) -> String {
        match self.rule(&alert.rule) {
            Some(rule) => rule_state_key(rule, alert.blueprint.as_deref(), &alert.entity),
            None => state_key(&alert.rule, &alert.entity),
        }
    }

    /// Pending alerts whose hold is over at `now_ms`, and firing alerts of rules no longer in
    /// the config (a rule removed or renamed: otherwise open in Slack for ever): the alerts and
    /// their new states.
    pub fn mature<'a>(
        &self,
        states: impl Iterator<Item = (&'a String, &'a AlertState)>,
        now_ms: u64,
    ) -> Vec<(String, AlertState, Result<Alert, String>)> {
        // With when each became due (0: an orphan's RESOLVED), to send them in that order: the
        // states are a map, in no order (helper-138: five holds that ended together at a
        // restart reached Slack shuffled).
        let mut out = Vec::new();
        for (key, state) in states {
            let rule = rule_of(key);
            let rule = self.rule(rule);
            // A rule gone, or one that no longer watches the blueprint its alert is on: no
            // change of that entity will ever resolve the alert.
            let orphaned = match (rule, state.fired.as_ref().or(state.draft.as_ref())) {
                (None, _) => Some("its rule was removed from the config".to_string()),
                (Some(rule), Some(alert)) => moved_away(rule, alert),
                (Some(_), None) => None,
            };
            if let Some(note) = orphaned {
                if let (Phase::Firing { .. }, Some(fired)) = (state.phase, &state.fired) {
                    let mut resolved = fired.clone();
                    resolved.status = AlertStatus::Resolved;
                    resolved.note = Some(note);
                    out.push((0, key.clone(), AlertState::default(), Ok(resolved)));
                }
                continue;
            }
            let Some(rule) = rule else {
                continue;
            };
            if let (phase, Some(Transition::Fire)) = state::tick(state.phase, rule.hold, now_ms)
                && let Some(mut alert) = state.draft.clone()
            {
                let due = state::due_at(state.phase, rule.hold).unwrap_or(0);
                if stale_condition(rule, &alert) {
                    // Ended, not fired: a later reload putting the condition back must not
                    // fire it either (helper-139).
                    let why = format!(
                        "held alert {}: {} ends without firing: its rule's condition changed \
                         while it was held (judged {}, now {}); the entity's next change is \
                         judged under the new one",
                        alert.rule,
                        alert.entity,
                        alert.threshold,
                        rule.threshold()
                    );
                    out.push((due, key.clone(), AlertState::default(), Err(why)));
                    continue;
                }
                let held = format!("held for {}", humantime::format_duration(rule.hold));
                // Why the hold began, if not a live change ("found by reconciliation ...").
                alert.note = Some(match alert.note.take() {
                    Some(began) => format!("{held}; {began}"),
                    None => held,
                });
                let next = AlertState {
                    phase,
                    draft: None,
                    fired: Some(alert.clone()),
                };
                out.push((due, key.clone(), next, Ok(alert)));
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out.into_iter()
            .map(|(_, key, state, alert)| (key, state, alert))
            .collect()
    }

    /// The earliest time a pending alert is due, if any is pending.
    /// Whether `state` (under `key`) is a hold that came due only after Port's time of its
    /// entity's state in `times` (by subject, a snapshot's: [`reconcile::entity_times`]). That
    /// state stood when the hold came due: judged first, it fires the hold if its condition
    /// still holds and ends it if not.
    pub fn due_after(&self, key: &str, state: &AlertState, times: &HashMap<String, u64>) -> bool {
        let (Some(draft), Some(rule)) = (&state.draft, self.rule(rule_of(key))) else {
            return false;
        };
        let subject = reconcile::subject(draft.blueprint.as_deref().unwrap_or(""), &draft.entity);
        match (state::due_at(state.phase, rule.hold), times.get(&subject)) {
            (Some(due), Some(&changed)) => due > changed,
            _ => false,
        }
    }

    pub fn next_due<'a>(
        &self,
        states: impl Iterator<Item = (&'a String, &'a AlertState)>,
    ) -> Option<u64> {
        states
            // Without a draft a held state never fires ([`Pipeline::mature`]): counted due, it
            // kept the runner waking at once, forever (a state stored by hand or damaged).
            .filter(|(_, state)| state.draft.is_some())
            .filter_map(|(key, state)| {
                let rule = rule_of(key);
                let rule = self.rule(rule)?;
                // Never due: [`Pipeline::mature`] does not fire it (a wake at once, forever).
                if state
                    .draft
                    .as_ref()
                    .is_some_and(|d| moved_away(rule, d).is_some())
                {
                    return None;
                }
                state::due_at(state.phase, rule.hold)
            })
            .min()
    }

    fn alert(
        &self,
        rule: &Rule,
        change: &Change,
        changed: &[diff::PropertyChange],
        status: AlertStatus,
    ) -> Alert {
        let entity = change.entity().unwrap_or("").to_string();
        let shown = |c: &diff::PropertyChange| ShownChange {
            property: c.name.clone(),
            before: diff::show(c.before.as_ref()),
            after: diff::show(c.after.as_ref()),
        };
        let property = rule.property().map(|name| {
            changed
                .iter()
                .find(|c| c.name == name)
                .map(shown)
                .unwrap_or_else(|| {
                    let now = change.after.as_ref().and_then(|e| e.properties.get(name));
                    ShownChange {
                        property: name.to_string(),
                        before: diff::show(now),
                        after: diff::show(now),
                    }
                })
        });
        let snapshot = change.after.as_ref().or(change.before.as_ref());
        let links = snapshot
            .map(|e| {
                e.properties
                    .iter()
                    .filter_map(|(name, value)| match value {
                        Value::String(url)
                            if url.starts_with("https://") || url.starts_with("http://") =>
                        {
                            Some((name.clone(), url.clone()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let blueprint = change.blueprint().map(str::to_owned);
        let entity_url = blueprint.as_ref().map(|b| {
            format!(
                "{}/{b}Entity?identifier={}",
                self.app_url,
                url_escape(&entity)
            )
        });
        Alert {
            status,
            rule: rule.name.clone(),
            severity: rule.severity.clone(),
            title: change.title().unwrap_or(&entity).to_string(),
            entity,
            blueprint,
            property,
            threshold: rule.threshold(),
            // On deletion every property "changes" to nothing: listing them says nothing.
            other_changes: changed
                .iter()
                .filter(|_| change.action != Action::Delete)
                .filter(|c| Some(c.name.as_str()) != rule.property())
                .map(shown)
                .collect(),
            action: change.action.to_string(),
            triggered_by: change.trigger.by.user_id.clone(),
            triggered_at: change.trigger.at.clone(),
            entity_url,
            links,
            note: None,
        }
    }
}

/// When an event reached the channel, for the signature's age: the channel server's receive
/// time (the smee frame's `timestamp`), else when the relay stored it. Never the time of
/// evaluation: a backlog or a replay must not age a valid event out of its window. A frame
/// time after the relay stored the event (beyond a minute of clock skew) cannot be true and is
/// not used.
pub fn received_ms(event: &Event, stored_ms: u64) -> u64 {
    const SKEW_MS: u64 = 60_000;
    event
        .timestamp_ms
        .filter(|&t| t <= stored_ms.saturating_add(SKEW_MS))
        .unwrap_or(stored_ms)
}

fn url_escape(text: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", [("v", text)])
        .map(|u| u.query().unwrap_or("").trim_start_matches("v=").to_string())
        .unwrap_or_else(|_| text.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The rules of the fixtures' README.
    pub(crate) fn fixture_rules() -> Vec<Rule> {
        let config = crate::config::parse(
            &format!(
                "[[channel]]\nurl = \"http://127.0.0.1:1/c\"\npipeline = true\n{}",
                include_str!("../../tests/fixtures/port/rules.toml")
            ),
            "test",
            &|_| None,
        )
        .unwrap();
        config.rules
    }

    #[test]
    fn the_fixture_sequence_alerts_exactly_as_documented() {
        let pipeline = Pipeline {
            rules: fixture_rules(),
            verifier: None,
            app_url: "https://app.getport.io".into(),
            jq: jq::JqEngine::here(),
            record_verdicts: false,
        };
        for shape in ["legacy", "automation"] {
            let mut states: HashMap<String, AlertState> = HashMap::new();
            let mut sent = Vec::new();
            for (file, _) in crate::commands::demo::SEQUENCE {
                let path = format!(
                    "{}/tests/fixtures/port/deployment-config/{shape}/{file}.json",
                    env!("CARGO_MANIFEST_DIR")
                );
                let event = Event {
                    sse_id: None,
                    timestamp_ms: None,
                    headers: vec![],
                    query: vec![],
                    body: std::fs::read(path).unwrap().into(),
                };
                let current = |key: &str| states.get(key).cloned().unwrap_or_default();
                let Evaluation::Evaluated {
                    alerts,
                    states: new,
                    ..
                } = pipeline.evaluate(&event, &current, 1_000, 1_000)
                else {
                    panic!("{file} did not evaluate");
                };
                states.extend(new);
                for alert in alerts {
                    sent.push(format!("{file}: {} {}", alert.rule, alert.status));
                }
            }
            assert_eq!(
                sent,
                [
                    "02-cpu-25-to-87: cpu-high FIRING",
                    "04-health-healthy-to-degraded: unhealthy FIRING",
                    "06-cpu-75-to-60: cpu-high RESOLVED",
                    "07-health-degraded-to-healthy: unhealthy RESOLVED",
                    "08-cpu-60-to-95: cpu-high FIRING",
                    "09-delete: cpu-high RESOLVED",
                ],
                "{shape}"
            );
        }
    }

    fn event(body: &str) -> Event {
        Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: body.as_bytes().to_vec().into(),
        }
    }

    fn update(properties: &str) -> String {
        format!(
            r#"{{"action":"UPDATE","resourceType":"entity","context":{{"blueprint":"DeploymentConfig","entity":"svc"}},
               "diff":{{"before":{{"identifier":"svc","properties":{{}}}},"after":{{"identifier":"svc","title":"Svc","properties":{properties}}}}}}}"#
        )
    }

    /// A pipeline with `extra` (TOML `[[rule]]`s) as its rules, unsigned: the tests' one way
    /// to build one (also used by the runner's and reconciliation's tests).
    pub(crate) fn with_rules(extra: &str) -> Pipeline {
        let config = crate::config::parse(
            &format!("[[channel]]\nurl = \"http://127.0.0.1:1/c\"\npipeline = true\n{extra}"),
            "test",
            &|_| None,
        )
        .unwrap();
        Pipeline {
            rules: config.rules,
            verifier: None,
            app_url: "https://app.getport.io".into(),
            jq: jq::JqEngine::here(),
            record_verdicts: false,
        }
    }

    /// Evaluates `body` against `states` and applies the new states, as the runner does; the
    /// headlines of the alerts it sends.
    fn evaluate_into(
        pipeline: &Pipeline,
        states: &mut HashMap<String, AlertState>,
        body: &str,
    ) -> Vec<String> {
        let current = |k: &str| states.get(k).cloned().unwrap_or_default();
        let Evaluation::Evaluated {
            alerts,
            states: new,
            ..
        } = pipeline.evaluate(&event(body), &current, 1, 1)
        else {
            panic!("not evaluated: {body}")
        };
        for (key, state) in new {
            if state == AlertState::default() {
                states.remove(&key);
            } else {
                states.insert(key, state);
            }
        }
        alerts.iter().map(Alert::headline).collect()
    }

    /// Regression (an adversary's finding): a rule without `blueprint` kept one alert state per
    /// entity identifier, but identifiers are unique only within a blueprint: `svc` firing in
    /// one blueprint kept `svc` of another from ever alerting (and its recovery resolved the
    /// other's alert). A state stored the old way still counts, for the first blueprint that
    /// comes (the upgrade neither repeats an alert nor forgets one).
    #[test]
    fn regression_a_rule_without_blueprint_keeps_one_state_per_blueprint() {
        let pipeline = with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\n");
        let mut states: HashMap<String, AlertState> = HashMap::new();
        let evaluate = |states: &mut HashMap<String, AlertState>, blueprint: &str, cpu: u32| {
            let body =
                update(&format!(r#"{{"cpu":{cpu}}}"#)).replace("DeploymentConfig", blueprint);
            evaluate_into(&pipeline, states, &body)
        };
        assert_eq!(evaluate(&mut states, "Service", 90), ["FIRING hot: Svc"]);
        assert_eq!(
            evaluate(&mut states, "Cluster", 95),
            ["FIRING hot: Svc"],
            "another blueprint's svc"
        );
        assert_eq!(evaluate(&mut states, "Service", 50), ["RESOLVED hot: Svc"]);
        assert_eq!(
            evaluate(&mut states, "Cluster", 96),
            Vec::<String>::new(),
            "still firing"
        );
        assert_eq!(evaluate(&mut states, "Cluster", 40), ["RESOLVED hot: Svc"]);

        // A state stored before the fix, under the rule and identifier alone; the alert it
        // fired names its blueprint, so only that blueprint's entity takes it over (another's
        // fires and resolves on its own: a second adversary's finding).
        let mut fired_alert = None;
        evaluate(&mut states, "Service", 90);
        for (key, state) in states.drain() {
            if key.contains("Service") {
                fired_alert = state.fired;
            }
        }
        let fired = AlertState {
            phase: Phase::Firing { since_ms: 1 },
            fired: fired_alert,
            ..Default::default()
        };
        states.insert(state_key("hot", "svc"), fired);
        assert_eq!(evaluate(&mut states, "Cluster", 95), ["FIRING hot: Svc"]);
        assert!(states.contains_key(&state_key("hot", "svc")), "not taken");
        assert_eq!(
            evaluate(&mut states, "Service", 91),
            Vec::<String>::new(),
            "not fired again"
        );
        assert!(!states.contains_key(&state_key("hot", "svc")), "moved");
        assert_eq!(evaluate(&mut states, "Service", 10), ["RESOLVED hot: Svc"]);
    }

    /// Regression (helper-138): a rule firing without `blueprint`, given one (a reload or a
    /// restart), forgot its alert: the state stayed under the key of a rule without one, the
    /// recovery sent no RESOLVED, the next rise a second FIRING; and the state, orphaned, came
    /// back with a late RESOLVED once the blueprint was taken off again.
    #[test]
    fn regression_a_rule_given_a_blueprint_forgot_its_firing_alerts() {
        let without = with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\n");
        let with = with_rules(
            "[[rule]]\nname = \"hot\"\nblueprint = \"DeploymentConfig\"\nproperty = \"cpu\"\nabove = 80\n",
        );
        let mut states: HashMap<String, AlertState> = HashMap::new();
        let mut evaluate = |pipeline: &Pipeline, cpu: u32| {
            let body = update(&format!(r#"{{"cpu":{cpu}}}"#));
            let headlines = evaluate_into(pipeline, &mut states, &body);
            (headlines, states.len())
        };
        let none = Vec::<String>::new();
        assert_eq!(evaluate(&without, 95), (vec!["FIRING hot: Svc".into()], 1));
        assert_eq!(
            evaluate(&with, 96),
            (none.clone(), 1),
            "still firing, moved"
        );
        assert_eq!(evaluate(&with, 20), (vec!["RESOLVED hot: Svc".into()], 0));
        // And back: the rule's blueprint taken off.
        assert_eq!(evaluate(&with, 95), (vec!["FIRING hot: Svc".into()], 1));
        assert_eq!(
            evaluate(&without, 96),
            (none.clone(), 1),
            "still firing, moved"
        );
        assert_eq!(evaluate(&with, 97), (none, 1), "and back again");
        assert_eq!(
            evaluate(&without, 20),
            (vec!["RESOLVED hot: Svc".into()], 0)
        );
    }

    #[test]
    fn a_held_alert_fires_when_its_time_comes_unless_it_recovers() {
        let pipeline =
            with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\nfor = \"5m\"\n");
        let mut states: HashMap<String, AlertState> = HashMap::new();
        let t0 = 1_000_000;
        let evaluate = |states: &HashMap<String, AlertState>, body: &str, at: u64| {
            let current = |k: &str| states.get(k).cloned().unwrap_or_default();
            match pipeline.evaluate(&event(body), &current, at, at) {
                Evaluation::Evaluated { alerts, states, .. } => (alerts, states),
                other => panic!("{other:?}"),
            }
        };
        let (alerts, new) = evaluate(&states, &update(r#"{"cpu":90}"#), t0);
        assert!(alerts.is_empty(), "held, not sent");
        states.extend(new);
        assert_eq!(pipeline.next_due(states.iter()), Some(t0 + 300_000));
        assert!(pipeline.mature(states.iter(), t0 + 299_999).is_empty());
        let matured = pipeline.mature(states.iter(), t0 + 300_000);
        assert_eq!(matured.len(), 1);
        let fired = matured[0].2.as_ref().unwrap();
        assert_eq!(fired.status, AlertStatus::Firing);
        assert_eq!(fired.note.as_deref(), Some("held for 5m"));

        // Recovering within the hold sends nothing, ever.
        let (alerts, new) = evaluate(&states, &update(r#"{"cpu":50}"#), t0 + 60_000);
        assert!(alerts.is_empty());
        states.extend(new);
        assert!(pipeline.mature(states.iter(), t0 + 3_600_000).is_empty());
    }

    /// Regression (helper-120): a rule whose `blueprint` changed left its alerts on the old
    /// blueprint FIRING for ever (no change of theirs reaches the rule again), and a held one
    /// would have fired later. The FIRING one is resolved, the held one never fires nor wakes.
    #[test]
    fn regression_a_rule_moved_to_another_blueprint_left_its_alerts_open() {
        let on = |blueprint: &str| {
            with_rules(&format!(
                "[[rule]]\nname = \"hot\"\nblueprint = \"{blueprint}\"\nproperty = \"cpu\"\nabove = 80\n\
                 [[rule]]\nname = \"held\"\nblueprint = \"{blueprint}\"\nproperty = \"cpu\"\nabove = 80\nfor = \"5m\"\n"
            ))
        };
        let before = on("DeploymentConfig");
        let current = |_: &str| AlertState::default();
        let Evaluation::Evaluated { alerts, states, .. } =
            before.evaluate(&event(&update(r#"{"cpu":90}"#)), &current, 1, 1)
        else {
            panic!("evaluated");
        };
        assert_eq!(alerts.len(), 1, "hot fires, held waits");
        let states: HashMap<String, AlertState> = states.into_iter().collect();
        let after = on("Other");
        let matured = after.mature(states.iter(), 2);
        assert_eq!(matured.len(), 1, "{matured:?}");
        let (_, state, alert) = &matured[0];
        let alert = alert.as_ref().unwrap();
        assert_eq!(
            (alert.rule.as_str(), alert.status),
            ("hot", AlertStatus::Resolved)
        );
        assert_eq!(
            alert.note.as_deref(),
            Some("its rule now watches blueprint Other, not DeploymentConfig")
        );
        assert_eq!(*state, AlertState::default());
        assert!(
            after
                .mature(states.iter(), u64::MAX)
                .iter()
                .all(|m| m.2.as_ref().unwrap().rule != "held")
        );
        assert_eq!(after.next_due(states.iter()), None);
        // The same rules as before: nothing to resolve.
        assert!(before.mature(states.iter(), 2).is_empty());
    }

    /// Regression (helper-138): a held alert fired under the condition it was judged by
    /// before a reload changed it (87 "above 80", the rule now above 90); a change to `for`
    /// alone applies to it.
    #[test]
    fn regression_a_held_alert_fired_under_the_condition_a_reload_changed() {
        let rule = |above: u32, hold: &str| {
            with_rules(&format!(
                "[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = {above}\nfor = \"{hold}\"\n"
            ))
        };
        let current = |_: &str| AlertState::default();
        let Evaluation::Evaluated { alerts, states, .. } =
            rule(80, "5m").evaluate(&event(&update(r#"{"cpu":87}"#)), &current, 1, 1)
        else {
            panic!("evaluated");
        };
        assert!(alerts.is_empty(), "held");
        let states: HashMap<String, AlertState> = states.into_iter().collect();
        assert_eq!(rule(80, "1m").mature(states.iter(), 60_001).len(), 1);
        let changed = rule(90, "5m");
        assert!(
            changed.mature(states.iter(), 300_000).is_empty(),
            "not before its time"
        );
        let ended = changed.mature(states.iter(), 300_001);
        let [(_, state, Err(why))] = &ended[..] else {
            panic!("ended without firing: {ended:?}");
        };
        assert_eq!(*state, AlertState::default());
        assert!(
            why.contains("ends without firing") && why.contains("judged above 80"),
            "{why}"
        );
        // Its next change is judged under the new condition: 87 is not above 90 (had the
        // state been kept, a reload back to above 80 would have fired it: helper-139).
        let current = |k: &str| states.get(k).cloned().unwrap_or_default();
        let Evaluation::Evaluated { alerts, states, .. } =
            changed.evaluate(&event(&update(r#"{"cpu":88}"#)), &current, 2, 2)
        else {
            panic!("evaluated");
        };
        assert!(alerts.is_empty());
        assert_eq!(
            states.into_values().next().map(|s| s.phase),
            Some(Phase::Ok)
        );
    }

    /// Regression (helper-146): a held alert showed the last change during its hold: another
    /// property's change made it read "cpuUtil 91 → 91". It shows the watched property's value
    /// before the hold began, and its value now.
    #[test]
    fn regression_a_held_alert_showed_the_last_change_not_the_rise() {
        let pipeline =
            with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\nfor = \"5m\"\n");
        let change = |before: &str, after: &str| {
            update(after).replace(
                r#""before":{"identifier":"svc","properties":{}}"#,
                &format!(r#""before":{{"identifier":"svc","properties":{before}}}"#),
            )
        };
        let mut states = HashMap::new();
        let said = |states: &mut HashMap<String, AlertState>, body: &str| {
            evaluate_into(&pipeline, states, body)
        };
        assert!(said(&mut states, &change(r#"{"cpu":25}"#, r#"{"cpu":87}"#)).is_empty());
        assert!(
            said(
                &mut states,
                &change(r#"{"cpu":87,"h":1}"#, r#"{"cpu":91,"h":1}"#)
            )
            .is_empty()
        );
        assert!(
            said(
                &mut states,
                &change(r#"{"cpu":91,"h":1}"#, r#"{"cpu":91,"h":2}"#)
            )
            .is_empty()
        );
        let fired: Vec<Alert> = (pipeline.mature(states.iter(), u64::MAX).into_iter())
            .map(|(_, _, alert)| alert.unwrap())
            .collect();
        let property = fired[0].property.as_ref().unwrap();
        assert_eq!(
            (property.before.as_str(), property.after.as_str()),
            ("25", "91")
        );
    }

    /// Regression (helper-138): holds that ended together (a restart after they all ended)
    /// fired in the order of a hash map, not in the order they began.
    /// Regression (helper-157): a held alert said it was triggered by the last change during
    /// its hold (or by the start's reconciliation of an unchanged Port), not by the change that
    /// began it: "Triggered jane at 10:00:12" with "held for 30s", 18 s before it fired.
    #[test]
    fn regression_a_held_alert_named_the_last_change_as_its_trigger() {
        let pipeline =
            with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\nfor = \"30s\"\n");
        let by = |who: &str, at: &str, cpu: u32| {
            update(&format!(r#"{{"cpu":{cpu}}}"#)).replace(
                r#""action":"UPDATE","#,
                &format!(
                    r#""action":"UPDATE","trigger":{{"by":{{"userId":"{who}"}},"at":"{at}"}},"#
                ),
            )
        };
        let mut states = HashMap::new();
        let began = by("jane", "2026-12-08T10:00:00Z", 87);
        assert!(evaluate_into(&pipeline, &mut states, &began).is_empty());
        let later = by("bob", "2026-12-08T10:00:12Z", 91);
        assert!(evaluate_into(&pipeline, &mut states, &later).is_empty());
        let fired: Vec<Alert> = (pipeline.mature(states.iter(), u64::MAX).into_iter())
            .map(|(_, _, alert)| alert.unwrap())
            .collect();
        assert_eq!(fired[0].triggered_by.as_deref(), Some("jane"));
        assert_eq!(
            fired[0].triggered_at.as_deref(),
            Some("2026-12-08T10:00:00Z")
        );
        assert_eq!(fired[0].property.as_ref().unwrap().after, "91");
        assert_eq!(fired[0].note.as_deref(), Some("held for 30s"));
    }

    #[test]
    fn regression_holds_that_ended_together_fired_shuffled() {
        let pipeline =
            with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\nfor = \"5m\"\n");
        let mut states: HashMap<String, AlertState> = HashMap::new();
        for n in 0..20u64 {
            let body = update(r#"{"cpu":90}"#).replace("\"svc\"", &format!("\"svc{n:02}\""));
            let current = |_: &str| AlertState::default();
            let Evaluation::Evaluated { states: new, .. } =
                pipeline.evaluate(&event(&body), &current, 1000 - n * 10, 1)
            else {
                panic!("evaluated");
            };
            assert_eq!(new.len(), 1, "{body}");
            states.extend(new);
        }
        let fired: Vec<String> = (pipeline.mature(states.iter(), u64::MAX).into_iter())
            .map(|(_, _, alert)| alert.unwrap().entity)
            .collect();
        let began: Vec<String> = (0..20).rev().map(|n| format!("svc{n:02}")).collect();
        assert_eq!(fired, began);
    }

    /// A held state without its draft (stored by hand, or damaged) never fires, yet it was
    /// counted due: the runner's wait for it was zero, and it read the spool in a loop.
    #[test]
    fn regression_a_held_state_without_a_draft_was_always_due() {
        let pipeline =
            with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\nfor = \"5m\"\n");
        let bare = AlertState {
            phase: Phase::Pending { since_ms: 1 },
            ..Default::default()
        };
        let states: HashMap<String, AlertState> = [(state_key("hot", "e"), bare)].into();
        assert!(pipeline.mature(states.iter(), u64::MAX).is_empty());
        assert_eq!(pipeline.next_due(states.iter()), None);
    }

    #[test]
    fn jq_rules_and_unjudgeable_values() {
        let pipeline = with_rules(
            "[[rule]]\nname = \"locked\"\nwhen = '.properties.locked == true'\n[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\n",
        );
        let current = |_: &str| AlertState::default();
        let Evaluation::Evaluated {
            alerts, skipped, ..
        } = pipeline.evaluate(
            &event(&update(r#"{"locked":true,"cpu":"high"}"#)),
            &current,
            1,
            1,
        )
        else {
            panic!()
        };
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].rule, "locked");
        assert_eq!(alerts[0].threshold, "when .properties.locked == true");
        assert_eq!(
            skipped,
            [(
                "hot".to_string(),
                "svc".to_string(),
                r#"property cpu is not a number ("high")"#.to_string()
            )]
        );
        assert!(matches!(
            pipeline.evaluate(&event(r#"{"ref":"main"}"#), &current, 1, 1),
            Evaluation::NotPort(_)
        ));
    }

    /// Item: a signature's age was judged at evaluation, so a backlog or an outage longer than
    /// the tolerance rejected valid alerts for good. It is judged against the channel's receive
    /// time now; an old signed body posted afresh is still rejected.
    #[test]
    fn signature_age_is_judged_against_when_the_channel_received_the_event() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/port/signatures.json"))
                .unwrap();
        let pipeline = Pipeline {
            verifier: Some(Verifier::new(
                vectors["secret"].as_str().unwrap().into(),
                std::time::Duration::from_secs(300),
            )),
            ..with_rules("[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\n")
        };
        let current = |_: &str| AlertState::default();
        let days = 24 * 3_600_000;
        for v in vectors["files"].as_array().unwrap() {
            let path = format!(
                "{}/tests/fixtures/port/{}",
                env!("CARGO_MANIFEST_DIR"),
                v["file"].as_str().unwrap()
            );
            let signed_ms = v["x-port-timestamp"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1000;
            let signed = |timestamp_ms| Event {
                timestamp_ms,
                headers: vec![
                    (
                        "x-port-timestamp".into(),
                        v["x-port-timestamp"].as_str().unwrap().into(),
                    ),
                    (
                        "x-port-signature".into(),
                        v["x-port-signature"].as_str().unwrap().into(),
                    ),
                ],
                body: std::fs::read(&path).unwrap().into(),
                ..Event::default()
            };
            // Evaluated 10 days late (an outage, a backlog, a replay): the channel got it 2 s
            // after it was signed, so it verifies.
            let late = signed_ms + 10 * days;
            let event = signed(Some(signed_ms + 2_000));
            let at = received_ms(&event, late);
            assert!(
                !matches!(
                    pipeline.evaluate(&event, &current, late, at),
                    Evaluation::Rejected(_)
                ),
                "{v}"
            );
            // No frame timestamp: the spool's receive time stands in.
            let event = signed(None);
            let at = received_ms(&event, signed_ms + 1_000);
            assert!(
                !matches!(
                    pipeline.evaluate(&event, &current, late, at),
                    Evaluation::Rejected(_)
                ),
                "{v}"
            );
            // A frame time later than the relay stored it is not believed.
            let future = signed(Some(late));
            assert_eq!(received_ms(&future, signed_ms + 1_000), signed_ms + 1_000);
            // The same signed body posted to the channel afresh: the channel's timestamp is
            // now, far from x-port-timestamp.
            let event = signed(Some(late));
            let at = received_ms(&event, late);
            assert!(
                matches!(
                    pipeline.evaluate(&event, &current, late, at),
                    Evaluation::Rejected(SignatureError::OutsideWindow { .. })
                ),
                "{v}"
            );
        }
    }
}
