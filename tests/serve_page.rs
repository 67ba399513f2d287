//! The channel page in a real headless Chromium, driven through chromedriver's WebDriver
//! protocol (plain JSON over HTTP on loopback, so no driver crate). Fails, never skips, when the
//! browser is missing: install the Debian packages `chromium` and `chromium-driver`.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use smee_relay::server::{ServeConfig, serve};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

fn which(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: apt-get install chromium chromium-driver")
        })
}

/// A chromedriver on 127.0.0.1 with a port of its choosing, and one headless browser session.
struct Browser {
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start() -> Self {
        let chromium = which("chromium");
        let mut driver = tokio::process::Command::new(which("chromedriver"))
            .arg("--port=0")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let mut lines = tokio::io::BufReader::new(driver.stdout.take().unwrap()).lines();
        let port: u16 = tokio::time::timeout(support::PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(port) = line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|p| p.trim_end_matches('.').parse().ok())
                {
                    return port;
                }
            }
            panic!("chromedriver ended before it listened");
        })
        .await
        .expect("chromedriver listens");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let profile = tempfile::tempdir().unwrap();
        let http = smee_relay::http::client_builder().build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
            }}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_string();
        Self {
            _driver: driver,
            _profile: profile,
            session: format!("{base}/session/{session}"),
            http,
        }
    }

    async fn go(&self, url: &str) {
        let done: Value = self
            .http
            .post(format!("{}/url", self.session))
            .json(&json!({ "url": url }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(done["value"].is_null(), "{done}");
    }

    /// Run `script` in the page and return its value.
    async fn eval(&self, script: &str) -> Value {
        let done: Value = self
            .http
            .post(format!("{}/execute/sync", self.session))
            .json(&json!({ "script": script, "args": [] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        done["value"].clone()
    }

    /// Evaluate `script` until it returns `want`, within `limit`.
    async fn wait_for(&self, script: &str, want: Value, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let got = self.eval(script).await;
            if got == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "`{script}` gave {got}, not {want}, for {limit:?}"
            );
        }
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

#[tokio::test]
async fn a_post_appears_on_the_open_channel_page_within_a_second() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    tokio::spawn(serve(listener, ServeConfig::default(), cancel.clone()));
    let channel = format!("{server}/pageTestChannel123");

    let browser = Browser::start().await;
    browser.go(&channel).await;
    browser
        .wait_for(
            "return document.body.dataset.state",
            json!("live"),
            support::PATIENCE,
        )
        .await;

    let posted = Instant::now();
    let sent = smee_relay::http::client_builder()
        .build()
        .unwrap()
        .post(&channel)
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .body(r#"{"hello":"world","n":[1,2]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    browser
        .wait_for(
            "return document.querySelectorAll('#events .event').length",
            json!(1),
            Duration::from_secs(1),
        )
        .await;
    let shown = posted.elapsed();
    eprintln!("the post was on the page {shown:?} after it was sent");
    assert!(shown <= Duration::from_secs(1), "shown after {shown:?}");

    // Pretty JSON body, the headers, the event's name.
    let body = browser
        .eval("return document.querySelector('.event pre.body').textContent")
        .await;
    assert!(
        body.as_str().unwrap().contains("\"hello\": \"world\""),
        "{body}"
    );
    let headers = browser
        .eval("return document.querySelector('.event table.headers').textContent")
        .await;
    assert!(
        headers.as_str().unwrap().contains("x-github-event"),
        "{headers}"
    );
    let title = browser
        .eval("return document.querySelector('.event summary strong').textContent")
        .await;
    assert_eq!(title, json!("push"));

    // Copy as curl: the command is shown (the clipboard may be unavailable headless).
    browser
        .eval("document.querySelector('.event button.copy-curl').click(); return null")
        .await;
    let curl = browser
        .wait_for(
            "const c = document.querySelector('.event pre.curl'); return !c.hidden && c.textContent.startsWith('curl -X POST')",
            json!(true),
            support::PATIENCE,
        )
        .await;
    let _ = curl;
    let command = browser
        .eval("return document.querySelector('.event pre.curl').textContent")
        .await;
    let command = command.as_str().unwrap();
    assert!(command.contains(&format!("'{channel}'")), "{command}");
    assert!(command.contains("-H 'x-github-event: push'"), "{command}");
    assert!(
        command.contains(r#"--data-binary '{"hello":"world","n":[1,2]}'"#),
        "{command}"
    );

    // Redeliver re-posts it to the channel: it comes back as a second event.
    browser
        .eval("document.querySelector('.event button.redeliver').click(); return null")
        .await;
    browser
        .wait_for(
            "return document.querySelectorAll('#events .event').length",
            json!(2),
            support::PATIENCE,
        )
        .await;
    let bodies = browser
        .eval("return [...document.querySelectorAll('.event pre.body')].map(p => p.textContent)")
        .await;
    assert_eq!(
        bodies[0], bodies[1],
        "the redelivered event has the same body"
    );
    let event = browser
        .eval("return document.querySelector('.event summary strong').textContent")
        .await;
    assert_eq!(event, json!("push"), "and the same headers");
    browser.close().await;
    cancel.cancel();
}
