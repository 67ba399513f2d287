//! `smee-relay catch-up github` and `[channel.github_catch_up]`, against a fake GitHub API on
//! 127.0.0.1 (deliveries listed newest first, paged by a `cursor` in the `Link` header; delivery
//! details; a 403 with `retry-after`; 401 for a bad token) and the real binary.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use support::{FakeChannel, FakeTarget, run_to_end, spawn_logged, temp_dir};

/// The binary, with the state directory the config names (not the one the support gives each
/// command): the daemon and catch-up must share it.
fn smee_relay() -> tokio::process::Command {
    let mut command = support::smee_relay();
    command.env_remove("SMEE_RELAY_STATE_DIR");
    command
}

const TOKEN: &str = "ghp_test_token_that_must_not_be_printed";
/// The fake lists this many deliveries per page, whatever `per_page` asks, so paging is used.
const PAGE: usize = 4;

/// One delivery the fake GitHub kept.
#[derive(Clone)]
struct Delivery {
    id: u64,
    guid: String,
    /// Seconds before now.
    age_s: u64,
    redelivery: bool,
    payload: Value,
}

#[derive(Default)]
struct GithubState {
    /// Oldest first; listed newest first.
    deliveries: Vec<Delivery>,
    /// `http://127.0.0.1:PORT`, for the `Link` header.
    base: String,
    /// Answer the next delivery detail with 403 and `retry-after: 1` (a secondary limit).
    limit_next_detail: AtomicBool,
    list_requests: AtomicUsize,
    /// Delivery ids whose detail answers 404 (GitHub no longer has them).
    gone: Mutex<Vec<u64>>,
    /// The first list page carries an entry that does not decode.
    bad_entry: AtomicBool,
    /// Every list page links to the first page again (a cursor loop).
    loop_cursor: AtomicBool,
    /// The list answers a page of 5 MB.
    huge_list: AtomicBool,
    /// The list answers 403 with the primary limit used up until an hour from now.
    limit_for_an_hour: AtomicBool,
    /// The list answers 403 for a token without the permission (no rate limit).
    forbidden: AtomicBool,
    /// The ids of delivery details asked for, rate-limited ones included.
    detail_requests: Mutex<Vec<u64>>,
}

struct FakeGithub {
    url: String,
    state: Arc<GithubState>,
}

fn rfc3339(age_s: u64) -> String {
    let at = std::time::SystemTime::now() - Duration::from_secs(age_s);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `None` when the token is right; else GitHub's 401.
fn refused(headers: &HeaderMap) -> Option<Response> {
    let expected = format!("Bearer {TOKEN}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str()) {
        return None;
    }
    Some(
        (
            StatusCode::UNAUTHORIZED,
            [("content-type", "application/json")],
            r#"{"message":"Bad credentials","documentation_url":"https://docs.github.com/rest"}"#,
        )
            .into_response(),
    )
}

async fn list(
    State(state): State<Arc<GithubState>>,
    UrlPath((owner, name, hook)): UrlPath<(String, String, u64)>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refused(&headers) {
        return refused;
    }
    let requests = state.list_requests.fetch_add(1, Ordering::SeqCst);
    assert_eq!(query.get("per_page").map(String::as_str), Some("100"));
    if state.forbidden.load(Ordering::SeqCst) {
        return (
            StatusCode::FORBIDDEN,
            [("x-ratelimit-remaining", "4999")],
            r#"{"message":"Resource not accessible by personal access token"}"#,
        )
            .into_response();
    }
    if state.limit_for_an_hour.load(Ordering::SeqCst) {
        let reset = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        return (
            StatusCode::FORBIDDEN,
            [
                ("x-ratelimit-remaining", "0".to_string()),
                ("x-ratelimit-reset", reset.to_string()),
            ],
            r#"{"message":"API rate limit exceeded"}"#,
        )
            .into_response();
    }
    if state.huge_list.load(Ordering::SeqCst) {
        return (
            [("content-type", "application/json")],
            format!("[\"{}\"]", "x".repeat(5 << 20)),
        )
            .into_response();
    }
    if state.loop_cursor.load(Ordering::SeqCst) {
        assert!(requests < 50, "the client follows a cursor loop");
        let page = (0..PAGE)
            .map(|i| json!({"id": i, "guid": format!("loop-{i}"), "delivered_at": rfc3339(1)}))
            .collect::<Vec<_>>();
        let mut response = axum::Json(page).into_response();
        let next = format!(
            "<{}/{owner}/{name}/hooks/{hook}/deliveries?per_page=100&cursor=v1_4>; rel=\"next\"",
            state.base
        );
        response.headers_mut().insert("link", next.parse().unwrap());
        return response;
    }
    let start: usize = query
        .get("cursor")
        .map(|c| c.strip_prefix("v1_").unwrap().parse().unwrap())
        .unwrap_or(0);
    let newest_first: Vec<&Delivery> = state.deliveries.iter().rev().collect();
    let mut page: Vec<Value> = newest_first
        .iter()
        .skip(start)
        .take(PAGE)
        .map(|d| {
            json!({
                "id": d.id, "guid": d.guid, "delivered_at": rfc3339(d.age_s),
                "redelivery": d.redelivery, "duration": 0.2, "status": "Bad Gateway",
                "status_code": 502, "event": "push", "action": null,
                "installation_id": null, "repository_id": 1
            })
        })
        .collect();
    if start == 0 && state.bad_entry.load(Ordering::SeqCst) {
        page.insert(1, json!({"id": "not-a-number", "guid": "guid-bad"}));
    }
    let mut response = axum::Json(page).into_response();
    if start + PAGE < newest_first.len() {
        let next = format!(
            "<{}/{owner}/{name}/hooks/{hook}/deliveries?per_page=100&cursor=v1_{}>; rel=\"next\"",
            state.base,
            start + PAGE
        );
        response.headers_mut().insert("link", next.parse().unwrap());
    }
    response
}

async fn detail(
    State(state): State<Arc<GithubState>>,
    UrlPath((_, _, _, id)): UrlPath<(String, String, u64, u64)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refused(&headers) {
        return refused;
    }
    state.detail_requests.lock().unwrap().push(id);
    if state.limit_next_detail.swap(false, Ordering::SeqCst) {
        return (
            StatusCode::FORBIDDEN,
            [("retry-after", "1"), ("content-type", "application/json")],
            r#"{"message":"You have exceeded a secondary rate limit."}"#,
        )
            .into_response();
    }
    if state.gone.lock().unwrap().contains(&id) {
        return (
            StatusCode::NOT_FOUND,
            [("content-type", "application/json")],
            r#"{"message":"Not Found"}"#,
        )
            .into_response();
    }
    let Some(d) = state.deliveries.iter().find(|d| d.id == id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    axum::Json(json!({
        "id": d.id, "guid": d.guid, "delivered_at": rfc3339(d.age_s),
        "redelivery": d.redelivery, "event": "push", "status_code": 502,
        "request": {
            "headers": {
                "Accept": "*/*", "content-type": "application/json",
                "User-Agent": "GitHub-Hookshot/abc", "X-GitHub-Delivery": d.guid,
                "X-GitHub-Event": "push", "X-GitHub-Hook-ID": "42",
                "X-Hub-Signature": "sha1=0000", "X-Hub-Signature-256": "sha256=0000"
            },
            "payload": d.payload
        },
        "response": { "headers": {}, "payload": "" }
    }))
    .into_response()
}

impl FakeGithub {
    async fn start(deliveries: Vec<Delivery>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(GithubState {
            deliveries,
            base: format!("{url}/repos"),
            ..Default::default()
        });
        // Org hooks answer the same; the Link header then points at /repos, which is fine:
        // only its cursor is used.
        let router = axum::Router::new()
            .route("/repos/{owner}/{repo}/hooks/{hook}/deliveries", get(list))
            .route(
                "/repos/{owner}/{repo}/hooks/{hook}/deliveries/{id}",
                get(detail),
            )
            .route(
                "/orgs/{org}/hooks/{hook}/deliveries",
                get(
                    |state: State<Arc<GithubState>>,
                     UrlPath((org, hook)): UrlPath<(String, u64)>,
                     query,
                     headers| async move {
                        list(state, UrlPath((org, "org".into(), hook)), query, headers).await
                    },
                ),
            )
            .route(
                "/orgs/{org}/hooks/{hook}/deliveries/{id}",
                get(
                    |state: State<Arc<GithubState>>,
                     UrlPath((org, hook, id)): UrlPath<(String, u64, u64)>,
                     headers| async move {
                        detail(state, UrlPath((org, String::new(), hook, id)), headers).await
                    },
                ),
            )
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { url, state }
    }
}

/// `n` deliveries, a minute apart, the newest a minute ago; payload `{"n": i, ...}`.
fn deliveries(n: u64) -> Vec<Delivery> {
    (0..n)
        .map(|i| Delivery {
            id: 1000 + i,
            guid: format!("guid-{i}"),
            age_s: (n - i) * 60,
            redelivery: false,
            payload: json!({ "n": i, "ref": "refs/heads/main", "pusher": { "name": "octo" } }),
        })
        .collect()
}

/// The payload as GitHub's API would give it back, re-serialised compactly.
fn compact(d: &Delivery) -> String {
    serde_json::to_string(&d.payload).unwrap()
}

/// The smee frame of delivery `d` as it arrives live (signature included).
fn live_frame(d: &Delivery) -> String {
    json!({
        "x-github-delivery": d.guid, "x-github-event": "push",
        "content-type": "application/json", "x-hub-signature-256": "sha256=live",
        "body": d.payload, "timestamp": 1_700_000_000_000u64
    })
    .to_string()
}

fn write_config(dir: &Path, channel: &str, target: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let state = dir.join("state");
    std::fs::write(
        &path,
        format!(
            "state_dir = {state:?}\n[[channel]]\nurl = {channel:?}\nforward = [{target:?}]\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// A fake GitHub with `all`, a channel, a target, and a config relaying channel `name` to the
/// target's `/hook`, in a fresh directory.
struct Scene {
    github: FakeGithub,
    channel: FakeChannel,
    target: FakeTarget,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

async fn scene(all: &[Delivery], name: &str) -> Scene {
    let github = FakeGithub::start(all.to_vec()).await;
    let channel = FakeChannel::start().await;
    let target = FakeTarget::start().await;
    let dir = temp_dir();
    let config = write_config(dir.path(), &channel.url(name), &target.url("/hook"), "");
    Scene {
        github,
        channel,
        target,
        dir,
        config,
    }
}

fn catch_up(config: &Path, github: &FakeGithub) -> tokio::process::Command {
    let mut command = catch_up_hook_42(github);
    command.arg("--config").arg(config);
    command
}

/// `catch-up github` for hook 42 of the fake's repository, with the right token, and nothing
/// else from the environment.
fn catch_up_hook_42(github: &FakeGithub) -> tokio::process::Command {
    let mut command = smee_relay();
    command
        .args([
            "catch-up",
            "github",
            "--repo",
            "octo-org/octo-repo",
            "--hook",
            "42",
        ])
        .args(["--api-url", &github.url])
        .env("GITHUB_TOKEN", TOKEN)
        .env_remove("GITHUB_API_URL")
        .env_remove("CREDENTIALS_DIRECTORY");
    command
}

/// `events list --json` of a state dir.
async fn listed(state: &Path) -> Vec<Value> {
    let out = run_to_end(
        smee_relay()
            .args(["events", "list", "--json", "--limit", "1000", "--state-dir"])
            .arg(state),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// The acceptance test of the issue: 3 of 10 deliveries never reached the relay; catch-up
/// recovers exactly those 3, in order, and the running daemon delivers them; a second run
/// recovers nothing. A redelivery of a missing GUID is recovered once; a 403 with retry-after
/// is waited out.
#[tokio::test]
async fn three_missed_deliveries_are_recovered_in_order_once_and_delivered_by_the_running_daemon() {
    let mut all = deliveries(10);
    // GitHub redelivered guid-5 (after the outage) under a new id: one GUID, recovered once.
    all.push(Delivery {
        id: 2000,
        redelivery: true,
        age_s: 5,
        ..all[5].clone()
    });
    let Scene {
        github,
        channel,
        mut target,
        dir,
        config,
    } = scene(&all, "CatchUpChannel").await;
    github.state.limit_next_detail.store(true, Ordering::SeqCst);
    let (_daemon, logs) = spawn_logged(smee_relay().args(["run", "--config"]).arg(&config));
    logs.wait_for(&["connected to channel"]).await;

    let missed = [2usize, 5, 8];
    for (i, d) in all[..10].iter().enumerate() {
        if !missed.contains(&i) {
            channel.send_webhook(i as u64 + 1, &live_frame(d));
        }
    }
    let live = target.take(7).await;
    assert!(
        live.iter()
            .all(|r| r.header("x-smee-relay-recovered").is_none())
    );

    let out = run_to_end(catch_up(&config, &github).args(["--since", "2h"])).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("11 deliveries (10 GUIDs) since 2h, 3 missing from the spool"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("recovered 3 deliveries"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN));

    let recovered = target.take(3).await;
    for (request, &i) in recovered.iter().zip(&missed) {
        assert_eq!(request.uri, "/hook");
        assert_eq!(request.body, compact(&all[i]).as_bytes(), "delivery {i}");
        assert_eq!(
            request.header("x-github-delivery"),
            Some(all[i].guid.as_str())
        );
        assert_eq!(request.header("x-github-event"), Some("push"));
        assert_eq!(request.header("x-smee-relay-recovered"), Some("github"));
        assert_eq!(request.header("x-hub-signature-256"), None);
        assert_eq!(request.header("x-hub-signature"), None);
    }
    // Paged: 11 deliveries, 4 a page. Details: the 3 missing, one of them asked twice (403).
    assert_eq!(github.state.list_requests.load(Ordering::SeqCst), 3);
    let details = github.state.detail_requests.lock().unwrap().clone();
    assert_eq!(details, [1002, 1002, 1005, 1008]);

    // Again: nothing is missing any more.
    let out = run_to_end(catch_up(&config, &github).args(["--since", "2h"])).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("0 missing"), "{}", out.stdout);
    assert!(
        out.stdout.contains("recovered 0 deliveries"),
        "{}",
        out.stdout
    );
    let rows = listed(&dir.path().join("state")).await;
    assert_eq!(rows.len(), 10, "{rows:?}");
    let marked: Vec<u64> = rows
        .iter()
        .filter(|r| r["recovered"] == "github")
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(marked, [8, 9, 10]);
    // The table says it too.
    let table = run_to_end(
        smee_relay()
            .args(["events", "list", "--state-dir"])
            .arg(dir.path().join("state")),
    )
    .await;
    assert_eq!(
        table.stdout.matches("(recovered: github)").count(),
        3,
        "{}",
        table.stdout
    );
}

/// A dry run lists and changes nothing (it does not even create a spool); `--since` leaves
/// older deliveries alone; an organisation hook works; with the daemon stopped, what catch-up
/// queued is delivered when it starts.
#[tokio::test]
async fn a_dry_run_changes_nothing_since_is_respected_and_a_stopped_daemon_delivers_on_start() {
    let mut all = deliveries(5);
    // Two from before --since.
    for (i, d) in all.iter_mut().take(2).enumerate() {
        d.age_s = 3 * 3600 + i as u64;
    }
    let Scene {
        github,
        channel: _channel,
        mut target,
        dir,
        config,
    } = scene(&all, "StoppedChannel").await;
    let org = || {
        let mut command = smee_relay();
        command
            .args(["catch-up", "github", "--org", "octo-org", "--hook", "42"])
            .arg("--config")
            .arg(&config)
            .args(["--api-url", &github.url, "--since", "2h"])
            .env("GITHUB_TOKEN", TOKEN)
            .env_remove("GITHUB_API_URL");
        command
    };
    let out = run_to_end(org().arg("--dry-run")).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("would recover 3 deliveries"),
        "{}",
        out.stdout
    );
    for d in &all[2..] {
        assert!(out.stdout.contains(&d.guid), "{}", out.stdout);
    }
    for d in &all[..2] {
        assert!(!out.stdout.contains(&d.guid), "{}", out.stdout);
    }
    assert!(github.state.detail_requests.lock().unwrap().is_empty());
    assert!(
        !dir.path().join("state").exists(),
        "a dry run creates nothing"
    );

    let out = run_to_end(&mut org()).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("recovered 3 deliveries"),
        "{}",
        out.stdout
    );
    // A dry run now finds nothing missing, and still changes nothing.
    let out = run_to_end(org().arg("--dry-run")).await;
    assert!(out.stdout.contains("would recover 0"), "{}", out.stdout);
    assert_eq!(listed(&dir.path().join("state")).await.len(), 3);

    let (_daemon, _logs) = spawn_logged(smee_relay().args(["run", "--config"]).arg(&config));
    let delivered = target.take(3).await;
    for (request, d) in delivered.iter().zip(&all[2..]) {
        assert_eq!(request.body, compact(d).as_bytes());
        assert_eq!(request.header("x-smee-relay-recovered"), Some("github"));
    }
}

/// `--since` beyond `--retain`: deliveries the relay delivered and then pruned looked missing,
/// and each catch-up (the daemon's runs after every reconnect too) delivered them again.
#[tokio::test]
async fn regression_catch_up_beyond_retain_delivered_pruned_events_again() {
    let all = deliveries(3);
    let Scene {
        github,
        channel: _channel,
        mut target,
        dir,
        config,
    } = scene(&all, "PrunedChannel").await;
    let out = run_to_end(&mut catch_up(&config, &github)).await;
    assert!(
        out.stdout.contains("recovered 3 deliveries"),
        "{}",
        out.stdout
    );
    let (mut daemon, _logs) = spawn_logged(smee_relay().args(["run", "--config"]).arg(&config));
    target.take(3).await;
    support::signal(&daemon, "TERM");
    assert_eq!(support::exit_code(&mut daemon).await, Some(0));
    // As `--retain` does, a day later.
    let state = dir.path().join("state");
    let spool = smee_relay::spool::Spool::open(&state).unwrap();
    assert_eq!(spool.prune(smee_relay::clock::now_ms() + 1).unwrap(), 3);
    drop(spool);

    let out = run_to_end(&mut catch_up(&config, &github)).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("recovered 0 deliveries"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("3 deliveries made before ")
            && out.stdout.contains("not checked: the spool has pruned"),
        "{}",
        out.stdout
    );
    assert!(listed(&state).await.is_empty());
}

/// A bad token: a clear error that says what to check, with GitHub's message, exit 1, and the
/// token never shown. No token at all: a usage error, exit 2.
#[tokio::test]
async fn a_bad_token_is_a_clear_error() {
    let github = FakeGithub::start(deliveries(3)).await;
    let dir = temp_dir();
    let config = write_config(
        dir.path(),
        "https://smee.io/BadTokenCh",
        "http://127.0.0.1:9/",
        "",
    );
    let out = run_to_end(catch_up(&config, &github).env("GITHUB_TOKEN", "ghp_wrong_secret")).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("refused the token (401: Bad credentials)"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--token-env"), "{}", out.stderr);
    assert!(!out.stderr.contains("ghp_wrong_secret"), "{}", out.stderr);

    let out = run_to_end(catch_up(&config, &github).env_remove("GITHUB_TOKEN")).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("GITHUB_TOKEN is not set"),
        "{}",
        out.stderr
    );

    // A token file works where the variable is missing (systemd credentials).
    let token_file = dir.path().join("github-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let out = run_to_end(
        catch_up(&config, &github)
            .env_remove("GITHUB_TOKEN")
            .arg("--dry-run")
            .arg("--token-file")
            .arg(&token_file),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("would recover 3"), "{}", out.stdout);
}

/// A daemon (`run`) relaying `channel` to `target`, with a `[channel.github_catch_up]` block for
/// `github` whose token variable holds `token`; and its directory (hold it).
fn daemon_catching_up(
    github: &FakeGithub,
    channel: &str,
    target: &str,
    token: &str,
) -> (tokio::process::Child, support::LogWatch, tempfile::TempDir) {
    let dir = temp_dir();
    let extra = format!(
        "[channel.github_catch_up]\nrepo = \"octo-org/octo-repo\"\nhook = 42\napi_url = {:?}\n\
         token_env = \"TEST_GITHUB_TOKEN\"\nsince = \"2h\"\n",
        github.url
    );
    let config = write_config(dir.path(), channel, target, &extra);
    let (daemon, logs) = spawn_logged(
        smee_relay()
            .args(["run", "--config"])
            .arg(&config)
            .env("TEST_GITHUB_TOKEN", token),
    );
    (daemon, logs, dir)
}

/// `[channel.github_catch_up]`: the daemon catches up by itself when the channel connects.
#[tokio::test]
async fn the_daemon_catches_up_when_the_channel_connects() {
    let all = deliveries(4);
    let github = FakeGithub::start(all.clone()).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (_daemon, logs, _dir) = daemon_catching_up(
        &github,
        &channel.url("DaemonCatchUp"),
        &target.url("/hook"),
        TOKEN,
    );
    let delivered = target.take(4).await;
    for (request, d) in delivered.iter().zip(&all) {
        assert_eq!(request.body, compact(d).as_bytes());
        assert_eq!(request.header("x-smee-relay-recovered"), Some("github"));
    }
    logs.wait_for(&["GitHub catch-up: recovered 4"]).await;
    assert!(!logs.all().contains(TOKEN));
}

/// Regression (helper-121): the daemon's catch-up with a token GitHub refuses was a WARN that
/// "the next gap tries again", naming command-line flags the config does not have. A refused
/// token does not mend itself: an ERROR naming the config's keys.
#[tokio::test]
async fn regression_the_daemons_refused_token_was_a_warning_naming_flags() {
    let github = FakeGithub::start(deliveries(2)).await;
    let channel = FakeChannel::start().await;
    let (_daemon, logs, _dir) = daemon_catching_up(
        &github,
        &channel.url("RefusedToken"),
        "http://127.0.0.1:9/",
        "not-the-token",
    );
    logs.wait_for(&[
        "ERROR",
        "GitHub catch-up cannot run until the token is fixed (then reload)",
        "refused the token (401: Bad credentials)",
        "`token_env` / `token_file` in the config",
    ])
    .await;
}

/// Regression (helper-121): catch-up for a `forward` relay (no config) failed until the relay
/// had received an event, and told the user to give a config they do not have. `--target`
/// names the relay's target; the running relay delivers what is recovered.
#[tokio::test]
async fn regression_catch_up_for_a_forward_relay_needed_an_event_first() {
    let all = deliveries(2);
    let github = FakeGithub::start(all.clone()).await;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let dir = temp_dir();
    let state = dir.path().join("state");
    let (channel_url, target_url) = (channel.url("ForwardCatchUp"), target.url("/hook"));
    let (_relay, logs) = spawn_logged(
        smee_relay()
            .args(["forward", &channel_url, &target_url, "--state-dir"])
            .arg(&state),
    );
    logs.wait_for(&["connected to channel"]).await;
    let catch_up = |target: Option<&str>| {
        let mut command = catch_up_hook_42(&github);
        command
            .args(["--channel", &channel_url, "--state-dir"])
            .arg(&state);
        if let Some(target) = target {
            command.args(["--target", target]);
        }
        command
    };
    let out = run_to_end(&mut catch_up(None)).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("give the relay's target with --target URL"),
        "{}",
        out.stderr
    );
    let out = run_to_end(&mut catch_up(Some(&target_url))).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let delivered = target.take(2).await;
    for (request, d) in delivered.iter().zip(&all) {
        assert_eq!(request.body, compact(d).as_bytes());
    }
}

/// Regression: one delivery GitHub answers 404 for, or one list entry that does not decode,
/// aborted the whole catch-up and recovered nothing. Now they are skipped and named, the rest
/// recovered in order, and the exit code says something failed.
#[tokio::test]
async fn one_bad_delivery_does_not_abort_the_catch_up() {
    let all = deliveries(6);
    let github = FakeGithub::start(all.clone()).await;
    github.state.gone.lock().unwrap().push(all[2].id);
    github.state.bad_entry.store(true, Ordering::SeqCst);
    let dir = temp_dir();
    let config = write_config(
        dir.path(),
        "https://smee.io/OneBadDelivery",
        "http://127.0.0.1:9/",
        "",
    );
    let out = run_to_end(&mut catch_up(&config, &github)).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("recovered 5 deliveries"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains(&all[2].guid) && l.contains("FAILED") && l.contains("404")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("guid-bad"), "{}", out.stdout);
    assert!(
        out.stderr.contains("2 deliveries") && out.stderr.contains("could not be recovered"),
        "{}",
        out.stderr
    );
    assert_eq!(listed(&dir.path().join("state")).await.len(), 5);
    let expected: Vec<&str> = all
        .iter()
        .filter(|d| d.id != all[2].id)
        .map(|d| d.guid.as_str())
        .collect();
    assert_eq!(recovered_in_order(&out.stdout), expected, "{}", out.stdout);
}

/// A dry run against a fake GitHub with two deliveries, `set` applied to its state first (a
/// scripted failure): it must fail (exit 1); its output.
async fn failing_dry_run(channel: &str, set: impl FnOnce(&GithubState)) -> support::Output {
    let github = FakeGithub::start(deliveries(2)).await;
    set(&github.state);
    let dir = temp_dir();
    let config = write_config(dir.path(), channel, "http://127.0.0.1:9/", "");
    let out = run_to_end(catch_up(&config, &github).arg("--dry-run")).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    out
}

/// Regression: the delivery list's paging had no page cap and no repeated-cursor check (a
/// cursor loop ran for ever), and a response body was read whole whatever its size.
#[tokio::test]
async fn a_cursor_loop_or_a_huge_list_page_is_a_clear_error() {
    let out = failing_dry_run("https://smee.io/LoopCh", |s| {
        s.loop_cursor.store(true, Ordering::SeqCst)
    })
    .await;
    assert!(out.stderr.contains("twice (a loop)"), "{}", out.stderr);
    let out = failing_dry_run("https://smee.io/LoopCh", |s| {
        s.huge_list.store(true, Ordering::SeqCst)
    })
    .await;
    assert!(out.stderr.contains("larger than"), "{}", out.stderr);
}

/// Regression (helper-121): a rate limit reset an hour away was logged "waiting 1h before
/// trying again", and the run then gave up at once: the error alone says it now.
#[tokio::test]
async fn regression_a_rate_limit_too_long_to_wait_said_it_would_wait() {
    let out = failing_dry_run("https://smee.io/Limited", |s| {
        s.limit_for_an_hour.store(true, Ordering::SeqCst)
    })
    .await;
    assert!(
        out.stderr.contains("rate limit allows the next request in")
            && out.stderr.contains("run it again later"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("waiting"), "{}", out.stderr);
}

/// Regression (helper-121): a 403 for a token without the permission got no hint, where a
/// 401 said what the token needs.
#[tokio::test]
async fn regression_a_token_without_the_permission_got_no_hint() {
    let out = failing_dry_run("https://smee.io/Forbidden", |s| {
        s.forbidden.store(true, Ordering::SeqCst)
    })
    .await;
    assert!(
        out.stderr
            .contains("refused the token (403: Resource not accessible by personal access token)")
            && out
                .stderr
                .contains("`token_env` / `token_file` in the config")
            && out.stderr.contains("admin:repo_hook"),
        "{}",
        out.stderr
    );
}

/// More missed deliveries than one batch: appended in bounded batches, still in order, each
/// once.
#[tokio::test]
async fn a_long_outage_is_appended_in_batches_in_order() {
    let all = deliveries(120);
    let github = FakeGithub::start(all.clone()).await;
    let dir = temp_dir();
    let config = write_config(
        dir.path(),
        "https://smee.io/LongOutage",
        "http://127.0.0.1:9/",
        "",
    );
    let out = run_to_end(catch_up(&config, &github).args(["--since", "1d"])).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(listed(&dir.path().join("state")).await.len(), 120);
    let expected: Vec<&str> = all.iter().map(|d| d.guid.as_str()).collect();
    assert_eq!(recovered_in_order(&out.stdout), expected, "{}", out.stdout);
}

/// The GUIDs catch-up printed as recovered, checked to have got increasing event ids (so they
/// were appended in that order).
fn recovered_in_order(stdout: &str) -> Vec<&str> {
    let mut last = 0;
    stdout
        .lines()
        .filter_map(|line| {
            let (_, id) = line.rsplit_once("  event ")?;
            let id: u64 = id.trim().parse().ok()?;
            assert!(id > last, "event ids out of order: {stdout}");
            last = id;
            line.split_whitespace().nth(1)
        })
        .collect()
}

/// Regression: with `--config` and no `state_dir`, catch-up silently made a new spool in the
/// default state directory while the daemon's was elsewhere. It refuses now, and says the
/// spool it uses.
#[tokio::test]
async fn a_config_without_state_dir_does_not_create_a_spool_elsewhere() {
    let github = FakeGithub::start(deliveries(3)).await;
    let dir = temp_dir();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[[channel]]\nurl = \"https://smee.io/NoStateDir\"\nforward = [\"http://127.0.0.1:9/\"]\n",
    )
    .unwrap();
    let home = dir.path().join("home");
    let out = run_to_end(
        catch_up(&config, &github)
            .env("HOME", &home)
            .env("XDG_STATE_HOME", home.join("state"))
            .env_remove("STATE_DIRECTORY"),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("no spool at"), "{}", out.stderr);
    assert!(out.stderr.contains("--state-dir"), "{}", out.stderr);
    assert!(!home.exists(), "nothing was created");

    let state = dir.path().join("chosen");
    let out = run_to_end(
        catch_up(&config, &github)
            .arg("--dry-run")
            .arg("--state-dir")
            .arg(&state),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("spool: {}", state.display())),
        "{}",
        out.stdout
    );
}

/// Regression: with `--config`, the channel's `[channel.github_catch_up]` block was ignored
/// (repo, hook, api_url, token all had to be given again); `--token-env` with `--token-file`,
/// an empty token variable and `--hook 0` were not refused clearly; `--ignore-event` did not
/// exist.
#[tokio::test]
async fn the_config_block_supplies_the_flags_and_bad_token_flags_are_refused() {
    let github = FakeGithub::start(deliveries(3)).await;
    let dir = temp_dir();
    let block = format!(
        "[channel.github_catch_up]\nrepo = \"octo-org/octo-repo\"\nhook = 42\napi_url = {:?}\n\
         token_env = \"BLOCK_TOKEN\"\nsince = \"2h\"\n",
        github.url
    );
    let config = write_config(
        dir.path(),
        "https://smee.io/BlockCh",
        "http://127.0.0.1:9/",
        &block,
    );
    let bare = || {
        let mut command = smee_relay();
        command
            .args(["catch-up", "github", "--dry-run", "--config"])
            .arg(&config)
            .env("BLOCK_TOKEN", TOKEN)
            .env_remove("GITHUB_TOKEN")
            .env_remove("GITHUB_API_URL")
            .env_remove("CREDENTIALS_DIRECTORY");
        command
    };
    let out = run_to_end(&mut bare()).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("would recover 3"), "{}", out.stdout);
    assert!(out.stdout.contains("since 2h"), "{}", out.stdout);

    // Regression: `check` said nothing of a channel's catch-up block.
    let out = run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&config)
            .env("BLOCK_TOKEN", TOKEN),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("GitHub catch-up from hook 42 of repository octo-org/octo-repo"),
        "{}",
        out.stdout
    );

    let out = run_to_end(bare().args(["--token-env", "X", "--token-file", "/nonexistent"])).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot be used with"), "{}", out.stderr);

    let out = run_to_end(
        bare()
            .args(["--token-env", "EMPTY_TOKEN"])
            .env("EMPTY_TOKEN", ""),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("EMPTY_TOKEN is empty"),
        "{}",
        out.stderr
    );

    let out = run_to_end(bare().args(["--hook", "0"])).await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);

    // Recovering for real with --ignore-event push: all three are skipped.
    let out = run_to_end(
        smee_relay()
            .args(["catch-up", "github", "--ignore-event", "push", "--config"])
            .arg(&config)
            .env("BLOCK_TOKEN", TOKEN)
            .env_remove("GITHUB_API_URL"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("3 skipped by ignore_events"),
        "{}",
        out.stdout
    );
}
