//! Port self-service actions end to end: the real binary with `run --config`, a fake channel
//! sending the action-run fixtures (signed), local handlers (shell scripts), and a fake Port
//! API recording what Port would: each run's log lines and its terminal status.

mod support;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use support::{FakeChannel, LogWatch, PATIENCE, smee_relay};

const SECRET: &str = "test-secret";
const CLIENT_ID: &str = "test-client-id";

// ---------------------------------------------------------------------------------------------
// A fake Port API
// ---------------------------------------------------------------------------------------------

/// One call Port received (token calls apart).
#[derive(Clone, Debug)]
struct Call {
    method: &'static str,
    path: String,
    body: Value,
    status: u16,
}

#[derive(Default)]
struct PortState {
    calls: Vec<Call>,
    tokens_issued: u32,
    valid_tokens: Vec<String>,
    /// Answer every call, token endpoint included, with 503.
    down: bool,
    /// Calls answered while down.
    refused_while_down: u32,
    /// Runs whose every call gets this status and error.
    refuse_run: HashMap<String, (u16, &'static str)>,
    /// Runs that already have a terminal status (a second one is 422, as in Port).
    finished: Vec<String>,
    /// Scripted answers for the next run calls: (status, x-ratelimit-reset).
    script: VecDeque<(u16, Option<u64>)>,
    /// Entities upserted: (blueprint, run_id query, body).
    entities: Vec<(String, String, Value)>,
}

#[derive(Clone)]
struct FakePort {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<PortState>>,
    changed: Arc<tokio::sync::Notify>,
}

type Shared = (Arc<Mutex<PortState>>, Arc<tokio::sync::Notify>);

impl FakePort {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(PortState::default()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let router = Router::new()
            .route("/v1/auth/access_token", post(token))
            .route("/v1/actions/runs/{run}/logs", post(log))
            .route("/v1/actions/runs/{run}", patch(finish))
            .route("/v1/blueprints/{blueprint}/entities", post(entity))
            .with_state((state.clone(), changed.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            state,
            changed,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut PortState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Wait until `check` holds over the state.
    async fn wait(&self, what: &str, check: impl Fn(&PortState) -> bool) {
        let done = tokio::time::timeout(PATIENCE, async {
            loop {
                let changed = self.changed.notified();
                if check(&self.state.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        })
        .await;
        if done.is_err() {
            panic!(
                "fake Port: {what} did not happen; calls: {:#?}",
                self.calls()
            );
        }
    }

    fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    /// Accepted terminal statuses of `run`.
    fn finishes(&self, run: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == "PATCH" && c.path.ends_with(run) && c.status == 200)
            .map(|c| c.body)
            .collect()
    }

    /// Accepted log messages of `run`, joined.
    fn logs(&self, run: &str) -> String {
        self.calls()
            .into_iter()
            .filter(|c| c.path.contains(&format!("/runs/{run}/logs")) && c.status == 200)
            .map(|c| c.body["message"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_finished(&self, runs: &[&str]) {
        let runs: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
        self.wait(&format!("terminal status of {runs:?}"), move |s| {
            runs.iter().all(|r| s.finished.contains(r))
        })
        .await;
    }
}

fn answer(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

async fn token(State((state, changed)): State<Shared>, body: String) -> Response {
    let mut s = state.lock().unwrap();
    changed.notify_waiters();
    if s.down {
        s.refused_while_down += 1;
        return answer(503, json!({"ok": false, "error": "unavailable"}));
    }
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    if body["clientId"] != CLIENT_ID || body["clientSecret"] != SECRET {
        return answer(401, json!({"ok": false, "error": "unauthorized"}));
    }
    s.tokens_issued += 1;
    let token = format!("token-{}", s.tokens_issued);
    s.valid_tokens.push(token.clone());
    answer(
        200,
        json!({"ok": true, "accessToken": token, "expiresIn": 3600, "tokenType": "Bearer"}),
    )
}

/// The common part of every run call: auth, down, scripts, refusals. `Err`: answered.
#[allow(clippy::result_large_err)] // a test fake: the answer is built once per call
fn gate(
    s: &mut PortState,
    headers: &HeaderMap,
    method: &'static str,
    path: String,
    run: &str,
    body: &Value,
) -> Result<(), Response> {
    let mut record = |status: u16| {
        s.calls.push(Call {
            method,
            path: path.clone(),
            body: body.clone(),
            status,
        })
    };
    if s.down {
        s.refused_while_down += 1;
        record(503);
        return Err(answer(503, json!({"ok": false, "error": "unavailable"})));
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !s.valid_tokens.iter().any(|t| t == bearer) {
        record(401);
        return Err(answer(401, json!({"ok": false, "error": "unauthorized"})));
    }
    if let Some((status, reset)) = s.script.pop_front() {
        record(status);
        let mut response = answer(status, json!({"ok": false, "error": "scripted"}));
        if let Some(reset) = reset {
            response
                .headers_mut()
                .insert("x-ratelimit-reset", reset.to_string().parse().unwrap());
        }
        return Err(response);
    }
    if let Some((status, error)) = s.refuse_run.get(run).copied() {
        record(status);
        return Err(answer(
            status,
            json!({"ok": false, "error": error, "message": "refused"}),
        ));
    }
    Ok(())
}

async fn log(
    State((state, changed)): State<Shared>,
    UrlPath(run): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut s = state.lock().unwrap();
    changed.notify_waiters();
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    let path = format!("/v1/actions/runs/{run}/logs");
    if let Err(response) = gate(&mut s, &headers, "POST", path.clone(), &run, &body) {
        return response;
    }
    if s.finished.contains(&run) {
        s.calls.push(Call {
            method: "POST",
            path,
            body,
            status: 422,
        });
        return answer(422, json!({"ok": false, "error": "run_already_finished"}));
    }
    s.calls.push(Call {
        method: "POST",
        path,
        body,
        status: 200,
    });
    answer(200, json!({"ok": true}))
}

async fn finish(
    State((state, changed)): State<Shared>,
    UrlPath(run): UrlPath<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut s = state.lock().unwrap();
    changed.notify_waiters();
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    let path = format!("/v1/actions/runs/{run}");
    if let Err(response) = gate(&mut s, &headers, "PATCH", path.clone(), &run, &body) {
        return response;
    }
    let status = if s.finished.contains(&run) { 422 } else { 200 };
    if status == 200 {
        s.finished.push(run);
    }
    s.calls.push(Call {
        method: "PATCH",
        path,
        body,
        status,
    });
    answer(status, json!({"ok": status == 200}))
}

async fn entity(
    State((state, changed)): State<Shared>,
    UrlPath(blueprint): UrlPath<String>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut s = state.lock().unwrap();
    changed.notify_waiters();
    let body: Value = serde_json::from_str(&body).unwrap_or_default();
    let run = query.get("run_id").cloned().unwrap_or_default();
    let path = format!("/v1/blueprints/{blueprint}/entities");
    if let Err(response) = gate(&mut s, &headers, "POST", path.clone(), &run, &body) {
        return response;
    }
    let status = if blueprint == "Refused" { 422 } else { 200 };
    s.calls.push(Call {
        method: "POST",
        path,
        body: body.clone(),
        status,
    });
    if status == 200 && query.get("upsert").map(String::as_str) == Some("true") {
        s.entities.push((blueprint, run, body));
    }
    answer(
        status,
        json!({"ok": status == 200, "error": "invalid_request"}),
    )
}

// ---------------------------------------------------------------------------------------------
// The relay and its handlers
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/port/actions/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// A smee frame carrying the text `text` exactly (`rawdata`), with Port's signature headers.
fn text_frame(text: &str, timestamp: u64, signature: &str) -> String {
    format!(
        r#"{{"x-port-timestamp":"{timestamp}","x-port-signature":"{signature}","content-type":"text/plain","rawdata":{}}}"#,
        serde_json::json!(text)
    )
}

/// A smee frame carrying `body`, signed with `secret` as Port signs (timestamp now).
fn signed_frame(body: &str, secret: &str) -> String {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let signature = sign(secret, &timestamp, body);
    format!(
        r#"{{"x-port-timestamp":"{timestamp}","x-port-signature":"{signature}","content-type":"application/json","body":{body}}}"#
    )
}

/// A handler script in `dir`: records each execution (run id) in `dir/executions`, its
/// environment in `dir/env-<run>`, its stdin in `dir/stdin-<run>`, then runs `tail`.
fn handler(dir: &Path, name: &str, tail: &str) -> PathBuf {
    let path = dir.join(name);
    let dir = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo \"$PORT_RUN_ID\" >> {dir}/executions\n\
             env > {dir}/env-$PORT_RUN_ID\n\
             cat > {dir}/stdin-$PORT_RUN_ID\n\
             echo \"run $PORT_RUN_ID of $PORT_ACTION on [$PORT_ENTITY]\"\n\
             echo \"to stderr\" >&2\n\
             {tail}\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn executions(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("executions"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

struct Setup {
    channel: FakeChannel,
    port: FakePort,
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    /// A fake channel and Port, and a config with `actions` (TOML) under the usual header.
    async fn new(actions: &str) -> Self {
        let channel = FakeChannel::start().await;
        let port = FakePort::start().await;
        let dir = support::fresh_state_dir();
        let config = dir.join("config.toml");
        let actions = actions.replace("DIR", &dir.display().to_string());
        std::fs::write(
            &config,
            format!(
                r#"
[[channel]]
url = "{channel}"
pipeline = true

[port]
client_id_env = "TEST_PORT_CLIENT_ID"
client_secret_env = "TEST_PORT_SECRET"
api_url = "{api}"

{actions}
"#,
                channel = channel.url("ActionsChannel"),
                api = port.url(),
            ),
        )
        .unwrap();
        Self {
            channel,
            port,
            dir,
            config,
        }
    }

    async fn start(&self) -> Daemon {
        self.start_with(&[]).await
    }

    /// Turn on `[port] report_automation_runs` in the config (for the next start or reload).
    fn report_automation_runs(&self) {
        self.edit_config(&[]);
    }

    /// Rewrite the config with each `(from, to)` replaced, and Automation runs reported.
    fn edit_config(&self, replacements: &[(&str, &str)]) {
        let mut config = std::fs::read_to_string(&self.config)
            .unwrap()
            .replace("[port]\n", "[port]\nreport_automation_runs = true\n");
        for (from, to) in replacements {
            config = config.replace(from, to);
        }
        std::fs::write(&self.config, config).unwrap();
    }

    async fn start_with(&self, flags: &[&str]) -> Daemon {
        let before = self.channel.connections();
        let mut child = smee_relay()
            .args(["run", "--config"])
            .arg(&self.config)
            .args(flags)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("TEST_PORT_SECRET", SECRET)
            .env("TEST_PORT_CLIENT_ID", CLIENT_ID)
            .env("PORT_CLIENT_SECRET", "leaked-if-seen")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let logs = LogWatch::new(child.stderr.take().unwrap());
        self.channel.wait_connections(before + 1).await;
        logs.wait_for(&["connected to channel"]).await;
        Daemon { child, logs }
    }

    /// `smee-relay check --config` on this setup's config with `args`, which must pass: its
    /// stdout.
    async fn check(&self, args: &[&str]) -> String {
        let out = smee_relay()
            .args(["check", "--config"])
            .arg(&self.config)
            .args(args)
            .env("TEST_PORT_SECRET", SECRET)
            .env("TEST_PORT_CLIENT_ID", CLIENT_ID)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, id: u64, fixture_name: &str) {
        self.channel
            .send_webhook(id, &signed_frame(&fixture(fixture_name), SECRET));
    }
}

struct Daemon {
    child: tokio::process::Child,
    logs: LogWatch,
}

impl Daemon {
    async fn stop(mut self) -> LogWatch {
        support::signal(&self.child, "TERM");
        let status = self.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0));
        self.logs
    }
}

/// A signed run sent now (fixture 02, as event 2) runs and is reported; nothing ran for the
/// event before it, and nothing was reported for its run `not`.
async fn only_the_next_run_goes_through(setup: &Setup, not: &str) {
    setup.send(2, "02-trigger-data");
    setup.port.wait_finished(&["r_act02trigger"]).await;
    assert_eq!(executions(&setup.dir), ["r_act02trigger"]);
    assert!(
        setup.port.calls().iter().all(|c| !c.path.contains(not)),
        "nothing reported for run {not}"
    );
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let done = tokio::time::timeout(PATIENCE, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "{what} did not happen");
}

const ALL_FOUR: &str = r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/restart.sh"]

[[action]]
identifier = "scaffold_service"
command = ["DIR/scaffold.sh"]

[[action]]
when = '.port_context.runId != null'
command = ["DIR/restart.sh"]
"#;

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_four_fixtures_each_run_their_handler_once_and_report_logs_and_one_status() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(
        &setup.dir,
        "restart.sh",
        r#"echo '::port:: {"link": "https://ci.example/1", "statusLabel": "restarted"}'"#,
    );
    handler(
        &setup.dir,
        "scaffold.sh",
        r#"echo '::port:: {"entity": {"blueprint": "Service", "identifier": "billing-api", "title": "Billing API", "properties": {"language": "rust"}}}'"#,
    );
    let daemon = setup.start().await;
    let files = [
        ("01-legacy-run-message", "r_act01legacy"),
        ("02-trigger-data", "r_act02trigger"),
        ("03-port-context", "r_act03context"),
        ("04-create-no-entity", "r_act04create"),
    ];
    for (n, (file, _)) in files.iter().enumerate() {
        setup.send(n as u64 + 1, file);
    }
    let runs: Vec<&str> = files.iter().map(|(_, run)| *run).collect();
    setup.port.wait_finished(&runs).await;

    // Delivered again after it finished: not executed, not reported again.
    setup.send(5, "01-legacy-run-message");
    daemon
        .logs
        .wait_for(&["r_act01legacy", "run delivered again (done, SUCCESS)"])
        .await;

    let mut executed = executions(&setup.dir);
    executed.sort();
    let mut expected: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
    expected.sort();
    assert_eq!(executed, expected, "each run executed exactly once");
    for (file, run) in files {
        let finishes = setup.port.finishes(run);
        assert_eq!(finishes.len(), 1, "{run}: one terminal status");
        assert_eq!(finishes[0]["status"], "SUCCESS", "{run}");
        assert!(
            finishes[0]["summary"]
                .as_str()
                .unwrap()
                .starts_with("exit 0 in"),
            "{finishes:?}"
        );
        let logs = setup.port.logs(run);
        assert!(logs.contains(&format!("run {run} of")), "{run}: {logs}");
        assert!(
            logs.contains("to stderr"),
            "{run}: stderr is logged too: {logs}"
        );
        assert!(
            !logs.contains("::port::"),
            "directives are not log lines: {logs}"
        );
        // The handler got the exact body, and no Port credentials.
        let stdin = std::fs::read_to_string(setup.dir.join(format!("stdin-{run}"))).unwrap();
        assert_eq!(stdin, fixture(file), "{run}: the body on stdin");
        let env = std::fs::read_to_string(setup.dir.join(format!("env-{run}"))).unwrap();
        assert!(env.contains(&format!("PORT_RUN_ID={run}")), "{env}");
        for secret in [SECRET, CLIENT_ID, "leaked-if-seen", "token-"] {
            assert!(
                !env.contains(secret),
                "{run}: the handler saw {secret}: {env}"
            );
        }
        assert!(!env.contains("TEST_PORT"), "{env}");
    }
    // Legacy and trigger-data shapes name the action; the CREATE run has no entity.
    let env = std::fs::read_to_string(setup.dir.join("env-r_act04create")).unwrap();
    assert!(env.lines().any(|l| l == "PORT_ENTITY="), "{env}");
    assert!(
        env.lines().any(|l| l == "PORT_ACTION=scaffold_service"),
        "{env}"
    );
    assert!(
        setup
            .port
            .logs("r_act01legacy")
            .contains("of restart_deployment on [notification-service-prod]")
    );
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["link"], json!(["https://ci.example/1"]));
    assert_eq!(finish["statusLabel"], "restarted");
    // The entity tied to the CREATE run, upserted before its status.
    let entities = setup.port.with(|s| s.entities.clone());
    assert_eq!(entities.len(), 1, "{entities:?}");
    assert_eq!(entities[0].0, "Service");
    assert_eq!(entities[0].1, "r_act04create");
    assert_eq!(entities[0].2["identifier"], "billing-api");
    assert!(entities[0].2.get("blueprint").is_none());
    // Nothing is sent for a run after its terminal status.
    for run in runs {
        let calls = setup.port.calls();
        let last_finish = calls
            .iter()
            .rposition(|c| c.method == "PATCH" && c.path.ends_with(run))
            .unwrap();
        assert!(
            !calls[last_finish + 1..]
                .iter()
                .any(|c| c.path.contains(&format!("/runs/{run}"))),
            "{run}: a call after its terminal status"
        );
    }
    let logs = daemon.stop().await;
    for secret in [SECRET, "token-1"] {
        assert!(!logs.all().contains(secret), "{secret} in the relay's logs");
    }

    // `events list` shows the runs with their status.
    let listed = smee_relay()
        .args(["events", "list", "--state-dir"])
        .arg(setup.dir.join("state"))
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for run in [
        "r_act01legacy",
        "r_act02trigger",
        "r_act03context",
        "r_act04create",
    ] {
        let line = listed
            .lines()
            .find(|l| l.starts_with(run))
            .unwrap_or_else(|| panic!("{run} not listed:\n{listed}"));
        assert!(
            line.contains("SUCCESS") && line.contains("exit 0 in"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn check_event_shows_the_handler_and_what_would_be_reported() {
    let setup = Setup::new(ALL_FOUR).await;
    let fixtures = format!("{}/tests/fixtures/port/actions", env!("CARGO_MANIFEST_DIR"));
    let setup = &setup;
    let check = |file: &str| {
        let event = match file.starts_with('/') {
            true => file.to_string(),
            false => format!("{fixtures}/{file}.json"),
        };
        async move { setup.check(&["--event", &event]).await }
    };
    let out = check("01-legacy-run-message").await;
    assert!(
        out.contains("action run r_act01legacy (action restart_deployment"),
        "{out}"
    );
    assert!(out.contains("restart.sh"), "{out}");
    assert!(
        out.contains("PORT_ENTITY=notification-service-prod"),
        "{out}"
    );
    assert!(
        out.contains("PATCH /v1/actions/runs/r_act01legacy"),
        "{out}"
    );
    let out = check("04-create-no-entity").await;
    assert!(
        out.contains("scaffold.sh") && out.contains("PORT_ENTITY= "),
        "{out}"
    );
    let out = check("03-port-context").await;
    assert!(out.contains("action run r_act03context"), "{out}");
    // Regression (a new user's finding): the last line had no newline when no run was found,
    // so the shell's prompt followed it on the same line.
    assert!(out.ends_with('\n') && !out.ends_with("\n\n"), "{out:?}");
    let plain = setup.dir.join("plain.json");
    std::fs::write(&plain, r#"{"ref":"main"}"#).unwrap();
    let out = check(plain.to_str().unwrap()).await;
    assert!(out.contains("action run: none"), "{out}");
    assert!(out.ends_with('\n') && !out.ends_with("\n\n"), "{out:?}");
}

/// Regression (an adversary's finding): `check` said ok for a command handler that does not
/// exist or cannot be executed; the first run then failed with "cannot start". It is a
/// warning (the daemon's environment may differ from the shell's, so not an error).
#[tokio::test]
async fn regression_check_warns_of_a_command_handler_that_cannot_run() {
    let setup = Setup::new(
        r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/missing.sh"]

[[action]]
identifier = "scaffold_service"
command = ["DIR/not-executable.sh"]

[[action]]
when = '.port_context.runId != null'
command = ["no-such-program-anywhere", "--flag"]

[[action]]
identifier = "a_directory"
command = ["DIR/"]
"#,
    )
    .await;
    std::fs::write(setup.dir.join("not-executable.sh"), "#!/bin/sh\n").unwrap();
    let stdout = setup.check(&[]).await;
    for (action, problem) in [
        ("restart_deployment", "missing.sh: no such file"),
        ("scaffold_service", "not-executable.sh: not executable"),
        (
            "when .port_context.runId != null",
            "no-such-program-anywhere: not found in PATH",
        ),
        // Regression (helper-132): a directory was "not executable".
        ("a_directory", ": a directory, not a program"),
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(action) && l.contains("warning") && l.contains(problem)),
            "{action}: {stdout}"
        );
    }
    // Regression (helper-133): with no rules, advice on reconciling them.
    assert!(!stdout.contains("reconciliation"), "{stdout}");
}

#[tokio::test]
async fn a_failing_handler_reports_failure_with_its_exit_code() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "echo 'pod not found'; exit 3");
    let _daemon = setup.start().await;
    setup.send(1, "02-trigger-data");
    setup.port.wait_finished(&["r_act02trigger"]).await;
    let finish = &setup.port.finishes("r_act02trigger")[0];
    assert_eq!(finish["status"], "FAILURE");
    let summary = finish["summary"].as_str().unwrap();
    assert!(summary.starts_with("exit code 3 after "), "{summary}");
    assert!(setup.port.logs("r_act02trigger").contains("pod not found"));
}

/// Regression (an adversary's finding): an action whose `when` failed (a jq error, or past its
/// bound) counted as "does not match", so a later `[[action]]` ran the run with the wrong
/// handler. The run fails instead, naming the condition, and no handler runs.
#[tokio::test]
async fn regression_a_failing_when_fails_the_run_and_runs_no_later_handler() {
    let setup = Setup::new(
        r#"
[jq]
timeout = "1s"

[[action]]
when = 'last(repeat(1)) == 1'
command = ["DIR/restart.sh"]

[[action]]
when = '.port_context.runId != null'
command = ["DIR/restart.sh"]
"#,
    )
    .await;
    handler(&setup.dir, "restart.sh", "exit 0");
    let _daemon = setup.start().await;
    setup.send(1, "03-port-context");
    setup.port.wait_finished(&["r_act03context"]).await;
    let finish = &setup.port.finishes("r_act03context")[0];
    assert_eq!(finish["status"], "FAILURE", "{finish}");
    let summary = finish["summary"].as_str().unwrap();
    assert!(
        summary.contains("when last(repeat(1)) == 1") && summary.contains("1s budget"),
        "{summary}"
    );
    assert!(executions(&setup.dir).is_empty(), "no handler runs");
}

/// Wait until the process whose pid `pidfile` holds is gone (or a zombie nobody reaps).
async fn wait_gone(pidfile: &Path) {
    let pid = std::fs::read_to_string(pidfile).unwrap().trim().to_string();
    wait_until("the handler's child is gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    })
    .await;
}

#[tokio::test]
async fn a_handler_that_overruns_its_timeout_is_killed_with_its_children() {
    let setup = Setup::new(
        r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/restart.sh"]
timeout = "1s"
"#,
    )
    .await;
    let pidfile = setup.dir.join("child.pid");
    handler(
        &setup.dir,
        "restart.sh",
        &format!("sleep 60 & echo $! > {}; wait", pidfile.display()),
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "FAILURE");
    assert_eq!(
        finish["summary"], "timed out after 1s; process group killed",
        "{finish}"
    );
    wait_gone(&pidfile).await;
}

/// Regression (helper-143): a child the handler left running in its process group, its
/// output closed, outlived the run (one holding the output was killed after 2 s); and the
/// summary counted that wait as the handler's time. A run's end now ends its process group,
/// as a CI job's end does, and the time is the handler's own.
#[tokio::test]
async fn regression_a_child_left_in_the_handlers_group_outlived_the_run() {
    let setup = Setup::new(ALL_FOUR).await;
    let pidfile = setup.dir.join("child.pid");
    handler(
        &setup.dir,
        "restart.sh",
        &format!(
            "(exec >/dev/null 2>&1; sleep 300) & echo $! > {}; sleep 301 &",
            pidfile.display()
        ),
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "SUCCESS");
    // The `sleep 301` holding the output was waited for 2 s, then killed: not the handler's.
    let summary = finish["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("exit 0 in ") && !summary.contains("2s"),
        "{summary}"
    );
    wait_gone(&pidfile).await;
}

/// Regression (helper-146): Port refusing the credentials was said "cannot reach target: Port
/// refused the credentials": Port was reached. Still tried again (a reload may fix them).
#[tokio::test]
async fn regression_refused_credentials_were_said_unreachable() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    setup.edit_config(&[(
        "client_id_env = \"TEST_PORT_CLIENT_ID\"",
        "client_id = \"not-the-client\"",
    )]);
    let daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    let line = daemon
        .logs
        .wait_for(&[
            "WARN",
            "Port refused the credentials (401)",
            "check [port] client_id",
        ])
        .await;
    assert!(!line.contains("cannot reach"), "{line}");
    daemon.logs.wait_for(&["retrying in"]).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_run_delivered_twice_while_running_executes_once() {
    let setup = Setup::new(ALL_FOUR).await;
    let go = setup.dir.join("go");
    handler(
        &setup.dir,
        "restart.sh",
        &format!("while [ ! -e {} ]; do sleep 0.05; done", go.display()),
    );
    let daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || executions(&setup.dir).len() == 1).await;
    setup.send(2, "01-legacy-run-message");
    daemon
        .logs
        .wait_for(&["r_act01legacy", "run delivered again (still running)"])
        .await;
    std::fs::write(&go, "").unwrap();
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(executions(&setup.dir), ["r_act01legacy"]);
    assert_eq!(setup.port.finishes("r_act01legacy").len(), 1);
}

#[tokio::test]
async fn a_forged_signature_runs_nothing_and_reports_nothing() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    let daemon = setup.start().await;
    setup.channel.send_webhook(
        1,
        &signed_frame(&fixture("01-legacy-run-message"), "not-the-secret"),
    );
    daemon
        .logs
        .wait_for(&["action run rejected", "does not match"])
        .await;
    // A signed run after it goes through: the forged one was judged, not left behind.
    only_the_next_run_goes_through(&setup, "r_act01legacy").await;
}

/// Regression (helper-138, on the pipeline's twin): a run valid as JSON but beyond what the
/// parser takes (a number past f64) ran nothing and reported nothing, rightly, yet
/// `events list` showed it delivered to the actions route with 200: it is a dead letter
/// there, naming the limit. So is (helper-146) a body signed as Port signs that is not JSON.
#[tokio::test]
async fn regression_a_run_beyond_the_json_limits_was_listed_as_delivered() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    let daemon = setup.start().await;
    let huge = fixture("01-legacy-run-message").replacen('{', r#"{"size":1e400,"#, 1);
    setup.channel.send_webhook(1, &signed_frame(&huge, SECRET));
    daemon
        .logs
        .wait_for(&["WARN", "event=1", "number out of range", "nothing runs"])
        .await;
    let text = "not JSON {";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signature = sign(SECRET, &now.to_string(), text);
    setup
        .channel
        .send_webhook(3, &text_frame(text, now, &signature));
    daemon
        .logs
        .wait_for(&[
            "WARN",
            "event=2",
            "signed, yet the body is not JSON",
            "nothing runs",
        ])
        .await;
    // A made-up signature header is no signature (helper-152: it made a dead letter too).
    setup
        .channel
        .send_webhook(4, &text_frame(text, now, "v1,AAAA"));
    only_the_next_run_goes_through(&setup, "r_act01legacy").await;
    daemon.stop().await;
    let listed = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--json", "--state-dir"])
            .arg(setup.dir.join("state")),
    )
    .await;
    let rows: Value = serde_json::from_str(&listed.stdout).expect(&listed.stderr);
    let forged = (rows.as_array().into_iter().flatten())
        .find(|row| row["id"] == 3 && row["route"] == "actions")
        .unwrap_or_else(|| panic!("no actions row for event 3: {rows}"));
    assert_eq!(forged["status"], "delivered", "{forged}");
    for (id, why) in [
        (1, "number out of range"),
        (2, "signed, yet the body is not JSON"),
    ] {
        let row = (rows.as_array().into_iter().flatten())
            .find(|row| row["id"] == id && row["route"] == "actions")
            .unwrap_or_else(|| panic!("no actions row for event {id}: {rows}"));
        assert_eq!(row["status"], "dead", "{row}");
        let error = row["last_error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("not read: ") && error.contains(why),
            "{row}"
        );
    }
}

/// Regression (helper-143): a signed run whose id was 100 KB ran its handler, then its report
/// could not be made into a request (no URL that long) and was retried as if Port were down,
/// for a day, with every later run's reports queued behind it; a run naming an action without
/// a run id went by with nothing said. Both are said, and dead letters; the next run goes on.
#[tokio::test]
async fn regression_a_run_with_an_unusable_id_held_every_report_back() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    let daemon = setup.start().await;
    let long = fixture("01-legacy-run-message").replace("r_act01legacy", &"R".repeat(100_000));
    setup.channel.send_webhook(1, &signed_frame(&long, SECRET));
    daemon
        .logs
        .wait_for(&[
            "WARN",
            "event=1",
            "looks like an action run",
            "100000 bytes long, over the 256 taken",
        ])
        .await;
    let without =
        fixture("01-legacy-run-message").replace(r#""runId":"r_act01legacy""#, r#""other":"x""#);
    assert!(
        !without.contains("r_act01legacy"),
        "the fixture's run id moved"
    );
    setup
        .channel
        .send_webhook(3, &signed_frame(&without, SECRET));
    daemon
        .logs
        .wait_for(&[
            "WARN",
            "event=2",
            "names [[action]] restart_deployment without a run id",
        ])
        .await;
    only_the_next_run_goes_through(&setup, "r_act01legacy").await;
    let logs = daemon.stop().await;
    assert!(
        !logs.all().contains(&"R".repeat(1000)),
        "a line carried the id"
    );
    let listed = support::run_to_end(
        smee_relay()
            .args(["events", "list", "--json", "--state-dir"])
            .arg(setup.dir.join("state")),
    )
    .await;
    let rows: Value = serde_json::from_str(&listed.stdout).expect(&listed.stderr);
    for id in [1, 2] {
        let row = (rows.as_array().into_iter().flatten())
            .find(|row| row["id"] == id && row["route"] == "actions")
            .unwrap_or_else(|| panic!("no actions row for event {id}: {rows}"));
        assert_eq!(row["status"], "dead", "{row}");
        assert!(
            row["last_error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("not a run: "),
            "{row}"
        );
    }
}

#[tokio::test]
async fn kill_9_mid_run_reports_interrupted_by_restart_and_does_not_run_it_again() {
    let setup = Setup::new(ALL_FOUR).await;
    kill_9_mid_run(&setup).await;

    let daemon = setup.start().await;
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "FAILURE");
    assert_eq!(finish["summary"], "interrupted by restart");
    // helper-143: it said "while the handler was running" of a forward handler still being
    // retried, which may never have had it.
    let log = setup.port.logs("r_act01legacy");
    assert!(
        log.contains("smee-relay restarted before the run finished; it is not run again (on_interrupt = \"fail\")"),
        "{log}"
    );
    // The smee channel may deliver it again (it is in the spool anyway): still not run again.
    setup.send(2, "01-legacy-run-message");
    daemon
        .logs
        .wait_for(&["r_act01legacy", "run delivered again (done, FAILURE)"])
        .await;
    assert_eq!(executions(&setup.dir), ["r_act01legacy"]);
    assert_eq!(setup.port.finishes("r_act01legacy").len(), 1);
}

/// Regression (helper-126): a malformed `::port::` line was in the run's log twice: as
/// output, and again inside the note that said it was not valid.
#[tokio::test]
async fn regression_a_malformed_directive_was_logged_twice() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(
        &setup.dir,
        "restart.sh",
        "echo '::port:: not json'; echo '::port:: {\"entity\": {\"identifier\": \"x\"}}'",
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let log = setup.port.logs("r_act01legacy");
    assert_eq!(log.matches("::port:: not json").count(), 1, "{log}");
    assert_eq!(log.matches("\"identifier\": \"x\"").count(), 1, "{log}");
    assert!(
        log.contains("smee-relay: the line above is not a valid ::port:: line")
            && log.contains("smee-relay: the line above has an entity without \"blueprint\""),
        "{log}"
    );
}

/// Regression (helper-127): a run delivered again after it finished was said to be "still
/// running" (what the runner last read, before it finished).
#[tokio::test]
async fn regression_a_finished_run_delivered_again_was_said_still_running() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    let daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    setup.send(2, "01-legacy-run-message");
    let said = daemon
        .logs
        .wait_for(&["r_act01legacy", "run delivered again"])
        .await;
    assert!(
        said.contains("run delivered again (done, SUCCESS)"),
        "{said}"
    );
}

/// Regression (helper-127): a `javascript:` link from a handler went to Port as the run's
/// link (a button its users click); only http(s) links go, the others are said in the log.
#[tokio::test]
async fn regression_a_javascript_link_went_to_port() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(
        &setup.dir,
        "restart.sh",
        r#"echo '::port:: {"link": ["javascript:alert(1)", "https://ci.example/1", "data:text/html,x"]}'"#,
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(
        finish["link"],
        serde_json::json!(["https://ci.example/1"]),
        "{finish}"
    );
    let log = setup.port.logs("r_act01legacy");
    assert!(
        log.contains("smee-relay: the line above has 2 links that are not http(s): not sent"),
        "{log}"
    );
}

/// Regression (helper-126): a stop while a handler ran said "nothing waits: everything
/// received was delivered", though the run was interrupted and its FAILURE waited for the
/// next start; that start reports it.
#[tokio::test]
async fn regression_a_stop_mid_run_said_everything_was_delivered() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "sleep 60");
    let daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || executions(&setup.dir).len() == 1).await;
    let logs = daemon.stop().await;
    let stopped = logs.wait_for(&["stopped;"]).await;
    assert!(
        stopped.contains("1 action run was interrupted, settled at the next start")
            && !stopped.contains("everything received was delivered"),
        "{stopped}"
    );
    let _daemon = setup.start().await;
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(
        setup.port.finishes("r_act01legacy")[0]["summary"],
        "interrupted by restart"
    );
}

/// A relay killed (SIGKILL) while the handler of run `r_act01legacy` runs (`sleep 60`).
async fn kill_9_mid_run(setup: &Setup) {
    handler(&setup.dir, "restart.sh", "sleep 60");
    let mut daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || executions(&setup.dir).len() == 1).await;
    daemon.child.kill().await.unwrap();
    daemon.child.wait().await.unwrap();
}

/// Regression (helper-120): a run interrupted by a restart whose `[[action]]` was removed
/// meanwhile was said not to run again for `on_interrupt = "fail"`, which it did not have.
#[tokio::test]
async fn regression_an_interrupted_run_of_a_removed_action_blamed_on_interrupt() {
    let setup = Setup::new(ALL_FOUR).await;
    kill_9_mid_run(&setup).await;
    let without = std::fs::read_to_string(&setup.config).unwrap().replace(
        "identifier = \"restart_deployment\"",
        "identifier = \"other_action\"",
    );
    std::fs::write(&setup.config, without).unwrap();
    let _daemon = setup.start().await;
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let log = setup.port.logs("r_act01legacy");
    assert!(
        log.contains(
            "it is not run again (its [[action]] restart_deployment is no longer in the config)"
        ),
        "{log}"
    );
}

#[tokio::test]
async fn kill_9_mid_run_with_on_interrupt_rerun_runs_it_again() {
    let setup = Setup::new(
        r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/restart.sh"]
on_interrupt = "rerun"
"#,
    )
    .await;
    // The first execution hangs (a shell waiting on a child); the second finishes.
    let marker = setup.dir.join("first-done");
    let pids = setup.dir.join("pids");
    handler(
        &setup.dir,
        "restart.sh",
        &format!(
            // It writes on: once the relay is gone, a write kills the shell (a closed pipe),
            // and only its child is left of the group.
            "if [ -e {m} ]; then exit 0; fi; sleep 60 & echo \"$$ $!\" > {p}; touch {m}; \
             while true; do echo tick; sleep 0.1; done",
            m = marker.display(),
            p = pids.display()
        ),
    );
    let mut daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || marker.exists()).await;
    daemon.child.kill().await.unwrap();
    daemon.child.wait().await.unwrap();
    // Gone, or a zombie nobody has reaped yet: either way no longer running.
    let ended = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    let pids = std::fs::read_to_string(&pids).unwrap();
    let (shell, child) = pids.trim().split_once(' ').unwrap();
    wait_until("the handler's shell died writing to the dead relay", || {
        ended(shell)
    })
    .await;
    assert!(!ended(child), "its child runs on");

    let daemon = setup.start().await;
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(executions(&setup.dir), ["r_act01legacy", "r_act01legacy"]);
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "SUCCESS");
    // Regression (helper-117): the run's log showed the handler's output twice with nothing
    // between; it says why it runs again.
    let log = setup.port.logs("r_act01legacy");
    assert!(
        log.contains("smee-relay restarted before the run finished; it runs again from the start (on_interrupt = \"rerun\")"),
        "{log}"
    );
    // Regression (an adversary's finding): the first execution, and what it started, outlived
    // the relay's kill -9 and ran on beside the rerun. The restart kills its process group,
    // also when its leader has died meanwhile (its next write, to the dead relay's pipe).
    wait_until("the first execution's child ended", || ended(child)).await;
    daemon
        .logs
        .wait_for(&["WARN", "still running", "killed"])
        .await;
}

/// Regression: a run a kill -9 interrupted, found by a relay started with no `[[action]]` left
/// (nor Automation runs reported), was never settled and never mentioned: Port showed it in
/// progress forever, and its handler ran on unwatched. The start says so, naming the run, the
/// action, the handler's pid and what to do.
#[tokio::test]
async fn regression_a_run_interrupted_before_its_action_was_removed_was_never_mentioned() {
    let setup = Setup::new(
        r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/restart.sh"]
"#,
    )
    .await;
    let marker = setup.dir.join("started");
    handler(
        &setup.dir,
        "restart.sh",
        &format!("touch {}; exec sleep 60", marker.display()),
    );
    let mut daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || marker.exists()).await;
    daemon.child.kill().await.unwrap();
    daemon.child.wait().await.unwrap();

    let config = std::fs::read_to_string(&setup.config).unwrap();
    let (header, _) = config.split_once("[[action]]").unwrap();
    // A pipeline channel needs something to do: a rule, now that the action is gone.
    let rule = "[[rule]]\nname = \"cpu\"\nproperty = \"cpuUtil\"\nabove = 50\n";
    std::fs::write(&setup.config, format!("{header}{rule}")).unwrap();
    let daemon = setup.start().await;
    let said = daemon
        .logs
        .wait_for(&[
            "WARN",
            "action run interrupted by the last stop, not settled",
            "r_act01legacy",
            "restart_deployment",
            "may still run, unwatched",
        ])
        .await;
    // The handler a kill -9 left behind, by the pid the line gives.
    let pid = said
        .split_once("(pid ")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(pid, _)| pid.to_string())
        .expect("a pid");
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("sleep")),
        "{said}"
    );
    let _ = std::process::Command::new("kill").arg(&pid).status();
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_the_report_goes_through() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(
        setup.port.with(|s| s.tokens_issued),
        1,
        "the token is cached"
    );
    // Port forgets the token (it expired early): the next call gets 401, then a new token.
    setup.port.with(|s| s.valid_tokens.clear());
    setup.send(2, "02-trigger-data");
    setup.port.wait_finished(&["r_act02trigger"]).await;
    assert_eq!(setup.port.with(|s| s.tokens_issued), 2);
    let unauthorized = setup
        .port
        .calls()
        .iter()
        .filter(|c| c.status == 401)
        .count();
    assert_eq!(unauthorized, 1, "one 401, then a fresh token");
}

#[tokio::test]
async fn a_422_ends_reporting_for_that_run_with_one_warning() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    setup.port.with(|s| {
        s.refuse_run
            .insert("r_act01legacy".into(), (422, "run_synchronized_error"));
    });
    let daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.send(2, "02-trigger-data");
    // The two runs execute side by side: the second can finish before the first is reported,
    // so wait for the first run's refusal too, and stop the daemon before counting (a stopped
    // daemon makes no more calls; whatever it had not sent yet stays queued, not retried).
    setup.port.wait_finished(&["r_act02trigger"]).await;
    setup
        .port
        .wait("the refusal of r_act01legacy", |s| {
            s.calls
                .iter()
                .any(|c| c.path.contains("r_act01legacy") && c.status == 422)
        })
        .await;
    let logs = daemon.stop().await;
    let refused: Vec<Call> = setup
        .port
        .calls()
        .into_iter()
        .filter(|c| c.path.contains("r_act01legacy"))
        .collect();
    assert_eq!(refused.len(), 1, "no retry storm: {refused:#?}");
    assert_eq!(refused[0].status, 422);
    let warnings = logs
        .all()
        .lines()
        .filter(|l| l.contains("reporting for this run ends"))
        .count();
    assert_eq!(warnings, 1, "{}", logs.all());
    // Regression (helper-126): what was dropped after it was logged `port -> 204 in 0 ms`, a
    // status Port never gave.
    assert!(
        logs.all()
            .contains("port not sent: reporting for this run has ended (Port answered 404 or 422)"),
        "{}",
        logs.all()
    );
    assert!(!logs.all().contains("port -> 204"), "{}", logs.all());
}

#[tokio::test]
async fn port_down_for_a_while_then_back_delays_the_reports_and_loses_nothing() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    setup.port.with(|s| s.down = true);
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup
        .port
        .wait("two refused attempts", |s| s.refused_while_down >= 2)
        .await;
    // Back, but rate-limited once: 429 with a reset a second away (Port sends the seconds
    // until the reset).
    setup.port.with(|s| {
        s.down = false;
        s.script.push_back((429, Some(1)));
    });
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(executions(&setup.dir), ["r_act01legacy"]);
    assert_eq!(setup.port.finishes("r_act01legacy").len(), 1);
    assert!(
        setup
            .port
            .logs("r_act01legacy")
            .contains("run r_act01legacy of")
    );
    assert!(setup.port.calls().iter().any(|c| c.status == 429));
}

#[tokio::test]
async fn a_forward_handler_reports_by_its_answer_4xx_is_failure_at_once() {
    let mut target = support::FakeTarget::start().await;
    let setup = Setup::new(&format!(
        r#"
[[action]]
identifier = "restart_deployment"
forward = "{}"
[action.report]
summary = '"restarted " + .body.context.entity + " (" + (.response.statusCode | tostring) + ")"'
link = '.response.json.url'

[[action]]
identifier = "scaffold_service"
forward = "{}"
"#,
        target.url("/restart"),
        target.url("/scaffold")
    ))
    .await;
    target.answer_with(&[200, 400]);
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    let request = target.next().await;
    assert_eq!(request.uri, "/restart");
    assert!(
        request.header("authorization").is_none(),
        "no Port token for handlers"
    );
    assert_eq!(
        String::from_utf8_lossy(&request.body),
        fixture("01-legacy-run-message")
    );
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "SUCCESS");
    // The jq mapping over port-agent's context: the run body and the handler's response.
    assert_eq!(
        finish["summary"], "restarted notification-service-prod (200)",
        "{finish}"
    );
    assert!(
        finish.get("link").is_none(),
        "no JSON answer, no link: {finish}"
    );
    let logs = setup.port.logs("r_act01legacy");
    assert!(logs.contains("POST 127.0.0.1:"), "{logs}");
    setup.send(2, "04-create-no-entity");
    target.next().await;
    setup.port.wait_finished(&["r_act04create"]).await;
    assert_eq!(setup.port.finishes("r_act04create")[0]["status"], "FAILURE");
}

#[tokio::test]
async fn the_demo_shows_an_action_run_end_to_end() {
    let out = smee_relay().arg("demo").output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "Port run r_act01legacy log: restarting notification-service-prod (run r_act01legacy)",
        "Port run r_act01legacy log: reason: CPU above 90% for 10 minutes",
        r#"Port run r_act01legacy status: {"status":"SUCCESS""#,
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    // The one warning is the relay part's planned outage: the local app's 503.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("target answered 503") && warnings[0].contains("x-github-event=push"),
        "{stderr}"
    );
}

#[tokio::test]
async fn automation_runs_get_the_pipelines_outcome_reported() {
    let setup = Setup::new(&format!(
        "{ALL_FOUR}\n{}",
        include_str!("fixtures/port/rules.toml")
    ))
    .await;
    handler(&setup.dir, "restart.sh", "");
    setup.report_automation_runs();
    let _daemon = setup.start().await;
    let automation = |file: &str| support::port_fixture("automation", file);
    setup
        .channel
        .send_webhook(1, &signed_frame(&automation("01-create"), SECRET));
    setup
        .channel
        .send_webhook(2, &signed_frame(&automation("02-cpu-25-to-87"), SECRET));
    // A forged one: the pipeline rejects it, and nothing is reported for its run id.
    setup.channel.send_webhook(
        3,
        &signed_frame(&automation("03-cpu-87-to-91"), "not-the-secret"),
    );
    setup
        .port
        .wait_finished(&["r_fixture00", "r_fixture01"])
        .await;
    let created = &setup.port.finishes("r_fixture00")[0];
    assert_eq!(created["status"], "SUCCESS");
    assert_eq!(created["summary"], "no alert: no rule's state changed");
    let fired = &setup.port.finishes("r_fixture01")[0];
    assert_eq!(fired["status"], "SUCCESS");
    // Queued, not "sent" (helper-117: Port was told "sent to Slack" of an alert Slack refused):
    // the run is reported when the pipeline has judged the event; delivery comes after.
    assert_eq!(fired["summary"], "cpu-high FIRING queued for stdout");
    // Judged after the two before it, on the same ordered route: nothing for the forged run.
    setup.send(4, "02-trigger-data");
    setup.port.wait_finished(&["r_act02trigger"]).await;
    assert!(
        setup
            .port
            .calls()
            .iter()
            .all(|c| !c.path.contains("r_fixture02"))
    );
}

#[tokio::test]
async fn long_output_is_sent_in_batches_under_ports_limit_and_a_refused_entity_is_logged() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(
        &setup.dir,
        "restart.sh",
        r#"seq 1 60000
echo '::port:: {"entity": {"blueprint": "Refused", "identifier": "nope"}}'"#,
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let calls: Vec<Call> = setup
        .port
        .calls()
        .into_iter()
        .filter(|c| c.path.ends_with("/runs/r_act01legacy/logs"))
        .collect();
    assert!(calls.len() >= 3, "batched: {} calls", calls.len());
    for call in &calls {
        assert!(
            call.body.to_string().len() < 1 << 20,
            "a log call over 1 MiB"
        );
    }
    let logs = setup.port.logs("r_act01legacy");
    let numbers: Vec<&str> = logs.lines().filter(|l| l.parse::<u32>().is_ok()).collect();
    assert_eq!(numbers.len(), 60000, "every line, once");
    assert_eq!(numbers.first(), Some(&"1"));
    assert_eq!(numbers.last(), Some(&"60000"));
    assert!(
        logs.contains("Port refused entity nope of blueprint Refused: 422"),
        "{}",
        &logs[logs.len().saturating_sub(500)..]
    );
    assert_eq!(setup.port.finishes("r_act01legacy")[0]["status"], "SUCCESS");
}

#[tokio::test]
async fn regression_a_runaway_handlers_output_is_capped_and_its_directives_still_count() {
    let setup = Setup::new(ALL_FOUR).await;
    // 10 MiB of output in lines of 1 KiB (newline included), then a directive.
    handler(
        &setup.dir,
        "restart.sh",
        r#"head -c 10485760 /dev/zero | tr '\0' x | fold -w 1023; echo
echo '::port:: {"summary": "made it"}'"#,
    );
    let _daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let logs = setup.port.logs("r_act01legacy");
    // The handler template's two lines come first, then 10,251 lines of x (the last short).
    let taken: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.starts_with("run r_act01") || l.starts_with("to stderr") || l.starts_with('x')
        })
        .collect();
    let taken_bytes: usize = taken.iter().map(|l| l.len() + 1).sum();
    assert!(
        taken_bytes <= 8 << 20 && taken_bytes > (8 << 20) - 1024,
        "8 MiB of output taken, not {taken_bytes} bytes"
    );
    let note = logs
        .lines()
        .find(|l| l.contains("more output lines"))
        .unwrap_or_else(|| panic!("no note: {}", &logs[logs.len().saturating_sub(500)..]));
    let left: usize = note
        .trim_start_matches("smee-relay: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert_eq!(
        taken.len() + left,
        2 + 10_251,
        "every output line taken or counted: {note}"
    );
    assert!(
        note.ends_with("not sent: a run's log is capped at 8 MiB"),
        "{note}"
    );
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "SUCCESS");
    assert_eq!(finish["summary"], "made it", "{finish}");
}

#[tokio::test]
async fn a_forward_handler_is_retried_on_5xx_then_fails_at_the_retry_age() {
    let mut target = support::FakeTarget::start().await;
    let setup = Setup::new(&format!(
        "[[action]]\nidentifier = \"restart_deployment\"\nforward = \"{}\"\n\n[[action]]\nidentifier = \"scaffold_service\"\nforward = \"{}\"\n",
        target.url("/restart"),
        target.url("/scaffold")
    ))
    .await;
    // The first run: 503 once, then 200. The second: 503 until the retry age (2s) is over.
    target.answer_with(&[503, 200, 503, 503, 503, 503, 503, 503, 503, 503]);
    let _daemon = setup.start_with(&["--max-retry-age", "2s"]).await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(setup.port.finishes("r_act01legacy")[0]["status"], "SUCCESS");
    let logs = setup.port.logs("r_act01legacy");
    assert!(logs.contains("handler answered 503; retrying in"), "{logs}");
    target.take(2).await;
    setup.send(2, "04-create-no-entity");
    setup.port.wait_finished(&["r_act04create"]).await;
    let finish = &setup.port.finishes("r_act04create")[0];
    assert_eq!(finish["status"], "FAILURE");
    let summary = finish["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("handler answered 503; gave up after "),
        "{summary}"
    );
}

/// Regression (an adversary's finding): a forward handler that took longer than the action's
/// `timeout` was sent the run again and again (each retry a new execution: a deploy run four
/// times). Once the request is sent, nobody knows whether it ran: FAILURE at once, not retried.
#[tokio::test]
async fn regression_a_forward_handler_that_times_out_is_not_sent_the_run_again() {
    let mut target = support::FakeTarget::start().await;
    let setup = Setup::new(&format!(
        "[[action]]\nidentifier = \"restart_deployment\"\nforward = \"{}\"\ntimeout = \"300ms\"\n",
        target.url("/restart"),
    ))
    .await;
    target.delay(Duration::from_secs(2));
    let _daemon = setup.start_with(&["--max-retry-age", "1m"]).await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    let finish = &setup.port.finishes("r_act01legacy")[0];
    assert_eq!(finish["status"], "FAILURE", "{finish}");
    let summary = finish["summary"].as_str().unwrap();
    assert!(summary.contains("not sent again"), "{summary}");
    // Regression (helper-126): Port's user read operator text ("... x-port-run-id").
    assert!(!summary.contains("x-port-run-id"), "{summary}");
    target.drain(Duration::from_millis(500)).await;
    assert_eq!(target.arrived(), 1, "sent once");
}

/// Bug: `[action.report]` mappings ran in the daemon with jaq and no bound, so a mapping that
/// loops froze the actions route (and one that grows without end took the daemon's memory).
/// They run in the jq worker now, within `[jq]`'s time and memory bounds and a size limit on
/// the value: such a mapping fails that run's report with the reason, and the daemon goes on.
#[tokio::test]
async fn hostile_report_mappings_fail_their_run_and_the_daemon_keeps_running() {
    let mut target = support::FakeTarget::start().await;
    let url = target.url("/handler");
    let setup = Setup::new(&format!(
        r#"
[jq]
timeout = "1s"
max_memory_mib = 64

[[action]]
when = '.run.id == "r_act02trigger"'
forward = "{url}"
[action.report]
summary = '"fine " + (.response.statusCode | tostring)'

[[action]]
identifier = "restart_deployment"
forward = "{url}"
[action.report]
summary = 'last(repeat(1))'

[[action]]
identifier = "scaffold_service"
forward = "{url}"
[action.report]
summary = '"x" * 100000'

[[action]]
when = '.port_context.runId != null'
forward = "{url}"
[action.report]
link = '"x" * 100000000'
"#
    ))
    .await;
    target.answer_with(&[200, 200, 200, 200]);
    let mut daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    setup.send(2, "04-create-no-entity");
    setup.port.wait_finished(&["r_act04create"]).await;
    setup.send(3, "03-port-context");
    setup.port.wait_finished(&["r_act03context"]).await;
    setup.send(4, "02-trigger-data");
    setup.port.wait_finished(&["r_act02trigger"]).await;
    target.take(4).await;
    for (run, why) in [
        (
            "r_act01legacy",
            "[action.report] summary: the condition ran longer than its 1s budget",
        ),
        (
            "r_act04create",
            "[action.report] summary: the expression's value is 100002 bytes as JSON, over the 65536 byte limit",
        ),
        (
            "r_act03context",
            "[action.report] link: the condition exceeded its memory or recursion bound",
        ),
    ] {
        let finishes = setup.port.finishes(run);
        assert_eq!(finishes.len(), 1, "{run}");
        assert_eq!(finishes[0]["status"], "FAILURE", "{run}: {}", finishes[0]);
        let summary = finishes[0]["summary"].as_str().unwrap();
        assert!(
            summary.starts_with("report mapping failed: ") && summary.contains(why),
            "{run}: {summary}"
        );
        assert!(
            setup.port.logs(run).contains(why),
            "{run}: {}",
            setup.port.logs(run)
        );
    }
    // The worker was replaced after each kill: the next mapping works.
    let fine = &setup.port.finishes("r_act02trigger")[0];
    assert_eq!(fine["status"], "SUCCESS", "{fine}");
    assert_eq!(fine["summary"], "fine 200");
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
}

/// `/metrics` counts action runs: started, and finished by outcome (success, failure, timeout,
/// interrupted), their duration, and reports Port did not take.
#[tokio::test]
async fn action_runs_are_counted_in_metrics() {
    let setup = Setup::new(
        r#"
[[action]]
identifier = "restart_deployment"
command = ["DIR/restart.sh"]

[[action]]
identifier = "scaffold_service"
command = ["DIR/scaffold.sh"]

[[action]]
when = '.port_context.runId != null'
command = ["DIR/slow.sh"]
timeout = "1s"
"#,
    )
    .await;
    let text = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        format!("metrics_listen = \"127.0.0.1:0\"\n{text}"),
    )
    .unwrap();
    // The first run hangs until a kill -9; the next one of the same action succeeds.
    handler(
        &setup.dir,
        "restart.sh",
        r#"if [ "$PORT_RUN_ID" = r_act01legacy ]; then sleep 60; fi"#,
    );
    handler(&setup.dir, "scaffold.sh", "exit 3");
    handler(&setup.dir, "slow.sh", "sleep 60");
    let mut daemon = setup.start().await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the handler started", || executions(&setup.dir).len() == 1).await;
    daemon.child.kill().await.unwrap(); // SIGKILL
    daemon.child.wait().await.unwrap();

    // Port answers the first report after the restart with 503 (retried).
    setup.port.with(|s| s.script.push_back((503, None)));
    let daemon = setup.start().await;
    let line = daemon
        .logs
        .wait_for(&["serving /healthz and /metrics"])
        .await;
    let addr = line.rsplit("addr=").next().unwrap().trim().to_string();
    setup.send(2, "04-create-no-entity");
    setup.send(3, "03-port-context");
    setup.send(4, "02-trigger-data");
    setup
        .port
        .wait_finished(&[
            "r_act01legacy",
            "r_act04create",
            "r_act03context",
            "r_act02trigger",
        ])
        .await;
    let metrics = smee_relay::http::client_builder()
        .build()
        .unwrap()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let when = "when .port_context.runId != null";
    for line in [
        "smee_relay_action_runs_started_total{action=\"restart_deployment\"} 1".to_string(),
        "smee_relay_action_runs_started_total{action=\"scaffold_service\"} 1".into(),
        format!("smee_relay_action_runs_started_total{{action=\"{when}\"}} 1"),
        "smee_relay_action_runs_finished_total{action=\"restart_deployment\",outcome=\"interrupted\"} 1".into(),
        "smee_relay_action_runs_finished_total{action=\"restart_deployment\",outcome=\"success\"} 1".into(),
        "smee_relay_action_runs_finished_total{action=\"scaffold_service\",outcome=\"failure\"} 1".into(),
        format!("smee_relay_action_runs_finished_total{{action=\"{when}\",outcome=\"timeout\"}} 1"),
        "smee_relay_action_run_seconds_count{action=\"scaffold_service\"} 1".into(),
        format!("smee_relay_action_run_seconds_count{{action=\"{when}\"}} 1"),
        "smee_relay_action_report_errors_total{kind=\"5xx\"} 1".into(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster mode
// ---------------------------------------------------------------------------------------------

/// Whether every report of `run` is in the cluster's stream: the last message on the reports'
/// subject is its terminal status.
async fn reports_published(nats: &str, cluster: &str, run: &str) -> bool {
    use sha2::Digest as _;
    let Ok(client) = async_nats::connect(nats).await else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(stream) = js.get_stream(format!("SMEE_{cluster}")).await else {
        return false;
    };
    // The subject the relay publishes what it produced for the reports route on.
    let key = sha2::Sha256::digest(b"produced/port-reports");
    let subject = format!("smee.{cluster}.ch.{}", hex::encode(&key[..8]));
    stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .is_ok_and(|m| {
            // The report's kind and run are in its headers: in the payload's JSON envelope
            // before the cluster sent bodies raw, in the `Smee-Relay-Meta` NATS header since.
            let needle = format!("finish {run}");
            String::from_utf8_lossy(&m.payload).contains(&needle)
                || m.headers
                    .get("Smee-Relay-Meta")
                    .is_some_and(|meta| meta.as_str().contains(&needle))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_kill_9_of_the_reporting_instance_hands_the_port_reports_over() {
    let nats = support::nats::NatsServer::start().await;
    let setup = Setup::new(&format!(
        "{ALL_FOUR}\n[cluster]\nnats_url = \"{}\"\nname = \"reports\"\nack_wait = \"2s\"\n",
        nats.url
    ))
    .await;
    handler(&setup.dir, "restart.sh", "");
    let spawn = |name: &str| {
        support::spawn_logged(
            smee_relay()
                .args(["run", "--config"])
                .arg(&setup.config)
                .arg("--state-dir")
                .arg(setup.dir.join(name))
                .env("TEST_PORT_SECRET", SECRET)
                .env("TEST_PORT_CLIENT_ID", CLIENT_ID)
                .env("RUST_LOG", "info,smee_relay::cluster=debug"),
        )
    };
    // Port is down: the instance that takes the run's first report keeps retrying it.
    setup.port.with(|s| s.down = true);
    let (mut a, a_logs) = spawn("state-a");
    a_logs.wait_for(&["joined the cluster"]).await;
    setup.channel.wait_connections(1).await;
    setup.send(1, "01-legacy-run-message");
    wait_until("the run executed", || {
        executions(&setup.dir) == ["r_act01legacy"]
    })
    .await;
    setup
        .port
        .wait("two refused attempts", |s| s.refused_while_down >= 2)
        .await;
    support::wait_for(PATIENCE, "every report in the stream", || async {
        reports_published(&nats.url, "reports", "r_act01legacy")
            .await
            .then_some(())
    })
    .await;
    a_logs
        .wait_for(&["took a delivery from the cluster", "route=port"])
        .await;
    let (_b, b_logs) = spawn("state-b");
    b_logs.wait_for(&["joined the cluster"]).await;
    setup.channel.wait_connections(2).await;

    // The reporting instance dies; Port comes back; the other instance reports, once each.
    a.start_kill().unwrap();
    a.wait().await.unwrap();
    setup.port.with(|s| s.down = false);
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(setup.port.finishes("r_act01legacy").len(), 1);
    let logs = setup.port.logs("r_act01legacy");
    assert_eq!(
        logs.matches("run r_act01legacy of").count(),
        1,
        "each log line once: {logs}"
    );
    assert_eq!(executions(&setup.dir), ["r_act01legacy"], "run once");
    assert!(
        b_logs
            .find(&["taking over a delivery another instance did not finish"])
            .is_some(),
        "the survivor took the report in flight over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_a_port_report_over_nats_max_payload_no_longer_stalls_the_reports() {
    // A small max_payload keeps it fast: the log batch (about 100 KiB of output, escaped as
    // JSON) is several times over it.
    let conf_dir = support::temp_dir();
    let conf = conf_dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 32768\n").unwrap();
    let nats = support::nats::NatsServer::start_with(&["-c", conf.to_str().unwrap()]).await;
    let setup = Setup::new(&format!(
        "{ALL_FOUR}\n[cluster]\nnats_url = \"{}\"\nname = \"bigreports\"\nack_wait = \"2s\"\n",
        nats.url
    ))
    .await;
    handler(
        &setup.dir,
        "restart.sh",
        r#"i=0; while [ $i -lt 1500 ]; do echo "line $i \"quoted\" $(printf '%050d' $i)"; i=$((i+1)); done"#,
    );
    let (_a, a_logs) = support::spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(&setup.config)
            .arg("--state-dir")
            .arg(setup.dir.join("state-a"))
            .env("TEST_PORT_SECRET", SECRET)
            .env("TEST_PORT_CLIENT_ID", CLIENT_ID),
    );
    a_logs.wait_for(&["joined the cluster"]).await;
    setup.channel.wait_connections(1).await;
    setup.send(1, "01-legacy-run-message");
    setup.port.wait_finished(&["r_act01legacy"]).await;
    assert_eq!(setup.port.finishes("r_act01legacy").len(), 1);
    let logs = setup.port.logs("r_act01legacy");
    for i in [0, 749, 1499] {
        let line = format!("line {i} \"quoted\" {i:050}");
        assert_eq!(logs.matches(&line).count(), 1, "{line} once");
    }
    assert!(
        a_logs.find(&["dead letter"]).is_none(),
        "nothing given up on"
    );
}

/// Regression (helper-117): a run of an action no `[[action]]` handles (a typo in
/// `identifier`) was silent at the default log level, and stayed in progress on Port's side
/// with nothing to say why. The relay says it, naming the run and the action.
#[tokio::test]
async fn regression_a_run_no_action_handles_was_silent() {
    let setup = Setup::new(ALL_FOUR).await;
    handler(&setup.dir, "restart.sh", "");
    // Regression (helper-120): with Automation runs reported, a legacy run message (resource
    // type `run`) nothing handled was reported SUCCESS as an Automation run.
    setup.report_automation_runs();
    let daemon = setup.start().await;
    let typo = fixture("02-trigger-data")
        .replace("\"restart_deployment\"", "\"restart_deploymnet\"")
        .replace("r_act02trigger", "r_typo");
    setup.channel.send_webhook(1, &signed_frame(&typo, SECRET));
    let said = daemon
        .logs
        .wait_for(&["INFO", "r_typo", "no [[action]] here handles it"])
        .await;
    assert!(said.contains("action restart_deploymnet"), "{said}");
    let legacy = fixture("04-create-no-entity")
        .replace("\"scaffold_service\"", "\"deploy_other\"")
        .replace("r_act04create", "r_other");
    setup
        .channel
        .send_webhook(3, &signed_frame(&legacy, SECRET));
    daemon
        .logs
        .wait_for(&["INFO", "r_other", "no [[action]] here handles it"])
        .await;
    // Nothing ran and nothing was reported for them; a run after them goes through.
    only_the_next_run_goes_through(&setup, "r_typo").await;
    assert!(
        setup
            .port
            .calls()
            .iter()
            .all(|c| !c.path.contains("r_other"))
    );
    daemon.stop().await;
}

/// Regression (helper-117): an Automation run whose event started a rule's `for` hold, or that
/// a rule could not judge (a string where a number is wanted), was reported "no rule matched".
#[tokio::test]
async fn regression_a_held_or_unjudged_automation_run_was_reported_no_rule_matched() {
    let held = "[[rule]]\nname = \"cpu-held\"\nproperty = \"cpuUtil\"\nabove = 50\nfor = \"1h\"\n";
    let setup = Setup::new(&format!(
        "{ALL_FOUR}\n{}\n{held}",
        include_str!("fixtures/port/rules.toml")
    ))
    .await;
    setup.report_automation_runs();
    let _daemon = setup.start().await;
    let fired = support::port_fixture("automation", "02-cpu-25-to-87");
    setup.channel.send_webhook(1, &signed_frame(&fired, SECRET));
    let text = fired
        .replace("\"cpuUtil\":87", "\"cpuUtil\":\"90\"")
        .replace("10:01:00.000Z", "10:01:30.000Z")
        .replace("r_fixture01", "r_string");
    setup.channel.send_webhook(2, &signed_frame(&text, SECRET));
    setup.port.wait_finished(&["r_fixture01", "r_string"]).await;
    let summary = |run: &str| {
        setup.port.finishes(run)[0]["summary"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        summary("r_fixture01"),
        "cpu-high FIRING queued for stdout; cpu-held PENDING (held: it fires only if its condition lasts the rule's hold time)"
    );
    // helper-153: Port shows the summary as text; it read "its `for`".
    assert!(!summary("r_fixture01").contains('`'));
    let unjudged = summary("r_string");
    assert!(
        unjudged.contains(r#"cpu-high cannot judge: property cpuUtil is not a number ("90")"#),
        "{unjudged}"
    );
    assert_eq!(setup.port.finishes("r_string")[0]["status"], "SUCCESS");
}

/// Regression (helper-117): a reload that renamed an `[[action]]` said only "actions on (N)".
/// It names what was added and removed.
#[tokio::test]
async fn regression_a_reload_did_not_say_which_actions_changed() {
    let setup = Setup::new(ALL_FOUR).await;
    let daemon = setup.start().await;
    setup.edit_config(&[("\"scaffold_service\"", "\"scaffold_service_v2\"")]);
    support::signal(&daemon.child, "HUP");
    daemon
        .logs
        .wait_for(&[
            "config reloaded",
            "[[action]] scaffold_service_v2 added",
            "[[action]] scaffold_service removed",
            "[port] report_automation_runs on",
        ])
        .await;
    // Regression (helper-145, helper-146): a reload that changed nothing said "actions on
    // (3; ...)", as every reload did.
    support::signal(&daemon.child, "HUP");
    daemon
        .logs
        .wait_for(&["config reloaded: nothing changed"])
        .await;
    let logs = daemon.stop().await;
    assert!(
        logs.find(&["config reloaded", "actions on"]).is_none(),
        "{}",
        logs.all()
    );
}

/// Regression (helper-126): an `env` name the relay's environment does not have was dropped
/// without a word, by `check` and at start.
#[tokio::test]
async fn regression_an_unset_env_name_was_dropped_without_a_word() {
    let setup = Setup::new(&ALL_FOUR.replace(
        "identifier = \"scaffold_service\"\n",
        "identifier = \"scaffold_service\"\nenv = [\"SMEE_RELAY_TEST_SURELY_UNSET\"]\n",
    ))
    .await;
    let said = setup.check(&[]).await;
    assert!(
        said.contains("[[action]] scaffold_service: warning: env lists SMEE_RELAY_TEST_SURELY_UNSET, which is not set here"),
        "{said}"
    );
    let daemon = setup.start().await;
    daemon
        .logs
        .wait_for(&["[[action]] scaffold_service: env lists SMEE_RELAY_TEST_SURELY_UNSET"])
        .await;
    daemon.stop().await;
}

/// Regression (helper-131): a handler program that is not there was warned by `check` only;
/// a start (or a reload) said nothing until a run failed.
#[tokio::test]
async fn regression_a_missing_handler_was_said_only_by_check() {
    let setup =
        Setup::new(&ALL_FOUR.replace("DIR/scaffold.sh", "/nonexistent/smee-relay-handler.sh"))
            .await;
    let daemon = setup.start().await;
    daemon
        .logs
        .wait_for(&[
            "[[action]] scaffold_service: /nonexistent/smee-relay-handler.sh: no such file",
        ])
        .await;
    daemon.stop().await;
}

/// Regression (helper-126): a reload that changed an `[[action]]`'s handler or timeout said
/// only "actions on (N)", as if nothing had changed.
#[tokio::test]
async fn regression_a_reload_did_not_say_an_action_was_changed() {
    let setup = Setup::new(ALL_FOUR).await;
    let daemon = setup.start().await;
    setup.edit_config(&[(
        "\"restart_deployment\"\n",
        "\"restart_deployment\"\ntimeout = \"5m\"\n",
    )]);
    support::signal(&daemon.child, "HUP");
    let line = daemon
        .logs
        .wait_for(&["config reloaded", "[[action]] restart_deployment changed"])
        .await;
    assert!(!line.contains("scaffold_service"), "{line}");
    daemon.stop().await;
}
