//! Domain fronting through a TLS 1.3 HelloRetryRequest: after a server asks for a retry, the
//! client sends a second plaintext ClientHello, which could name another host than the first
//! (a CDN-fronted host on the same address). A tunnel must check it like the first one, and
//! must not let a client slip a second ClientHello upstream before the server has answered.
//!
//! Each attack has its control: the same conversation naming the allowed host goes through. A
//! real rustls handshake that needs a retry (the client's first key share is a group the server
//! does not take) still works end to end. Everything stays on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tls_origin::{TestCa, TlsOrigin};
use common::*;
use cordon_gateway::hrr::testing::{server_hello, CHANGE_CIPHER_SPEC};
use cordon_gateway::hrr::{ServerFirst, ServerHelloScan};
use cordon_gateway::sni::testing::client_hello;
use cordon_gateway::{EventKind, NetEvent, Verdict, Via};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ALLOWED: &str = "front.test";

/// A scripted TLS "server": records every byte it receives and, each time the bytes received
/// reach a threshold, sends the reply paired with it.
struct FakeServer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
}

impl FakeServer {
    async fn start(script: Vec<(usize, Vec<u8>)>) -> FakeServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let received: Arc<Mutex<Vec<u8>>> = Arc::default();
        let r = received.clone();
        tokio::spawn(async move {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut script = script.into_iter().peekable();
            let mut buf = vec![0u8; 65536];
            loop {
                let got = r.lock().unwrap().len();
                if let Some((_, reply)) = script.next_if(|(at, _)| *at <= got) {
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    continue;
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => r.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        FakeServer { addr, received }
    }

    fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

async fn gateway() -> (Running, FakeDns) {
    let dns = FakeDns::start(LOOPBACK, &[(ALLOWED, &[LOOPBACK])]).await;
    let gw = Running::start(
        policy(&[&format!("{ALLOWED}:*")], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    (gw, dns)
}

/// A CONNECT tunnel to `ALLOWED:port`, after the proxy's 200.
async fn connect(proxy: SocketAddr, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let target = format!("{ALLOWED}:{port}");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "proxy closed");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    s
}

/// Reads until EOF (or an error, or 10 s): what came.
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut out))
        .await
        .expect("timed out")
        .unwrap();
    out
}

/// The retry request a server sends, followed by its middlebox-compatibility CCS.
fn hello_retry() -> Vec<u8> {
    let mut hrr = server_hello(true, 16384);
    hrr.extend_from_slice(&CHANGE_CIPHER_SPEC);
    hrr
}

async fn blocked_event(gw: &Running) -> NetEvent {
    gw.wait_event(|e| e.kind == EventKind::Blocked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_hello_naming_another_host_is_refused_and_never_reaches_the_server() {
    let (mut gw, _dns) = gateway().await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    let hrr = hello_retry();
    let server = FakeServer::start(vec![(ch1.len(), hrr.clone())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    s.write_all(&ch1).await.unwrap();
    assert_eq!(read_exactly(&mut s, hrr.len()).await, hrr);
    // Middlebox compatibility: a CCS, then the retried hello naming the fronted host.
    let mut ch2 = CHANGE_CIPHER_SPEC.to_vec();
    ch2.extend_from_slice(&client_hello(Some("exfil.evil.example"), 100));
    s.write_all(&ch2).await.unwrap();
    // The tunnel is closed; nothing more comes back.
    assert!(read_to_end(&mut s).await.is_empty());
    let e = blocked_event(&gw).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.received(),
        ch1,
        "the server got more than the first ClientHello"
    );
    assert_eq!(e.rule, "sni-mismatch");
    let reason = e.reason.clone().unwrap();
    assert!(reason.contains("retried ClientHello"), "{reason}");
    assert!(reason.contains("exfil.evil.example"), "{reason}");
    assert_eq!((e.via, e.verdict), (Via::Connect, Verdict::Block));
    assert_eq!(e.method.as_deref(), Some("CONNECT"));
    assert_eq!(e.host.as_deref(), Some(ALLOWED));
    assert_eq!(
        (e.bytes_up, e.bytes_down),
        (ch1.len() as u64, hrr.len() as u64)
    );
    gw.stop().await;
    assert!(gw.events().iter().all(|e| e.kind != EventKind::Connection));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_hello_naming_the_same_host_goes_through() {
    let (mut gw, _dns) = gateway().await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    let hrr = hello_retry();
    let mut ch2 = CHANGE_CIPHER_SPEC.to_vec();
    ch2.extend_from_slice(&client_hello(Some("Front.Test"), 100));
    let mut finish = server_hello(false, 16384);
    finish.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x03, 1, 2, 3]);
    let server = FakeServer::start(vec![
        (ch1.len(), hrr.clone()),
        (ch1.len() + ch2.len(), finish.clone()),
    ])
    .await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    s.write_all(&ch1).await.unwrap();
    assert_eq!(read_exactly(&mut s, hrr.len()).await, hrr);
    s.write_all(&ch2).await.unwrap();
    assert_eq!(read_exactly(&mut s, finish.len()).await, finish);
    s.shutdown().await.unwrap();
    drop(s);
    let e = gw.wait_event(|e| e.kind == EventKind::Connection).await;
    assert_eq!(server.received(), [ch1.clone(), ch2.clone()].concat());
    assert_eq!(
        (e.bytes_up, e.bytes_down),
        (
            (ch1.len() + ch2.len()) as u64,
            (hrr.len() + finish.len()) as u64
        )
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_hello_sent_before_the_server_answers_is_held_and_refused() {
    let (mut gw, _dns) = gateway().await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    let hrr = hello_retry();
    let server = FakeServer::start(vec![(ch1.len(), hrr.clone())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    // Both hellos at once, before any answer: the second must wait for the server's answer.
    let mut both = ch1.clone();
    both.extend_from_slice(&client_hello(Some("exfil.evil.example"), 16384));
    s.write_all(&both).await.unwrap();
    // The client still gets the retry request (it was relayed), then the tunnel closes.
    assert_eq!(read_to_end(&mut s).await, hrr);
    let e = blocked_event(&gw).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.received(), ch1);
    assert_eq!(e.rule, "sni-mismatch");
    assert!(e.reason.as_deref().unwrap().contains("retried ClientHello"));
    assert_eq!(
        (e.bytes_up, e.bytes_down),
        (ch1.len() as u64, hrr.len() as u64)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_client_hellos_in_one_record_are_refused_before_anything_goes_upstream() {
    let (mut gw, _dns) = gateway().await;
    let one = client_hello(Some(ALLOWED), 16384);
    let two = client_hello(Some("exfil.evil.example"), 16384);
    let mut hs = one[5..].to_vec();
    hs.extend_from_slice(&two[5..]);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    let server = FakeServer::start(vec![(one.len(), hello_retry())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    s.write_all(&record).await.unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    let e = blocked_event(&gw).await;
    assert_eq!(e.rule, "bad-client-hello");
    assert!(server.received().is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_server_hello_lets_the_tunnel_carry_everything_with_exact_byte_counts() {
    let (mut gw, _dns) = gateway().await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    // The client pipelines a CCS and early data after its hello; they wait for the answer.
    let early = [
        &CHANGE_CIPHER_SPEC[..],
        &[0x17, 0x03, 0x03, 0x00, 0x04, 9, 9, 9, 9],
    ]
    .concat();
    let mut answer = server_hello(false, 20);
    let app = [vec![0x17, 0x03, 0x03, 0x10, 0x00], vec![0xab; 4096]].concat();
    answer.extend_from_slice(&app);
    let later = [vec![0x17, 0x03, 0x03, 0x01, 0xf4], vec![0xcd; 500]].concat();
    let server = FakeServer::start(vec![(ch1.len(), answer.clone())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    s.write_all(&[ch1.clone(), early.clone()].concat())
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut s, answer.len()).await, answer);
    s.write_all(&later).await.unwrap();
    s.shutdown().await.unwrap();
    let e = gw.wait_event(|e| e.kind == EventKind::Connection).await;
    let up = [ch1.clone(), early.clone(), later.clone()].concat();
    assert_eq!(server.received(), up);
    assert_eq!(
        (e.bytes_up, e.bytes_down),
        (up.len() as u64, answer.len() as u64)
    );
    assert_eq!(e.verdict, Verdict::Allow);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_the_retried_hello_is_refused_after_the_first_bytes_wait() {
    let (mut gw, _dns) = gateway().await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    let hrr = hello_retry();
    let server = FakeServer::start(vec![(ch1.len(), hrr.clone())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    s.write_all(&ch1).await.unwrap();
    assert_eq!(read_exactly(&mut s, hrr.len()).await, hrr);
    // Half of a retried hello, then silence past the wait.
    let ch2 = client_hello(Some(ALLOWED), 16384);
    s.write_all(&ch2[..20]).await.unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    let e = blocked_event(&gw).await;
    assert_eq!(e.rule, "bad-client-hello");
    assert!(e.reason.as_deref().unwrap().contains("retried ClientHello"));
    assert_eq!(server.received(), ch1);
    gw.stop().await;
}

/// A TCP relay in front of an origin that records what the origin sends.
async fn tap(origin: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let down: Arc<Mutex<Vec<u8>>> = Arc::default();
    let d = down.clone();
    tokio::spawn(async move {
        let Ok((client, _)) = l.accept().await else {
            return;
        };
        let server = TcpStream::connect(origin).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
            let _ = sw.shutdown().await;
        };
        let down = async move {
            let mut buf = vec![0u8; 16384];
            loop {
                match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        d.lock().unwrap().extend_from_slice(&buf[..n]);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = cw.shutdown().await;
        };
        tokio::join!(up, down);
    });
    (addr, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tls13_handshake_with_a_hello_retry_request_works_through_connect() {
    use rustls::crypto::ring::kx_group::{SECP256R1, X25519};
    let ca = TestCa::new("hrr test CA");
    // The server takes only P-256; the client's first (and only) key share is X25519.
    let origin = TlsOrigin::start(
        "127.0.0.1:0".parse().unwrap(),
        ca.server_groups(&[ALLOWED], vec![SECP256R1]),
    )
    .await;
    let (tapped, down) = tap(origin.addr).await;
    let (mut gw, _dns) = gateway().await;

    let mut roots = rustls::RootCertStore::empty();
    for c in cordon_gateway::tls::pem_certs(ca.pem.as_bytes()) {
        roots.add(c).unwrap();
    }
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![X25519, SECP256R1],
        ..rustls::crypto::ring::default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = connect(gw.proxy, tapped.port()).await;
    let name = rustls::pki_types::ServerName::try_from(ALLOWED.to_owned()).unwrap();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    tls.write_all(
        format!("GET /retried HTTP/1.1\r\nHost: {ALLOWED}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut resp))
        .await
        .expect("response timed out")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("uri=/retried"), "{resp}");
    // The server really asked for a retry.
    let mut scan = ServerHelloScan::default();
    assert_eq!(
        scan.feed(&down.lock().unwrap()),
        ServerFirst::HelloRetry,
        "the origin did not send a HelloRetryRequest"
    );
    drop(tls);
    let e = gw.wait_event(|e| e.kind == EventKind::Connection).await;
    assert_eq!(e.bytes_down, down.lock().unwrap().len() as u64);
    assert!(e.bytes_up > 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_connection_checks_the_retried_client_hello_too() {
    let dns = FakeDns::start(LOOPBACK, &[(ALLOWED, &[LOOPBACK])]).await;
    let redirect = Redirect::new();
    let opts = Options {
        original_dst: Some(Arc::new(redirect.clone())),
        ..Options::default()
    };
    let mut gw = Running::start(
        policy(&[&format!("{ALLOWED}:*")], &["127.0.0.1/32:*"]),
        dns.addr,
        opts,
    )
    .await;
    let synthetic = gw.synthetic_for(ALLOWED).await;
    let ch1 = client_hello(Some(ALLOWED), 16384);
    let hrr = hello_retry();
    let server = FakeServer::start(vec![(ch1.len(), hrr.clone())]).await;
    redirect.set(SocketAddr::new(synthetic.into(), server.addr.port()));
    let mut s = TcpStream::connect(gw.transparent.unwrap()).await.unwrap();
    s.write_all(&ch1).await.unwrap();
    assert_eq!(read_exactly(&mut s, hrr.len()).await, hrr);
    s.write_all(&client_hello(Some("exfil.evil.example"), 16384))
        .await
        .unwrap();
    // Refused captured connections are reset.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let e = blocked_event(&gw).await;
    assert_eq!((e.via, e.rule.as_str()), (Via::Transparent, "sni-mismatch"));
    assert_eq!(server.received(), ch1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_after_the_server_spoke_first_is_refused() {
    // The server's answer to it could not be told from what it said before, so a retry request
    // could not be seen. (A silent client whose server said nothing is checked as usual:
    // first_bytes.rs.)
    let (mut gw, _dns) = gateway().await;
    let banner = b"220 smtp.front.test ESMTP\r\n".to_vec();
    let server = FakeServer::start(vec![(0, banner.clone())]).await;
    let mut s = connect(gw.proxy, server.addr.port()).await;
    // Silent past the first-bytes wait: the upstream connection opens and the banner comes.
    assert_eq!(read_exactly(&mut s, banner.len()).await, banner);
    s.write_all(&client_hello(Some(ALLOWED), 16384))
        .await
        .unwrap();
    assert!(read_to_end(&mut s).await.is_empty());
    let e = blocked_event(&gw).await;
    assert_eq!(e.rule, "bad-client-hello");
    assert_eq!((e.bytes_up, e.bytes_down), (0, banner.len() as u64));
    assert!(server.received().is_empty());
    gw.stop().await;
}
