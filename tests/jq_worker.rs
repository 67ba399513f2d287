//! The bounded jq worker: hostile or buggy `when` conditions are stopped at their bounds
//! (time, memory, recursion) in a child process, and the next evaluation works as before.

use std::time::{Duration, Instant};

use serde_json::json;
use smee_relay::pipeline::jq::{JqCondition, JqEngine, JqFailure, JqLimits};

fn engine(timeout: Duration) -> JqEngine {
    JqEngine::with_program(
        env!("CARGO_BIN_EXE_smee-relay").into(),
        JqLimits {
            timeout,
            max_memory: 256 << 20,
        },
    )
}

fn condition(code: &str) -> JqCondition {
    JqCondition::new(code).unwrap()
}

#[test]
fn a_hostile_rule_takes_the_daemon_down_no_longer() {
    let budget = Duration::from_millis(500);
    let jq = engine(budget);
    let good = condition(".properties.cpu > 80");
    let entity = json!({"properties": {"cpu": 90}});
    assert!(jq.holds(&good, &entity).unwrap());

    // Memory bound cases get a budget long enough to reach the bound in a debug build.
    let roomy = engine(Duration::from_secs(20));
    let hostile: [(&str, &str); 5] = [
        // Endless tail recursion: jaq turns it into a loop that never yields.
        ("def f: f; f", "timeout"),
        // An endless loop.
        ("last(repeat(1))", "timeout"),
        // Recursion that is not a tail call: the stack overflows (exit 134 in the daemon before).
        ("def f: 1 + f; f", "bound"),
        // Generators collected into memory: beyond the address-space bound.
        ("[range(1e12)] | length > 0", "bound"),
        (r#"[limit(1e9; repeat("x" * 10000))] | length > 0"#, "bound"),
    ];
    for (code, kind) in hostile {
        let (jq, budget) = if kind == "bound" {
            (&roomy, Duration::from_secs(20))
        } else {
            (&jq, budget)
        };
        let started = Instant::now();
        let failure = jq.holds(&condition(code), &entity).unwrap_err();
        let took = started.elapsed();
        assert_eq!(failure.kind(), kind, "{code}: {failure}");
        if kind == "timeout" {
            assert!(matches!(failure, JqFailure::Timeout { budget: b } if b == budget));
            assert!(took >= budget, "{code}: stopped after {took:?}");
        }
        // Bounded: the budget plus the time to kill the worker.
        assert!(
            took < budget + Duration::from_secs(5),
            "{code}: took {took:?}"
        );
        eprintln!("{code}: {failure} (after {took:?})");
        // The next evaluation gets a fresh worker and works.
        assert!(jq.holds(&good, &entity).unwrap(), "after {code}");
    }
}

#[test]
fn bound_failures_say_what_happened() {
    let jq = engine(Duration::from_millis(300));
    let roomy = engine(Duration::from_secs(20));
    let entity = json!({});
    // The roomy budget: on a loaded machine the recursion can take longer than 300 ms to
    // overflow, and this checks the overflow's message, not the budget.
    let overflow = roomy
        .holds(&condition("def f: 1 + f; f"), &entity)
        .unwrap_err()
        .to_string();
    assert!(
        overflow.contains("memory or recursion bound") && overflow.contains("overflowed its stack"),
        "{overflow}"
    );
    let memory = roomy
        .holds(
            &condition(r#"[limit(1e9; repeat("x" * 10000))] | length > 0"#),
            &entity,
        )
        .unwrap_err()
        .to_string();
    assert!(
        memory.contains("went over its memory budget")
            && memory.contains("jq worker: memory budget exceeded"),
        "{memory}"
    );
    let slow = jq
        .holds(&condition("last(repeat(1))"), &entity)
        .unwrap_err()
        .to_string();
    assert!(slow.contains("longer than its 300ms budget"), "{slow}");
    // Ordinary jq errors are not bounds: the worker stays.
    let error = jq
        .holds(&condition(r#"error("no such thing")"#), &entity)
        .unwrap_err();
    assert_eq!(error.kind(), "error", "{error}");
    assert!(error.to_string().contains("no such thing"), "{error}");
}

#[test]
fn many_evaluations_reuse_one_worker() {
    let jq = engine(Duration::from_secs(2));
    let c = condition(".properties.locked == true");
    let started = Instant::now();
    for n in 0..500 {
        let entity = json!({"properties": {"locked": n % 2 == 0}});
        assert_eq!(jq.holds(&c, &entity).unwrap(), n % 2 == 0);
    }
    eprintln!(
        "500 evaluations through the worker in {:?}",
        started.elapsed()
    );
}

/// Regression (an adversary's finding): the worker inherited the daemon's whole environment,
/// so a rule could read `env.PORT_CLIENT_SECRET` into an alert. It starts with none (this
/// process has `PATH`; the worker must not see it: it has only `RUST_BACKTRACE`, set for it).
#[test]
fn regression_a_rule_cannot_read_the_daemons_environment() {
    let jq = engine(Duration::from_secs(10));
    let entity = json!({});
    assert!(
        jq.holds(&condition(r#"env | keys == ["RUST_BACKTRACE"]"#), &entity)
            .unwrap(),
        "the worker sees an environment"
    );
}

/// Regression (a new user's finding): an error raised in the worker said "jq error: jq error:
/// ..." (the worker's words, then the daemon's again).
#[test]
fn regression_an_error_in_the_worker_said_jq_error_twice() {
    let jq = engine(Duration::from_secs(10));
    let failure = jq
        .holds(&condition(r#"error("boom")"#), &json!({}))
        .unwrap_err();
    assert_eq!(failure.to_string(), r#"jq error: "boom""#);
}

/// Regression (helper-124): the worker died with the thread that started it (Linux's
/// parent-death signal follows the thread, and the daemon's blocking threads end after 10 s
/// idle), so a `when` rule's first evaluation after a quiet spell failed as "exceeded its
/// memory or recursion bound" and its alert was lost.
#[test]
fn regression_the_worker_died_with_the_thread_that_started_it() {
    let jq = std::sync::Arc::new(engine(Duration::from_secs(20)));
    let cpu = condition(".properties.cpu > 80");
    let entity = json!({"properties": {"cpu": 90}});
    let (jq2, cpu2, entity2) = (jq.clone(), cpu.clone(), entity.clone());
    std::thread::spawn(move || assert!(jq2.holds(&cpu2, &entity2).unwrap()))
        .join()
        .unwrap();
    // The starting thread is gone (joined): the next evaluation uses the same worker.
    assert!(jq.holds(&cpu, &entity).unwrap());
}

/// Regression (helper-127): `halt` and `halt_error` end the worker with an exit status, which
/// was said as "exceeded its memory or recursion bound"; and an undefined `$ENV` was `$env`.
#[test]
fn regression_halt_was_said_as_a_memory_bound() {
    let jq = engine(Duration::from_secs(20));
    let entity = json!({"properties": {}});
    for code in ["halt", "\"x\" | halt_error(4)"] {
        let failure = jq.holds(&condition(code), &entity).unwrap_err();
        let said = failure.to_string();
        assert!(
            said.contains("halt") && !said.contains("bound"),
            "{code}: {said}"
        );
    }
    // The next evaluation works (a fresh worker).
    assert!(jq.holds(&condition("true"), &entity).unwrap());
    let e = JqCondition::new("$ENV.HOME").unwrap_err();
    assert!(e.message.contains("$ENV"), "{e}");
}
