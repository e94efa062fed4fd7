//! Command-line interface.
//!
//! Guarantees: every bad flag or file is one line on stderr prefixed `cordon:` and exit status
//! 125 (cordon failed) for `run`, like `env` and container runtimes; 126/127 mean the command
//! could not be executed / was not found in the sandbox; any other status is the command's own
//! (128 + N for a signal).

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use cordon_policy::{Overrides, Policy};
use sha2::{Digest, Sha256};

use crate::session::{self, RunError, RunRequest};

#[derive(Parser)]
#[command(
    name = "cordon",
    version,
    about = "Run untrusted code in a sandbox with no network of its own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command (or --code FILE) in a fresh sandbox.
    Run(Box<RunArgs>),
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Check the host's support for every layer and run a self-test sandbox.
    Doctor,
    /// Read, verify and prune the audit store.
    Audit(crate::audit_cmd::AuditArgs),
    /// Run the egress gateway alone, as an HTTP/CONNECT proxy with per-session tokens.
    Gateway(crate::gateway_cmd::GatewayArgs),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file and print the effective policy.
    Check { file: PathBuf },
}

#[derive(Args)]
struct RunArgs {
    /// Policy file (TOML); flags override it.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Host directory mounted read-write at /workspace (created if missing). Default: a fresh
    /// throwaway workspace.
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Memory limit, swap included (e.g. 512M).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Maximum number of processes and threads.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// CPU quota in cores (e.g. 0.5).
    #[arg(long, value_name = "CORES", allow_negative_numbers = true)]
    cpu: Option<f64>,
    /// Wall-clock timeout (e.g. 10s, 2m).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
    /// Maximum open files.
    #[arg(long, value_name = "N")]
    nofile: Option<u64>,
    /// Size cap of /tmp.
    #[arg(long, value_name = "SIZE")]
    tmp_size: Option<String>,
    /// Size cap of /workspace.
    #[arg(long, value_name = "SIZE")]
    workspace_size: Option<String>,
    /// Largest file the command may write.
    #[arg(long, value_name = "SIZE")]
    file_size: Option<String>,
    /// Allow a destination through the egress gateway (HOST, HOST:PORT, *.SUFFIX, IP/CIDR).
    #[arg(long, value_name = "HOST")]
    allow: Vec<String>,
    /// Network mode: none or gateway.
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
    /// Gateway enforcement: enforce or report.
    #[arg(long, value_name = "MODE")]
    mode: Option<String>,
    /// Extra environment variable for the sandbox (NAME=VALUE).
    #[arg(long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Keep the caller's terminal as the command's controlling terminal.
    #[arg(long)]
    tty: bool,
    /// Host uid the sandbox user maps to when cordon runs as root.
    #[arg(long, value_name = "UID")]
    host_uid: Option<u32>,
    /// Host gid the sandbox group maps to when cordon runs as root.
    #[arg(long, value_name = "GID")]
    host_gid: Option<u32>,
    /// A layer that may be missing (landlock, seccomp, cgroups, workspace_cap).
    #[arg(long, value_name = "LAYER")]
    allow_missing: Vec<String>,
    /// Run the code in FILE (or - for stdin) with --interpreter.
    #[arg(long, value_name = "FILE")]
    code: Option<PathBuf>,
    /// Interpreter for --code (default from the file's extension).
    #[arg(long, value_name = "PROGRAM")]
    interpreter: Option<String>,
    /// Print the result object as one JSON line on stderr after the command's output.
    #[arg(long)]
    json: bool,
    /// Write the result object to FILE instead.
    #[arg(long, value_name = "FILE")]
    result: Option<PathBuf>,
    /// User id recorded for the session (default: the invoking user).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Audit store (SQLite; default /var/lib/cordon/audit.db as root, else
    /// ~/.local/state/cordon/audit.db).
    #[arg(long, value_name = "PATH")]
    audit: Option<PathBuf>,
    /// Also forward audit events live to a syslog receiver (RFC 5424): udp://ADDR:PORT or
    /// tcp://ADDR:PORT, with an IP address.
    #[arg(long, value_name = "URL")]
    syslog: Option<String>,
    /// Forward only events at least this severe: info (all), notice, warning, high, critical.
    #[arg(long, value_name = "LEVEL")]
    syslog_min_severity: Option<String>,
    /// DNS server the gateway asks for real addresses (default: the host's resolv.conf).
    #[arg(long, value_name = "ADDR")]
    upstream_dns: Vec<std::net::SocketAddr>,
    /// Also trust the CA certificates in FILE (PEM) when verifying upstream servers of
    /// intercepted TLS, besides the host's trust store. Meant for tests with fake upstreams.
    #[arg(long, value_name = "FILE")]
    upstream_ca: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Parses the command line and runs; returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // `cordon audit` follows the usual convention (2 = usage); `cordon run` reserves
            // 1..=124 for the command, so its own usage errors are 125.
            let audit = std::env::args_os()
                .nth(1)
                .is_some_and(|a| a == "audit" || a == "gateway");
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ if audit => 2,
                _ => 125,
            };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => policy_check(&file),
        Command::Doctor => crate::doctor::doctor(),
        Command::Audit(args) => crate::audit_cmd::run(args),
        Command::Gateway(args) => crate::gateway_cmd::run(args),
    }
}

fn fail(code: i32, message: impl std::fmt::Display) -> i32 {
    eprintln!("cordon: {message}");
    code
}

/// Loads the policy file (if any) and applies the flags.
fn load_policy(args: &RunArgs) -> Result<Policy, String> {
    let mut policy = match &args.policy {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Policy::from_toml_str(&text, Some(&path.display().to_string()))
                .map_err(|e| e.to_string())?
        }
        None => Policy::default(),
    };
    let overrides = Overrides {
        workspace: args.workspace.clone(),
        timeout: args.timeout.clone(),
        memory: args.memory.clone(),
        pids: args.pids,
        cpu: args.cpu,
        nofile: args.nofile,
        tmp: args.tmp_size.clone(),
        workspace_size: args.workspace_size.clone(),
        file_size: args.file_size.clone(),
        allow: args.allow.clone(),
        network: args.network.clone(),
        env: args.env.clone(),
        tty: args.tty.then_some(true),
        host_uid: args.host_uid,
        host_gid: args.host_gid,
        allow_missing: args.allow_missing.clone(),
        mode: args.mode.clone(),
        syslog: args.syslog.clone(),
        syslog_min_severity: args.syslog_min_severity.clone(),
    };
    policy.apply(&overrides).map_err(|e| e.to_string())?;
    Ok(policy)
}

fn interpreter_for(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.').map(|(_, e)| e)?;
    Some(match ext {
        "py" => "python3",
        "sh" => "sh",
        "bash" => "bash",
        "js" | "mjs" => "node",
        "rb" => "ruby",
        "pl" => "perl",
        _ => return None,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The argv to run, the code file and its hash.
type Command_ = (Vec<String>, Option<(String, Vec<u8>)>, String);

fn command_of(args: &RunArgs) -> Result<Command_, String> {
    let Some(code) = &args.code else {
        if args.interpreter.is_some() {
            return Err("--interpreter needs --code FILE".into());
        }
        if args.command.is_empty() {
            return Err(
                "no command given: cordon run [OPTIONS] -- COMMAND [ARGS...] (or --code FILE)"
                    .into(),
            );
        }
        let joined = args.command.join("\0");
        return Ok((
            args.command.clone(),
            None,
            hex(&Sha256::digest(joined.as_bytes())),
        ));
    };
    let (name, bytes) = if code.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| format!("--code -: reading stdin: {e}"))?;
        ("code".to_string(), buf)
    } else {
        let bytes = std::fs::read(code).map_err(|e| format!("--code {}: {e}", code.display()))?;
        let name = code
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .unwrap_or_else(|| "code".into());
        (name, bytes)
    };
    let interpreter = match (&args.interpreter, interpreter_for(&name)) {
        (Some(i), _) => i.clone(),
        (None, Some(i)) => i.to_string(),
        (None, None) => {
            return Err(format!(
            "--code {}: cannot tell the interpreter from the file name; pass --interpreter PROGRAM",
            code.display()
        ))
        }
    };
    let mut argv = vec![
        interpreter,
        cordon_sandbox::plan::code_path(&name).display().to_string(),
    ];
    argv.extend(args.command.iter().cloned());
    let sha = hex(&Sha256::digest(&bytes));
    Ok((argv, Some((name, bytes)), sha))
}

/// The invoking user's name from `/etc/passwd` (read directly: going through NSS would load
/// shared libraries on every start), or the uid as a number.
pub(crate) fn invoking_user() -> String {
    // SAFETY: getuid has no failure mode.
    let uid = unsafe { libc::getuid() };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut f = line.split(':');
                let name = f.next()?;
                let id = f.nth(1)?.parse::<u32>().ok()?;
                (id == uid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

/// Writes the result line where `--result` or `--json` asks for it.
fn emit_result(args: &RunArgs, line: &str) {
    if let Some(path) = &args.result {
        if let Err(e) = std::fs::write(path, format!("{line}\n")) {
            eprintln!("cordon: --result {}: {e}", path.display());
        }
    } else if args.json {
        let _ = std::io::stdout().flush();
        eprintln!("{line}");
    }
}

/// What a failed run's result object can say of the session.
struct Known {
    session_id: String,
    user: String,
    argv: Vec<String>,
    code_sha256: String,
}

/// cordon's own failure (125), as its one-line message and, with `--json`/`--result`, a result
/// object that a program can parse like any other: `exit_status` and `error`, plus what was
/// known of the session when it failed.
fn fail_run(args: &RunArgs, known: Option<&Known>, code: i32, message: String) -> i32 {
    let code = fail(code, &message);
    if args.json || args.result.is_some() {
        let object = serde_json::json!({
            "session_id": known.map(|r| r.session_id.as_str()),
            "user": known.map(|r| r.user.as_str()),
            "command": known.map(|r| r.argv.clone()).unwrap_or_else(|| args.command.clone()),
            "code_sha256": known.map(|r| r.code_sha256.as_str()),
            "exit_status": code,
            "error": message,
        });
        emit_result(args, &object.to_string());
    }
    code
}

fn run(args: RunArgs) -> i32 {
    let policy = match load_policy(&args) {
        Ok(p) => p,
        Err(e) => return fail_run(&args, None, 125, e),
    };
    let (argv, code, code_sha256) = match command_of(&args) {
        Ok(c) => c,
        Err(e) => return fail_run(&args, None, 125, e),
    };
    let req = RunRequest {
        policy,
        argv,
        code,
        code_sha256,
        user: args.user.clone().unwrap_or_else(invoking_user),
        session_id: crate::ids::new_session_id(),
        audit: args.audit.clone(),
        upstream_dns: args.upstream_dns.clone(),
        upstream_ca: args.upstream_ca.clone(),
    };
    let known = Known {
        session_id: req.session_id.clone(),
        user: req.user.clone(),
        argv: req.argv.clone(),
        code_sha256: req.code_sha256.clone(),
    };
    match session::run(req) {
        Ok(result) => {
            if let Some(error) = &result.error {
                eprintln!("cordon: {error}");
            }
            emit_result(&args, &serde_json::to_string(&result).unwrap_or_default());
            if let Some(limit) = result.limit {
                if !args.json {
                    eprintln!(
                        "cordon: session {} hit the {} limit",
                        result.session_id,
                        serde_json::to_value(limit)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    );
                }
            }
            result.exit_status
        }
        Err(RunError { exit_code, message }) => fail_run(&args, Some(&known), exit_code, message),
    }
}

fn policy_check(file: &std::path::Path) -> i32 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return fail(1, format!("{}: {e}", file.display())),
    };
    match Policy::from_toml_str(&text, Some(&file.display().to_string())) {
        Ok(p) => {
            print!("{}", p.to_toml_string());
            0
        }
        Err(e) => fail(1, e),
    }
}
