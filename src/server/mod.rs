//! `smee-relay serve`: a self-hosted, smee-compatible channel server, fit to face the internet.
//!
//! What it adds over smee.io, and why:
//! - **replay**: event ids are unique per channel and keep growing across server restarts (they
//!   start from the clock), so a client reconnecting with `Last-Event-ID` gets what it missed,
//!   including events posted while nobody was connected;
//! - **raw bodies**: a subscriber that sends `x-smee-relay-raw: 1` gets `bodyB`, the exact
//!   bytes of every POST, in place of `body`, so any sender's signature verifies and form or
//!   binary bodies survive. Others get smee's standard shape, with no key that smee-client would
//!   forward as a header. `--smee-wire` ([`ServeConfig::smee_wire`]) ignores the opt-in, so
//!   that a relay (or the benchmark) sees exactly what smee.io would send it;
//! - **one memory budget** (`--max-memory`) for replay buffers, channels, subscribers and bodies
//!   being read ([`hub`]); replay data is evicted from the channel holding the most, oldest first, and counted; a subscriber that
//!   loses events to eviction is disconnected and resumes with `Last-Event-ID`;
//! - **hostile clients shed**: a cap on connections, channels and subscribers per channel, read
//!   timeouts for heads and bodies, a write-stall timeout for sockets that stop reading;
//! - **unguessable channels** from the OS CSPRNG, optional tokens, a CIDR allow-list for posts;
//! - **TLS** with rustls, reloaded on SIGHUP ([`tls`]); a live channel page ([`http`]).
//!
//! This module owns the accept loop and connection lifecycle (limits, TLS handshake, timeouts,
//! graceful drain). Requests are handled in [`http`], buffers in [`hub`], the disk in [`store`].
//! Buffers live in memory, and with `--state-dir` also on disk (`serve.redb`): a post is
//! answered 200 only once it is stored, and a restarted server replays what it had. With
//! `--nats-url` ([`nats`]) the history is a JetStream stream shared by every replica instead:
//! posts are answered once the stream holds them, and the buffers are fed from the stream.

mod http;
mod hub;
mod io;
mod nats;
mod store;
mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::secret::SecretString;

pub use nats::{NatsConfig, NatsError};
pub use store::StoreError;
pub use tls::{TlsError, TlsFiles};

/// How the server is run.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest POST body accepted.
    pub max_body: usize,
    /// Most events kept per channel for replay.
    pub max_events: usize,
    /// Everything held for clients (replay buffers, channels, subscribers, bodies being read)
    /// stays within this many bytes; the oldest replay data of the channel holding the most goes first.
    pub max_memory: usize,
    /// How long an event is kept for replay.
    pub retain: Duration,
    /// Most channels; past it, new channels are refused with 503.
    pub max_channels: usize,
    /// A channel with no post and no subscriber for this long is dropped with its events.
    pub channel_ttl: Duration,
    /// Most subscribers of one channel.
    pub max_subscribers: usize,
    /// Most open connections; more are closed as they come.
    pub max_connections: usize,
    /// A request head, or a whole body, must arrive within this (SSE streams are exempt).
    pub read_timeout: Duration,
    /// A socket that takes no bytes for this long is closed (a subscriber that stopped reading).
    pub write_stall: Duration,
    /// How long shutdown waits for connections to finish their response.
    pub drain: Duration,
    /// Required from subscribers (`GET`), if set.
    pub subscribe_token: Option<SecretString>,
    /// Required from posters (`POST`), if set.
    pub post_token: Option<SecretString>,
    /// Posts are accepted only from these networks, if set.
    pub allow_post_from: Vec<ipnet::IpNet>,
    /// Believe `X-Forwarded-For`/`-Proto`/`-Host` (only behind a proxy that sets them).
    pub trust_proxy: bool,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Interval of `ping` events (smee.io: 30 s).
    pub ping: Duration,
    /// Keep buffers on disk here, so they survive a restart of the server.
    pub state_dir: Option<std::path::PathBuf>,
    /// Share channels with other replicas through NATS JetStream: the stream is the history
    /// (`state_dir` is not used then).
    pub nats: Option<NatsConfig>,
    /// Ignore the raw opt-in: every subscriber gets smee.io's frame shape, so that a relay (or a
    /// benchmark) sees exactly what it would get through smee.io.
    pub smee_wire: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_body: 25 << 20,
            max_events: 1000,
            max_memory: 256 << 20,
            retain: Duration::from_secs(3600),
            max_channels: 10_000,
            channel_ttl: Duration::from_secs(7 * 24 * 3600),
            max_subscribers: 256,
            max_connections: 1024,
            read_timeout: Duration::from_secs(10),
            write_stall: Duration::from_secs(60),
            drain: Duration::from_secs(5),
            subscribe_token: None,
            post_token: None,
            allow_post_from: Vec::new(),
            trust_proxy: false,
            tls: None,
            ping: Duration::from_secs(30),
            state_dir: None,
            nats: None,
            smee_wire: false,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bind(crate::error::Listen),
    #[error("cannot read the listening address")]
    Address(#[source] std::io::Error),
    #[error("cannot open the server's buffers")]
    Store(#[source] StoreError),
    #[error("cannot load the TLS certificate")]
    Tls(#[source] TlsError),
    #[error("cannot join the cluster")]
    Nats(#[source] NatsError),
}

impl ServeError {
    /// Nothing to retry: the user must act (a wrong address, NATS not running, a bad
    /// certificate), so `main` exits 2.
    pub fn needs_the_user(&self) -> bool {
        matches!(self, Self::Nats(_))
    }
}

/// Who is on the other end of a connection, for the allow-list and redirects.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// The socket's remote address.
    addr: IpAddr,
    /// Whether the connection is TLS.
    tls: bool,
    /// Closes this connection (a subscriber that lost events to eviction).
    kill: CancellationToken,
}

/// Serve on `listener` until `cancel` (tests; no reload signal).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    serve_with_reload(listener, config, cancel, Arc::new(Notify::new())).await
}

/// Serve on `listener` until `cancel`; each `reload` notification re-reads the TLS files.
pub async fn serve_with_reload(
    listener: tokio::net::TcpListener,
    config: ServeConfig,
    cancel: CancellationToken,
    reload: Arc<Notify>,
) -> Result<(), ServeError> {
    let stats = Arc::new(hub::Stats::default());
    let cluster = match &config.nats {
        Some(nats) => Some(Arc::new(
            nats::Cluster::connect(nats, &config)
                .await
                .map_err(ServeError::Nats)?,
        )),
        None => None,
    };
    let (store, restored) = match &config.state_dir {
        Some(_) if cluster.is_some() => (None, Default::default()),
        Some(dir) => {
            let store = store::Store::open(dir).map_err(ServeError::Store)?;
            let restored = store.load(&stats).map_err(ServeError::Store)?;
            info!(path = %store.path.display(), channels = restored.channels.len(), "server buffers restored");
            (Some(Arc::new(store)), restored)
        }
        None => (None, Default::default()),
    };
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(
            tls::Tls::new(files.clone()).map_err(ServeError::Tls)?,
        )),
        None => None,
    };
    // Streams end on `stop`, a child of `cancel`, so they finish with their final comment.
    let stop = cancel.child_token();
    let hub = Arc::new(hub::Hub::new(
        config.clone(),
        store,
        stats.clone(),
        restored,
        stop.clone(),
        cluster.clone(),
    ));
    let sweeper = tokio::spawn(hub::sweeper(hub.clone(), Duration::from_secs(1)));
    if let Some(cluster) = cluster {
        tokio::spawn(nats::feed(cluster, hub.clone()));
    }
    let router = http::router(hub.clone());
    let addr = listener.local_addr().map_err(ServeError::Address)?;
    // Whether anyone may post or subscribe, at a glance (helper-155: nothing said it).
    let tokens = match (
        config.post_token.is_some(),
        config.subscribe_token.is_some(),
    ) {
        (true, true) => "posts and subscribers",
        (true, false) => "posts",
        (false, true) => "subscribers",
        (false, false) => "none",
    };
    info!(%addr, tls = tls.is_some(), tokens, "serving smee channels");
    if hub.max_body() < hub.config.max_body {
        warn!(
            "--max-body {} is more than half of --max-memory {}, all that bodies being read may \
             hold: bodies over {} get 413",
            hub.config.max_body,
            hub.config.max_memory,
            hub.max_body()
        );
    }

    let mut connections = tokio::task::JoinSet::new();
    let closing = CancellationToken::new();
    let mut accept_errors = crate::clock::Tally::default();
    loop {
        let (socket, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = reload.notified() => {
                match &tls {
                    Some(tls) => match tls.reload() {
                        Ok(()) => info!("SIGHUP: TLS certificate reloaded"),
                        Err(e) => warn!("SIGHUP: keeping the old TLS certificate: {}", crate::error::chain(&e)),
                    },
                    None => info!("SIGHUP: nothing to reload (serve re-reads only its TLS certificate)"),
                }
                continue;
            }
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of fds and the like: wait a little rather than spin, and say it
                    // once a minute, not 20 times a second for as long as a flood lasts.
                    if let Some(n) = accept_errors.add(1, std::time::Instant::now()) {
                        let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                            format!("; the open-file limit ({}) is too low for --max-connections {}: raise it (LimitNOFILE=, ulimit -n)", open_file_limit().map_or("?".into(), |n| n.to_string()), config.max_connections)
                        } else {
                            String::new()
                        };
                        warn!("cannot accept connections: {e} ({} since the last report){hint}", crate::error::count(n as usize, "time", "times"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if stats.connections.load(Ordering::Relaxed) >= config.max_connections {
            stats.shed_max_connections.fetch_add(1, Ordering::Relaxed);
            stats.say_shed(&format!(
                "a new connection past --max-connections {}",
                config.max_connections
            ));
            debug!(%remote, "connection limit reached: closing a new connection");
            drop(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let peer = Peer {
            addr: remote.ip(),
            tls: tls.is_some(),
            kill: CancellationToken::new(),
        };
        let kill = peer.kill.clone();
        let guard = ConnectionGuard::new(&stats);
        let service = router.clone().layer(axum::Extension(peer));
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let (config, stats, closing) = (config.clone(), stats.clone(), closing.clone());
        connections.spawn(async move {
            let _guard = guard;
            let timed = io::Timed::new(socket, config.write_stall);
            match acceptor {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(config.read_timeout, acceptor.accept(timed)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            connection(stream, service, &config, &stats, closing, kill).await
                        }
                        Ok(Err(_)) => {
                            stats.shed_tls_handshake.fetch_add(1, Ordering::Relaxed);
                            stats.say_shed("a failed TLS handshake (not TLS, or broken off)");
                        }
                        Err(_) => {
                            stats.shed_tls_handshake.fetch_add(1, Ordering::Relaxed);
                            stats.say_shed(&format!(
                                "no TLS handshake within --read-timeout {}",
                                humantime::format_duration(config.read_timeout)
                            ));
                        }
                    }
                }
                None => connection(timed, service, &config, &stats, closing, kill).await,
            }
        });
    }
    // Drain: streams send their final comment and end, idle connections close, answers in
    // progress get `drain` to finish.
    stop.cancel();
    closing.cancel();
    info!(open = connections.len(), "draining connections");
    let drained = tokio::time::timeout(config.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "connections still open after the drain time: closing them"
        );
        connections.shutdown().await;
    }
    // Evictions since the last sweep leave the disk too (and are noted, for the gaps a
    // restarted server tells): else the next start would restore them as kept.
    hub.sweep().await;
    // The sweeper holds the hub, and so the store's file: returned, the server has let go of
    // it (a server started again at once on the same --state-dir found it still open).
    let _ = sweeper.await;
    // As the relay's own stop line: a stop that ended is told apart from one cut short.
    if hub.store.is_some() {
        info!("stopped; the channels' events are kept for the next start");
    } else {
        info!("stopped; the channels' events were in memory only (no --state-dir)");
    }
    Ok(())
}

/// Counts an open connection for `--max-connections` and `/metrics`.
struct ConnectionGuard(Arc<hub::Stats>);

impl ConnectionGuard {
    fn new(stats: &Arc<hub::Stats>) -> Self {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        Self(stats.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve HTTP/1.1 on one connection until it ends or, after `closing`, its response ends.
async fn connection<S>(
    stream: S,
    service: axum::Router,
    config: &ServeConfig,
    stats: &hub::Stats,
    closing: CancellationToken,
    kill: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.read_timeout)
        // hyper stops asking for more of a response once this much waits for the socket, so
        // a slow reader holds at most this plus one chunk.
        .max_buf_size(64 << 10);
    let service = hyper_util::service::TowerToHyperService::new(service);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // Counted where it was decided; dropping the connection closes the socket.
        _ = kill.cancelled() => return,
        _ = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            stats.shed_read_timeout.fetch_add(1, Ordering::Relaxed);
            stats.say_shed(&format!(
                "a request not read within --read-timeout {}",
                humantime::format_duration(config.read_timeout)
            ));
        } else if io::is_stall(&e) {
            stats.shed_write_stall.fetch_add(1, Ordering::Relaxed);
            // Said as the other sheds are (helper-142: counted only).
            stats.say_shed(&format!(
                "a subscriber that took no bytes for {} (it stopped reading)",
                humantime::format_duration(config.write_stall)
            ));
        }
        debug!("connection ended: {e}");
    }
}

/// The soft open-file limit, if it can be read.
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// Raise the soft open-file limit to the hard one, as Go's runtime and nginx do: under the
/// common soft limit of 1024, `--max-connections` 1024 is never reached, and connections past
/// the limit fail to be accepted rather than being shed (helper-125). Said if still too low.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given, and this process's
    // limit only; a refusal leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    // The server's own files: the listener, the store, the runtime's, a margin.
    let needed = max_connections as u64 + 64;
    if limit.rlim_cur < needed {
        warn!(
            "the open-file limit ({}) is below --max-connections {max_connections} plus the server's own files: connections past it fail to be accepted; raise it (LimitNOFILE= in the unit, ulimit -n) or lower --max-connections",
            limit.rlim_cur
        );
    }
}

/// Bind `addr` and serve (the `serve` command).
pub async fn run(
    addr: SocketAddr,
    config: ServeConfig,
    cancel: CancellationToken,
    reload: Arc<Notify>,
) -> Result<(), ServeError> {
    raise_open_file_limit(config.max_connections);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| {
            ServeError::Bind(crate::error::Listen {
                addr,
                purpose: "",
                flag: "--listen",
                source,
            })
        })?;
    serve_with_reload(listener, config, cancel, reload).await
}
