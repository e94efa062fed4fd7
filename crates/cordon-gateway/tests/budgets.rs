//! Session budgets through the real proxy: request rates (total and per host), concurrent
//! connections, bytes out/in, terminate requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use cordon_gateway::{EventKind, Verdict};
use cordon_policy::size::ByteSize;
use cordon_policy::{Enforcement, NetworkPolicy, OnExceed};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct World {
    origin: SocketAddr,
    gw: Running,
    _dns: FakeDns,
}

async fn world(edit: impl FnOnce(&mut NetworkPolicy), opts: Options) -> World {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(
        LOOPBACK,
        &[("origin.test", &[LOOPBACK]), ("other.test", &[LOOPBACK])],
    )
    .await;
    let mut p = policy(
        &["origin.test:*", "other.test:*", "echo.test:*"],
        &["127.0.0.1/32:*"],
    );
    edit(&mut p);
    let gw = Running::start(p, dns.addr, opts).await;
    World {
        origin,
        gw,
        _dns: dns,
    }
}

async fn get(proxy: SocketAddr, host: &str, port: u16, path: &str) -> RawResponse {
    let url = format!("http://{host}:{port}{path}");
    let h = format!("{host}:{port}");
    tokio::task::spawn_blocking(move || proxy_get(proxy, &url, &h))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_per_minute_quota_are_refused() {
    let mut w = world(|p| p.rate.requests_per_minute = 3, Options::default()).await;
    let port = w.origin.port();
    for _ in 0..3 {
        assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 200);
    }
    let r = get(w.gw.proxy, "other.test", port, "/").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.reason(), "request rate limit exceeded (3 per minute)");
    let e =
        w.gw.wait_event(|e| e.kind == EventKind::BudgetExhausted)
            .await;
    assert_eq!(e.verdict, Verdict::Block);
    assert_eq!(e.rule, "network.rate.requests_per_minute");
    assert_eq!(e.host.as_deref(), Some("other.test"));
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_host_quota_counts_each_host_separately() {
    let mut w = world(
        |p| p.rate.requests_per_minute_per_host = 2,
        Options::default(),
    )
    .await;
    let port = w.origin.port();
    for _ in 0..2 {
        assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 200);
    }
    let r = get(w.gw.proxy, "origin.test", port, "/").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.reason(),
        "request rate limit for origin.test exceeded (2 per minute)"
    );
    assert_eq!(get(w.gw.proxy, "other.test", port, "/").await.status, 200);
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_records_an_exceeded_quota_but_lets_the_request_through() {
    let mut w = world(
        |p| {
            p.rate.requests_per_minute = 1;
            p.mode = Enforcement::Report;
        },
        Options::default(),
    )
    .await;
    let port = w.origin.port();
    assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 200);
    assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 200);
    let e =
        w.gw.wait_event(|e| e.kind == EventKind::BudgetExhausted)
            .await;
    assert_eq!(e.verdict, Verdict::ReportWouldBlock);
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_stops_at_exactly_the_outbound_byte_budget() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(
        LOOPBACK,
        &[("echo.test", &[LOOPBACK]), ("origin.test", &[LOOPBACK])],
    )
    .await;
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut p = policy(&["echo.test:*", "origin.test:*"], &["127.0.0.1/32:*"]);
    p.rate.max_bytes_out = ByteSize(2000);
    let mut gw = Running::start(p, dns.addr, Options::default()).await;
    let (proxy, port) = (gw.proxy, echo.addr.port());
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 19];
        s.read_exact(&mut head).unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200"));
        // Not TLS, so the tunnel opens after the first bytes arrive.
        let _ = s.write_all(&vec![b'a'; 10_000]);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    })
    .await
    .unwrap();
    // Wait for the echo server to have read what it will get.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(echo.received().len(), 2000);
    let e = gw
        .wait_event(|e| e.kind == EventKind::BudgetExhausted)
        .await;
    assert_eq!(e.rule, "network.rate.max_bytes_out");
    assert_eq!(e.reason.as_deref(), Some("byte budget exhausted"));
    // Every later request is refused with the documented reason.
    let r = get(proxy, "origin.test", origin.port(), "/").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.reason(), "byte budget exhausted");
    let stats = gw.stop().await;
    assert!(stats.bytes_up <= 2000, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_stops_at_the_inbound_byte_budget() {
    let mut w = world(
        |p| p.rate.max_bytes_in = ByteSize(100_000),
        Options::default(),
    )
    .await;
    let port = w.origin.port();
    let proxy = w.gw.proxy;
    let got = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET http://origin.test:{port}/big?bytes=1000000 HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_response(&out).unwrap().body.len()
    })
    .await
    .unwrap();
    // The upstream bytes (its headers and body) fit in the budget, so the body was cut short.
    assert!(got < 100_000, "client got a {got}-byte body");
    let r = get(proxy, "origin.test", port, "/").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.reason(), "byte budget exhausted");
    let e = w.gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert!(e.bytes_down <= 100_000, "{e:?}");
    assert!(
        e.reason.as_deref().unwrap_or("").contains("aborted")
            || e.reason.as_deref().unwrap_or("").contains("not read"),
        "{e:?}"
    );
    w.gw.stop().await;
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn client(proxy: SocketAddr) -> (Sender, tokio::task::JoinHandle<()>) {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, h)
}

async fn status(sender: &mut Sender, port: u16) -> (u16, String) {
    sender.ready().await.unwrap();
    let req = hyper::Request::get(format!("http://origin.test:{port}/"))
        .header("host", format!("origin.test:{port}"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let s = resp.status().as_u16();
    let reason = resp
        .headers()
        .get("x-cordon-reason")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let _ = resp.into_body().collect().await;
    (s, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_concurrent_limit_are_refused_until_one_closes() {
    let mut w = world(|p| p.rate.max_connections = 1, Options::default()).await;
    let port = w.origin.port();
    let (mut a, ha) = client(w.gw.proxy).await;
    assert_eq!(status(&mut a, port).await.0, 200);
    let (mut b, _hb) = client(w.gw.proxy).await;
    assert_eq!(
        status(&mut b, port).await,
        (403, "connection limit reached (1 concurrent)".to_owned())
    );
    // The first connection keeps working.
    assert_eq!(status(&mut a, port).await.0, 200);
    drop(a);
    ha.abort();
    let mut ok = false;
    for _ in 0..100 {
        let (mut c, _hc) = client(w.gw.proxy).await;
        if status(&mut c, port).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "the slot never came back");
    let e =
        w.gw.wait_event(|e| e.kind == EventKind::BudgetExhausted)
            .await;
    assert_eq!(e.rule, "network.rate.max_connections");
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_exceed_terminate_asks_the_supervisor_to_end_the_session_once() {
    let mut w = world(
        |p| {
            p.rate.requests_per_minute = 1;
            p.rate.on_exceed = OnExceed::Terminate;
        },
        Options::default(),
    )
    .await;
    let port = w.origin.port();
    assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 200);
    assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 403);
    assert_eq!(get(w.gw.proxy, "origin.test", port, "/").await.status, 403);
    let t = tokio::time::timeout(Duration::from_secs(5), w.gw.terminate.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.session, session());
    assert_eq!(
        t.reason,
        "budget exceeded: network.rate.requests_per_minute"
    );
    w.gw.stop().await;
    assert!(
        w.gw.terminate.try_recv().is_err(),
        "a second terminate request was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_after_blocked_fires_on_the_nth_blocked_attempt() {
    let opts = Options {
        detect: {
            let mut d = common::quiet_detection();
            d.blocked.enabled = true;
            d.blocked.threshold = 2;
            d
        },
        ..Options::default()
    };
    let mut w = world(|_| {}, opts).await;
    assert_eq!(get(w.gw.proxy, "evil.example", 80, "/").await.status, 403);
    assert!(w.gw.terminate.try_recv().is_err());
    assert_eq!(get(w.gw.proxy, "evil.example", 80, "/").await.status, 403);
    let t = tokio::time::timeout(Duration::from_secs(5), w.gw.terminate.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        t.reason,
        "2 blocked network attempts in 1m (detect.blocked.threshold = 2)"
    );
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_their_head_hold_a_slot_and_cannot_pile_up() {
    // The attack: many proxy connections each send most of a maximal head and stop, so the
    // supervisor holds up to 256 KiB for each until the 30 s head timeout. Every one of them
    // must take a connection slot at once: past `max_connections` they are refused before
    // anything of theirs is buffered.
    let mut w = world(|p| p.rate.max_connections = 4, Options::default()).await;
    let proxy = w.gw.proxy;
    let answered = tokio::task::spawn_blocking(move || {
        let partial = format!(
            "GET http://origin.test/ HTTP/1.1\r\nX-Pad: {}",
            "a".repeat(200 * 1024)
        );
        let mut held = Vec::new();
        let mut answered = Vec::new();
        for _ in 0..12 {
            let mut s = std::net::TcpStream::connect(proxy).unwrap();
            let _ = s.write_all(partial.as_bytes());
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            // The refusal comes at once, or nothing comes until the head timeout.
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            answered.push(String::from_utf8_lossy(&out).into_owned());
            held.push(s);
        }
        answered
    })
    .await
    .unwrap();
    let refused: Vec<&String> = answered.iter().filter(|a| a.contains(" 403 ")).collect();
    assert_eq!(
        (
            answered.iter().filter(|a| a.is_empty()).count(),
            refused.len()
        ),
        (4, 8),
        "four held, the rest refused at once: {answered:?}"
    );
    assert!(refused[0].contains("connection limit reached (4 concurrent)"));
    w.gw.wait_event(|e| {
        e.kind == EventKind::BudgetExhausted && e.rule == "network.rate.max_connections"
    })
    .await;
    w.gw.stop().await;
}
