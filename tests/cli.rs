//! The command line as a newcomer meets it: hints in errors, and nothing done that was not asked
//! for. Real binary; fake channel and targets on loopback.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{FakeChannel, FakeTarget, LogWatch, PATIENCE, smee_relay};

#[tokio::test]
async fn regression_a_channel_answering_401_says_a_token_is_needed() {
    let channel = FakeChannel::start().await;
    channel.refuse_with(401, "text/plain");
    let target = FakeTarget::start().await;
    let mut child = smee_relay()
        .args(["forward", &channel.url("Private1"), &target.url("/")])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let logs = LogWatch::new(child.stderr.take().unwrap());
    let line = logs
        .wait_for(&["401", "the channel requires a token: --token or token_env"])
        .await;
    assert!(!line.contains("Private1"), "channel id leaked: {line}");
}

#[tokio::test]
async fn regression_demo_ignores_slack_webhook_url_in_the_environment() {
    let mut slack = FakeTarget::start().await;
    let output = tokio::time::timeout(
        PATIENCE * 3,
        smee_relay()
            .arg("demo")
            .env("SLACK_WEBHOOK_URL", slack.url("/services/T/B/X"))
            .output(),
    )
    .await
    .expect("the demo finished in time")
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("FIRING cpu-high"));
    slack.assert_quiet(Duration::from_millis(200)).await;
}
