//! `smee-relay events`: what is in the spool, for people (a table) and scripts (JSON).

use std::fmt::Write as _;
use std::time::Duration;

use crate::spool::{self, DeliveryRecord, Row, StoredEvent};

/// `events list` as a table, one row per (event, route), oldest first.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:>9}  {:<9}  {:>8}  {:<28}  {:<22}  {:<20}  LAST",
        "ID", "RECEIVED", "STATUS", "ATTEMPTS", "TARGET", "CHANNEL", "KIND"
    );
    for row in rows {
        let last = match (&row.record.last_status, &row.record.last_error) {
            (_, Some(error)) => error.clone(),
            (Some(status), None) => status.to_string(),
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:>6}  {:>9}  {:<9}  {:>8}  {:<28}  {:<22}  {:<20}  {}",
            row.id,
            format!("{} ago", short_age(spool::age(row.received_ms))),
            format!("{:?}", row.record.status).to_lowercase(),
            row.record.attempts,
            row.route,
            row.channel,
            row.kind.as_deref().unwrap_or("-"),
            last
        );
    }
    out
}

/// `events show`: deliveries, then the request as it would be replayed.
pub fn show(event: &StoredEvent, records: &[(String, DeliveryRecord)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "event {}", event.id);
    let _ = writeln!(
        out,
        "received {} ago from {}",
        short_age(spool::age(event.received_ms)),
        event.channel
    );
    for (route, record) in records {
        let _ = writeln!(
            out,
            "  -> {route}: {:?}, {} attempts{}",
            record.status,
            record.attempts,
            record
                .last_error
                .as_deref()
                .map(|e| format!(", last: {e}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out);
    let query: Vec<String> = event
        .event
        .query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !query.is_empty() {
        let _ = writeln!(out, "query: {}", query.join("&"));
    }
    for (name, value) in &event.event.headers {
        let _ = writeln!(out, "{name}: {value}");
    }
    let _ = writeln!(out);
    out.push_str(&String::from_utf8_lossy(&event.event.body));
    out.push('\n');
    out
}

fn short_age(age: Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// `check --event`: the change, its diff, and what each rule would send for it, starting from
/// no alert (no stored state, no signature check: a file has no headers).
pub fn check_event(config: &crate::config::Config, body: &[u8]) -> String {
    use crate::pipeline::{Evaluation, Pipeline, diff, port};

    let mut out = String::new();
    let change = match port::decode(body) {
        Ok(change) => change,
        Err(e) => {
            return format!(
                "not a Port entity change: {e}\nthe pipeline would ignore it (it is still forwarded)\n"
            );
        }
    };
    let _ = writeln!(
        out,
        "change: {} {} {}/{} ({:?})",
        change.action,
        change.resource_type,
        change.blueprint().unwrap_or("-"),
        change.entity().unwrap_or("-"),
        change.title().unwrap_or("-")
    );
    for c in diff::properties(&change) {
        let _ = writeln!(
            out,
            "  {}: {} -> {}",
            c.name,
            diff::show(c.before.as_ref()),
            diff::show(c.after.as_ref())
        );
    }
    for rule in &config.rules {
        if !rule.watches(&change) {
            let _ = writeln!(out, "\nrule {}: does not watch this entity", rule.name);
            continue;
        }
        let one = Pipeline {
            rules: vec![rule.clone()],
            verifier: None,
            app_url: config.app_url.clone(),
        };
        let event = crate::event::Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: bytes::Bytes::copy_from_slice(body),
        };
        let _ = write!(out, "\nrule {}: ", rule.name);
        match one.evaluate(&event, &|_| Default::default(), spool::now_ms()) {
            Evaluation::Evaluated {
                alerts,
                skipped,
                states,
                ..
            } => {
                if let Some((_, _, reason)) = skipped.first() {
                    let _ = writeln!(out, "cannot judge: {reason}");
                } else if alerts.is_empty() && states.values().any(|s| s.draft.is_some()) {
                    let _ = writeln!(
                        out,
                        "would hold for {} before firing",
                        humantime::format_duration(rule.hold)
                    );
                } else if alerts.is_empty() {
                    let _ = writeln!(out, "condition does not hold: nothing to send");
                } else {
                    let _ = writeln!(out, "would send");
                    for alert in alerts {
                        out.push_str(&crate::notify::text(&alert));
                    }
                }
            }
            other => {
                let _ = writeln!(out, "{other:?}");
            }
        }
    }
    out
}
