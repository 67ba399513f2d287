//! Telling people: the alert outbox's route delivers each alert as a Slack message, or as text
//! on stdout when no Slack is configured. It reads alerts the pipeline spooled; it never judges.

pub mod port;
pub mod slack;

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::StatusCode;

use crate::delivery::Sink;
use crate::delivery::forward::{Delivered, ForwardError, Forwarder};
use crate::event::Event;
use crate::pipeline::Alert;
use crate::spool::StoredEvent;

/// An alert as a readable block of text (stdout, the demo). Port's values are escaped: a
/// line break or a bidi override in a title must not forge a line on a terminal.
pub fn text(alert: &Alert) -> String {
    use crate::text::escape_control as e;
    let mut out = String::new();
    let _ = writeln!(out, "{}", alert.headline());
    let _ = writeln!(
        out,
        "  entity:    {} ({})",
        e(&alert.entity),
        e(alert.blueprint.as_deref().unwrap_or("-"))
    );
    if let Some(p) = &alert.property {
        let _ = writeln!(
            out,
            "  {}: {} -> {}",
            e(&p.property),
            e(&p.before),
            e(&p.after)
        );
    }
    let _ = writeln!(out, "  condition: {}", e(&alert.threshold));
    let _ = writeln!(out, "  severity:  {}", e(&alert.severity));
    if let Some(note) = &alert.note {
        let _ = writeln!(out, "  note:      {}", e(note));
    }
    for c in &alert.other_changes {
        let _ = writeln!(
            out,
            "  also:      {}: {} -> {}",
            e(&c.property),
            e(&c.before),
            e(&c.after)
        );
    }
    let _ = writeln!(
        out,
        "  by:        {} at {}",
        e(alert.triggered_by.as_deref().unwrap_or("-")),
        e(alert.triggered_at.as_deref().unwrap_or("-"))
    );
    if let Some(url) = &alert.entity_url {
        let _ = writeln!(out, "  port:      {}", e(url));
    }
    for (name, url) in &alert.links {
        let _ = writeln!(out, "  {}: {}", e(name), e(url));
    }
    out
}

/// Where spooled alerts go: Slack, stdout, or both; and, for the demo, a channel that hears
/// of every alert delivered.
#[derive(Default)]
pub struct AlertSink {
    /// A Slack incoming webhook. Its URL is a secret: this sink only calls itself "slack".
    pub slack: Option<Forwarder>,
    /// Print each alert, one block per alert, once it is delivered.
    pub stdout: bool,
    /// Told of each alert once it is delivered.
    pub delivered: Option<tokio::sync::mpsc::UnboundedSender<Alert>>,
}

impl AlertSink {
    pub fn slack(forwarder: Forwarder) -> Self {
        Self {
            slack: Some(forwarder),
            ..Self::default()
        }
    }

    pub fn stdout() -> Self {
        Self {
            stdout: true,
            ..Self::default()
        }
    }
}

/// What an outbox (alerts, Port reports) holds: JSON its producer wrote into the event body.
/// Anything else can never be delivered, so it is a permanent refusal (a dead letter), not a
/// retry.
fn from_outbox<T: serde::de::DeserializeOwned>(
    event: &StoredEvent,
    what: &str,
) -> Result<T, ForwardError> {
    serde_json::from_slice(&event.event.body).map_err(|e| ForwardError::Status {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        retry_after: None,
        location: None,
        body: format!("not {what}: {e}"),
    })
}

impl Sink for AlertSink {
    fn describe(&self) -> String {
        match (&self.slack, self.stdout) {
            (Some(_), true) => "slack+stdout".into(),
            (Some(_), false) => "slack".into(),
            (None, true) => "stdout".into(),
            (None, false) => "alerts".into(),
        }
    }

    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
        _delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
        Box::pin(async move {
            let started = Instant::now();
            let alert: Alert = from_outbox(event, "an alert")?;
            let done = match &self.slack {
                Some(forwarder) => {
                    let message = Event {
                        headers: vec![("content-type".into(), "application/json".into())],
                        body: slack::message(&alert).to_string().into(),
                        ..event.event.clone()
                    };
                    forwarder.deliver(&message, &[]).await?
                }
                None => Delivered {
                    status: StatusCode::OK,
                    elapsed: started.elapsed(),
                    not_sent: None,
                },
            };
            if self.stdout {
                // Not println!: it panics (and ends the alert route) when stdout is closed.
                let _ = writeln!(std::io::stdout().lock(), "{}", text(&alert));
            }
            if let Some(delivered) = &self.delivered {
                let _ = delivered.send(alert);
            }
            Ok(done)
        })
    }

    fn min_interval(&self) -> Duration {
        if self.slack.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        }
    }
}
