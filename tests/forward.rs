//! `forward`: a smee channel relayed to a local target, through a fake channel and a fake
//! target on loopback, with the real library (in process) or the real binary.

mod support;

use std::time::Duration;

use support::{FakeChannel, FakeTarget, LogWatch, smee_relay};

/// Relay `channel` to the target's `/hook` in this process, idle timeout as given.
async fn start_relay(
    channel: &FakeChannel,
    target: &FakeTarget,
    idle_timeout: Duration,
) -> support::Relay {
    let mut options = support::relay_options(channel, &target.url("/hook"));
    options.source.idle_timeout = idle_timeout;
    support::Relay::start(channel, options).await
}

fn webhook(seq: u64) -> String {
    format!(
        r#"{{"content-type":"application/json","x-github-event":"push","body":{{"seq":{seq}}},"query":{{}},"timestamp":1700000000000}}"#
    )
}

#[tokio::test]
async fn a_thousand_events_arrive_in_order() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    for seq in 0..1000 {
        channel.send_webhook(seq + 1, &webhook(seq));
    }
    for (seq, request) in target.take(1000).await.into_iter().enumerate() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.uri, "/hook");
        assert_eq!(request.body, format!(r#"{{"seq":{seq}}}"#));
    }
}

#[tokio::test]
async fn bodies_arrive_byte_exact() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    let bodies = [
        r#"{"zeta":1,"alpha":2,"mid":{"b":1,"a":2}}"#,
        r#"{"text":"café ☕ 日本語","escaped":"caf\u00e9","slash":"a\/b"}"#,
        r#"{"float":1.0,"exp":1e5,"neg":-0.0,"big":123456789012345678901234567890}"#,
        r#"{"spaced" : [ 1 , 2 ] ,"nested":{"deep":{"deeper":[{"x":null}]}}}"#,
        r#"[1,"two",3.0]"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        channel.send_webhook(
            i as u64 + 1,
            &format!(r#"{{"content-type":"application/json","body":{body}}}"#),
        );
    }
    for (body, request) in bodies.iter().zip(target.take(bodies.len()).await) {
        assert_eq!(request.body, body.as_bytes());
        assert_eq!(
            request.header("content-length"),
            Some(&*body.len().to_string())
        );
    }
}

#[tokio::test]
async fn headers_are_cleaned_and_injection_is_dropped() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    channel.send_webhook(
        1,
        &[
            r#"{"host":"smee.io","content-length":"999","connection":"keep-alive","#,
            r#""transfer-encoding":"chunked","keep-alive":"timeout=5","#,
            r#""proxy-authorization":"Basic eA==","upgrade":"h2c","#,
            r#""content-type":"application/json; charset=utf-8","#,
            r#""x-hub-signature-256":"sha256=abc","x-evil":"a\r\nx-injected: yes","#,
            r#""x-number":42,"bad header":"v","body":{"ok":true},"query":{},"#,
            r#""timestamp":1700000000000}"#,
        ]
        .concat(),
    );
    let request = target.next().await;
    assert_eq!(
        request.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(request.header("x-hub-signature-256"), Some("sha256=abc"));
    assert_eq!(request.header("content-length"), Some("11"));
    assert_ne!(request.header("host"), Some("smee.io"));
    for absent in [
        "transfer-encoding",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
        "x-evil",
        "x-injected",
        "x-number",
        "timestamp",
        "query",
        "body",
    ] {
        assert!(request.header(absent).is_none(), "{absent} was forwarded");
    }
}

#[tokio::test]
async fn query_is_appended_to_the_target() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    channel.send_webhook(
        1,
        r#"{"body":{},"query":{"token":"a b&c","tag":["x","y"]}}"#,
    );
    assert_eq!(target.next().await.uri, "/hook?token=a+b%26c&tag=x&tag=y");
}

#[tokio::test]
async fn reconnects_after_the_server_closes_the_stream() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    channel.send_webhook(7, &webhook(1));
    target.next().await;
    channel.close_all();
    channel.wait_connections(2).await;
    assert_eq!(channel.accept(1).as_deref(), Some("text/event-stream"));
    assert_eq!(
        channel.last_event_id(1).as_deref(),
        Some("7"),
        "Last-Event-ID lets a server that keeps events replay what was missed"
    );
    channel.send_webhook(1, &webhook(2));
    assert_eq!(target.next().await.body, r#"{"seq":2}"#);
}

#[tokio::test]
async fn idle_watchdog_drops_a_silent_connection() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    // The server sends `ready` and then nothing, like a half-open connection.
    let _relay = start_relay(&channel, &target, Duration::from_millis(300)).await;

    channel.wait_connections(2).await;
    // The silent connection is still open on the server; only the new one gets the event.
    channel.send_webhook(1, &webhook(1));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
}

/// Regression (an adversary's finding): a channel that redirected to another host got the
/// channel token sent there too (and the channel URL, in `Referer`); a relative `Location`
/// failed every connection, and a 302 was not followed at all.
#[tokio::test]
async fn regression_a_redirect_to_another_host_does_not_carry_the_token() {
    let elsewhere = FakeChannel::start().await;
    let channel = FakeChannel::start().await;
    // Same server, relative Location (302), then another host (307).
    channel.redirect("Start", 302, "/Moved");
    channel.redirect("Moved", 307, &elsewhere.url("Final"));
    let mut target = FakeTarget::start().await;
    let mut options = support::relay_options_for(&channel.url("Start"), &target.url("/hook"));
    options.source.token = Some("s3cret-token".into());
    let _relay = support::Relay::start(&elsewhere, options).await;

    assert_eq!(channel.request_channel(1), "Moved");
    assert_eq!(
        channel.request_header(1, "authorization").as_deref(),
        Some("Bearer s3cret-token"),
        "the same server still gets the token"
    );
    assert_eq!(elsewhere.request_channel(0), "Final");
    assert_eq!(elsewhere.request_header(0, "authorization"), None);
    assert_eq!(elsewhere.request_header(0, "referer"), None);
    assert_eq!(
        elsewhere.accept(0).as_deref(),
        Some("text/event-stream"),
        "the redirected request is still a subscription"
    );
    elsewhere.send_webhook(1, &webhook(1));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
}

#[tokio::test]
async fn a_page_that_is_not_an_event_stream_is_not_mistaken_for_one() {
    let channel = FakeChannel::start().await;
    channel.refuse_with(200, "text/html");
    let target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;
    // It keeps trying, rather than parsing HTML as a stream and waiting forever.
    channel.wait_connections(3).await;
}

// -------------------------------------------------------------------------------------------
// The binary
// -------------------------------------------------------------------------------------------

async fn spawn_forward(args: &[&str]) -> (tokio::process::Child, LogWatch) {
    support::spawn_logged(smee_relay().arg("forward").args(args))
}

/// Regression (a new user's finding): `https://` to a server that speaks plain HTTP was
/// retried forever with rustls's "received corrupt message of type InvalidContentType", which
/// does not say what to change.
#[tokio::test]
async fn regression_https_to_a_plain_http_server_says_so() {
    let channel = FakeChannel::start().await;
    let https = channel.url("Chan").replacen("http://", "https://", 1);
    let (_child, logs) = spawn_forward(&[&https, "http://127.0.0.1:9/"]).await;
    logs.wait_for(&["WARN", "plain HTTP", "http:// instead of https://"])
        .await;
}

/// Regression (an adversary's finding): a redirect loop logged a WARN for each of its ten
/// hops, on every connection attempt.
#[tokio::test]
async fn regression_a_redirect_loop_warns_once_per_attempt() {
    let channel = FakeChannel::start().await;
    channel.redirect("Ping", 302, "/Pong");
    channel.redirect("Pong", 302, "/Ping");
    let (_child, logs) = spawn_forward(&[&channel.url("Ping"), "http://127.0.0.1:9/"]).await;
    logs.wait_for(&["more than 10 redirects"]).await;
    let all = logs.all();
    let hops = all.matches("the channel URL redirects").count();
    let attempts = all.matches("more than 10 redirects").count();
    assert_eq!(hops, attempts, "one WARN per attempt:\n{all}");
}

#[tokio::test]
async fn bad_frames_are_logged_with_their_id_and_skipped() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let port = target.addr.port().to_string();
    let (_child, logs) = spawn_forward(&[
        &channel.url("SecretChannelId"),
        "--port",
        &port,
        "--path",
        "/hook",
    ])
    .await;
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    channel.send_raw("id: 1\ndata: this is not json\n\n");
    channel.send_raw("id: 2\ndata: [1,2,3]\n\n");
    channel.send_raw("id: 3\ndata: {\"body\":{\"cut\":\n\n");
    channel.send_webhook(4, r#"{"x-count":5,"body":{"n":4}}"#);
    channel.send_webhook(5, r#"{"x-evil":"v\r\nx-injected: 1","body":{"n":5}}"#);
    channel.send_raw("id: 6\nevent: surprise\ndata: {}\n\n");
    channel.send_webhook(7, r#"{"x-github-event":"push","body":{"n":7}}"#);

    let bodies: Vec<_> = target.take(3).await.into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [r#"{"n":4}"#, r#"{"n":5}"#, r#"{"n":7}"#]);
    logs.wait_for(&["frame_id=1", "not valid JSON"]).await;
    logs.wait_for(&["frame_id=2", "JSON array, expected an object"])
        .await;
    logs.wait_for(&["frame_id=3", "not valid JSON"]).await;
    logs.wait_for(&["frame_id=4", "x-count", "not a string"])
        .await;
    logs.wait_for(&["frame_id=5", "x-evil", "CR, LF"]).await;
    // The target is named host:port/path, so two local services are told apart.
    let line = format!("POST 127.0.0.1:{port}/hook -> 200");
    logs.wait_for(&[&line, "x-github-event=push"]).await;
    assert!(
        !logs.all().contains("SecretChannelId"),
        "the channel id must never be logged in full"
    );
    assert!(
        logs.find(&["Secr…"]).is_some(),
        "the channel shows as its first 4 characters"
    );
}

/// Reading the system's CA certificates was most of a relay's start-up; a relay whose channel and
/// target are plain http never needs them, so it never reads them (the debug line says when).
#[tokio::test]
async fn an_http_only_relay_never_reads_the_ca_certificates() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let (_child, logs) =
        spawn_forward(&[&channel.url("abcdef"), "-t", &target.url("/hook"), "-v"]).await;
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;
    channel.send_webhook(1, &webhook(1));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
    logs.wait_for(&[&format!("POST {}/hook -> 200", target.addr)])
        .await;
    // Debug lines are on (-v), so the line would be there had the roots been read.
    assert!(logs.find(&["DEBUG"]).is_some(), "{}", logs.all());
    assert!(logs.find(&["CA certificates"]).is_none(), "{}", logs.all());
}

#[tokio::test]
async fn sigterm_finishes_the_delivery_in_flight_and_exits_0() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    target.hold();
    let (mut child, logs) =
        spawn_forward(&[&channel.url("abcdef"), "-t", &target.url("/slow")]).await;
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    channel.send_webhook(1, &webhook(1));
    // The request is in flight and unanswered; ask to stop in the middle of it.
    target.wait_arrived(1).await;
    support::signal(&child, "TERM");
    logs.wait_for(&["shutting down"]).await;
    target.release();
    assert_eq!(support::exit_code(&mut child).await, Some(0));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
    logs.wait_for(&[&format!("POST {}/slow -> 200", target.addr)])
        .await;
}

async fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let output = support::run_to_end(smee_relay().args(args)).await;
    (output.code, output.stdout, output.stderr)
}

#[tokio::test]
async fn bad_arguments_exit_2_naming_the_argument_and_the_problem() {
    let cases: [(&[&str], &str); 10] = [
        // Regression (a new user's finding): a server's /new was taken for a channel, and made
        // a new one (that nobody posts to) at each connection.
        (&["forward", "https://smee.io/new"], "smee-relay new"),
        (&["forward", "https://smee.io/NEW/"], "smee-relay new"),
        // Regression (same): a channel without a scheme was told of a target's example.
        (&["forward", "smee.io/AbCd1234"], "such as https://smee.io/"),
        (&["forward", "not a url"], "CHANNEL_URL"),
        // Regression: taken, then every deadline made from it panicked.
        (
            &[
                "forward",
                "https://smee.io/x",
                "--idle-timeout",
                "300000000000y",
            ],
            "longer than 100 years",
        ),
        (
            &["serve", "--read-timeout", "300000000000y"],
            "longer than 100 years",
        ),
        (
            &["forward", "ftp://smee.io/x"],
            "scheme must be http or https",
        ),
        (&["forward", "https://smee.io/x", "--port", "0"], "--port"),
        (
            &["forward", "https://smee.io/x", "--idle-timeout", "soon"],
            "--idle-timeout",
        ),
        (
            &["forward", "https://smee.io/x", "mailto:me@example.com"],
            "TARGET_URL",
        ),
    ];
    for (args, mentions) in cases {
        let (code, _, stderr) = run_to_end(args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        // clap's whole message: the argument, the problem, and where to read more.
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains(mentions), "{args:?}: {stderr}");
        assert!(stderr.contains("--help"), "{args:?}: {stderr}");
    }
}

/// Regression (a new user's finding): a `PORT` that is not a port and an unreadable CA file
/// exited 1, as a runtime failure does, and a config's `cacert` that does not exist passed
/// `check`, then `run` blamed `--cacert`. Each is the user's to fix: exit 2, naming the setting.
#[tokio::test]
async fn regression_a_bad_port_variable_or_ca_file_exits_2_naming_it() {
    let out = support::run_to_end(
        smee_relay()
            .args(["forward", "https://smee.io/x"])
            .env("PORT", "web"),
    )
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("PORT in the environment"),
        "{}",
        out.stderr
    );

    // `--cacert`: tests/cli.rs, `cacert_that_is_missing_or_not_pem_is_refused_with_its_path`;
    // `new` takes it too (a self-hosted server with a private CA).
    let out = support::run_to_end(smee_relay().args([
        "new",
        "--server",
        "https://127.0.0.1:9",
        "--cacert",
        "/nonexistent/ca.pem",
    ]))
    .await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/ca.pem (--cacert"),
        "{}",
        out.stderr
    );
    let dir = support::temp_dir();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "cacert = \"/nonexistent/ca.pem\"\n[[channel]]\nurl = \"https://smee.io/x\"\nforward = [\"http://127.0.0.1:9/\"]\n",
    )
    .unwrap();
    for command in ["check", "run"] {
        let mut invocation = smee_relay();
        invocation.args([command, "--config"]).arg(&config);
        if command == "run" {
            invocation.arg("--state-dir").arg(dir.path().join("state"));
        }
        let out = support::run_to_end(&mut invocation).await;
        assert_eq!(out.code, Some(2), "{command}: {}", out.stderr);
        let said = format!("/nonexistent/ca.pem (cacert in {})", config.display());
        assert!(
            out.stderr.contains(&said) && !out.stderr.contains("--cacert"),
            "{command}: {}",
            out.stderr
        );
    }
    // Regression (a new user's finding): a relative `cacert` was looked for in the directory
    // the command ran in (`/` under systemd), not beside the config.
    let (ca, _, _) = support::certificate(dir.path(), "beside");
    std::fs::rename(ca, dir.path().join("ca.pem")).unwrap();
    std::fs::write(
        &config,
        "cacert = \"ca.pem\"\n[[channel]]\nurl = \"https://smee.io/x\"\nforward = [\"http://127.0.0.1:9/\"]\n",
    )
    .unwrap();
    let out = support::run_to_end(
        smee_relay()
            .args(["check", "--config"])
            .arg(&config)
            .current_dir("/"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[tokio::test]
async fn a_runtime_failure_exits_1() {
    // A port nobody listens on: bind one, note it, close it.
    let port = support::unused_addr().port();
    let (code, _, stderr) =
        run_to_end(&["new", "--server", &format!("http://127.0.0.1:{port}")]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot create a channel"), "{stderr}");
}

/// Regression (helper-125): a server refusing new channels (503 at `--max-channels`) got
/// "it answered 503 Service Unavailable with no Location": its reason, in its body, was not read.
#[tokio::test]
async fn regression_new_dropped_the_servers_reason() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = smee_relay::server::ServeConfig {
        max_channels: 1,
        ..Default::default()
    };
    tokio::spawn(smee_relay::server::serve(listener, config, cancel.clone()));
    let taken = smee_relay::http::client_builder()
        .build()
        .unwrap()
        .post(format!("{server}/onlyChannel"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(taken.status().as_u16(), 200);
    let (code, _, stderr) = run_to_end(&["new", "--server", &server]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("answered 503 Service Unavailable: the server holds its maximum of 1"),
        "{stderr}"
    );
    cancel.cancel();
}

/// Regression (helper-131): a server that takes only GET for `/new` (HEAD answered 501) made
/// `new` fail, though its GET redirected to a fresh channel.
#[tokio::test]
async fn regression_new_failed_on_a_server_without_head() {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let router = axum::Router::new().route(
        "/new",
        get(|| async {
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [("location", "/GetOnlyChannel7")],
            )
        })
        .head(|| async { axum::http::StatusCode::NOT_IMPLEMENTED }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let (code, stdout, stderr) = run_to_end(&["new", "--server", &server]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), format!("{server}/GetOnlyChannel7"));
}

/// Regression (helper-132): `new` took any Location for a channel (the server's root, one on a
/// 500), asked `/new` at the root of a server URL with a path, and read a body without a
/// channel whole into memory (4 GiB for a server streaming one).
#[tokio::test]
async fn regression_new_took_what_was_no_channel() {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let redirect =
        |to: &'static str| move || async move { (StatusCode::FOUND, [("location", to)]) };
    let router = axum::Router::new()
        .route("/root/new", get(redirect("/")))
        .route("/empty/new", get(redirect("")))
        .route("/loop/new", get(redirect("/loop/new?again=1")))
        .route(
            "/cached/new",
            get(|| async { (StatusCode::NOT_MODIFIED, [("location", "/x1")]) }),
        )
        .route(
            "/error/new",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, [("location", "/x1")]) }),
        )
        .route(
            "/huge/new",
            get(|| async {
                let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                let endless =
                    futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
                axum::body::Body::from_stream(endless)
            }),
        )
        .route("/prefix/new", get(redirect("UnderThePrefix9")));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    for (path, said) in [
        ("root", "redirected to \"/\", which names no channel"),
        ("empty", "which names no channel"),
        ("loop", "which names no channel"),
        ("error", "answered 500 Internal Server Error and no channel"),
        // Regression (helper-134): a 304 with a Location was taken for a channel.
        ("cached", "answered 304 Not Modified and no channel"),
        ("huge", "answered 200 OK and no channel"),
    ] {
        let (code, stdout, stderr) =
            run_to_end(&["new", "--server", &format!("{server}/{path}")]).await;
        assert_eq!(code, Some(1), "{path}: {stdout}{stderr}");
        assert!(stderr.contains(said), "{path}: {stderr}");
    }
    // Regression (helper-135): the URL asked was not said.
    let (code, _, stderr) = run_to_end(&[
        "new",
        "--server",
        &format!("http://u:pw@{}/nowhere", &server[7..]),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "http://u:***@{}/nowhere/new answered 404",
            &server[7..]
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("pw"), "{stderr}");
    let (code, stdout, stderr) =
        run_to_end(&["new", "--server", &format!("{server}/prefix")]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), format!("{server}/prefix/UnderThePrefix9"));
}

/// Regression (helper-132): a server that took the connection and never answered held `new`
/// for ever, and `forward --server` ignored a stop meanwhile.
#[tokio::test(start_paused = true)]
async fn regression_new_waited_for_ever_on_a_silent_server() {
    // Accepted by the kernel (the backlog), never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server: reqwest::Url = format!("http://{}", silent.local_addr().unwrap())
        .parse()
        .unwrap();
    let e = smee_relay::source::create_channel(&server)
        .await
        .unwrap_err();
    assert!(e.to_string().ends_with("no answer within 30s"), "{e}");
}

#[tokio::test]
async fn regression_forward_ignored_a_stop_while_the_server_was_asked_for_a_channel() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", silent.local_addr().unwrap());
    let state = tempfile::tempdir().unwrap();
    let (mut child, _logs) = spawn_forward(&[
        "--server",
        &server,
        "-t",
        "http://127.0.0.1:9/",
        "--state-dir",
        state.path().to_str().unwrap(),
    ])
    .await;
    // Once it has asked: the connection is there.
    let asked = tokio::task::spawn_blocking(move || {
        let connection = silent.accept();
        (silent, connection)
    });
    let (_silent, _connection) = tokio::time::timeout(support::PATIENCE, asked)
        .await
        .expect("forward asks the server")
        .unwrap();
    support::signal(&child, "TERM");
    let status = tokio::time::timeout(support::PATIENCE, child.wait())
        .await
        .expect("a stop ends it")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn new_prints_a_fresh_channel_url() {
    let channel = FakeChannel::start().await;
    let server = format!("http://{}", channel.addr);
    let (code, stdout, stderr) = run_to_end(&["new", "--server", &server]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), format!("{server}/FreshChannel42"));
}

#[tokio::test]
async fn forward_without_a_channel_creates_one() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let server = format!("http://{}", channel.addr);
    let port = target.addr.port().to_string();
    let (mut child, _logs) = spawn_forward(&["--server", &server, "-p", &port]).await;
    channel.wait_connections(1).await;
    channel.send_webhook(1, &webhook(1));
    assert_eq!(target.next().await.uri, "/");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let printed = tokio::time::timeout(support::PATIENCE, lines.next_line())
        .await
        .expect("a line on stdout")
        .unwrap()
        .unwrap_or_default();
    assert!(
        printed.contains(&format!("{server}/FreshChannel42")),
        "{printed}"
    );
}

/// A large body (in the spool it is stored in pieces) arrives whole and exact, even when the
/// frame reaches the relay a few bytes at a time and lines end in CRLF.
#[tokio::test]
async fn a_large_binary_body_arrives_exact() {
    use base64::Engine as _;
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&body);
    let frame = format!(
        "id: 1\r\ndata: {{\"content-type\":\"application/octet-stream\",\"bodyB\":\"{encoded}\"}}\r\n\r\n"
    );
    let (head, tail) = frame.split_at(100);
    for piece in head.as_bytes().chunks(7) {
        channel.send_raw(piece.to_vec());
    }
    channel.send_raw(tail.to_string());
    let request = target.next().await;
    assert_eq!(request.body.len(), body.len());
    assert!(request.body == body, "the body differs");
}

/// A byte that is not UTF-8 inside a frame makes the SSE parser (eventsource-client) refuse
/// that frame. Regression (before our own parser): the refusal ended the connection, so on
/// smee.io, which does not replay, the frames after it were lost. Now the refused frame is
/// skipped and counted, and the stream goes on after it on the same connection.
#[tokio::test]
async fn regression_invalid_utf8_in_a_frame_loses_nothing_else() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    let mut burst = format!("id: 1\ndata: {}\n\n", webhook(1)).into_bytes();
    burst.extend_from_slice(b"id: 2\ndata: {\"x-note\":\"caf\xE9\",\"body\":{\"n\":2}}\n\n");
    burst.extend_from_slice(format!("id: 3\ndata: {}\n\n", webhook(3)).as_bytes());
    channel.send_raw(burst);
    channel.send_webhook(4, &webhook(4));
    let bodies: Vec<_> = target.take(3).await.into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [r#"{"seq":1}"#, r#"{"seq":3}"#, r#"{"seq":4}"#]);
    assert_eq!(channel.connections(), 1, "no reconnect");
}

/// Issue 16 item 11. Regression: an `id:` holding a control character was kept as
/// Last-Event-ID, and every reconnect failed building its request. It is never the resume
/// point: the reconnect resumes after the last usable id, and the stream keeps working.
#[tokio::test]
async fn regression_an_id_with_a_control_character_does_not_break_reconnects() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    channel.send_webhook(7, &webhook(1));
    channel.send_raw(format!("id: a\x01b\ndata: {}\n\n", webhook(2)));
    channel.send_raw(format!("id: n\0ul\ndata: {}\n\n", webhook(3)));
    assert_eq!(target.take(3).await.len(), 3);
    channel.close_all();
    channel.wait_connections(2).await;
    assert_eq!(channel.last_event_id(1).as_deref(), Some("7"));
    channel.send_webhook(8, &webhook(4));
    assert_eq!(target.next().await.body, r#"{"seq":4}"#);
}

/// Issue 16 item 11, after a restart: a spool whose stored resume point is not a valid header
/// (written by an older version) still connects, without `Last-Event-ID`.
#[tokio::test]
async fn regression_a_stored_cursor_with_a_control_character_still_connects() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let options = support::relay_options(&channel, &target.url("/hook"));
    {
        let spool = smee_relay::spool::Spool::open(&options.state_dir).unwrap();
        let key = smee_relay::spool::lock::channel_key(options.source.channel.expose().as_str());
        spool
            .write(
                &[smee_relay::spool::Write::Append {
                    channel: options.source.channel.to_string(),
                    routes: vec![],
                    events: std::sync::Arc::from([]),
                    cursor: Some((key, "a\x01b".into())),
                }],
                options.limits,
            )
            .unwrap();
    }
    let _relay = support::Relay::start(&channel, options).await;
    assert_eq!(channel.last_event_id(0), None);
    channel.send_webhook(1, &webhook(1));
    assert_eq!(target.next().await.body, r#"{"seq":1}"#);
}

/// Issue 16 item 9. Regression: a sender posting the relay's own headers had them forwarded,
/// passing for the relay (`x-smee-relay-delivery` is what targets deduplicate on).
#[tokio::test]
async fn regression_a_forged_relay_header_never_reaches_the_target() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let _relay = start_relay(&channel, &target, Duration::from_secs(90)).await;

    channel.send_webhook(
        1,
        r#"{"x-smee-relay-delivery":"forged","x-smee-relay-alert":"forged","x-smee-relay-recovered":"forged","body":{}}"#,
    );
    let request = target.next().await;
    for (name, value) in &request.headers {
        assert_ne!(value.as_bytes(), b"forged", "{name} was forwarded as sent");
    }
    let delivery = request.header("x-smee-relay-delivery").unwrap();
    assert_ne!(delivery, "forged");
}

/// Issue 16 item 17: a frame over `--max-frame` is skipped with one log line and counted; the
/// relay holds no more than the limit for it, and the next frame arrives.
#[tokio::test]
async fn a_frame_over_max_frame_is_skipped_with_one_log_line() {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let port = target.addr.port().to_string();
    let (_child, logs) = spawn_forward(&[
        &channel.url("abcdef"),
        "--port",
        &port,
        "--max-frame",
        "64KiB",
    ])
    .await;
    channel.wait_connections(1).await;
    logs.wait_for(&["connected to channel"]).await;

    let pad = "x".repeat(100 << 10);
    channel.send_webhook(1, &format!(r#"{{"body":{{"pad":"{pad}"}}}}"#));
    channel.send_webhook(2, &webhook(2));
    assert_eq!(target.next().await.body, r#"{"seq":2}"#);
    let line = logs.wait_for(&["ERROR", "64 KiB limit"]).await;
    assert!(line.contains("--max-frame"), "{line}");
    assert_eq!(logs.all().matches("64 KiB limit").count(), 1);
    assert_eq!(channel.connections(), 1, "no reconnect");
}
