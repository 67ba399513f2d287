//! The HTTP surface of `serve`: routes, request checks (names, tokens, allow-list, sizes, body
//! read timeout), JSON errors, the SSE response, `/metrics`, `/healthz` and the channel page.
//! It holds no state of its own: everything kept is in [`Hub`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use http_body_util::BodyExt as _;

use super::Peer;
use super::hub::{Charge, FRAME_FIELDS, Hub, HubError, Posted, Stats};
use crate::secret::{ExposeSecret as _, SecretString};

/// The channel page: one file, no build step, no CDN.
const PAGE: &str = include_str!("page.html");

/// The page at `/`: what this server is and a link to a new channel, as smee.io's home has
/// (helper-150: a browser opening the server's address got a JSON 404).
const HOME: &str = include_str!("home.html");

/// Names that are routes, not channels.
const RESERVED: [&str; 3] = ["new", "metrics", "healthz"];

pub(super) fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/new", get(new_channel_redirect).head(new_channel_redirect))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/{channel}", get(subscribe).post(post))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(hub)
}

/// Every error is `{"error": "..."}` with a reason a person can act on.
fn json_error(status: StatusCode, reason: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({ "error": reason.to_string() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such route; channels are /CHANNEL (letters, digits, - and _; at most 64)",
    )
}

/// An HTML page of this server, never in another site's frame (the channel page's Redeliver
/// button posts for whoever is shown it).
fn page(html: &'static str) -> Response {
    (
        [
            // Chosen by `Accept`: a cache must not hand it to a client that asked for the
            // stream or JSON (helper-156).
            (header::VARY, "Accept"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(html),
    )
        .into_response()
}

/// `/`: the home page in a browser; for anything else, where things are, in the JSON every
/// other answer of this server is.
async fn home(headers: HeaderMap) -> Response {
    if text(&headers, "accept").is_some_and(|v| v.to_ascii_lowercase().contains("text/html")) {
        return page(HOME);
    }
    let body = serde_json::json!({
        "service": "smee-relay serve",
        "new_channel": "/new",
        "channels": "/CHANNEL: POST a webhook; GET with Accept: text/event-stream to subscribe",
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::VARY, "Accept"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A method a route does not take: the answer says what the route is for.
async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    let reason = match uri.path() {
        "/new" => {
            "/new takes GET (it redirects to a fresh channel); post webhooks to a channel's URL, /CHANNEL"
        }
        "/metrics" => "/metrics takes GET",
        "/healthz" => "/healthz takes GET",
        "/" => "/ takes GET (this server's home page); post webhooks to a channel's URL, /CHANNEL",
        _ => "channels take GET (subscribe, or the page in a browser) and POST (a webhook)",
    };
    json_error(StatusCode::METHOD_NOT_ALLOWED, reason)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !RESERVED.contains(&name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn bad_name() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "no such channel: a channel name is 1-64 letters, digits, - or _",
    )
}

/// A valid channel name from the path. Anything else, a path that is not UTF-8 included, is
/// no channel: the JSON 404 of any bad name, not axum's plain-text 400.
struct ChannelName(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ChannelName {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(name)) if valid_name(&name) => Ok(Self(name)),
            _ => Err(bad_name()),
        }
    }
}

fn authorized(headers: &HeaderMap, token: &Option<SecretString>) -> bool {
    let Some(token) = token else { return true };
    let token = token.expose_secret();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        // The scheme's name is case-insensitive (RFC 9110, 11.1): `bearer` is `Bearer`.
        .and_then(|v| {
            v.get(..7)
                .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                // One space or more after the scheme (RFC 9110, 11.4).
                .map(|_| v[7..].trim_start_matches(' '))
        });
    // Constant-time compare: a token is a secret.
    given.is_some_and(|given| {
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// 401, saying whether a token came at all (helper-155: a wrong token and none read the same).
fn unauthorized(headers: &HeaderMap) -> Response {
    let reason = if headers.contains_key(header::AUTHORIZATION) {
        "the token was refused: this server wants `Authorization: Bearer TOKEN` with its token"
    } else {
        "this server wants `Authorization: Bearer TOKEN`"
    };
    let mut response = json_error(StatusCode::UNAUTHORIZED, reason);
    // The scheme to use, as RFC 9110 (11.6.1) asks of a 401 (helper-156).
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Add one received header to `kept`, a repeated one as smee.io (Node's `req.headers`) does:
/// the values joined with `, ` (`cookie` with `; `), or the first kept for a header that may
/// appear once. The frame's headers are a JSON object: one value per name.
fn merge_repeated(
    mut kept: Vec<(String, String)>,
    (name, value): (&str, &str),
) -> Vec<(String, String)> {
    const FIRST_WINS: [&str; 18] = [
        "age",
        "authorization",
        "content-length",
        "content-type",
        "etag",
        "expires",
        "from",
        "host",
        "if-modified-since",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "proxy-authorization",
        "referer",
        "retry-after",
        "server",
        "user-agent",
    ];
    match kept.iter_mut().find(|(kept, _)| kept == name) {
        None => kept.push((name.to_string(), value.to_string())),
        Some(_) if FIRST_WINS.contains(&name) => {}
        Some((_, joined)) => {
            joined.push_str(if name == "cookie" { "; " } else { ", " });
            joined.push_str(value);
        }
    }
    kept
}

/// A header's value as text: UTF-8, as the frame keeps it (`to_str` takes ASCII only, so a
/// `Content-Type` with `é` in it counted as none and a JSON body went out as a string).
fn text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
}

/// The client's address: the socket's, or with `--trust-proxy` the last one the proxy added
/// to `X-Forwarded-For` (with a port or mapped into IPv6 as proxies may write it). `Err` with
/// the hop as sent when that last hop is no address (`unknown`, a unix socket, nothing): never
/// an earlier hop, which the client may have written itself (helper-128).
fn client_ip(hub: &Hub, peer: &Peer, headers: &HeaderMap) -> Result<IpAddr, String> {
    // A dual-stack listener sees IPv4 clients as `::ffff:a.b.c.d`.
    let own = peer.addr.to_canonical();
    if !hub.config.trust_proxy {
        return Ok(own);
    }
    let Some(hop) = last_hop(headers, "x-forwarded-for") else {
        return Ok(own);
    };
    let hop = hop.map_err(|_| "(not text)".to_string())?;
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
        .map_err(|_| crate::text::escape_control(&crate::text::cut(hop, 64)).into_owned())
}

/// The value the last proxy added to a forwarded header (`X-Forwarded-For`, `-Host`, `-Proto`):
/// the last item of its last line. Earlier ones the client may have written itself.
fn last_hop<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> Option<Result<&'a str, std::str::Utf8Error>> {
    let last = headers.get_all(name).iter().next_back()?;
    Some(std::str::from_utf8(last.as_bytes()).map(|line| {
        let hop = line.rsplit(',').next().unwrap_or("");
        hop.trim()
    }))
}

/// A channel id: 22 characters drawn from the OS CSPRNG (about 131 bits), as the URL is the
/// only secret a smee channel has.
pub(super) fn channel_id() -> Result<String, getrandom::Error> {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(22);
    while id.len() < 22 {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        // Rejection sampling: 248 = 4 x 62, so each kept byte picks a letter uniformly.
        for b in bytes.into_iter().filter(|b| *b < 248) {
            if id.len() < 22 {
                id.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    Ok(id)
}

async fn new_channel_redirect(
    State(hub): State<Arc<Hub>>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = hub.can_create() {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    let scheme = if peer.tls { "https" } else { "http" };
    let valid_host = |h: &&str| is_host(h);
    let (proto, host) = if hub.config.trust_proxy {
        // The proxy's host, when it sends one: an invalid one is not passed over for `Host`,
        // which behind a proxy is the proxy's own upstream name (helper-134).
        let host = match last_hop(&headers, "x-forwarded-host") {
            Some(hop) => hop.ok().filter(valid_host),
            None => text(&headers, "host").filter(valid_host),
        };
        (
            (last_hop(&headers, "x-forwarded-proto").and_then(Result::ok)).unwrap_or(scheme),
            host,
        )
    } else {
        (scheme, text(&headers, "host").filter(valid_host))
    };
    // A client's words go into the redirect only if they are what they claim: a host (and
    // port), a scheme of the web's. Anything else is not echoed back; with no host to name,
    // the client is told so (a redirect to `localhost` would send it to its own machine).
    let proto = match proto.to_ascii_lowercase().as_str() {
        "http" => "http",
        "https" => "https",
        _ => scheme,
    };
    let Some(host) = host else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "the request names no host (and port) in its Host header (nor in X-Forwarded-Host, behind --trust-proxy): a channel URL cannot be made",
        );
    };
    let id = match channel_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("the OS random generator failed: {e}");
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot draw a channel id from the OS random generator",
            );
        }
    };
    (
        StatusCode::TEMPORARY_REDIRECT,
        [
            (header::LOCATION, format!("{proto}://{host}/{id}")),
            // A fresh channel each time: never one a cache hands to the next client.
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
    )
        .into_response()
}

/// Whether a client's `Host` (or `X-Forwarded-Host`) is one, as the redirect of `/new` may
/// echo it: a host name or address and a port that is one, no user part.
fn is_host(text: &str) -> bool {
    let Ok(authority) = text.parse::<axum::http::uri::Authority>() else {
        return false;
    };
    // The parser takes `host:abc` (its port then reads as none) and `a@b`.
    let whole = match authority.port_u16() {
        Some(0) => return false,
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_string(),
    };
    whole == text && !text.contains('@')
}

fn hub_error(error: HubError) -> Response {
    let status = match error {
        HubError::TooManyChannels(_)
        | HubError::TooManySubscribers(_)
        | HubError::MemoryFull
        | HubError::ReadingFull
        | HubError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    match error {
        // The cause names the server's files: for its log, not for whoever posts.
        HubError::Store(_) => json_error(
            status,
            "cannot store the event: the server's disk refused it (try again later)",
        ),
        error => json_error(status, crate::error::chain(&error)),
    }
}

/// Why a body could not be read.
enum BodyError {
    TooLarge,
    Timeout,
    Broken,
    Memory(HubError),
}

/// Read a body within `--read-timeout` and `--max-body`, charging it to the budget as it comes.
async fn read_body(hub: &Hub, body: Body) -> Result<(Bytes, Option<Charge>), BodyError> {
    let deadline = tokio::time::Instant::now() + hub.config.read_timeout;
    let mut body = body;
    let mut charge = None;
    // Each piece is copied in as it comes, and what is charged is the buffer's capacity: a
    // piece hyper hands over may share its whole read buffer, so keeping pieces would pin
    // kilobytes per byte of a body sent a byte at a time (helper-119), uncounted.
    let mut joined: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(BodyError::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if joined.len() + data.len() > hub.max_body() {
            return Err(BodyError::TooLarge);
        }
        let had = joined.capacity();
        if joined.len() + data.len() > had {
            // Room for it, doubling as Vec does, but never past --max-body.
            let want = (joined.len() + data.len()).max(had * 2).min(hub.max_body());
            hub.reserve(&mut charge, want - had)
                .map_err(BodyError::Memory)?;
            joined.reserve_exact(want - joined.len());
        }
        joined.extend_from_slice(&data);
    }
    // Kept at exactly its size: the event holds it as long as it is kept (copied only when
    // the buffer grew past it).
    let body = if joined.capacity() == joined.len() {
        Bytes::from(joined)
    } else {
        Bytes::copy_from_slice(&joined)
    };
    Ok((body, charge))
}

async fn post(
    State(hub): State<Arc<Hub>>,
    axum::Extension(peer): axum::Extension<Peer>,
    ChannelName(name): ChannelName,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !hub.config.allow_post_from.is_empty() {
        let ip = match client_ip(&hub, &peer, &headers) {
            Ok(ip) => ip,
            Err(hop) => {
                hub.stats.refused_forbidden.fetch_add(1, Ordering::Relaxed);
                return json_error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the last X-Forwarded-For hop ({hop:?}) is no address, so the sender cannot be checked against --allow-post-from"
                    ),
                );
            }
        };
        if !hub
            .config
            .allow_post_from
            .iter()
            .any(|net| net.contains(&ip))
        {
            hub.stats.refused_forbidden.fetch_add(1, Ordering::Relaxed);
            return json_error(
                StatusCode::FORBIDDEN,
                format!("posts from {ip} are not allowed here (--allow-post-from)"),
            );
        }
    }
    if !authorized(&headers, &hub.config.post_token) {
        hub.stats
            .say_refused_token(client_ip(&hub, &peer, &headers).unwrap_or(peer.addr));
        return unauthorized(&headers);
    }
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than the {} bytes this server takes (--max-body, or half of \
                 --max-memory if less)",
                hub.max_body()
            ),
        )
    };
    let declared = text(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > hub.max_body() as u64) {
        return too_large();
    }
    let (body, _reading) = match read_body(&hub, body).await {
        Ok(read) => read,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Timeout) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within --read-timeout ({})",
                    humantime::format_duration(hub.config.read_timeout)
                ),
            );
        }
        Err(BodyError::Broken) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "the body ended early or was broken",
            );
        }
        Err(BodyError::Memory(e)) => return hub_error(e),
    };
    let mut dropped = 0u64;
    // `authorization` is the post token's when one is required (never passed on); otherwise
    // it is the sender's own, and a webhook's header like any other.
    let ours = hub.config.post_token.is_some();
    let kept: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| match name.as_str() {
            "host" | "content-length" => false,
            "authorization" => !ours,
            _ => true,
        })
        // A header named as one of the frame's own fields would stand beside it in smee's
        // shape, and a client may take it for the body (`rawdata`); a value that is not UTF-8
        // cannot be a JSON string. (UTF-8 beyond ASCII is text, and kept.)
        .filter_map(
            |(name, value)| match std::str::from_utf8(value.as_bytes()) {
                Ok(value) if !FRAME_FIELDS.contains(&name.as_str()) => Some((name.as_str(), value)),
                _ => {
                    dropped += 1;
                    None
                }
            },
        )
        .fold(Vec::new(), merge_repeated);
    if dropped > 0 {
        hub.stats
            .headers_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(
            dropped,
            "dropped headers that are not UTF-8 text or are named as a frame's own field"
        );
    }
    let content_type = text(&headers, "content-type").unwrap_or("").to_string();
    let params = query_object(query);
    if let Some(cluster) = &hub.cluster {
        return post_to_stream(&hub, cluster, &name, kept, params, content_type, body).await;
    }
    let stats = hub.stats.clone();
    let stored = hub
        .post(&name, |id| {
            Posted::new(
                &stats,
                id,
                crate::clock::now_ms(),
                kept,
                params,
                content_type,
                body,
            )
        })
        .await;
    match stored {
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"ok":true}"#,
        )
            .into_response(),
        // A store failure was said once for the outage (and each is counted): not a line per
        // refused post (helper-128: 3,430 lines for 2,000 posts).
        Err(e) => hub_error(e),
    }
}

/// With `--nats-url`: store the post in the stream and answer once JetStream confirmed it.
/// Subscribers get it from the feed, like every replica's.
async fn post_to_stream(
    hub: &Hub,
    cluster: &super::nats::Cluster,
    name: &str,
    headers: Vec<(String, String)>,
    query: serde_json::Map<String, serde_json::Value>,
    content_type: String,
    body: Bytes,
) -> Response {
    use super::nats::PublishError;
    if !hub.may_post(name) {
        hub.stats
            .refused_channel_cap
            .fetch_add(1, Ordering::Relaxed);
        return hub_error(HubError::TooManyChannels(hub.config.max_channels));
    }
    // The id is the stream's sequence, known only once stored; the payload does not hold it.
    let posted = Posted::new(
        &hub.stats,
        0,
        crate::clock::now_ms(),
        headers,
        query,
        content_type,
        body,
    );
    let payload = match super::store::encode(&posted) {
        Ok(payload) => payload,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("cannot encode the request's headers: {e}"),
            );
        }
    };
    drop(posted);
    match cluster.publish(name, payload).await {
        Ok(_) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"ok":true}"#,
        )
            .into_response(),
        Err(e @ PublishError::TooLarge(..)) => json_error(StatusCode::PAYLOAD_TOO_LARGE, e),
        Err(e) => {
            tracing::warn!(
                channel = %crate::url::redact(name),
                "cannot store a posted event in JetStream: {}",
                crate::error::chain(&e)
            );
            let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, crate::error::chain(&e));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
            response
        }
    }
}

async fn subscribe(
    State(hub): State<Arc<Hub>>,
    axum::Extension(peer): axum::Extension<Peer>,
    ChannelName(name): ChannelName,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let wants_stream = text(&headers, "accept").is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        // The page holds no events itself; its stream asks for the token like any subscriber.
        return page(PAGE);
    }
    if !authorized(&headers, &hub.config.subscribe_token) {
        hub.stats
            .say_refused_token(client_ip(&hub, &peer, &headers).unwrap_or(peer.addr));
        return unauthorized(&headers);
    }
    let raw = !hub.config.smee_wire
        && (headers.contains_key(crate::source::wire::RAW_OPT_IN)
            || query.get("raw").is_some_and(|v| v == "1"));
    let replay_all = query.get("replay").is_some_and(|v| v == "all");
    let sent_id = text(&headers, "last-event-id").filter(|v| !v.trim().is_empty());
    // Digits past u64 are an id from elsewhere too (above any of ours): told as such.
    let last_seen: Option<u64> = sent_id.map(str::trim).and_then(|v| {
        v.parse()
            .ok()
            .or_else(|| v.bytes().all(|b| b.is_ascii_digit()).then_some(u64::MAX))
    });
    if let Some(sent) = sent_id.filter(|_| last_seen.is_none())
        && let Some(n) = hub.resume_warning()
    {
        tracing::warn!(
            channel = %crate::url::redact(&name),
            // As one with no `Last-Event-ID` (helper-156: "new events only" was said of one
            // given the backlog of a channel no follower had been handed an event of).
            "a subscriber resumed after {:?}, not an event id of this server: taken as one \
             with no place to resume from (what comes after it; what the channel keeps, if no \
             follower has been handed an event of it yet) ({}: {n} so far)",
            crate::text::escape_control(&sent.chars().take(64).collect::<String>()),
            super::hub::RESUME_WARNINGS
        );
    }
    // With `--nats-url`, an id above everything fed may be from a stream since reset: ask the
    // stream where it is (a lagging replica's feed is merely behind it).
    let stream_last = match (&hub.cluster, last_seen) {
        (Some(cluster), Some(seen)) if !replay_all && seen > hub.fed_upto() => {
            cluster.stream_last_sequence().await
        }
        _ => None,
    };
    let subscription =
        match hub.subscribe(&name, last_seen, replay_all, raw, peer.kill, stream_last) {
            Ok(subscription) => subscription,
            Err(e) => return hub_error(e),
        };
    let pings = subscription_pings(hub.config.ping);
    let body = futures::stream::unfold(
        (subscription, pings),
        |(mut subscription, mut pings)| async move {
            let chunk = subscription.next(&mut pings).await?;
            Some((Ok::<_, std::io::Error>(chunk), (subscription, pings)))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

fn subscription_pings(every: std::time::Duration) -> tokio::time::Interval {
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings
}

/// `/healthz`, in the relay's shape (`service::health`): `200 {"status":"ok"}`, or `503
/// {"status":"unhealthy","reasons":[...]}`, so one check fits both.
async fn healthz(State(hub): State<Arc<Hub>>) -> Response {
    let mut reasons = Vec::new();
    if let Some(cluster) = &hub.cluster
        && let Err(reason) = cluster.health()
    {
        reasons.push(reason.to_string());
    }
    if !hub.stats.store_healthy.load(Ordering::Relaxed) {
        reasons.push("cannot write to --state-dir (disk full?); retried every second".to_owned());
    }
    if hub.stats.refusing_for_memory() {
        reasons.push(format!(
            "posts refused in the last {}: the memory budget (--max-memory) is full",
            humantime::format_duration(super::hub::MEMORY_REFUSALS_UNHEALTHY)
        ));
    }
    let (status, body) = if reasons.is_empty() {
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unhealthy", "reasons": reasons}),
        )
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    super::hub::warn_evicting(&hub.stats);
    let mut text = render_metrics(&hub.stats, hub.config.max_memory);
    if let Some(cluster) = &hub.cluster {
        cluster.render_metrics(&mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Prometheus text; labels take only the fixed values below (never a channel id).
fn render_metrics(s: &Stats, limit: usize) -> String {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, values: &[(&str, u64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in values {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    metric(
        "smee_relay_serve_channels",
        "gauge",
        "Channels held.",
        &[("", s.channels.load(Ordering::Relaxed) as u64)],
    );
    metric(
        "smee_relay_serve_subscribers",
        "gauge",
        "Open subscriptions.",
        &[("", s.subscribers.load(Ordering::Relaxed) as u64)],
    );
    metric(
        "smee_relay_serve_connections",
        "gauge",
        "Open connections.",
        &[("", s.connections.load(Ordering::Relaxed) as u64)],
    );
    metric(
        "smee_relay_serve_bytes_held",
        "gauge",
        "Bytes held for clients (replay, frames, channels, subscribers, bodies being read).",
        &[("", s.held.load(Ordering::Relaxed) as u64)],
    );
    metric(
        "smee_relay_serve_bytes_reading",
        "gauge",
        "Of the bytes held, bodies still being read (at most half of --max-memory).",
        &[("", s.reading.load(Ordering::Relaxed) as u64)],
    );
    metric(
        "smee_relay_serve_memory_limit_bytes",
        "gauge",
        "--max-memory.",
        &[("", limit as u64)],
    );
    metric(
        "smee_relay_serve_posts_total",
        "counter",
        "Posts stored (with --nats-url: events read from the stream, every replica's).",
        &[("", get(&s.posts))],
    );
    metric(
        "smee_relay_serve_evicted_events_total",
        "counter",
        "Events dropped from replay buffers, by reason.",
        &[
            ("{reason=\"memory\"}", get(&s.evicted_memory)),
            ("{reason=\"age\"}", get(&s.evicted_age)),
            ("{reason=\"count\"}", get(&s.evicted_count)),
            ("{reason=\"channel_ttl\"}", get(&s.evicted_ttl)),
        ],
    );
    metric(
        "smee_relay_serve_channels_expired_total",
        "counter",
        "Channels dropped after --channel-ttl without use.",
        &[("", get(&s.channels_expired))],
    );
    metric(
        "smee_relay_serve_shed_connections_total",
        "counter",
        "Connections closed by the server, by reason.",
        &[
            ("{reason=\"max_connections\"}", get(&s.shed_max_connections)),
            ("{reason=\"read_timeout\"}", get(&s.shed_read_timeout)),
            ("{reason=\"write_stall\"}", get(&s.shed_write_stall)),
            ("{reason=\"lagging_subscriber\"}", get(&s.shed_lagging)),
            ("{reason=\"tls_handshake\"}", get(&s.shed_tls_handshake)),
        ],
    );
    metric(
        "smee_relay_serve_refused_total",
        "counter",
        "Requests refused, by reason.",
        &[
            ("{reason=\"max_channels\"}", get(&s.refused_channel_cap)),
            (
                "{reason=\"max_subscribers\"}",
                get(&s.refused_subscriber_cap),
            ),
            ("{reason=\"memory\"}", get(&s.refused_memory)),
            ("{reason=\"allow_post_from\"}", get(&s.refused_forbidden)),
            ("{reason=\"token\"}", get(&s.refused_token)),
        ],
    );
    metric(
        "smee_relay_serve_gaps_total",
        "counter",
        "Subscribers told of a gap (event: gap): events evicted before they resumed, or an id not this server's.",
        &[("", get(&s.gaps))],
    );
    metric(
        "smee_relay_serve_headers_dropped_total",
        "counter",
        "Posted headers dropped: a value that is not UTF-8 text, or a name that is one of the frame's own fields.",
        &[("", get(&s.headers_dropped))],
    );
    metric(
        "smee_relay_serve_store_errors_total",
        "counter",
        "Failed writes to --state-dir.",
        &[("", get(&s.store_errors))],
    );
    metric(
        "smee_relay_serve_store_healthy",
        "gauge",
        "1 while writes to --state-dir work.",
        &[("", u64::from(s.store_healthy.load(Ordering::Relaxed)))],
    );
    out
}

/// smee's `query` object from the POST's parameters, as Express's `req.query` makes it on
/// smee.io: a name given more than once gets an array of its values, in order (a later value
/// replaced the earlier ones before, and `?a=1&a=2` reached the target as `a=2`).
fn query_object(query: Vec<(String, String)>) -> serde_json::Map<String, serde_json::Value> {
    let mut params = serde_json::Map::new();
    for (name, value) in query {
        match params.get_mut(&name) {
            Some(serde_json::Value::Array(values)) => values.push(value.into()),
            Some(first) => *first = serde_json::Value::Array(vec![first.take(), value.into()]),
            None => {
                params.insert(name, value.into());
            }
        }
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (helper-130): `Host: example.org:abc` went into `/new`'s redirect.
    #[test]
    fn regression_a_host_with_a_port_that_is_none_was_echoed() {
        for host in [
            "example.org",
            "example.org:8080",
            "127.0.0.1:3000",
            "[::1]:8080",
        ] {
            assert!(is_host(host), "{host}");
        }
        for host in [
            "example.org:abc",
            "example.org:",
            "example.org:99999",
            "example.org:0",
            "a@example.org",
            "a b",
            "",
            "example.org/x",
        ] {
            assert!(!is_host(host), "{host}");
        }
    }

    #[test]
    fn channel_ids_are_long_varied_and_url_safe() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| channel_id().unwrap()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert!(id.len() >= 16 && valid_name(id), "{id}");
        }
    }
}
