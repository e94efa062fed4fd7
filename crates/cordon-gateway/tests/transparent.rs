//! The transparent listener with an injected original destination (no nftables needed): captured
//! HTTP is checked per request against the name behind the synthetic address, TLS by SNI, other
//! protocols by destination; refusals are TCP resets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cordon_gateway::sni::testing::client_hello;
use cordon_gateway::{EventKind, Verdict, Via};
use tokio::io::AsyncWriteExt;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn start(
    allow: &[&str],
    allow_private: &[&str],
    names: &[(&str, &[IpAddr])],
) -> (Running, Redirect, FakeDns) {
    let dns = FakeDns::start(LOOPBACK, names).await;
    let redirect = Redirect::new();
    let opts = Options {
        original_dst: Some(Arc::new(redirect.clone())),
        ..Options::default()
    };
    let gw = Running::start(policy(allow, allow_private), dns.addr, opts).await;
    (gw, redirect, dns)
}

/// Reads until EOF or error; returns what was read and the error kind, if any.
fn read_all(s: &mut std::net::TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_http_to_an_allowed_name_is_served_and_every_request_is_checked() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, redirect, _dns) = start(
        &["origin.test:*"],
        &["127.0.0.1/32:*"],
        &[("origin.test", &[LOOPBACK])],
    )
    .await;
    let synthetic = gw.synthetic_for("origin.test").await;
    let port = origin.port();
    redirect.set(SocketAddr::new(synthetic.into(), port));
    let tr = gw.transparent.unwrap();
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        // Two requests on one connection: the second names another host in Host.
        write!(s, "GET /a HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = s.read(&mut buf).unwrap();
        let first = parse_response(&buf[..n]).unwrap();
        write!(
            s,
            "GET /b HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (rest, _) = read_all(&mut s);
        (first, parse_response(&rest).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(first.status, 200);
    assert!(
        first
            .text()
            .ends_with(&format!("host=origin.test:{port} path=/a")),
        "{}",
        first.text()
    );
    assert_eq!(second.status, 403);
    assert!(
        second
            .reason()
            .contains("does not match the connection's destination origin.test"),
        "{}",
        second.reason()
    );
    let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert_eq!((e.via, e.verdict), (Via::Transparent, Verdict::Allow));
    assert_eq!(e.host.as_deref(), Some("origin.test"));
    assert_eq!(e.path.as_deref(), Some("/a"));
    let b = gw.wait_event(|e| e.kind == EventKind::Blocked).await;
    assert_eq!(
        (b.via, b.rule.as_str()),
        (Via::Transparent, "host-mismatch")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_tls_must_name_the_destination_in_sni_or_is_reset() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let (mut gw, redirect, _dns) = start(
        &["echo.test:*"],
        &["127.0.0.1/32:*"],
        &[("echo.test", &[LOOPBACK])],
    )
    .await;
    let synthetic = gw.synthetic_for("echo.test").await;
    redirect.set(SocketAddr::new(synthetic.into(), echo.addr.port()));
    let tr = gw.transparent.unwrap();

    let good = client_hello(Some("echo.test"), 512);
    let g = good.clone();
    let back = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        s.write_all(&g).unwrap();
        let mut back = vec![0u8; g.len()];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut back).unwrap();
        back
    })
    .await
    .unwrap();
    assert_eq!(back, good);
    let before = echo.connections.load(std::sync::atomic::Ordering::SeqCst);

    let (data, err) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        s.write_all(&client_hello(Some("evil.example"), 512))
            .unwrap();
        read_all(&mut s)
    })
    .await
    .unwrap();
    assert!(data.is_empty());
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    let b = gw.wait_event(|e| e.rule == "sni-mismatch").await;
    assert_eq!(b.via, Via::Transparent);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_connection_to_a_refused_destination_is_reset_without_connecting() {
    let trap = Trap::start("127.0.0.2:0".parse().unwrap()).await;
    let (mut gw, redirect, _dns) = start(&["echo.test:*"], &["127.0.0.1/32:*"], &[]).await;
    let tr = gw.transparent.unwrap();
    for dst in [
        // A loopback address other than the one allow_private names.
        trap.addr,
        // A synthetic address the DNS never handed out.
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1)), 443),
    ] {
        redirect.set(dst);
        let (data, err) = tokio::task::spawn_blocking(move || {
            // The gateway refuses before reading anything; writing first would race the reset
            // (a write that meets the RST consumes the error, and the read then sees EOF).
            let mut s = std::net::TcpStream::connect(tr).unwrap();
            read_all(&mut s)
        })
        .await
        .unwrap();
        assert!(data.is_empty(), "{dst}");
        assert_eq!(err, Some(ErrorKind::ConnectionReset), "{dst}");
    }
    assert_eq!(trap.hits(), 0);
    let ev = gw.events();
    let rules: Vec<_> = ev
        .iter()
        .filter(|e| e.kind == EventKind::Blocked)
        .map(|e| e.rule.as_str())
        .collect();
    assert_eq!(rules, vec!["ssrf:loopback", "ssrf:benchmark"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_an_original_destination_is_reset() {
    let (mut gw, _redirect, _dns) = start(&[], &[], &[]).await;
    let tr = gw.transparent.unwrap();
    let (_, err) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        read_all(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    let b = gw.wait_event(|e| e.kind == EventKind::Blocked).await;
    assert_eq!(b.rule, "no-original-destination");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_and_other_protocols_are_decided_on_the_destination() {
    // A server that speaks first (SMTP-like), then echoes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner\r\n").await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (mut gw, redirect, _dns) = start(
        &["mail.test:*"],
        &["127.0.0.1/32:*"],
        &[("mail.test", &[LOOPBACK])],
    )
    .await;
    let synthetic = gw.synthetic_for("mail.test").await;
    redirect.set(SocketAddr::new(synthetic.into(), banner_addr.port()));
    let tr = gw.transparent.unwrap();
    let got = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut banner = [0u8; 12];
        s.read_exact(&mut banner).unwrap();
        s.write_all(b"EHLO x\r\n").unwrap();
        let mut echo = [0u8; 8];
        s.read_exact(&mut echo).unwrap();
        (banner, echo)
    })
    .await
    .unwrap();
    assert_eq!(&got.0, b"220 banner\r\n");
    assert_eq!(&got.1, b"EHLO x\r\n");
    gw.stop().await;
    let e = gw
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Connection)
        .unwrap();
    assert_eq!(
        (e.via, e.host.as_deref()),
        (Via::Transparent, Some("mail.test"))
    );
    assert_eq!((e.bytes_up, e.bytes_down), (8, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_destination_named_in_the_policy_is_decided_on_the_address() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, redirect, _dns) = start(&[], &[&format!("127.0.0.1/32:{}", 1)], &[]).await;
    // Port 1 only: the origin's port is refused, by address.
    redirect.set(origin);
    let tr = gw.transparent.unwrap();
    let (_, err) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(tr).unwrap();
        read_all(&mut s)
    })
    .await
    .unwrap();
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
    gw.stop().await;

    let (mut gw, redirect, _dns) = start(&[], &["127.0.0.1/32:*"], &[]).await;
    redirect.set(origin);
    let tr = gw.transparent.unwrap();
    let r = tokio::task::spawn_blocking(move || {
        raw_http(
            tr,
            "GET /ip HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert_eq!(e.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(e.rule, "allow_private:127.0.0.1/32:*");
    gw.stop().await;
}
