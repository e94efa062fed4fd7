//! `cordon gateway`: the egress gateway on its own, as an HTTP/CONNECT proxy on a host address,
//! for deployments where the code runs in a pod or VM that can reach only the gateway (and for
//! benchmarks).
//!
//! Guarantees:
//! - **The same gateway.** One [`cordon_gateway::Gateway`] in token mode makes every decision with
//!   the same policy code, anti-SSRF checks and per-session budgets as a sandbox's gateway.
//!   Default deny: only what the policy (and `--allow`) names is reachable.
//! - **Every request names its session.** Each `--session NAME` (default: one session named
//!   after the invoking user) gets a fresh session id and a 256-bit token; a request without a
//!   valid token gets 407 and is recorded as an unauthenticated blocked attempt. Tokens are
//!   written only to stdout, or to `--token-file` (a new mode-0600 file renamed into place, so
//!   it is never readable by others, not even for a moment).
//! - **Bad input changes nothing.** Every flag and the policy file are checked before the address
//!   is bound or the audit store is opened; a problem is one line `cordon: …` on stderr and exit
//!   status 2. Operational failures (address in use, store cannot be opened, no resolver) are one
//!   line and exit status 1, before any token is issued or any event is recorded.
//! - **Everything is audited.** Every gateway event goes to the audit store (`--audit`, or
//!   [`cordon_audit::default_path`]); each session's `session_start` is recorded before its
//!   token is shown, and its `session_end` when the gateway stops or the session is terminated
//!   (budget exceeded with `on_exceed = "terminate"`, `terminate_after_blocked`: the token is
//!   revoked, so its clients get 407 from then on).
//! - **Clean stop.** SIGINT or SIGTERM: stop accepting, end the open connections (each records
//!   its event; bounded by [`SHUTDOWN_GRACE`]), record `session_end` for every session, commit
//!   everything and exit 0. If an event was lost on the way to the store, say so and exit 1.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use cordon_audit::{Attribution, AuditWriter};
use cordon_gateway::{Gateway, GatewayConfig, Listeners, SessionInfo, TerminateRequest, Upstream};
use cordon_policy::{Overrides, Policy, PolicyError};
use serde::Serialize;
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// How long open connections get to end after a stop signal before they are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Longest session name accepted by `--session`.
const MAX_SESSION_NAME: usize = 64;
/// Most sessions one gateway issues tokens for at start.
const MAX_SESSIONS: usize = 1024;
/// The string whose SHA-256 stands for "the code" of a standalone gateway session: the gateway
/// does not know what code its clients run.
const CODE_MARKER: &[u8] = b"gateway";

/// `cordon gateway --listen ADDR [--policy FILE] [--allow HOST]... [--session NAME]...`
#[derive(Args, Debug, Clone, Default)]
pub struct GatewayArgs {
    /// Address the proxy listens on (IP:PORT; port 0 picks a free port, shown in the output).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3128")]
    pub listen: String,
    /// Policy file (TOML); only its [network] and [response] sections matter here.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Allow a destination (HOST, HOST:PORT, *.SUFFIX, IP/CIDR); added to the policy's.
    #[arg(long, value_name = "HOST")]
    pub allow: Vec<String>,
    /// Enforcement: enforce or report (record what would be blocked, block only private ranges).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// The audit store. Default: /var/lib/cordon/audit.db for root, otherwise
    /// $XDG_STATE_HOME/cordon/audit.db (or ~/.local/state/cordon/audit.db).
    #[arg(long, value_name = "PATH")]
    pub audit: Option<PathBuf>,
    /// Issue a token for a session of this user (repeatable). Default: one session for the
    /// invoking user.
    #[arg(long = "session", value_name = "NAME")]
    pub sessions: Vec<String>,
    /// Write the token lines to FILE (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// DNS server the gateway asks for real addresses (IP or IP:PORT; repeatable). Default: the
    /// host's /etc/resolv.conf.
    #[arg(long = "upstream-dns", value_name = "ADDR")]
    pub upstream_dns: Vec<String>,
    /// Worker threads of the proxy (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Most client connections at once that have not yet sent a request with a valid token;
    /// past it a new connection gets 503 (default 256).
    #[arg(long, value_name = "N")]
    pub max_unauthenticated: Option<usize>,
}

/// Why `cordon gateway` stopped or never started.
#[derive(Debug, Error)]
pub enum GatewayCmdError {
    #[error("--listen {value:?}: {reason}")]
    Listen { value: String, reason: String },
    #[error("--policy {}: {source}", path.display())]
    PolicyRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("--session {name:?}: {reason}")]
    SessionName { name: String, reason: String },
    #[error("at most {MAX_SESSIONS} --session flags")]
    TooManySessions,
    #[error("--upstream-dns {0:?}: expected an IP address or IP:PORT")]
    UpstreamDns(String),
    #[error("{0}: `cordon gateway` does not intercept TLS (it has no sandbox to hand a CA or placeholders to); use the policy with `cordon run`")]
    NeedsSandbox(&'static str),
    #[error("--threads {0}: expected a number from 1 to 256")]
    Threads(usize),
    #[error("--max-unauthenticated {0}: expected a number from 1 to 65536")]
    MaxUnauthenticated(usize),
    #[error("--token-file {}: {reason}", path.display())]
    TokenFilePath { path: PathBuf, reason: &'static str },
    #[error("cannot listen on {addr}: address already in use (another proxy is listening there; choose another --listen)")]
    AddrInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("audit store {}: {source}", path.display())]
    AuditOpen {
        path: PathBuf,
        source: Box<cordon_audit::Error>,
    },
    #[error(transparent)]
    AuditPath(#[from] cordon_audit::PathError),
    #[error("audit store: {0}")]
    AuditLost(#[from] cordon_audit::WriterError),
    #[error("gateway: {0}")]
    Gateway(#[from] cordon_gateway::GatewayError),
    #[error("--token-file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the gateway's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the {name} handler: {source}")]
    Signal {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("the gateway task failed: {0}")]
    Task(String),
}

impl GatewayCmdError {
    /// 2 for bad input, 1 for everything that went wrong while running.
    pub fn exit_code(&self) -> i32 {
        match self {
            GatewayCmdError::Listen { .. }
            | GatewayCmdError::PolicyRead { .. }
            | GatewayCmdError::Policy(_)
            | GatewayCmdError::SessionName { .. }
            | GatewayCmdError::TooManySessions
            | GatewayCmdError::UpstreamDns(_)
            | GatewayCmdError::Threads(_)
            | GatewayCmdError::MaxUnauthenticated(_)
            | GatewayCmdError::TokenFilePath { .. } => 2,
            _ => 1,
        }
    }
}

/// What `cordon gateway` will do, with every flag checked: a pure function of the arguments,
/// the policy file's text and the invoking user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewayPlan {
    pub listen: SocketAddr,
    pub policy: Policy,
    /// One session per name, in order.
    pub sessions: Vec<String>,
    /// `None`: the default store.
    pub audit: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Empty: the host's resolv.conf.
    pub upstream_dns: Vec<SocketAddr>,
    /// `None`: one worker per CPU.
    pub threads: Option<usize>,
    /// Connections without a session at once.
    pub max_unauthenticated: usize,
}

/// Builds the plan. `policy_text` is the policy file's path and contents, if one was given.
pub fn plan(
    args: &GatewayArgs,
    policy_text: Option<(&Path, &str)>,
    invoking_user: &str,
) -> Result<GatewayPlan, GatewayCmdError> {
    let listen = parse_listen(&args.listen)?;
    let mut policy = match policy_text {
        Some((path, text)) => Policy::from_toml_str(text, Some(&path.display().to_string()))?,
        None => Policy::default(),
    };
    policy.apply(&Overrides {
        allow: args.allow.clone(),
        mode: args.mode.clone(),
        ..Overrides::default()
    })?;
    // Rules would be enforced on plain HTTP only while HTTPS to the same host tunnels through
    // unchecked: refuse rather than half-enforce.
    if !policy.credentials.is_empty() {
        return Err(GatewayCmdError::NeedsSandbox("[[credentials]]"));
    }
    if !policy.network.rules.is_empty() {
        return Err(GatewayCmdError::NeedsSandbox("[[network.rules]]"));
    }
    if !policy.network.intercept.is_empty() {
        return Err(GatewayCmdError::NeedsSandbox("network.intercept"));
    }
    let sessions = if args.sessions.is_empty() {
        vec![invoking_user.to_owned()]
    } else {
        args.sessions.clone()
    };
    if sessions.len() > MAX_SESSIONS {
        return Err(GatewayCmdError::TooManySessions);
    }
    for name in &sessions {
        check_session_name(name)?;
    }
    let upstream_dns = args
        .upstream_dns
        .iter()
        .map(|v| parse_upstream(v))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = args.threads {
        if !(1..=256).contains(&n) {
            return Err(GatewayCmdError::Threads(n));
        }
    }
    let max_unauthenticated = args
        .max_unauthenticated
        .unwrap_or(cordon_gateway::DEFAULT_MAX_UNAUTHENTICATED);
    if !(1..=65536).contains(&max_unauthenticated) {
        return Err(GatewayCmdError::MaxUnauthenticated(max_unauthenticated));
    }
    if let Some(path) = &args.token_file {
        if path.file_name().is_none() {
            return Err(GatewayCmdError::TokenFilePath {
                path: path.clone(),
                reason: "not a file name",
            });
        }
    }
    Ok(GatewayPlan {
        listen,
        policy,
        sessions,
        audit: args.audit.clone(),
        token_file: args.token_file.clone(),
        upstream_dns,
        threads: args.threads,
        max_unauthenticated,
    })
}

fn parse_listen(value: &str) -> Result<SocketAddr, GatewayCmdError> {
    value.parse().map_err(|_| GatewayCmdError::Listen {
        value: value.to_owned(),
        reason: "expected IP:PORT, like 127.0.0.1:3128 or [::1]:3128".into(),
    })
}

fn parse_upstream(value: &str) -> Result<SocketAddr, GatewayCmdError> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(addr);
    }
    value
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| GatewayCmdError::UpstreamDns(value.to_owned()))
}

/// Session names end up in `key=value` lines and in the audit's user column: keep them to a
/// plain, printable alphabet.
fn check_session_name(name: &str) -> Result<(), GatewayCmdError> {
    let bad = |reason: &str| GatewayCmdError::SessionName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.chars().count() > MAX_SESSION_NAME {
        return Err(bad(&format!("longer than {MAX_SESSION_NAME} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(bad(&format!(
            "{c:?} is not allowed (letters, digits, '.', '_', '-', '@')"
        )));
    }
    Ok(())
}

/// One session the gateway issued a token for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSession {
    pub info: SessionInfo,
    pub token: String,
}

impl IssuedSession {
    /// The line clients read: `session=… user=… token=… proxy=http://cordon:…@ADDR`.
    pub fn line(&self, listen: SocketAddr) -> String {
        format!(
            "session={} user={} token={} proxy=http://{}:{}@{}",
            self.info.id,
            self.info.user,
            self.token,
            cordon_gateway::TOKEN_USER,
            self.token,
            listen
        )
    }

    fn attribution(&self) -> Attribution {
        Attribution {
            session_id: self.info.id.clone(),
            user_id: self.info.user.clone(),
            code_sha256: self.info.code_sha256.clone(),
        }
    }
}

/// Runs `cordon gateway`; returns the exit status.
pub fn run(args: GatewayArgs) -> i32 {
    match execute(&args) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "cordon: {e}");
            e.exit_code()
        }
    }
}

fn execute(args: &GatewayArgs) -> Result<(), GatewayCmdError> {
    let text = match &args.policy {
        Some(path) => Some((
            path.clone(),
            std::fs::read_to_string(path).map_err(|source| GatewayCmdError::PolicyRead {
                path: path.clone(),
                source,
            })?,
        )),
        None => None,
    };
    let plan = plan(
        args,
        text.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        &invoking_user(),
    )?;
    serve(plan)
}

use crate::cli::invoking_user;

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, GatewayCmdError> {
    std::net::TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            GatewayCmdError::AddrInUse { addr }
        } else {
            GatewayCmdError::Bind { addr, source }
        }
    })
}

/// Writes `text` to `path` as a new mode-0600 file: written beside it under a temporary name
/// and renamed into place, so the tokens are never in a file anyone else can read.
fn write_private(path: &Path, text: &str) -> Result<(), std::io::Error> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Why the serving loop ended.
enum Stop {
    Signal(&'static str),
    ServeEnded(Result<(), GatewayCmdError>),
}

fn serve(plan: GatewayPlan) -> Result<(), GatewayCmdError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("cordon-gateway");
    if let Some(n) = plan.threads {
        builder.worker_threads(n);
    }
    let rt = builder.build().map_err(GatewayCmdError::Runtime)?;

    // Handlers first: a stop signal that arrives while we start up is acted on, not fatal.
    let (mut sigterm, mut sigint) = {
        let _guard = rt.enter();
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| GatewayCmdError::Signal { name, source })
        };
        (
            install(SignalKind::terminate(), "SIGTERM")?,
            install(SignalKind::interrupt(), "SIGINT")?,
        )
    };

    let listener = bind(plan.listen)?;
    let listen = listener
        .local_addr()
        .map_err(|source| GatewayCmdError::Bind {
            addr: plan.listen,
            source,
        })?;
    let mut config =
        GatewayConfig::standalone(plan.policy.network.clone(), plan.policy.detect.clone());
    if !plan.upstream_dns.is_empty() {
        config.upstream = Upstream::Nameservers(plan.upstream_dns.clone());
    }
    config.max_unauthenticated = plan.max_unauthenticated;
    let gateway = {
        let _guard = rt.enter();
        Gateway::new(config)?
    };
    let audit_path = match &plan.audit {
        Some(p) => p.clone(),
        None => cordon_audit::default_path()?,
    };
    let writer =
        Arc::new(
            AuditWriter::open(&audit_path).map_err(|source| GatewayCmdError::AuditOpen {
                path: audit_path.clone(),
                source: Box::new(source),
            })?,
        );

    let code_sha256 = cordon_audit::sha256_hex(CODE_MARKER);
    let mut sessions = Vec::with_capacity(plan.sessions.len());
    for name in &plan.sessions {
        let info = SessionInfo {
            id: crate::ids::new_session_id(),
            user: name.clone(),
            code_sha256: code_sha256.clone(),
        };
        let token = gateway.issue_token(info.clone())?;
        sessions.push(IssuedSession { info, token });
    }
    let lines: String = sessions.iter().map(|s| s.line(listen) + "\n").collect();
    if let Some(path) = &plan.token_file {
        write_private(path, &lines).map_err(|source| GatewayCmdError::TokenFile {
            path: path.clone(),
            source,
        })?;
    }
    let start_detail = |listen: SocketAddr| {
        let mut m = serde_json::Map::new();
        m.insert(
            "gateway".into(),
            serde_json::json!({
                "listen": listen.to_string(),
                "network": &plan.policy.network,
                "detect": &plan.policy.detect,
            }),
        );
        m
    };
    for s in &sessions {
        writer.record(s.attribution().session_start(&[], start_detail(listen)));
    }
    if plan.token_file.is_none() {
        let mut out = std::io::stdout().lock();
        out.write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .map_err(GatewayCmdError::Stdout)?;
    }
    // stderr may be closed (a supervisor that only reads stdout): never fail on it.
    let _ = writeln!(
        std::io::stderr(),
        "cordon: gateway listening on {listen} ({} session{}{}; audit {})",
        sessions.len(),
        if sessions.len() == 1 { "" } else { "s" },
        plan.token_file
            .as_ref()
            .map(|p| format!(", tokens in {}", p.display()))
            .unwrap_or_default(),
        audit_path.display()
    );

    let sink: Arc<dyn cordon_gateway::EventSink> =
        Arc::new(crate::audit_sink::AuditSink::new(writer.clone()));
    let cancel = CancellationToken::new();
    let mut terminate = gateway.take_terminate_receiver();
    let mut ended: Vec<(SessionInfo, String)> = Vec::new();

    let stop = rt.block_on(async {
        let mut served = tokio::spawn({
            let (gateway, cancel) = (gateway.clone(), cancel.clone());
            let listeners = Listeners {
                http: Some(listener),
                ..Listeners::default()
            };
            async move { gateway.serve(listeners, sink, cancel).await }
        });
        let stop = loop {
            tokio::select! {
                _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
                _ = sigint.recv() => break Stop::Signal("SIGINT"),
                Some(req) = recv_terminate(&mut terminate) => {
                    end_session(&gateway, &sessions, &writer, &req);
                    ended.push((req.session, req.reason));
                }
                r = &mut served => break Stop::ServeEnded(task_result(r)),
            }
        };
        cancel.cancel();
        if let Stop::Signal(_) = stop {
            match tokio::time::timeout(SHUTDOWN_GRACE, served).await {
                Ok(r) => {
                    if let Err(e) = task_result(r) {
                        return Stop::ServeEnded(Err(e));
                    }
                }
                Err(_) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "cordon: connections still open after {}s; closing them",
                        SHUTDOWN_GRACE.as_secs()
                    );
                }
            }
        }
        stop
    });
    // Drops whatever connection task outlived the grace period (and with it the sink's clone
    // of the writer), so the writer can be closed below.
    rt.shutdown_timeout(Duration::from_secs(1));

    let (why, result) = match stop {
        Stop::Signal(name) => (format!("gateway stopped by {name}"), Ok(())),
        Stop::ServeEnded(r) => ("gateway stopped".to_owned(), r),
    };
    for s in &sessions {
        if ended.iter().any(|(info, _)| info.id == s.info.id) {
            continue;
        }
        let mut detail = serde_json::Map::new();
        detail.insert("reason".into(), serde_json::json!(why));
        writer.record(s.attribution().session_end(None, None, detail));
    }
    let closed = match Arc::try_unwrap(writer) {
        Ok(w) => w.close().map(drop),
        Err(w) => w.flush(),
    };
    // A long-lived gateway leaves a long write-ahead log: fold it in for the next opener.
    let _ = cordon_audit::Store::checkpoint_if_wal_over(&audit_path, cordon_audit::WAL_TIDY_BYTES);
    result?;
    closed?;
    Ok(())
}

async fn recv_terminate(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<TerminateRequest>>,
) -> Option<TerminateRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn task_result(
    r: Result<
        Result<cordon_gateway::GatewayStats, cordon_gateway::GatewayError>,
        tokio::task::JoinError,
    >,
) -> Result<(), GatewayCmdError> {
    match r {
        Ok(Ok(_stats)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(GatewayCmdError::Task(e.to_string())),
    }
}

/// A session the gateway asked to end: its token stops working and its end is recorded.
fn end_session(
    gateway: &Gateway,
    sessions: &[IssuedSession],
    writer: &AuditWriter,
    req: &TerminateRequest,
) {
    let Some(s) = sessions.iter().find(|s| s.info.id == req.session.id) else {
        return;
    };
    gateway.revoke_token(&s.token);
    let _ = writeln!(
        std::io::stderr(),
        "cordon: session {} ({}) terminated: {}; its token is revoked",
        s.info.id,
        s.info.user,
        req.reason
    );
    let mut detail = serde_json::Map::new();
    detail.insert("terminated".into(), serde_json::json!(req.reason));
    writer.record(s.attribution().session_end(None, None, detail));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(listen: &str) -> GatewayArgs {
        GatewayArgs {
            listen: listen.into(),
            ..GatewayArgs::default()
        }
    }

    #[test]
    fn the_default_plan_is_one_session_for_the_invoking_user_and_default_deny() {
        let p = plan(&args("127.0.0.1:3128"), None, "alice").unwrap();
        assert_eq!(p.listen, "127.0.0.1:3128".parse().unwrap());
        assert_eq!(p.sessions, vec!["alice".to_owned()]);
        assert!(p.policy.network.allow.is_empty());
        assert!(p.policy.network.allow_private.is_empty());
        assert_eq!(p.upstream_dns, Vec::<SocketAddr>::new());
        assert_eq!(p.audit, None);
        assert_eq!(p.token_file, None);
    }

    #[test]
    fn flags_are_added_to_the_policy_file() {
        let text =
            "[network]\nallow = [\"api.github.com\"]\nallow_private = [\"127.0.0.1/32:*\"]\n";
        let mut a = args("[::1]:0");
        a.allow = vec!["example.com:8443".into()];
        a.mode = Some("report".into());
        a.sessions = vec!["ci".into(), "agent-7".into()];
        a.upstream_dns = vec!["127.0.0.1".into(), "127.0.0.1:5353".into()];
        let p = plan(&a, Some((Path::new("p.toml"), text)), "alice").unwrap();
        let allow: Vec<String> = p
            .policy
            .network
            .allow
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(allow, vec!["api.github.com", "example.com:8443"]);
        assert_eq!(p.policy.network.allow_private.len(), 1);
        assert_eq!(p.policy.network.mode, cordon_policy::Enforcement::Report);
        assert_eq!(p.sessions, vec!["ci".to_owned(), "agent-7".to_owned()]);
        assert_eq!(
            p.upstream_dns,
            vec![
                "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        assert_eq!(p.listen, "[::1]:0".parse().unwrap());
    }

    #[test]
    fn interception_policies_are_refused_by_the_standalone_gateway() {
        let base = "[network]\nallow = [\"api.github.com\"]\n";
        for (extra, what) in [
            (
                "[[credentials]]\nname = \"gh\"\nhosts = [\"api.github.com\"]\nheader = \"Authorization\"\nfrom_env = \"T\"\n",
                "[[credentials]]",
            ),
            (
                "[[network.rules]]\nhost = \"api.github.com\"\nmethods = [\"GET\"]\n",
                "[[network.rules]]",
            ),
        ] {
            let text = format!("{base}{extra}");
            let e = plan(&args("127.0.0.1:0"), Some((Path::new("p.toml"), &text)), "alice")
                .unwrap_err();
            assert!(e.to_string().starts_with(what), "{e}");
            assert!(e.to_string().contains("use the policy with `cordon run`"), "{e}");
        }
        let text = "[network]\nallow = [\"api.github.com\"]\nintercept = [\"api.github.com\"]\n";
        let e = plan(
            &args("127.0.0.1:0"),
            Some((Path::new("p.toml"), text)),
            "alice",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("network.intercept"), "{e}");
    }

    #[test]
    fn bad_flags_are_usage_errors_that_name_the_flag() {
        let cases: Vec<(GatewayArgs, &str)> = vec![
            (args("localhost:3128"), "--listen \"localhost:3128\""),
            (args("127.0.0.1"), "--listen \"127.0.0.1\""),
            (
                GatewayArgs {
                    allow: vec!["exa mple.com".into()],
                    ..args("127.0.0.1:1")
                },
                "--allow",
            ),
            (
                GatewayArgs {
                    mode: Some("loud".into()),
                    ..args("127.0.0.1:1")
                },
                "--mode",
            ),
            (
                GatewayArgs {
                    sessions: vec!["a b".into()],
                    ..args("127.0.0.1:1")
                },
                "--session \"a b\"",
            ),
            (
                GatewayArgs {
                    sessions: vec![String::new()],
                    ..args("127.0.0.1:1")
                },
                "--session \"\": empty",
            ),
            (
                GatewayArgs {
                    sessions: vec!["x".repeat(65)],
                    ..args("127.0.0.1:1")
                },
                "longer than 64",
            ),
            (
                GatewayArgs {
                    upstream_dns: vec!["dns.google".into()],
                    ..args("127.0.0.1:1")
                },
                "--upstream-dns \"dns.google\"",
            ),
            (
                GatewayArgs {
                    threads: Some(0),
                    ..args("127.0.0.1:1")
                },
                "--threads 0",
            ),
            (
                GatewayArgs {
                    max_unauthenticated: Some(0),
                    ..args("127.0.0.1:1")
                },
                "--max-unauthenticated 0",
            ),
            (
                GatewayArgs {
                    token_file: Some(PathBuf::from("/")),
                    ..args("127.0.0.1:1")
                },
                "--token-file /",
            ),
        ];
        for (a, expected) in cases {
            let e = plan(&a, None, "alice").unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().contains(expected), "{e} !~ {expected}");
        }
    }

    #[test]
    fn a_bad_policy_file_is_a_usage_error_with_its_location() {
        let e = plan(
            &args("127.0.0.1:1"),
            Some((Path::new("p.toml"), "[network]\nalow = []\n")),
            "alice",
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(msg.contains("p.toml") && msg.contains("alow"), "{msg}");
    }

    #[test]
    fn a_session_line_carries_the_token_in_a_proxy_url() {
        let s = IssuedSession {
            info: SessionInfo {
                id: "01ABC".into(),
                user: "ci".into(),
                code_sha256: "00".into(),
            },
            token: "tok_en-1".into(),
        };
        assert_eq!(
            s.line("127.0.0.1:3128".parse().unwrap()),
            "session=01ABC user=ci token=tok_en-1 proxy=http://cordon:tok_en-1@127.0.0.1:3128"
        );
    }

    #[test]
    fn a_listen_address_in_use_is_named_as_such() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("address already in use"), "{e}");
    }

    #[test]
    fn the_token_file_is_created_private_and_replaces_an_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, "new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
