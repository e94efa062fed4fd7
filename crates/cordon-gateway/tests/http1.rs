//! The gateway's HTTP/1 engine through the explicit proxy: bodies of every framing in both
//! directions (larger than one copy buffer), request smuggling shapes refused before anything goes
//! upstream, pipelining, HTTP/1.0 clients, `Expect: 100-continue`, kept upstream connections
//! that upstream closed, and large downloads through the proxy and CONNECT delivering every byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cordon_gateway::{EventKind, Via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn gateway() -> (Running, FakeDns) {
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let gw = Running::start(
        policy(&["origin.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    (gw, dns)
}

/// Sends `request` and reads until the peer closes (bounded by a 10 s read timeout).
fn exchange(proxy: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// An upstream that answers every request on a connection with `response`, counting the
/// requests (heads) it saw, then closes after `per_conn` responses.
async fn scripted_upstream(
    response: &'static [u8],
    per_conn: usize,
) -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for _ in 0..per_conn {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    seen.fetch_add(1, Ordering::SeqCst);
                    if s.write_all(response).await.is_err() {
                        return;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_download_arrives_whole_through_the_proxy_and_through_connect() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, origin.port());
    let size = 20 * 1024 * 1024 + 7;
    for tunnel in [false, true] {
        let url = format!("http://origin.test:{port}/big?bytes={size}");
        let mut args = vec![
            "-sS".to_owned(),
            "--max-time".into(),
            "20".into(),
            "-x".into(),
            format!("http://{proxy}"),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{size_download} %{http_code}".into(),
        ];
        if tunnel {
            args.push("-p".into());
        }
        args.push(url);
        let (ok, out, err) =
            tokio::task::spawn_blocking(move || run(Command::new("curl").args(&args)))
                .await
                .unwrap();
        assert!(ok, "curl failed: {err}");
        assert_eq!(out, format!("{size} 200"), "tunnel={tunnel}");
    }
    let stats = gw.stop().await;
    // Plain HTTP inside a CONNECT tunnel is served request by request too: two request events.
    let events: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::HttpRequest)
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    for e in &events {
        assert!(e.bytes_down > size && e.bytes_down < size + 1024, "{e:?}");
    }
    assert!(stats.bytes_down >= 2 * size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tunnel_carries_megabytes_both_ways_exactly() {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(LOOPBACK, &[("echo.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["echo.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let (proxy, port) = (gw.proxy, echo.addr.port());
    // Neither TLS nor HTTP: a plain byte tunnel, spliced both ways.
    let data: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let back = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 19];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200 OK\r\n\r\n");
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        back
    })
    .await
    .unwrap();
    assert!(
        back == data,
        "echoed {} of {} bytes",
        back.len(),
        data.len()
    );
    gw.stop().await;
    let e = gw
        .events()
        .into_iter()
        .find(|e| e.kind == EventKind::Connection)
        .unwrap();
    assert_eq!(
        (e.via, e.bytes_up, e.bytes_down),
        (Via::Connect, data.len() as u64, data.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_of_every_framing_reach_upstream_exactly() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, origin.port());
    // Small and large Content-Length bodies (the large one spans many copy buffers), then
    // chunked ones with a chunk larger than one copy buffer.
    for len in [0usize, 10, 200_000, 3 * 1024 * 1024] {
        let mut req = format!(
            "POST http://origin.test:{port}/echo HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend(std::iter::repeat_n(b'z', len));
        let out = tokio::task::spawn_blocking(move || exchange(proxy, &req))
            .await
            .unwrap();
        let r = parse_response(&out).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("received {len} bytes"));
    }
    let mut req = format!(
        "POST http://origin.test:{port}/echo HTTP/1.1\r\nHost: origin.test:{port}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let mut total = 0;
    for len in [5usize, 300_000, 1, 70_000] {
        req.extend(format!("{len:x};ext=1\r\n").as_bytes());
        req.extend(std::iter::repeat_n(b'c', len));
        req.extend(b"\r\n");
        total += len;
    }
    req.extend(b"0\r\nX-Trailer: dropped\r\n\r\n");
    let out = tokio::task::spawn_blocking(move || exchange(proxy, &req))
        .await
        .unwrap();
    let r = parse_response(&out).unwrap();
    assert_eq!(r.text(), format!("received {total} bytes"));
    let e = gw
        .wait_event(|e| e.kind == EventKind::HttpRequest && e.bytes_up > 3 * 1024 * 1024)
        .await;
    assert_eq!(e.method.as_deref(), Some("POST"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_shaped_requests_are_refused_and_nothing_reaches_upstream() {
    let (origin, stats) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, origin.port());
    let head =
        format!("POST http://origin.test:{port}/echo HTTP/1.1\r\nHost: origin.test:{port}\r\n");
    for framing in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 4\r\nContent-Length: 5\r\n",
        "Content-Length: -4\r\n",
    ] {
        let req = format!("{head}{framing}\r\n0\r\n\r\nGET http://origin.test:{port}/smuggled HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n");
        let out = tokio::task::spawn_blocking(move || exchange(proxy, req.as_bytes()))
            .await
            .unwrap();
        let r = parse_response(&out).unwrap();
        assert!(r.status == 400 || r.status == 501, "{framing:?}: {r:?}");
        assert_eq!(r.header("connection"), Some("close"));
        // Exactly one response: the smuggled request was never read as a request.
        assert_eq!(out.windows(9).filter(|w| w == b"HTTP/1.1 ").count(), 1);
    }
    assert_eq!(stats.requests(), 0);
    assert_eq!(stats.connections(), 0);
    let refused = gw
        .events()
        .iter()
        .filter(|e| e.rule == "bad-request")
        .count();
    assert_eq!(refused, 5);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_each_is_decided() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, origin.port());
    let req = format!(
        "GET http://origin.test:{port}/one HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n\
         GET http://evil.example/two HTTP/1.1\r\nHost: evil.example\r\n\r\n\
         GET http://origin.test:{port}/three HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
    );
    let out = tokio::task::spawn_blocking(move || exchange(proxy, req.as_bytes()))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let one = text.find("path=/one").unwrap();
    let refused = text.find("HTTP/1.1 403").unwrap();
    let three = text.find("path=/three").unwrap();
    assert!(one < refused && refused < three, "{text}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_is_rechunked_for_http_11_and_unchunked_for_http_10() {
    static RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-T: 1\r\n\r\n";
    let (up, _) = scripted_upstream(RESPONSE, 10).await;
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, up.port());
    let req11 = format!(
        "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
    );
    let out = tokio::task::spawn_blocking(move || exchange(proxy, req11.as_bytes()))
        .await
        .unwrap();
    let r = parse_response(&out).unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("x-up"), Some("1"));
    assert_eq!(r.text(), "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let req10 =
        format!("GET http://origin.test:{port}/ HTTP/1.0\r\nHost: origin.test:{port}\r\n\r\n");
    let out = tokio::task::spawn_blocking(move || exchange(proxy, req10.as_bytes()))
        .await
        .unwrap();
    let r = parse_response(&out).unwrap();
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.text(), "hello world");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_upstream_that_closed_is_replaced_not_reused() {
    // Upstream answers one request per connection, then closes.
    static RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let (up, seen) = scripted_upstream(RESPONSE, 1).await;
    let (mut gw, _dns) = gateway().await;
    let (proxy, port) = (gw.proxy, up.port());
    let statuses = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            write!(
                s,
                "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
            )
            .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            statuses.push(parse_response(&buf[..n]).unwrap().status);
            // Let the upstream's close reach the gateway before the next request.
            std::thread::sleep(Duration::from_millis(100));
        }
        statuses
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec![200, 200, 200]);
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_expect_100_continue_is_not_held_up() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mut gw, _dns) = gateway().await;
    let dir = std::env::temp_dir().join(format!("cordon-gw-expect-{}", std::process::id()));
    std::fs::write(&dir, vec![b'e'; 2 * 1024 * 1024]).unwrap();
    let (proxy, port) = (gw.proxy, origin.port());
    let file = dir.clone();
    let started = std::time::Instant::now();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(Command::new("curl")
            .args(["-sS", "--max-time", "10", "-x", &format!("http://{proxy}")])
            .args(["-H", "Expect: 100-continue", "--expect100-timeout", "5"])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(format!("http://origin.test:{port}/echo")))
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&dir);
    assert!(ok, "{err}");
    assert_eq!(out, format!("received {} bytes", 2 * 1024 * 1024));
    // curl waits up to --expect100-timeout for the 100; the gateway answers at once.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await;
}
