//! The sandbox's DNS server end to end (UDP and TCP on loopback): synthetic answers, NXDOMAIN
//! without any upstream query, events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use cordon_gateway::{EventKind, Resolve, ResolveError, UpstreamResolver, Verdict, Via};
use cordon_policy::HostName;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn dns_query_tcp(server: SocketAddr, names: &[&str]) -> Vec<Message> {
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut out = Vec::new();
    // Several queries on one connection, as resolvers do.
    for name in names {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = q.to_vec().unwrap();
        s.write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut len = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
            .await
            .unwrap()
            .unwrap();
        let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut msg).await.unwrap();
        out.push(Message::from_vec(&msg).unwrap());
    }
    out
}

fn a(m: &Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_allowlist_get_nxdomain_and_never_reach_upstream() {
    let upstream = FakeDns::start(LOOPBACK, &[("api.github.com", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["api.github.com"], &[]),
        upstream.addr,
        Options::default(),
    )
    .await;
    let server = gw.dns_udp.unwrap();
    for (name, qtype) in [
        ("c2VjcmV0.evil.example", RecordType::A),
        ("c2VjcmV0.evil.example", RecordType::AAAA),
        ("c2VjcmV0.evil.example", RecordType::TXT),
        ("github.com", RecordType::A),
        ("x.api.github.com", RecordType::A),
    ] {
        let m = dns_query_udp(server, name, qtype).await;
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "{name} {qtype}"
        );
        assert!(m.answers.is_empty());
    }
    let tcp = dns_query_tcp(gw.dns_tcp.unwrap(), &["evil.example", "api.github.com"]).await;
    assert_eq!(tcp[0].metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(tcp[1].metadata.response_code, ResponseCode::NoError);

    // The upstream server saw nothing at all: the gateway's DNS never forwards.
    assert!(
        upstream.asked().is_empty(),
        "upstream saw {:?}",
        upstream.asked()
    );
    let stats = gw.stop().await;
    assert_eq!(stats.dns_queries, 7);
    let ev = gw.events();
    assert_eq!(ev.len(), 7);
    assert!(ev
        .iter()
        .all(|e| e.kind == EventKind::DnsQuery && e.via == Via::Dns));
    let first = &ev[0];
    assert_eq!(first.verdict, Verdict::Block);
    assert_eq!(first.host.as_deref(), Some("c2vjcmv0.evil.example"));
    assert_eq!(first.method.as_deref(), Some("A"));
    assert_eq!(first.session, session());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_keeps_one_synthetic_address_over_udp_and_tcp() {
    let upstream = FakeDns::start(LOOPBACK, &[]).await;
    let mut gw = Running::start(
        policy(&["api.github.com", "*.githubusercontent.com:*"], &[]),
        upstream.addr,
        Options::default(),
    )
    .await;
    let udp = gw.dns_udp.unwrap();
    let first = a(&dns_query_udp(udp, "api.github.com", RecordType::A).await).unwrap();
    let raw = a(&dns_query_udp(udp, "raw.githubusercontent.com", RecordType::A).await).unwrap();
    assert_ne!(first, raw);
    for ip in [first, raw] {
        assert!(cordon_gateway::synthetic::is_synthetic(ip.into()), "{ip}");
    }
    assert_eq!(
        a(&dns_query_udp(udp, "API.GITHUB.COM.", RecordType::A).await),
        Some(first)
    );
    let tcp = dns_query_tcp(
        gw.dns_tcp.unwrap(),
        &["api.github.com", "raw.githubusercontent.com"],
    )
    .await;
    assert_eq!(a(&tcp[0]), Some(first));
    assert_eq!(a(&tcp[1]), Some(raw));
    // No IPv6 in the sandbox: AAAA is an empty NOERROR.
    let aaaa = dns_query_udp(udp, "api.github.com", RecordType::AAAA).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    // Other types are refused.
    let mx = dns_query_udp(udp, "api.github.com", RecordType::MX).await;
    assert_eq!(mx.metadata.response_code, ResponseCode::Refused);
    assert!(upstream.asked().is_empty());
    let e = gw
        .events()
        .into_iter()
        .find(|e| e.verdict == Verdict::Allow)
        .unwrap();
    assert_eq!(e.ip, Some(IpAddr::V4(first)));
    assert_eq!(e.rule, "api.github.com");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_resolver_library_gets_synthetic_answers_and_nxdomain() {
    let upstream = FakeDns::start(LOOPBACK, &[]).await;
    let mut gw = Running::start(
        policy(&["pypi.org"], &[]),
        upstream.addr,
        Options::default(),
    )
    .await;
    let client = UpstreamResolver::with_nameservers(&[gw.dns_udp.unwrap()]).unwrap();
    let addrs = client
        .resolve(&HostName::parse("pypi.org").unwrap())
        .await
        .unwrap();
    assert_eq!(addrs.len(), 1);
    assert!(cordon_gateway::synthetic::is_synthetic(addrs[0]));
    let err = client
        .resolve(&HostName::parse("files.evil.example").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ResolveError::NoSuchName {
            name: "files.evil.example".into()
        }
    );
    assert!(upstream.asked().is_empty());
    gw.stop().await;
}
