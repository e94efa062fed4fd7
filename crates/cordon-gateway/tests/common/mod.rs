//! Test harness: a fake upstream DNS server that records every query, an origin, traps that
//! count connections, a gateway started on loopback listeners, raw clients, and a way to re-run
//! a test inside a fresh user+network namespace (no uplink) for tests that use non-loopback
//! addresses.

#![allow(dead_code)]

pub mod origin;
pub mod tls_origin;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cordon_gateway::{
    Clients, Gateway, GatewayConfig, GatewayStats, Listeners, MemorySink, NetEvent, OriginalDst,
    SessionInfo, TerminateRequest, Timeouts, Upstream,
};
use cordon_policy::size::ByteSize;
use cordon_policy::{AllowEntry, DetectPolicy, Enforcement, NetworkPolicy, OnExceed, RateLimits};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Policy

/// A policy with generous budgets (tests of budgets set their own).
pub fn policy(allow: &[&str], allow_private: &[&str]) -> NetworkPolicy {
    NetworkPolicy {
        mode: Enforcement::Enforce,
        allow: allow
            .iter()
            .map(|a| AllowEntry::parse(a).unwrap())
            .collect(),
        allow_private: allow_private
            .iter()
            .map(|a| AllowEntry::parse(a).unwrap())
            .collect(),
        rate: RateLimits {
            requests_per_minute: 1_000_000,
            requests_per_minute_per_host: 1_000_000,
            max_connections: 10_000,
            max_bytes_out: ByteSize(1 << 40),
            max_bytes_in: ByteSize(1 << 40),
            on_exceed: OnExceed::Block,
        },
        ..NetworkPolicy::default()
    }
}

pub fn session() -> SessionInfo {
    SessionInfo {
        id: "sess-1".into(),
        user: "alice".into(),
        code_sha256: "c0de".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Fake upstream DNS

/// An upstream DNS server (UDP and TCP on one port) that answers from a table and records every
/// question it receives.
pub struct FakeDns {
    pub addr: SocketAddr,
    pub queries: Arc<Mutex<Vec<String>>>,
}

impl FakeDns {
    pub async fn start(ip: IpAddr, table: &[(&str, &[IpAddr])]) -> FakeDns {
        let table: Arc<HashMap<String, Vec<IpAddr>>> = Arc::new(
            table
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_vec()))
                .collect(),
        );
        let queries = Arc::new(Mutex::new(Vec::new()));
        // UDP and TCP on the same port, as resolvers expect.
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind((ip, port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        {
            let (table, queries) = (table.clone(), queries.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    if let Some(resp) = dns_answer(&buf[..n], &table, &queries) {
                        let _ = udp.send_to(&resp, peer).await;
                    }
                }
            });
        }
        {
            let (table, queries) = (table.clone(), queries.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = tcp.accept().await else {
                        continue;
                    };
                    let (table, queries) = (table.clone(), queries.clone());
                    tokio::spawn(async move {
                        loop {
                            let mut len = [0u8; 2];
                            if s.read_exact(&mut len).await.is_err() {
                                return;
                            }
                            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                            if s.read_exact(&mut msg).await.is_err() {
                                return;
                            }
                            let Some(resp) = dns_answer(&msg, &table, &queries) else {
                                return;
                            };
                            let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                            out.extend_from_slice(&resp);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        }
        FakeDns { addr, queries }
    }

    /// Every name asked so far (lower-case, no trailing dot).
    pub fn asked(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }
}

fn dns_answer(
    bytes: &[u8],
    table: &HashMap<String, Vec<IpAddr>>,
    queries: &Mutex<Vec<String>>,
) -> Option<Vec<u8>> {
    let q = Message::from_vec(bytes).ok()?;
    let question = q.queries.first()?.clone();
    let name = question
        .name
        .to_ascii()
        .trim_end_matches('.')
        .to_lowercase();
    queries.lock().unwrap().push(name.clone());
    let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.message_type = MessageType::Response;
    resp.add_query(question.clone());
    match table.get(&name) {
        None => resp.metadata.response_code = ResponseCode::NXDomain,
        Some(addrs) => {
            for a in addrs {
                let rdata = match (a, question.query_type) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                resp.add_answer(Record::from_rdata(question.name.clone(), 60, rdata));
            }
        }
    }
    resp.to_vec().ok()
}

// ---------------------------------------------------------------------------------------------
// Traps and echo servers

/// A listener that only counts connections (proves the gateway never connected somewhere).
pub struct Trap {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
}

impl Trap {
    pub async fn start(addr: SocketAddr) -> Trap {
        let l = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind trap {addr}: {e}"));
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    h.fetch_add(1, Ordering::SeqCst);
                    drop(s);
                }
            }
        });
        Trap { addr, hits }
    }
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A TCP server that echoes what it receives and records it.
pub struct Echo {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<u8>>>,
    pub connections: Arc<AtomicU64>,
}

impl Echo {
    pub async fn start(addr: SocketAddr) -> Echo {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (r, c) = (received.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                r.lock().unwrap().extend_from_slice(&buf[..n]);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Echo {
            addr,
            received,
            connections,
        }
    }
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway under test

pub struct Running {
    pub gateway: Gateway,
    pub proxy: SocketAddr,
    pub dns_udp: Option<SocketAddr>,
    pub dns_tcp: Option<SocketAddr>,
    pub transparent: Option<SocketAddr>,
    pub sink: Arc<MemorySink>,
    pub cancel: CancellationToken,
    pub handle: Option<JoinHandle<GatewayStats>>,
    pub terminate: UnboundedReceiver<TerminateRequest>,
    pub detections: UnboundedReceiver<cordon_gateway::Detection>,
}

pub struct Options {
    pub clients: Clients,
    pub detect: DetectPolicy,
    /// Honey tokens.
    pub canaries: Vec<cordon_gateway::detect::canary::Canary>,
    pub original_dst: Option<Arc<dyn OriginalDst>>,
    pub timeouts: Timeouts,
    pub intercept: Option<Arc<cordon_gateway::InterceptConfig>>,
    /// Process attribution (what `cordon run` plugs in).
    pub owners: Option<Arc<dyn cordon_gateway::SocketOwners>>,
    /// Standalone mode's bound on connections without a session (the default when `None`).
    pub max_unauthenticated: Option<usize>,
}

/// Every detection rule off: tests of other behaviour must not be cut short by one.
pub fn quiet_detection() -> DetectPolicy {
    let mut d = DetectPolicy::default();
    d.blocked.enabled = false;
    d.dns_tunnel.enabled = false;
    d.exfil.enabled = false;
    d.sandbox.enabled = false;
    d
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clients: Clients::Session(session()),
            detect: quiet_detection(),
            canaries: Vec::new(),
            original_dst: None,
            timeouts: Timeouts {
                first_bytes: Duration::from_millis(300),
                connect: Duration::from_secs(3),
                ..Timeouts::default()
            },
            intercept: None,
            owners: None,
            max_unauthenticated: None,
        }
    }
}

impl Running {
    pub async fn start(policy: NetworkPolicy, upstream_dns: SocketAddr, opts: Options) -> Running {
        let sandbox_mode = matches!(opts.clients, Clients::Session(_));
        let mut config = GatewayConfig::new(policy, opts.detect, session());
        config.canaries = opts.canaries;
        config.clients = opts.clients;
        config.upstream = Upstream::Nameservers(vec![upstream_dns]);
        config.timeouts = opts.timeouts;
        config.intercept = opts.intercept;
        config.owners = opts.owners;
        if let Some(n) = opts.max_unauthenticated {
            config.max_unauthenticated = n;
        }
        if let Some(o) = opts.original_dst {
            config.original_dst = o;
        }
        let gateway = Gateway::new(config).unwrap();
        let terminate = gateway.take_terminate_receiver().unwrap();
        let detections = gateway.take_detection_receiver().unwrap();
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = http.local_addr().unwrap();
        let mut listeners = Listeners {
            http: Some(http),
            ..Listeners::default()
        };
        let (mut dns_udp, mut dns_tcp, mut transparent) = (None, None, None);
        if sandbox_mode {
            let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let tr = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            dns_udp = Some(u.local_addr().unwrap());
            dns_tcp = Some(t.local_addr().unwrap());
            transparent = Some(tr.local_addr().unwrap());
            listeners.dns_udp = Some(u);
            listeners.dns_tcp = Some(t);
            listeners.transparent = Some(tr);
        }
        let sink = Arc::new(MemorySink::new());
        let cancel = CancellationToken::new();
        let handle = {
            let (g, s, c) = (gateway.clone(), sink.clone(), cancel.clone());
            tokio::spawn(async move { g.serve(listeners, s, c).await.unwrap() })
        };
        Running {
            gateway,
            proxy,
            dns_udp,
            dns_tcp,
            transparent,
            sink,
            cancel,
            handle: Some(handle),
            terminate,
            detections,
        }
    }

    /// Stops the gateway and returns its stats (bounded: fails the test after 10 s).
    pub async fn stop(&mut self) -> GatewayStats {
        self.cancel.cancel();
        let h = self.handle.take().expect("already stopped");
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("gateway did not stop within 10 s")
            .unwrap()
    }

    pub fn events(&self) -> Vec<NetEvent> {
        self.sink.events()
    }

    /// Waits (up to 5 s) until an event matching `f` was recorded, and returns it.
    pub async fn wait_event(&self, f: impl Fn(&NetEvent) -> bool) -> NetEvent {
        for _ in 0..500 {
            if let Some(e) = self.events().into_iter().find(|e| f(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no matching event; events: {:#?}", self.events());
    }

    /// Resolves `name` through the gateway's own DNS server (as the sandbox would).
    pub async fn synthetic_for(&self, name: &str) -> std::net::Ipv4Addr {
        let resp = dns_query_udp(self.dns_udp.unwrap(), name, RecordType::A).await;
        match resp.answers.first().map(|r| &r.data) {
            Some(RData::A(a)) => a.0,
            other => panic!(
                "no A answer for {name}: {other:?} ({:?})",
                resp.metadata.response_code
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transparent capture without nftables

/// An original-destination lookup the test can point anywhere.
#[derive(Clone)]
pub struct Redirect(Arc<Mutex<Option<SocketAddr>>>);

impl Redirect {
    pub fn new() -> Self {
        Redirect(Arc::new(Mutex::new(None)))
    }
    pub fn set(&self, a: SocketAddr) {
        *self.0.lock().unwrap() = Some(a);
    }
}

impl OriginalDst for Redirect {
    fn original_dst(&self, _s: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
        self.0
            .lock()
            .unwrap()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no NAT entry"))
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

pub async fn dns_query_udp(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        hickory_proto::rr::Name::from_ascii(name).unwrap(),
        qtype,
    ));
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("dns answer within 5 s")
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn reason(&self) -> &str {
        self.header("x-cordon-reason").unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` verbatim on a new connection and reads the response until the peer closes
/// (requests should say `Connection: close`). Blocking; bounded by a 10 s read timeout.
pub fn raw_http(addr: SocketAddr, request: &str) -> RawResponse {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out).unwrap_or_else(|| {
        panic!(
            "bad response to {request:?}: {:?}",
            String::from_utf8_lossy(&out)
        )
    })
}

pub fn parse_response(out: &[u8]) -> Option<RawResponse> {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&out[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(RawResponse {
        status,
        headers,
        body: out[end + 4..].to_vec(),
    })
}

/// `GET <url>` through the explicit proxy, `Connection: close`.
pub fn proxy_get(proxy: SocketAddr, url: &str, host: &str) -> RawResponse {
    raw_http(
        proxy,
        &format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
}

/// Runs a command with a 30 s bound; returns (exit ok, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

const NETNS_ENV: &str = "CORDON_GATEWAY_TEST_NETNS";

/// Runs the calling test inside a fresh user + network namespace that has only `lo` (no uplink),
/// so the test may use non-loopback addresses without a packet ever leaving the machine.
///
/// Returns `true` when the caller is already inside (run the test body), `false` when this call
/// ran the test in a child and it passed (return at once). Panics if the child failed. If the
/// kernel refuses unprivileged user namespaces the test is skipped, loudly.
pub fn enter_netns(test_name: &str) -> bool {
    if std::env::var(NETNS_ENV).as_deref() == Ok(test_name) {
        let (ok, _, err) = run(Command::new("ip").args(["link", "set", "lo", "up"]));
        assert!(ok, "ip link set lo up: {err}");
        return true;
    }
    // The probe needs what the test needs: a user+network namespace and ip(8) inside it.
    let probe = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--net",
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED {test_name}: cannot create a user+network namespace here ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return false;
        }
        Err(e) => {
            eprintln!("SKIPPED {test_name}: unshare(1) is not available: {e}");
            return false;
        }
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, test_name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test_name} failed inside its network namespace:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    false
}

/// Adds `addr` (v4 /32 or v6 /128) to `lo` inside a test namespace.
pub fn add_lo_addr(addr: IpAddr) {
    let (fam, cidr) = match addr {
        IpAddr::V4(_) => ("-4", format!("{addr}/32")),
        IpAddr::V6(_) => ("-6", format!("{addr}/128")),
    };
    assert!(
        std::env::var(NETNS_ENV).is_ok(),
        "add_lo_addr outside a test namespace"
    );
    let mut args = vec![fam, "addr", "add", &cidr, "dev", "lo"];
    if addr.is_ipv6() {
        // Without `nodad` the address stays tentative until duplicate address detection's work
        // item runs, and a bind() before that fails with EADDRNOTAVAIL (seen under load).
        args.push("nodad");
    }
    let (ok, _, err) = run(Command::new("ip").args(&args));
    assert!(ok, "ip addr add {cidr}: {err}");
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A response's status, `X-Cordon-Reason` and body text.
pub async fn response_parts(resp: hyper::Response<hyper::body::Incoming>) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("x-cordon-reason")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, reason, String::from_utf8_lossy(&body).into_owned())
}
