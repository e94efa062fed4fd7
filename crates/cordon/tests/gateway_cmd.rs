//! `cordon gateway` end to end, loopback only: the real binary is started with a policy that
//! allows a fake origin on 127.0.0.1 (through `allow_private`, since loopback is blocked
//! otherwise), curl goes through it with and without the token it printed, then the gateway is
//! stopped by pid and the audit store must hold every event with its attribution.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cordon_audit::{EventFilter, EventKind, EventRecord, Store, Verdict};

fn cordon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cordon"));
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c
}

/// A tiny HTTP origin on 127.0.0.1: answers every request with `hello from origin` and counts
/// the requests it saw, so a test can tell whether anything reached it.
struct Origin {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
}

impl Origin {
    fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let counter = counter.clone();
                std::thread::spawn(move || serve_origin(stream, &counter));
            }
        });
        Origin { addr, hits }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

fn serve_origin(stream: TcpStream, hits: &AtomicU64) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        // One request head per iteration; the gateway keeps upstream connections alive.
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
        }
        hits.fetch_add(1, Ordering::SeqCst);
        let body = "hello from origin";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// One running `cordon gateway`; killed by pid if a test ends without stopping it.
struct Gw {
    child: Child,
    /// `session=… user=… token=… proxy=…` lines, parsed.
    sessions: Vec<Line>,
    listen: SocketAddr,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone)]
struct Line {
    session: String,
    user: String,
    token: String,
    proxy: String,
}

fn parse_line(line: &str) -> Line {
    let field = |key: &str| {
        line.split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
            .to_owned()
    };
    Line {
        session: field("session"),
        user: field("user"),
        token: field("token"),
        proxy: field("proxy"),
    }
}

fn policy_for(origin: &Origin, extra: &str) -> String {
    format!(
        "[network]\nallow_private = [\"127.0.0.1/32:{}\"]\n{extra}",
        origin.addr.port()
    )
}

impl Gw {
    /// Starts the gateway on a free loopback port with `policy` and `flags`, and reads the
    /// `expected` token lines from stdout (or from `--token-file`, when `token_file` is set).
    fn start(policy: &str, flags: &[&str], expected: usize, token_file: bool) -> Gw {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).unwrap();
        let audit = dir.path().join("audit.db");
        let tokens = dir.path().join("tokens");
        let mut cmd = cordon();
        cmd.args(["gateway", "--listen", "127.0.0.1:0", "--threads", "2"])
            .arg("--policy")
            .arg(&policy_path)
            .arg("--audit")
            .arg(&audit)
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if token_file {
            cmd.arg("--token-file").arg(&tokens);
        }
        let mut child = KillOnDrop(Some(cmd.spawn().unwrap()));
        let stdout = child.get().stdout.take().unwrap();
        let stderr = child.get().stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let out_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = out_tx.send(format!("out:{line}"));
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(format!("err:{line}"));
            }
        });
        // stdout carries the tokens; stderr the one "listening" line once everything is up.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut printed = Vec::new();
        let mut ready = false;
        // The two pipes are read by two threads: either line may arrive first.
        while !(ready && (token_file || printed.len() >= expected)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with("out:") => printed.push(l[4..].to_owned()),
                Ok(l) if l.starts_with("err:cordon: gateway listening on ") => ready = true,
                Ok(l) => panic!("unexpected output from cordon gateway: {l}"),
                Err(_) => panic!("cordon gateway did not start; printed {printed:?}"),
            }
        }
        if token_file {
            assert!(printed.is_empty(), "tokens went to the file, not stdout");
            let meta = std::fs::metadata(&tokens).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            printed = std::fs::read_to_string(&tokens)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
        }
        // Later stdout/stderr lines are not expected; keep draining so the child never blocks.
        std::thread::spawn(move || for _ in rx {});
        assert_eq!(printed.len(), expected, "{printed:?}");
        let sessions: Vec<Line> = printed.iter().map(|l| parse_line(l)).collect();
        let listen: SocketAddr = sessions[0]
            .proxy
            .rsplit_once('@')
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert_ne!(listen.port(), 0, "the real port is printed");
        Gw {
            child: child.take(),
            sessions,
            listen,
            audit,
            _dir: dir,
        }
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "cordon gateway did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn events(&self, session: &str) -> Vec<EventRecord> {
        let store = Store::open_existing(&self.audit).unwrap();
        store
            .events(&EventFilter {
                session: Some(session.to_owned()),
                ..EventFilter::default()
            })
            .unwrap()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills the child by pid if a test panics before [`Gw`] owns it.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn get(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
    fn take(&mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// `curl -x PROXY URL`, returning the final response's status, head and body.
fn curl(proxy: &str, url: &str) -> Reply {
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "-x",
            proxy,
            url,
        ])
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .output()
        .expect("curl is installed (scripts/deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response from curl: {text:?} {out:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn kinds(events: &[EventRecord]) -> Vec<EventKind> {
    events.iter().map(|r| r.event.kind).collect()
}

#[test]
fn requests_with_the_printed_token_reach_an_allowed_origin_and_everything_is_audited() {
    let origin = Origin::start();
    // A second origin that the policy does not name: it must never see a request.
    let other = Origin::start();
    let mut gw = Gw::start(&policy_for(&origin, ""), &[], 1, false);
    let s = gw.sessions[0].clone();
    assert_eq!(s.session.len(), 26, "a ULID session id: {s:?}");
    assert_eq!(
        s.proxy,
        format!("http://cordon:{}@{}", s.token, gw.listen),
        "the proxy URL embeds the token"
    );
    let url = format!("http://127.0.0.1:{}/hello", origin.addr.port());

    // With the token: through to the origin.
    let ok = curl(&s.proxy, &url);
    assert_eq!(ok.status, 200, "{}", ok.head);
    assert_eq!(ok.body, "hello from origin");
    assert_eq!(origin.hits(), 1);

    // Without a token, or with a wrong one: 407, and the origin sees nothing.
    let no_token = curl(&format!("http://{}", gw.listen), &url);
    assert_eq!(no_token.status, 407, "{}", no_token.head);
    let wrong = curl(&format!("http://cordon:not-a-token@{}", gw.listen), &url);
    assert_eq!(wrong.status, 407, "{}", wrong.head);
    assert_eq!(origin.hits(), 1);

    // A host not in the allowlist, and a loopback port not in allow_private: 403 with a reason.
    let name = curl(&s.proxy, "http://example.com/");
    assert_eq!(name.status, 403, "{}", name.head);
    assert_eq!(
        header(&name, "x-cordon-reason"),
        Some("host example.com is not in the allowlist")
    );
    let other_url = format!("http://127.0.0.1:{}/", other.addr.port());
    let private = curl(&s.proxy, &other_url);
    assert_eq!(private.status, 403, "{}", private.head);
    let reason = header(&private, "x-cordon-reason").unwrap();
    assert!(reason.contains("127.0.0.1"), "{reason}");
    assert_eq!(other.hits(), 0, "the refused origin saw nothing");
    // Control: the same origin is reachable directly, so the refusal was the gateway's.
    let direct = Command::new("curl")
        .args(["-s", "--max-time", "10", "--noproxy", "*", &other_url])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "hello from origin");
    assert_eq!(other.hits(), 1);

    let status = gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM: {status:?}");

    let events = gw.events(&s.session);
    assert!(events.iter().all(|r| r.event.session_id == s.session
        && r.event.user_id == s.user
        && r.event.code_sha256 == cordon_audit::sha256_hex(b"gateway")));
    assert_eq!(
        kinds(&events),
        vec![
            EventKind::SessionStart,
            EventKind::HttpRequest,
            EventKind::Blocked,
            EventKind::Blocked,
            EventKind::SessionEnd
        ],
        "{events:#?}"
    );
    let req = &events[1].event;
    assert_eq!(req.verdict, Some(Verdict::Allow));
    assert_eq!(req.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(req.port, Some(origin.addr.port()));
    assert_eq!(req.method.as_deref(), Some("GET"));
    assert_eq!(req.path.as_deref(), Some("/hello"));
    let blocked_name = &events[2].event;
    assert_eq!(blocked_name.verdict, Some(Verdict::Block));
    assert_eq!(blocked_name.host.as_deref(), Some("example.com"));
    assert_eq!(
        blocked_name.reason.as_deref(),
        Some("host example.com is not in the allowlist")
    );
    assert_eq!(events[3].event.port, Some(other.addr.port()));
    assert_eq!(events[3].event.reason.as_deref(), Some(reason));
    // The requests without a valid token are on record too, as unauthenticated.
    let unauth = gw.events("unauthenticated");
    assert_eq!(unauth.len(), 2, "{unauth:#?}");
    assert!(unauth.iter().all(
        |r| r.event.kind == EventKind::Blocked && r.event.rule.as_deref() == Some("proxy-auth")
    ));

    // The same through the CLI a person would use.
    let out = cordon()
        .args(["audit", "--audit"])
        .arg(&gw.audit)
        .args(["events", &s.session, "--blocked", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines
        .iter()
        .all(|l| l["session_id"] == s.session.as_str() && l["user_id"] == s.user.as_str()));
    let verify = cordon()
        .args(["audit", "--audit"])
        .arg(&gw.audit)
        .arg("verify")
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn each_named_session_gets_its_own_token_and_attribution() {
    let origin = Origin::start();
    let mut gw = Gw::start(
        &policy_for(&origin, ""),
        &["--session", "ci", "--session", "agent-7"],
        2,
        /*token_file*/ true,
    );
    let (ci, agent) = (gw.sessions[0].clone(), gw.sessions[1].clone());
    assert_eq!((ci.user.as_str(), agent.user.as_str()), ("ci", "agent-7"));
    assert_ne!(ci.token, agent.token);
    assert_ne!(ci.session, agent.session);
    let url = format!("http://127.0.0.1:{}/a", origin.addr.port());
    assert_eq!(curl(&ci.proxy, &url).status, 200);
    assert_eq!(curl(&agent.proxy, &url).status, 200);
    assert_eq!(curl(&agent.proxy, &url).status, 200);
    // Bearer works as well as Basic.
    let bearer = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--noproxy", "", "-x", &format!("http://{}", gw.listen)])
        .args([
            "--proxy-header",
            &format!("Proxy-Authorization: Bearer {}", ci.token),
        ])
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&bearer.stdout), "200");

    let status = gw.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "clean exit on SIGINT: {status:?}");
    let requests = |s: &Line| {
        gw.events(&s.session)
            .iter()
            .filter(|r| r.event.kind == EventKind::HttpRequest && r.event.user_id == s.user)
            .count()
    };
    assert_eq!(requests(&ci), 2);
    assert_eq!(requests(&agent), 2);
    for s in [&ci, &agent] {
        let k = kinds(&gw.events(&s.session));
        assert_eq!(k.first(), Some(&EventKind::SessionStart));
        assert_eq!(k.last(), Some(&EventKind::SessionEnd));
    }
}

#[test]
fn a_session_that_reaches_its_blocked_threshold_loses_its_token() {
    let origin = Origin::start();
    let mut gw = Gw::start(
        &policy_for(&origin, "[response]\nterminate_after_blocked = 2\n"),
        &["--session", "noisy", "--session", "calm"],
        2,
        false,
    );
    let (noisy, calm) = (gw.sessions[0].clone(), gw.sessions[1].clone());
    let url = format!("http://127.0.0.1:{}/", origin.addr.port());
    assert_eq!(curl(&noisy.proxy, &url).status, 200);
    assert_eq!(curl(&noisy.proxy, "http://evil.example/").status, 403);
    assert_eq!(curl(&noisy.proxy, "http://evil.example/").status, 403);
    // The revocation happens on the supervisor's side of a channel: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&noisy.proxy, &url).status != 407 {
        assert!(Instant::now() < deadline, "the token was never revoked");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The other session is untouched.
    assert_eq!(curl(&calm.proxy, &url).status, 200);

    assert_eq!(gw.signal(nix::sys::signal::Signal::SIGTERM).code(), Some(0));
    let events = gw.events(&noisy.session);
    let ends: Vec<_> = events
        .iter()
        .filter(|r| r.event.kind == EventKind::SessionEnd)
        .collect();
    assert_eq!(ends.len(), 1, "exactly one session_end: {events:#?}");
    assert!(
        ends[0].event.detail["terminated"].is_string(),
        "{:?}",
        ends[0].event.detail
    );
    let calm_events = gw.events(&calm.session);
    assert_eq!(
        calm_events.last().map(|r| r.event.detail["reason"].clone()),
        Some(serde_json::json!("gateway stopped by SIGTERM"))
    );
}

fn run_bad(args: &[&str]) -> (i32, String, String) {
    let out = cordon().arg("gateway").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_policies_are_one_line_errors_that_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.db");
    let audit_s = audit.to_str().unwrap();
    let bad_policy = dir.path().join("bad.toml");
    std::fs::write(&bad_policy, "[network]\nallow = [\"exa mple.com\"]\n").unwrap();
    let missing = dir.path().join("missing.toml");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--listen", "localhost"], "--listen \"localhost\""),
        (vec!["--listen", "127.0.0.1:0", "--allow", "a b"], "--allow"),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--policy",
                bad_policy.to_str().unwrap(),
            ],
            "bad.toml",
        ),
        (
            vec![
                "--listen",
                "127.0.0.1:0",
                "--policy",
                missing.to_str().unwrap(),
            ],
            "missing.toml",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--session", "a;b"],
            "--session",
        ),
        (
            vec!["--listen", "127.0.0.1:0", "--upstream-dns", "nowhere"],
            "--upstream-dns",
        ),
        (vec!["--listen", "127.0.0.1:0", "--mode", "loud"], "--mode"),
        (vec!["--lissen", "127.0.0.1:0"], "--lissen"),
    ];
    for (args, expected) in cases {
        let mut full = args.clone();
        full.extend_from_slice(&["--audit", audit_s]);
        let (code, out, err) = run_bad(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed a token: {out}");
        assert!(err.contains(expected), "{args:?}: {err}");
        if !expected.starts_with("--lissen") {
            assert!(err.starts_with("cordon: "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        assert!(!audit.exists(), "{args:?} created the audit store");
    }
}

#[test]
fn a_listen_address_in_use_is_a_clear_error_before_anything_is_recorded() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.db");
    let (code, out, err) = run_bad(&["--listen", &addr, "--audit", audit.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        format!(
            "cordon: cannot listen on {addr}: address already in use (another proxy is listening there; choose another --listen)"
        )
    );
    assert!(!audit.exists());
    drop(taken);
}

#[test]
fn stopping_with_a_client_connection_still_open_records_its_request() {
    let origin = Origin::start();
    let mut gw = Gw::start(&policy_for(&origin, ""), &[], 1, false);
    let s = gw.sessions[0].clone();
    // A kept-alive client connection that stays open while the gateway is stopped.
    let mut conn = TcpStream::connect(gw.listen).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = {
        // base64("cordon:" + token) by hand, to keep the test free of extra crates.
        b64(format!("cordon:{}", s.token).as_bytes())
    };
    write!(
        conn,
        "GET http://127.0.0.1:{port}/kept HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: Basic {auth}\r\n\r\n",
        port = origin.addr.port()
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    assert_eq!(gw.signal(nix::sys::signal::Signal::SIGTERM).code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    let events = gw.events(&s.session);
    let req = events
        .iter()
        .find(|r| r.event.kind == EventKind::HttpRequest)
        .expect("the request on the open connection is recorded");
    assert_eq!(req.event.path.as_deref(), Some("/kept"));
    assert_eq!(kinds(&events).last(), Some(&EventKind::SessionEnd));
    // The connection was closed by the gateway.
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0);
}

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_stopping_gateway_folds_a_long_write_ahead_log_into_the_store() {
    // Every later opener of the store reads the whole log first: a gateway that wrote many
    // events leaves it folded in and truncated.
    let origin = Origin::start();
    let rate =
        "[network.rate]\nrequests_per_minute = 1000000\nrequests_per_minute_per_host = 1000000\n";
    let mut gw = Gw::start(&policy_for(&origin, rate), &[], 1, false);
    let s = gw.sessions[0].clone();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("urls");
    let url = format!("http://127.0.0.1:{}/many", origin.addr.port());
    std::fs::write(
        &config,
        (0..1500)
            .map(|_| format!("url = \"{url}\"\noutput = \"/dev/null\"\n"))
            .collect::<String>(),
    )
    .unwrap();
    let proxy = format!("http://cordon:{}@{}", s.token, gw.listen);
    let status = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "60",
            "--noproxy",
            "",
            "-x",
            &proxy,
            "-K",
        ])
        .arg(&config)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .status()
        .expect("curl is installed (scripts/deps.sh)");
    assert!(status.success());
    let wal = {
        let mut p = gw.audit.clone().into_os_string();
        p.push("-wal");
        PathBuf::from(p)
    };
    // The writer commits within a few milliseconds; wait for the log to show it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) <= cordon_audit::WAL_TIDY_BYTES {
        assert!(Instant::now() < deadline, "the write-ahead log never grew");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(gw.signal(nix::sys::signal::Signal::SIGTERM).code(), Some(0));
    let after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(after, 0, "the log was left at {after} bytes");
    assert!(gw.events(&s.session).len() >= 1500);
}
