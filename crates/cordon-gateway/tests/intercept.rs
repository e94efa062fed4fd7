//! TLS interception on loopback: real clients (curl, Python urllib and requests) through the
//! explicit proxy to fake HTTPS origins with their own CA. Credentials are swapped in only for
//! their host, placeholders going elsewhere are blocked, method/path rules hold against encoded
//! paths, a bad upstream certificate is refused, DLP finds seeded secrets in headers, query
//! strings, bodies and chunked bodies, and an echoed secret is redacted.
//!
//! Everything stays on 127.0.0.0/8: the origins are reachable only because the policy names
//! loopback in `allow_private`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

use common::tls_origin::{TestCa, TlsOrigin};
use common::*;
use cordon_gateway::creds::{LiveCredential, Secret};
use cordon_gateway::detect::canary::{Canary, CanarySource};
use cordon_gateway::tls::{pem_certs, upstream_config, SessionCa};
use cordon_gateway::{EventKind, InterceptConfig, NetEvent, Verdict, DEFAULT_MAX_SCAN_BYTES};
use cordon_policy::host::HostName;
use cordon_policy::{Credential, HttpRule, Injection, InterceptHost, SecretSource};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SECRET: &str = "ghp_RealSecretValue0123456789";
const PLACEHOLDER: &str = "cordon-placeholder-0123456789abcdef0123456789abcdef";

struct World {
    _dns: FakeDns,
    api: TlsOrigin,
    other: TlsOrigin,
    bad: TlsOrigin,
    gw: Running,
    ca_file: tempfile::NamedTempFile,
}

fn credential(require: bool) -> LiveCredential {
    LiveCredential {
        spec: Credential {
            name: "gh".into(),
            hosts: vec![HostName::parse("api.test").unwrap()],
            inject: Injection::Header("Authorization".into()),
            format: "Bearer {secret}".into(),
            source: SecretSource::Env("GITHUB_TOKEN".into()),
            env: "GITHUB_TOKEN".into(),
            require,
        },
        placeholder: PLACEHOLDER.into(),
        secret: Secret::new(SECRET),
    }
}

/// `api.test` (credential + rules), `other.test` (intercepted, no credential) and `bad.test`
/// (a certificate from a CA nobody trusts), all on loopback, speaking HTTP/1.1 only.
async fn world(require: bool) -> World {
    world_with(require, /*api_h2*/ false).await
}

/// [`world`], with `api.test` offering `h2` (and `http/1.1`) when `api_h2`.
async fn world_with(require: bool, api_h2: bool) -> World {
    world_timed(require, api_h2, cordon_gateway::Timeouts::default()).await
}

/// [`world_with`], with the gateway's timeouts.
async fn world_timed(require: bool, api_h2: bool, timeouts: cordon_gateway::Timeouts) -> World {
    world_full(require, api_h2, timeouts, None).await
}

/// [`world_timed`], with the session's `max_connections` when given.
async fn world_full(
    require: bool,
    api_h2: bool,
    timeouts: cordon_gateway::Timeouts,
    max_connections: Option<u32>,
) -> World {
    let upstream_ca = TestCa::new("fake upstream CA");
    let rogue_ca = TestCa::new("rogue CA");
    let api_config = if api_h2 {
        upstream_ca.server_h2(&["api.test"])
    } else {
        upstream_ca.server(&["api.test"])
    };
    let api = TlsOrigin::start("127.0.0.1:0".parse().unwrap(), api_config).await;
    let other = TlsOrigin::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream_ca.server(&["other.test"]),
    )
    .await;
    let bad = TlsOrigin::start(
        "127.0.0.1:0".parse().unwrap(),
        rogue_ca.server(&["bad.test"]),
    )
    .await;
    let dns = FakeDns::start(
        LOOPBACK,
        &[
            ("api.test", &[LOOPBACK]),
            ("other.test", &[LOOPBACK]),
            ("bad.test", &[LOOPBACK]),
        ],
    )
    .await;
    let mut network = policy(
        &["api.test:*", "other.test:*", "bad.test:*"],
        &["127.0.0.1/32:*"],
    );
    if let Some(n) = max_connections {
        network.rate.max_connections = n;
    }
    network.rules = vec![HttpRule {
        host: HostName::parse("api.test").unwrap(),
        methods: vec!["GET".into(), "POST".into()],
        paths: vec!["/zen".into(), "/repos/*".into(), "/upload".into()],
    }];
    network.intercept = vec![
        InterceptHost::parse("other.test").unwrap(),
        InterceptHost::parse("bad.test").unwrap(),
    ];
    let creds = vec![credential(require)];
    let hosts = InterceptConfig::hosts_for(&network, &[creds[0].spec.clone()]);
    let ca = SessionCa::generate("sess-1", &hosts).unwrap();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca.cert_pem()).unwrap();
    let intercept = InterceptConfig {
        ca,
        hosts,
        credentials: creds,
        // The test's upstream CA stands in for the host trust store: no system roots at all.
        upstream: upstream_config(&[], &pem_certs(upstream_ca.pem.as_bytes())).unwrap(),
        max_scan_bytes: DEFAULT_MAX_SCAN_BYTES,
    };
    let opts = Options {
        intercept: Some(Arc::new(intercept)),
        canaries: vec![Canary {
            source: CanarySource::Env("SEEDED".into()),
            token: "CANARY7f3a9c1e55d2x0q".into(),
        }],
        timeouts,
        ..Options::default()
    };
    let gw = Running::start(network, dns.addr, opts).await;
    World {
        _dns: dns,
        api,
        other,
        bad,
        gw,
        ca_file,
    }
}

impl World {
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port_of(host))
    }

    fn port_of(&self, host: &str) -> u16 {
        match host {
            "api.test" => self.api.addr.port(),
            "other.test" => self.other.addr.port(),
            _ => self.bad.addr.port(),
        }
    }

    /// curl over HTTP/1.1 (curl offers `h2` by ALPN otherwise; HTTP/2 has tests of its own
    /// below).
    async fn curl(&self, args: Vec<String>) -> (bool, String, String) {
        self.curl_with(&["--http1.1"], args).await
    }

    /// curl through the proxy, trusting the session CA, with `first` before `args`.
    async fn curl_with(&self, first: &[&str], args: Vec<String>) -> (bool, String, String) {
        let args: Vec<String> = first.iter().map(|a| a.to_string()).chain(args).collect();
        let proxy: SocketAddr = self.gw.proxy;
        let ca = self.ca_file.path().to_owned();
        tokio::task::spawn_blocking(move || {
            run(Command::new("curl")
                .args(["-sS", "--max-time", "10", "-x", &format!("http://{proxy}")])
                .arg("--suppress-connect-headers")
                .arg("--cacert")
                .arg(&ca)
                .args(&args))
        })
        .await
        .unwrap()
    }

    fn events_of(&self, kind: EventKind) -> Vec<NetEvent> {
        self.gw
            .events()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_the_real_token_to_its_host_and_never_sees_it_back() {
    let w = world(false).await;
    let url = w.url("api.test", "/zen");
    let auth = format!("Authorization: Bearer {PLACEHOLDER}");
    let (ok, out, err) = w.curl(s(&["-D", "-", "-H", &auth, &url])).await;
    assert!(ok, "{err}");
    // Upstream got the real value, in the credential's format.
    let seen = w.api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    // The echo (header and body) came back redacted: the sandbox never sees the secret.
    assert!(!out.contains(SECRET), "{out}");
    assert!(out.contains("authorization=Bearer *****"), "{out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-echo-auth: bearer *****"),
        "{out}"
    );
    let req =
        w.gw.wait_event(|e| e.kind == EventKind::HttpRequest && e.path.as_deref() == Some("/zen"))
            .await;
    assert_eq!(req.method.as_deref(), Some("GET"));
    assert_eq!(req.host.as_deref(), Some("api.test"));
    assert!(
        req.reason
            .as_deref()
            .unwrap()
            .contains("credential gh injected"),
        "{req:?}"
    );
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "response-redacted:secret:gh")
        .await;
    // No event carries the secret.
    let all = format!("{:?}", w.gw.events());
    assert!(!all.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_urllib_and_requests_work_through_interception() {
    let w = world(false).await;
    let script = format!(
        r#"
import os, sys, urllib.request, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
h = {{"Authorization": "Bearer {PLACEHOLDER}"}}
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{"https": os.environ["PROXY"]}}), urllib.request.HTTPSHandler(context=ctx))
print(opener.open(urllib.request.Request(os.environ["URL"], headers=h)).read().decode())
import requests
r = requests.get(os.environ["URL"], headers=h, proxies={{"https": os.environ["PROXY"]}}, verify=os.environ["CA"])
print(r.status_code, r.text)
"#
    );
    let (url, proxy, ca) = (
        w.url("api.test", "/repos/a/b"),
        format!("http://{}", w.gw.proxy),
        w.ca_file.path().to_owned(),
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(Command::new("python3")
            .args(["-c", &script])
            .env("URL", url)
            .env("PROXY", proxy)
            .env("CA", ca))
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("200 method=GET"), "{out}");
    assert!(!out.contains(SECRET), "{out}");
    let seen = w.api.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.header("authorization"),
            Some(&*format!("Bearer {SECRET}"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placeholder_sent_to_another_host_is_blocked_with_an_alert() {
    let w = world(false).await;
    let auth = format!("Authorization: Bearer {PLACEHOLDER}");
    let (_, out, _) = w
        .curl(s(&[
            "-D",
            "-",
            "-H",
            &auth,
            &w.url("other.test", "/collect"),
        ]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        w.other.seen().is_empty(),
        "the other host must receive nothing"
    );
    let alert = w.gw.wait_event(|e| e.kind == EventKind::Alert).await;
    assert_eq!(alert.rule, "placeholder-leak:placeholder:gh");
    // In the URL and in a body, too.
    let url = w.url("other.test", &format!("/c?t={PLACEHOLDER}"));
    let (_, out, _) = w.curl(s(&["-D", "-", &url])).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let (_, out, _) = w
        .curl(s(&[
            "-D",
            "-",
            "--data-binary",
            &format!("x={PLACEHOLDER}"),
            &w.url("other.test", "/c"),
        ]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // To its own host but in the body: also not where the credential goes.
    let (_, out, _) = w
        .curl(s(&[
            "-D",
            "-",
            "--data-binary",
            &format!("x={PLACEHOLDER}"),
            &w.url("api.test", "/upload"),
        ]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(w.other.seen().is_empty() && w.api.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_placeholder_in_plain_http_or_a_dns_name_is_blocked() {
    let w = world(false).await;
    // Plain HTTP through the proxy: never reaches any upstream.
    let url = format!("http://other.test:{}/?k={PLACEHOLDER}", w.other.addr.port());
    let (_, out, _) = w.curl(s(&["-D", "-", &url])).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule.starts_with("placeholder-leak"))
        .await;
    // DNS: a name carrying the placeholder gets NXDOMAIN, whatever the allowlist says.
    let name = format!("{PLACEHOLDER}.other.test");
    let resp = dns_query_udp(w.gw.dns_udp.unwrap(), &name, RecordType::A).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.via == cordon_gateway::Via::Dns)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_rules_hold_against_encoded_and_dot_segment_paths() {
    let w = world(false).await;
    rules_hold_against_encoded_paths(&w, /*h2*/ false).await;
}

/// Method/path cases every HTTP version is held to: method, path as sent, expected status.
const RULE_CASES: [(&str, &str, &str); 11] = [
    ("GET", "/zen", "200"),
    ("GET", "/repos/x/y", "200"),
    ("DELETE", "/zen", "403"),
    ("GET", "/user", "403"),
    ("GET", "/repos/%2e%2e/user", "403"),
    ("GET", "/repos%2F..%2Fuser", "403"),
    ("GET", "/repos/..%5Cuser", "403"),
    ("GET", "/repos/%252e%252e/user", "403"),
    ("GET", "/repos/./../user", "403"),
    ("GET", "/repos//..//user", "403"),
    ("GET", "/%7Aen", "200"),
];

/// Sends every [`RULE_CASES`] request with curl (`--path-as-is`) over HTTP/1.1 or HTTP/2 and
/// checks the status, the refusals' events and what reached `api.test`.
async fn rules_hold_against_encoded_paths(w: &World, h2: bool) {
    let code = |out: &str| out.split_whitespace().nth(1).unwrap_or("").to_owned();
    let version = if h2 { "HTTP/2 " } else { "HTTP/1.1 " };
    for (method, path, want) in RULE_CASES {
        let args = s(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--path-as-is",
            "-X",
            method,
            &w.url("api.test", path),
        ]);
        let (_, out, err) = if h2 {
            w.curl_h2(args).await
        } else {
            w.curl(args).await
        };
        assert!(out.starts_with(version), "{method} {path}: {out} {err}");
        assert_eq!(code(&out), want, "{method} {path}: {out} {err}");
        if want == "403" {
            assert!(
                out.to_ascii_lowercase().contains("x-cordon-reason: "),
                "{out}"
            );
        }
    }
    let refused: Vec<_> = w
        .events_of(EventKind::Blocked)
        .into_iter()
        .filter(|e| e.rule == "http-rules:default-deny")
        .collect();
    let want_refused = RULE_CASES.iter().filter(|c| c.2 == "403").count();
    assert_eq!(refused.len(), want_refused, "{refused:#?}");
    // HTTP/2 origins see the absolute URI (scheme and authority from the pseudo-headers).
    let reached: Vec<_> = w.api.seen().iter().map(|s| s.uri.clone()).collect();
    let want = ["/zen", "/repos/x/y", "/%7Aen"];
    assert_eq!(reached.len(), want.len(), "{reached:?}");
    for (got, want) in reached.iter().zip(want) {
        assert!(got.ends_with(want), "{reached:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_certificate_from_an_unknown_ca_is_refused() {
    let w = world(false).await;
    let (_, out, _) = w.curl(s(&["-D", "-", &w.url("bad.test", "/")])).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(w.bad.seen().is_empty());
    let e = w.gw.wait_event(|e| e.rule == "upstream-tls").await;
    assert_eq!(e.verdict, Verdict::Block);
    assert!(
        e.reason
            .as_deref()
            .unwrap()
            .contains("failed TLS verification"),
        "{e:?}"
    );
}

/// Seeded secrets curl sends to `other.test` on every HTTP version, and the alert rule each must
/// raise: a header, a query string, a body.
fn dlp_cases(w: &World, aws: &str) -> Vec<(Vec<String>, &'static str)> {
    let url = w.url("other.test", "/upload");
    vec![
        (
            s(&["-H", &format!("X-Key: {aws}"), &url]),
            "dlp:aws_access_key_id",
        ),
        (
            s(&[&w.url("other.test", &format!("/upload?k={aws}"))]),
            "dlp:aws_access_key_id",
        ),
        (
            s(&[
                "--data-binary",
                "-----BEGIN RSA PRIVATE KEY-----\nMIIE",
                &url,
            ]),
            "dlp:private_key",
        ),
        (s(&["--data-binary", SECRET, &url]), "dlp:secret:gh"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlp_finds_seeded_secrets_in_headers_queries_bodies_and_chunked_bodies() {
    let w = world(false).await;
    let aws = "AKIAIOSFODNN7EXAMPLE";
    let url = w.url("other.test", "/upload");
    let mut cases = dlp_cases(&w, aws);
    cases.extend([(
        s(&[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("{} {aws} ", "x".repeat(100_000)),
            &url,
        ]),
        "dlp:aws_access_key_id",
    )]);
    for (args, rule) in cases {
        let mut args = args;
        args.insert(0, "-".into());
        args.insert(0, "-D".into());
        let (_, out, err) = w.curl(args.clone()).await;
        let shown: String = format!("{args:?}").chars().take(200).collect();
        let out: String = out.chars().take(300).collect();
        assert!(out.starts_with("HTTP/1.1 403"), "{shown}: {out} {err}");
        if rule.starts_with("detect") {
            // The detection engine's firing goes to its own channel; the refusal is audited.
            w.gw.wait_event(|e| e.kind == EventKind::Blocked && e.rule == rule)
                .await;
        } else {
            w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == rule)
                .await;
        }
    }
    for seen in w.other.seen() {
        let all = format!("{seen:?}");
        assert!(!all.contains(aws) && !all.contains("PRIVATE KEY") && !all.contains(SECRET));
    }
    // A clean chunked body goes through whole.
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), "y".repeat(300_000)).unwrap();
    let at = format!("@{}", body.path().display());
    let (ok, _, err) = w
        .curl(s(&[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &at,
            &url,
        ]))
        .await;
    assert!(ok, "{err}");
    assert!(w.other.seen().iter().any(|s| s.body.len() == 300_000));
    // The detection engine's own check on a decrypted head: refused, and its response
    // (quarantine by default) refuses the session's later requests too.
    let (_, out, _) = w
        .curl(s(&["-D", "-", "-H", "X-Note: CANARY7f3a9c1e55d2x0q", &url]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    w.gw.wait_event(|e| e.kind == EventKind::Blocked && e.rule == "detect.canary")
        .await;
    assert!(!w
        .other
        .seen()
        .iter()
        .any(|s| format!("{s:?}").contains("CANARY7f3a")));
}

/// The streaming scan of a large body finds a honey token past what the detection engine's own
/// check reads (the head and a pre-read body), cuts the request, and fires the canary rule with
/// its response: the session's later requests are refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_honey_token_deep_in_a_streamed_body_is_cut_and_fires_the_canary_rule() {
    let mut w = world(false).await;
    let url = w.url("other.test", "/upload");
    let (_, out, err) = w
        .curl(s(&[
            "-D",
            "-",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &format!("{} CANARY7f3a9c1e55d2x0q", "z".repeat(100_000)),
            &url,
        ]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out} {err}");
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "dlp:canary:SEEDED")
        .await;
    let fired = tokio::time::timeout(Duration::from_secs(5), w.gw.detections.recv())
        .await
        .expect("no detection within 5 s")
        .expect("detection channel closed");
    assert_eq!(fired.rule, cordon_gateway::detect::Rule::Canary);
    assert_eq!(
        fired.summary,
        "canary credential SEEDED sent out (intercepted request body)"
    );
    // Its response (terminate: egress closed first) refuses a clean request afterwards.
    // (The CONNECT is refused, so curl reports the proxy's answer as an error.)
    let before = w.other.seen().len();
    let (ok, out, err) = w.curl(s(&["-D", "-", &url])).await;
    assert!(!ok && err.contains("403"), "{out} {err}");
    assert_eq!(w.other.seen().len(), before);
    assert!(!w
        .other
        .seen()
        .iter()
        .any(|s| s.body.windows(10).any(|b| b == b"CANARY7f3a")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_a_request_to_the_bound_host_without_the_placeholder() {
    let w = world(true).await;
    let (_, out, _) = w.curl(s(&["-D", "-", &w.url("api.test", "/zen")])).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(w.api.seen().is_empty());
    w.gw.wait_event(|e| e.rule == "credential-required:gh")
        .await;
    let auth = format!("Authorization: token {PLACEHOLDER}");
    let (ok, _, err) = w.curl(s(&["-H", &auth, &w.url("api.test", "/zen")])).await;
    assert!(ok, "{err}");
    assert_eq!(w.api.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_a_kept_alive_intercepted_connection_is_decided_again() {
    let w = world(false).await;
    // One curl, two URLs on one connection: the second is refused by the rules.
    let (_, out, _) = w
        .curl(s(&[
            "-D",
            "-",
            &w.url("api.test", "/zen"),
            &w.url("api.test", "/admin"),
        ]))
        .await;
    assert!(
        out.contains("HTTP/1.1 200") && out.contains("HTTP/1.1 403"),
        "{out}"
    );
    assert_eq!(w.api.seen().len(), 1);
    // A Host that names another host on the same connection is refused (no fronting).
    let (_, out, _) = w
        .curl(s(&[
            "-D",
            "-",
            "-H",
            "Host: other.test",
            &w.url("api.test", "/zen"),
        ]))
        .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2: the sandbox's client picks `h2`; upstream speaks `h2` or only HTTP/1.1.

impl World {
    /// curl offering `h2` (`--http2`); prints `proto=<version curl used>` after the output.
    async fn curl_h2(&self, args: Vec<String>) -> (bool, String, String) {
        self.curl_with(&["--http2", "-w", "\nproto=%{http_version}\n"], args)
            .await
    }

    /// An HTTP/2 connection to `host` through the proxy (CONNECT, then TLS with the session CA
    /// offering only `h2`), made with hyper's client. Fails the test unless `h2` was picked.
    async fn h2_connection(&self, host: &str) -> H2Send {
        let tls = self.h2_tls(host).await;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        send
    }

    /// The TLS stream under [`World::h2_connection`]: `h2` negotiated, nothing sent on it yet.
    async fn h2_tls(&self, host: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        self.tls_alpn(host, b"h2").await
    }

    /// A TLS stream to `host` through the proxy, offering only `alpn`, which must be picked.
    async fn tls_alpn(
        &self,
        host: &str,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = self.port_of(host);
        let mut tcp = tokio::net::TcpStream::connect(self.gw.proxy).await.unwrap();
        tcp.write_all(
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "proxy closed: {head:?}");
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(&std::fs::read(self.ca_file.path()).unwrap()) {
            roots.add(c).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(alpn),
            "the gateway did not pick the protocol offered"
        );
        tls
    }
}

/// A request body the test feeds chunk by chunk (no declared length: the gateway streams it).
struct Feed(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Feed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// `GET {base}/zen` on an HTTP/2 connection: its status.
async fn get_zen(send: &mut H2Send, base: &str) -> u16 {
    let resp = send
        .send_request(request("GET", &format!("{base}/zen"), empty()))
        .await
        .unwrap();
    response_parts(resp).await.0
}

type H2Send = hyper::client::conn::http2::SendRequest<BoxBody<Bytes, Infallible>>;

fn feed() -> (tokio::sync::mpsc::Sender<Bytes>, BoxBody<Bytes, Infallible>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (tx, Feed(rx).boxed())
}

fn empty() -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::new()).boxed()
}

fn request(
    method: &str,
    url: &str,
    body: BoxBody<Bytes, Infallible>,
) -> hyper::Request<BoxBody<Bytes, Infallible>> {
    hyper::Request::builder()
        .method(method)
        .uri(url)
        .body(body)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_gets_the_real_token_upstream_over_h2_or_http1_and_never_sees_it_back() {
    for (api_h2, upstream_version) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let w = world_with(false, api_h2).await;
        let url = w.url("api.test", "/zen");
        let auth = format!("Authorization: Bearer {PLACEHOLDER}");
        let (ok, out, err) = w.curl_h2(s(&["-D", "-", "-H", &auth, &url])).await;
        assert!(ok, "{err}");
        // curl spoke HTTP/2 to the gateway (no silent fallback to HTTP/1.1)...
        assert!(out.starts_with("HTTP/2 200"), "{out}");
        assert!(out.ends_with("proto=2\n"), "{out}");
        // ... and the gateway spoke what the origin picked, with the real value.
        let seen = w.api.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].version, upstream_version);
        assert_eq!(
            seen[0].header("authorization"),
            Some(&*format!("Bearer {SECRET}"))
        );
        assert_eq!(seen[0].header("host").is_some(), !api_h2, "{seen:?}");
        // The echo (header and body) came back redacted.
        assert!(!out.contains(SECRET), "{out}");
        assert!(out.contains("authorization=Bearer *****"), "{out}");
        assert!(out.contains("x-echo-auth: Bearer *****"), "{out}");
        let req = w
            .gw
            .wait_event(|e| e.kind == EventKind::HttpRequest && e.path.as_deref() == Some("/zen"))
            .await;
        assert_eq!(req.method.as_deref(), Some("GET"));
        assert_eq!(req.host.as_deref(), Some("api.test"));
        assert!(
            req.reason
                .as_deref()
                .unwrap()
                .contains("credential gh injected"),
            "{req:?}"
        );
        assert!(req.bytes_down > 0, "{req:?}");
        w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "response-redacted:secret:gh")
            .await;
        assert!(!format!("{:?}", w.gw.events()).contains(SECRET));
        // Exactly one event for the one request.
        let zen =
            w.gw.events()
                .into_iter()
                .filter(|e| {
                    matches!(e.kind, EventKind::HttpRequest | EventKind::Blocked)
                        && e.path.as_deref() == Some("/zen")
                })
                .count();
        assert_eq!(zen, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_rules_hold_on_http2_streams_against_encoded_and_dot_segment_paths() {
    let w = world_with(false, /*api_h2*/ true).await;
    rules_hold_against_encoded_paths(&w, /*h2*/ true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlp_finds_seeded_secrets_in_http2_headers_and_bodies() {
    let w = world_with(false, true).await;
    let aws = "AKIAIOSFODNN7EXAMPLE";
    let url = w.url("other.test", "/upload");
    // A body over the 1 MiB pre-read: scanned as it streams.
    let big = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(big.path(), format!("{} {aws} ", "x".repeat(2 << 20))).unwrap();
    let big_at = format!("@{}", big.path().display());
    let mut cases = dlp_cases(&w, aws);
    cases.extend([
        (
            s(&["--data-binary", &big_at, &url]),
            "dlp:aws_access_key_id",
        ),
        (
            s(&["-H", &format!("Authorization: Bearer {PLACEHOLDER}"), &url]),
            "placeholder-leak:placeholder:gh",
        ),
    ]);
    for (args, rule) in cases {
        let mut args = args;
        args.insert(0, "-".into());
        args.insert(0, "-D".into());
        let mark = w.gw.events().len();
        let (_, out, err) = w.curl_h2(args.clone()).await;
        let shown: String = format!("{args:?}").chars().take(200).collect();
        let head: String = out.chars().take(300).collect();
        assert!(head.starts_with("HTTP/2 403"), "{shown}: {head} {err}");
        assert!(out.contains("x-cordon-reason: "), "{shown}: {head}");
        w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == rule)
            .await;
        // One Blocked event for the request, naming the pattern, never the value.
        let blocked: Vec<_> = w.gw.events()[mark..]
            .iter()
            .filter(|e| e.kind == EventKind::Blocked)
            .cloned()
            .collect();
        assert_eq!(blocked.len(), 1, "{shown}: {blocked:#?}");
        assert_eq!(blocked[0].rule, rule);
    }
    for seen in w.other.seen() {
        let all = format!("{seen:?}");
        assert!(!all.contains(aws) && !all.contains("PRIVATE KEY") && !all.contains(SECRET));
    }
    assert!(!format!("{:?}", w.gw.events()).contains(SECRET));
    // A clean body of the same size goes through whole, over HTTP/2 both ways.
    std::fs::write(big.path(), "y".repeat(2 << 20)).unwrap();
    let (ok, out, err) = w
        .curl_h2(s(&["-o", "/dev/null", "--data-binary", &big_at, &url]))
        .await;
    assert!(ok, "{err}");
    assert!(out.ends_with("proto=2\n"), "{out}");
    assert!(w.other.seen().iter().any(|s| s.body.len() == 2 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_one_http2_connection_are_each_decided_and_a_refused_one_leaves_the_others_alone(
) {
    for api_h2 in [true, false] {
        let w = world_with(false, api_h2).await;
        let mut send = w.h2_connection("api.test").await;
        let base = format!("https://api.test:{}", w.api.addr.port());
        // Stream 1: an allowed upload, left open mid-body.
        let (tx, body) = feed();
        let upload =
            tokio::spawn(send.send_request(request("POST", &format!("{base}/upload"), body)));
        tx.send(Bytes::from("first half, ")).await.unwrap();
        // Stream 2, while stream 1 is open: refused by the rules, on its own stream.
        let resp = send
            .send_request(request("GET", &format!("{base}/admin"), empty()))
            .await
            .unwrap();
        let (status, reason, _) = response_parts(resp).await;
        assert_eq!(status, 403);
        assert!(
            reason.contains("/admin") || reason.contains("rule"),
            "{reason}"
        );
        // Stream 3: another host's authority on this connection (domain fronting).
        let other = format!("https://other.test:{}/zen", w.api.addr.port());
        let (status, reason, _) = response_parts(
            send.send_request(request("GET", &other, empty()))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 403);
        assert!(reason.contains(":authority"), "{reason}");
        // Stream 4: allowed, answered while stream 1 is still open.
        assert_eq!(get_zen(&mut send, &base).await, 200);
        // Stream 1 ends and gets its answer.
        tx.send(Bytes::from("second half")).await.unwrap();
        drop(tx);
        let (status, _, body) = response_parts(upload.await.unwrap().unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("body=first half, second half"), "{body}");
        // Upstream saw the two allowed requests and nothing else.
        let mut uris: Vec<_> = w
            .api
            .seen()
            .iter()
            .map(|s| s.method.clone() + " " + &s.uri)
            .collect();
        uris.sort();
        assert_eq!(uris.len(), 2, "{uris:?}");
        assert!(
            uris[0].starts_with("GET ") && uris[0].ends_with("/zen"),
            "{uris:?}"
        );
        assert!(
            uris[1].starts_with("POST ") && uris[1].ends_with("/upload"),
            "{uris:?}"
        );
        // One event per stream.
        w.gw.wait_event(|e| {
            e.kind == EventKind::HttpRequest && e.path.as_deref() == Some("/upload")
        })
        .await;
        let per_path = |p: &str| {
            w.gw.events()
                .into_iter()
                .filter(|e| {
                    matches!(e.kind, EventKind::HttpRequest | EventKind::Blocked)
                        && e.path.as_deref() == Some(p)
                })
                .map(|e| (e.kind, e.rule))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            per_path("/admin"),
            [(EventKind::Blocked, "http-rules:default-deny".to_owned())]
        );
        assert_eq!(per_path("/zen").len(), 2, "{:?}", per_path("/zen"));
        assert_eq!(per_path("/upload").len(), 1);
        assert!(w
            .gw
            .events()
            .iter()
            .any(|e| e.kind == EventKind::Blocked && e.rule == "host-mismatch"));
    }
}

/// HTTP/2 frame `kind` on `stream` (raw, for requests hyper's client would never send).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A stream the HTTP/2 layer refuses before any handler sees it (here: a connection-specific
/// header, which HTTP/2 forbids) is recorded, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_http2_layer_refuses_on_its_own_is_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = world_with(false, true).await;
    let mut tls = w.h2_tls("api.test").await;
    // HPACK without Huffman: :method GET, :scheme https, :path /zen (indexed names), then
    // :authority and `connection: close` as literals.
    let authority = format!("api.test:{}", w.api.addr.port());
    let mut block = vec![0x82, 0x87, 0x44, 4];
    block.extend_from_slice(b"/zen");
    block.push(0x41);
    block.push(authority.len() as u8);
    block.extend_from_slice(authority.as_bytes());
    block.extend_from_slice(&[0x00, 10]);
    block.extend_from_slice(b"connection");
    block.push(5);
    block.extend_from_slice(b"close");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&h2_frame(0x4, 0, 0, &[]));
    // END_STREAM | END_HEADERS on stream 1.
    out.extend_from_slice(&h2_frame(0x1, 0x5, 1, &block));
    tls.write_all(&out).await.unwrap();
    // Read the server's frames until RST_STREAM on stream 1.
    let mut code = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while code.is_none() {
        let mut head = [0u8; 9];
        tokio::time::timeout_at(deadline, tls.read_exact(&mut head))
            .await
            .expect("no RST_STREAM from the gateway")
            .unwrap();
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        tls.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        if head[3] == 0x1 {
            panic!("the gateway answered the malformed stream with HEADERS");
        }
        if head[3] == 0x3 && stream == 1 {
            code = Some(u32::from_be_bytes([
                payload[0], payload[1], payload[2], payload[3],
            ]));
        }
    }
    assert_eq!(code, Some(0x1), "PROTOCOL_ERROR");
    let e = w.gw.wait_event(|e| e.rule == "h2-protocol").await;
    assert_eq!((e.kind, e.verdict), (EventKind::Blocked, Verdict::Block));
    assert_eq!(e.host.as_deref(), Some("api.test"));
    let reason = e.reason.unwrap();
    assert!(
        reason.contains("stream 1") && reason.contains("PROTOCOL_ERROR"),
        "{reason}"
    );
    assert!(w.api.seen().is_empty());
    // One event for the one refusal.
    let refusals =
        w.gw.events()
            .into_iter()
            .filter(|e| e.rule == "h2-protocol")
            .count();
    assert_eq!(refusals, 1);
}

/// A stream that passed the decision and is reset by the client while its small body is being
/// read (nothing went upstream) still produces exactly one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_reset_during_its_body_pre_read_is_recorded_once() {
    use tokio::io::AsyncWriteExt;
    let w = world_with(false, true).await;
    let mut tls = w.h2_tls("api.test").await;
    // HPACK without Huffman: :method POST, :scheme https (indexed), :path /upload, :authority,
    // content-length: 10 (literals with indexed names).
    let authority = format!("api.test:{}", w.api.addr.port());
    let mut block = vec![0x83, 0x87, 0x44, 7];
    block.extend_from_slice(b"/upload");
    block.push(0x41);
    block.push(authority.len() as u8);
    block.extend_from_slice(authority.as_bytes());
    block.extend_from_slice(&[0x5c, 2]);
    block.extend_from_slice(b"10");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&h2_frame(0x4, 0, 0, &[]));
    // END_HEADERS on stream 1, then 3 of the 10 body bytes.
    out.extend_from_slice(&h2_frame(0x1, 0x4, 1, &block));
    out.extend_from_slice(&h2_frame(0x0, 0, 1, b"abc"));
    tls.write_all(&out).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // RST_STREAM, CANCEL.
    tls.write_all(&h2_frame(0x3, 0, 1, &[0, 0, 0, 0x8]))
        .await
        .unwrap();
    tls.flush().await.unwrap();
    let e =
        w.gw.wait_event(|e| e.path.as_deref() == Some("/upload"))
            .await;
    assert_eq!((e.kind, e.verdict), (EventKind::Blocked, Verdict::Block));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events: Vec<NetEvent> =
        w.gw.events()
            .into_iter()
            .filter(|e| e.path.as_deref() == Some("/upload"))
            .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(w.api.seen().is_empty());
}

/// The same over HTTP/1.1: a request that passed the decision whose client leaves while its
/// small body is being read is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_request_whose_client_leaves_during_its_body_pre_read_is_recorded_once() {
    use tokio::io::AsyncWriteExt;
    let w = world(false).await;
    let mut tls = w.tls_alpn("api.test", b"http/1.1").await;
    let port = w.api.addr.port();
    tls.write_all(
        format!("POST /upload HTTP/1.1\r\nHost: api.test:{port}\r\nContent-Length: 10\r\n\r\nabc")
            .as_bytes(),
    )
    .await
    .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tls);
    let e =
        w.gw.wait_event(|e| e.path.as_deref() == Some("/upload"))
            .await;
    assert_eq!((e.kind, e.verdict), (EventKind::Blocked, Verdict::Block));
    assert_eq!(e.rule, "abandoned");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events: Vec<NetEvent> =
        w.gw.events()
            .into_iter()
            .filter(|e| e.path.as_deref() == Some("/upload"))
            .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(w.api.seen().is_empty());
}

/// Over an HTTP/1.1-only upstream each HTTP/2 stream in flight needs an upstream connection of
/// its own: past the first, each takes one of the session's `max_connections` slots, so one
/// client connection cannot multiply the sandbox's connections out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_over_an_http1_upstream_take_a_connection_slot_each_past_the_first() {
    // Two slots: the client connection's own (which covers one upstream connection), and one.
    let w = world_full(false, false, cordon_gateway::Timeouts::default(), Some(2)).await;
    let mut send = w.h2_connection("api.test").await;
    let base = format!("https://api.test:{}", w.api.addr.port());
    let upload = |send: &mut H2Send| {
        let (tx, body) = feed();
        let resp =
            tokio::spawn(send.send_request(request("POST", &format!("{base}/upload"), body)));
        (tx, resp)
    };
    // Streams 1 and 2: uploads left open mid-body, each holding an upstream connection.
    let (tx1, up1) = upload(&mut send);
    tx1.send(Bytes::from("one")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx2, up2) = upload(&mut send);
    tx2.send(Bytes::from("two")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stream 3 would need a third upstream connection: refused as a budget hit.
    let (status, reason, _) = response_parts(
        send.send_request(request("GET", &format!("{base}/zen"), empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "{reason}");
    assert!(reason.contains("connection limit"), "{reason}");
    let hit =
        w.gw.wait_event(|e| e.kind == EventKind::BudgetExhausted)
            .await;
    assert_eq!(hit.host.as_deref(), Some("api.test"));
    // The two uploads end normally; then a stream reuses an idle upstream connection.
    for (tx, up) in [(tx1, up1), (tx2, up2)] {
        drop(tx);
        let (status, _, body) = response_parts(up.await.unwrap().unwrap()).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(get_zen(&mut send, &base).await, 200);
    // Upstream saw the two uploads and the last GET, never the refused one.
    assert_eq!(w.api.seen().len(), 3, "{:?}", w.api.seen().len());
}

/// Two streams at once on a fresh connection: the second waits while the first connects and
/// finds an HTTP/1.1-only server. It must take its slot before connecting, so with no slot left
/// the upstream never sees a second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_waited_for_the_first_http1_upstream_connection_is_refused_before_connecting()
{
    use std::sync::atomic::Ordering;
    // One slot: the client connection's own, which covers the first upstream connection.
    let w = world_full(false, false, cordon_gateway::Timeouts::default(), Some(1)).await;
    let mut send = w.h2_connection("api.test").await;
    let base = format!("https://api.test:{}", w.api.addr.port());
    // Uploads left open mid-body: the first keeps its upstream connection busy.
    let (tx1, body1) = feed();
    let (tx2, body2) = feed();
    let up1 = send.send_request(request("POST", &format!("{base}/upload"), body1));
    let up2 = send.send_request(request("POST", &format!("{base}/upload"), body2));
    let (up1, up2) = (tokio::spawn(up1), tokio::spawn(up2));
    tx1.send(Bytes::from("one")).await.unwrap();
    tx2.send(Bytes::from("two")).await.unwrap();
    w.gw.wait_event(|e| e.kind == EventKind::BudgetExhausted)
        .await;
    drop((tx1, tx2));
    let mut statuses = Vec::new();
    for up in [up1, up2] {
        statuses.push(response_parts(up.await.unwrap().unwrap()).await.0);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 403]);
    assert_eq!(w.api.accepted.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_mid_body_on_an_http2_stream_cancels_the_upstream_request_and_the_connection_goes_on(
) {
    for api_h2 in [true, false] {
        let w = world_with(false, api_h2).await;
        let mut send = w.h2_connection("api.test").await;
        let base = format!("https://api.test:{}", w.api.addr.port());
        let (tx, body) = feed();
        let upload =
            tokio::spawn(send.send_request(request("POST", &format!("{base}/upload"), body)));
        // Enough clean bytes that upstream gets part of the body before the finding.
        for _ in 0..4 {
            tx.send(Bytes::from(vec![b'a'; 64 * 1024])).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        tx.send(Bytes::from("key=AKIAIOSFODNN7EXAMPLE;"))
            .await
            .unwrap();
        drop(tx);
        match upload.await.unwrap() {
            // The response had not begun: the stream gets the gateway's refusal...
            Ok(resp) => {
                let (status, reason, _) = response_parts(resp).await;
                assert_eq!(status, 403);
                assert!(reason.contains("aws_access_key_id"), "{reason}");
            }
            // ... or, had it begun, a reset.
            Err(e) => panic!("expected a 403 on the stream, got {e}"),
        }
        let blocked = w
            .gw
            .wait_event(|e| e.kind == EventKind::Blocked && e.path.as_deref() == Some("/upload"))
            .await;
        assert_eq!(blocked.rule, "dlp:aws_access_key_id");
        assert!(
            blocked.bytes_up > 0,
            "upstream got part of the body first: {blocked:?}"
        );
        w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "dlp:aws_access_key_id")
            .await;
        assert!(
            w.api.seen().is_empty(),
            "upstream must never see a complete request: {:?}",
            w.api.seen()
        );
        // The connection is still good.
        assert_eq!(get_zen(&mut send, &base).await, 200);
        assert_eq!(w.api.seen().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_shaped_exchange_keeps_te_and_trailers_over_http2_and_trailers_are_redacted() {
    let w = world_with(false, true).await;
    let mut send = w.h2_connection("api.test").await;
    let url = format!("https://api.test:{}/repos/grpc", w.api.addr.port());
    let mut req = request(
        "POST",
        &url,
        Full::new(Bytes::from("\0\0\0\0\x05hello")).boxed(),
    );
    let h = req.headers_mut();
    h.insert("te", "trailers".parse().unwrap());
    h.insert("content-type", "application/grpc".parse().unwrap());
    h.insert(
        "authorization",
        format!("Bearer {PLACEHOLDER}").parse().unwrap(),
    );
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // `te: trailers` reached the HTTP/2 upstream (gRPC servers insist on it).
    assert_eq!(resp.headers()["x-echo-te"], "trailers");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    // The echo of the injected value in a trailer is redacted too.
    let echoed = trailers["x-echo-auth-trailer"].to_str().unwrap().to_owned();
    assert_eq!(echoed, format!("Bearer {}", "*".repeat(SECRET.len())));
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    assert!(!body.contains(SECRET), "{body}");
    assert_eq!(
        w.api.seen()[0].header("authorization"),
        Some(&*format!("Bearer {SECRET}"))
    );
    w.gw.wait_event(|e| {
        e.kind == EventKind::HttpRequest && e.path.as_deref() == Some("/repos/grpc")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_header_list_over_the_bound_is_refused_and_the_connection_goes_on() {
    let w = world_with(false, true).await;
    let mut send = w.h2_connection("api.test").await;
    let base = format!("https://api.test:{}", w.api.addr.port());
    assert_eq!(get_zen(&mut send, &base).await, 200);
    // A header list over 64 KiB never reaches a decision or upstream.
    let mut big = request("GET", &format!("{base}/zen"), empty());
    big.headers_mut()
        .insert("x-big", "a".repeat(70 * 1024).parse().unwrap());
    match send.send_request(big).await {
        Ok(resp) => assert_eq!(resp.status(), 431),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    assert_eq!(w.api.seen().len(), 1);
    // The connection goes on.
    assert_eq!(get_zen(&mut send, &base).await, 200);
    assert_eq!(w.api.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_but_not_while_a_stream_is_open() {
    let timeouts = cordon_gateway::Timeouts {
        header_read: std::time::Duration::from_millis(700),
        ..cordon_gateway::Timeouts::default()
    };
    let w = world_timed(false, true, timeouts).await;
    let mut send = w.h2_connection("api.test").await;
    let base = format!("https://api.test:{}", w.api.addr.port());
    // A stream open for more than two idle periods keeps the connection.
    let (tx, body) = feed();
    let upload = tokio::spawn(send.send_request(request("POST", &format!("{base}/upload"), body)));
    tx.send(Bytes::from("slow ")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1800)).await;
    assert!(!send.is_closed());
    tx.send(Bytes::from("upload")).await.unwrap();
    drop(tx);
    let (status, _, body) = response_parts(upload.await.unwrap().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    // Then, with nothing open, it is closed within two idle periods (and a bit).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !send.is_closed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle connection stayed open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_honey_token_deep_in_a_streamed_http2_body_is_cut_and_fires_the_canary_rule() {
    let mut w = world_with(false, true).await;
    let mut send = w.h2_connection("other.test").await;
    let url = format!("https://other.test:{}/upload", w.other.addr.port());
    let (tx, body) = feed();
    let upload = tokio::spawn(send.send_request(request("POST", &url, body)));
    tx.send(Bytes::from(vec![b'z'; 100_000])).await.unwrap();
    tx.send(Bytes::from(" CANARY7f3a9c1e55d2x0q"))
        .await
        .unwrap();
    drop(tx);
    let (status, reason, _) = response_parts(upload.await.unwrap().unwrap()).await;
    assert_eq!(status, 403, "{reason}");
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "dlp:canary:SEEDED")
        .await;
    let fired = tokio::time::timeout(Duration::from_secs(5), w.gw.detections.recv())
        .await
        .expect("no detection within 5 s")
        .expect("detection channel closed");
    assert_eq!(fired.rule, cordon_gateway::detect::Rule::Canary);
    assert!(w
        .other
        .seen()
        .iter()
        .all(|s| !s.body.windows(10).any(|b| b == b"CANARY7f3a")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finding_after_the_response_began_resets_the_http2_stream_and_is_recorded_once() {
    let w = world_with(false, true).await;
    let mut send = w.h2_connection("api.test").await;
    let base = format!("https://api.test:{}", w.api.addr.port());
    // The origin streams the request body back as it comes: its answer begins before the
    // request has ended.
    let (tx, body) = feed();
    let pending =
        tokio::spawn(send.send_request(request("POST", &format!("{base}/repos/duplex"), body)));
    tx.send(Bytes::from(vec![b'a'; 4096])).await.unwrap();
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the response must have begun");
    let mut body = resp.into_body();
    // Some of the echo arrives (all but the redaction hold-back).
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    // Now a secret-shaped value: the stream can no longer get a 403, so it is reset.
    tx.send(Bytes::from("key=AKIAIOSFODNN7EXAMPLE;"))
        .await
        .unwrap();
    let mut echoed = first.into_data().unwrap().to_vec();
    let outcome = loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    echoed.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => break Err(e),
            None => break Ok(()),
        }
    };
    assert!(outcome.is_err(), "the stream ended normally");
    assert!(!String::from_utf8_lossy(&echoed).contains("AKIA"));
    let blocked = w
        .gw
        .wait_event(|e| e.kind == EventKind::Blocked && e.path.as_deref() == Some("/repos/duplex"))
        .await;
    assert_eq!(blocked.rule, "dlp:aws_access_key_id");
    w.gw.wait_event(|e| e.kind == EventKind::Alert && e.rule == "dlp:aws_access_key_id")
        .await;
    drop(tx);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let for_path =
        w.gw.events()
            .into_iter()
            .filter(|e| {
                matches!(e.kind, EventKind::HttpRequest | EventKind::Blocked)
                    && e.path.as_deref() == Some("/repos/duplex")
            })
            .count();
    assert_eq!(for_path, 1, "exactly one event for the stream");
    // The connection goes on.
    assert_eq!(get_zen(&mut send, &base).await, 200);
}
