//! A drop-in for smee-client: its own usage examples (`smee --help` of smee-client 5), typed as
//! they are, against the binary invoked as `smee` (a symlink, as the package installs it) and as
//! `smee-relay` with no subcommand. Real binary, fake channel and target on loopback.

mod support;

use std::path::PathBuf;
use std::process::Stdio;

use support::{FakeChannel, FakeTarget, LogWatch, PATIENCE, fresh_state_dir};

/// A directory holding `smee`, a symlink to the built binary.
fn smee_link() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("smee");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_smee-relay"), &link).unwrap();
    (dir, link)
}

/// Both spellings of the same program: `smee` and `smee-relay`.
fn programs() -> (tempfile::TempDir, Vec<PathBuf>) {
    let (dir, smee) = smee_link();
    (
        dir,
        vec![smee, PathBuf::from(env!("CARGO_BIN_EXE_smee-relay"))],
    )
}

fn command(program: &PathBuf) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .env("SMEE_RELAY_STATE_DIR", fresh_state_dir())
        .env_remove("STATE_DIRECTORY")
        .env_remove("PORT")
        .env_remove("RUST_LOG")
        .env_remove("SMEE_RELAY_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn webhook(query: &str) -> String {
    format!(
        r#"{{"content-type":"application/json","x-github-event":"push","body":{{"ok":true}},"query":{query},"timestamp":1700000000000}}"#
    )
}

/// Run `program args`, send one webhook once it is connected, return what the target got.
async fn relay_one(
    program: &PathBuf,
    args: &[&str],
    envs: &[(&str, &str)],
    query: &str,
) -> (support::Received, tokio::process::Child) {
    let channel = FakeChannel::start().await;
    let mut target = FakeTarget::start().await;
    let port = target.addr.port().to_string();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("{channel}", &channel.url("AbCdSecret"))
                .replace("{target}", &target.url(""))
                .replace("{port}", &port)
        })
        .collect();
    let mut child = command(program)
        .args(&args)
        .envs(envs.iter().map(|(k, v)| (k, v.replace("{port}", &port))))
        .spawn()
        .unwrap();
    let _logs = LogWatch::new(child.stderr.take().unwrap());
    channel.wait_connections(1).await;
    channel.send_webhook(1, &webhook(query));
    (target.next().await, child)
}

#[tokio::test]
async fn smee_u_t_forwards_to_the_target() {
    let (_dir, programs) = programs();
    for program in &programs {
        let (got, mut child) = relay_one(
            program,
            &["-u", "{channel}", "-t", "{target}/events"],
            &[],
            "{}",
        )
        .await;
        assert_eq!(got.uri, "/events", "{program:?}");
        assert_eq!(&got.body[..], br#"{"ok":true}"#);
        assert_eq!(got.header("x-github-event"), Some("push"));
        // smee-client prints where it forwards with `-u` too (helper-144: nothing did here);
        // the channel shortened as in the logs, since the user gave it.
        let line = first_line(&mut child).await;
        assert!(
            line.starts_with("Forwarding http://127.0.0.1:")
                && line.contains("/AbCd…")
                && !line.contains("AbCdSecret")
                && line.contains(" to http://127.0.0.1:")
                && line.ends_with("/events"),
            "{program:?}: {line}"
        );
    }
}

/// The first line `child` printed on stdout.
async fn first_line(child: &mut tokio::process::Child) -> String {
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("a line on stdout")
    .unwrap();
    line.trim_end().to_string()
}

#[tokio::test]
async fn smee_long_flags_port_and_path_forward_to_localhost() {
    let (_dir, programs) = programs();
    for program in &programs {
        let (got, _child) = relay_one(
            program,
            &["--url", "{channel}", "--port", "{port}", "--path", "/hook"],
            &[],
            "{}",
        )
        .await;
        assert_eq!(got.uri, "/hook", "{program:?}");
    }
}

#[tokio::test]
async fn port_from_the_environment_is_the_default_port() {
    let (_dir, programs) = programs();
    for program in &programs {
        let (got, _child) = relay_one(
            program,
            &["-u", "{channel}", "-P", "/p"],
            &[("PORT", "{port}")],
            "{}",
        )
        .await;
        assert_eq!(got.uri, "/p", "{program:?}");
    }
}

#[tokio::test]
async fn port_in_the_environment_never_conflicts_with_a_target() {
    let (_dir, programs) = programs();
    // PORT points nowhere useful: the explicit target must win, with no clap conflict.
    let env = [("PORT", "1")];
    let (got, _child) = relay_one(
        &programs[0],
        &["-u", "{channel}", "-t", "{target}/t"],
        &env,
        "{}",
    )
    .await;
    assert_eq!(got.uri, "/t");
    let relay = &programs[1];
    let (got, _child) = relay_one(relay, &["forward", "{channel}", "{target}/f"], &env, "{}").await;
    assert_eq!(got.uri, "/f");
    let (got, _child) = relay_one(
        relay,
        &["forward", "--url", "{channel}", "-t", "{target}/g"],
        &env,
        "{}",
    )
    .await;
    assert_eq!(got.uri, "/g");
}

#[tokio::test]
async fn query_forwarding_is_on_and_q_keeps_it_on() {
    let (_dir, programs) = programs();
    // (For smee-relay, -q is --quiet: the query is forwarded all the same.)
    for program in &programs {
        for args in [
            &["-u", "{channel}", "-t", "{target}/q"][..],
            &["-u", "{channel}", "-t", "{target}/q", "-q"][..],
            &["-u", "{channel}", "-t", "{target}/q", "--query-forwarding"][..],
        ] {
            let (got, _child) = relay_one(program, args, &[], r#"{"a":"1"}"#).await;
            assert_eq!(got.uri, "/q?a=1", "{args:?}");
        }
    }
}

#[tokio::test]
async fn smee_with_no_url_creates_a_channel_and_prints_it() {
    let (_dir, programs) = programs();
    for program in &programs[..1] {
        let channel = FakeChannel::start().await;
        let mut target = FakeTarget::start().await;
        let port = target.addr.port().to_string();
        let mut child = command(program)
            .env("PORT", &port)
            .env("SMEE_RELAY_SERVER", channel.url(""))
            .spawn()
            .unwrap();
        let _logs = LogWatch::new(child.stderr.take().unwrap());
        assert_eq!(
            first_line(&mut child).await,
            format!(
                "Forwarding {} to http://127.0.0.1:{port}/",
                channel.url("FreshChannel42")
            )
        );
        channel.wait_connections(1).await;
        channel.send_webhook(1, &webhook("{}"));
        assert_eq!(target.next().await.uri, "/");
    }
}

#[tokio::test]
async fn smee_v_prints_the_version_and_help_lists_smee_clients_options() {
    let (_dir, smee) = smee_link();
    let output = command(&smee).arg("-v").output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
    let output = command(&smee).arg("--help").output().await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "-v, --version",
        "-u, --url <url>",
        "-t, --target <target>",
        "-p, --port <n>",
        "-P, --path <path>",
        "-q, --query-forwarding",
        "-h, --help",
    ] {
        assert!(help.contains(option), "{option} missing from:\n{help}");
    }
}

#[tokio::test]
async fn usage_errors_exit_2_with_clap_s_whole_message() {
    let (_dir, programs) = programs();
    for (program, args, needle) in [
        (
            &programs[0],
            &["--bogus"][..],
            "unexpected argument '--bogus'",
        ),
        (&programs[0], &["-u", "not a url"][..], "--url <url>"),
        (
            &programs[1],
            &["-u", "https://smee.io/x", "-p", "0"][..],
            "--port",
        ),
    ] {
        let output = command(program).args(args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        // clap's whole message: the problem and where to read more, not only its first line.
        assert!(stderr.contains("--help"), "{args:?}: {stderr}");
    }
}
