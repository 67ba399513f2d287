//! Port's API for action runs: the sink of the `port-reports` route. It delivers each spooled
//! report (a run's log lines, an entity tied to the run, the terminal status) with a cached
//! access token, so reporting has the spool's guarantees: Port down or a restart delays a
//! report, never loses it.
//!
//! - the token (`POST /v1/auth/access_token`) is cached until shortly before `expiresIn`; a 401
//!   fetches a new one once and tries again;
//! - 429 waits until `x-ratelimit-reset`; 5xx and network errors back off (the route's retry);
//! - 404 and 422 (`run_synchronized_error`: Port owns the run's status) end reporting for that
//!   run with one warning; what is still queued for it is dropped without a call;
//! - a refused entity is told to the run's log, never silently dropped.
//!
//! It never logs the client secret or the token, and never judges what to report.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::StatusCode;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::actions::Report;
use crate::delivery::Sink;
use crate::delivery::forward::{Delivered, ForwardError};
use crate::secret::{ExposeSecret as _, SecretString};
use crate::spool::StoredEvent;

/// Port's default API (EU); the US region is `https://api.us.port.io`.
pub const DEFAULT_API_URL: &str = "https://api.port.io";

/// How long one call to Port may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A 429 without a usable reset header waits this long.
const DEFAULT_RATE_WAIT: Duration = Duration::from_secs(10);

/// Who smee-relay is to Port's API.
#[derive(Clone, Debug)]
pub struct PortApi {
    /// The API base, without a trailing slash.
    pub api_url: String,
    pub client_id: String,
    /// Never logged; `Debug` redacts it.
    pub client_secret: SecretString,
}

/// Delivers report messages to Port.
pub struct PortReporter {
    api: PortApi,
    client: reqwest::Client,
    /// The access token and when to stop using it.
    token: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
    /// Runs Port refused reports for (404, 422): nothing more is sent for them.
    ended: Mutex<HashSet<String>>,
    /// Told of each report Port accepted (the demo prints them).
    pub delivered: Option<tokio::sync::mpsc::UnboundedSender<Report>>,
}

/// Port's answer to one call.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: String,
}

impl PortReporter {
    pub fn new(api: PortApi) -> Result<Self, reqwest::Error> {
        let client = crate::http::client_builder()
            .timeout(CALL_TIMEOUT)
            .build()?;
        Ok(Self {
            api,
            client,
            token: tokio::sync::Mutex::new(None),
            ended: Mutex::new(HashSet::new()),
            delivered: None,
        })
    }

    /// A token, from the cache or fresh.
    async fn token(&self, fresh: bool) -> Result<SecretString, ForwardError> {
        let mut cached = self.token.lock().await;
        if !fresh
            && let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let body = json!({
            "clientId": self.api.client_id,
            "clientSecret": self.api.client_secret.expose_secret(),
        });
        let url = format!("{}/v1/auth/access_token", self.api.api_url);
        let answer = self.send(self.client.post(url).json_body(&body)).await?;
        if !answer.status.is_success() {
            return Err(match answer.status.as_u16() {
                // Wrong credentials may be fixed by a reload: retry, with a hint.
                401 | 403 => ForwardError::Connection(format!(
                    "Port refused the credentials ({}): check [port] client_id and client_secret",
                    answer.status.as_u16()
                )),
                _ => status_error(answer),
            });
        }
        let parsed: Value = serde_json::from_str(&answer.body).unwrap_or_default();
        let Some(token) = parsed["accessToken"].as_str() else {
            return Err(ForwardError::Connection(
                "Port's token answer has no accessToken".into(),
            ));
        };
        let lifetime = Duration::from_secs(parsed["expiresIn"].as_u64().unwrap_or(3600));
        let token = SecretString::from(token.to_string());
        *cached = Some((token.clone(), Instant::now() + usable_for(lifetime)));
        Ok(token)
    }

    /// Call Port with the token; a 401 gets a fresh token and one more try.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Answer, ForwardError> {
        let url = format!("{}{path}", self.api.api_url);
        let mut fresh = false;
        loop {
            let token = self.token(fresh).await?;
            let request = self
                .client
                .request(method.clone(), &url)
                .bearer_auth(token.expose_secret())
                .json_body(body);
            let answer = self.send(request).await?;
            if answer.status == StatusCode::UNAUTHORIZED && !fresh {
                debug!("Port answered 401: fetching a new token");
                fresh = true;
                continue;
            }
            if answer.status == StatusCode::UNAUTHORIZED {
                return Err(ForwardError::Connection(
                    "Port answered 401 with a fresh token: check [port] client_id and client_secret".into(),
                ));
            }
            return Ok(answer);
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, ForwardError> {
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                ForwardError::Timeout(CALL_TIMEOUT)
            } else {
                ForwardError::Connection(crate::error::chain(&e))
            }
        })?;
        let status = response.status();
        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            response
                .headers()
                .get("x-ratelimit-reset")
                .and_then(|v| v.to_str().ok())
                .and_then(rate_limit_wait)
                .unwrap_or(DEFAULT_RATE_WAIT)
        });
        let body = response.text().await.unwrap_or_default();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
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

    async fn report(&self, report: &Report) -> Result<StatusCode, ForwardError> {
        let run = report.run();
        if self.ended.lock().expect("not poisoned").contains(run) {
            debug!(
                run,
                "reporting for this run has ended: {} dropped",
                report.kind()
            );
            return Ok(StatusCode::NO_CONTENT);
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
                    return Ok(answer.status);
                }
                answer
            }
        };
        if answer.status.is_success() {
            return Ok(answer.status);
        }
        if matches!(answer.status.as_u16(), 404 | 422) {
            self.end(run, &answer);
            return Ok(answer.status);
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
                    ForwardError::Status { .. } => "4xx",
                    ForwardError::Timeout(_) => "timeout",
                    ForwardError::Connection(_) => "network",
                })
            })?;
            if status.is_success()
                && status != StatusCode::NO_CONTENT
                && let Some(delivered) = &self.delivered
            {
                let _ = delivered.send(report);
            }
            Ok(Delivered {
                status,
                elapsed: started.elapsed(),
            })
        })
    }
}

/// A JSON body on a request (reqwest is built without its `json` feature).
trait JsonBody {
    fn json_body(self, body: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(body.to_string())
    }
}

/// A report Port did not take (`smee_relay_action_report_errors_total{kind}`): `5xx`, `429`,
/// `4xx`, `timeout`, `network` for a failed call (retried or dead by the route's rules),
/// `ended` when a 404 or 422 ends a run's reporting, `entity_refused` for an entity Port refused.
fn count_error(kind: &'static str) {
    metrics::counter!("smee_relay_action_report_errors_total", "kind" => kind).increment(1);
}

fn status_error(answer: Answer) -> ForwardError {
    ForwardError::Status {
        status: answer.status,
        retry_after: answer.retry_after,
        body: preview(&answer.body),
    }
}

fn preview(body: &str) -> String {
    body.chars().take(200).collect()
}

/// How long a token that lives `lifetime` is used: renewed shortly before it expires (a tenth
/// of its life, at most a minute), so no call carries a token about to lapse.
fn usable_for(lifetime: Duration) -> Duration {
    lifetime - (lifetime / 10).min(Duration::from_secs(60))
}

/// `x-ratelimit-reset` is the epoch second the window resets at.
fn rate_limit_wait(value: &str) -> Option<Duration> {
    let reset_ms = value.trim().parse::<u64>().ok()?.checked_mul(1000)?;
    let wait = Duration::from_millis(reset_ms.saturating_sub(crate::clock::now_ms()));
    Some(wait.clamp(Duration::from_millis(100), Duration::from_secs(300)))
}

/// A run id or blueprint as one path segment.
fn escape(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_renewed_shortly_before_it_expires() {
        assert_eq!(
            usable_for(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(54));
        assert_eq!(usable_for(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_rate_limit_reset_is_waited_for() {
        let in_3s = (crate::clock::now_ms() / 1000 + 3).to_string();
        let wait = rate_limit_wait(&in_3s).unwrap();
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(3),
            "{wait:?}"
        );
        assert_eq!(rate_limit_wait("0"), Some(Duration::from_millis(100)));
        assert_eq!(rate_limit_wait("soon"), None);
    }

    #[test]
    fn run_ids_are_one_path_segment() {
        assert_eq!(escape("r_abc-1.2~"), "r_abc-1.2~");
        assert_eq!(escape("../x y"), "..%2Fx%20y");
    }
}
