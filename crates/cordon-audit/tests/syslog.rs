//! The live syslog sink against real loopback receivers (UDP and TCP), a slow receiver and a
//! missing one.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sample_events;
use cordon_audit::syslog::{SyslogConfig, SyslogSink, Transport};
use cordon_audit::{
    AuditWriter, Event, EventFilter, EventKind, Severity, Store, Timestamp, Verdict,
};

/// `(PRI, MSGID, the event in MSG)` of one RFC 5424 message.
fn parse(message: &[u8]) -> (u16, String, Event) {
    let text = std::str::from_utf8(message).unwrap();
    let rest = text.strip_prefix('<').unwrap();
    let (pri, rest) = rest.split_once(">1 ").unwrap();
    let fields: Vec<&str> = rest.splitn(6, ' ').collect();
    // TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD-and-MSG
    assert_eq!(fields[2], "cordon");
    assert_eq!(fields[3], std::process::id().to_string());
    Timestamp::parse_rfc3339(fields[0]).unwrap();
    let sd_and_msg = fields[5];
    assert!(
        sd_and_msg.starts_with("[cordon@32473 session=\""),
        "{sd_and_msg}"
    );
    let json = &sd_and_msg[sd_and_msg.find("] {").unwrap() + 2..];
    (
        pri.parse().unwrap(),
        fields[4].to_owned(),
        serde_json::from_str(json).unwrap(),
    )
}

fn alert() -> Event {
    let mut e = Event::new(EventKind::Alert, "01JSYSLOG", "alice", "c0de");
    e.rule = Some("dns_tunnel".into());
    e.ts = Timestamp::from_millis(common::BASE_MS);
    e.detail = serde_json::json!({"names": 41, "domain": "evil.test"});
    e
}

#[test]
fn udp_receives_every_event_as_one_rfc_5424_datagram() {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sink = SyslogSink::start(SyslogConfig::new(
        Transport::Udp,
        receiver.local_addr().unwrap(),
        Severity::Info,
    ))
    .unwrap();
    let events = sample_events("01JSYSLOG", 12);
    for e in &events {
        sink.offer(e);
    }
    let mut buf = vec![0u8; 65536];
    for e in &events {
        let n = receiver.recv(&mut buf).unwrap();
        let (pri, msgid, got) = parse(&buf[..n]);
        assert_eq!(&got, e);
        assert_eq!(msgid, e.kind.as_str());
        let sev = cordon_audit::severity(e);
        assert_eq!(pri, 13 * 8 + u16::from(sev.syslog()));
    }
    let stats = sink.close(Duration::from_secs(5));
    assert_eq!((stats.sent, stats.dropped, stats.failed), (12, 0, 0));
}

#[test]
fn tcp_uses_octet_counting_and_a_minimum_severity_filters() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = SyslogSink::start(SyslogConfig::new(
        Transport::Tcp,
        listener.local_addr().unwrap(),
        Severity::Warning,
    ))
    .unwrap();
    let mut allowed = Event::new(EventKind::Connection, "01JSYSLOG", "alice", "c0de");
    allowed.verdict = Some(Verdict::Allow);
    let mut blocked = allowed.clone();
    blocked.kind = EventKind::Blocked;
    blocked.verdict = Some(Verdict::Block);
    // Framing must not depend on line breaks: put some in a value.
    blocked.path = Some("/a\nb\r\n".into());
    for e in [&allowed, &blocked, &alert()] {
        sink.offer(e);
    }
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut len = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            conn.read_exact(&mut byte).unwrap();
            if byte[0] == b' ' {
                break;
            }
            assert!(byte[0].is_ascii_digit());
            len.push(byte[0]);
        }
        let n: usize = std::str::from_utf8(&len).unwrap().parse().unwrap();
        let mut msg = vec![0u8; n];
        conn.read_exact(&mut msg).unwrap();
        got.push(parse(&msg));
    }
    assert_eq!(got[0].0, 13 * 8 + 4);
    assert_eq!(got[0].2, blocked);
    assert_eq!((got[1].0, got[1].1.as_str()), (13 * 8 + 2, "alert"));
    assert_eq!(got[1].2, alert());
    let stats = sink.close(Duration::from_secs(5));
    assert_eq!((stats.sent, stats.filtered, stats.dropped), (2, 1, 0));
}

#[test]
fn a_receiver_that_stops_reading_never_blocks_offer_and_losses_are_counted() {
    // Accepts (the kernel does, into the backlog) and never reads.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = SyslogConfig::new(
        Transport::Tcp,
        listener.local_addr().unwrap(),
        Severity::Info,
    );
    config.capacity = 16;
    let sink = SyslogSink::start(config).unwrap();
    let mut big = alert();
    big.detail = serde_json::json!({ "pad": "x".repeat(16 * 1024) });
    let offered = 5_000u64;
    let started = Instant::now();
    for _ in 0..offered {
        sink.offer(&big);
    }
    let took = started.elapsed();
    // 5 000 offers of 16 KiB events: far more than the socket buffers hold.
    assert!(took < Duration::from_secs(2), "offer blocked: {took:?}");
    let closing = Instant::now();
    let stats = sink.close(Duration::from_millis(300));
    assert!(closing.elapsed() < Duration::from_secs(2));
    assert!(stats.dropped > 0, "{stats:?}");
    assert!(
        stats.sent + stats.dropped + stats.failed <= offered,
        "{stats:?}"
    );
    assert!(stats.sent < offered, "{stats:?}");
    drop(listener);
}

#[test]
fn a_missing_tcp_receiver_counts_failures_without_blocking() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sink = SyslogSink::start(SyslogConfig::new(Transport::Tcp, port, Severity::Info)).unwrap();
    let started = Instant::now();
    for e in sample_events("01JSYSLOG", 5) {
        sink.offer(&e);
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    let stats = sink.close(Duration::from_secs(5));
    assert_eq!((stats.sent, stats.failed), (0, 5), "{stats:?}");
}

#[test]
fn a_writer_with_a_syslog_tap_forwards_what_it_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let sink = Arc::new(
        SyslogSink::start(SyslogConfig::new(
            Transport::Udp,
            receiver.local_addr().unwrap(),
            Severity::Info,
        ))
        .unwrap(),
    );
    let writer = AuditWriter::open(&path).unwrap().with_tap(sink.clone());
    let events = sample_events("01JTAP", 4);
    for e in &events {
        writer.record(e.clone());
    }
    writer.close().unwrap();
    let mut buf = vec![0u8; 65536];
    for e in &events {
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&parse(&buf[..n]).2, e);
    }
    let stored = Store::open_existing(&path)
        .unwrap()
        .events(&EventFilter::default())
        .unwrap();
    assert_eq!(stored.len(), 4);
    assert_eq!(sink.close(Duration::from_secs(1)).sent, 4);
}
