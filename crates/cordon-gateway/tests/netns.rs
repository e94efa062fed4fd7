//! Tests that need addresses outside 127.0.0.0/8. Each re-runs itself inside a fresh user +
//! network namespace that has only `lo` (no uplink, nothing leaves the machine), adds the
//! "internet" and "private" addresses it needs to `lo`, and puts traps on the private ones to
//! prove the gateway never connected to them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use common::*;
use cordon_gateway::{EventKind, SoOriginalDst, Verdict, Via};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
const PRIVATE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));
const PUBLIC: IpAddr = IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4));

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn every_ssrf_encoding_is_refused_and_nothing_is_connected() {
    if !enter_netns("every_ssrf_encoding_is_refused_and_nothing_is_connected") {
        return;
    }
    let nat64 = ip("64:ff9b::7f00:1");
    let sixto4 = ip("2002:7f00:1::");
    for a in [METADATA, PRIVATE, nat64, sixto4] {
        add_lo_addr(a);
    }
    rt().block_on(async {
        let traps = vec![
            Trap::start(SocketAddr::new(METADATA, 80)).await,
            Trap::start(SocketAddr::new(PRIVATE, 80)).await,
            Trap::start(SocketAddr::new(LOOPBACK, 80)).await,
            Trap::start(SocketAddr::new(nat64, 80)).await,
            Trap::start(SocketAddr::new(sixto4, 80)).await,
            Trap::start(SocketAddr::new(ip("::1"), 80)).await,
        ];
        let dns = FakeDns::start(
            LOOPBACK,
            &[
                ("private.test", &[PRIVATE]),
                ("meta.test", &[METADATA]),
                ("rebind.test", &[LOOPBACK]),
                ("v6.test", &[nat64]),
            ],
        )
        .await;
        // Allow every address and every test name: only the anti-SSRF check can refuse.
        let mut gw = Running::start(
            policy(
                &["0.0.0.0/0:*", "[::/0]:*", "private.test:*", "meta.test:*", "rebind.test:*", "v6.test:*"],
                &[],
            ),
            dns.addr,
            Options::default(),
        )
        .await;
        let proxy = gw.proxy;
        let targets = [
            "2852039166",
            "0xa9fea9fe",
            "0xA9.0xFE.0xA9.0xFE",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.254.169.254",
            "[::ffff:a9fe:a9fe]",
            "[::ffff:169.254.169.254]",
            "[::ffff:127.0.0.1]",
            "0",
            "0.0.0.0",
            "127.1",
            "2130706433",
            "[::1]",
            "[64:ff9b::7f00:1]",
            "[2002:7f00:1::]",
            "10.0.0.5",
            "012.0.0.5",
            "private.test",
            "meta.test",
            "rebind.test",
            "v6.test",
        ];
        for t in targets {
            let r = tokio::task::spawn_blocking(move || proxy_get(proxy, &format!("http://{t}/"), t))
                .await
                .unwrap();
            assert_eq!(r.status, 403, "http://{t}/ was not refused: {r:?}");
            assert!(r.reason().contains("private"), "http://{t}/: {}", r.reason());
            let r = tokio::task::spawn_blocking(move || {
                raw_http(proxy, &format!("CONNECT {t}:80 HTTP/1.1\r\nHost: {t}:80\r\nConnection: close\r\n\r\n"))
            })
            .await
            .unwrap();
            assert_eq!(r.status, 403, "CONNECT {t}:80 was not refused: {r:?}");
        }
        // curl and Python, as an agent would write it.
        let (ok, out, err) = run(Command::new("curl").args([
            "-sS",
            "-D",
            "-",
            "--max-time",
            "10",
            "-x",
            &format!("http://{proxy}"),
            "http://169.254.169.254/latest/meta-data/",
        ]));
        assert!(ok, "{err}");
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(out.contains("metadata 169.254.169.254/32"), "{out}");
        let script = format!(
            "import urllib.request, urllib.error\n\
             o = urllib.request.build_opener(urllib.request.ProxyHandler({{'http': 'http://{proxy}'}}))\n\
             try:\n    o.open('http://2852039166/', timeout=10)\nexcept urllib.error.HTTPError as e:\n    print(e.code, e.headers['X-Cordon-Reason'])\n"
        );
        let (ok, out, err) = run(Command::new("python3").args(["-c", &script]));
        assert!(ok, "{err}");
        assert!(out.starts_with("403 address 169.254.169.254 is private"), "{out}");

        for t in &traps {
            assert_eq!(t.hits(), 0, "the gateway connected to {}", t.addr);
        }
        let stats = gw.stop().await;
        assert_eq!(stats.allowed, 0);
        assert!(gw.events().iter().all(|e| e.verdict == Verdict::Block));
        assert!(gw.events().iter().filter(|e| e.ip.is_some()).all(|e| e.rule.starts_with("ssrf:")));
        // Names were resolved by the gateway (the upstream saw them), literals never.
        let asked = dns.asked();
        assert!(asked.iter().all(|n| n.ends_with(".test")), "{asked:?}");
    });
}

#[test]
fn mixed_answers_use_only_the_public_address_and_a_public_host_is_reachable() {
    if !enter_netns("mixed_answers_use_only_the_public_address_and_a_public_host_is_reachable") {
        return;
    }
    for a in [PUBLIC, PRIVATE] {
        add_lo_addr(a);
    }
    rt().block_on(async {
        let trap = Trap::start(SocketAddr::new(PRIVATE, 80)).await;
        let (origin, _) = origin::spawn(SocketAddr::new(PUBLIC, 80)).await.unwrap();
        let dns = FakeDns::start(
            LOOPBACK,
            &[
                // The private address first: the gateway must skip it, not try it.
                ("mixed.test", &[PRIVATE, PUBLIC]),
                ("public.test", &[PUBLIC]),
                ("private.test", &[PRIVATE]),
            ],
        )
        .await;
        let mut gw = Running::start(
            policy(&["mixed.test:80", "public.test:80", "private.test:80"], &[]),
            dns.addr,
            Options::default(),
        )
        .await;
        let proxy = gw.proxy;
        let r = tokio::task::spawn_blocking(move || proxy_get(proxy, "http://mixed.test/m", "mixed.test"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), "origin: host=mixed.test path=/m");
        let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
        assert_eq!(e.ip, Some(PUBLIC));
        assert_eq!(e.rule, "mixed.test:80");

        let r = tokio::task::spawn_blocking(move || proxy_get(proxy, "http://private.test/", "private.test"))
            .await
            .unwrap();
        assert_eq!(r.status, 403);
        assert_eq!(r.reason(), "private.test resolved to 10.0.0.5, which is private (private 10.0.0.0/8)");

        // A public, allowlisted host through real clients, with no allow_private at all.
        let (ok, out, err) = run(Command::new("curl").args([
            "-sS",
            "--max-time",
            "10",
            "-x",
            &format!("http://{proxy}"),
            "http://public.test/curl",
        ]));
        assert!(ok, "{err}");
        assert_eq!(out, "origin: host=public.test path=/curl");
        let (ok, out, err) = run(Command::new("curl").args([
            "-sS",
            "-p",
            "--max-time",
            "10",
            "-x",
            &format!("http://{proxy}"),
            "http://public.test/tunnel",
        ]));
        assert!(ok, "{err}");
        assert_eq!(out, "origin: host=public.test path=/tunnel");
        let script = format!(
            "import urllib.request\n\
             o = urllib.request.build_opener(urllib.request.ProxyHandler({{'http': 'http://{proxy}'}}))\n\
             print(o.open('http://public.test/py', timeout=10).read().decode())\n"
        );
        let (ok, out, err) = run(Command::new("python3").args(["-c", &script]));
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "origin: host=public.test path=/py");
        assert_eq!(trap.hits(), 0);
        let _ = origin;
        gw.stop().await;
    });
}

#[test]
fn a_client_that_ignores_proxies_is_captured_by_nftables_and_decided_by_name() {
    if !enter_netns("a_client_that_ignores_proxies_is_captured_by_nftables_and_decided_by_name") {
        return;
    }
    add_lo_addr(PUBLIC);
    rt().block_on(async {
        let (origin, _) = origin::spawn(SocketAddr::new(PUBLIC, 8080)).await.unwrap();
        let dns = FakeDns::start(LOOPBACK, &[("public.test", &[PUBLIC])]).await;
        let opts = Options {
            original_dst: Some(Arc::new(SoOriginalDst)),
            ..Options::default()
        };
        let mut gw = Running::start(policy(&["public.test:8080"], &[]), dns.addr, opts).await;
        let tr = gw.transparent.unwrap();
        // The sandbox's plumbing, in miniature: a route for the synthetic range and a NAT
        // redirect of every TCP connect to it, plus one for a public address, to the gateway.
        let (ok, _, err) = run(Command::new("ip").args(["route", "add", "198.18.0.0/15", "dev", "lo"]));
        assert!(ok, "{err}");
        let rules = format!(
            "table ip cordon_test {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n  ip daddr 198.18.0.0/15 tcp dport != 0 redirect to :{port}\n  ip daddr 9.9.9.9 tcp dport != 0 redirect to :{port}\n }}\n}}\n",
            port = tr.port()
        );
        let path = std::env::temp_dir().join(format!("cordon-gw-nft-{}.nft", std::process::id()));
        std::fs::write(&path, rules).unwrap();
        let (ok, _, err) = run(Command::new("nft").arg("-f").arg(&path));
        let _ = std::fs::remove_file(&path);
        if !ok {
            eprintln!("SKIPPED nftables part: nft -f failed: {err}");
            gw.stop().await;
            return;
        }
        add_lo_addr(ip("9.9.9.9"));
        let synthetic = gw.synthetic_for("public.test").await;
        // curl with no proxy, using the address the sandbox's DNS gave it.
        let (ok, out, err) = run(Command::new("curl").args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "--resolve",
            &format!("public.test:8080:{synthetic}"),
            "http://public.test:8080/captured",
        ]));
        assert!(ok, "{err}");
        assert_eq!(out, "origin: host=public.test:8080 path=/captured");
        let e = gw.wait_event(|e| e.kind == EventKind::HttpRequest).await;
        assert_eq!((e.via, e.host.as_deref(), e.ip), (Via::Transparent, Some("public.test"), Some(PUBLIC)));
        assert_eq!(e.port, Some(8080));

        // A direct connect to an address nobody allowed is reset, and recorded with its address.
        let (ok, _, err) = run(Command::new("curl").args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "http://9.9.9.9:53/",
        ]));
        assert!(!ok);
        // The reset can land before curl's connect check ("Couldn't connect") or after it.
        assert!(
            err.contains("reset") || err.contains("Recv failure") || err.contains("Couldn't connect"),
            "{err}"
        );
        let b = gw.wait_event(|e| e.kind == EventKind::Blocked).await;
        assert_eq!((b.ip, b.port, b.rule.as_str()), (Some(ip("9.9.9.9")), Some(53), "default-deny"));
        let _ = origin;
        gw.stop().await;
    });
}
