//! What process attribution costs per lookup (quoted in docs/benchmarks.md).
//!
//! ```text
//! cargo run --release -p cordon --example attribution_cost -- [CONNECTIONS] [ROUNDS] [--proc-only]
//! ```
//!
//! CONNECTIONS child processes (python3) each hold one TCP connection to a local listener; the
//! test process's own pid namespace stands in for a sandbox's (so the namespace scan on a miss
//! walks every process of the host: a pessimistic case). Reports the time of one
//! `SocketOwners::owner` call: the first lookup of each process (a miss: the namespace is
//! listed), then repeated lookups (hits, the recent owner searched first, as with a script that
//! opens connection after connection), and a lookup of a port nobody holds. TCP sockets are
//! found by an exact sock_diag lookup, as in `cordon run`; `--proc-only` reads
//! `/proc/PID/net/tcp` instead (the fallback).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../src/attribution.rs"]
#[allow(dead_code)]
mod attribution;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cordon_gateway::{SocketOwners, Transport};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let connections: usize = args.next().map_or(8, |a| a.parse().unwrap());
    let rounds: usize = args.next().map_or(200, |a| a.parse().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..connections {
        let mut child = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket, sys\ns = socket.create_connection(('127.0.0.1', {}))\nprint(s.getsockname()[1], flush=True)\nsys.stdin.read()\n",
                    addr.port()
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(char::from(byte[0]));
        }
        ports.push(line.trim().parse::<u16>().unwrap());
        children.push(child);
    }
    let _accepted: Vec<_> = (0..connections)
        .map(|_| listener.accept().unwrap())
        .collect();
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let diag = if std::env::args().any(|a| a == "--proc-only") {
        None
    } else {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        Some(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    };
    let server = Some(addr);
    let owners = attribution::ProcSocketOwners::new(std::process::id(), diag).unwrap();
    let time = |port: u16| {
        let t = Instant::now();
        let found = owners.owner(Transport::Tcp, SocketAddr::new(addr.ip(), port), server);
        (t.elapsed(), found)
    };
    let mut misses = Vec::new();
    for &port in &ports {
        let (d, found) = time(port);
        assert!(found.is_some());
        misses.push(d);
    }
    let mut hits = Vec::new();
    for _ in 0..rounds {
        for &port in &ports {
            // The same owner twice in a row: the common case of one client opening connections.
            let _ = time(port);
            let (d, found) = time(port);
            assert!(found.is_some());
            hits.push(d);
        }
    }
    let free = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut unknown = Vec::new();
    for _ in 0..rounds.min(50) {
        let (d, found) = time(free);
        assert!(found.is_none());
        unknown.push(d);
    }
    // A DNS client's UDP socket (this process's own): the /proc/PID/net/udp path.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let _ = owners.owner(Transport::Udp, udp_addr, None);
    let mut udp_lookups = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        assert!(owners.owner(Transport::Udp, udp_addr, None).is_some());
        udp_lookups.push(t.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!(
        "attribution_cost: {connections} client processes, {processes} processes in the namespace"
    );
    println!(
        "  first lookup of a process (lists the namespace): median {:?}",
        median(&mut misses)
    );
    println!(
        "  lookup of the most recent owner:                 median {:?}",
        median(&mut hits)
    );
    println!(
        "  lookup of a socket nobody holds:                 median {:?}",
        median(&mut unknown)
    );
    println!(
        "  UDP (a DNS query) of the most recent owner:      median {:?}",
        median(&mut udp_lookups)
    );
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}
