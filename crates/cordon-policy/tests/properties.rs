//! Property tests for every parser in the crate: no input makes one panic, every value survives
//! display-then-parse, every encoding of an address means that address, and every address in a
//! blocked range is blocked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use cordon_policy::duration::{format_duration, parse_duration};
use cordon_policy::ssrf::BLOCKED_RANGES;
use cordon_policy::{
    blocked_range, decide, decide_resolved, parse_ip_literal, AllowEntry, ByteSize, Enforcement,
    ExtraMount, HostName, IpLiteral, Layer, NetworkMode, NetworkPolicy, OnExceed, Policy, Target,
};
use ipnet::IpNet;
use proptest::prelude::*;

// ---------------------------------------------------------------- host names

fn label() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9_-]{0,19}".prop_filter("not an A-label", |l| {
        !l.to_ascii_lowercase().starts_with("xn--")
    })
}

fn ldh_name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 0..4),
        "[a-zA-Z]{2,10}",
        any::<bool>(),
    )
        .prop_map(|(labels, tld, dot)| {
            let mut name = labels.join(".");
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(&tld);
            if dot {
                name.push('.');
            }
            name
        })
}

fn assert_normalised(name: &HostName) {
    let s = name.as_str();
    assert!(s.len() <= 253, "{s}");
    assert!(!s.ends_with('.'), "{s}");
    for l in s.split('.') {
        assert!((1..=63).contains(&l.len()), "{s}");
        assert!(
            l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
            "{s}"
        );
    }
    assert_eq!(parse_ip_literal(s), IpLiteral::NotIp, "{s}");
}

proptest! {
    #[test]
    fn host_parsing_never_panics_and_its_output_is_normalised(input in any::<String>()) {
        if let Ok(name) = HostName::parse(&input) {
            assert_normalised(&name);
            prop_assert_eq!(HostName::parse(name.as_str()), Ok(name.clone()));
        }
    }

    #[test]
    fn unicode_host_names_normalise_to_a_fixed_point(input in "[a-zA-Z0-9\u{e0}-\u{ff}\u{430}-\u{44f}\u{4e00}-\u{4e20}._-]{1,40}") {
        if let Ok(name) = HostName::parse(&input) {
            assert_normalised(&name);
            prop_assert_eq!(HostName::parse(name.as_str()), Ok(name.clone()));
        }
    }

    #[test]
    fn ascii_ldh_names_parse_to_their_lower_case_form(input in ldh_name()) {
        let name = HostName::parse(&input).unwrap();
        let expected = input.trim_end_matches('.').to_ascii_lowercase();
        prop_assert_eq!(name.as_str(), expected.as_str());
        let shown = name.to_string();
        prop_assert_eq!(HostName::parse(&shown), Ok(name));
    }
}

// ---------------------------------------------------------------- allow entries

fn port_text() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("*".to_owned())),
        (1u16..=65535).prop_map(|p| Some(p.to_string())),
    ]
}

fn allow_text() -> impl Strategy<Value = String> {
    let host = prop_oneof![
        ldh_name(),
        ldh_name().prop_map(|n| format!("*.a.{n}")),
        any::<u32>().prop_map(|n| Ipv4Addr::from(n).to_string()),
        (any::<u32>(), 0u8..=32).prop_map(|(n, p)| {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(n)), p)
                .unwrap()
                .trunc()
                .to_string()
        }),
        any::<u128>().prop_map(|n| format!("[{}]", Ipv6Addr::from(n))),
        (any::<u128>(), 0u8..=128).prop_map(|(n, p)| {
            format!(
                "[{}]",
                IpNet::new(IpAddr::V6(Ipv6Addr::from(n)), p)
                    .unwrap()
                    .trunc()
            )
        }),
    ];
    (host, port_text()).prop_map(|(host, port)| match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

proptest! {
    #[test]
    fn allow_entry_parsing_never_panics(input in any::<String>()) {
        if let Ok(entry) = AllowEntry::parse(&input) {
            prop_assert_eq!(entry.raw(), input.as_str());
        }
    }

    #[test]
    fn allow_entry_parsing_never_panics_on_entry_like_text(input in "[\\[\\]0-9a-fA-Fx:./*%-]{0,30}") {
        if let Ok(entry) = AllowEntry::parse(&input) {
            prop_assert_eq!(AllowEntry::parse(&entry.to_string()), Ok(entry));
        }
    }

    #[test]
    fn well_formed_allow_entries_parse_and_reparse_to_the_same_entry(text in allow_text()) {
        let entry = AllowEntry::parse(&text).unwrap();
        prop_assert_eq!(entry.raw(), text.as_str());
        prop_assert_eq!(entry.to_string(), text.clone());
        prop_assert_eq!(AllowEntry::parse(&entry.to_string()), Ok(entry));
    }
}

// ---------------------------------------------------------------- IP literals

/// Writes `n` (one inet_aton part) in radix 8, 10 or 16.
fn encode(n: u32, radix: u8) -> String {
    match radix {
        8 => format!("0{n:o}"),
        16 => format!("0x{n:x}"),
        _ => n.to_string(),
    }
}

proptest! {
    #[test]
    fn ip_literal_parsing_never_panics(input in any::<String>()) {
        let _ = parse_ip_literal(&input);
    }

    #[test]
    fn ip_literal_parsing_never_panics_on_numeric_text(input in "[0-9a-fA-FxX.:\\[\\]%]{0,40}") {
        let _ = parse_ip_literal(&input);
    }

    #[test]
    fn every_inet_aton_encoding_of_an_address_parses_to_it(n in any::<u32>(), radixes in prop::array::uniform4(prop::sample::select(vec![8u8, 10, 16])), upper in any::<bool>()) {
        let want = IpLiteral::Ip(IpAddr::V4(Ipv4Addr::from(n)));
        let [a, b, c, d] = n.to_be_bytes().map(u32::from);
        let forms = [
            n.to_string(),
            format!("0x{n:x}"),
            format!("0X{n:X}"),
            format!("0{n:o}"),
            format!("{}.{}.{}.{}", encode(a, radixes[0]), encode(b, radixes[1]), encode(c, radixes[2]), encode(d, radixes[3])),
            format!("{}.{}.{}", encode(a, radixes[0]), encode(b, radixes[1]), encode((c << 8) | d, radixes[2])),
            format!("{}.{}", encode(a, radixes[0]), encode((b << 16) | (c << 8) | d, radixes[1])),
            format!("{}.", Ipv4Addr::from(n)),
        ];
        for form in forms {
            let form = if upper { form.to_ascii_uppercase() } else { form };
            prop_assert_eq!(parse_ip_literal(&form), want.clone(), "{}", form);
        }
    }

    #[test]
    fn every_ipv6_address_parses_bare_and_bracketed(n in any::<u128>()) {
        let addr = Ipv6Addr::from(n);
        let want = IpLiteral::Ip(IpAddr::V6(addr));
        prop_assert_eq!(parse_ip_literal(&addr.to_string()), want.clone());
        prop_assert_eq!(parse_ip_literal(&format!("[{addr}]")), want);
    }

    #[test]
    fn out_of_range_parts_are_invalid_not_names(a in 256u32..100_000, n in any::<u32>()) {
        let [_, b, c, d] = n.to_be_bytes();
        let text = format!("{a}.{b}.{c}.{d}");
        prop_assert!(matches!(parse_ip_literal(&text), IpLiteral::Invalid(_)), "{}", text);
        prop_assert!(HostName::parse(&text).is_err());
    }
}

// ---------------------------------------------------------------- sizes and durations

proptest! {
    #[test]
    fn size_parsing_never_panics(input in any::<String>()) {
        let _ = ByteSize::parse(&input);
    }

    #[test]
    fn size_parsing_never_panics_on_size_like_text(input in "[0-9]{0,25}[kKmMgGtTiIbB]{0,3}") {
        let _ = ByteSize::parse(&input);
    }

    #[test]
    fn every_size_survives_display_then_parse(n in any::<u64>()) {
        let size = ByteSize(n);
        prop_assert_eq!(ByteSize::parse(&size.to_string()), Ok(size));
    }

    #[test]
    fn suffixes_multiply_exactly(n in 0u64..1_000_000, unit in prop::sample::select(vec![("K", 1u64 << 10), ("MiB", 1 << 20), ("g", 1 << 30), ("MB", 1_000_000), ("kb", 1000)])) {
        prop_assert_eq!(ByteSize::parse(&format!("{n}{}", unit.0)), Ok(ByteSize(n * unit.1)));
    }

    #[test]
    fn duration_parsing_never_panics(input in any::<String>()) {
        let _ = parse_duration(&input);
    }

    #[test]
    fn duration_parsing_never_panics_on_duration_like_text(input in "([0-9]{0,25}(h|m|s|ms|us|ns|d)?){0,5}") {
        let _ = parse_duration(&input);
    }

    #[test]
    fn every_duration_survives_format_then_parse(secs in 0u64..=u64::MAX / 2, nanos in 0u32..1_000_000_000) {
        let d = Duration::new(secs, nanos);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
}

// ---------------------------------------------------------------- blocked ranges and decisions

fn address_in(net: IpNet, offset: u128) -> IpAddr {
    match net {
        IpNet::V4(net) => {
            let host = (offset as u32) & u32::from(net.hostmask());
            IpAddr::V4(Ipv4Addr::from(u32::from(net.network()) | host))
        }
        IpNet::V6(net) => {
            let host = offset & u128::from(net.hostmask());
            IpAddr::V6(Ipv6Addr::from(u128::from(net.network()) | host))
        }
    }
}

fn open_policy(mode: Enforcement) -> NetworkPolicy {
    NetworkPolicy {
        mode,
        allow: vec![
            AllowEntry::parse("0.0.0.0/0:*").unwrap(),
            AllowEntry::parse("[::/0]:*").unwrap(),
        ],
        ..NetworkPolicy::default()
    }
}

proptest! {
    #[test]
    fn every_address_inside_a_blocked_range_is_blocked(index in 0..BLOCKED_RANGES.len(), offset in any::<u128>(), report in any::<bool>()) {
        let range = BLOCKED_RANGES[index];
        let addr = address_in(range.net, offset);
        let found = blocked_range(addr);
        prop_assert!(found.is_some(), "{} in {} is not blocked", addr, range);
        let mode = if report { Enforcement::Report } else { Enforcement::Enforce };
        let policy = open_policy(mode);
        let d = decide(&policy, Target::Addr(addr), 443);
        prop_assert!(!d.allowed && !d.enforced_allowed, "{}: {:?}", addr, d);
        let name = HostName::parse("example.com").unwrap();
        let d = decide_resolved(&policy, Some(&name), addr, 443);
        prop_assert!(!d.allowed && !d.enforced_allowed, "{}: {:?}", addr, d);
    }

    #[test]
    fn every_ipv4_mapped_address_is_blocked(n in any::<u32>()) {
        let addr = IpAddr::V6(Ipv4Addr::from(n).to_ipv6_mapped());
        prop_assert!(blocked_range(addr).is_some());
    }

    #[test]
    fn an_open_allowlist_allows_exactly_the_unblocked_addresses(n in any::<u32>(), m in any::<u128>()) {
        let policy = open_policy(Enforcement::Enforce);
        for addr in [IpAddr::V4(Ipv4Addr::from(n)), IpAddr::V6(Ipv6Addr::from(m))] {
            let d = decide(&policy, Target::Addr(addr), 443);
            prop_assert_eq!(d.allowed, blocked_range(addr).is_none(), "{}: {:?}", addr, d);
        }
    }

    #[test]
    fn an_empty_allowlist_denies_every_name_unless_in_report_mode(input in ldh_name(), port in any::<u16>(), report in any::<bool>()) {
        let name = HostName::parse(&input).unwrap();
        let mode = if report { Enforcement::Report } else { Enforcement::Enforce };
        let policy = NetworkPolicy { mode, ..NetworkPolicy::default() };
        let d = decide(&policy, Target::Name(&name), port);
        prop_assert!(!d.enforced_allowed);
        prop_assert_eq!(d.allowed, report);
        prop_assert_eq!(d.rule.as_str(), "default-deny");
    }
}

// ---------------------------------------------------------------- whole policies

fn policy() -> impl Strategy<Value = Policy> {
    let sandbox = (
        prop::option::of("[a-z./]{1,20}"),
        1u64..=86_400_000,
        prop::option::of(prop::sample::select(vec![
            NetworkMode::None,
            NetworkMode::Gateway,
        ])),
        "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        any::<bool>(),
        1u32..u32::MAX,
        1u32..u32::MAX,
        prop::collection::btree_set(prop::sample::select(Layer::ALL.to_vec()), 0..4),
        prop::collection::btree_map("[A-Z_][A-Z0-9_]{0,8}", "[^\u{0}]{0,12}", 0..4),
        prop::collection::vec(("/[a-z]{1,6}", "/[a-z]{1,6}", any::<bool>()), 0..3),
    );
    let limits = (
        (16u64 << 20)..(1 << 40),
        1u64..=4_194_304,
        0.01f64..=1024.0,
        16u64..=1_048_576,
        (1u64 << 20)..(1 << 40),
        (1u64 << 20)..(1 << 40),
        1024u64..(1 << 40),
    );
    let network = (
        any::<bool>(),
        prop::collection::vec(
            prop::sample::select(vec![
                "api.github.com",
                "*.example.com:*",
                "93.184.216.34:80",
                "[2606:4700::1111]:53",
                "8.8.8.0/24:*",
            ]),
            0..4,
        ),
        prop::collection::vec(
            prop::sample::select(vec![
                "10.0.0.5:8080",
                "db.corp.example:5432",
                "192.168.0.0/16:*",
            ]),
            0..3,
        ),
        (1u32.., 1u32.., 1u32.., 1u64.., 1u64.., any::<bool>()),
        any::<u32>(),
    );
    (sandbox, limits, network).prop_map(|(s, l, n)| {
        let mut p = Policy::default();
        p.sandbox.workspace = s.0.map(PathBuf::from);
        p.sandbox.timeout = Duration::from_millis(s.1);
        p.sandbox.network = s.2;
        p.sandbox.hostname = s.3;
        p.sandbox.tty = s.4;
        p.sandbox.host_uid = s.5;
        p.sandbox.host_gid = s.6;
        p.sandbox.allow_missing = s.7;
        p.sandbox.env =
            s.8.into_iter()
                .filter(|(k, _)| k != "HOME")
                .collect::<BTreeMap<_, _>>();
        let mut seen = BTreeSet::new();
        p.sandbox.mounts =
            s.9.into_iter()
                .filter(|(_, path, _)| {
                    seen.insert(path.clone())
                        && !["/proc", "/dev", "/sys", "/tmp"].contains(&path.as_str())
                })
                .map(|(host, path, writable)| ExtraMount {
                    host: host.into(),
                    path: path.into(),
                    writable,
                })
                .collect();
        p.limits.memory = ByteSize(l.0);
        p.limits.pids = l.1;
        p.limits.cpu = l.2;
        p.limits.nofile = l.3;
        p.limits.tmp = ByteSize(l.4);
        p.limits.workspace = ByteSize(l.5);
        p.limits.file_size = ByteSize(l.6);
        p.network.mode = if n.0 {
            Enforcement::Report
        } else {
            Enforcement::Enforce
        };
        p.network.allow = n.1.iter().map(|a| AllowEntry::parse(a).unwrap()).collect();
        p.network.allow_private = n.2.iter().map(|a| AllowEntry::parse(a).unwrap()).collect();
        let r = n.3;
        p.network.rate.requests_per_minute = r.0;
        p.network.rate.requests_per_minute_per_host = r.1;
        p.network.rate.max_connections = r.2;
        p.network.rate.max_bytes_out = ByteSize(r.3);
        p.network.rate.max_bytes_in = ByteSize(r.4);
        p.network.rate.on_exceed = if r.5 {
            OnExceed::Terminate
        } else {
            OnExceed::Block
        };
        p.detect.blocked.enabled = n.4 > 0;
        p.detect.blocked.threshold = n.4.max(1);
        p
    })
}

proptest! {
    #[test]
    fn every_valid_policy_round_trips_through_toml(p in policy()) {
        p.validate().unwrap();
        let text = p.to_toml_string();
        let back = Policy::from_toml_str(&text, None);
        prop_assert_eq!(back, Ok(p), "{}", text);
    }

    #[test]
    fn policy_parsing_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = Policy::from_toml_str(&text, Some("fuzz.toml"));
    }

    #[test]
    fn policy_parsing_never_panics_on_policy_shaped_text(
        key in prop::sample::select(vec!["memory", "pids", "cpu", "nofile", "tmp", "workspace", "file_size", "bogus"]),
        value in prop_oneof!["\"[0-9a-zA-Z.]{0,12}\"", "-?[0-9]{1,22}", "-?[0-9]{1,5}\\.[0-9]{1,5}", Just("true".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()), Just("nan".to_owned()), Just("-inf".to_owned())],
    ) {
        let text = format!("[limits]\n{key} = {value}\n");
        if let Err(e) = Policy::from_toml_str(&text, Some("p.toml")) {
            let message = e.to_string();
            prop_assert!(message.starts_with("p.toml:"), "{}", message);
            prop_assert!(e.line().is_some(), "{}", message);
        }
    }
}
