//! `smee-relay events`: what is in the spool, for people (a table) and scripts (JSON); and
//! events taken out of it: exported to files (NDJSON, gosmee's layout) or replayed to another
//! URL. It reads the spool and changes it only through the spool's own `replay` and `purge`.
//!
//! In cluster mode (`[cluster]` in `--config`, or `--nats-url`; not with `--local`), `list`,
//! `show`, `replay` and `purge --dead` are the cluster's (see `cluster::inspect`): the same
//! answer from every instance. A cluster instance's spool says so ([`Spool::cluster`]): without
//! the cluster's settings, `events` refuses to re-queue or purge its local copies.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;

use crate::cli::{EventSelection, EventsArgs, EventsCommand, ExportFormat, ListStatus};
use crate::delivery::forward::{ForwardError, Forwarder};
use crate::spool::{self, DeliveryRecord, Replay, Row, Spool, Status, StoredEvent};
use crate::text::escape_control;
use crate::url::TargetUrl;

/// `print!` and `println!` that return the error instead of panicking, for `?`: `smee-relay
/// events export | head -1` closes stdout early, and the command then ends quietly (`main.rs`
/// takes a broken pipe on stdout, [`crate::error::Stdout`], for success).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*).and_then(|()| stdout.flush()).map_err(crate::error::Stdout)
    }};
}
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, $($arg)*).and_then(|()| stdout.flush()).map_err(crate::error::Stdout)
    }};
}

/// The routes whose messages the relay produces (in cluster mode published under
/// [`crate::cluster::produced_key`]): `replay --since` skips them.
const PRODUCED: [&str; 2] = [crate::pipeline::ALERT_ROUTE, crate::actions::REPORT_ROUTE];

/// The channels the relay's own messages are stored under in the local spool (alerts, Port
/// reports): never a received frame's, which is a URL.
const PRODUCED_CHANNELS: [&str; 2] = [
    crate::pipeline::PIPELINE_ROUTE,
    crate::actions::ACTIONS_ROUTE,
];

/// Run one `events` subcommand against the spool in the state directory, or in cluster mode
/// against the cluster.
pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    if args.local
        && matches!(args.command, EventsCommand::Replay { to: None, .. })
        && (args.nats_url.is_some() || config_cluster(&args)?.is_some())
    {
        // The local spool of a cluster instance holds copies of cluster deliveries (each
        // delivered, or handed back, through the cluster, which has its own record of them):
        // queued again locally, they would be delivered outside the cluster, beside whatever
        // the cluster delivers or replays.
        anyhow::bail!(
            "in cluster mode `events replay --local` is refused: this machine's spool holds copies of the cluster's deliveries, and re-queuing them locally would deliver them a second time, outside the cluster. Replay through the cluster instead (without --local: `smee-relay events replay ID...|--dead|--since`, ids from `smee-relay events list`), or add `--to URL` to POST this machine's copies somewhere now"
        );
    }
    if !args.local
        && let Some(settings) = cluster_settings(&args)?
    {
        let cluster = match crate::cluster::Cluster::open(settings).await {
            Ok(cluster) => cluster,
            Err(e @ crate::cluster::ClusterError::Connect(..)) => {
                return Err(anyhow::Error::new(e).context(
                    "cannot read the cluster's events (`--local` reads this machine's spool instead)",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        return run_cluster(&cluster, args.command).await;
    }
    // As `run` chooses it: the flag, else the config's `state_dir`, else the default.
    let (dir, from_config) = match (&args.state.state_dir, config_state_dir(&args)?) {
        (Some(flag), _) => (flag.clone(), false),
        (None, Some(file)) => (file, true),
        (None, None) => (spool::lock::state_dir(None), false),
    };
    // Opening creates a spool: a mistyped --state-dir would show an empty one and look like
    // "nothing queued".
    let file = dir.join(spool::FILE_NAME);
    if !Spool::exists(&dir)? {
        if from_config {
            anyhow::bail!(
                "no spool at {}: that is the `state_dir` of --config; has the relay run with this config yet (or does it run with another --state-dir)?",
                file.display()
            );
        }
        // helper-150: "give --state-dir" read oddly to someone who had given it.
        if args.state.state_dir.is_some() {
            anyhow::bail!(
                "no spool at {}: no relay has run with that state directory (--state-dir, or SMEE_RELAY_STATE_DIR): is it the relay's, as given to `forward` or `run`? Or give --config (the relay's config: its `state_dir`, and with `[cluster]` the cluster's events)",
                file.display()
            );
        }
        anyhow::bail!(
            "no spool at {}: give --state-dir (the relay's state directory, see `smee-relay forward --help`) or --config (the relay's config: its `state_dir`, and with `[cluster]` the cluster's events)",
            file.display()
        );
    }
    let spool = Spool::open_shared(&dir)?;
    if let Some(cluster) = spool.cluster()? {
        cluster_spool_guard(&cluster, &args)?;
    }
    match args.command {
        EventsCommand::List {
            status,
            limit,
            json,
        } => {
            let status = match status {
                None => None,
                Some(ListStatus::Pending) => Some(Status::Pending),
                Some(ListStatus::Delivered) => Some(Status::Delivered),
                Some(ListStatus::Dead) => Some(Status::Dead),
                Some(
                    other @ (ListStatus::InFlight | ListStatus::Replayed | ListStatus::Purged),
                ) => {
                    anyhow::bail!(
                        "--status {} is a cluster status (events list without --local, with [cluster] in --config); this machine's spool has pending, delivered and dead",
                        clap::ValueEnum::to_possible_value(&other)
                            .map_or_else(String::new, |v| v.get_name().to_string())
                    )
                }
            };
            let rows = spool.list(status, limit)?;
            if rows.len() >= limit {
                // Said, as the table starts past the first rows without a word otherwise.
                // By event, newest received first: a replay is a new delivery of an old event,
                // not a last one (helper-155 read "the last" as the newest deliveries).
                let shown = match limit {
                    1 => "the delivery of the newest event is shown".to_string(),
                    n => format!("{n} deliveries of the newest events are shown"),
                };
                eprintln!("note: {shown}; --limit N shows more");
            }
            if rows.is_empty() && !json {
                eprintln!("{}", nothing_listed(status.map(|s| s.name())));
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                out!("{}", table(&rows))?;
                out!(
                    "{}",
                    crate::actions::runs_table(&crate::actions::stored_runs(&spool)?)
                )?;
            }
        }
        EventsCommand::Show { id } => {
            let (event, records) = spool.get(id)?;
            out!("{}", show(&event, &records, Output::of_stdout()))?;
        }
        EventsCommand::Replay {
            which,
            to: Some(to),
            timeout,
        } => {
            let ids = select(&spool, &which)?;
            if ids.is_empty() && which.dead {
                eprintln!("{NO_DEAD_LETTERS}");
            }
            replay_to(&spool, &ids, to, timeout).await?;
        }
        EventsCommand::Export {
            which,
            all: _,
            format,
            dir,
            target,
        } => {
            // Nothing selected means everything.
            let ids = if which.ids.is_empty() && !which.dead && which.since.is_none() {
                all_ids(&spool)?
            } else {
                select(&spool, &which)?
            };
            let written = export(&spool, &ids, format, dir.as_deref(), &target)?;
            if let Some(dir) = dir {
                eprintln!(
                    "exported {} to {}",
                    super::count(written, "event", "events"),
                    dir.display()
                );
            }
        }
        EventsCommand::Replay {
            which, to: None, ..
        } => {
            let which = local_replay(&spool, which)?;
            let (named, dead) = match &which {
                Replay::Ids(ids) => (ids.len(), false),
                Replay::Dead => (0, true),
                Replay::ReceivedSince(_) => (0, false),
            };
            let routes = spool.replay_routes(which)?;
            let queued = routes.len();
            outln!(
                "queued {} again",
                super::count(queued, "delivery", "deliveries")
            )?;
            // Where each goes (helper-150: queued for a target the relay no longer had, and
            // nothing said which).
            let mut per_route: std::collections::BTreeMap<&str, usize> = Default::default();
            for route in &routes {
                *per_route.entry(route).or_default() += 1;
            }
            for (route, n) in per_route {
                let idle = route
                    .split_once(' ')
                    .is_some_and(|(key, _)| !spool::lock::channel_held(&dir, key));
                outln!(
                    "  {n} for {}{}",
                    spool::route_name(route),
                    if idle {
                        " (no relay runs its channel now: delivered when one starts)"
                    } else {
                        ""
                    }
                )?;
            }
            if queued == 0 && dead {
                eprintln!("{NO_DEAD_LETTERS}");
            } else if queued == 0 || queued < named {
                eprintln!(
                    "note: replay queues again only finished deliveries (delivered, or dead letters); a delivery still pending stays where it is in its queue (`smee-relay events list --status pending{}` shows them and their targets)",
                    spool::lock::state_dir_arg(&dir)
                );
            }
        }
        EventsCommand::Purge {
            queue: Some(queue), ..
        } => {
            let queue = queue_named(&spool, &queue)?;
            let (key, target) = queue.split_once(' ').expect("a queue's name");
            // Nothing to purge: said, and no lock file made for a name that is not a queue.
            if spool.queued(&queue)? == 0 {
                eprintln!(
                    "note: no delivery waits on that queue; purged nothing. Copy the name from the relay's line about the queue (a target's password is written `***` there, as the queue is named)"
                );
                return Ok(());
            }
            // Held while purging: no relay starts on this channel meanwhile.
            let _lock = spool::lock::ChannelLock::of_key(&dir, key).map_err(|e| match e {
                spool::SpoolError::Locked { pid, .. } => anyhow::anyhow!(
                    "a relay{} runs this queue's channel on {}: it may be delivering from the queue, and what it has read would go out all the same. Stop it, purge, and start it again",
                    pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                    dir.display()
                ),
                other => other.into(),
            })?;
            let purged = spool.purge_queue(&queue)?;
            outln!(
                "purged {} queued for {}",
                super::count(purged, "delivery", "deliveries"),
                spool::route_name(target)
            )?;
        }
        EventsCommand::Purge { queue: None, .. } => {
            let purged = spool.purge_dead()?;
            outln!(
                "purged {}",
                super::count(purged, "dead letter", "dead letters")
            )?;
        }
    }
    Ok(())
}

/// The queue `name` names: a queue's full name (the channel's key, a space, the target, as the
/// relay's line about the queue gives it), or a target alone when one queue of it holds
/// deliveries (`events list` shows targets, not channel keys).
fn queue_named(spool: &Spool, name: &str) -> anyhow::Result<String> {
    let full = name.split_once(' ').is_some_and(|(key, target)| {
        key.len() == 16
            && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && !target.is_empty()
    });
    let queues = spool.pending_queues()?;
    let (key, given) = match name.split_once(' ') {
        Some((key, target)) if full => (Some(key), target),
        _ => (None, name),
    };
    let queued = as_queued(given);
    let target = queued.trim_end_matches('/');
    // Said back without its password or query, as the relay's lines show a target.
    let shown = crate::text::escape_control(&crate::url::shown_text(given, false)).into_owned();
    let shown = match key {
        Some(key) => format!("'{key} {shown}'"),
        None => shown,
    };
    let of_target: Vec<&String> = queues
        .iter()
        .map(|(queue, _)| queue)
        .filter(|queue| key.is_none_or(|key| queue.split_once(' ').is_some_and(|(k, _)| k == key)))
        .filter(|queue| spool::route_target(queue).trim_end_matches('/') == target)
        .collect();
    match of_target[..] {
        [one] => Ok(one.clone()),
        [] => {
            let listed: Vec<String> = queues
                .iter()
                .map(|(queue, n)| {
                    format!(
                        "{} ({})",
                        queue_shown(queue),
                        super::count(*n as usize, "delivery", "deliveries")
                    )
                })
                .collect();
            // Copied from a line that left the query out, or with its placeholder kept.
            let copied = match (given.contains("?…"), given.starts_with("TARGET")) {
                (true, _) => {
                    " (`?…` stands for a query the log leaves out: write the target's query in its place)"
                }
                (_, true) => " (write the target, as configured, in place of TARGET)",
                _ => "",
            };
            anyhow::bail!(
                "no queue {} holds deliveries{copied}; {}{}",
                match key {
                    Some(_) => format!("named {shown}"),
                    None => format!("of {shown}"),
                },
                match listed.is_empty() {
                    // helper-150: "...; no queue does" read as a stammer.
                    true => "nothing waits in any queue: there is nothing to purge".to_string(),
                    false => format!("these do: {}", listed.join(", ")),
                },
                query_note(queues.iter().map(|(queue, _)| queue))
            )
        }
        _ => anyhow::bail!(
            "{} is the target of {} queues (one per channel): give the queue's whole name, quoted: {}{}",
            shown,
            of_target.len(),
            of_target
                .iter()
                .map(|q| queue_shown(q))
                .collect::<Vec<_>>()
                .join(" or "),
            query_note(of_target.iter().copied())
        ),
    }
}

/// A queue's whole name as `purge` says it, quoted: its target's query left out (`?…`), as the
/// relay's lines show it, since a query often carries a token (`events list` shows it whole).
fn queue_shown(queue: &str) -> String {
    match queue.split_once(' ') {
        Some((key, _)) => format!("'{key} {}'", spool::route_name(queue)),
        None => format!("'{queue}'"),
    }
}

/// What to write for a query [`queue_shown`] left out, if it left one out of `queues`.
fn query_note<'a>(mut queues: impl Iterator<Item = &'a String>) -> &'static str {
    match queues.any(|queue| spool::route_target(queue).contains('?')) {
        true => {
            " (a target's query shows as `?…`: write the target as configured in its place; `events list` shows targets whole)"
        }
        false => "",
    }
}

/// `target` as a queue's name holds it: its password written `***` (the relay names queues as
/// it shows targets), so the target as given in the relay's config names its queue too. Text
/// that is not a target stays as it is (to be said unknown).
fn as_queued(target: &str) -> String {
    match target.parse::<crate::url::TargetUrl>() {
        Ok(parsed) => parsed.to_string(),
        Err(_) => target.to_string(),
    }
}

/// This machine's spool is a cluster instance's (`cluster`, recorded by the relay at start):
/// what `events` may do with it without the cluster. Its ids are local (the same number is
/// another event in the cluster), and its deliveries are copies of the cluster's: queued again
/// here they would be delivered outside the cluster, and forgetting its dead letters leaves the
/// cluster's (which `--dead` replays) as they are.
fn cluster_spool_guard(cluster: &str, args: &EventsArgs) -> anyhow::Result<()> {
    // With --local and [cluster] given, the refusal above has said it already.
    match &args.command {
        EventsCommand::Replay { to: None, .. } => anyhow::bail!(
            "this spool belongs to an instance of cluster {cluster}: its ids are this machine's local copies of the cluster's deliveries, and `events replay` without --to would re-queue them here, delivering them outside the cluster. Replay through the cluster with --config (the relay's config, with [cluster]; ids from `smee-relay events list --config FILE`), or POST this machine's copies elsewhere with `--local --to URL`"
        ),
        EventsCommand::Purge { queue: Some(_), .. } => anyhow::bail!(
            "this spool belongs to an instance of cluster {cluster}: its queues hold this machine's copies of the cluster's deliveries, and the cluster would take a purged one for delivered. `events purge --queue` is for a relay's own queues"
        ),
        EventsCommand::Purge { queue: None, .. } if !args.local => anyhow::bail!(
            "this spool belongs to an instance of cluster {cluster}: its dead letters are this machine's copies, and the cluster's own (which `replay --dead` replays) would stay. Purge the cluster's with --config (the relay's config, with [cluster]), or add --local to forget only this machine's copies"
        ),
        EventsCommand::List { .. } | EventsCommand::Show { .. } if !args.local => eprintln!(
            "note: these are this instance's local ids in cluster {cluster} (not the cluster's); --config with the relay's config shows the cluster's view"
        ),
        _ => {}
    }
    Ok(())
}

/// `state_dir` of `--config`, if it names one. Only that key and `[cluster]` are read: the rest
/// of the file, and the secrets it names, are left alone.
fn config_state_dir(args: &EventsArgs) -> anyhow::Result<Option<std::path::PathBuf>> {
    /// The one key wanted; the others are left unread.
    #[derive(serde::Deserialize)]
    struct StateDirOnly {
        state_dir: Option<std::path::PathBuf>,
    }
    let Some(path) = &args.config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let file: StateDirOnly = toml::from_str(&text).map_err(|e| {
        let problem = crate::config::toml_problem(&path.display().to_string(), &text, &e);
        anyhow::anyhow!("not a valid config: {problem}")
    })?;
    Ok(file.state_dir.map(|dir| crate::config::beside(path, dir)))
}

/// `[cluster]` from `--config`, with `--nats-url` on top (alone, it names cluster `default`,
/// as for `run`).
fn cluster_settings(args: &EventsArgs) -> anyhow::Result<Option<crate::cluster::Settings>> {
    let file = config_cluster(args)?;
    let settings = crate::config::cluster_with_flag(args.nats_url.as_ref(), file)
        .map_err(|e| anyhow::anyhow!("{e}; --local shows this machine's spool instead"))?;
    Ok(settings.map(|mut settings| {
        if let Some(name) = &args.cluster {
            settings.name = name.clone();
        }
        settings
    }))
}

/// `[cluster]` of `--config`, if it has one (its URL may be empty: `nats_url_env` unset, and
/// `--nats-url` given).
fn config_cluster(args: &EventsArgs) -> anyhow::Result<Option<crate::cluster::Settings>> {
    let Some(path) = &args.config else {
        return Ok(None);
    };
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    Ok(crate::config::load_cluster(
        path,
        &|name| super::secret(name, credentials.as_deref()),
        args.nats_url.is_some(),
    )?)
}

/// One `events` subcommand against the cluster.
async fn run_cluster(
    cluster: &crate::cluster::Cluster,
    command: EventsCommand,
) -> anyhow::Result<()> {
    use crate::cluster::inspect::Which;
    let name = cluster.settings().name.clone();
    match command {
        EventsCommand::List {
            status,
            limit,
            json,
        } => {
            use crate::cluster::inspect::Filter;
            let status_name = status.and_then(|s| {
                clap::ValueEnum::to_possible_value(&s).map(|v| v.get_name().to_string())
            });
            let status = status.map(|status| match status {
                ListStatus::Pending => Filter::Pending,
                ListStatus::InFlight => Filter::InFlight,
                ListStatus::Delivered => Filter::Delivered,
                ListStatus::Dead => Filter::Dead,
                ListStatus::Replayed => Filter::Replayed,
                ListStatus::Purged => Filter::Purged,
            });
            let rows = cluster.list(status, limit).await?;
            if rows.is_empty() && !json {
                eprintln!("{}", nothing_listed(status_name.as_deref()));
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                out!("{}", cluster_table(&rows))?;
            }
        }
        EventsCommand::Show { id } => {
            let (event, rows) = cluster.show(id).await?;
            out!("{}", show_cluster(&event, &rows))?;
        }
        EventsCommand::Replay {
            which: EventSelection { ids, dead, since },
            to: None,
            ..
        } => {
            let which = match (dead, since) {
                (true, _) => Which::Dead,
                (false, Some(since)) => Which::ReceivedSince {
                    since_ms: crate::clock::now_ms().saturating_sub(since.as_millis() as u64),
                    produced: PRODUCED.iter().map(|r| r.to_string()).collect(),
                },
                (false, None) => Which::Ids(ids),
            };
            let done = cluster.replay(which).await?;
            outln!(
                "queued {} again (cluster {name})",
                super::count(done.queued, "delivery", "deliveries")
            )?;
            if done.gone > 0 {
                outln!(
                    "left {}: the stream no longer holds their event (it expired, or the stream \
                     was created anew); they cannot be replayed, and `smee-relay events purge \
                     --dead` forgets them",
                    super::count(done.gone, "dead letter", "dead letters")
                )?;
            }
        }
        EventsCommand::Purge { queue: Some(_), .. } => {
            anyhow::bail!(
                "in cluster mode, `events purge --queue` is refused: this machine's queues hold copies of the cluster's deliveries"
            );
        }
        EventsCommand::Purge { .. } => {
            let done = cluster.purge_dead().await?;
            outln!(
                "purged {} (cluster {name})",
                super::count(done.purged, "dead letter", "dead letters")
            )?;
            if done.forgotten > 0 {
                outln!(
                    "forgot {} whose event the stream no longer holds",
                    super::count(done.forgotten, "dead letter", "dead letters")
                )?;
            }
        }
        EventsCommand::Replay { to: Some(_), .. } | EventsCommand::Export { .. } => {
            anyhow::bail!(
                "in cluster mode, `events replay --to` and `events export` read this machine's spool: add --local (its ids are the local ones `events list --local` shows)"
            );
        }
    }
    Ok(())
}

/// `events list` in cluster mode, laid out as the local table.
fn cluster_table(rows: &[crate::cluster::inspect::Row]) -> String {
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            [
                row.id.to_string(),
                format!("{} ago", short_age(spool::age(row.received_ms))),
                state_name(row.status).to_string(),
                row.attempts.map_or("-".into(), |a| a.to_string()),
                row.route.clone(),
                row.channel.clone(),
                escape_control(row.kind.as_deref().unwrap_or("-")).into_owned(),
                escape_control(&cluster_last(row)).into_owned(),
            ]
        })
        .collect();
    layout(&cells)
}

fn state_name(state: crate::cluster::inspect::State) -> &'static str {
    use crate::cluster::inspect::State;
    match state {
        State::Pending => "pending",
        State::InFlight => "in-flight",
        State::Delivered => "delivered",
        State::Dead => "dead",
        State::Replayed => "replayed",
        State::Purged => "dead (purged)",
    }
}

/// The LAST cell of a cluster row: why it is dead, and what it replays or was replayed as.
fn cluster_last(row: &crate::cluster::inspect::Row) -> String {
    let mut parts = Vec::new();
    if let Some(of) = row.replay_of {
        parts.push(format!("replay of {of}"));
    }
    match (&row.last_error, row.last_status) {
        (Some(error), _) if !error.is_empty() => parts.push(error.clone()),
        (_, Some(status)) => parts.push(status.to_string()),
        _ => {}
    }
    match row.replayed_as {
        Some(0) => parts.push("being replayed".into()),
        Some(seq) => parts.push(format!("replayed as {seq}")),
        None => {}
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

/// `events show` in cluster mode.
fn show_cluster(
    event: &crate::cluster::inspect::ClusterEvent,
    rows: &[crate::cluster::inspect::Row],
) -> String {
    let stored = StoredEvent {
        id: event.seq,
        received_ms: event.received_ms,
        channel: event.channel.clone(),
        event: event.event.clone(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "event {} (cluster stream sequence)", event.seq);
    let _ = writeln!(
        out,
        "received {} ago from {}",
        short_age(spool::age(event.received_ms)),
        event.channel
    );
    for row in rows {
        let _ = writeln!(
            out,
            "  -> {}: {}{}",
            row.route,
            state_name(row.status),
            match cluster_last(row).as_str() {
                "-" => String::new(),
                last => format!(", {}", escape_control(last)),
            }
        );
    }
    // The request, as the local `show` prints it.
    let request = show(&stored, &[], Output::of_stdout());
    let request = request.split_once('\n').map_or("", |(_, rest)| rest);
    let request = request.split_once('\n').map_or("", |(_, rest)| rest);
    out.push_str(request);
    out
}

/// `events replay --dead`, with or without `--to`, when there are none.
const NO_DEAD_LETTERS: &str = "note: there are no dead letters to replay";

/// What an empty `events list` says beside its bare header (helper-121: a header alone read
/// as if something had gone wrong).
fn nothing_listed(status: Option<&str>) -> String {
    match status {
        Some(status) => format!("note: no delivery is {status}"),
        None => "note: the spool holds no events".into(),
    }
}

/// What `events replay` without `--to` re-queues in this machine's spool. `--since` picks the
/// frames received in the window, not what the relay produced (as in cluster mode), each on
/// every route done with it.
fn local_replay(spool: &Spool, which: EventSelection) -> anyhow::Result<Replay> {
    Ok(match (which.dead, which.since) {
        (true, _) => Replay::Dead,
        (false, Some(_)) => Replay::Ids(select(spool, &which)?),
        (false, None) => Replay::Ids(which.ids),
    })
}

/// The ids of every event in the spool, oldest first.
fn all_ids(spool: &Spool) -> anyhow::Result<Vec<u64>> {
    let mut ids: Vec<u64> = spool.list(None, usize::MAX)?.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The event ids a selection names, oldest first, each once.
fn select(spool: &Spool, which: &EventSelection) -> anyhow::Result<Vec<u64>> {
    let mut ids = which.ids.clone();
    if which.dead || which.since.is_some() {
        let status = which.dead.then_some(Status::Dead);
        let since = which
            .since
            .map(|since| crate::clock::now_ms().saturating_sub(since.as_millis() as u64));
        ids.extend(
            spool
                .list(status, usize::MAX)?
                .iter()
                // `--since` picks received frames: never what the relay produced (alerts,
                // Port reports), which would re-alert. Their ids pick them.
                .filter(|row| {
                    since.is_none_or(|since| {
                        row.received_ms >= since
                            && !PRODUCED_CHANNELS.contains(&row.channel.as_str())
                    })
                })
                .map(|row| row.id),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// POST each event to `to` now, in order, and say how each went. A failure does not stop the
/// rest; it makes the command fail at the end.
async fn replay_to(
    spool: &Spool,
    ids: &[u64],
    to: TargetUrl,
    timeout: Duration,
) -> anyhow::Result<()> {
    let forwarder =
        Forwarder::new(to.clone(), timeout).context("cannot build the HTTP client for --to")?;
    // Drawn only on a terminal (indicatif hides it otherwise), and only when it helps.
    let progress = if ids.len() > 1 {
        indicatif::ProgressBar::new(ids.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // Each line above the bar on a terminal; plain lines otherwise (a hidden bar prints nothing).
    let say = |line: String| {
        if progress.is_hidden() {
            // A closed stdout does not stop the replay: the POSTs are what was asked for.
            let _ = outln!("{line}");
        } else {
            progress.println(line);
        }
    };
    // A new delivery id for every replay, so a target that drops repeats takes this one.
    let run = crate::clock::now_ms();
    let mut failed = Failed::default();
    for &id in ids {
        // An id typed that was never stored, or an event pruned since it was selected (the
        // relay prunes while a long replay runs): the rest still go, and the summary counts it.
        let event = match spool.get(id) {
            Ok((event, _)) => event,
            Err(spool::SpoolError::NoSuchEvent(_) | spool::SpoolError::NotYet { .. }) => {
                failed.gone += 1;
                say(format!(
                    "event {id}: not in the spool (pruned since it was selected, or no such id)"
                ));
                progress.inc(1);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let delivery = format!("replay-{id}-{run}");
        match forwarder
            .deliver(&event.event, &[("x-smee-relay-delivery", &delivery)])
            .await
        {
            Ok(done) => say(format!(
                "event {id}: POST {} -> {}",
                to.path(),
                done.status.as_u16()
            )),
            Err(e) => {
                failed.count(&e);
                say(format!(
                    "event {id}: POST {} failed: {}",
                    to.path(),
                    crate::error::chain(&e)
                ));
            }
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    outln!(
        "replayed {} of {} to {}",
        ids.len() - failed.total(),
        super::count(ids.len(), "event", "events"),
        to.shown()
    )?;
    if failed.total() > 0 {
        anyhow::bail!("{}", failed.say(ids.len(), &to));
    }
    Ok(())
}

/// The POSTs of `events replay --to` that failed, by whose doing: a target that answered no
/// is not one that was never reached, nor an event that cannot be sent at all.
#[derive(Debug, Default)]
struct Failed {
    /// Answered, but not with 2xx.
    refused: usize,
    /// Not reached, or no answer in time.
    unreached: usize,
    /// Never sent: the event cannot be made into a request.
    unsendable: usize,
    /// Never sent: not in the spool (an id that was never stored, or pruned meanwhile).
    gone: usize,
}

impl Failed {
    fn count(&mut self, error: &ForwardError) {
        match error {
            ForwardError::Status { .. } | ForwardError::Refused(_) => self.refused += 1,
            ForwardError::Timeout(_) | ForwardError::Connection(_) => self.unreached += 1,
            ForwardError::Request(_) => self.unsendable += 1,
        }
    }

    fn total(&self) -> usize {
        self.refused + self.unreached + self.unsendable + self.gone
    }

    /// The command's error: of `of` events, what failed and why (each has its line above).
    fn say(&self, of: usize, to: &TargetUrl) -> String {
        let mut parts = Vec::new();
        if self.refused > 0 {
            parts.push(format!("{} answered with an error status", self.refused));
        }
        if self.unreached > 0 {
            parts.push(format!(
                "{} got no answer (not reached, the connection broke, or no answer within \
                 --timeout)",
                self.unreached
            ));
        }
        if self.unsendable > 0 {
            parts.push(format!(
                "{} never sent: the event cannot be made into a request as it is",
                self.unsendable
            ));
        }
        if self.gone > 0 {
            parts.push(format!(
                "{} not in the spool (`events list` shows what it holds)",
                self.gone
            ));
        }
        format!(
            "{} of {} not replayed to {}: {} (each event's line above says why)",
            self.total(),
            super::count(of, "event", "events"),
            to.shown(),
            parts.join("; ")
        )
    }
}

/// Write the events out; returns how many.
fn export(
    spool: &Spool,
    ids: &[u64],
    format: ExportFormat,
    dir: Option<&Path>,
    target: &TargetUrl,
) -> anyhow::Result<usize> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut ndjson: Box<dyn std::io::Write> = match (format, dir) {
        (ExportFormat::Ndjson, Some(dir)) => {
            let path = dir.join("events.ndjson");
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            ))
        }
        _ => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    // Writes to stdout fail as such (a closed pipe ends the command quietly); to a file, as
    // they are.
    let written = |e: std::io::Error| -> anyhow::Error {
        match dir {
            None => crate::error::Stdout(e).into(),
            Some(_) => e.into(),
        }
    };
    for &id in ids {
        let (event, _) = spool.get(id)?;
        match (format, dir) {
            (ExportFormat::Gosmee, Some(dir)) => spool::export::write_gosmee(
                dir,
                &event,
                target,
                "smee-relay events export --format gosmee",
            )?,
            _ => {
                // As an io::Error: a closed stdout (`| head -1`) must show as a broken pipe.
                serde_json::to_writer(&mut ndjson, &ndjson_line(&event))
                    .map_err(|e| written(e.into()))?;
                ndjson.write_all(b"\n").map_err(written)?;
            }
        }
    }
    ndjson.flush().map_err(written)?;
    Ok(ids.len())
}

/// One event as an NDJSON line: the body as text when it is UTF-8, else as base64.
fn ndjson_line(event: &StoredEvent) -> serde_json::Value {
    let body = &event.event.body;
    let mut line = serde_json::json!({
        "id": event.id,
        "received": spool::export::rfc3339(event.received_ms),
        "channel": event.channel,
        "headers": event.event.headers,
        "query": event.event.query,
    });
    match std::str::from_utf8(body) {
        Ok(text) => line["body"] = text.into(),
        Err(_) => {
            line["body_base64"] = base64::engine::general_purpose::STANDARD
                .encode(body)
                .into()
        }
    }
    line
}

/// `events list` as a table, one row per (event, route), oldest first. Columns are as wide as
/// their widest cell, so rows line up whatever the routes and errors are.
fn table(rows: &[Row]) -> String {
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
                row.record.status.name().to_string(),
                row.record.attempts.to_string(),
                row.route.clone(),
                row.channel.clone(),
                kind_cell(row),
                escape_control(&last).into_owned(),
            ]
        })
        .collect();
    layout(&cells)
}

/// The rows under their header, each column as wide as its widest cell.
fn layout(cells: &[[String; 8]]) -> String {
    const HEADER: [&str; 8] = [
        "ID", "RECEIVED", "STATUS", "ATTEMPTS", "TARGET", "CHANNEL", "KIND", "LAST",
    ];
    // Numbers read right-aligned; words left-aligned.
    const RIGHT: [bool; 8] = [true, true, false, true, false, false, false, false];
    crate::text::table(HEADER, RIGHT, cells)
}

/// The KIND cell: the event's kind, and `(recovered: github)` for an event catch-up recovered
/// after a gap rather than received live.
fn kind_cell(row: &Row) -> String {
    // What a sender chose goes to a terminal: its control characters escaped (which also keeps
    // one row per line).
    let kind = escape_control(row.kind.as_deref().unwrap_or("-")).into_owned();
    match &row.recovered {
        Some(from) => format!("{kind} (recovered: {})", escape_control(from)),
        None => kind,
    }
}

/// `events show`: deliveries, then the request as it would be replayed.
/// Where `events show` writes, which decides how it shows a body.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Output {
    /// A terminal: a body's control characters are shown as escapes (a sender must not drive
    /// the terminal of whoever looks at its event), and a body that is not text is described.
    Terminal,
    /// A pipe or a file: the body as text, for whatever reads it (`events export` has the
    /// bytes).
    Pipe,
}

impl Output {
    fn of_stdout() -> Output {
        use std::io::IsTerminal as _;
        match std::io::stdout().is_terminal() {
            true => Output::Terminal,
            false => Output::Pipe,
        }
    }
}

/// A body as `events show` prints it to `output`.
fn shown_body(id: u64, body: &[u8], output: Output) -> Cow<'_, str> {
    match (output, std::str::from_utf8(body)) {
        (Output::Pipe, _) => String::from_utf8_lossy(body),
        // Line by line, so that its lines stay lines.
        (Output::Terminal, Ok(text)) => {
            let lines: Vec<Cow<'_, str>> = text.split('\n').map(escape_control).collect();
            Cow::Owned(lines.join("\n"))
        }
        (Output::Terminal, Err(_)) => Cow::Owned(format!(
            "({}, not text: not shown on a terminal; `smee-relay events export {id}` writes \
             it, base64 in its JSON)",
            crate::error::count(body.len(), "byte", "bytes")
        )),
    }
}

fn show(event: &StoredEvent, records: &[(String, DeliveryRecord)], output: Output) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "event {}", event.id);
    let _ = writeln!(
        out,
        "received {} ago from {}",
        short_age(spool::age(event.received_ms)),
        event.channel
    );
    // What a sender or a target wrote (a query, an error answer) as escapes, whatever the
    // output: a line of its own each, and nothing that drives a terminal.
    for (route, record) in records {
        let _ = writeln!(
            out,
            "  -> {}: {}, {}{}",
            escape_control(route),
            record.status.name(),
            crate::error::count(record.attempts as usize, "attempt", "attempts"),
            record
                .last_error
                .as_deref()
                .map(|e| format!(", last: {}", escape_control(e)))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out);
    let query: Vec<String> = event
        .event
        .query
        .iter()
        .map(|(k, v)| format!("{}={}", escape_control(k), escape_control(v)))
        .collect();
    if !query.is_empty() {
        let _ = writeln!(out, "query: {}", query.join("&"));
    }
    for (name, value) in &event.event.headers {
        let _ = writeln!(out, "{name}: {}", escape_control(value));
    }
    let _ = writeln!(out);
    out.push_str(&shown_body(event.id, &event.event.body, output));
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

    /// Regression (a new user's run): `events show` wrote a body's escape sequences to the
    /// terminal as they were (`\x1b]0;pwned\x07` retitled it) and a binary body as megabytes of
    /// garbage. On a terminal they are now escapes, and a binary body is described; into a
    /// pipe the body goes as before.
    #[test]
    fn regression_events_show_let_a_body_drive_the_terminal() {
        let hostile = b"{\"x\":\"\x1b[31mRED\x1b]0;pwned\x07\"}\nline two";
        let shown = shown_body(7, hostile, Output::Terminal);
        assert_eq!(
            shown,
            "{\"x\":\"\\x1b[31mRED\\x1b]0;pwned\\x07\"}\nline two"
        );
        let binary = [0xff, 0x00, 0x1b, b'[', b'2', b'J'];
        let shown = shown_body(7, &binary, Output::Terminal);
        assert!(
            shown.starts_with("(6 bytes, not text") && shown.contains("events export 7"),
            "{shown}"
        );
        assert_eq!(shown_body(7, hostile, Output::Pipe).as_bytes(), hostile);
    }

    /// Regression (helper-115): `events show` escaped the body but printed a delivery's last
    /// error (a target's answer), and the event's query, as they were: `\x1b]0;pwned\x07`
    /// retitled the terminal, a `\r\n` forged a line.
    #[test]
    fn regression_events_show_printed_a_target_s_answer_raw() {
        let event = crate::event::Event {
            query: vec![("q".into(), "\x1b[31mQ".into())],
            ..Default::default()
        };
        let stored = StoredEvent {
            id: 3,
            received_ms: crate::clock::now_ms(),
            channel: "http://127.0.0.1:1/ch".into(),
            event,
        };
        let record = row(
            3,
            "k http://t/h",
            "c",
            Some("answered 500: \x1b]0;pwned\x07\r\nFAKE"),
        )
        .record;
        let shown = show(&stored, &[("http://t/h".into(), record)], Output::Pipe);
        assert!(!shown.contains(['\x1b', '\x07', '\r']), "{shown}");
        assert!(shown.contains("\\x1b]0;pwned\\x07\\r\\nFAKE"), "{shown}");
        assert!(shown.contains("query: q=\\x1b[31mQ"), "{shown}");
    }

    /// Regression: `events replay --to` said every failure was "not accepted by" the target,
    /// also for a request never sent (an event whose query is too long for a URL) and for a
    /// target that was not running.
    #[test]
    fn regression_replay_to_blamed_the_target_for_what_it_never_saw() {
        // A token in the query is not printed.
        let to: TargetUrl = "http://127.0.0.1:4000/hook?token=SECRET".parse().unwrap();
        let mut failed = Failed::default();
        failed.count(&ForwardError::Request("uri too long".into()));
        assert_eq!(
            failed.say(3, &to),
            "1 of 3 events not replayed to http://127.0.0.1:4000/hook?…: 1 never sent: the event \
             cannot be made into a request as it is (each event's line above says why)"
        );
        failed.count(&ForwardError::Connection("connection refused".into()));
        failed.count(&ForwardError::Status {
            status: reqwest::StatusCode::BAD_REQUEST,
            retry_after: None,
            location: None,
            body: String::new(),
        });
        assert_eq!(failed.total(), 3);
        let said = failed.say(3, &to);
        assert!(
            said.starts_with("3 of 3 events not replayed to http://127.0.0.1:4000/hook?…: 1 answered with an error status; 1 got no answer (not reached"),
            "{said}"
        );
    }

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
            recovered: None,
        }
    }

    /// `events replay --since` re-queued the relay's own alerts (the `alerts` route) with the
    /// frames, re-sending old Slack messages: "Replay never re-alerts". Now the frames only,
    /// each on every route done with it; an alert's id still replays it (asked for).
    #[test]
    fn regression_replay_since_re_sent_the_relay_s_own_alerts() {
        use crate::spool::{Limits, Outcome, Write};
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let room = Limits {
            max_bytes: u64::MAX,
        };
        let append = |channel: &str, routes: &[&str]| {
            let write = Write::Append {
                channel: channel.into(),
                routes: routes.iter().map(|r| r.to_string()).collect(),
                events: vec![crate::event::Event::default()].into(),
                cursor: None,
            };
            spool.write(&[write], room).unwrap().appended[0][0].unwrap()
        };
        let target = "ch http://127.0.0.1:3000/";
        let pipeline = crate::pipeline::PIPELINE_ROUTE;
        let alerts = crate::pipeline::ALERT_ROUTE;
        let frame = append("https://smee.io/abc…", &[target, pipeline]);
        let alert = append(pipeline, &[alerts]);
        let report = append(
            crate::actions::ACTIONS_ROUTE,
            &[crate::actions::REPORT_ROUTE],
        );
        for route in [target, pipeline, alerts, crate::actions::REPORT_ROUTE] {
            for queued in spool.pending(route, 0, 10).unwrap() {
                let mark = Write::Mark {
                    route: route.into(),
                    seq: queued.seq,
                    event: queued.event.id,
                    outcome: Outcome::Delivered { status: 200 },
                };
                spool.write(&[mark], room).unwrap();
            }
        }
        let since = |since: u64| EventSelection {
            ids: vec![],
            dead: false,
            since: Some(Duration::from_secs(since)),
        };
        let queued = spool
            .replay(local_replay(&spool, since(60)).unwrap())
            .unwrap();
        assert_eq!(queued, 2, "the frame, on its target and the pipeline");
        let pending = |route: &str| -> Vec<u64> {
            spool
                .pending(route, 0, 10)
                .unwrap()
                .iter()
                .map(|q| q.event.id)
                .collect()
        };
        assert_eq!(pending(target), [frame]);
        assert_eq!(pending(pipeline), [frame]);
        assert!(pending(alerts).is_empty(), "no alert re-sent");
        assert!(pending(crate::actions::REPORT_ROUTE).is_empty());
        // Asked for by id, an alert is sent again.
        let which = EventSelection {
            ids: vec![alert, report],
            dead: false,
            since: None,
        };
        assert_eq!(
            spool.replay(local_replay(&spool, which).unwrap()).unwrap(),
            2
        );
        assert_eq!(pending(alerts), [alert]);
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
        // One row per line: the newline is shown escaped, as every control character is.
        assert!(
            lines[2].ends_with(r"connection refused\nsecond line"),
            "{text}"
        );
    }
}
