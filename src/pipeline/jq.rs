//! jq conditions (`when = '.properties.locked == true'`), evaluated with jaq, the way Port users
//! already write them in Automations, and `[action.report]` mappings (the same, yielding a
//! value: [`JqEngine::output`]).
//!
//! A condition is compiled when the config is loaded, to report syntax errors with their
//! position (and refused if too long or nested too deep for the parser's stack).
//!
//! It is evaluated in a worker process ([`JqEngine`]), never in the daemon: jaq has no fuel or
//! depth limit and a thread cannot be stopped, so a condition that loops, recurses or allocates
//! without end would freeze or crash the daemon. The worker is this same binary started with
//! [`WORKER_ARG`] ([`worker_main`]); it compiles each condition once and answers one JSON line
//! per request. The daemon gives each evaluation a time budget and kills the worker past it; the
//! worker bounds its own memory ([`BoundedAlloc`]) and its stack bounds recursion. A worker that
//! was killed or died is replaced on the next evaluation. This module must not log: the caller
//! decides how a failure is reported (once per rule, counted).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data, unwrap_valr};
use jaq_json::Val;
use serde::{Deserialize, Serialize};

/// A syntax error in a condition, with the byte offset it was found at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at character {})", .offset + 1)]
pub struct JqError {
    pub offset: usize,
    pub message: String,
}

/// How much of a jq error is said: it quotes the value it failed on, which may be a whole
/// entity of megabytes (a log line, a run summary Port refuses past 1 MiB).
const ERROR_SHOWN: usize = 500;

/// A jq condition that is known to compile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JqCondition {
    /// The source, recompiled for each evaluation.
    code: String,
}

type Filter = jaq_core::compile::Filter<jaq_core::Native<data::JustLut<Val>>>;

fn compile(code: &str) -> Result<Filter, JqError> {
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());
    let arena = Arena::default();
    let loader = Loader::new(defs);
    let at = |part: &str| {
        let start = part.as_ptr() as usize;
        let base = code.as_ptr() as usize;
        if start >= base && start <= base + code.len() {
            start - base
        } else {
            0
        }
    };
    let modules = loader
        .load(&arena, File { code, path: () })
        .map_err(|errors| {
            let (_, error) = errors.into_iter().next().expect("an error");
            match error {
                jaq_core::load::Error::Lex(errs) => errs.first().map(|(expect, found)| JqError {
                    offset: at(found),
                    message: format!("expected {}", expect.as_str()),
                }),
                jaq_core::load::Error::Parse(errs) => errs.first().map(|(expect, found)| JqError {
                    offset: at(found),
                    message: format!(
                        "expected {}{}",
                        expect.as_str(),
                        if found.is_empty() {
                            " before the end".to_string()
                        } else {
                            format!(", found {found:?}")
                        }
                    ),
                }),
                jaq_core::load::Error::Io(errs) => errs.first().map(|(path, e)| JqError {
                    offset: at(path),
                    message: e.clone(),
                }),
            }
            .unwrap_or(JqError {
                offset: 0,
                message: "invalid jq".into(),
            })
        })?;
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errors| {
            let undefined = errors.into_iter().flat_map(|(_, errs)| errs).next();
            match undefined {
                Some((name, kind)) => JqError {
                    offset: at(name),
                    // The name as written (`$ENV` was said `$env`).
                    message: format!("undefined {} {name}", format!("{kind:?}").to_lowercase()),
                },
                None => JqError {
                    offset: 0,
                    message: "invalid jq".into(),
                },
            }
        })
}

impl JqCondition {
    /// Check that `code` compiles.
    pub fn new(code: &str) -> Result<Self, JqError> {
        check_shape(code)?;
        compile(code)?;
        Ok(Self {
            code: code.to_string(),
        })
    }

    pub fn code(&self) -> &str {
        &self.code
    }
}

/// The longest condition accepted. A condition is one line an operator wrote; a file's worth is
/// a mistake.
const MAX_CODE_LEN: usize = 16 << 10;

/// The deepest bracket nesting accepted. jaq's parser recurses per level, so a condition nested
/// tens of thousands deep would overflow the stack while the config is read (in `check`, or in
/// the daemon on reload) before any evaluation bound applies.
const MAX_NESTING: usize = 256;

/// Refuse what cannot be compiled safely: too long, or nested too deep.
fn check_shape(code: &str) -> Result<(), JqError> {
    if code.len() > MAX_CODE_LEN {
        return Err(JqError {
            offset: MAX_CODE_LEN,
            message: format!("the condition is longer than {MAX_CODE_LEN} bytes"),
        });
    }
    let mut depth = 0usize;
    for (offset, byte) in code.bytes().enumerate() {
        match byte {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(JqError {
                        offset,
                        message: format!("brackets nested deeper than {MAX_NESTING}"),
                    });
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Why a condition could not be judged for one input.
#[derive(Debug, thiserror::Error)]
pub enum JqFailure {
    /// The condition raised an error for this input (e.g. a type error, `error("...")`).
    /// Said cut to [`ERROR_SHOWN`] characters: jq's error quotes the value it failed on.
    #[error("jq error: {}", crate::text::cut(.0, ERROR_SHOWN))]
    Runtime(String),
    /// The condition produced no value (e.g. `empty`, or `select` filtered everything out).
    #[error("the condition produced no value")]
    NoOutput,
    /// The input could not be handed to jq.
    #[error("the entity could not be read as jq input: {0}")]
    Input(String),
    /// The condition ran past its time budget; its worker was killed and is started afresh.
    #[error("the condition ran longer than its {} budget and was stopped", humantime::format_duration(*.budget))]
    Timeout { budget: Duration },
    /// The worker died while evaluating: the condition recursed too deep or used more memory
    /// than its bound.
    #[error("the condition exceeded its memory or recursion bound: the jq worker {status}{}", if .detail.is_empty() { String::new() } else { format!(" ({})", .detail) })]
    Crashed { status: String, detail: String },
    /// The condition ended the worker itself (`halt`, `halt_error`): jq's way to end a
    /// program, which a condition has no use for.
    #[error(
        "the condition ended the jq worker with exit status {status} (jq's halt or halt_error end a program: a condition must yield a value)"
    )]
    Halted { status: i32 },
    /// The worker could not be started or spoken to.
    #[error("the jq worker is unavailable")]
    Worker(#[source] std::io::Error),
    /// A mapping's value is longer than [`MAX_OUTPUT`] as JSON.
    #[error("the expression's value is {len} bytes as JSON, over the {limit} byte limit")]
    OutputTooLarge { len: usize, limit: usize },
}

impl JqFailure {
    /// A short, fixed word for the kind of failure, used as a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            JqFailure::Runtime(_) => "error",
            JqFailure::NoOutput => "no_output",
            JqFailure::Input(_) => "input",
            JqFailure::Timeout { .. } => "timeout",
            JqFailure::Crashed { .. } => "bound",
            JqFailure::Halted { .. } => "halt",
            JqFailure::Worker(_) => "worker",
            JqFailure::OutputTooLarge { .. } => "output",
        }
    }
}

/// Evaluate `code` over the JSON `input` here, in this thread: unbounded, so only the worker
/// process (and tests) call it.
fn evaluate_here(filter: &Filter, input: &[u8]) -> Result<bool, JqFailure> {
    let input =
        jaq_json::read::parse_single(input).map_err(|e| JqFailure::Input(format!("{e:?}")))?;
    let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
    let mut outputs = filter.id.run((ctx, input)).map(unwrap_valr);
    match outputs.next() {
        Some(Ok(value)) => Ok(jaq_core::ValT::as_bool(&value)),
        Some(Err(e)) => Err(JqFailure::Runtime(e.to_string())),
        None => Err(JqFailure::NoOutput),
    }
}

/// The longest value (as JSON) a report mapping may yield: it becomes a summary, a status or
/// links on one run, and a worker answer is one line the daemon reads whole.
pub const MAX_OUTPUT: usize = 64 << 10;

/// The first value `filter` yields for the JSON `input`, as JSON text, here, in this thread:
/// unbounded in time and memory, so only the worker process (and tests) call it.
fn output_here(filter: &Filter, input: &[u8]) -> Result<String, JqFailure> {
    let input =
        jaq_json::read::parse_single(input).map_err(|e| JqFailure::Input(format!("{e:?}")))?;
    let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
    let mut outputs = filter.id.run((ctx, input)).map(unwrap_valr);
    match outputs.next() {
        Some(Ok(value)) => {
            let text = value.to_string();
            if text.len() > MAX_OUTPUT {
                return Err(JqFailure::OutputTooLarge {
                    len: text.len(),
                    limit: MAX_OUTPUT,
                });
            }
            Ok(text)
        }
        Some(Err(e)) => Err(JqFailure::Runtime(e.to_string())),
        None => Err(JqFailure::NoOutput),
    }
}

/// Bounds on one evaluation of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JqLimits {
    /// Wall-clock time one evaluation may take; past it, the worker is killed.
    pub timeout: Duration,
    /// Bytes the worker process may allocate (see [`BoundedAlloc`]), which bounds what a
    /// generator can collect.
    pub max_memory: u64,
}

impl Default for JqLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(1),
            max_memory: 256 << 20,
        }
    }
}

/// The first argument that makes the binary a jq worker (see [`worker_main`]). Hidden: not a
/// subcommand anyone types.
pub const WORKER_ARG: &str = "__jq-worker";

/// Evaluates conditions within [`JqLimits`], in a child process: a thread cannot be stopped,
/// and jaq has no fuel or depth limit, so a condition that loops, recurses without end or
/// allocates without end would otherwise freeze or crash the daemon. The child is the same
/// binary ([`WORKER_ARG`]), started on first use, reused across evaluations, and killed and
/// started afresh after a timeout or crash. Calls block: run them off the async workers.
#[derive(Clone)]
pub struct JqEngine {
    /// Shared by the clones of a pipeline; the mutex makes evaluations one at a time.
    inner: Arc<Mutex<Engine>>,
}

impl std::fmt::Debug for JqEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JqEngine")
    }
}

enum Engine {
    /// Unbounded, in this thread: unit tests only.
    #[cfg(test)]
    Here,
    Worker {
        /// The binary to run as the worker.
        program: PathBuf,
        limits: JqLimits,
        /// The running worker, if one is up.
        running: Option<Worker>,
    },
}

impl JqEngine {
    /// Workers run this very binary (`/proc/self/exe` on Linux: still the right file after
    /// an upgrade replaced the one on disk).
    pub fn new(limits: JqLimits) -> Self {
        let program = if cfg!(target_os = "linux") {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().unwrap_or_else(|_| PathBuf::from("smee-relay"))
        };
        Self::with_program(program, limits)
    }

    /// Workers run `program` (the smee-relay binary): for tests and benchmarks, whose own
    /// executable is not smee-relay.
    pub fn with_program(program: PathBuf, limits: JqLimits) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Engine::Worker {
                program,
                limits,
                running: None,
            })),
        }
    }

    /// Evaluate in this thread, without bounds: for unit tests of the rules themselves.
    #[cfg(test)]
    pub fn here() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Engine::Here)),
        }
    }

    /// Whether `condition` holds for `input`: its first output is truthy (not `false` or
    /// `null`). No output, a runtime error or a bound exceeded is a [`JqFailure`]. Blocks for at
    /// most about the time budget.
    pub fn holds(
        &self,
        condition: &JqCondition,
        input: &serde_json::Value,
    ) -> Result<bool, JqFailure> {
        match self.ask(condition, input, Mode::Holds)? {
            Answer::Holds(holds) => Ok(holds),
            _ => Err(out_of_step()),
        }
    }

    /// The first value `expression` yields for `input` (a report mapping of `[[action]]`,
    /// which wants a string or a list rather than a truth value), within the same bounds as
    /// [`holds`](Self::holds), and at most [`MAX_OUTPUT`] bytes as JSON. Blocks for at most
    /// about the time budget.
    pub fn output(
        &self,
        expression: &JqCondition,
        input: &serde_json::Value,
    ) -> Result<serde_json::Value, JqFailure> {
        match self.ask(expression, input, Mode::Output)? {
            Answer::Output(text) => serde_json::from_str(&text).map_err(|e| {
                JqFailure::Worker(std::io::Error::other(format!("unreadable value: {e}")))
            }),
            _ => Err(out_of_step()),
        }
    }

    /// One evaluation in `mode`; the answer is a value of that mode, never a failure.
    fn ask(
        &self,
        condition: &JqCondition,
        input: &serde_json::Value,
        mode: Mode,
    ) -> Result<Answer, JqFailure> {
        let bytes = serde_json::to_vec(input).map_err(|e| JqFailure::Input(e.to_string()))?;
        let mut engine = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *engine {
            #[cfg(test)]
            Engine::Here => {
                let filter =
                    compile(&condition.code).map_err(|e| JqFailure::Runtime(e.to_string()))?;
                match mode {
                    Mode::Holds => evaluate_here(&filter, &bytes).map(Answer::Holds),
                    Mode::Output => output_here(&filter, &bytes).map(Answer::Output),
                }
            }
            Engine::Worker {
                program,
                limits,
                running,
            } => {
                let worker = match running {
                    Some(worker) => worker,
                    None => running.insert(Worker::start(program, *limits)?),
                };
                let outcome = worker.ask(&condition.code, &bytes, mode, limits.timeout);
                if let Err(
                    JqFailure::Timeout { .. }
                    | JqFailure::Crashed { .. }
                    | JqFailure::Halted { .. }
                    | JqFailure::Worker(_),
                ) = &outcome
                {
                    // Killed, dead or out of step: the next evaluation gets a fresh one.
                    *running = None;
                }
                outcome
            }
        }
    }
}

/// Start `command` from a thread that lives as long as the process. The worker dies with its
/// parent (`PR_SET_PDEATHSIG`), and Linux takes the parent to be the *thread* that forked it:
/// started from one of tokio's blocking threads, which end after 10 s idle, the worker was
/// killed after every quiet spell (helper-124). Should that thread not start, the worker is
/// started here, and a failed evaluation starts another.
fn spawn_from_a_lasting_thread(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<Option<mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("jq-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .ok()
            .map(|_| tx)
    });
    let Some(spawner) = spawner else {
        return command.spawn();
    };
    let (reply, answer) = mpsc::channel();
    match spawner.send((command, reply)) {
        Ok(()) => answer
            .recv()
            .map_err(|_| std::io::Error::other("the worker spawner stopped"))?,
        Err(mpsc::SendError((mut command, _))) => command.spawn(),
    }
}

/// An answer of the other mode than asked: the worker is out of step.
fn out_of_step() -> JqFailure {
    JqFailure::Worker(std::io::Error::other("the worker answered out of step"))
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Whether the first value is truthy (a `when` condition).
    #[default]
    Holds,
    /// The first value itself (a report mapping).
    Output,
}

/// One running worker process and the threads that read its output.
struct Worker {
    /// The process, to kill past the budget and to learn how it died.
    child: Child,
    /// Requests go here, one JSON line each.
    stdin: ChildStdin,
    /// Answers, one line each, read by a thread so a wait can time out.
    answers: mpsc::Receiver<String>,
    /// Reads what the worker writes to stderr (why it died) and returns its end once the
    /// worker is gone: kept out of the daemon's logs until it matters.
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// How much of a worker's stderr is kept.
const STDERR_KEPT: usize = 1024;

/// A request as the worker reads it (the daemon writes the same shape by hand).
#[derive(Deserialize)]
struct Request<'a> {
    /// The condition's source.
    code: String,
    /// The entity, as JSON.
    #[serde(borrow)]
    input: &'a serde_json::value::RawValue,
    /// What is asked; absent is [`Mode::Holds`].
    #[serde(default)]
    mode: Mode,
}

/// The worker's answer to one request.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Holds(bool),
    /// The first value, as JSON text (at most [`MAX_OUTPUT`] bytes).
    Output(String),
    Runtime(String),
    NoOutput,
    Input(String),
    /// The value was longer than [`MAX_OUTPUT`]: (its length).
    TooLarge(usize),
}

impl Worker {
    fn start(program: &Path, limits: JqLimits) -> Result<Worker, JqFailure> {
        let mut command = Command::new(program);
        command
            .arg(WORKER_ARG)
            .arg(limits.max_memory.to_string())
            // Rules can read the environment (`env`): the daemon's holds secrets (Port's client
            // secret, tokens), so the worker gets none of it.
            .env_clear()
            // Its last words (why it died) go into one log line: no backtrace.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_from_a_lasting_thread(command).map_err(JqFailure::Worker)?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut err_pipe = child.stderr.take().expect("piped");
        let (tx, answers) = mpsc::channel();
        std::thread::Builder::new()
            .name("jq-worker-out".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(JqFailure::Worker)?;
        let stderr = std::thread::Builder::new()
            .name("jq-worker-err".into())
            .spawn(move || {
                let mut kept = Vec::new();
                let mut buf = [0u8; 512];
                while let Ok(n @ 1..) = err_pipe.read(&mut buf) {
                    kept.extend_from_slice(&buf[..n]);
                    let excess = kept.len().saturating_sub(STDERR_KEPT);
                    kept.drain(..excess);
                }
                kept
            })
            .map_err(JqFailure::Worker)?;
        Ok(Worker {
            child,
            stdin,
            answers,
            stderr: Some(stderr),
        })
    }

    fn ask(
        &mut self,
        code: &str,
        input: &[u8],
        mode: Mode,
        budget: Duration,
    ) -> Result<Answer, JqFailure> {
        // `input` is serialised JSON already: one line, as serde_json writes no newlines.
        let mut line = Vec::with_capacity(code.len() + input.len() + 40);
        line.extend_from_slice(b"{\"mode\":");
        serde_json::to_writer(&mut line, &mode).map_err(|e| JqFailure::Input(e.to_string()))?;
        line.extend_from_slice(b",\"code\":");
        serde_json::to_writer(&mut line, code).map_err(|e| JqFailure::Input(e.to_string()))?;
        line.extend_from_slice(b",\"input\":");
        line.extend_from_slice(input);
        line.extend_from_slice(b"}\n");
        if let Err(e) = self
            .stdin
            .write_all(&line)
            .and_then(|()| self.stdin.flush())
        {
            return Err(self.died().unwrap_or(JqFailure::Worker(e)));
        }
        match self.answers.recv_timeout(budget) {
            Ok(answer) => match serde_json::from_str::<Answer>(&answer) {
                Ok(answer @ (Answer::Holds(_) | Answer::Output(_))) => Ok(answer),
                Ok(Answer::TooLarge(len)) => Err(JqFailure::OutputTooLarge {
                    len,
                    limit: MAX_OUTPUT,
                }),
                Ok(Answer::Runtime(e)) => Err(JqFailure::Runtime(e)),
                Ok(Answer::NoOutput) => Err(JqFailure::NoOutput),
                Ok(Answer::Input(e)) => Err(JqFailure::Input(e)),
                Err(e) => Err(JqFailure::Worker(std::io::Error::other(format!(
                    "unreadable answer: {e}"
                )))),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.stop();
                Err(JqFailure::Timeout { budget })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.died().unwrap_or_else(|| {
                JqFailure::Worker(std::io::Error::other("the worker closed its output"))
            })),
        }
    }

    /// The worker has died (or is about to, its output closed): how.
    fn died(&mut self) -> Option<JqFailure> {
        let status = self.child.wait().ok()?;
        // The stderr thread ends at EOF, which comes with the exit.
        let kept = self.stderr.take()?.join().unwrap_or_default();
        let detail = {
            String::from_utf8_lossy(&kept)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("note: run with"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        // Not its budget (`OVER_BUDGET`) nor its own refusal of its arguments (2): the
        // condition's `halt` (0) or `halt_error` (5, or the status it gave).
        if let Some(code) = status.code().filter(|c| *c != OVER_BUDGET && *c != 2) {
            return Some(JqFailure::Halted { status: code });
        }
        Some(JqFailure::Crashed {
            status: describe(status),
            detail,
        })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(OVER_BUDGET), _) => "went over its memory budget".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(6)) => "aborted (SIGABRT)".into(),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(11)) => "crashed (SIGSEGV)".into(),
        (None, Some(signal)) => format!("died of signal {signal}"),
        (None, None) => "ended".into(),
    }
}

/// The worker process: answer one request line at a time on stdin/stdout until stdin closes.
/// `args` are the arguments after [`WORKER_ARG`]: the address-space bound in bytes. Returns the
/// exit code.
pub fn worker_main(args: &[String]) -> i32 {
    let Some(max_memory) = args.first().and_then(|a| a.parse::<u64>().ok()) else {
        eprintln!("usage: smee-relay {WORKER_ARG} MAX_MEMORY_BYTES");
        return 2;
    };
    bound_this_process(max_memory);
    // Compiled filters by source: a handful of rules, compiled once each.
    let mut filters: HashMap<String, Filter> = HashMap::new();
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let Ok(line) = line else { return 1 };
        let answer = match serde_json::from_str::<Request<'_>>(&line) {
            Err(e) => Answer::Input(e.to_string()),
            Ok(request) => {
                if !filters.contains_key(request.code.as_str()) {
                    if filters.len() >= 64 {
                        filters.clear();
                    }
                    match compile(&request.code) {
                        Ok(filter) => {
                            filters.insert(request.code.clone(), filter);
                        }
                        Err(e) => {
                            let answer = Answer::Runtime(e.to_string());
                            if reply(&mut stdout, &answer).is_err() {
                                return 1;
                            }
                            continue;
                        }
                    }
                }
                let filter = &filters[request.code.as_str()];
                let input = request.input.get().as_bytes();
                let outcome = match request.mode {
                    Mode::Holds => evaluate_here(filter, input).map(Answer::Holds),
                    Mode::Output => output_here(filter, input).map(Answer::Output),
                };
                match outcome {
                    Ok(answer) => answer,
                    Err(JqFailure::NoOutput) => Answer::NoOutput,
                    Err(JqFailure::Input(e)) => Answer::Input(e),
                    Err(JqFailure::OutputTooLarge { len, .. }) => Answer::TooLarge(len),
                    // The message alone: the daemon says "jq error: " itself.
                    Err(JqFailure::Runtime(e)) => Answer::Runtime(e),
                    Err(other) => Answer::Runtime(other.to_string()),
                }
            }
        };
        if reply(&mut stdout, &answer).is_err() {
            return 1;
        }
    }
    0
}

fn reply(out: &mut impl Write, answer: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Bound the worker itself. Memory: the [`BoundedAlloc`] budget, which works everywhere (the
/// shipped systemd unit forbids `setrlimit`), plus an `RLIMIT_AS` backstop at twice that where
/// allowed. No core dumps: an overflowing stack aborts, and that is expected, not a bug to keep.
/// On Linux, die with the parent: a looping worker must not outlive a killed daemon.
fn bound_this_process(max_memory: u64) {
    BUDGET.store(
        usize::try_from(max_memory).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
    let backstop = max_memory.saturating_mul(2).saturating_add(64 << 20);
    // SAFETY: setrlimit and prctl take plain values and only affect this process; a refusal
    // (EPERM under a seccomp filter) leaves the allocator budget as the bound.
    unsafe {
        let memory = libc::rlimit {
            rlim_cur: backstop as libc::rlim_t,
            rlim_max: backstop as libc::rlim_t,
        };
        libc::setrlimit(libc::RLIMIT_AS, &memory);
        #[cfg(target_os = "linux")]
        {
            libc::prctl(libc::PR_SET_DUMPABLE, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before the prctl: then stdin is closed too, and the
            // loop ends at once.
        }
    }
}

/// The worker's memory budget in bytes; 0 (the daemon, and every other command) is no budget.
static BUDGET: AtomicUsize = AtomicUsize::new(0);
/// Bytes the worker holds from the allocator, counted only while a budget is set.
static HELD: AtomicIsize = AtomicIsize::new(0);

/// The process's allocator: the system one, with a byte budget that only the jq worker sets
/// (the daemon pays one relaxed load per allocation). Past the budget the worker exits at once
/// with [`OVER_BUDGET`], before the allocation: a runaway generator ends there, in the worker.
pub struct BoundedAlloc;

/// The worker's exit status when it went over its memory budget.
const OVER_BUDGET: i32 = 3;

impl BoundedAlloc {
    #[inline]
    fn admit(grow: usize) {
        let budget = BUDGET.load(Ordering::Relaxed);
        if budget == 0 {
            return;
        }
        let held = HELD.fetch_add(grow as isize, Ordering::Relaxed) + grow as isize;
        if held > budget as isize {
            over_budget();
        }
    }

    #[inline]
    fn release(shrink: usize) {
        if BUDGET.load(Ordering::Relaxed) != 0 {
            HELD.fetch_sub(shrink as isize, Ordering::Relaxed);
        }
    }
}

#[cold]
fn over_budget() -> ! {
    const MESSAGE: &[u8] = b"jq worker: memory budget exceeded\n";
    // SAFETY: write and _exit are async-signal-safe and allocate nothing (we are inside the
    // allocator).
    unsafe {
        libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
        libc::_exit(OVER_BUDGET)
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; the budget only counts.
unsafe impl std::alloc::GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::admit(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::admit(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        Self::release(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            Self::admit(new_size - layout.size());
        }
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if new_size < layout.size() && !moved.is_null() {
            Self::release(layout.size() - new_size);
        }
        moved
    }
}

#[cfg(test)]
mod tests {

    /// Regression (helper-127): a jq error quotes the value it failed on, whole: a 2 MB
    /// entity made a 2 MB log line and an Automation run summary Port refused (413).
    #[test]
    fn regression_a_jq_error_quoted_the_whole_entity() {
        let huge = format!(
            "cannot use {{\"identifier\":\"{}\"}} as a number",
            "x".repeat(2 << 20)
        );
        let said = JqFailure::Runtime(huge).to_string();
        assert!(said.chars().count() <= 520, "{}", said.len());
        assert!(said.starts_with("jq error: cannot use {") && said.ends_with('…'));
    }
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_evaluate_like_jq() {
        let jq = JqEngine::here();
        let locked = JqCondition::new(".properties.locked == true").unwrap();
        let holds = |c: &JqCondition, v| jq.holds(c, &v).unwrap();
        assert!(holds(&locked, json!({"properties": {"locked": true}})));
        assert!(!holds(&locked, json!({"properties": {"locked": false}})));
        assert!(!holds(&locked, json!(null)));
        let any = JqCondition::new(r#".properties.tags | any(. == "prod")"#).unwrap();
        assert!(holds(
            &any,
            json!({"properties": {"tags": ["dev", "prod"]}})
        ));
        let cpu = JqCondition::new(".properties.cpuUtil > 80 and .title != null").unwrap();
        assert!(holds(
            &cpu,
            json!({"title": "x", "properties": {"cpuUtil": 81}})
        ));
        let empty = JqCondition::new("empty").unwrap();
        assert!(matches!(
            jq.holds(&empty, &json!(1)),
            Err(JqFailure::NoOutput)
        ));
        let error = JqCondition::new(r#"error("boom")"#).unwrap();
        let failure = jq.holds(&error, &json!(1)).unwrap_err();
        assert!(
            matches!(&failure, JqFailure::Runtime(e) if e.contains("boom")),
            "{failure}"
        );
        // Regression (a new user's finding): said "jq error: jq error: ..." (jaq's words, then
        // ours).
        assert_eq!(failure.to_string(), r#"jq error: "boom""#);
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = JqCondition::new(".properties.locked ==").unwrap_err();
        assert!(e.message.contains("expected"), "{e}");
        let e = JqCondition::new(".a | nosuchfn(1)").unwrap_err();
        assert_eq!(e.offset, 5, "{e}");
        assert!(e.message.contains("nosuchfn"), "{e}");
        assert!(JqCondition::new("if . then 1").is_err());
    }

    #[test]
    fn a_condition_nested_too_deep_is_refused_before_the_parser_recurses() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = JqCondition::new(&deep).unwrap_err();
        assert!(e.message.contains("longer than"), "{e}");
        let deep = format!("{}1{}", "(".repeat(5_000), ")".repeat(5_000));
        let e = JqCondition::new(&deep).unwrap_err();
        assert!(e.message.contains("nested deeper than 256"), "{e}");
        assert_eq!(e.offset, 256);
        let fine = format!("{}1{} == 1", "(".repeat(100), ")".repeat(100));
        assert!(JqCondition::new(&fine).is_ok());
    }
}
