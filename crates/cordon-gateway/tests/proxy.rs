//! The explicit proxy on loopback: real clients (curl, Python urllib, hyper), decisions, Host
//! checks, keep-alive re-decisions, CONNECT and SNI, report mode, standalone tokens.
//!
//! Everything here stays on 127.0.0.0/8 in the host's namespace: the origin is reachable only
//! because the policy names it in `allow_private`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use cordon_gateway::sni::testing::client_hello;
use cordon_gateway::{Clients, EventKind, SessionInfo, Verdict, Via};
use cordon_policy::Enforcement;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct World {
    dns: FakeDns,
    origin: SocketAddr,
    gw: Running,
}

/// Origin on 127.0.0.1; `origin.test` and `other.test` resolve to it; `rebind.test` to 127.0.0.2.
async fn world(allow: &[&str], allow_private: &[&str], opts: Options) -> World {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(
        LOOPBACK,
        &[
            ("origin.test", &[LOOPBACK]),
            ("other.test", &[LOOPBACK]),
            ("rebind.test", &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]),
        ],
    )
    .await;
    let gw = Running::start(policy(allow, allow_private), dns.addr, opts).await;
    World { dns, origin, gw }
}

fn curl(proxy: SocketAddr, args: &[&str]) -> (bool, String, String) {
    run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "-x", &format!("http://{proxy}")])
        .args(args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlisted_host_is_reachable_with_curl_and_the_request_is_audited() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let url = format!("http://origin.test:{}/hello?x=1", w.origin.port());
    let proxy = w.gw.proxy;
    let (ok, out, err) = tokio::task::spawn_blocking(move || curl(proxy, &["-D", "-", &url]))
        .await
        .unwrap();
    assert!(ok, "curl failed: {err}");
    assert!(out.contains("200 OK"), "{out}");
    assert!(
        out.contains(&format!(
            "origin: host=origin.test:{} path=/hello?x=1",
            w.origin.port()
        )),
        "{out}"
    );

    let e = w.gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert_eq!(e.verdict, Verdict::Allow);
    assert_eq!(e.via, Via::Proxy);
    assert_eq!(e.host.as_deref(), Some("origin.test"));
    assert_eq!(e.ip, Some(LOOPBACK));
    assert_eq!(e.port, Some(w.origin.port()));
    assert_eq!(e.method.as_deref(), Some("GET"));
    assert_eq!(e.path.as_deref(), Some("/hello?x=1"));
    assert_eq!(e.rule, "allow_private:127.0.0.1/32:*");
    assert_eq!(e.session, session());
    assert!(e.bytes_up > 50 && e.bytes_down > 50, "{e:?}");
    let stats = w.gw.stop().await;
    assert_eq!(stats.http_requests, 1);
    assert!(stats.bytes_down >= e.bytes_down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlisted_host_is_reachable_with_python_urllib() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let script = format!(
        "import urllib.request\n\
         h = urllib.request.ProxyHandler({{'http': 'http://{}'}})\n\
         o = urllib.request.build_opener(h)\n\
         print(o.open('http://origin.test:{}/py', timeout=10).read().decode())\n",
        w.gw.proxy,
        w.origin.port()
    );
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || run(Command::new("python3").args(["-c", &script])))
            .await
            .unwrap();
    assert!(ok, "python failed: {err}");
    assert!(out.contains("path=/py"), "{out}");
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_not_in_the_allowlist_gets_403_with_the_reason_and_is_never_resolved() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let proxy = w.gw.proxy;
    let (ok, out, _) =
        tokio::task::spawn_blocking(move || curl(proxy, &["-D", "-", "http://example.com/"]))
            .await
            .unwrap();
    assert!(ok);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.to_lowercase()
            .contains("x-cordon-reason: host example.com is not in the allowlist"),
        "{out}"
    );
    let e = w.gw.wait_event(|e| e.kind == EventKind::Blocked).await;
    assert_eq!(
        (e.verdict, e.rule.as_str()),
        (Verdict::Block, "default-deny")
    );
    assert_eq!(e.host.as_deref(), Some("example.com"));
    assert!(
        w.dns.asked().is_empty(),
        "upstream DNS was asked: {:?}",
        w.dns.asked()
    );
    let stats = w.gw.stop().await;
    assert_eq!(stats.blocked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_blocked_without_allow_private_in_every_encoding() {
    // The same origin, allowed by name, but no allow_private entry: every way of reaching
    // 127.0.0.1 must be refused as loopback.
    let mut w = world(&["origin.test:*", "127.0.0.1:*"], &[], Options::default()).await;
    let port = w.origin.port();
    for (url, host) in [
        (
            format!("http://origin.test:{port}/"),
            format!("origin.test:{port}"),
        ),
        (
            format!("http://127.0.0.1:{port}/"),
            format!("127.0.0.1:{port}"),
        ),
        (format!("http://127.1:{port}/"), format!("127.1:{port}")),
        (
            format!("http://2130706433:{port}/"),
            format!("2130706433:{port}"),
        ),
        (
            format!("http://0x7f000001:{port}/"),
            format!("0x7f000001:{port}"),
        ),
        (
            format!("http://0177.0.0.1:{port}/"),
            format!("0177.0.0.1:{port}"),
        ),
        (format!("http://0:{port}/"), format!("0:{port}")),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            format!("[::ffff:127.0.0.1]:{port}"),
        ),
        (format!("http://[::1]:{port}/"), format!("[::1]:{port}")),
    ] {
        let proxy = w.gw.proxy;
        let r = tokio::task::spawn_blocking(move || proxy_get(proxy, &url, &host))
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.reason().contains("private"), "{}", r.reason());
    }
    // With allow_private the same name works: the refusal above was the SSRF check.
    let mut ok = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let proxy = ok.gw.proxy;
    let port2 = ok.origin.port();
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://origin.test:{port2}/"),
            &format!("origin.test:{port2}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    w.gw.stop().await;
    ok.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_address_literal_is_refused_and_never_resolved() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let proxy = w.gw.proxy;
    for t in ["1.2.3.999", "0x1.0x2.0x3.0x4.5", "08.0.0.1"] {
        let r = tokio::task::spawn_blocking(move || proxy_get(proxy, &format!("http://{t}/"), t))
            .await
            .unwrap();
        assert!(r.status == 403 || r.status == 400, "http://{t}/: {r:?}");
    }
    let ev = w.gw.events();
    assert_eq!(ev.len(), 3, "{ev:#?}");
    assert!(ev.iter().all(|e| e.verdict == Verdict::Block));
    assert!(w.dns.asked().is_empty());
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_rebinds_to_another_loopback_address_is_blocked_and_never_connected() {
    let trap = Trap::start("127.0.0.2:0".parse().unwrap()).await;
    let mut w = world(&["rebind.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let proxy = w.gw.proxy;
    let port = trap.addr.port();
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://rebind.test:{port}/"),
            &format!("rebind.test:{port}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.reason(),
        "rebind.test resolved to 127.0.0.2, which is private (loopback 127.0.0.0/8)"
    );
    let e = w.gw.wait_event(|e| e.kind == EventKind::Blocked).await;
    assert_eq!(e.ip, Some("127.0.0.2".parse().unwrap()));
    assert_eq!(e.rule, "ssrf:loopback");
    assert_eq!(trap.hits(), 0);
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_that_disagrees_with_the_absolute_uri_is_refused() {
    let mut w = world(
        &["origin.test:*", "other.test:*"],
        &["127.0.0.1/32:*"],
        Options::default(),
    )
    .await;
    let port = w.origin.port();
    let proxy = w.gw.proxy;
    let cases = [
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: other.test:{port}\r\nConnection: close\r\n\r\n"),
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{}\r\nConnection: close\r\n\r\n", port + 1),
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\nHost: other.test\r\nConnection: close\r\n\r\n"),
    ];
    for req in cases {
        let r = tokio::task::spawn_blocking(move || raw_http(proxy, &req))
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{r:?}");
        assert!(r.reason().contains("Host header"), "{}", r.reason());
    }
    // Agreeing Host (default port spelled out or not) passes.
    let req = format!("GET http://origin.test:{port}/ok HTTP/1.1\r\nHost: ORIGIN.test.:{port}\r\nConnection: close\r\n\r\n");
    let r = tokio::task::spawn_blocking(move || raw_http(proxy, &req))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let blocked =
        w.gw.events()
            .iter()
            .filter(|e| e.rule == "host-mismatch")
            .count();
    assert_eq!(blocked, 3);
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_the_entry_does_not_name_is_refused() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let allow = format!("origin.test:{}", origin.port());
    let mut gw = Running::start(
        policy(&[&allow], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let proxy = gw.proxy;
    let other = origin.port().wrapping_add(1).max(1);
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://origin.test:{other}/"),
            &format!("origin.test:{other}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.reason(),
        format!("port {other} is not allowed for origin.test")
    );
    let port = origin.port();
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://origin.test:{port}/"),
            &format!("origin.test:{port}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    gw.stop().await;
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn hyper_client(proxy: SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut Sender, url: &str, host: &str) -> (u16, String, String) {
    sender.ready().await.unwrap();
    let req = hyper::Request::get(url)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    response_parts(sender.send_request(req).await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_kept_alive_connection_is_decided_again() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let port = w.origin.port();
    let mut c = hyper_client(w.gw.proxy).await;
    let ok_url = format!("http://origin.test:{port}/one");
    let ok_host = format!("origin.test:{port}");
    assert_eq!(get(&mut c, &ok_url, &ok_host).await.0, 200);
    let (status, reason, _) = get(
        &mut c,
        &format!("http://other.test:{port}/two"),
        &format!("other.test:{port}"),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(reason, "host other.test is not in the allowlist");
    // The connection is still usable, and the allowed host still works on it.
    let (status, _, body) = get(
        &mut c,
        &format!("http://origin.test:{port}/three"),
        &ok_host,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.ends_with("path=/three"), "{body}");
    let (status, _, _) = get(&mut c, &format!("http://origin.test:{port}/four"), &ok_host).await;
    assert_eq!(status, 200);
    let ev = w.gw.events();
    let requests: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::HttpRequest)
        .collect();
    let blocked: Vec<_> = ev.iter().filter(|e| e.kind == EventKind::Blocked).collect();
    assert_eq!(requests.len(), 3, "{ev:#?}");
    // A reused upstream connection is recorded under the same rule as a fresh one.
    assert!(
        requests
            .iter()
            .all(|e| e.rule == "allow_private:127.0.0.1/32:*"),
        "{requests:#?}"
    );
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0].host.as_deref(), Some("other.test"));
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_an_allowlisted_host_tunnels_with_curl() {
    let mut w = world(&["origin.test:*"], &["127.0.0.1/32:*"], Options::default()).await;
    let url = format!("http://origin.test:{}/tunnelled", w.origin.port());
    let proxy = w.gw.proxy;
    // -p: tunnel through CONNECT even for http://.
    let (ok, out, err) = tokio::task::spawn_blocking(move || curl(proxy, &["-p", &url]))
        .await
        .unwrap();
    assert!(ok, "curl failed: {err}");
    assert!(out.ends_with("path=/tunnelled"), "{out}");
    // Plain HTTP inside the tunnel is parsed and decided request by request (its Host must
    // name the tunnel's host), so each request is its own event.
    let e = w.gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert_eq!(e.method.as_deref(), Some("GET"));
    assert_eq!(e.path.as_deref(), Some("/tunnelled"));
    // It came through CONNECT, not through the transparent capture.
    assert_eq!(e.via, Via::Connect);
    assert_eq!(e.verdict, Verdict::Allow);
    assert!(e.bytes_up > 0 && e.bytes_down > 0, "{e:?}");
    w.gw.stop().await;
}

/// Opens a CONNECT tunnel and returns the stream after the proxy's answer, with the answer.
fn connect(proxy: SocketAddr, target: &str) -> (std::net::TcpStream, RawResponse) {
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let mut resp = parse_response(&head).unwrap();
    if resp.status != 200 {
        // The proxy keeps the connection open after a refusal: read exactly the body.
        let len: usize = resp.header("content-length").unwrap().parse().unwrap();
        resp.body = vec![0u8; len];
        s.read_exact(&mut resp.body).unwrap();
    }
    (s, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_whose_tls_server_name_matches_reaches_the_host() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(LOOPBACK, &[("echo.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["echo.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let (proxy, port) = (gw.proxy, echo.addr.port());
    let hello = client_hello(Some("Echo.Test"), 100);
    let h2 = hello.clone();
    let got = tokio::task::spawn_blocking(move || {
        let (mut s, r) = connect(proxy, &format!("echo.test:{port}"));
        assert_eq!(r.status, 200);
        s.write_all(&h2).unwrap();
        let mut back = vec![0u8; h2.len()];
        s.read_exact(&mut back).unwrap();
        back
    })
    .await
    .unwrap();
    assert_eq!(got, hello);
    assert_eq!(echo.received(), hello);
    gw.stop().await;
    let e = gw
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Connection)
        .unwrap_or_else(|| panic!("no connection event: {:#?}", gw.events()));
    assert_eq!(e.bytes_up, hello.len() as u64);
    assert_eq!(e.bytes_down, hello.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_whose_tls_server_name_differs_is_closed_before_anything_goes_upstream() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(LOOPBACK, &[("echo.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["echo.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let (proxy, port) = (gw.proxy, echo.addr.port());
    for sni in ["evil.example", "echo.test.evil.example"] {
        let hello = client_hello(Some(sni), 16384);
        tokio::task::spawn_blocking(move || {
            let (mut s, r) = connect(proxy, &format!("echo.test:{port}"));
            assert_eq!(r.status, 200);
            s.write_all(&hello).unwrap();
            let mut rest = Vec::new();
            // The gateway closes the tunnel; nothing comes back.
            let n = s.read_to_end(&mut rest).unwrap_or(0);
            assert_eq!(n, 0);
        })
        .await
        .unwrap();
    }
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(echo.received().is_empty());
    let blocked: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e.rule == "sni-mismatch")
        .collect();
    assert_eq!(blocked.len(), 2);
    assert!(blocked[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("\"evil.example\""));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_gets_403_before_any_tunnel() {
    let mut w = world(
        &["origin.test:443"],
        &["127.0.0.1/32:*"],
        Options::default(),
    )
    .await;
    let proxy = w.gw.proxy;
    let r = tokio::task::spawn_blocking(move || connect(proxy, "example.com:443").1)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.reason(), "host example.com is not in the allowlist");
    let r = tokio::task::spawn_blocking(move || connect(proxy, "origin.test:22").1)
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.reason(), "port 22 is not allowed for origin.test");
    let r = tokio::task::spawn_blocking(move || connect(proxy, "user@origin.test:443").1)
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    let e = w.gw.wait_event(|e| e.rule == "default-deny").await;
    assert_eq!(
        (e.via, e.method.as_deref()),
        (Via::Connect, Some("CONNECT"))
    );
    assert!(w.dns.asked().is_empty());
    w.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_lets_unlisted_hosts_through_but_records_that_it_would_block() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let trap = Trap::start("127.0.0.2:0".parse().unwrap()).await;
    let dns = FakeDns::start(
        LOOPBACK,
        &[
            ("other.test", &[LOOPBACK]),
            ("rebind.test", &[IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))]),
        ],
    )
    .await;
    let mut p = policy(&[], &["127.0.0.1/32:*"]);
    p.mode = Enforcement::Report;
    let mut gw = Running::start(p, dns.addr, Options::default()).await;
    let proxy = gw.proxy;
    let port = origin.port();
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://other.test:{port}/"),
            &format!("other.test:{port}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert_eq!(e.verdict, Verdict::ReportWouldBlock);
    assert_eq!(e.rule, "default-deny");
    assert_eq!(
        e.reason.as_deref(),
        Some("host other.test is not in the allowlist")
    );
    // The anti-SSRF ranges hold in report mode too.
    let tport = trap.addr.port();
    let r = tokio::task::spawn_blocking(move || {
        proxy_get(
            proxy,
            &format!("http://rebind.test:{tport}/"),
            &format!("rebind.test:{tport}"),
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 403);
    let r = tokio::task::spawn_blocking(move || proxy_get(proxy, "http://127.0.0.2/", "127.0.0.2"))
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(trap.hits(), 0);
    let stats = gw.stop().await;
    assert_eq!(stats.report_would_block, 1);
    assert_eq!(stats.blocked, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_clients_need_a_token_and_each_token_is_its_own_session() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let mut p = policy(&["origin.test:*"], &["127.0.0.1/32:*"]);
    p.rate.requests_per_minute = 2;
    let opts = Options {
        clients: Clients::Tokens,
        ..Options::default()
    };
    let mut gw = Running::start(p, dns.addr, opts).await;
    let who = |id: &str| SessionInfo {
        id: id.into(),
        user: format!("user-{id}"),
        code_sha256: "abc".into(),
    };
    let ta = gw.gateway.issue_token(who("a")).unwrap();
    let tb = gw.gateway.issue_token(who("b")).unwrap();
    let proxy = gw.proxy;
    let port = origin.port();
    let url = format!("http://origin.test:{port}/");

    let u = url.clone();
    let r =
        tokio::task::spawn_blocking(move || proxy_get(proxy, &u, &format!("origin.test:{port}")))
            .await
            .unwrap();
    assert_eq!(r.status, 407);
    assert!(r.header("proxy-authenticate").unwrap().starts_with("Basic"));

    // curl's -U sends Basic base64(cordon:<token>).
    for _ in 0..2 {
        let (u, t) = (url.clone(), ta.clone());
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || curl(proxy, &["-U", &format!("cordon:{t}"), &u]))
                .await
                .unwrap();
        assert!(ok, "{err}");
        assert!(out.starts_with("origin:"), "{out}");
    }
    // Session a is out of requests; session b (Bearer) is not.
    let (u, t) = (url.clone(), ta.clone());
    let (_, out, _) = tokio::task::spawn_blocking(move || {
        curl(proxy, &["-D", "-", "-U", &format!("cordon:{t}"), &u])
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let (u, t) = (url.clone(), tb.clone());
    let (_, out, _) = tokio::task::spawn_blocking(move || {
        curl(
            proxy,
            &[
                "--proxy-header",
                &format!("Proxy-Authorization: Bearer {t}"),
                &u,
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.starts_with("origin:"), "{out}");
    // The token never reaches the origin.
    let (u, t) = (format!("http://origin.test:{port}/headers"), tb.clone());
    let (_, out, _) = tokio::task::spawn_blocking(move || {
        curl(
            proxy,
            &[
                "--proxy-header",
                &format!("Proxy-Authorization: Bearer {t}"),
                "-H",
                "X-Mine: 1",
                &u,
            ],
        )
    })
    .await
    .unwrap();
    assert!(
        out.contains("x-mine") && !out.contains("proxy-authorization"),
        "{out}"
    );
    // Wrong tokens are refused.
    let (u, t) = (url.clone(), format!("{tb}x"));
    let (_, out, _) = tokio::task::spawn_blocking(move || {
        curl(
            proxy,
            &[
                "-D",
                "-",
                "--proxy-header",
                &format!("Proxy-Authorization: Bearer {t}"),
                &u,
            ],
        )
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 407"), "{out}");
    gw.stop().await;
    let ev = gw.events();
    let a_requests = ev
        .iter()
        .filter(|e| e.session.id == "a" && e.kind == EventKind::HttpRequest)
        .count();
    let b_requests = ev
        .iter()
        .filter(|e| e.session.id == "b" && e.kind == EventKind::HttpRequest)
        .count();
    let a_budget = ev
        .iter()
        .filter(|e| e.session.id == "a" && e.kind == EventKind::BudgetExhausted)
        .count();
    let unauth = ev
        .iter()
        .filter(|e| e.session.id == "unauthenticated")
        .count();
    assert_eq!(
        (a_requests, b_requests, a_budget, unauth),
        (2, 2, 1, 2),
        "{ev:#?}"
    );
    assert!(ev
        .iter()
        .filter(|e| e.session.id == "a")
        .all(|e| e.session.user == "user-a"));
}

/// A standalone gateway allowing `origin.test` (an origin on loopback), with one token issued:
/// (origin, its DNS, the gateway, the token).
async fn standalone(max_unauthenticated: Option<usize>) -> (SocketAddr, FakeDns, Running, String) {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let opts = Options {
        clients: Clients::Tokens,
        max_unauthenticated,
        ..Options::default()
    };
    let gw = Running::start(
        policy(&["origin.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        opts,
    )
    .await;
    let token = gw
        .gateway
        .issue_token(SessionInfo {
            id: "s1".into(),
            user: "alice".into(),
            code_sha256: "abc".into(),
        })
        .unwrap();
    (origin, dns, gw, token)
}

/// Standalone: connections that have not named a session yet are bounded on their own (they
/// are nobody's max_connections); one that authenticates frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_bounds_connections_that_have_not_sent_a_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (origin, _dns, mut gw, token) = standalone(Some(2)).await;
    let proxy = gw.proxy;
    let get = format!(
        "GET http://origin.test:{}/ HTTP/1.1\r\nHost: origin.test:{}\r\n\
         Proxy-Authorization: Bearer {token}\r\n\r\n",
        origin.port(),
        origin.port()
    );
    // Two silent connections take both places.
    let mut a = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let _b = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is answered 503 at once and closed, and the refusal is recorded.
    let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut answer))
        .await
        .expect("the refused connection is closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let e = gw.wait_event(|e| e.rule == "unauthenticated-limit").await;
    assert_eq!((e.kind, e.verdict), (EventKind::Blocked, Verdict::Block));
    assert!(e
        .reason
        .unwrap()
        .starts_with("1 client connection(s) refused"));
    // A burst right after is answered the same way but recorded once, with its count.
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 503"));
    }
    let burst = gw
        .wait_event(|e| {
            e.rule == "unauthenticated-limit"
                && e.reason.as_deref().is_some_and(|r| r.starts_with("3 "))
        })
        .await;
    assert_eq!(burst.kind, EventKind::Blocked);
    let limit_events = gw
        .events()
        .into_iter()
        .filter(|e| e.rule == "unauthenticated-limit")
        .count();
    assert_eq!(limit_events, 2);
    // One of the silent ones authenticates: served, and its place is free again.
    a.write_all(get.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    a.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let mut d = tokio::net::TcpStream::connect(proxy).await.unwrap();
    d.write_all(get.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    d.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_refuses_dns_and_transparent_listeners() {
    let dns = FakeDns::start(LOOPBACK, &[]).await;
    let mut config =
        cordon_gateway::GatewayConfig::standalone(policy(&[], &[]), Default::default());
    config.upstream = cordon_gateway::Upstream::Nameservers(vec![dns.addr]);
    let gw = cordon_gateway::Gateway::new(config).unwrap();
    let listeners = cordon_gateway::Listeners {
        transparent: Some(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
        ..Default::default()
    };
    let err = gw
        .serve(
            listeners,
            std::sync::Arc::new(cordon_gateway::NoopSink),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("transparent listener needs a sandbox session"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_is_recorded_when_the_gateway_stops() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(LOOPBACK, &[("echo.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["echo.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let (proxy, port) = (gw.proxy, echo.addr.port());
    let s = tokio::task::spawn_blocking(move || {
        let (mut s, r) = connect(proxy, &format!("echo.test:{port}"));
        assert_eq!(r.status, 200);
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
        s
    })
    .await
    .unwrap();
    let stats = gw.stop().await;
    drop(s);
    assert_eq!(stats.connections, 1);
    let e = gw
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Connection)
        .unwrap();
    assert_eq!((e.bytes_up, e.bytes_down), (4, 4));
}

/// Reads one response with a `Content-Length` body from a kept-alive connection.
fn read_response(s: &mut std::net::TcpStream) -> RawResponse {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head");
        head.push(byte[0]);
    }
    let mut resp = parse_response(&head).unwrap();
    let len: usize = resp.header("content-length").unwrap().parse().unwrap();
    resp.body = vec![0u8; len];
    s.read_exact(&mut resp.body).unwrap();
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_on_a_kept_alive_connection() {
    // The gateway remembers which session a connection's token named; revoking the token must
    // still end it for the next request on that same connection.
    let (origin, _dns, mut gw, token) = standalone(None).await;
    let (proxy, port) = (gw.proxy, origin.port());
    let request = format!(
        "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\
         Proxy-Authorization: Bearer {token}\r\n\r\n"
    );
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let statuses = tokio::task::spawn_blocking({
        let request = request.clone();
        let mut s = s.try_clone().unwrap();
        move || {
            (0..2)
                .map(|_| {
                    s.write_all(request.as_bytes()).unwrap();
                    read_response(&mut s).status
                })
                .collect::<Vec<_>>()
        }
    })
    .await
    .unwrap();
    assert_eq!(statuses, [200, 200]);
    assert!(gw.gateway.revoke_token(&token));
    let after = tokio::task::spawn_blocking(move || {
        s.write_all(request.as_bytes()).unwrap();
        read_response(&mut s).status
    })
    .await
    .unwrap();
    assert_eq!(after, 407);
    gw.stop().await;
}

/// The RFC 6455 sample handshake key and the accept value a server must answer it with.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket echo server: answers a handshake with `101` (the RFC's sample accept value),
/// then echoes every frame's payload back in an unmasked frame of the same opcode, until a
/// close frame. Returns its address.
async fn ws_echo() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !(text.contains("upgrade: websocket") && text.contains("connection: upgrade")) {
                    let _ = s
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
                );
                s.write_all(reply.as_bytes()).await.unwrap();
                loop {
                    let mut h = [0u8; 2];
                    if s.read_exact(&mut h).await.is_err() {
                        return;
                    }
                    let (opcode, masked) = (h[0] & 0x0f, h[1] & 0x80 != 0);
                    let mut len = u64::from(h[1] & 0x7f);
                    if len == 126 {
                        let mut l = [0u8; 2];
                        s.read_exact(&mut l).await.unwrap();
                        len = u64::from(u16::from_be_bytes(l));
                    } else if len == 127 {
                        let mut l = [0u8; 8];
                        s.read_exact(&mut l).await.unwrap();
                        len = u64::from_be_bytes(l);
                    }
                    let mut mask = [0u8; 4];
                    if masked {
                        s.read_exact(&mut mask).await.unwrap();
                    }
                    let mut payload = vec![0u8; len as usize];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= mask[i % 4];
                    }
                    if s.write_all(&ws_frame(opcode, &payload, None))
                        .await
                        .is_err()
                        || opcode == 8
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One final WebSocket frame; `mask` for client frames.
fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one unmasked frame: (opcode, payload).
fn ws_read(s: &mut std::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut l = [0u8; 2];
        s.read_exact(&mut l)?;
        len = u64::from(u16::from_be_bytes(l));
    } else if len == 127 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l)?;
        len = u64::from_be_bytes(l);
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((h[0] & 0x0f, payload))
}

/// A WebSocket client on `s` (already connected to the proxy, or to a CONNECT tunnel):
/// sends the handshake for `target` (absolute or origin form), checks the `101`, exchanges
/// `messages` (each echoed back), closes. Returns the 101's head on success, the refusal
/// otherwise.
fn ws_session(
    s: &mut std::net::TcpStream,
    target: &str,
    host: &str,
    messages: &[Vec<u8>],
) -> Result<RawResponse, RawResponse> {
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-head: {head:?}");
        head.push(byte[0]);
    }
    let mut resp = parse_response(&head).unwrap();
    if resp.status != 101 {
        if let Some(len) = resp.header("content-length") {
            resp.body = vec![0u8; len.parse().unwrap()];
            s.read_exact(&mut resp.body).unwrap();
        }
        return Err(resp);
    }
    assert_eq!(resp.header("sec-websocket-accept"), Some(WS_ACCEPT));
    assert!(resp
        .header("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket")));
    for (i, m) in messages.iter().enumerate() {
        s.write_all(&ws_frame(2, m, Some([1, 2, 3, i as u8])))
            .unwrap();
        let (opcode, back) = ws_read(s).unwrap();
        assert_eq!((opcode, back.len()), (2, m.len()));
        assert!(back == *m, "message {i} came back changed");
    }
    s.write_all(&ws_frame(8, b"", Some([9, 9, 9, 9]))).unwrap();
    assert_eq!(ws_read(s).unwrap().0, 8);
    Ok(resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_an_allowed_host_passes_through_the_proxy_and_a_connect_tunnel() {
    let ws = ws_echo().await;
    let dns = FakeDns::start(LOOPBACK, &[("ws.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["ws.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let (proxy, port) = (gw.proxy, ws.port());
    let host = format!("ws.test:{port}");
    let messages = vec![b"hello".to_vec(), vec![7u8; 70_000]];
    let sent: u64 = messages.iter().map(|m| m.len() as u64).sum();
    tokio::task::spawn_blocking({
        let (host, messages) = (host.clone(), messages.clone());
        move || {
            // Absolute form through the explicit proxy.
            let mut s = std::net::TcpStream::connect(proxy).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let target = format!("http://{host}/chat");
            ws_session(&mut s, &target, &host, &messages).unwrap();
            // Origin form inside a CONNECT tunnel (what most WebSocket clients do via a proxy).
            let (mut s, r) = connect(proxy, &host);
            assert_eq!(r.status, 200);
            ws_session(&mut s, "/tunnelled", &host, &messages).unwrap();
        }
    })
    .await
    .unwrap();
    gw.stop().await;
    let ev = gw.events();
    for (via, path) in [(Via::Proxy, "/chat"), (Via::Connect, "/tunnelled")] {
        let request = ev
            .iter()
            .find(|e| e.kind == EventKind::HttpRequest && e.via == via)
            .unwrap_or_else(|| panic!("no request event via {via:?}: {ev:#?}"));
        assert_eq!(
            (request.method.as_deref(), request.path.as_deref()),
            (Some("GET"), Some(path))
        );
        let stream = ev
            .iter()
            .find(|e| {
                e.kind == EventKind::Connection && e.via == via && e.path.as_deref() == Some(path)
            })
            .unwrap_or_else(|| panic!("no stream event via {via:?}: {ev:#?}"));
        assert_eq!(stream.verdict, Verdict::Allow);
        assert_eq!(stream.host.as_deref(), Some("ws.test"));
        // Every frame byte is counted: payloads plus frame headers and masks, both ways.
        assert!(
            stream.bytes_up > sent && stream.bytes_up < sent + 100,
            "{stream:?}"
        );
        assert!(
            stream.bytes_down > sent && stream.bytes_down < sent + 100,
            "{stream:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_refused_where_the_gateway_inspects_the_host_and_for_other_hosts() {
    let ws = ws_echo().await;
    let dns = FakeDns::start(
        LOOPBACK,
        &[("ws.test", &[LOOPBACK]), ("ruled.test", &[LOOPBACK])],
    )
    .await;
    let mut p = policy(&["ws.test:*", "ruled.test:*"], &["127.0.0.1/32:*"]);
    // Method/path rules make the gateway read every request to ruled.test: its WebSocket
    // frames could not be, so the upgrade is refused there.
    p.rules = vec![cordon_policy::HttpRule {
        host: cordon_policy::host::HostName::parse("ruled.test").unwrap(),
        methods: vec!["GET".into()],
        paths: vec!["/**".into()],
    }];
    let mut gw = Running::start(p, dns.addr, Options::default()).await;
    let (proxy, port) = (gw.proxy, ws.port());
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = format!("ruled.test:{port}");
        let refused = ws_session(&mut s, &format!("http://{host}/chat"), &host, &[]).unwrap_err();
        assert_eq!(refused.status, 403);
        assert!(
            refused
                .header("x-cordon-reason")
                .unwrap()
                .contains("WebSocket"),
            "{:?}",
            refused.header("x-cordon-reason")
        );
        // Not in the allowlist at all: the usual refusal, nothing upgraded.
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = format!("other.test:{port}");
        let refused = ws_session(&mut s, &format!("http://{host}/chat"), &host, &[]).unwrap_err();
        assert_eq!(refused.status, 403);
    })
    .await
    .unwrap();
    gw.stop().await;
    let ev = gw.events();
    assert!(
        ev.iter()
            .any(|e| e.kind == EventKind::Blocked && e.rule == "websocket"),
        "{ev:#?}"
    );
    assert!(
        !ev.iter().any(|e| e.kind == EventKind::Connection),
        "{ev:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_stops_moving_bytes_when_the_byte_budget_runs_out() {
    let ws = ws_echo().await;
    let dns = FakeDns::start(LOOPBACK, &[("ws.test", &[LOOPBACK])]).await;
    let mut p = policy(&["ws.test:*"], &["127.0.0.1/32:*"]);
    p.rate.max_bytes_out = cordon_policy::size::ByteSize(20_000);
    let mut gw = Running::start(p, dns.addr, Options::default()).await;
    let (proxy, port) = (gw.proxy, ws.port());
    let stopped = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let host = format!("ws.test:{port}");
        ws_session(
            &mut s,
            &format!("http://{host}/chat"),
            &host,
            &[b"small".to_vec()],
        )
        .is_ok()
            && {
                // Well past the budget: the gateway stops forwarding and closes.
                let big = ws_frame(2, &vec![1u8; 50_000], Some([1, 1, 1, 1]));
                let _ = s.write_all(&big);
                ws_read(&mut s).is_err()
            }
    })
    .await
    .unwrap();
    assert!(stopped, "the echo of a frame past the budget came back");
    gw.stop().await;
    let ev = gw.events();
    assert!(
        ev.iter().any(|e| e.kind == EventKind::BudgetExhausted),
        "{ev:#?}"
    );
    let stream = ev
        .iter()
        .find(|e| e.kind == EventKind::Connection)
        .unwrap_or_else(|| panic!("no stream event: {ev:#?}"));
    assert!(stream.bytes_up <= 20_000, "{stream:?}");
}
