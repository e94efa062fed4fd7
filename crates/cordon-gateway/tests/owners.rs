//! Process attribution: the gateway asks its `SocketOwners` about each client socket, with the
//! address the client connected to, and every event of that connection carries the answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use cordon_gateway::{EventKind, ProcessInfo, SocketOwners, Transport, Verdict};
use hickory_proto::rr::RecordType;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

type Calls = Arc<Mutex<Vec<(Transport, SocketAddr, Option<SocketAddr>)>>>;

/// Answers with a process whose pid is the client's port, and records every question.
struct Recording(Calls);

impl SocketOwners for Recording {
    fn owner(
        &self,
        transport: Transport,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<ProcessInfo> {
        self.0.lock().unwrap().push((transport, client, server));
        Some(ProcessInfo {
            pid: u32::from(client.port()),
            exe: "/usr/bin/curl".into(),
            cmdline: vec!["curl".into(), "-x".into()],
        })
    }
}

fn curl(proxy: SocketAddr, url: &str) -> bool {
    run(Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "--max-time", "10", "-x"])
        .arg(format!("http://{proxy}"))
        .arg(url))
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_connection_names_the_owner_of_its_client_socket() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let calls: Calls = Arc::default();
    let opts = Options {
        owners: Some(Arc::new(Recording(calls.clone()))),
        ..Options::default()
    };
    let mut gw = Running::start(
        policy(&["origin.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        opts,
    )
    .await;
    let proxy = gw.proxy;
    let allowed = format!("http://origin.test:{}/a", origin.port());
    assert!(tokio::task::spawn_blocking(move || curl(proxy, &allowed))
        .await
        .unwrap());
    let refused = "http://elsewhere.test/b".to_owned();
    tokio::task::spawn_blocking(move || curl(proxy, &refused))
        .await
        .unwrap();
    gw.wait_event(|e| e.kind == EventKind::Blocked).await;
    dns_query_udp(gw.dns_udp.unwrap(), "origin.test", RecordType::A).await;
    let dns_event = gw.wait_event(|e| e.kind == EventKind::DnsQuery).await;

    let calls = calls.lock().unwrap().clone();
    // Two proxy connections (asked with the listener as the server), one DNS datagram.
    let tcp: Vec<_> = calls.iter().filter(|c| c.0 == Transport::Tcp).collect();
    assert_eq!(tcp.len(), 2, "{calls:?}");
    assert!(tcp.iter().all(|c| c.2 == Some(proxy)), "{calls:?}");
    let udp: Vec<_> = calls.iter().filter(|c| c.0 == Transport::Udp).collect();
    assert_eq!(udp.len(), 1, "{calls:?}");
    assert_eq!(udp[0].2, None);

    let events = gw.events();
    let request = events
        .iter()
        .find(|e| e.kind == EventKind::HttpRequest)
        .unwrap();
    let blocked = events
        .iter()
        .find(|e| e.kind == EventKind::Blocked)
        .unwrap();
    assert_eq!(request.verdict, Verdict::Allow);
    for (e, call) in [(request, tcp[0]), (blocked, tcp[1])] {
        let p = e.process.as_deref().expect("a process");
        assert_eq!(p.pid, u32::from(call.1.port()), "{e:?}");
        assert_eq!(p.exe, "/usr/bin/curl");
    }
    assert_eq!(
        dns_event.process.as_deref().map(|p| p.pid),
        Some(u32::from(udp[0].1.port()))
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_socket_owners_events_carry_no_process() {
    let (origin, _) = origin::spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dns = FakeDns::start(LOOPBACK, &[("origin.test", &[LOOPBACK])]).await;
    let mut gw = Running::start(
        policy(&["origin.test:*"], &["127.0.0.1/32:*"]),
        dns.addr,
        Options::default(),
    )
    .await;
    let proxy = gw.proxy;
    let url = format!("http://origin.test:{}/a", origin.port());
    assert!(tokio::task::spawn_blocking(move || curl(proxy, &url))
        .await
        .unwrap());
    let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
    assert!(e.process.is_none(), "{e:?}");
    gw.stop().await;
}
