//! `smee-relay events`: what is in the spool, for people (a table) and scripts (JSON).

use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::{EventsArgs, EventsCommand};
use crate::service::logging::escape_control;
use crate::spool::{self, DeliveryRecord, Replay, Row, Spool, StoredEvent};

/// Run one `events` subcommand against the spool in the state directory.
pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let dir = spool::lock::state_dir(args.state.state_dir.as_deref());
    let spool = Spool::open(&dir)?;
    match args.command {
        EventsCommand::List {
            status,
            limit,
            json,
        } => {
            let rows = spool.list(status, limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&rows));
                print!(
                    "{}",
                    crate::actions::runs_table(&crate::actions::stored_runs(&spool)?)
                );
            }
        }
        EventsCommand::Show { id } => {
            let (event, records) = spool.get(id)?;
            print!("{}", show(&event, &records));
        }
        EventsCommand::Replay { ids, dead, since } => {
            let which = match (dead, since) {
                (true, _) => Replay::Dead,
                (false, Some(since)) => Replay::ReceivedSince(
                    crate::clock::now_ms().saturating_sub(since.as_millis() as u64),
                ),
                (false, None) => Replay::Ids(ids),
            };
            let queued = spool.replay(which)?;
            println!("queued {queued} deliveries again");
        }
        EventsCommand::Purge { .. } => {
            let purged = spool.purge_dead()?;
            println!("purged {purged} dead letters");
        }
    }
    Ok(())
}

/// `events list` as a table, one row per (event, route), oldest first.
fn table(rows: &[Row]) -> String {
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
            // What a sender chose goes to a terminal: its control characters escaped.
            escape_control(row.kind.as_deref().unwrap_or("-")),
            escape_control(&last)
        );
    }
    out
}

/// `events show`: deliveries, then the request as it would be replayed.
fn show(event: &StoredEvent, records: &[(String, DeliveryRecord)]) -> String {
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
