//! A credential's host that echoes what it received must not hand the real secret back to the
//! sandbox in any form the sandbox can decode: the `Basic` header the gateway built (base64),
//! the query parameter it rewrote (percent-encoded), or a compressed body. The attacker's side:
//! curl in the "sandbox" asks an echoing origin for its own request back and decodes the answer.
//! The control: the same echo from an intercepted host that holds no credential is untouched.
//!
//! Everything stays on 127.0.0.0/8.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::tls_origin::TestCa;
use common::*;
use cordon_gateway::creds::{LiveCredential, Secret};
use cordon_gateway::tls::{pem_certs, upstream_config, SessionCa};
use cordon_gateway::{EventKind, InterceptConfig, DEFAULT_MAX_SCAN_BYTES};
use cordon_policy::host::HostName;
use cordon_policy::{Credential, Injection, InterceptHost, SecretSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Printable, with characters that base64 and percent-encoding change.
const SECRET: &str = "s3cr3t+Value/With=Chars_0123";
const PH_BASIC: &str = "cordon-placeholder-11111111111111111111111111111111";
const PH_QUERY: &str = "cordon-placeholder-22222222222222222222222222222222";
/// A header credential whose secret can be a header name (lowercase token characters only:
/// HTTP/2 names are lowercase).
const KEY_SECRET: &str = "k3y-lower-0123456789abcdef";
const PH_KEY: &str = "cordon-placeholder-33333333333333333333333333333333";
/// Both ways a client can speak to an intercepted host.
const PROTOS: [&str; 2] = ["--http1.1", "--http2"];

/// An HTTPS origin that answers every request with its own request head as the body, gzipped
/// (`Content-Encoding: gzip`, whatever the request asked) when the path starts with `/gzip`.
/// Records the request heads it saw.
struct EchoOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import gzip,sys; sys.stdout.buffer.write(gzip.compress(sys.stdin.buffer.read()))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 for gzip");
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

impl EchoOrigin {
    async fn start(config: Arc<rustls::ServerConfig>) -> EchoOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let acceptor = TlsAcceptor::from(config);
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    log.lock().unwrap().push(text.clone());
                    let path = text.split(' ').nth(1).unwrap_or("").to_owned();
                    if let Some(resp) = special_response(&path, &text).await {
                        let _ = tls.write_all(&resp).await;
                        let _ = tls.shutdown().await;
                        return;
                    }
                    let compressed = text.split(' ').nth(1).unwrap_or("").starts_with("/gzip");
                    let (body, coding) = if compressed {
                        let body = tokio::task::spawn_blocking(move || gzip(text.as_bytes()))
                            .await
                            .unwrap();
                        (body, "content-encoding: gzip\r\n")
                    } else {
                        (text.into_bytes(), "")
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{coding}content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        EchoOrigin { addr, seen }
    }
}

/// The value of request header `name` (any letter case) in a request head.
fn header_in(head: &str, name: &str) -> String {
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default()
}

/// The echo origin's answers that are not a plain echo of the head:
/// - `/hname`: the `x-key` request header's value comes back as a response header's name;
/// - `/tegzip`: the echo, gzipped as a transfer coding (`Transfer-Encoding: gzip, chunked`);
/// - `/early`: a `103 Early Hints` whose `Link` holds the `x-key` value, then the final answer.
async fn special_response(path: &str, head: &str) -> Option<Vec<u8>> {
    let key = header_in(head, "x-key");
    match path {
        "/hname" => Some(
            format!(
                "HTTP/1.1 200 OK\r\nx-{key}: 1\r\nx-after: 1\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            )
            .into_bytes(),
        ),
        "/tegzip" => {
            let text = head.to_owned();
            let body = tokio::task::spawn_blocking(move || gzip(text.as_bytes()))
                .await
                .unwrap();
            let mut out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
            Some(out)
        }
        "/early" => Some(
            format!(
                "HTTP/1.1 103 Early Hints\r\nlink: </style.css?k={key}>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            )
            .into_bytes(),
        ),
        _ => None,
    }
}

fn credential(name: &str, inject: Injection, format: &str, placeholder: &str) -> LiveCredential {
    LiveCredential {
        spec: Credential {
            name: name.into(),
            hosts: vec![HostName::parse("api.test").unwrap()],
            inject,
            format: format.into(),
            source: SecretSource::Env(name.to_uppercase()),
            env: name.to_uppercase(),
            require: false,
        },
        placeholder: placeholder.into(),
        secret: Secret::new(SECRET),
    }
}

struct World {
    _dns: FakeDns,
    api: EchoOrigin,
    other: EchoOrigin,
    gw: Running,
    ca_file: tempfile::NamedTempFile,
}

/// `api.test` holds two credentials (basic auth and a query parameter), `other.test` is
/// intercepted and holds none; both echo.
async fn world() -> World {
    let upstream_ca = TestCa::new("fake upstream CA");
    let api = EchoOrigin::start(upstream_ca.server(&["api.test"])).await;
    let other = EchoOrigin::start(upstream_ca.server(&["other.test"])).await;
    let dns = FakeDns::start(
        LOOPBACK,
        &[("api.test", &[LOOPBACK]), ("other.test", &[LOOPBACK])],
    )
    .await;
    let mut network = policy(&["api.test:*", "other.test:*"], &["127.0.0.1/32:*"]);
    network.intercept = vec![InterceptHost::parse("other.test").unwrap()];
    let creds = vec![
        credential("basic", Injection::BasicAuth, "{secret}", PH_BASIC),
        credential(
            "query",
            Injection::Query("access_token".into()),
            "{secret}",
            PH_QUERY,
        ),
        LiveCredential {
            secret: Secret::new(KEY_SECRET),
            ..credential(
                "hkey",
                Injection::Header("X-Key".into()),
                "{secret}",
                PH_KEY,
            )
        },
    ];
    let specs: Vec<Credential> = creds.iter().map(|c| c.spec.clone()).collect();
    let hosts = InterceptConfig::hosts_for(&network, &specs);
    let ca = SessionCa::generate("sess-1", &hosts).unwrap();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca.cert_pem()).unwrap();
    let intercept = InterceptConfig {
        ca,
        hosts,
        credentials: creds,
        upstream: upstream_config(&[], &pem_certs(upstream_ca.pem.as_bytes())).unwrap(),
        max_scan_bytes: DEFAULT_MAX_SCAN_BYTES,
    };
    let opts = Options {
        intercept: Some(Arc::new(intercept)),
        ..Options::default()
    };
    let gw = Running::start(network, dns.addr, opts).await;
    World {
        _dns: dns,
        api,
        other,
        gw,
        ca_file,
    }
}

impl World {
    fn url(&self, host: &str, path: &str) -> String {
        let port = match host {
            "api.test" => self.api.addr.port(),
            _ => self.other.addr.port(),
        };
        format!("https://{host}:{port}{path}")
    }

    /// curl through the proxy, speaking `proto` (`--http1.1` or `--http2`) to the gateway;
    /// returns its exit status and output (head and decoded body).
    async fn curl(&self, proto: &str, args: &[&str]) -> (bool, String) {
        let args: Vec<&str> = std::iter::once(proto).chain(args.iter().copied()).collect();
        let proxy: SocketAddr = self.gw.proxy;
        let ca = self.ca_file.path().to_owned();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            run(Command::new("curl")
                .args([
                    "-sS",
                    "-i",
                    "--max-time",
                    "10",
                    "-x",
                    &format!("http://{proxy}"),
                ])
                .arg("--suppress-connect-headers")
                .arg("--cacert")
                .arg(&ca)
                .args(&args))
        })
        .await
        .unwrap();
        (ok, format!("{out}{err}"))
    }
}

/// Every way the sandbox could read the secret back out of `text`: as it is, from any base64
/// run (standard or URL-safe, any alignment), or percent-decoded.
fn recovers_secret(text: &str) -> bool {
    if text.contains(SECRET) {
        return true;
    }
    let b64 = |c: char| c.is_ascii_alphanumeric() || "+/=-_".contains(c);
    for run in text.split(|c: char| !b64(c)).filter(|r| r.len() >= 8) {
        for start in 0..4.min(run.len()) {
            let part = run[start..].trim_end_matches('=');
            for engine in [
                base64::engine::general_purpose::STANDARD_NO_PAD,
                base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                let cut = part.len() - part.len() % 4;
                for p in [part, &part[..cut]] {
                    if let Ok(plain) = engine.decode(p) {
                        if String::from_utf8_lossy(&plain).contains(SECRET) {
                            return true;
                        }
                    }
                }
            }
        }
    }
    let decoded: String = {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    decoded.contains(SECRET)
}

#[test]
fn the_decoder_finds_the_secret_in_every_form_the_attack_uses() {
    let engine = base64::engine::general_purpose::STANDARD;
    for prefix in ["", "u:", "us:", "use:"] {
        let blob = engine.encode(format!("{prefix}{SECRET}"));
        assert!(
            recovers_secret(&format!("authorization=Basic {blob}\r\n")),
            "{prefix}"
        );
    }
    assert!(recovers_secret(
        "GET /q?access_token=s3cr3t%2BValue%2FWith%3DChars_0123 HTTP/1.1"
    ));
    assert!(!recovers_secret("authorization=Basic ********************"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_basic_auth_header_does_not_give_the_secret_back() {
    let w = world().await;
    for proto in PROTOS {
        // Every alignment of the secret inside the base64 blob: the user name sets it.
        for user in ["u", "us", "use"] {
            let cred = format!("{user}:{PH_BASIC}");
            let (ok, out) = w
                .curl(proto, &["-u", &cred, &w.url("api.test", "/echo")])
                .await;
            assert!(ok, "{out}");
            let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
            // Upstream got the real secret (the control: injection worked) ...
            let want = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{SECRET}"));
            assert!(seen.contains(&want), "{seen}");
            // ... and the sandbox cannot decode it out of the echo.
            assert!(!recovers_secret(&out), "{proto} user {user}: {out}");
        }
    }
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "response-redacted:secret:basic")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_query_parameter_does_not_give_the_secret_back_percent_encoded() {
    let w = world().await;
    let url = w.url("api.test", &format!("/echo?access_token={PH_QUERY}"));
    for proto in PROTOS {
        let (ok, out) = w.curl(proto, &[&url]).await;
        assert!(ok, "{out}");
        let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
        assert!(
            seen.contains("access_token=s3cr3t%2BValue%2FWith%3DChars_0123"),
            "{seen}"
        );
        assert!(!recovers_secret(&out), "{proto}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_echo_from_a_credential_host_is_never_relayed() {
    let w = world().await;
    for proto in PROTOS {
        // Control: an intercepted host without credentials may compress; curl decodes the echo.
        let (ok, out) = w
            .curl(proto, &["--compressed", &w.url("other.test", "/gzip")])
            .await;
        assert!(ok, "{proto}: {out}");
        assert!(out.contains("GET /gzip HTTP/1.1"), "{proto}: {out}");
        // The attack: the credential's host gzips its echo of the injected header.
        let cred = format!("u:{PH_BASIC}");
        let url = w.url("api.test", "/gzip");
        let (_, out) = w.curl(proto, &["--compressed", "-u", &cred, &url]).await;
        assert!(!recovers_secret(&out), "{proto}: {out}");
        assert!(!out.contains("GET /gzip HTTP/1.1"), "{proto}: {out}");
        // Refused on the protocol asked for (HTTP/2 goes through intercept_h2).
        let status = match proto {
            "--http2" => "HTTP/2 502",
            _ => "HTTP/1.1 502",
        };
        assert!(out.contains(status), "{proto}: {out}");
        // The request asked for no encoding: a server that honours it never compresses.
        let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
        assert!(
            seen.to_ascii_lowercase()
                .contains("accept-encoding: identity\r\n"),
            "{proto}: {seen}"
        );
    }
    let refused: Vec<_> =
        w.gw.events()
            .into_iter()
            .filter(|e| e.kind == EventKind::HttpRequest && e.host.as_deref() == Some("api.test"))
            .collect();
    assert_eq!(refused.len(), 2, "{refused:#?}");
    assert!(
        refused.iter().all(|e| e.rule == "response-encoded"),
        "{refused:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_host_is_never_asked_for_part_of_a_response() {
    // A `Range` answer could hand back a few bytes of an echoed secret per request, slices no
    // redaction form matches: the credential's host gets whole requests only.
    let w = world().await;
    for proto in PROTOS {
        let cred = format!("u:{PH_BASIC}");
        let url = w.url("api.test", "/echo");
        let (ok, out) = w.curl(proto, &["-r", "40-47", "-u", &cred, &url]).await;
        assert!(ok, "{proto}: {out}");
        let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
        assert!(
            !seen.to_ascii_lowercase().contains("\r\nrange:"),
            "{proto}: {seen}"
        );
        assert!(!recovers_secret(&out), "{proto}: {out}");
        // Control: a host without credentials gets the client's Range as sent.
        let (ok, out) = w
            .curl(proto, &["-r", "0-3", &w.url("other.test", "/echo")])
            .await;
        assert!(ok, "{proto}: {out}");
        let seen = w.other.seen.lock().unwrap().last().cloned().unwrap();
        assert!(
            seen.to_ascii_lowercase()
                .contains("\r\nrange: bytes=0-3\r\n"),
            "{proto}: {seen}"
        );
    }
}

/// Waits until `n` events satisfy `f`; fails the test after 5 s.
async fn wait_count(w: &World, n: usize, f: impl Fn(&cordon_gateway::NetEvent) -> bool) {
    for _ in 0..500 {
        let got = w.gw.events().iter().filter(|e| f(e)).count();
        if got >= n {
            assert_eq!(got, n, "{:#?}", w.gw.events());
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} matching events: {:#?}", w.gw.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_in_a_response_header_name_does_not_reach_the_sandbox() {
    let w = world().await;
    let hdr = format!("X-Key: {PH_KEY}");
    for (i, proto) in PROTOS.iter().enumerate() {
        let (ok, out) = w
            .curl(proto, &["-H", &hdr, &w.url("api.test", "/hname")])
            .await;
        assert!(ok, "{proto}: {out}");
        // Control: the origin got the real value, and its answer came through.
        let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
        assert!(seen.contains(KEY_SECRET), "{seen}");
        assert!(
            out.to_ascii_lowercase().contains("x-after: 1"),
            "{proto}: {out}"
        );
        assert!(!out.contains(KEY_SECRET), "{proto}: {out}");
        wait_count(&w, i + 1, |e| {
            e.kind == EventKind::Alert && e.rule == "response-redacted:secret:hkey"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_transfer_coding_from_a_credential_host_is_never_relayed() {
    let w = world().await;
    let cred = format!("u:{PH_BASIC}");
    let url = w.url("api.test", "/tegzip");
    for proto in PROTOS {
        let (_, out) = w.curl(proto, &["--raw", "-u", &cred, &url]).await;
        // Control: the origin got the real value (and gzipped its echo of it).
        let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
        let want = base64::engine::general_purpose::STANDARD.encode(format!("u:{SECRET}"));
        assert!(seen.contains(&want), "{seen}");
        let status = match proto {
            "--http2" => "HTTP/2 502",
            _ => "HTTP/1.1 502",
        };
        assert!(out.contains(status), "{proto}: {out}");
        // Not a byte of the gzip stream (its magic number) reached the client.
        assert!(!out.contains("\u{1f}\u{fffd}\u{8}"), "{proto}: {out}");
    }
    // Over HTTP/2 the refusal is the encoded-response one (HTTP/1.1 refuses the framing).
    wait_count(&w, 1, |e| {
        e.kind == EventKind::HttpRequest
            && e.host.as_deref() == Some("api.test")
            && e.rule == "response-encoded"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_echoed_in_an_interim_103_response_does_not_reach_the_sandbox() {
    let w = world().await;
    let hdr = format!("X-Key: {PH_KEY}");
    let url = w.url("api.test", "/early");
    // Interim responses are relayed to HTTP/1.1 clients only (HTTP/2 drops them).
    let (ok, out) = w.curl("--http1.1", &["-H", &hdr, &url]).await;
    assert!(ok, "{out}");
    let seen = w.api.seen.lock().unwrap().last().cloned().unwrap();
    assert!(seen.contains(KEY_SECRET), "{seen}");
    // Control: curl shows the interim head it got, with its `Link`.
    assert!(out.contains("HTTP/1.1 103"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("link: </style.css?k="),
        "{out}"
    );
    assert!(!out.contains(KEY_SECRET), "{out}");
    wait_count(&w, 1, |e| {
        e.kind == EventKind::Alert && e.rule == "response-redacted:secret:hkey"
    })
    .await;
}
