//! Port's API for action runs: the sink of the `port-reports` route. It delivers each spooled
//! report (a run's log lines, an entity tied to the run, the terminal status) with a cached
//! access token, so reporting has the spool's guarantees: Port down or a restart delays a
//! report, never loses it.
//!
//! - the token (`POST /v1/auth/access_token`) is cached until shortly before `expiresIn`; a 401
//!   fetches a new one once and tries again (the client, shared with the reconciler, is
//!   [`crate::pipeline::port_api`]);
//! - 429 waits until `x-ratelimit-reset`; 5xx and network errors back off (the route's retry);
//! - 404 and 422 (`run_synchronized_error`: Port owns the run's status) end reporting for that
//!   run with one warning; what is still queued for it is dropped without a call;
//! - a refused entity is told to the run's log, never silently dropped.
//!
//! It never logs the client secret or the token, and never judges what to report.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use futures::future::BoxFuture;
use http::StatusCode;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::actions::Report;
use crate::delivery::Sink;
use crate::delivery::forward::{Delivered, ForwardError};
use crate::pipeline::port_api::{Answer, PortClient, escape, preview, status_error};
pub use crate::pipeline::port_api::{DEFAULT_API_URL, PortApi};
use crate::spool::StoredEvent;

/// Delivers report messages to Port.
pub struct PortReporter {
    /// Port's API with its cached token (shared code with the reconciler).
    client: PortClient,
    /// Runs Port refused reports for (404, 422): nothing more is sent for them.
    ended: Mutex<HashSet<String>>,
    /// Told of each report Port accepted (the demo prints them).
    pub delivered: Option<tokio::sync::mpsc::UnboundedSender<Report>>,
}

impl PortReporter {
    pub fn new(api: PortApi) -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: PortClient::new(api)?,
            ended: Mutex::new(HashSet::new()),
            delivered: None,
        })
    }

    /// Who it reports to Port as.
    pub fn api(&self) -> &crate::pipeline::port_api::PortApi {
        self.client.api()
    }

    /// Call Port with the token; a 401 gets a fresh token and one more try.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Answer, ForwardError> {
        self.client.call(method, path, Some(body)).await
    }

    fn end(&self, run: &str, answer: &Answer) {
        let mut ended = self.ended.lock().expect("not poisoned");
        if ended.insert(run.to_string()) {
            count_error("ended");
            warn!(
                run,
                "Port answered {} ({}): reporting for this run ends; what is still queued for it is dropped",
                answer.status.as_u16(),
                preview(&answer.body)
            );
        }
    }

    /// Report to Port; `None` when reporting for its run has ended (nothing is sent).
    async fn report(&self, report: &Report) -> Result<Option<StatusCode>, ForwardError> {
        let run = report.run();
        if self.ended.lock().expect("not poisoned").contains(run) {
            debug!(
                run,
                "reporting for this run has ended: {} dropped",
                report.kind()
            );
            return Ok(None);
        }
        let path_run = escape(run);
        let answer = match report {
            Report::Log { message, .. } => {
                self.call(
                    reqwest::Method::POST,
                    &format!("/v1/actions/runs/{path_run}/logs"),
                    &json!({ "message": message }),
                )
                .await?
            }
            Report::Finish { finish, .. } => {
                let body = serde_json::to_value(finish).expect("a finish serialises");
                self.call(
                    reqwest::Method::PATCH,
                    &format!("/v1/actions/runs/{path_run}"),
                    &body,
                )
                .await?
            }
            Report::Entity {
                blueprint, entity, ..
            } => {
                let answer = self
                    .call(
                        reqwest::Method::POST,
                        &format!(
                            "/v1/blueprints/{}/entities?upsert=true&run_id={path_run}",
                            escape(blueprint)
                        ),
                        entity,
                    )
                    .await?;
                if answer.status.is_client_error() && answer.status != StatusCode::TOO_MANY_REQUESTS
                {
                    // Told in the run's log, where the person who ran it looks.
                    let identifier = entity["identifier"].as_str().unwrap_or("(no identifier)");
                    let message = format!(
                        "smee-relay: Port refused entity {identifier} of blueprint {blueprint}: {} {}",
                        answer.status.as_u16(),
                        preview(&answer.body)
                    );
                    warn!(run, "{message}");
                    count_error("entity_refused");
                    let told = self
                        .call(
                            reqwest::Method::POST,
                            &format!("/v1/actions/runs/{path_run}/logs"),
                            &json!({ "message": message }),
                        )
                        .await?;
                    if matches!(told.status.as_u16(), 404 | 422) {
                        self.end(run, &told);
                    } else if !told.status.is_success() {
                        return Err(status_error(told));
                    }
                    return Ok(Some(answer.status));
                }
                answer
            }
        };
        if answer.status.is_success() {
            return Ok(Some(answer.status));
        }
        if matches!(answer.status.as_u16(), 404 | 422) {
            self.end(run, &answer);
            return Ok(Some(answer.status));
        }
        Err(status_error(answer))
    }
}

impl Sink for PortReporter {
    fn describe(&self) -> String {
        "port".into()
    }

    fn deliver<'a>(
        &'a self,
        event: &'a StoredEvent,
        _delivery_id: &'a str,
    ) -> BoxFuture<'a, Result<Delivered, ForwardError>> {
        Box::pin(async move {
            let started = Instant::now();
            let report: Report = super::from_outbox(event, "a report for Port")?;
            let status = self.report(&report).await.inspect_err(|e| {
                count_error(match e {
                    ForwardError::Status { status, .. } if status.is_server_error() => "5xx",
                    ForwardError::Status { status, .. }
                        if *status == StatusCode::TOO_MANY_REQUESTS =>
                    {
                        "429"
                    }
                    ForwardError::Status { .. } | ForwardError::Refused(_) => "4xx",
                    ForwardError::Timeout(_) => "timeout",
                    ForwardError::Connection(_) => "network",
                    ForwardError::Request(_) => "request",
                })
            })?;
            if let Some(status) = status
                && status.is_success()
                && let Some(delivered) = &self.delivered
            {
                let _ = delivered.send(report);
            }
            Ok(Delivered {
                status: status.unwrap_or(StatusCode::NO_CONTENT),
                elapsed: started.elapsed(),
                not_sent: status
                    .is_none()
                    .then_some("reporting for this run has ended (Port answered 404 or 422)"),
            })
        })
    }
}

/// A report Port did not take (`smee_relay_action_report_errors_total{kind}`): `5xx`, `429`,
/// `4xx`, `timeout`, `network` for a failed call (retried or dead by the route's rules),
/// `request` for one that cannot be made into a request (dead at once),
/// `ended` when a 404 or 422 ends a run's reporting, `entity_refused` for an entity Port refused.
fn count_error(kind: &'static str) {
    metrics::counter!("smee_relay_action_report_errors_total", "kind" => kind).increment(1);
}
