//! Pipeline throughput: how many Port entity-change events per second the pipeline decodes,
//! diffs and judges against the fixtures' rules (thresholds, transitions and a jq `when`), with
//! alert state carried from one event to the next as the daemon does. No I/O: this is the CPU
//! cost of the rules. Run: `cargo bench --bench pipeline_throughput`.

use std::collections::HashMap;
use std::time::Instant;

use smee_relay::event::Event;
use smee_relay::pipeline::{AlertState, Evaluation, Pipeline};

const ROUNDS: usize = 2_000;

fn main() {
    let config = smee_relay::config::parse(
        &format!(
            "[[channel]]\nurl = \"http://127.0.0.1:1/c\"\npipeline = true\n{}",
            include_str!("../tests/fixtures/port/rules.toml")
        ),
        "rules.toml",
        &|_| None,
    )
    .expect("the fixture rules parse");
    let pipeline = Pipeline {
        rules: config.rules,
        verifier: None,
        app_url: "https://app.getport.io".into(),
        jq: smee_relay::pipeline::jq::JqEngine::with_program(
            env!("CARGO_BIN_EXE_smee-relay").into(),
            config.jq,
        ),
        record_verdicts: false,
    };
    let events: Vec<Event> = smee_relay::commands::demo::SEQUENCE
        .iter()
        .map(|(_, body)| Event {
            headers: vec![("content-type".into(), "application/json".into())],
            body: bytes::Bytes::from_static(body.as_bytes()),
            ..Event::default()
        })
        .collect();

    let mut states: HashMap<String, AlertState> = HashMap::new();
    let (mut evaluated, mut alerts) = (0usize, 0usize);
    let started = Instant::now();
    for round in 0..ROUNDS {
        for event in &events {
            let current = |key: &str| states.get(key).cloned().unwrap_or_default();
            match pipeline.evaluate(event, &current, round as u64 * 1000, round as u64 * 1000) {
                Evaluation::Evaluated {
                    alerts: fired,
                    states: changed,
                    ..
                } => {
                    evaluated += 1;
                    alerts += fired.len();
                    states.extend(changed);
                }
                other => panic!("a fixture event did not evaluate: {other:?}"),
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "pipeline: {evaluated} Port events ({} rules, {alerts} alerts) in {:.2} s = {:.0} events/s",
        pipeline.rules.len(),
        elapsed.as_secs_f64(),
        evaluated as f64 / elapsed.as_secs_f64()
    );
}
