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

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

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
/// (a certificate from a CA nobody trusts), all on loopback.
async fn world(require: bool) -> World {
    let upstream_ca = TestCa::new("fake upstream CA");
    let rogue_ca = TestCa::new("rogue CA");
    let api = TlsOrigin::start(
        "127.0.0.1:0".parse().unwrap(),
        upstream_ca.server(&["api.test"]),
    )
    .await;
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
        let port = match host {
            "api.test" => self.api.addr.port(),
            "other.test" => self.other.addr.port(),
            _ => self.bad.addr.port(),
        };
        format!("https://{host}:{port}{path}")
    }

    async fn curl(&self, args: Vec<String>) -> (bool, String, String) {
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
    let code = |out: &str| out.split_whitespace().nth(1).unwrap_or("").to_owned();
    for (method, path, want) in [
        ("GET", "/zen", "200"),
        ("GET", "/repos/x/y", "200"),
        ("DELETE", "/zen", "403"),
        ("GET", "/user", "403"),
        ("GET", "/repos/%2e%2e/user", "403"),
        ("GET", "/repos%2F..%2Fuser", "403"),
        ("GET", "/repos/..%5Cuser", "403"),
        ("GET", "/repos/%252e%252e/user", "403"),
        ("GET", "/%7Aen", "200"),
    ] {
        let (_, out, err) = w
            .curl(s(&[
                "-D",
                "-",
                "-o",
                "/dev/null",
                "--path-as-is",
                "-X",
                method,
                &w.url("api.test", path),
            ]))
            .await;
        assert_eq!(code(&out), want, "{method} {path}: {out} {err}");
    }
    let refused: Vec<_> = w
        .events_of(EventKind::Blocked)
        .into_iter()
        .filter(|e| e.rule == "http-rules:default-deny")
        .collect();
    assert_eq!(refused.len(), 6, "{refused:#?}");
    let reached: Vec<_> = w.api.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(reached, ["/zen", "/repos/x/y", "/%7Aen"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlp_finds_seeded_secrets_in_headers_queries_bodies_and_chunked_bodies() {
    let w = world(false).await;
    let aws = "AKIAIOSFODNN7EXAMPLE";
    let url = w.url("other.test", "/upload");
    let cases: Vec<(Vec<String>, &str)> = vec![
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
        (
            s(&[
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &format!("{} {aws} ", "x".repeat(100_000)),
                &url,
            ]),
            "dlp:aws_access_key_id",
        ),
        (s(&["--data-binary", SECRET, &url]), "dlp:secret:gh"),
    ];
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
