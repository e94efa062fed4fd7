use std::time::{Duration, Instant};

use cordon_policy::{ByteSize, DetectPolicy, Response};

use super::*;
use crate::event::{EventKind, NetEvent, SessionInfo, Verdict, Via};

fn session() -> SessionInfo {
    SessionInfo {
        id: "s-1".into(),
        user: "alice".into(),
        code_sha256: "ab".into(),
    }
}

fn dns(name: &str, qtype: &str, verdict: Verdict) -> NetEvent {
    let mut e = NetEvent::new(EventKind::DnsQuery, &session(), Via::Dns, verdict);
    e.host = Some(name.into());
    e.method = Some(qtype.into());
    e
}

fn blocked(host: &str) -> NetEvent {
    let mut e = NetEvent::new(EventKind::Blocked, &session(), Via::Proxy, Verdict::Block);
    e.host = Some(host.into());
    e.rule = "default-deny".into();
    e
}

fn request(host: &str, method: &str, path: &str, bytes_up: u64) -> NetEvent {
    let mut e = NetEvent::new(
        EventKind::HttpRequest,
        &session(),
        Via::Proxy,
        Verdict::Allow,
    );
    e.host = Some(host.into());
    e.method = Some(method.into());
    e.path = Some(path.into());
    e.bytes_up = bytes_up;
    e
}

/// Feeds events one per millisecond from `t0`; returns the index of the first that fired.
fn first_firing(d: &Detector, events: &[NetEvent], t0: Instant) -> Option<(usize, Detection)> {
    events.iter().enumerate().find_map(|(i, e)| {
        d.observe_at(e, t0 + Duration::from_millis(i as u64))
            .map(|x| (i, x))
    })
}

fn only_ratio() -> DetectPolicy {
    let mut p = only("dns_tunnel");
    p.dns_tunnel.distinct_names = 1000;
    p
}

fn only(rule: &str) -> DetectPolicy {
    let mut p = DetectPolicy::default();
    p.blocked.enabled = rule == "blocked";
    p.dns_tunnel.enabled = rule == "dns_tunnel";
    p.exfil.enabled = rule == "exfil";
    p
}

#[test]
fn blocked_attempts_fire_on_the_nth_within_the_window_only() {
    let d = Detector::new(only("blocked"), &[]);
    let t0 = Instant::now();
    for i in 0..4 {
        // Spread over more than the window: never 5 within a minute.
        assert_eq!(
            d.observe_at(&blocked("evil.test"), t0 + Duration::from_secs(20 * i)),
            None
        );
    }
    let late = t0 + Duration::from_secs(200);
    let events: Vec<_> = (0..5).map(|_| blocked("evil.test")).collect();
    let (i, x) = first_firing(&d, &events, late).unwrap();
    assert_eq!(i, 4);
    assert_eq!(x.rule, Rule::Blocked);
    assert_eq!(x.response, Response::Terminate);
    assert_eq!(
        x.summary,
        "5 blocked network attempts in 1m (detect.blocked.threshold = 5)"
    );
    assert_eq!(x.evidence["last_host"], Evidence::Text("evil.test".into()));
}

#[test]
fn refusals_caused_by_a_detection_response_do_not_count_as_blocked_attempts() {
    let d = Detector::new(only("blocked"), &[]);
    let events: Vec<_> = (0..20)
        .map(|_| {
            let mut e = blocked("api.example");
            e.rule = "detect".into();
            e
        })
        .collect();
    assert_eq!(first_firing(&d, &events, Instant::now()), None);
}

#[test]
fn dns_refusals_do_not_count_as_blocked_attempts() {
    let d = Detector::new(only("blocked"), &[]);
    let events: Vec<_> = (0..50)
        .map(|_| dns("x.evil.test", "A", Verdict::Block))
        .collect();
    assert_eq!(first_firing(&d, &events, Instant::now()), None);
}

#[test]
fn distinct_names_under_one_domain_fire_the_tunnel_rule_at_the_threshold() {
    let d = Detector::new(only("dns_tunnel"), &[]);
    let events: Vec<_> = (0..30)
        .map(|i| dns(&format!("c{i}.evil.test"), "A", Verdict::Block))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!(i, 19);
    assert_eq!(x.signal, "distinct_names");
    assert_eq!(
        x.summary,
        "dns tunnel suspected (20 distinct names under evil.test in 10s)"
    );
    assert_eq!(x.evidence["domain"], Evidence::Text("evil.test".into()));
    assert_eq!(x.severity, Severity::High);
}

#[test]
fn the_same_names_asked_again_and_again_are_not_a_tunnel() {
    let d = Detector::new(only("dns_tunnel"), &[]);
    let mut events = Vec::new();
    for _ in 0..40 {
        for name in ["pypi.org", "files.pythonhosted.org", "api.github.com"] {
            events.push(dns(name, "A", Verdict::Allow));
            events.push(dns(name, "AAAA", Verdict::Allow));
        }
    }
    // 240 queries in 240 ms would pass the query-rate threshold: spread them over 2 minutes.
    let t0 = Instant::now();
    for (i, e) in events.iter().enumerate() {
        let at = t0 + Duration::from_millis(500 * i as u64);
        assert_eq!(d.observe_at(e, at), None, "query {i}");
    }
}

#[test]
fn long_names_fire_at_their_count_and_short_ones_never() {
    let d = Detector::new(only("dns_tunnel"), &[]);
    let long = format!("{}.a.example", "x".repeat(50));
    assert!(long.len() > 52);
    let events = vec![
        dns(&long, "A", Verdict::Block),
        dns(&format!("y{long}"), "A", Verdict::Block),
        dns(&format!("z{long}"), "A", Verdict::Block),
    ];
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (2, "long_names"));
    assert_eq!(x.evidence["threshold"], Evidence::Count(3));
}

#[test]
fn high_entropy_leftmost_labels_fire_and_words_do_not() {
    let d = Detector::new(only("dns_tunnel"), &[]);
    let words: Vec<_> = (0..10)
        .map(|i| {
            dns(
                &format!("documentationmirror{i}.readthedocs.io"),
                "A",
                Verdict::Allow,
            )
        })
        .collect();
    assert_eq!(first_firing(&d, &words, Instant::now()), None);
    let d = Detector::new(only("dns_tunnel"), &[]);
    // Base32 of data, 32 characters per label, each under its own domain.
    let labels = [
        "mzxw6ytboi4dqnzqk5xgk4tfmrqxezlp",
        "nbswy3dpeb3w64tmgezdgnbvgy3tqojq",
        "ojsxg5dvnrzxi3dpmfzgc5dbnvqw4y3e",
        "kruwc4dfnvsxe5bani2hiztvnfxgoidu",
        "gq4tmmzrgiztembvga2dsnjzgyydcmrt",
    ];
    let noisy: Vec<_> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| dns(&format!("{l}.t{i}.example"), "A", Verdict::Block))
        .collect();
    let (i, x) = first_firing(&d, &noisy, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (4, "high_entropy_labels"));
}

#[test]
fn other_record_types_fire_at_their_count() {
    let d = Detector::new(only("dns_tunnel"), &[]);
    let events: Vec<_> = (0..10)
        .map(|i| dns(&format!("t.s{i}.example"), "TXT", Verdict::Block))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (9, "other_types"));
    assert_eq!(x.evidence["last_type"], Evidence::Text("TXT".into()));
}

#[test]
fn the_nxdomain_ratio_fires_once_enough_queries_were_made() {
    let d = Detector::new(only_ratio(), &[]);
    // A retry loop on one blocked name is not a tunnel.
    let retries: Vec<_> = (0..100)
        .map(|_| dns("github.com", "A", Verdict::Block))
        .collect();
    assert_eq!(first_firing(&d, &retries, Instant::now()), None);
    let d = Detector::new(only_ratio(), &[]);
    // Twenty failures over twenty different domains: no single domain has many names.
    let events: Vec<_> = (0..20)
        .map(|i| dns(&format!("www.site{i}.example"), "A", Verdict::Block))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (19, "nxdomain_ratio"));
    assert_eq!(x.evidence["ratio"], Evidence::Ratio(1.0));
}

#[test]
fn the_query_rate_fires_at_its_threshold() {
    let mut p = only("dns_tunnel");
    p.dns_tunnel.queries = 50;
    let d = Detector::new(p, &[]);
    let events: Vec<_> = (0..60)
        .map(|_| dns("pypi.org", "A", Verdict::Allow))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (49, "queries"));
}

#[test]
fn one_large_request_fires_the_exfil_rule() {
    let d = Detector::new(only("exfil"), &[]);
    let events = vec![
        request("api.example", "POST", "/upload", 1000),
        request("api.example", "POST", "/upload", 2 << 20),
    ];
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (1, "max_request_body"));
    assert_eq!(x.response, Response::Block);
}

#[test]
fn bytes_out_over_the_window_budget_fire() {
    let mut p = only("exfil");
    p.exfil.bytes_out = ByteSize::kib(100);
    let d = Detector::new(p, &[]);
    let events: Vec<_> = (0..20)
        .map(|_| request("api.example", "PUT", "/x", 10 * 1024))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (9, "bytes_out"));
}

#[test]
fn many_small_data_carrying_requests_to_one_host_fire_but_plain_gets_do_not() {
    let d = Detector::new(only("exfil"), &[]);
    let gets: Vec<_> = (0..200)
        .map(|i| request("api.example", "GET", &format!("/items/{i}"), 300))
        .collect();
    // 200 GETs in 200 ms: a benign polling script.
    assert_eq!(first_firing(&d, &gets, Instant::now()), None);
    let drip: Vec<_> = (0..100)
        .map(|i| request("api.example", "GET", &format!("/log?d={i:08x}"), 300))
        .collect();
    let (i, x) = first_firing(&d, &drip, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (59, "small_requests"));
    assert!(
        x.summary
            .contains("60 small data-carrying requests to api.example"),
        "{}",
        x.summary
    );
}

#[test]
fn many_distinct_hosts_fire() {
    let d = Detector::new(only("exfil"), &[]);
    let events: Vec<_> = (0..40)
        .map(|i| request(&format!("h{i}.example"), "GET", "/", 100))
        .collect();
    let (i, x) = first_firing(&d, &events, Instant::now()).unwrap();
    assert_eq!((i, x.signal.as_str()), (29, "distinct_hosts"));
}

#[test]
fn a_rule_is_claimed_once() {
    let d = Detector::new(DetectPolicy::default(), &[]);
    assert!(d.claim(Rule::DnsTunnel));
    assert!(!d.claim(Rule::DnsTunnel));
    assert!(d.claim(Rule::Exfil));
    // A claimed rule stops counting.
    let events: Vec<_> = (0..30)
        .map(|i| dns(&format!("c{i}.evil.test"), "A", Verdict::Block))
        .collect();
    assert_eq!(first_firing(&d, &events, Instant::now()), None);
}

/// A detector at the default policy with one honey token placed at `source`.
fn with_canary(source: CanarySource, token: &str) -> Detector {
    Detector::new(
        DetectPolicy::default(),
        &[Canary {
            source,
            token: token.to_owned(),
        }],
    )
}

#[test]
fn a_canary_in_request_bytes_is_a_critical_firing_naming_the_variable() {
    let token = canary::new_token().unwrap();
    let d = with_canary(CanarySource::Env("AWS_SECRET_ACCESS_KEY".into()), &token);
    let head = format!("GET / HTTP/1.1\r\nX-Key: {token}\r\n\r\n");
    let x = d.scan(&session(), head.as_bytes(), "request head").unwrap();
    assert_eq!((x.rule, x.severity), (Rule::Canary, Severity::Critical));
    assert_eq!(
        x.summary,
        "canary credential AWS_SECRET_ACCESS_KEY sent out (request head)"
    );
    assert_eq!(x.response, Response::Terminate);
    assert_eq!(
        x.evidence.get("variable"),
        Some(&Evidence::from("AWS_SECRET_ACCESS_KEY"))
    );
    assert!(!format!("{x:?}").contains(&token));
}

/// A token sent base64-encoded (a Basic credential, a query value) is recorded as its name too:
/// nothing left in the recorded text decodes back to the token.
#[test]
fn a_base64_encoded_canary_in_a_recorded_path_is_redacted_at_every_alignment() {
    use base64::Engine as _;
    let token = canary::new_token().unwrap();
    let files = [Canary {
        source: CanarySource::File(".env".into()),
        token: token.clone(),
    }];
    let d = Detector::new(DetectPolicy::default(), &files);
    let scan = canary::Canaries::new(std::slice::from_ref(&token));
    let b64 = base64::engine::general_purpose::STANDARD;
    for prefix in ["", "u:", "us:", "use:"] {
        let path = format!("/a?auth={}&x=1", b64.encode(format!("{prefix}{token}")));
        assert!(
            scan.scan(path.as_bytes()).is_some(),
            "the fixture holds the token"
        );
        let red = d.redact(&path).expect("a base64 token is redacted");
        assert!(red.contains("[canary .env]"), "{red}");
        assert_eq!(scan.scan(red.as_bytes()), None, "prefix {prefix:?}: {red}");
        assert!(
            red.starts_with("/a?auth=") && red.ends_with("&x=1"),
            "{red}"
        );
    }
    let mut e = dns("example.com", "A", Verdict::Block);
    e.path = Some(format!("/k/{}", b64.encode(&token)));
    d.redact_event(&mut e);
    let path = e.path.unwrap();
    assert!(path.starts_with("/k/[canary .env]"), "{path}");
}

/// DNS names arrive lower-cased (the gateway normalises them, and resolvers may too): a token
/// with capital letters must still be found there.
#[test]
fn a_mixed_case_canary_in_a_lower_cased_dns_name_fires_naming_its_file() {
    let token = "Q7xKp2LmN9vB4tR8sW1yZ6cD3fG5hJ0aE2uI7oPq".to_owned();
    let files = [
        Canary {
            source: CanarySource::File(".aws/credentials".into()),
            token: canary::new_token().unwrap(),
        },
        Canary {
            source: CanarySource::File(".env".into()),
            token: token.clone(),
        },
    ];
    let d = Detector::new(DetectPolicy::default(), &files);
    let name = format!("{}.evil.test", token.to_lowercase());
    let x = d.observe(&dns(&name, "A", Verdict::Block)).unwrap();
    assert_eq!((x.rule, x.severity), (Rule::Canary, Severity::Critical));
    assert_eq!(
        x.summary,
        "canary credential from workspace file .env sent out (dns name)"
    );
    assert_eq!(x.evidence.get("file"), Some(&Evidence::from(".env")));
    assert!(!x.summary.contains(&token) && !x.summary.contains(&token.to_lowercase()));
    // What is recorded names the file instead of the token, in the host and the reason.
    let mut e = dns(&name, "A", Verdict::Block);
    e.reason = Some(format!("host {name} is not in the allowlist"));
    d.redact_event(&mut e);
    assert_eq!(e.host.as_deref(), Some("[canary .env].evil.test"));
    assert_eq!(
        e.reason.as_deref(),
        Some("host [canary .env].evil.test is not in the allowlist")
    );
    assert_eq!(
        d.redact(&format!("/a?k={token}&j={token}x")).as_deref(),
        Some("/a?k=[canary .env]&j=[canary .env]x")
    );
    assert_eq!(d.redact("/nothing/here"), None);
    // Once fired (claimed by whoever carries out the response), the rule stops looking.
    assert!(d.claim(Rule::Canary));
    assert_eq!(d.observe(&dns(&name, "A", Verdict::Block)), None);
}

/// A token in the name of a destination (a CONNECT authority or TLS SNI, recorded lower-cased
/// with the refused or finished connection) fires the rule too.
#[test]
fn a_canary_in_a_destination_name_fires_the_rule() {
    let token = canary::new_token().unwrap();
    let d = with_canary(CanarySource::Env("API_TOKEN".into()), &token);
    let mut e = NetEvent::new(
        EventKind::Blocked,
        &session(),
        Via::Transparent,
        Verdict::Block,
    );
    e.host = Some(format!("{}.evil.test", token.to_lowercase()));
    let x = d.observe(&e).unwrap();
    assert_eq!(
        x.summary,
        "canary credential API_TOKEN sent out (destination name)"
    );
}

#[test]
fn a_canary_reported_by_the_streaming_scan_fires_under_its_source() {
    let d = with_canary(
        CanarySource::File(".netrc".into()),
        &canary::new_token().unwrap(),
    );
    assert_eq!(d.canary_seen(&session(), "OTHER", "body"), None);
    let x = d
        .canary_seen(&session(), "file:.netrc", "intercepted request body")
        .unwrap();
    assert_eq!(
        x.summary,
        "canary credential from workspace file .netrc sent out (intercepted request body)"
    );
}

#[test]
fn registrable_domains_and_entropy() {
    assert_eq!(registrable_domain("a.b.evil.test"), "evil.test");
    assert_eq!(registrable_domain("evil.test"), "evil.test");
    assert_eq!(registrable_domain("x.bbc.co.uk"), "bbc.co.uk");
    assert_eq!(registrable_domain("localhost"), "localhost");
    assert!(entropy("aaaaaaaaaaaaaaaa") < 0.01);
    assert!((entropy("abcdefghijklmnop") - 4.0).abs() < 1e-9);
}
