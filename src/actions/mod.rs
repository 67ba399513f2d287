//! Port self-service action runs: recognise a run in a webhook body, pick the `[[action]]`
//! that handles it, execute its handler once, and turn what the handler says into report
//! messages for Port (logs, entities, one terminal status).
//!
//! ```text
//! spool --route "actions"--> runner (verify, decode run, match, state) --> command | forward
//!                                  \--> spool --route "port-reports"--> notify::port (Port API)
//! ```
//!
//! This module owns the run's state machine (stored in the spool, so a run executes once even
//! when delivered twice or across a restart) and the report messages' format. It never talks to
//! Port itself: reports are spooled like alerts and delivered by `notify::port`, and it never
//! holds Port credentials, so a handler cannot be given them.

pub mod runner;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::pipeline::jq::JqCondition;
use crate::text::escape_control;

/// The route action runs are read from (queued for `pipeline = true` channels when there is an
/// `[[action]]`).
pub const ACTIONS_ROUTE: &str = "actions";

/// The route report messages for Port are queued on; `notify::port` delivers them.
pub const REPORT_ROUTE: &str = "port-reports";

/// The prefix of run states in the spool's state table (apart from alert states).
pub const STATE_PREFIX: &str = "action-run\u{1f}";

/// The line prefix a handler prints to tell Port more than a log line (see the README).
pub const DIRECTIVE: &str = "::port::";

/// What a restart does to a run whose handler was executing when the relay died.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInterrupt {
    /// Report FAILURE "interrupted by restart" and do not run it again (the safe default: the
    /// handler may have done half its work).
    #[default]
    Fail,
    /// Run the handler again from the start (for idempotent handlers).
    Rerun,
}

/// One `[[action]]` as written in the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Matches the body's `action` (a string) or `action.identifier`.
    pub identifier: Option<String>,
    /// Or: a jq condition over the whole body, for custom bodies.
    pub when: Option<String>,
    /// A program and its arguments, run with the body on stdin. Never built from the payload.
    pub command: Option<Vec<String>>,
    /// Or: a local HTTP handler the body is POSTed to.
    pub forward: Option<String>,
    /// Bounds a command's run, and each answer of a forward handler.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::clock::deserialize_duration"
    )]
    pub timeout: Duration,
    /// What a restart does to a run that was executing.
    #[serde(default)]
    pub on_interrupt: OnInterrupt,
    /// Names of the relay's own environment variables a command may see too (beyond `PATH`,
    /// `HOME`, `LANG`, ...): passed through when set, never given values here.
    #[serde(default)]
    pub env: Vec<String>,
    /// jq over a forward handler's answer (`{status, body}`): what to report.
    pub report: Option<ReportMappingConfig>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(600)
}

/// `[action.report]`: jq expressions over `{"status": <http status>, "body": <answer>}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportMappingConfig {
    /// Yields "SUCCESS" or "FAILURE"; default: by the HTTP status.
    pub status: Option<String>,
    /// Yields the run's summary.
    pub summary: Option<String>,
    /// Yields a link (string) or links (array of strings).
    pub link: Option<String>,
}

/// The jq mappings, compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportMapping {
    pub status: Option<JqCondition>,
    pub summary: Option<JqCondition>,
    pub link: Option<JqCondition>,
}

/// What runs an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handler {
    /// argv; the body on stdin.
    Command(Vec<String>),
    /// POST the body here.
    Forward {
        url: reqwest::Url,
        report: ReportMapping,
    },
}

/// How an action is recognised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Matcher {
    Identifier(String),
    When(JqCondition),
}

/// A validated `[[action]]`. Compared to tell a reload's changed actions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActionSpec {
    /// Names the action in logs and in stored run state: its identifier, or its `when`.
    pub name: String,
    pub matcher: Matcher,
    pub handler: Handler,
    pub timeout: Duration,
    pub on_interrupt: OnInterrupt,
    /// Extra variables passed through to a command.
    pub env: Vec<String>,
}

impl ActionSpec {
    /// The variables `env` lists that this process's environment does not have: a handler
    /// started by it would not get them.
    pub fn unset_env(&self) -> impl Iterator<Item = &str> {
        (self.env.iter())
            .filter(|var| std::env::var_os(var).is_none())
            .map(String::as_str)
    }
}

/// Why a command handler's program cannot run here, if it cannot: a path that is missing or
/// not executable, or a bare name not found in `PATH` (as it is here: the daemon's may differ).
pub fn command_problem(argv: &[String]) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let program = argv.first()?;
    let runnable = |path: &std::path::Path| {
        std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return match runnable(std::path::Path::new(program)) {
            Ok(true) => None,
            Ok(false) if std::path::Path::new(program).is_dir() => {
                Some(format!("{program}: a directory, not a program"))
            }
            Ok(false) => Some(format!("{program}: not executable")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("{program}: no such file"))
            }
            Err(e) => Some(format!("{program}: {e}")),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found =
        std::env::split_paths(&path).any(|dir| runnable(&dir.join(program)).unwrap_or(false));
    (!found).then(|| format!("{program}: not found in PATH"))
}

/// Environment variables a command inherits from the relay when set: what programs need to
/// run at all, nothing that could carry a credential.
pub const ENV_ALLOW: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

impl ActionConfig {
    /// Validate into an [`ActionSpec`]; `signed`: whether `[port]` has a client secret;
    /// `secret_vars`: the variables the config names for a credential, each with the key that
    /// names it (never passed to a handler).
    pub fn compile(
        &self,
        signed: bool,
        secret_vars: &[(&str, &str)],
    ) -> Result<ActionSpec, crate::error::Invalid> {
        let matcher = match (&self.identifier, &self.when) {
            (Some(id), None) if !id.is_empty() => Matcher::Identifier(id.clone()),
            (None, Some(when)) => {
                Matcher::When(JqCondition::new(when).map_err(|e| format!("when: {e}"))?)
            }
            (Some(_), Some(_)) => return Err("give identifier or when, not both".into()),
            _ => return Err("an action needs identifier or when".into()),
        };
        let name = match &matcher {
            Matcher::Identifier(id) => id.clone(),
            Matcher::When(c) => format!("when {}", c.code()),
        };
        let handler = match (&self.command, &self.forward) {
            (Some(argv), None) => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err("command must name a program".into());
                }
                if !signed {
                    return Err("a command handler runs only signed runs: set [port] client_secret or client_secret_env".into());
                }
                if self.report.is_some() {
                    return Err(
                        "report mappings go with forward; a command prints ::port:: lines".into(),
                    );
                }
                Handler::Command(argv.clone())
            }
            (None, Some(url)) => {
                let url = crate::url::parse_http_url(url).map_err(|e| format!("forward: {e}"))?;
                let compile = |code: &Option<String>, what: &str| {
                    code.as_deref()
                        .map(JqCondition::new)
                        .transpose()
                        .map_err(|e| format!("report.{what}: {e}"))
                };
                let report = match &self.report {
                    Some(r) => ReportMapping {
                        status: compile(&r.status, "status")?,
                        summary: compile(&r.summary, "summary")?,
                        link: compile(&r.link, "link")?,
                    },
                    None => ReportMapping::default(),
                };
                Handler::Forward { url, report }
            }
            (Some(_), Some(_)) => return Err("give command or forward, not both".into()),
            (None, None) => return Err("an action needs command or forward".into()),
        };
        let mut problems = Vec::new();
        for (i, var) in self.env.iter().enumerate() {
            let name_like = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !name_like {
                // The hint only for `NAME=value`, where the name is one (helper-131).
                let hint = match var.split_once('=') {
                    Some((name, _))
                        if !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                    {
                        format!(
                            "; to give it {name}, set {name} where the relay runs (the unit's EnvironmentFile) and list {name:?}"
                        )
                    }
                    _ => String::new(),
                };
                problems.push(format!(
                    "env: {var:?} is not a variable name (letters, digits and _): env lists variables of the relay's own environment that the handler may see{hint}"
                ));
            } else if let Some((_, key)) = secret_vars.iter().find(|(name, _)| name == var) {
                problems.push(format!(
                    "env: {var} holds a credential ({key} names it); a handler never gets those"
                ));
            } else if var.starts_with("PORT_") {
                problems.push(format!(
                    "env: {var}: PORT_* names are the run's own variables, which the relay sets"
                ));
            } else if self.env[..i].iter().filter(|v| *v == var).count() == 1 {
                // Said at its second listing, once.
                problems.push(format!("env: {var} is listed twice"));
            }
        }
        if self.timeout.is_zero() {
            problems.push("timeout must be more than 0s".into());
        }
        // Each problem said, not the first only (helper-133, helper-135).
        if !problems.is_empty() {
            return Err(problems.join("; ").into());
        }
        Ok(ActionSpec {
            name,
            matcher,
            handler,
            timeout: self.timeout,
            on_interrupt: self.on_interrupt,
            env: self.env.clone(),
        })
    }
}

/// What a body says about its run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    /// The action's identifier, when the body names it.
    pub action: Option<String>,
    /// The entity the run is on; none for a CREATE action.
    pub entity: Option<String>,
    pub blueprint: Option<String>,
}

fn text(value: &Value, path: &[&str]) -> Option<String> {
    let mut at = value;
    for key in path {
        at = at.get(key)?;
    }
    at.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Where a body carries its run id, first found first.
const RUN_ID_AT: [[&str; 2]; 3] = [
    ["context", "runId"],
    ["run", "id"],
    ["port_context", "runId"],
];

/// The longest run id taken. Port's are some 30 characters; one of kilobytes is not Port's,
/// and past about 64 KiB it cannot even go in a report's URL (helper-143).
pub const MAX_RUN_ID: usize = 256;

/// Find the run in a body: its id at `context.runId`, `run.id` or `port_context.runId`.
/// `None`: not an action run ([`why_not_a_run`] says whether it looks meant as one).
pub fn decode_run(body: &Value) -> Option<RunInfo> {
    // The first id that can be used (helper-145: a bad one first hid a good one after it).
    let run_id = RUN_ID_AT
        .iter()
        .filter_map(|path| text(body, path))
        .find(|id| usable_run_id(id))?;
    let action = text(body, &["action"]).or_else(|| text(body, &["action", "identifier"]));
    let entity = text(body, &["context", "entity"])
        .or_else(|| text(body, &["entity", "identifier"]))
        .or_else(|| text(body, &["port_context", "entity"]))
        .or_else(|| text(body, &["payload", "entity", "identifier"]));
    let blueprint = text(body, &["context", "blueprint"])
        .or_else(|| text(body, &["entity", "blueprint"]))
        .or_else(|| text(body, &["action", "blueprint"]))
        .or_else(|| text(body, &["port_context", "blueprint"]));
    Some(RunInfo {
        run_id,
        action,
        entity,
        blueprint,
    })
}

/// Whether `id` can name a run: some text, within [`MAX_RUN_ID`], with no control character
/// (helper-147: a run id with a line break went into a report's URL as `%0A`).
fn usable_run_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= MAX_RUN_ID && !id.chars().any(char::is_control)
}

/// Why `body`, which [`decode_run`] finds no run in, looks meant as one of `actions`' runs: in
/// a body Port `signed`, a run id it cannot take (blank, not text, too long, with a control
/// character), or an action's identifier named without a run id. Another sender's body (a
/// `{"run": {"id": 42}}`) is none of the actions' business (helper-145, helper-147). None: no
/// sign of a run (most events are not).
pub fn why_not_a_run(body: &Value, actions: &[ActionSpec], signed: bool) -> Option<String> {
    if !signed {
        return None;
    }
    let found = RUN_ID_AT.iter().find_map(|path| {
        let at = body.get(path[0])?.get(path[1])?;
        Some((path.join("."), at))
    });
    match found {
        Some((path, Value::String(id))) if id.trim().is_empty() => {
            Some(format!("its run id ({path}) is blank"))
        }
        Some((path, Value::String(id))) if id.len() > MAX_RUN_ID => Some(format!(
            "its run id ({path}) is {} bytes long, over the {MAX_RUN_ID} taken",
            id.len()
        )),
        Some((path, Value::String(_))) => {
            Some(format!("its run id ({path}) holds a control character"))
        }
        Some((path, _)) => Some(format!("its run id ({path}) is not text")),
        None => {
            let named =
                text(body, &["action"]).or_else(|| text(body, &["action", "identifier"]))?;
            let action = actions.iter().find(
                |action| matches!(&action.matcher, Matcher::Identifier(id) if *id == named),
            )?;
            Some(format!(
                "it names [[action]] {} without a run id (at context.runId, run.id or \
                 port_context.runId)",
                action.name
            ))
        }
    }
}

/// The first action that handles this run, or none. A `when` that fails to evaluate (a jq
/// error, or past a `[jq]` bound) ends the search with that failure: the run may have been
/// meant for that action, so no later one may take it.
pub fn find_action<'a>(
    actions: &'a [ActionSpec],
    run: &RunInfo,
    body: &Value,
    jq: &crate::pipeline::jq::JqEngine,
) -> Result<Option<&'a ActionSpec>, String> {
    for action in actions {
        let hit = match &action.matcher {
            Matcher::Identifier(id) => run.action.as_deref() == Some(id.as_str()),
            Matcher::When(condition) => jq
                .holds(condition, body)
                .map_err(|e| format!("[[action]] {}: the condition failed: {e}", action.name))?,
        };
        if hit {
            return Ok(Some(action));
        }
    }
    Ok(None)
}

/// SUCCESS or FAILURE: how a run ends in Port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Terminal {
    Success,
    Failure,
}

impl std::fmt::Display for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Terminal::Success => "SUCCESS",
            Terminal::Failure => "FAILURE",
        })
    }
}

/// The end of a run, as `PATCH /v1/actions/runs/{id}` carries it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finish {
    pub status: Option<Terminal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_run_id: Option<String>,
}

/// One message for Port about one run, as it travels through the spool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Report {
    /// `POST /v1/actions/runs/{run}/logs`.
    Log { run: String, message: String },
    /// `POST /v1/blueprints/{blueprint}/entities?upsert=true&run_id={run}`.
    Entity {
        run: String,
        blueprint: String,
        entity: Value,
    },
    /// `PATCH /v1/actions/runs/{run}`: the terminal status, sent once.
    Finish { run: String, finish: Finish },
}

impl Report {
    pub fn run(&self) -> &str {
        match self {
            Report::Log { run, .. } | Report::Entity { run, .. } | Report::Finish { run, .. } => {
                run
            }
        }
    }

    /// `log`, `entity` or `finish`.
    pub fn kind(&self) -> &'static str {
        match self {
            Report::Log { .. } => "log",
            Report::Entity { .. } => "entity",
            Report::Finish { .. } => "finish",
        }
    }

    /// The message as a spooled event.
    pub fn to_event(&self) -> Event {
        Event {
            sse_id: None,
            timestamp_ms: None,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                (
                    "x-smee-relay-report".into(),
                    format!("{} {}", self.kind(), self.run()),
                ),
            ],
            query: vec![],
            body: serde_json::to_vec(self)
                .expect("a report serialises")
                .into(),
        }
    }
}

/// What a handler asked for with a `::port::` line.
#[derive(Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Directive {
    pub summary: Option<String>,
    pub link: Option<Links>,
    pub status_label: Option<String>,
    pub external_run_id: Option<String>,
    /// An entity to upsert and tie to the run: Port's entity JSON plus `blueprint`.
    pub entity: Option<serde_json::Map<String, Value>>,
}

/// One link or several.
#[derive(Debug, PartialEq, Deserialize)]
// Said when neither fits (serde's own words name the enum: "untagged enum Links").
#[serde(untagged, expecting = "`link` takes a URL or a list of URLs")]
pub enum Links {
    One(String),
    Many(Vec<String>),
}

/// Parse a handler's output line: `None` if it is a plain log line, else the directive or why
/// it is not one.
pub fn parse_directive(line: &str) -> Option<Result<Directive, crate::error::Invalid>> {
    let rest = line.trim_start().strip_prefix(DIRECTIVE)?;
    Some(serde_json::from_str::<Directive>(rest.trim()).map_err(|e| e.to_string().into()))
}

/// The stored state of a run: what makes it execute once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The `[[action]]` name that handles it.
    pub action: String,
    /// The spool id of the event that started it (to run it again under `rerun`).
    pub event: u64,
    /// When execution started (ms since the epoch).
    pub started_ms: u64,
    pub run_phase: RunPhase,
    /// A command handler's process while it runs: found still running at the next start
    /// (after a kill -9 of the relay), its process group is killed before the run is reported
    /// or run again, so two executions never overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<HandlerProcess>,
}

/// A handler process, told apart from a later process that reuses its pid by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandlerProcess {
    /// Its pid, which is also its process group's id (it leads its own group).
    pub pid: u32,
    /// Its start time, in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub started: u64,
}

impl HandlerProcess {
    /// The process `pid`, if it runs (not a zombie).
    pub fn of(pid: u32) -> Option<Self> {
        match stat(pid)? {
            (_, true) => None,
            (started, false) => Some(Self { pid, started }),
        }
    }

    /// Kill its process group if any of it may run; whether something was signalled.
    pub fn kill_if_running(&self) -> bool {
        if !self.may_be_ours(stat(self.pid)) {
            return false;
        }
        kill_group(self.pid)
    }

    /// Whether a process group with this pid's id can be this handler's, given what
    /// `/proc/<pid>/stat` holds now (start time, zombie). The leader may be gone with its
    /// group left (it died writing to the dead relay's pipe): Linux gives no new process a
    /// pid that is still a group's id, so that group is this one. A process with the pid and
    /// another start time, running or a zombie, is someone else's, and so is its group.
    fn may_be_ours(&self, now: Option<(u64, bool)>) -> bool {
        now.is_none_or(|(started, _)| started == self.started)
    }
}

/// SIGKILL the process group `pid` leads (a handler and whatever it started); whether a
/// process was signalled.
pub fn kill_group(pid: u32) -> bool {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) == 0 }
}

/// A process's start time (clock ticks after boot, field 22 of `/proc/<pid>/stat`) and
/// whether it is a zombie; `None` if there is no such process.
fn stat(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold anything): state, then fields 4
    // onwards; the start time is field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let zombie = fields.next()? == "Z";
    let started = fields.nth(18)?.parse().ok()?;
    Some((started, zombie))
}

/// Executing, or done with its terminal status queued for Port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RunPhase {
    Running,
    Done { status: Terminal, summary: String },
}

/// The spool state key of a run.
pub fn state_key(run_id: &str) -> String {
    format!("{STATE_PREFIX}{run_id}")
}

/// Every stored run state, by run id (for `events list` and the runner's start).
pub fn stored_runs(
    spool: &crate::spool::Spool,
) -> Result<Vec<(String, RunState)>, crate::spool::SpoolError> {
    Ok(spool
        .states()?
        .into_iter()
        .filter_map(|(key, bytes)| {
            let run = key.strip_prefix(STATE_PREFIX)?.to_string();
            Some((run, serde_json::from_slice(&bytes).ok()?))
        })
        .collect())
}

/// `events list`: the action runs the spool knows, with their status (empty when none).
pub fn runs_table(runs: &[(String, RunState)]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut runs: Vec<&(String, RunState)> = runs.iter().collect();
    runs.sort_by_key(|(_, state)| state.started_ms);
    let rows: Vec<[String; 5]> = runs
        .into_iter()
        .map(|(run, state)| {
            let (status, summary) = match &state.run_phase {
                RunPhase::Running => (
                    "running".to_string(),
                    format!(
                        "started {} ago",
                        humantime::format_duration(Duration::from_secs(
                            crate::clock::age(state.started_ms).as_secs()
                        ))
                    ),
                ),
                RunPhase::Done { status, summary } => (status.to_string(), summary.clone()),
            };
            // The run id and the summary come from Port's payload and a handler's output.
            [
                escape_control(run).into_owned(),
                escape_control(&state.action).into_owned(),
                state.event.to_string(),
                status,
                escape_control(&summary).into_owned(),
            ]
        })
        .collect();
    let header = ["ACTION RUN", "ACTION", "EVENT", "STATUS", "SUMMARY"];
    format!(
        "\n{}",
        crate::text::table(header, [false, false, true, false, false], &rows)
    )
}

/// What `check --event` shows for one body: the handler that would run and what would be
/// reported, or why nothing would.
pub fn explain(actions: &[ActionSpec], body: &[u8], jq: &crate::pipeline::jq::JqEngine) -> String {
    let value = match crate::pipeline::port::read_json(body) {
        Ok(value) => value,
        Err(e) => return format!("action run: {e}: no handler runs"),
    };
    let Some(run) = decode_run(&value) else {
        return "action run: none (no context.runId, run.id or port_context.runId)".into();
    };
    // As the handler's environment has it (unset: empty), and as the header line shows it.
    let env = |field: &Option<String>| escape_control(field.as_deref().unwrap_or("")).into_owned();
    let shown = |field: &Option<String>| match env(field) {
        empty if empty.is_empty() => "-".to_string(),
        value => value,
    };
    let run_id = escape_control(&run.run_id);
    let mut out = format!(
        "action run {} (action {}, entity {}, blueprint {})\n",
        run_id,
        shown(&run.action),
        shown(&run.entity),
        shown(&run.blueprint),
    );
    match find_action(actions, &run, &value, jq) {
        Err(e) => out.push_str(&format!(
            "  {e}\n  no handler runs; the run is reported to Port as FAILURE\n"
        )),
        Ok(None) => out.push_str("  no [[action]] matches: nothing runs, nothing is reported\n"),
        Ok(Some(action)) => {
            match &action.handler {
                Handler::Command(argv) => {
                    out.push_str(&format!(
                        "  handler: command {:?} (timeout {}), body on stdin, env PORT_RUN_ID={} PORT_ACTION={} PORT_ENTITY={} PORT_BLUEPRINT={}\n",
                        argv,
                        humantime::format_duration(action.timeout),
                        run_id,
                        env(&run.action),
                        env(&run.entity),
                        env(&run.blueprint),
                    ));
                    out.push_str(&passed_env(action));
                }
                Handler::Forward { url, .. } => out.push_str(&format!(
                    "  handler: POST {url} (timeout {})\n",
                    humantime::format_duration(action.timeout)
                )),
            }
            out.push_str(&format!(
                "  reported to Port: each output line as a log of run {0}; then PATCH /v1/actions/runs/{0} with SUCCESS (exit 0 / 2xx) or FAILURE\n",
                run_id
            ));
            out.push_str("  (the run executes only if x-port-signature verifies)\n");
        }
    }
    out
}

/// The `env` line of `check --event`: each variable the handler gets from the relay's own
/// environment, by name only (values may be secrets), and which of them are unset here.
fn passed_env(action: &ActionSpec) -> String {
    if action.env.is_empty() {
        return String::new();
    }
    let unset: Vec<&str> = action.unset_env().collect();
    let mut line = format!(
        "  and from the relay's environment: {}",
        action.env.join(" ")
    );
    if !unset.is_empty() {
        line.push_str(&format!(
            " ({} unset here: the handler would not get {})",
            unset.join(" "),
            if unset.len() == 1 { "it" } else { "them" }
        ));
    }
    line + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (an adversary's finding): a restart killed the process group of whatever
    /// process reused a gone handler's pid, if that process was a zombie by then (a zombie was
    /// taken for "no process", and no start time was compared).
    #[test]
    fn regression_a_zombie_that_reused_the_pid_is_not_the_handler() {
        let handler = HandlerProcess {
            pid: 4242,
            started: 100,
        };
        assert!(handler.may_be_ours(None), "gone: its group may be left");
        assert!(handler.may_be_ours(Some((100, false))), "it runs");
        assert!(handler.may_be_ours(Some((100, true))), "its zombie");
        assert!(!handler.may_be_ours(Some((200, false))), "another process");
        assert!(
            !handler.may_be_ours(Some((200, true))),
            "another process's zombie"
        );
        let me = HandlerProcess::of(std::process::id()).unwrap();
        assert_eq!(stat(me.pid), Some((me.started, false)));
    }

    /// Regression (an adversary's finding): `events list` printed a run id as Port's payload
    /// had it, control characters and bidi overrides included, driving the terminal of whoever
    /// looked (ARCHITECTURE.md promises them escaped). So did `check --event`.
    #[test]
    fn regression_run_ids_from_a_sender_are_escaped_on_the_terminal() {
        let hostile = "r_\u{1b}[2J\nforged row\u{202e}x";
        let state = RunState {
            action: "deploy".into(),
            event: 7,
            started_ms: 0,
            run_phase: RunPhase::Done {
                status: Terminal::Failure,
                summary: "exit 1: \u{1b}]0;title\u{7}".into(),
            },
            process: None,
        };
        let table = runs_table(&[(hostile.to_string(), state)]);
        assert!(
            !table.contains(['\u{1b}', '\u{202e}', '\u{7}']),
            "{table:?}"
        );
        assert_eq!(
            table.lines().count(),
            3,
            "a blank line, the header, one row: {table:?}"
        );
        assert!(
            table.contains(r"r_\x1b[2J\nforged row\u{202e}x"),
            "{table:?}"
        );
        // Regression (a new user's finding): an action named by a long `when` broke the
        // columns; each is as wide as its widest cell now.
        let long = RunState {
            action: "when .port_context.runId != null".into(),
            event: 8,
            started_ms: 1,
            run_phase: RunPhase::Running,
            process: None,
        };
        let table = runs_table(&[("r_1".into(), long.clone()), ("r_22".into(), long)]);
        let lines: Vec<&str> = table.lines().skip(1).collect();
        let status = lines[0].find("STATUS");
        assert!(
            status.is_some() && lines[1..].iter().all(|l| l.find("running") == status),
            "{table}"
        );

        let body =
            serde_json::json!({"context": {"runId": hostile}, "action": {"identifier": "a\u{1b}"}});
        let explained = explain(
            &[],
            body.to_string().as_bytes(),
            &crate::pipeline::jq::JqEngine::here(),
        );
        assert!(!explained.contains(['\u{1b}', '\u{202e}']), "{explained:?}");
    }

    /// Regression (helper-131): `check --event` named the run's variables, not those `env`
    /// passes from the relay's environment.
    #[test]
    fn regression_check_event_did_not_say_the_variables_env_passes() {
        let action = parse(
            "identifier = \"restart_deployment\"\ncommand = [\"/bin/true\"]\nenv = [\"PATH\", \"SMEE_RELAY_TEST_NEVER_SET\"]",
            true,
        )
        .unwrap();
        let body = std::fs::read(format!(
            "{}/tests/fixtures/port/actions/02-trigger-data.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let explained = explain(&[action], &body, &crate::pipeline::jq::JqEngine::here());
        assert!(
            explained.contains(
                "  and from the relay's environment: PATH SMEE_RELAY_TEST_NEVER_SET (SMEE_RELAY_TEST_NEVER_SET unset here: the handler would not get it)\n"
            ),
            "{explained}"
        );
        assert!(
            !explained.contains("/usr/bin"),
            "a value was shown: {explained}"
        );
    }

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/port/actions/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn every_fixture_names_its_run() {
        let cases = [
            (
                "01-legacy-run-message",
                "r_act01legacy",
                Some("restart_deployment"),
                Some("notification-service-prod"),
            ),
            (
                "02-trigger-data",
                "r_act02trigger",
                Some("restart_deployment"),
                Some("notification-service-prod"),
            ),
            (
                "03-port-context",
                "r_act03context",
                None,
                Some("notification-service-prod"),
            ),
            (
                "04-create-no-entity",
                "r_act04create",
                Some("scaffold_service"),
                None,
            ),
        ];
        for (file, id, action, entity) in cases {
            let run = decode_run(&fixture(file)).unwrap();
            assert_eq!(run.run_id, id, "{file}");
            assert_eq!(run.action.as_deref(), action, "{file}");
            assert_eq!(run.entity.as_deref(), entity, "{file}");
        }
        assert!(decode_run(&serde_json::json!({"ref": "main"})).is_none());
        assert_eq!(
            why_not_a_run(&serde_json::json!({"ref": "main"}), &[], true),
            None
        );
    }

    /// helper-143: a run id of kilobytes is no run (it cannot go in a report's URL), and a
    /// run id that cannot be used is said, not taken for "not a run" in silence.
    #[test]
    fn a_run_id_that_cannot_be_used_is_said() {
        let with = |id: serde_json::Value| serde_json::json!({"run": {"id": id}});
        let longest = "r".repeat(MAX_RUN_ID);
        assert_eq!(
            decode_run(&with(longest.clone().into())).unwrap().run_id,
            longest
        );
        for (id, why) in [
            (
                "r".repeat(MAX_RUN_ID + 1).into(),
                "its run id (run.id) is 257 bytes long, over the 256 taken",
            ),
            ("".into(), "its run id (run.id) is blank"),
            ("  ".into(), "its run id (run.id) is blank"),
            (
                "r\nnl".into(),
                "its run id (run.id) holds a control character",
            ),
            (12345.into(), "its run id (run.id) is not text"),
        ] {
            let body = with(id);
            assert!(decode_run(&body).is_none(), "{body}");
            assert_eq!(why_not_a_run(&body, &[], true).as_deref(), Some(why));
            // Not signed: another sender's, said nothing of (helper-145).
            assert_eq!(why_not_a_run(&body, &[], false), None);
        }
        // helper-145: a bad id first hid a good one after it.
        let both =
            serde_json::json!({"context": {"runId": "r".repeat(300)}, "run": {"id": "r_good"}});
        assert_eq!(decode_run(&both).unwrap().run_id, "r_good");
    }

    #[test]
    fn directives_parse_and_plain_lines_do_not() {
        assert_eq!(parse_directive("restarting pod 1/3"), None);
        let d = parse_directive(r#"::port:: {"link": "https://ci/1", "statusLabel": "done"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(d.link, Some(Links::One("https://ci/1".into())));
        assert_eq!(d.status_label.as_deref(), Some("done"));
        assert!(parse_directive("::port:: {oops").unwrap().is_err());
        assert!(parse_directive(r#"::port:: {"nope": 1}"#).unwrap().is_err());
        // Regression (helper-117): "data did not match any variant of untagged enum Links".
        let wrong = parse_directive(r#"::port:: {"link": 42}"#)
            .unwrap()
            .unwrap_err();
        assert!(
            wrong
                .to_string()
                .starts_with("`link` takes a URL or a list of URLs"),
            "{wrong}"
        );
    }

    fn parse(toml_text: &str, signed: bool) -> Result<ActionSpec, crate::error::Invalid> {
        let config: ActionConfig = toml::from_str(toml_text).unwrap();
        config.compile(signed, &[("MY_SECRET", "client_secret_env")])
    }

    #[test]
    fn identifier_xor_when_and_a_command_needs_a_secret() {
        assert!(parse("identifier = \"a\"\ncommand = [\"/bin/true\"]", true).is_ok());
        assert!(
            parse("identifier = \"a\"\ncommand = [\"/bin/true\"]", false)
                .unwrap_err()
                .0
                .contains("client_secret")
        );
        assert!(parse("command = [\"/bin/true\"]", true).is_err());
        assert!(
            parse(
                "identifier = \"a\"\nwhen = \".x\"\ncommand = [\"/bin/true\"]",
                true
            )
            .is_err()
        );
        assert!(
            parse(
                "when = \".port_context.runId != null\"\nforward = \"http://127.0.0.1:1/\"",
                false
            )
            .is_ok()
        );
        assert!(
            parse(
                "identifier = \"a\"\ncommand = [\"/bin/true\"]\nenv = [\"MY_SECRET\"]",
                true
            )
            .is_err()
        );
        assert!(
            parse(
                "identifier = \"a\"\ncommand = [\"/bin/true\"]\nenv = [\"PORT_CLIENT_SECRET\"]",
                true
            )
            .is_err()
        );
    }

    /// Regression (helper-126): `env = ["FOO=bar"]` passed `check` and gave the handler
    /// nothing: `env` names variables of the relay's environment, it does not set them.
    #[test]
    fn regression_env_took_a_value_and_passed_nothing() {
        let e = parse(
            "identifier = \"a\"\ncommand = [\"/bin/true\"]\nenv = [\"FOO=bar\"]",
            true,
        )
        .unwrap_err();
        assert!(
            e.0.contains("FOO=bar") && e.0.contains("not a variable name"),
            "{e}"
        );
        assert!(e.0.contains("list \"FOO\""), "{e}");
        // Regression (helper-131): the hint was made of any entry (`to give it , set  ...`).
        for bad in ["", "A B"] {
            let e = parse(
                &format!("identifier = \"a\"\ncommand = [\"/bin/true\"]\nenv = [{bad:?}]"),
                true,
            )
            .unwrap_err();
            assert!(!e.0.contains("to give it"), "{e}");
        }
        assert!(
            parse(
                "identifier = \"a\"\ncommand = [\"/bin/true\"]\nenv = [\"KUBECONFIG\", \"_X1\"]",
                true
            )
            .is_ok()
        );
    }
}
