//! `smee-relay check`: validate a config file, and show what each rule would send for one event.

use std::fmt::Write as _;

use crate::cli::CheckArgs;

/// Validate the file; with `--event`, evaluate that event against every rule.
pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let mut config = super::load_config(&args.config)?;
    // The cluster `run` would join: `--nats-url` / SMEE_RELAY_NATS_URL wins over the file's URL,
    // and alone joins cluster `default` (helper-123: `check` said nothing of it).
    // Without it, a `[cluster]` with no URL is left as it is: the unit may set the variable
    // where `run` starts, not in this shell.
    let from_file = config.cluster.is_some();
    if args.nats_url.is_some() {
        config.cluster = crate::config::cluster_with_flag(args.nats_url.as_ref(), config.cluster)?;
    }
    if let Some(cacert) = &config.cacert {
        crate::http::read_ca_file(cacert, &super::run::config_cacert(&args.config))?;
    }
    let jq = crate::pipeline::jq::JqEngine::new(config.jq);
    probe_conditions(&config, &jq)?;
    let Some(event) = args.event else {
        println!("{}: ok ({})", args.config.display(), summary(&config));
        if !from_file && let Some(cluster) = &config.cluster {
            println!(
                "warning: no [cluster] in the file, but --nats-url / SMEE_RELAY_NATS_URL is \
                 given: `run` joins cluster {:?}, and an instance in another cluster on the \
                 same channels delivers every event a second time",
                cluster.name
            );
        }
        if !config.actions.is_empty() {
            println!(
                "{}",
                super::count(
                    config.actions.len(),
                    "[[action]] handler",
                    "[[action]] handlers"
                )
            );
        }
        for hint in config.rules.iter().filter_map(|r| r.when_hint()) {
            println!("warning: {hint}");
        }
        for action in &config.actions {
            if let crate::actions::Handler::Command(argv) = &action.handler
                && let Some(problem) = crate::actions::command_problem(argv)
            {
                println!("[[action]] {}: warning: {problem}", action.name);
            }
            for unset in action.unset_env() {
                println!(
                    "[[action]] {}: warning: env lists {unset}, which is not set here: the handler gets only what is set where the relay runs",
                    action.name
                );
            }
        }
        let watched = config.rules.iter().any(|r| r.blueprint.is_some());
        let pipelines = config.channels.iter().any(|c| c.pipeline);
        if let Some(interval) = config.reconcile {
            println!(
                "Port reconciliation every {}, at start and after every reconnect",
                humantime::format_duration(interval)
            );
        } else if config.port_api.is_some()
            && pipelines
            && !config.rules.is_empty()
            && !watched
            && !config.reconcile_off
        {
            // Only with rules: an actions-only config has nothing to reconcile (helper-133).
            // Credentials make reconciliation the default: say why it does not run.
            println!(
                "Port reconciliation is not active: no rule names a blueprint (it reads the \
                 blueprints the rules name; add blueprint = \"...\" to a rule)"
            );
        }
        let state_dir = crate::spool::lock::state_dir(config.state_dir.as_deref());
        if let Some(problem) = crate::spool::lock::state_dir_problem(&state_dir) {
            println!("warning: state_dir {problem}");
        }
        for channel in &config.channels {
            if let Some(problem) = crate::source::idle_timeout_problem(channel.idle_timeout) {
                println!("channel {}: warning: {problem}", channel.url);
            }
            if let Some(catch_up) = &channel.github_catch_up {
                println!(
                    "channel {}: GitHub catch-up from hook {} of {} after every gap, looking back {}",
                    channel.url,
                    catch_up.hook.hook,
                    catch_up.hook.owner,
                    humantime::format_duration(catch_up.since)
                );
            }
        }
        return Ok(());
    };
    // A file that cannot be read is the user's to fix, as a config's is: exit 2 (helper-133).
    let body = std::fs::read(&event).map_err(|e| crate::config::ConfigError {
        problems: vec![format!("cannot read {}: {e}", event.display())],
    })?;
    let (said, failed) = check_event(&config, &jq, &body);
    print!("{said}");
    if !config.actions.is_empty() {
        let explained = crate::actions::explain(&config.actions, &body, &jq);
        // Every line ends, the last one too (the shell prompt starts on its own line).
        print!("\n{}", explained.trim_end_matches('\n'));
        println!();
    }
    if failed > 0 {
        anyhow::bail!(
            "{} failed on {} (said above): the relay would log an error for each and keep its \
             alert state as it was",
            crate::error::count(failed, "rule", "rules"),
            event.display()
        );
    }
    Ok(())
}

/// What `check` validated, for its `ok (...)` line: the counts, and the cluster it would join
/// (not contacted: `check` reads the file only; `run` connects, and says what NATS refuses).
fn summary(config: &crate::config::Config) -> String {
    use crate::secret::ExposeSecret as _;
    let mut out = format!(
        "{}, {}",
        super::count(config.channels.len(), "channel", "channels"),
        super::count(config.rules.len(), "rule", "rules")
    );
    if let Some(cluster) = &config.cluster {
        let at = if cluster.url.expose_secret().is_empty() {
            "at the URL --nats-url / SMEE_RELAY_NATS_URL gives".to_string()
        } else {
            format!("at {}", cluster.shown_url())
        };
        let _ = write!(
            out,
            ", cluster {:?} {at}, {} — not contacted; run connects",
            cluster.name,
            super::count(cluster.replicas, "replica", "replicas")
        );
    }
    out
}

/// Run each `when` condition once on an entity with no properties, within its bounds: one that
/// cannot finish even there (an endless loop or recursion, a runaway generator) would fail on
/// every event, so `check` refuses it. A jq error there is fine: real entities have properties.
fn probe_conditions(
    config: &crate::config::Config,
    jq: &crate::pipeline::jq::JqEngine,
) -> Result<(), crate::config::ConfigError> {
    use crate::pipeline::jq::JqFailure;
    use crate::pipeline::rules::Condition;

    let probe = serde_json::json!({"identifier": "probe", "title": "probe", "properties": {}});
    let mut problems = Vec::new();
    for rule in &config.rules {
        let Condition::When(condition) = &rule.condition else {
            continue;
        };
        if let Err(
            e @ (JqFailure::Timeout { .. } | JqFailure::Crashed { .. } | JqFailure::Halted { .. }),
        ) = jq.holds(condition, &probe)
        {
            problems.push(format!(
                "{}: rule {:?}: when: on an entity with no properties, {}",
                rule.origin,
                rule.name,
                crate::error::chain(&e)
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::config::ConfigError { problems })
    }
}

/// `check --event`: the change, its diff, and what each rule would send for it, starting from
/// no alert (no stored state, no signature check: a file has no headers); and how many rules
/// failed on it.
fn check_event(
    config: &crate::config::Config,
    jq: &crate::pipeline::jq::JqEngine,
    body: &[u8],
) -> (String, usize) {
    use crate::pipeline::{Evaluation, Pipeline, diff, port};

    let mut out = String::new();
    let mut failures = 0;
    let change = match port::decode(body) {
        Ok(change) => change,
        Err(e) => {
            // An action run's body is no entity change: said as what it is, not as the
            // decoder's complaint about its shape (helper-126).
            let run = crate::pipeline::port::read_json(body)
                .ok()
                .and_then(|value| crate::actions::decode_run(&value));
            let mut said = match run {
                Some(_) => "not a Port entity change: an action run (see below)\n".to_string(),
                None => format!("not a Port entity change: {e}\n"),
            };
            if config.channels.iter().any(|c| c.pipeline) {
                said.push_str("the alert pipeline would ignore it (it is still forwarded)\n");
            }
            return (crate::text::escape_lines(&said), 0);
        }
    };
    // Port's values with their line breaks escaped too (the whole is escaped line by line
    // below): an identifier must not print a line of its own (helper-127).
    use crate::text::escape_control as e;
    let _ = writeln!(
        out,
        "change: {} {} {}/{} ({:?})",
        e(&change.action.to_string()),
        e(&change.resource_type),
        e(change.blueprint().unwrap_or("-")),
        e(change.entity().unwrap_or("-")),
        change.title().unwrap_or("-")
    );
    for c in diff::properties(&change) {
        let _ = writeln!(
            out,
            "  {}: {} -> {}",
            e(&c.name),
            e(&diff::show(c.before.as_ref())),
            e(&diff::show(c.after.as_ref()))
        );
    }
    // Said once, before the rules (helper-133: a rule "would send FIRING" where the running
    // relay, its alert already firing, sends nothing).
    if !config.rules.is_empty() {
        let _ = writeln!(
            out,
            "\neach rule as it judges this change from no alert (a running relay starts from the state it stored{}):",
            // A file has no headers (helper-135: an unsigned change looked judged).
            if config.verifier.is_some() {
                ", and judges it only if x-port-signature verifies"
            } else {
                ""
            }
        );
    }
    for rule in &config.rules {
        if !rule.watches(&change) {
            let why = if change.resource_type != "entity" {
                format!(
                    "does not judge this change: a {} change, not an entity's",
                    change.resource_type
                )
            } else {
                format!(
                    "does not watch this entity (it watches blueprint {})",
                    rule.blueprint.as_deref().unwrap_or("-")
                )
            };
            let _ = writeln!(out, "\nrule {}: {why}", rule.name);
            continue;
        }
        let one = Pipeline {
            rules: vec![rule.clone()],
            verifier: None,
            app_url: config.app_url.clone(),
            jq: jq.clone(),
            record_verdicts: false,
        };
        let event = crate::event::Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![],
            query: vec![],
            body: bytes::Bytes::copy_from_slice(body),
        };
        let _ = write!(out, "\nrule {}: ", rule.name);
        let now = crate::clock::now_ms();
        match one.evaluate(&event, &|_| Default::default(), now, now) {
            Evaluation::Evaluated {
                alerts,
                skipped,
                states,
                failed,
                ..
            } => {
                // Regression: a condition that failed (an error, or over its time or memory
                // bound) was said not to hold, and `check` exited 0.
                if let Some(failure) = failed.first() {
                    failures += 1;
                    let _ = writeln!(
                        out,
                        "condition failed ({}): {}",
                        failure.kind, failure.reason
                    );
                } else if let Some((_, _, reason)) = skipped.first() {
                    let _ = writeln!(out, "cannot judge: {reason}");
                } else if alerts.is_empty() && states.values().any(|s| s.draft.is_some()) {
                    let _ = writeln!(
                        out,
                        "would hold for {} before firing",
                        humantime::format_duration(rule.hold)
                    );
                } else if alerts.is_empty() {
                    let _ = writeln!(out, "condition does not hold: nothing to send");
                } else {
                    let _ = writeln!(out, "would send");
                    for alert in alerts {
                        out.push_str(&crate::notify::text(&alert));
                    }
                }
            }
            other => {
                let _ = writeln!(out, "{other:?}");
            }
        }
    }
    // What Port's payload holds (titles, identifiers, values) goes to a terminal.
    (crate::text::escape_lines(&out), failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> crate::config::Config {
        crate::config::parse(text, "c.toml", &|_| None).unwrap()
    }

    /// `check` said `ok (1 channels, 0 rules)` for a config with `[cluster]`: a wrong plural,
    /// and not a word about the cluster it checked (or that it did not contact NATS).
    /// Regression (an adversary's finding): `check --event` printed an entity's identifier,
    /// title, property names and values as Port's payload had them, terminal escapes and bidi
    /// overrides included.
    #[test]
    fn regression_check_event_printed_a_payloads_escapes() {
        let rules = config(
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n[[rule]]\nname = \"hot\"\nproperty = \"cpu\\u001b\"\nabove = 80\n",
        );
        let body = serde_json::json!({
            "action": "UPDATE",
            "resourceType": "entity",
            "context": {"blueprint": "B\u{202e}", "entity": "e\u{1b}[2J\nFAKE line"},
            "diff": {
                "before": {"identifier": "e\u{1b}[2J\nFAKE line", "properties": {"cpu\u{1b}": 1}},
                "after": {"identifier": "e\u{1b}[2J\nFAKE line", "title": "T\u{7}", "properties": {"cpu\u{1b}": 90}}
            }
        });
        let jq = crate::pipeline::jq::JqEngine::here();
        let (said, _) = check_event(&rules, &jq, body.to_string().as_bytes());
        assert!(said.contains("would send"), "{said}");
        assert!(
            !said.contains("x-port-signature"),
            "no secret, no check: {said}"
        );
        // Regression (helper-135): with a secret, an unsigned file looked judged as it is.
        let signed = crate::config::parse(
            "[[channel]]\nurl = \"https://smee.io/abc\"\npipeline = true\n[port]\nclient_secret = \"s\"\n[[rule]]\nname = \"hot\"\nproperty = \"cpu\"\nabove = 80\n",
            "c.toml",
            &|_| None,
        )
        .unwrap();
        let (said, _) = check_event(&signed, &jq, body.to_string().as_bytes());
        assert!(
            said.contains("and judges it only if x-port-signature verifies"),
            "{said}"
        );
        assert!(!said.contains(['\u{1b}', '\u{7}', '\u{202e}']), "{said:?}");
        // Regression (helper-127): a line break in an identifier printed a forged line.
        assert!(!said.lines().any(|l| l.starts_with("FAKE line")), "{said}");
        assert!(said.lines().count() > 3, "line breaks stay: {said}");
    }

    /// Regression (a new user's finding): `check --event` on an action run said each rule
    /// "does not watch this entity" (a rule without `blueprint` watches every entity: this is
    /// a run, not an entity change), and on a config with no pipeline that "the pipeline would
    /// ignore" a payload.
    #[test]
    fn regression_check_event_said_the_wrong_reason_a_rule_does_not_judge() {
        let channel = "[[channel]]\nurl = \"https://smee.io/abc\"\n";
        let with_rule = config(&format!(
            "{channel}pipeline = true\n[[rule]]\nname = \"hot\"\nproperty = \"cpuUtil\"\nabove = 80\n"
        ));
        let run = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/port/actions/01-legacy-run-message.json"
        ))
        .unwrap();
        let jq = crate::pipeline::jq::JqEngine::here();
        let (said, _) = check_event(&with_rule, &jq, &run);
        assert!(
            said.contains("rule hot: does not judge this change: a run change, not an entity's"),
            "{said}"
        );
        // Regression (helper-126): a run in the trigger-data shape was "not a Port event
        // (invalid type: map, expected a string)".
        let trigger = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/port/actions/02-trigger-data.json"
        ))
        .unwrap();
        let (said, _) = check_event(&with_rule, &jq, &trigger);
        assert!(
            said.starts_with("not a Port entity change: an action run"),
            "{said}"
        );
        let no_pipeline = config(&format!("{channel}forward = [\"http://127.0.0.1:1/\"]\n"));
        let (said, _) = check_event(&no_pipeline, &jq, br#"{"ref":"main"}"#);
        assert!(said.starts_with("not a Port entity change"), "{said}");
        assert!(!said.contains("pipeline"), "{said}");
    }

    #[test]
    fn regression_check_says_1_channels_and_nothing_of_the_cluster() {
        let one =
            "[[channel]]\nurl = \"https://smee.io/abc\"\nforward = [\"http://127.0.0.1:1/\"]\n";
        assert_eq!(summary(&config(one)), "1 channel, 0 rules");
        let two = format!("{one}{}", one.replace("abc", "def"));
        assert_eq!(summary(&config(&two)), "2 channels, 0 rules");
        let clustered = format!(
            "{one}[cluster]\nnats_url = \"nats://app:hunter2@host:4222\"\nname = \"prod\"\n"
        );
        assert_eq!(
            summary(&config(&clustered)),
            "1 channel, 0 rules, cluster \"prod\" at nats://app:***@host:4222, 1 replica — not \
             contacted; run connects"
        );
        let from_flag = format!("{one}[cluster]\nname = \"prod\"\nreplicas = 3\n");
        assert_eq!(
            summary(&config(&from_flag)),
            "1 channel, 0 rules, cluster \"prod\" at the URL --nats-url / \
             SMEE_RELAY_NATS_URL gives, 3 replicas — not contacted; run connects"
        );
    }
}
