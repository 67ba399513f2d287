//! `smee-relay events`: what is in the spool, for people (a table) and scripts (JSON).

use std::fmt::Write as _;
use std::time::Duration;

use crate::cli::{EventsArgs, EventsCommand};
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

/// `events list` as a table, one row per (event, route), oldest first. Columns are as wide as
/// their widest cell, so rows line up whatever the routes and errors are.
fn table(rows: &[Row]) -> String {
    const HEADER: [&str; 8] = [
        "ID", "RECEIVED", "STATUS", "ATTEMPTS", "TARGET", "CHANNEL", "KIND", "LAST",
    ];
    // Numbers read right-aligned; words left-aligned.
    const RIGHT: [bool; 8] = [true, true, false, true, false, false, false, false];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            let last = match (&row.record.last_status, &row.record.last_error) {
                (_, Some(error)) => error.clone(),
                (Some(status), None) => status.to_string(),
                (None, None) => "-".into(),
            };
            [
                row.id.to_string(),
                format!("{} ago", short_age(spool::age(row.received_ms))),
                format!("{:?}", row.record.status).to_lowercase(),
                row.record.attempts.to_string(),
                row.route.clone(),
                row.channel.clone(),
                row.kind.clone().unwrap_or_else(|| "-".into()),
                // One row per line, whatever the error said.
                last.replace(['\n', '\r'], " "),
            ]
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = HEADER.map(String::from);
    for row in std::iter::once(&header).chain(&cells) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if RIGHT[i] {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                // The last column needs no trailing spaces.
                if i + 1 < row.len() {
                    line.push_str(&pad);
                }
            }
        }
        let _ = writeln!(out, "{line}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Status;

    fn row(id: u64, route: &str, channel: &str, error: Option<&str>) -> Row {
        Row {
            id,
            received_ms: crate::clock::now_ms(),
            channel: channel.into(),
            route: route.into(),
            record: DeliveryRecord {
                status: Status::Pending,
                attempts: 12,
                last_status: Some(503),
                last_error: error.map(String::from),
                updated_ms: 0,
                seq: id,
            },
            kind: Some("x-github-event=push".into()),
        }
    }

    #[test]
    fn regression_events_table_columns_line_up_whatever_their_width() {
        let rows = [
            row(7, "http://127.0.0.1:3000/", "https://smee.io/AbCd…", None),
            row(
                123456,
                "https://a-much-longer-target.example.com:8443/webhooks/github",
                "http://127.0.0.1:3333/x/secr…",
                Some("connection refused\nsecond line"),
            ),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for column in ["TARGET", "CHANNEL", "KIND", "LAST"] {
            // In characters, as a terminal shows them (the redacted ids end in `…`).
            let at = lines[0][..lines[0].find(column).unwrap()].chars().count();
            for line in &lines[1..] {
                // Each cell starts where its header does, after two spaces.
                let chars: Vec<char> = line.chars().collect();
                assert_eq!(chars[at - 2..at], [' ', ' '], "{column}:\n{text}");
                assert_ne!(chars[at], ' ', "{column}:\n{text}");
            }
        }
        assert!(lines[2].ends_with("connection refused second line"));
    }
}
