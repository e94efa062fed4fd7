//! The hash chain: how a record's hash is computed.
//!
//! Guarantees:
//! - One chain per store, across all sessions and all writer processes. Record `id` (the global
//!   sequence, 1, 2, 3, …) has
//!   `hash = SHA-256( "cordon-audit-chain-v1\n" || prev_hash || canonical(fields) || id )`
//!   where `prev_hash` is the previous record's `hash` as its 64 lower-case hex characters
//!   ([`GENESIS_HASH`] for record 1, or the newest anchor's hash after a prune), and `id` is
//!   8 bytes, big-endian, two's complement.
//! - `canonical(fields)` is computed from the values exactly as SQLite stores them, in the fixed
//!   order of [`HASHED_COLUMNS`], each as a type tag and a length-prefixed body:
//!   `0x00` NULL; `0x01` + 8-byte big-endian integer; `0x02` + 8-byte big-endian length + UTF-8
//!   text; `0x03` + 8-byte big-endian IEEE-754 bits (real); `0x04` + 8-byte length + blob. The
//!   encoding is injective, so no two different rows hash the same input, and verification never
//!   re-serialises anything (the `detail` JSON is hashed as the stored text).
//! - Schema 2 added the process attribution columns (`pid`, `exe`, `cmdline`, see
//!   [`ATTRIBUTION_COLUMNS`]). They are appended to `canonical(fields)` only when at least one of
//!   them is not NULL, so every record written before them keeps its hash (old stores verify
//!   unchanged, nothing is re-hashed) while a record that has them cannot lose them unnoticed:
//!   nulling them changes the encoding. The encoding stays injective: the first 19 items are
//!   self-delimiting, after them come either nothing or exactly three more.
//! - Changing any hashed column, its type, the id, or the link to the previous record changes the
//!   hash. What the chain cannot do on its own is stop someone who rewrites *every* later hash:
//!   see the crate README, "Security notes".

use rusqlite::types::ValueRef;
use sha2::{Digest, Sha256};

use crate::event::{
    cut_chars, hex, truncate_path, Event, ProcessInfo, Verdict, MAX_EXE_CHARS, MAX_HOST_CHARS,
    MAX_METHOD_CHARS,
};

/// `prev_hash` of the very first record of a store.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const DOMAIN: &[u8] = b"cordon-audit-chain-v1\n";

/// How many of [`HASHED_COLUMNS`] are always encoded (the schema 1 columns).
pub const BASE_COLUMNS: usize = 19;

/// The attribution columns at the end of [`HASHED_COLUMNS`], encoded only when one is not NULL.
pub const ATTRIBUTION_COLUMNS: [&str; 3] = ["pid", "exe", "cmdline"];

/// The columns covered by the hash, in hashing order.
pub const HASHED_COLUMNS: [&str; 22] = [
    "session_id",
    "session_seq",
    "kind",
    "user_id",
    "code_sha256",
    "ts",
    "ts_ms",
    "host",
    "ip",
    "port",
    "method",
    "path",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "verdict",
    "rule",
    "reason",
    "detail",
    "pid",
    "exe",
    "cmdline",
];

/// The text forms of an event's fields that are not stored verbatim; [`event_fields`] borrows
/// from them.
pub(crate) struct DerivedText {
    ts: String,
    ip: Option<String>,
    detail: Option<String>,
    cmdline: Option<String>,
}

impl DerivedText {
    pub(crate) fn of(event: &Event) -> DerivedText {
        DerivedText {
            ts: event.ts.to_rfc3339(),
            ip: event.ip.map(ip_text),
            detail: match &event.detail {
                serde_json::Value::Null => None,
                // Serialising a `serde_json::Value` cannot fail (its map keys are strings).
                other => serde_json::to_string(other).ok(),
            },
            // A list of strings always serialises.
            cmdline: event
                .process
                .as_ref()
                .and_then(|p| serde_json::to_string(&bounded_cmdline(p)).ok()),
        }
    }
}

/// `ip` as `Display` writes it; IPv4 without the formatting machinery (the writer's hot path).
fn ip_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
            out
        }
        std::net::IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The values the store keeps for `event` at position `session_seq` of its session, in
/// [`HASHED_COLUMNS`] order, with the length cuts of [`Event::bounded`] applied. Borrows instead
/// of copying: this is the writer's hot path.
pub(crate) fn event_fields<'a>(
    event: &'a Event,
    derived: &'a DerivedText,
    session_seq: i64,
) -> [ValueRef<'a>; 22] {
    fn text(s: Option<&str>) -> ValueRef<'_> {
        s.map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes()))
    }
    fn int(n: Option<u64>) -> ValueRef<'static> {
        // SQLite integers are i64; counters beyond 2^63 saturate.
        n.map_or(ValueRef::Null, |n| {
            ValueRef::Integer(i64::try_from(n).unwrap_or(i64::MAX))
        })
    }
    [
        ValueRef::Text(event.session_id.as_bytes()),
        ValueRef::Integer(session_seq),
        ValueRef::Text(event.kind.as_str().as_bytes()),
        ValueRef::Text(event.user_id.as_bytes()),
        ValueRef::Text(event.code_sha256.as_bytes()),
        ValueRef::Text(derived.ts.as_bytes()),
        ValueRef::Integer(event.ts.as_millis()),
        text(event.host.as_deref().map(|h| cut_chars(h, MAX_HOST_CHARS))),
        text(derived.ip.as_deref()),
        event
            .port
            .map_or(ValueRef::Null, |p| ValueRef::Integer(i64::from(p))),
        text(
            event
                .method
                .as_deref()
                .map(|m| cut_chars(m, MAX_METHOD_CHARS)),
        ),
        text(event.path.as_deref().map(truncate_path)),
        int(event.bytes_up),
        int(event.bytes_down),
        int(event.duration_ms),
        text(event.verdict.map(Verdict::as_str)),
        text(event.rule.as_deref()),
        text(event.reason.as_deref()),
        text(derived.detail.as_deref()),
        event
            .process
            .as_ref()
            .map_or(ValueRef::Null, |p| ValueRef::Integer(i64::from(p.pid))),
        text(
            event
                .process
                .as_ref()
                .map(|p| cut_chars(&p.exe, MAX_EXE_CHARS)),
        ),
        text(derived.cmdline.as_deref()),
    ]
}

/// The command line as stored: the bounds of [`ProcessInfo::bounded`] applied.
fn bounded_cmdline(p: &ProcessInfo) -> Vec<String> {
    ProcessInfo {
        pid: p.pid,
        exe: String::new(),
        cmdline: p.cmdline.clone(),
    }
    .bounded()
    .cmdline
}

/// The hash of record `id` whose stored fields are `fields` and whose predecessor's hash is
/// `prev_hash` (the stored text, normally 64 hex characters).
pub(crate) fn record_hash(prev_hash: &[u8], fields: &[ValueRef<'_>], id: i64) -> String {
    record_hash_with(&mut Vec::with_capacity(512), prev_hash, fields, id)
}

/// [`record_hash`] with a caller's scratch buffer, so a batch hashes without allocating it
/// for every record.
pub(crate) fn record_hash_with(
    buf: &mut Vec<u8>,
    prev_hash: &[u8],
    fields: &[ValueRef<'_>],
    id: i64,
) -> String {
    buf.clear();
    buf.extend_from_slice(DOMAIN);
    buf.extend_from_slice(prev_hash);
    let (base, attribution) = fields.split_at(fields.len().min(BASE_COLUMNS));
    canonical_into(buf, base);
    if attribution.iter().any(|f| *f != ValueRef::Null) {
        canonical_into(buf, attribution);
    }
    buf.extend_from_slice(&id.to_be_bytes());
    hex(&Sha256::digest(&buf[..]))
}

fn canonical_into(buf: &mut Vec<u8>, fields: &[ValueRef<'_>]) {
    fn len_prefixed(buf: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
        buf.push(tag);
        // usize always fits in u64 on the platforms we build for.
        buf.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        buf.extend_from_slice(bytes);
    }
    for field in fields {
        match *field {
            ValueRef::Null => buf.push(0x00),
            ValueRef::Integer(n) => {
                buf.push(0x01);
                buf.extend_from_slice(&n.to_be_bytes());
            }
            ValueRef::Text(t) => len_prefixed(buf, 0x02, t),
            ValueRef::Real(r) => {
                buf.push(0x03);
                buf.extend_from_slice(&r.to_bits().to_be_bytes());
            }
            ValueRef::Blob(b) => len_prefixed(buf, 0x04, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::types::Value;

    fn refs(values: &[Value]) -> Vec<ValueRef<'_>> {
        values.iter().map(ValueRef::from).collect()
    }

    #[test]
    fn stored_fields_apply_the_same_cuts_as_bounded() {
        let mut e = Event::new(crate::EventKind::HttpRequest, "s", "u", "c");
        e.host = Some("h".repeat(400));
        e.method = Some("M".repeat(400));
        e.path = Some("€".repeat(400));
        let bounded = e.clone().bounded();
        let (d1, d2) = (DerivedText::of(&e), DerivedText::of(&bounded));
        assert_eq!(event_fields(&e, &d1, 1), event_fields(&bounded, &d2, 1));
        assert_ne!(e, bounded);
    }

    #[test]
    fn ip_text_is_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:1.2.3.4",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn the_hash_depends_on_every_input() {
        let fields = [Value::Text("a".into()), Value::Integer(1), Value::Null];
        let base = record_hash(GENESIS_HASH.as_bytes(), &refs(&fields), 1);
        assert_eq!(base.len(), 64);
        assert_ne!(base, record_hash(b"1", &refs(&fields), 1));
        assert_ne!(
            base,
            record_hash(GENESIS_HASH.as_bytes(), &refs(&fields), 2)
        );
        let edited = [Value::Text("b".into()), Value::Integer(1), Value::Null];
        assert_ne!(
            base,
            record_hash(GENESIS_HASH.as_bytes(), &refs(&edited), 1)
        );
        // Same value, different SQLite type.
        let retyped = [
            Value::Text("a".into()),
            Value::Text("1".into()),
            Value::Null,
        ];
        assert_ne!(
            base,
            record_hash(GENESIS_HASH.as_bytes(), &refs(&retyped), 1)
        );
        let nulled = [
            Value::Text("a".into()),
            Value::Integer(1),
            Value::Text(String::new()),
        ];
        assert_ne!(
            base,
            record_hash(GENESIS_HASH.as_bytes(), &refs(&nulled), 1)
        );
    }

    #[test]
    fn moving_bytes_between_adjacent_text_fields_changes_the_hash() {
        let a = [Value::Text("ab".into()), Value::Text("c".into())];
        let b = [Value::Text("a".into()), Value::Text("bc".into())];
        assert_ne!(
            record_hash(GENESIS_HASH.as_bytes(), &refs(&a), 1),
            record_hash(GENESIS_HASH.as_bytes(), &refs(&b), 1)
        );
    }

    #[test]
    fn null_attribution_columns_hash_as_a_schema_1_record_and_any_value_changes_it() {
        let mut base: Vec<Value> = (0..BASE_COLUMNS as i64).map(Value::Integer).collect();
        let old = record_hash(GENESIS_HASH.as_bytes(), &refs(&base), 1);
        base.extend([Value::Null, Value::Null, Value::Null]);
        assert_eq!(record_hash(GENESIS_HASH.as_bytes(), &refs(&base), 1), old);
        for i in 0..3 {
            let mut with = base.clone();
            with[BASE_COLUMNS + i] = Value::Integer(0);
            assert_ne!(record_hash(GENESIS_HASH.as_bytes(), &refs(&with), 1), old);
        }
        // Attribution values cannot be moved into the detail column unnoticed.
        let mut a = base.clone();
        a[BASE_COLUMNS - 1] = Value::Text("x".into());
        let mut b = base.clone();
        b[BASE_COLUMNS + 1] = Value::Text("x".into());
        assert_ne!(
            record_hash(GENESIS_HASH.as_bytes(), &refs(&a), 1),
            record_hash(GENESIS_HASH.as_bytes(), &refs(&b), 1)
        );
    }

    #[test]
    fn stored_attribution_applies_the_process_bounds() {
        let mut e = Event::new(crate::EventKind::Connection, "s", "u", "c");
        e.process = Some(ProcessInfo {
            pid: 4,
            exe: "e".repeat(5000),
            cmdline: vec!["a".repeat(5000)],
        });
        let bounded = e.clone().bounded();
        let (d1, d2) = (DerivedText::of(&e), DerivedText::of(&bounded));
        assert_eq!(event_fields(&e, &d1, 1), event_fields(&bounded, &d2, 1));
    }

    #[test]
    fn the_hash_is_pinned_so_the_format_cannot_drift_silently() {
        let fields = [Value::Text("s".into()), Value::Integer(1)];
        let mut input = Vec::new();
        input.extend_from_slice(DOMAIN);
        input.extend_from_slice(GENESIS_HASH.as_bytes());
        input.extend_from_slice(&[0x02, 0, 0, 0, 0, 0, 0, 0, 1, b's']);
        input.extend_from_slice(&[0x01, 0, 0, 0, 0, 0, 0, 0, 1]);
        input.extend_from_slice(&7i64.to_be_bytes());
        assert_eq!(
            record_hash(GENESIS_HASH.as_bytes(), &refs(&fields), 7),
            hex(&Sha256::digest(&input))
        );
    }
}
