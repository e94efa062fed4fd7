//! What a tunnelled or captured client says must name where it goes, however and whenever it
//! says it. The gateway classifies a CONNECT tunnel's (or captured connection's) first bytes as
//! TLS (checked by SNI), HTTP (served request by request, `Host` checked) or another protocol
//! (decided on the destination). These tests are the attacker's side of that classification: a
//! client that waits out the first-bytes timeout, dribbles its request line, starts it with an
//! empty line, or uses a method the classifier did not expect, must still not front another host
//! through an allowed one. Each attack has its control: the same bytes naming the allowed host
//! reach the origin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use cordon_gateway::sni::testing::client_hello;
use cordon_gateway::{EventKind, Verdict};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The gateway's first-bytes timeout in these tests (`Options::default`).
const FIRST_BYTES: Duration = Duration::from_millis(300);
/// Longer than the first-bytes timeout: the client "does not speak first".
const WAIT_OUT: Duration = Duration::from_millis(700);

/// One step of a client's side of the conversation.
#[derive(Clone)]
enum Step {
    Send(Vec<u8>),
    Pause(Duration),
}

fn send(b: impl AsRef<[u8]>) -> Step {
    Step::Send(b.as_ref().to_vec())
}

fn http_to(host: &str) -> Vec<u8> {
    format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// How the client reaches the gateway.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// `CONNECT origin.test:PORT` on the explicit proxy.
    Connect,
    /// A connection to origin.test's synthetic address, captured.
    Transparent,
}

struct Setup {
    gw: Running,
    echo: Echo,
    redirect: Redirect,
    _dns: FakeDns,
}

async fn setup() -> Setup {
    let echo = Echo::start("127.0.0.1:0".parse().unwrap()).await;
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let redirect = Redirect::new();
    let opts = Options {
        original_dst: Some(Arc::new(redirect.clone())),
        ..Options::default()
    };
    assert_eq!(opts.timeouts.first_bytes, FIRST_BYTES);
    let gw = Running::start(
        policy(&["origin.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        opts,
    )
    .await;
    let synthetic = gw.synthetic_for("origin.test").await;
    redirect.set(SocketAddr::new(synthetic.into(), echo.addr.port()));
    Setup {
        gw,
        echo,
        redirect,
        _dns: dns,
    }
}

/// Plays `steps` on `path` and then reads (up to 2 s) until the gateway or origin closes.
/// Returns what the client received.
async fn play(s: &Setup, path: Path, steps: &[Step]) -> Vec<u8> {
    let (proxy, transparent, port) = (s.gw.proxy, s.gw.transparent.unwrap(), s.echo.addr.port());
    let steps = steps.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut c = match path {
            Path::Connect => {
                let mut c = std::net::TcpStream::connect(proxy).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(
                    format!(
                        "CONNECT origin.test:{port} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .unwrap();
                let mut head = [0u8; 19];
                c.read_exact(&mut head).unwrap();
                assert_eq!(&head, b"HTTP/1.1 200 OK\r\n\r\n");
                c
            }
            Path::Transparent => std::net::TcpStream::connect(transparent).unwrap(),
        };
        for step in steps {
            match step {
                // The gateway may already have closed: later writes can fail, which is fine.
                Step::Send(b) => {
                    let _ = c.write_all(&b);
                }
                Step::Pause(d) => std::thread::sleep(d),
            }
        }
        // Done talking: an echoing origin then closes, and so the read below ends.
        let _ = c.shutdown(std::net::Shutdown::Write);
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    })
    .await
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `attack` and its `control` on both paths: the control's marker reaches the origin, the
/// attack's never does, and the attack leaves a blocked event.
async fn attack_fails_and_control_passes(name: &str, attack: &[Step], control: Option<&[Step]>) {
    for path in [Path::Connect, Path::Transparent] {
        let mut s = setup().await;
        if let Some(control) = control {
            play(&s, path, control).await;
            assert!(
                contains(&s.echo.received(), b"origin.test"),
                "{name} via {path:?}: the control did not reach the origin: {:?}",
                String::from_utf8_lossy(&s.echo.received())
            );
        }
        let before = s.echo.received().len();
        let answer = play(&s, path, attack).await;
        let got = s.echo.received();
        assert!(
            !contains(&got[before..], b"evil.test") && !contains(&got[before..], b"HTTP/1.1\r\n"),
            "{name} via {path:?}: the origin received a request naming evil.test through a \
             tunnel decided for origin.test: {:?} (client got {:?})",
            String::from_utf8_lossy(&got[before..]),
            String::from_utf8_lossy(&answer)
        );
        let blocked =
            s.gw.wait_event(|e| e.kind == EventKind::Blocked && e.verdict == Verdict::Block)
                .await;
        assert!(
            ["host-mismatch", "sni-mismatch", "bad-request", "late-http"]
                .contains(&blocked.rule.as_str()),
            "{name} via {path:?}: {blocked:?}"
        );
        drop(s.redirect);
        s.gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sent_after_the_first_bytes_timeout_must_name_the_destination() {
    attack_fails_and_control_passes(
        "silent, then HTTP",
        &[Step::Pause(WAIT_OUT), send(http_to("evil.test"))],
        Some(&[Step::Pause(WAIT_OUT), send(http_to("origin.test"))]),
    )
    .await;
}

/// The upstream connection opened for a client that then turns out to speak HTTP late is
/// recorded too (closed unused), besides the request it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_opened_for_a_silent_client_that_then_sends_http_is_recorded() {
    for path in [Path::Connect, Path::Transparent] {
        let mut s = setup().await;
        play(
            &s,
            path,
            &[Step::Pause(WAIT_OUT), send(http_to("origin.test"))],
        )
        .await;
        let unused =
            s.gw.wait_event(|e| {
                e.kind == EventKind::Connection
                    && e.reason
                        .as_deref()
                        .is_some_and(|r| r.contains("closed unused"))
            })
            .await;
        assert_eq!(unused.host.as_deref(), Some("origin.test"), "{path:?}");
        assert_eq!((unused.bytes_up, unused.bytes_down), (0, 0), "{path:?}");
        s.gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
        s.gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_after_the_first_bytes_timeout_must_name_the_destination() {
    attack_fails_and_control_passes(
        "silent, then TLS",
        &[
            Step::Pause(WAIT_OUT),
            send(client_hello(Some("evil.test"), 200)),
        ],
        Some(&[
            Step::Pause(WAIT_OUT),
            send(client_hello(Some("origin.test"), 200)),
        ]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_line_dribbled_past_the_timeout_never_completes_upstream() {
    // The start of the line may go upstream (a server does nothing with half a line), its end
    // never does. The control, a dribbled line that is not HTTP, is in
    // `protocols_that_are_not_http_still_tunnel_untouched`.
    let rest = |host: &str| {
        let mut r = http_to(host);
        r.remove(0);
        r
    };
    attack_fails_and_control_passes(
        "G, pause, ET / …",
        &[send("G"), Step::Pause(WAIT_OUT), send(rest("evil.test"))],
        None,
    )
    .await;
    // A request line longer than the first-bytes peek (64 KiB) is watched to its end the same way.
    let long = format!(
        "{} /x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        "A".repeat(70_000)
    );
    attack_fails_and_control_passes("70 000-letter method", &[send(long)], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_an_empty_line_must_name_the_destination() {
    // RFC 9112 section 2.2: a server SHOULD ignore at least one empty line before the request
    // line, and nginx, Node and Go do.
    let with_crlf = |host: &str| [b"\r\n\r\n".to_vec(), http_to(host)].concat();
    attack_fails_and_control_passes(
        "CRLF CRLF GET …",
        &[send(with_crlf("evil.test"))],
        Some(&[send(with_crlf("origin.test"))]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_an_unusual_method_must_name_the_destination() {
    // Go's net/http serves any token as a method; WebDAV has methods longer than ten letters.
    for method in ["get", "MKWORKSPACE", "VERSION-CONTROL"] {
        let req = |host: &str| {
            format!("{method} /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .into_bytes()
        };
        attack_fails_and_control_passes(
            method,
            &[send(req("evil.test"))],
            Some(&[send(req("origin.test"))]),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocols_that_are_not_http_still_tunnel_untouched() {
    // An SSH client's banner (with its space), a server-first dialogue's reply, a binary
    // protocol: none of them is taken for HTTP, all reach the origin byte for byte.
    let ssh = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n".to_vec();
    let binary = vec![0u8, 0, 0, 8, 4, 210, 22, 47];
    for path in [Path::Connect, Path::Transparent] {
        for (name, steps) in [
            ("ssh banner", vec![send(&ssh)]),
            (
                "silent, then a command",
                vec![Step::Pause(WAIT_OUT), send("EHLO x\r\n")],
            ),
            (
                "a dribbled command",
                vec![send("EHL"), Step::Pause(WAIT_OUT), send("O x\r\nQUIT\r\n")],
            ),
            ("a bare word", vec![send("ping")]),
            ("binary", vec![send(&binary)]),
        ] {
            let mut s = setup().await;
            let back = play(&s, path, &steps).await;
            let sent: Vec<u8> = steps
                .iter()
                .flat_map(|st| match st {
                    Step::Send(b) => b.clone(),
                    Step::Pause(_) => Vec::new(),
                })
                .collect();
            assert_eq!(s.echo.received(), sent, "{name} via {path:?}");
            assert_eq!(back, sent, "{name} via {path:?}: the echo came back");
            s.gw.stop().await;
            let e =
                s.gw.events()
                    .into_iter()
                    .find(|e| e.kind == EventKind::Connection)
                    .unwrap_or_else(|| panic!("{name} via {path:?}: {:#?}", s.gw.events()));
            assert_eq!(e.bytes_up, sent.len() as u64, "{name} via {path:?}");
        }
    }
}
