//! Port's REST API, as smee-relay calls it: who we are to Port ([`PortApi`]), the access token
//! (`POST /v1/auth/access_token`, cached until shortly before `expiresIn`; a 401 fetches a new
//! one once and tries again), and the shape of one call and its answer.
//!
//! Two users share it: the reconciler (`pipeline::reconcile`, reading entities) and the run
//! reporter (`notify::port`, writing run logs and statuses). It sits here, upstream of both,
//! because the layout lets a module use only those above it. It never logs the client secret
//! or the token, and never decides what a status means to its caller: [`Answer`] carries the
//! status, the rate-limit wait and the body.

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Value, json};
use tracing::debug;

use crate::delivery::forward::ForwardError;
use crate::secret::{ExposeSecret as _, SecretString};

/// Port's default API (EU); the US region is `https://api.us.port.io`.
pub const DEFAULT_API_URL: &str = "https://api.port.io";

/// How long one call to Port may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read from Port (a page of entities is far smaller): a broken or hostile
/// answer must not fill memory.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// A 429 without a usable reset header waits this long.
const DEFAULT_RATE_WAIT: Duration = Duration::from_secs(10);

/// Who smee-relay is to Port's API.
#[derive(Clone, Debug)]
pub struct PortApi {
    /// The API base, without a trailing slash.
    pub api_url: String,
    /// The client id (not a secret, but shown only where the operator needs it).
    pub client_id: String,
    /// Never logged; `Debug` redacts it.
    pub client_secret: SecretString,
}

impl PortApi {
    /// Whether `other` is the same API with the same credentials (a reload that changes none
    /// of them keeps the running client and its token).
    pub fn same_as(&self, other: &PortApi) -> bool {
        self.api_url == other.api_url
            && self.client_id == other.client_id
            && self.client_secret.expose_secret() == other.client_secret.expose_secret()
    }
}

/// How the client says the token endpoint refused the credentials (401, 403): retried, since a
/// reload may fix them, and told apart from an outage by these words.
pub(crate) const CREDENTIALS_REFUSED: &str = "Port refused the credentials";

/// An HTTP client for Port's API with a cached access token.
pub struct PortClient {
    /// Where to call and with which credentials.
    api: PortApi,
    /// One connection pool for every call.
    client: reqwest::Client,
    /// The access token and when to stop using it.
    token: tokio::sync::Mutex<Option<(SecretString, Instant)>>,
}

/// Port's answer to one call.
pub struct Answer {
    pub status: StatusCode,
    /// For a 429: how long `x-ratelimit-reset` asks to wait (or a default).
    pub retry_after: Option<Duration>,
    /// The body, as text (Port answers JSON).
    pub body: String,
}

impl PortClient {
    pub fn new(api: PortApi) -> Result<Self, reqwest::Error> {
        // An API URL that does not parse fails each call, saying so.
        let builder = match api.api_url.parse() {
            Ok(url) => crate::http::client_builder_for(&url),
            Err(_) => crate::http::client_builder(),
        };
        let client = builder.timeout(CALL_TIMEOUT).build()?;
        Ok(Self {
            api,
            client,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// Who this client calls Port as.
    pub fn api(&self) -> &PortApi {
        &self.api
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
        let answer = self
            .send(self.client.post(url).json_body(Some(&body)))
            .await?;
        if !answer.status.is_success() {
            return Err(match answer.status.as_u16() {
                // Wrong credentials may be fixed by a reload: retry, with a hint.
                401 | 403 => ForwardError::Refused(format!(
                    "{CREDENTIALS_REFUSED} ({}): check [port] client_id and client_secret",
                    answer.status.as_u16()
                )),
                // Never the body: a token endpoint's error may echo the credentials sent.
                status => ForwardError::Status {
                    status: answer.status,
                    retry_after: answer.retry_after,
                    location: None,
                    body: format!(
                        "from the token endpoint (its answer is not shown: it may echo the \
                         credentials){}",
                        if status == 400 {
                            "; check [port] client_id and client_secret"
                        } else {
                            ""
                        }
                    ),
                },
            });
        }
        let parsed: Value = serde_json::from_str(&answer.body).unwrap_or_default();
        let Some(token) = parsed["accessToken"].as_str() else {
            return Err(ForwardError::Refused(
                "Port's token answer has no accessToken".into(),
            ));
        };
        let lifetime = Duration::from_secs(parsed["expiresIn"].as_u64().unwrap_or(3600));
        let token = SecretString::from(token.to_string());
        *cached = Some((token.clone(), Instant::now() + usable_for(lifetime)));
        Ok(token)
    }

    /// Call Port with the token (and a JSON body, if any); a 401 gets a fresh token and one
    /// more try.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
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
                return Err(ForwardError::Refused(
                    "Port answered 401 with a fresh token: check [port] client_id and client_secret".into(),
                ));
            }
            return Ok(answer);
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, ForwardError> {
        let response =
            (request.send().await).map_err(|e| ForwardError::from_reqwest(e, CALL_TIMEOUT))?;
        let status = response.status();
        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
            response
                .headers()
                .get("x-ratelimit-reset")
                .and_then(|v| v.to_str().ok())
                .and_then(rate_limit_wait)
                .unwrap_or(DEFAULT_RATE_WAIT)
        });
        let body = crate::http::read_capped(response, MAX_BODY)
            .await
            .map_err(|e| ForwardError::Connection(crate::error::chain(&e)))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

/// A JSON body on a request (reqwest is built without its `json` feature).
trait JsonBody {
    fn json_body(self, body: Option<&Value>) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: Option<&Value>) -> Self {
        match body {
            Some(body) => self
                .header("content-type", "application/json")
                .body(body.to_string()),
            None => self,
        }
    }
}

/// An answer that is not what the caller wanted, as a retryable-or-not delivery error.
pub fn status_error(answer: Answer) -> ForwardError {
    ForwardError::Status {
        status: answer.status,
        retry_after: answer.retry_after,
        location: None,
        body: preview(&answer.body),
    }
}

/// The start of a body, for a log line.
pub fn preview(body: &str) -> String {
    body.chars().take(200).collect()
}

/// How long a token that lives `lifetime` is used: renewed shortly before it expires (a tenth
/// of its life, at most a minute), so no call carries a token about to lapse.
/// `expiresIn` is Port's input: a lifetime beyond [`MAX_TOKEN_LIFE`] is taken as that (a huge
/// one would overflow the clock), so a token is fetched again at least daily.
fn usable_for(lifetime: Duration) -> Duration {
    let lifetime = lifetime.min(MAX_TOKEN_LIFE);
    lifetime - (lifetime / 10).min(Duration::from_secs(60))
}

/// The longest a token is kept, whatever `expiresIn` says.
const MAX_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);

/// Port's `x-ratelimit-reset` is the number of seconds until the window resets. A value that
/// can only be an epoch second (after 2001; some gateways send that) is read as one.
fn rate_limit_wait(value: &str) -> Option<Duration> {
    const EPOCH_SECONDS_FROM: u64 = 1_000_000_000;
    let seconds = value.trim().parse::<u64>().ok()?;
    let wait = if seconds >= EPOCH_SECONDS_FROM {
        Duration::from_millis((seconds.saturating_mul(1000)).saturating_sub(crate::clock::now_ms()))
    } else {
        Duration::from_secs(seconds)
    };
    Some(wait.clamp(Duration::from_millis(100), Duration::from_secs(300)))
}

/// A run id or blueprint as one path segment.
pub fn escape(segment: &str) -> String {
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

    /// Regression: a token answer with an absurd `expiresIn` overflowed `Instant` and panicked
    /// the caller (the reconciler's or the reporter's task).
    #[tokio::test]
    async fn an_absurd_expires_in_is_clamped_not_a_panic() {
        use axum::routing::{get, post};
        let app = axum::Router::new()
            .route(
                "/v1/auth/access_token",
                post(|| async { r#"{"accessToken":"t","expiresIn":18446744073709551615}"# }),
            )
            .route("/v1/x", get(|| async { "{}" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = PortClient::new(PortApi {
            api_url: url,
            client_id: "id".into(),
            client_secret: SecretString::from("s".to_string()),
        })
        .unwrap();
        let answer = client
            .call(reqwest::Method::GET, "/v1/x", None)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert!(usable_for(Duration::from_secs(u64::MAX)) <= MAX_TOKEN_LIFE);
    }

    /// Regression (an adversary's finding): Port's `x-ratelimit-reset` is the seconds until the
    /// reset; read as an epoch second it was always past, so a rate-limited call was repeated
    /// every 100 ms.
    #[test]
    fn regression_x_ratelimit_reset_is_seconds_until_the_reset() {
        assert_eq!(rate_limit_wait("3"), Some(Duration::from_secs(3)));
        assert_eq!(rate_limit_wait(" 42 "), Some(Duration::from_secs(42)));
        assert_eq!(rate_limit_wait("86400"), Some(Duration::from_secs(300)));
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
