//! `cordon audit`: read, export, verify and prune the audit store.
//!
//! Guarantees:
//! - **No store is ever created by reading.** `sessions`, `events`, `export`, `report`, `tail`, `verify`
//!   and `prune` open an existing store only; a missing one is a single line on stderr
//!   (`cordon: no audit store at PATH (…)`) and exit status 1.
//! - **Exit status.** 0: done (`verify`: the chain is intact). 1: something named does not exist
//!   (the store, a session), the store cannot be read or written, or `verify` found a bad record.
//!   2: bad usage — a flag value that does not parse (`--since`, `--until`, `--older-than`,
//!   `--kind`, `--verdict`, `--limit`, `--lines`, `--format`, `--top`), a missing `--older-than`, or a
//!   session prefix that matches several sessions. Every error is one line on stderr starting
//!   `cordon: `, and bad input changes nothing (every flag is checked before the store is opened).
//! - **People and programs.** By default output is a table for people (from
//!   [`cordon_audit::format`], which never prints control characters from the sandbox).
//!   `--json` (and `export`) print JSON lines: one object per line, flushed as they are
//!   produced — a `SessionSummary` per session, an `EventRecord` per event (the same stable
//!   field names as `export`), a `VerifyReport` or a `PruneReport`.
//! - **A session is one session.** `events SESSION` and every `--session` take an id or a unique
//!   prefix of one and then match that id exactly, never other ids that happen to share the
//!   prefix.
//! - **Closed readers are not errors.** When stdout's reader goes away (`cordon audit export |
//!   head`), the command stops quietly with status 0; `tail --follow` notices even while idle.
//! - **`tail --follow` prints every matching event exactly once**, in commit order: ids are
//!   assigned under the store's write lock at commit, so each poll (every 200 ms) asks only for
//!   ids above the last one seen. It runs until it is interrupted (SIGINT/SIGTERM keep their
//!   default action; output is flushed after every poll, so nothing printed is lost).

use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use cordon_audit::{
    format, parse_age, parse_since_at, EventFilter, EventKind, EventRecord, ReportOptions,
    SessionFilter, Store, StoreError, TimeError, Timestamp, Verdict,
};
use serde::Serialize;

/// How often `tail --follow` asks the store for new events.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Sessions listed when `--limit` is not given.
const DEFAULT_SESSION_LIMIT: usize = 50;
/// Events `tail` shows before following, when `--lines` is not given.
const DEFAULT_TAIL_LINES: usize = 10;
/// The window of `report` when `--since` is not given.
const DEFAULT_REPORT_SINCE: &str = "30d";
/// Blocked destinations `report` lists when `--top` is not given.
const DEFAULT_REPORT_TOP: usize = 10;

/// `cordon audit [--audit PATH] COMMAND`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The audit store. Default: /var/lib/cordon/audit.db for root, otherwise
    /// $XDG_STATE_HOME/cordon/audit.db (or ~/.local/state/cordon/audit.db).
    #[arg(long, value_name = "PATH", global = true)]
    pub audit: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AuditCommand,
}

/// The `cordon audit` subcommands.
#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Recent sessions, most recent first, with counts of events, blocked attempts and bytes.
    Sessions(SessionsArgs),
    /// Every event of one session, oldest first.
    Events(EventsArgs),
    /// Events as JSON lines on stdout, one event per line (for a SIEM or a file).
    Export(ExportArgs),
    /// Check the hash chain; names the first bad record and exits 1 if there is one.
    Verify(VerifyArgs),
    /// Delete events older than an age; what remains still verifies (an anchor is kept).
    Prune(PruneArgs),
    /// The newest events of every session (or one); --follow prints new ones as they land.
    Tail(TailArgs),
    /// Review: per user and policy, the allowed destinations used (how often, how many bytes)
    /// and the allowlist entries never used; the top blocked destinations; terminated sessions.
    Report(ReportArgs),
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct ReportArgs {
    /// Events at or after this (an age like 30d, an RFC 3339 timestamp, or a date). Default 30d.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Events before this (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// How many blocked destinations to list (default 10).
    #[arg(long, value_name = "N")]
    pub top: Option<String>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionsArgs {
    /// Only sessions of this user id.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Only sessions that started at or after this: an age (1h, 30m, 7d), an RFC 3339 timestamp,
    /// or a date (2025-01-31).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only sessions that started before this (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// At most this many sessions, the most recent (default 50; 0 lists all).
    #[arg(long, value_name = "N")]
    pub limit: Option<String>,
    /// JSON lines, one session summary per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct EventsArgs {
    /// A session id, or a prefix of one that matches no other session.
    #[arg(value_name = "SESSION")]
    pub session: String,
    /// Only events that count as blocked (verdict block, blocked, budget_exhausted).
    #[arg(long)]
    pub blocked: bool,
    /// Only events of this kind (session_start, session_end, dns_query, connection,
    /// http_request, blocked, budget_exhausted, alert).
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// Only events with this verdict (allow, block, report-would-block).
    #[arg(long, value_name = "VERDICT")]
    pub verdict: Option<String>,
    /// Only events at or after this (1h, 30m, 7d, RFC 3339, or a date).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only events before this (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// JSON lines, one event record per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportArgs {
    /// Only events at or after this (1h, 30m, 7d, RFC 3339, or a date).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only events before this (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    pub until: Option<String>,
    /// Only events of this session (an id or a unique prefix).
    #[arg(long, value_name = "SESSION")]
    pub session: Option<String>,
    /// Only events of this user id.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Only events with this verdict (allow, block, report-would-block).
    #[arg(long, value_name = "VERDICT")]
    pub verdict: Option<String>,
    /// Only events of this kind.
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
    /// Output format: jsonl (one JSON object per line, the default) or cef (ArcSight CEF, one
    /// event per line).
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyArgs {
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneArgs {
    /// Delete events older than this age (e.g. 90d, 12w, 36h). Required.
    #[arg(long, value_name = "AGE")]
    pub older_than: Option<String>,
    /// The outcome as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct TailArgs {
    /// Keep running and print new events as they are recorded, until interrupted.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events of this session (an id or a unique prefix).
    #[arg(long, value_name = "SESSION")]
    pub session: Option<String>,
    /// How many of the newest events to print first (default 10; 0 prints none).
    #[arg(long, short = 'n', value_name = "N")]
    pub lines: Option<String>,
    /// JSON lines, one event record per line.
    #[arg(long)]
    pub json: bool,
}

/// Why a `cordon audit` command failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditCmdError {
    #[error("no audit store at {} (nothing has been recorded yet; cordon run --allow ... records network events)", path.display())]
    NoStore { path: PathBuf },
    #[error(transparent)]
    DefaultPath(#[from] cordon_audit::PathError),
    #[error("invalid {flag} {input:?}: {hint}")]
    BadValue {
        flag: &'static str,
        input: String,
        hint: String,
    },
    #[error("{flag} is required (for example {flag} {example})")]
    Missing {
        flag: &'static str,
        example: &'static str,
    },
    #[error("no session matches {prefix:?} (cordon audit sessions lists recent ones)")]
    UnknownSession { prefix: String },
    #[error("{prefix:?} matches several sessions ({candidates}…); give more of the id")]
    AmbiguousSession { prefix: String, candidates: String },
    #[error(transparent)]
    Store(StoreError),
    #[error("cannot encode JSON: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot write to stdout: {0}")]
    Output(#[source] io::Error),
}

impl From<StoreError> for AuditCmdError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { path } => AuditCmdError::NoStore { path },
            StoreError::NoSuchSession { prefix } => AuditCmdError::UnknownSession { prefix },
            StoreError::AmbiguousSession { prefix, candidates } => {
                AuditCmdError::AmbiguousSession { prefix, candidates }
            }
            StoreError::Export(io) => AuditCmdError::Output(io),
            other => AuditCmdError::Store(other),
        }
    }
}

impl AuditCmdError {
    /// The exit status for this error (see the module guarantees).
    pub fn exit_code(&self) -> i32 {
        match self {
            AuditCmdError::BadValue { .. }
            | AuditCmdError::Missing { .. }
            | AuditCmdError::AmbiguousSession { .. } => 2,
            _ => 1,
        }
    }

    /// Whether stdout's reader went away: not an error worth reporting.
    fn is_closed_output(&self) -> bool {
        matches!(self, AuditCmdError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

type Result<T, E = AuditCmdError> = std::result::Result<T, E>;

/// Runs `cordon audit …` and returns the exit status.
pub fn run(args: AuditArgs) -> i32 {
    match execute(args) {
        Ok(status) => status,
        Err(e) if e.is_closed_output() => 0,
        Err(e) => {
            // stderr may be closed too; there is nobody left to tell then.
            let _ = writeln!(io::stderr(), "cordon: {e}");
            e.exit_code()
        }
    }
}

fn execute(args: AuditArgs) -> Result<i32> {
    let now = Timestamp::now();
    // Every flag is parsed before the store is opened, so bad input never touches it.
    let plan = plan(&args.command, now)?;
    let path = match args.audit {
        Some(path) => path,
        None => cordon_audit::default_path()?,
    };
    let mut store = Store::open_existing(&path)?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let status = match plan {
        Plan::Sessions { filter, json } => sessions(&store, &filter, json, &mut out)?,
        Plan::Events { filter, json } => events(&store, filter, json, &mut out)?,
        Plan::Export { filter, format } => export(&store, filter, format, &mut out)?,
        Plan::Verify { json } => verify(&store, json, &mut out)?,
        Plan::Prune { cutoff, json } => prune(&mut store, cutoff, json, &mut out)?,
        Plan::Tail {
            filter,
            lines,
            follow,
            json,
        } => tail(&store, filter, lines, follow, json, &mut out)?,
        Plan::Report { options, json } => report(&store, &options, json, &mut out)?,
    };
    out.flush().map_err(AuditCmdError::Output)?;
    Ok(status)
}

/// How `export` writes each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExportFormat {
    /// One [`EventRecord`] as JSON per line.
    Jsonl,
    /// One CEF line per event ([`cordon_audit::export`]).
    Cef,
}

/// What to do, with every flag parsed: a pure function of the arguments and the time.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    Sessions {
        filter: SessionFilter,
        json: bool,
    },
    /// `filter.session` holds the prefix as given; it is resolved against the store later.
    Events {
        filter: EventFilter,
        json: bool,
    },
    Export {
        filter: EventFilter,
        format: ExportFormat,
    },
    Verify {
        json: bool,
    },
    Prune {
        cutoff: Timestamp,
        json: bool,
    },
    Tail {
        filter: EventFilter,
        lines: usize,
        follow: bool,
        json: bool,
    },
    Report {
        options: ReportOptions,
        json: bool,
    },
}

fn plan(command: &AuditCommand, now: Timestamp) -> Result<Plan> {
    Ok(match command {
        AuditCommand::Sessions(a) => Plan::Sessions {
            filter: SessionFilter {
                session: None,
                user: a.user.clone(),
                since: when("--since", a.since.as_deref(), now)?,
                until: when("--until", a.until.as_deref(), now)?,
                limit: match count("--limit", a.limit.as_deref())? {
                    None => Some(DEFAULT_SESSION_LIMIT),
                    Some(0) => None,
                    Some(n) => Some(n),
                },
            },
            json: a.json,
        },
        AuditCommand::Events(a) => Plan::Events {
            filter: EventFilter {
                session: Some(a.session.clone()),
                kind: kind(a.kind.as_deref())?,
                verdict: verdict(a.verdict.as_deref())?,
                blocked_only: a.blocked,
                since: when("--since", a.since.as_deref(), now)?,
                until: when("--until", a.until.as_deref(), now)?,
                ..EventFilter::default()
            },
            json: a.json,
        },
        AuditCommand::Export(a) => {
            let format = match a.format.as_deref() {
                None | Some("jsonl") => ExportFormat::Jsonl,
                Some("cef") => ExportFormat::Cef,
                Some(other) => {
                    return Err(AuditCmdError::BadValue {
                        flag: "--format",
                        input: other.to_owned(),
                        hint: "expected jsonl or cef".to_owned(),
                    })
                }
            };
            Plan::Export {
                format,
                filter: EventFilter {
                    session: a.session.clone(),
                    user: a.user.clone(),
                    kind: kind(a.kind.as_deref())?,
                    verdict: verdict(a.verdict.as_deref())?,
                    since: when("--since", a.since.as_deref(), now)?,
                    until: when("--until", a.until.as_deref(), now)?,
                    ..EventFilter::default()
                },
            }
        }
        AuditCommand::Verify(a) => Plan::Verify { json: a.json },
        AuditCommand::Prune(a) => {
            let Some(input) = a.older_than.as_deref() else {
                return Err(AuditCmdError::Missing {
                    flag: "--older-than",
                    example: "90d",
                });
            };
            let age = parse_age(input).map_err(|e| bad_time("--older-than", input, &e))?;
            Plan::Prune {
                cutoff: now.minus_millis(age),
                json: a.json,
            }
        }
        AuditCommand::Tail(a) => Plan::Tail {
            filter: EventFilter {
                session: a.session.clone(),
                ..EventFilter::default()
            },
            lines: count("--lines", a.lines.as_deref())?.unwrap_or(DEFAULT_TAIL_LINES),
            follow: a.follow,
            json: a.json,
        },
        AuditCommand::Report(a) => Plan::Report {
            options: ReportOptions {
                since: when(
                    "--since",
                    Some(a.since.as_deref().unwrap_or(DEFAULT_REPORT_SINCE)),
                    now,
                )?,
                until: when("--until", a.until.as_deref(), now)?,
                top_blocked: count("--top", a.top.as_deref())?.unwrap_or(DEFAULT_REPORT_TOP),
            },
            json: a.json,
        },
    })
}

fn report<W: Write>(
    store: &Store,
    options: &ReportOptions,
    json: bool,
    out: &mut W,
) -> Result<i32> {
    let report = store.report(options)?;
    if json {
        json_line(out, &report)?;
    } else {
        text(out, &format::report_text(&report))?;
    }
    Ok(0)
}

fn bad_time(flag: &'static str, input: &str, e: &TimeError) -> AuditCmdError {
    let hint = match e {
        TimeError::Rfc3339 { detail, .. } => format!("not a valid RFC 3339 timestamp ({detail})"),
        TimeError::Duration { .. } => {
            "expected a number and a unit (ms, s, m, h, d, w), e.g. 30m, 7d, 1h30m".to_owned()
        }
        TimeError::Overflow { .. } => "too large".to_owned(),
        TimeError::Since { .. } => {
            "expected an age (1h, 30m, 7d), an RFC 3339 timestamp or a date (2025-01-31)".to_owned()
        }
    };
    AuditCmdError::BadValue {
        flag,
        input: input.to_owned(),
        hint,
    }
}

fn when(flag: &'static str, input: Option<&str>, now: Timestamp) -> Result<Option<Timestamp>> {
    input
        .map(|s| parse_since_at(s, now).map_err(|e| bad_time(flag, s, &e)))
        .transpose()
}

fn count(flag: &'static str, input: Option<&str>) -> Result<Option<usize>> {
    input
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| AuditCmdError::BadValue {
                    flag,
                    input: s.to_owned(),
                    hint: "expected a whole number".to_owned(),
                })
        })
        .transpose()
}

fn kind(input: Option<&str>) -> Result<Option<EventKind>> {
    input
        .map(|s| {
            s.parse()
                .map_err(|e: cordon_audit::UnknownName| AuditCmdError::BadValue {
                    flag: "--kind",
                    input: s.to_owned(),
                    hint: format!("expected one of {}", e.expected),
                })
        })
        .transpose()
}

fn verdict(input: Option<&str>) -> Result<Option<Verdict>> {
    input
        .map(|s| {
            s.parse()
                .map_err(|e: cordon_audit::UnknownName| AuditCmdError::BadValue {
                    flag: "--verdict",
                    input: s.to_owned(),
                    hint: format!("expected one of {}", e.expected),
                })
        })
        .transpose()
}

/// A session prefix resolved to one session id.
struct OneSession {
    id: String,
    /// Some other session's id starts with this one, so the store's prefix filter also returns
    /// that session's events; they are dropped one by one and a SQL `LIMIT` cannot be trusted.
    shares_prefix: bool,
}

impl OneSession {
    fn resolve(store: &Store, prefix: &str) -> Result<OneSession> {
        let id = store.resolve_session(prefix)?;
        let sharing = store.sessions(&SessionFilter {
            session: Some(id.clone()),
            limit: Some(2),
            ..SessionFilter::default()
        })?;
        Ok(OneSession {
            shares_prefix: sharing.len() > 1,
            id,
        })
    }

    fn matches(&self, record: &EventRecord) -> bool {
        record.event.session_id == self.id
    }
}

/// Resolves `filter.session` (if any) to one session.
fn resolve(store: &Store, filter: &mut EventFilter) -> Result<Option<OneSession>> {
    let Some(prefix) = filter.session.take() else {
        return Ok(None);
    };
    let one = OneSession::resolve(store, &prefix)?;
    filter.session = Some(one.id.clone());
    Ok(Some(one))
}

fn json_line<W: Write, T: Serialize>(out: &mut W, value: &T) -> Result<()> {
    serde_json::to_writer(&mut *out, value).map_err(|e| {
        if e.is_io() {
            AuditCmdError::Output(io::Error::from(e))
        } else {
            AuditCmdError::Encode(e)
        }
    })?;
    out.write_all(b"\n").map_err(AuditCmdError::Output)
}

fn text<W: Write>(out: &mut W, s: &str) -> Result<()> {
    out.write_all(s.as_bytes()).map_err(AuditCmdError::Output)
}

/// Streams the events matching `filter` (and `only`) to `each`, one at a time.
fn stream_events<F>(
    store: &Store,
    filter: &EventFilter,
    only: Option<&OneSession>,
    mut each: F,
) -> Result<u64>
where
    F: FnMut(&EventRecord) -> Result<()>,
{
    let mut shown = 0;
    // The store's callback can only fail with a StoreError: carry ours across it.
    let mut failure: Option<AuditCmdError> = None;
    let walked = store.for_each_event(filter, |record| {
        if only.is_some_and(|s| !s.matches(&record)) {
            return Ok(());
        }
        match each(&record) {
            Ok(()) => {
                shown += 1;
                Ok(())
            }
            Err(e) => {
                failure = Some(e);
                Err(StoreError::Export(io::Error::other("stopped")))
            }
        }
    });
    match (walked, failure) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(e.into()),
        (Ok(_), None) => Ok(shown),
    }
}

fn sessions<W: Write>(
    store: &Store,
    filter: &SessionFilter,
    json: bool,
    out: &mut W,
) -> Result<i32> {
    let list = store.sessions(filter)?;
    if json {
        for s in &list {
            json_line(out, s)?;
        }
        return Ok(0);
    }
    if list.is_empty() {
        text(out, "no sessions match\n")?;
        return Ok(0);
    }
    text(out, &format::sessions_header())?;
    for s in &list {
        text(out, &format::session_row(s))?;
    }
    if filter.limit == Some(list.len()) {
        let _ = writeln!(
            io::stderr(),
            "cordon: showing the {} most recent sessions; --limit 0 lists all",
            list.len()
        );
    }
    Ok(0)
}

fn events<W: Write>(
    store: &Store,
    mut filter: EventFilter,
    json: bool,
    out: &mut W,
) -> Result<i32> {
    let session = resolve(store, &mut filter)?;
    if json {
        stream_events(store, &filter, session.as_ref(), |r| json_line(out, r))?;
        return Ok(0);
    }
    if let Some(session) = &session {
        let summary = store
            .sessions(&SessionFilter {
                session: Some(session.id.clone()),
                ..SessionFilter::default()
            })?
            .into_iter()
            .find(|s| s.id == session.id);
        if let Some(s) = summary {
            let command = s.command.as_deref().unwrap_or("-");
            text(
                out,
                &format!(
                    "session {}  user {}  code {}  command {}\n",
                    format::sanitize(&s.id),
                    format::sanitize(&s.user_id),
                    format::sanitize(&s.code_sha256),
                    format::cut(command, 200),
                ),
            )?;
        }
    }
    text(out, &format::events_header(false))?;
    let shown = stream_events(store, &filter, session.as_ref(), |r| {
        text(out, &format::event_row(r, false))
    })?;
    if shown == 0 {
        text(out, "(no matching events)\n")?;
    }
    Ok(0)
}

fn export<W: Write>(
    store: &Store,
    mut filter: EventFilter,
    format: ExportFormat,
    out: &mut W,
) -> Result<i32> {
    let session = resolve(store, &mut filter)?;
    stream_events(store, &filter, session.as_ref(), |r| match format {
        ExportFormat::Jsonl => json_line(out, r),
        ExportFormat::Cef => {
            let mut line = cordon_audit::cef_line(r);
            line.push('\n');
            text(out, &line)
        }
    })?;
    Ok(0)
}

fn verify<W: Write>(store: &Store, json: bool, out: &mut W) -> Result<i32> {
    let report = store.verify()?;
    if json {
        json_line(out, &report)?;
    } else {
        text(out, &format::verify_summary(&report))?;
    }
    Ok(if report.is_ok() { 0 } else { 1 })
}

fn prune<W: Write>(store: &mut Store, cutoff: Timestamp, json: bool, out: &mut W) -> Result<i32> {
    let report = store.prune_before(cutoff)?;
    if json {
        json_line(out, &report)?;
        return Ok(0);
    }
    let line = match &report.anchor {
        Some(anchor) => format!(
            "pruned {} records older than {cutoff}; the chain now starts after anchor record {} {}\n",
            report.deleted, anchor.seq, anchor.hash
        ),
        None => format!("nothing older than {cutoff}; nothing pruned\n"),
    };
    text(out, &line)?;
    Ok(0)
}

fn tail<W: Write + AsFd>(
    store: &Store,
    mut filter: EventFilter,
    lines: usize,
    follow: bool,
    json: bool,
    out: &mut BufWriter<W>,
) -> Result<i32> {
    let session = resolve(store, &mut filter)?;
    let with_session = session.is_none();
    let print = |out: &mut BufWriter<W>, r: &EventRecord| {
        if json {
            json_line(out, r)
        } else {
            text(out, &format::event_row(r, with_session))
        }
    };
    if !json {
        text(out, &format::events_header(with_session))?;
    }
    // Read before the newest events, so an event committed in between is either among them or
    // above this id; `after_id` below then skips nothing and repeats nothing.
    let head = store.head()?.seq;
    let mut last = head;
    if lines > 0 {
        let newest = newest_events(store, &filter, session.as_ref(), lines)?;
        for r in &newest {
            print(out, r)?;
            last = last.max(r.id);
        }
    }
    out.flush().map_err(AuditCmdError::Output)?;
    if !follow {
        return Ok(0);
    }
    loop {
        if stdout_gone(out.get_ref(), FOLLOW_POLL) {
            return Ok(0);
        }
        let poll = EventFilter {
            after_id: Some(last),
            ..filter.clone()
        };
        stream_events(store, &poll, session.as_ref(), |r| {
            last = last.max(r.id);
            print(out, r)
        })?;
        out.flush().map_err(AuditCmdError::Output)?;
    }
}

/// The newest `n` events matching `filter` and `only`, oldest first.
fn newest_events(
    store: &Store,
    filter: &EventFilter,
    only: Option<&OneSession>,
    n: usize,
) -> Result<Vec<EventRecord>> {
    if only.is_some_and(|s| s.shares_prefix) {
        // The prefix filter returns another session's events too: walk them all, keep the last n.
        let mut ring = std::collections::VecDeque::with_capacity(n.min(4096));
        stream_events(store, filter, only, |r| {
            if ring.len() == n {
                ring.pop_front();
            }
            ring.push_back(r.clone());
            Ok(())
        })?;
        return Ok(ring.into());
    }
    let limited = EventFilter {
        limit: Some(n),
        ..filter.clone()
    };
    Ok(store.events(&limited)?)
}

/// Waits up to `timeout`; true when stdout can no longer be written (its reader closed the
/// pipe, the terminal hung up), so `tail --follow | head` ends instead of idling forever.
fn stdout_gone<F: AsFd>(fd: &F, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    // No events requested: poll still reports POLLERR/POLLHUP/POLLNVAL, and a regular file or
    // /dev/null reports nothing, so this is a plain sleep for them.
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::empty())];
    match poll(&mut fds, timeout) {
        Ok(0) | Err(_) => false,
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);
    const HOUR: i64 = 3_600_000;

    fn plan_of(command: AuditCommand) -> Result<Plan> {
        plan(&command, NOW)
    }

    #[test]
    fn sessions_list_fifty_by_default_and_all_with_limit_zero() {
        let default = plan_of(AuditCommand::Sessions(SessionsArgs::default())).unwrap();
        assert_eq!(
            default,
            Plan::Sessions {
                filter: SessionFilter {
                    limit: Some(50),
                    ..SessionFilter::default()
                },
                json: false
            }
        );
        let all = plan_of(AuditCommand::Sessions(SessionsArgs {
            limit: Some("0".into()),
            user: Some("alice".into()),
            since: Some("1h".into()),
            json: true,
            ..SessionsArgs::default()
        }))
        .unwrap();
        assert_eq!(
            all,
            Plan::Sessions {
                filter: SessionFilter {
                    user: Some("alice".into()),
                    since: Some(NOW.minus_millis(HOUR)),
                    limit: None,
                    ..SessionFilter::default()
                },
                json: true
            }
        );
    }

    #[test]
    fn export_flags_become_one_event_filter() {
        let p = plan_of(AuditCommand::Export(ExportArgs {
            since: Some("2h".into()),
            until: Some("2023-11-14T22:13:20Z".into()),
            session: Some("01J".into()),
            user: Some("bob".into()),
            verdict: Some("report-would-block".into()),
            kind: Some("dns_query".into()),
            format: Some("jsonl".into()),
        }))
        .unwrap();
        assert_eq!(
            p,
            Plan::Export {
                format: ExportFormat::Jsonl,
                filter: EventFilter {
                    session: Some("01J".into()),
                    user: Some("bob".into()),
                    kind: Some(EventKind::DnsQuery),
                    verdict: Some(Verdict::ReportWouldBlock),
                    since: Some(NOW.minus_millis(2 * HOUR)),
                    until: Some(NOW),
                    ..EventFilter::default()
                }
            }
        );
    }

    #[test]
    fn events_and_tail_keep_the_session_prefix_for_resolution() {
        let p = plan_of(AuditCommand::Events(EventsArgs {
            session: "01JAB".into(),
            blocked: true,
            ..EventsArgs::default()
        }))
        .unwrap();
        assert_eq!(
            p,
            Plan::Events {
                filter: EventFilter {
                    session: Some("01JAB".into()),
                    blocked_only: true,
                    ..EventFilter::default()
                },
                json: false
            }
        );
        let t = plan_of(AuditCommand::Tail(TailArgs {
            follow: true,
            lines: Some("0".into()),
            ..TailArgs::default()
        }))
        .unwrap();
        assert_eq!(
            t,
            Plan::Tail {
                filter: EventFilter::default(),
                lines: 0,
                follow: true,
                json: false
            }
        );
    }

    #[test]
    fn report_covers_thirty_days_and_ten_destinations_by_default() {
        let p = plan_of(AuditCommand::Report(ReportArgs::default())).unwrap();
        assert_eq!(
            p,
            Plan::Report {
                options: ReportOptions {
                    since: Some(NOW.minus_millis(30 * 24 * HOUR)),
                    until: None,
                    top_blocked: 10,
                },
                json: false
            }
        );
        let err = plan_of(AuditCommand::Report(ReportArgs {
            top: Some("many".into()),
            ..ReportArgs::default()
        }))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --top \"many\": expected a whole number"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn prune_needs_an_age_and_cuts_that_far_back() {
        let p = plan_of(AuditCommand::Prune(PruneArgs {
            older_than: Some("90d".into()),
            json: false,
        }))
        .unwrap();
        assert_eq!(
            p,
            Plan::Prune {
                cutoff: NOW.minus_millis(90 * 24 * HOUR),
                json: false
            }
        );
        let missing = plan_of(AuditCommand::Prune(PruneArgs::default())).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
        assert_eq!(
            missing.to_string(),
            "--older-than is required (for example --older-than 90d)"
        );
    }

    #[test]
    fn every_bad_value_is_a_usage_error_naming_the_flag_and_the_input() {
        let cases: Vec<(AuditCommand, &str)> = vec![
            (
                AuditCommand::Sessions(SessionsArgs {
                    since: Some("yesterday".into()),
                    ..SessionsArgs::default()
                }),
                "invalid --since \"yesterday\": expected an age (1h, 30m, 7d), an RFC 3339 timestamp or a date (2025-01-31)",
            ),
            (
                AuditCommand::Sessions(SessionsArgs {
                    limit: Some("-3".into()),
                    ..SessionsArgs::default()
                }),
                "invalid --limit \"-3\": expected a whole number",
            ),
            (
                AuditCommand::Export(ExportArgs {
                    verdict: Some("maybe".into()),
                    ..ExportArgs::default()
                }),
                "invalid --verdict \"maybe\": expected one of allow, block, report-would-block",
            ),
            (
                AuditCommand::Export(ExportArgs {
                    until: Some("soon".into()),
                    ..ExportArgs::default()
                }),
                "invalid --until \"soon\"",
            ),
            (
                AuditCommand::Export(ExportArgs {
                    format: Some("xml".into()),
                    ..ExportArgs::default()
                }),
                "invalid --format \"xml\": expected jsonl or cef",
            ),
            (
                AuditCommand::Events(EventsArgs {
                    session: "x".into(),
                    kind: Some("exfil".into()),
                    ..EventsArgs::default()
                }),
                "invalid --kind \"exfil\": expected one of session_start,",
            ),
            (
                AuditCommand::Prune(PruneArgs {
                    older_than: Some("90".into()),
                    json: false,
                }),
                "invalid --older-than \"90\": expected a number and a unit",
            ),
            (
                AuditCommand::Prune(PruneArgs {
                    older_than: Some("99999999999999999999d".into()),
                    json: false,
                }),
                "invalid --older-than \"99999999999999999999d\": too large",
            ),
            (
                AuditCommand::Tail(TailArgs {
                    lines: Some("ten".into()),
                    ..TailArgs::default()
                }),
                "invalid --lines \"ten\": expected a whole number",
            ),
        ];
        for (command, message) in cases {
            let err = plan_of(command).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{err}");
            let text = err.to_string();
            assert!(text.starts_with(message), "{text:?} vs {message:?}");
            assert!(!text.contains('\n'), "{text:?} is more than one line");
        }
    }

    #[test]
    fn not_found_is_status_one_and_ambiguity_is_usage() {
        let unknown: AuditCmdError = StoreError::NoSuchSession {
            prefix: "zz".into(),
        }
        .into();
        assert_eq!(unknown.exit_code(), 1);
        let ambiguous: AuditCmdError = StoreError::AmbiguousSession {
            prefix: "01".into(),
            candidates: "01A, 01B".into(),
        }
        .into();
        assert_eq!(ambiguous.exit_code(), 2);
        let missing: AuditCmdError = StoreError::NotFound {
            path: "/nowhere/audit.db".into(),
        }
        .into();
        assert_eq!(missing.exit_code(), 1);
        assert_eq!(
            missing.to_string(),
            "no audit store at /nowhere/audit.db (nothing has been recorded yet; cordon run --allow ... records network events)"
        );
    }

    #[test]
    fn a_closed_reader_is_quiet_and_other_write_errors_are_not() {
        let pipe: AuditCmdError = StoreError::Export(io::ErrorKind::BrokenPipe.into()).into();
        assert!(pipe.is_closed_output());
        let full: AuditCmdError = StoreError::Export(io::ErrorKind::StorageFull.into()).into();
        assert!(!full.is_closed_output());
        assert_eq!(full.exit_code(), 1);
    }

    #[test]
    fn a_pipe_whose_reader_closed_is_noticed_while_idle() {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        assert!(!stdout_gone(&writer, Duration::from_millis(10)));
        drop(reader);
        let started = std::time::Instant::now();
        assert!(stdout_gone(&writer, Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
