//! The hash chain: how a record's hash is computed.
//!
//! Guarantees:
//! - One chain per store, across all sessions and all writer processes. Every record `id` (the
//!   global sequence, 1, 2, 3, …) links to record `id - 1` (or to [`GENESIS_HASH`] for record 1,
//!   or to the newest anchor's hash after a prune) and hashes its own fields, so editing,
//!   deleting, inserting or reordering a record without rewriting every later hash is detected.
//! - Records are hashed in one of two formats, told apart by how the hash is stored:
//!   - **v2** (written since schema 3; `hash` and `prev_hash` are 32-byte BLOBs):
//!     `hash = SHA-256("cordon-audit-chain-v2\n" || prev || canonical(fields) || id)` where `prev`
//!     is the previous record's hash as 32 bytes and `fields` are the 21 values of
//!     [`V2_COLUMNS`] as the record reads back: the session id, user id and code hash are the
//!     session's (from `sessions`, see [`crate::schema`]) unless the record stores its own.
//!     So the chain covers the attribution a record shows even though it is stored once per
//!     session: editing it in `sessions` changes the hash of every record that uses it.
//!   - **v1** (written by schemas 1 and 2; `hash` and `prev_hash` are 64 lower-case hex
//!     characters of TEXT): `hash = SHA-256("cordon-audit-chain-v1\n" || prev_hash ||
//!     canonical(fields) || id)` over the stored columns of [`HASHED_COLUMNS`], `prev_hash` as its
//!     64 hex characters. The process columns ([`ATTRIBUTION_COLUMNS`]) are appended only when
//!     one of them is not NULL, so schema 1 records keep their hashes. Old records are never
//!     re-hashed: a migrated store verifies record for record as it did.
//!
//!   In both, `id` is 8 bytes, big-endian, two's complement, and a record links to its
//!   predecessor whatever format either is in (hashes compare as 32-byte values).
//! - `canonical(fields)` is computed from the values exactly as SQLite stores them, in the fixed
//!   column order, each as a type tag and a length-prefixed body: `0x00` NULL; `0x01` + 8-byte
//!   big-endian integer; `0x02` + 8-byte big-endian length + UTF-8 text; `0x03` + 8-byte
//!   big-endian IEEE-754 bits (real); `0x04` + 8-byte length + blob. The encoding is injective,
//!   so no two different rows hash the same input, and verification never re-serialises
//!   anything (the `detail` JSON is hashed as the stored text).
//! - A v2 record does not hash the RFC 3339 text of its time: the store no longer keeps it, and
//!   reads derive it from `ts_ms` (a pure function, [`crate::Timestamp::to_rfc3339`]).
//! - Changing any hashed value, its type, the id, or the link to the previous record changes the
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

const DOMAIN_V1: &[u8] = b"cordon-audit-chain-v1\n";
const DOMAIN_V2: &[u8] = b"cordon-audit-chain-v2\n";

/// How many of [`HASHED_COLUMNS`] are always encoded (the schema 1 columns).
pub const BASE_COLUMNS: usize = 19;

/// The attribution columns at the end of [`HASHED_COLUMNS`], encoded only when one is not NULL.
pub const ATTRIBUTION_COLUMNS: [&str; 3] = ["pid", "exe", "cmdline"];

/// The columns a v1 record hashes, in hashing order (the stored values).
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

/// The values a v2 record hashes, in hashing order (the values as the record reads back).
pub const V2_COLUMNS: [&str; 21] = [
    "session_id",
    "session_seq",
    "kind",
    "user_id",
    "code_sha256",
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

/// A 32-byte SHA-256 value.
pub(crate) type Hash = [u8; 32];

/// The text forms of an event's fields that are not stored verbatim; [`event_fields`] borrows
/// from them.
pub(crate) struct DerivedText {
    ip: Option<String>,
    detail: Option<String>,
    cmdline: Option<String>,
}

impl DerivedText {
    pub(crate) fn of(event: &Event) -> DerivedText {
        DerivedText {
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
/// [`V2_COLUMNS`] order, with the length cuts of [`Event::bounded`] applied. Borrows instead of
/// copying: this is the writer's hot path.
pub(crate) fn event_fields<'a>(
    event: &'a Event,
    derived: &'a DerivedText,
    session_seq: i64,
) -> [ValueRef<'a>; 21] {
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

/// The v1 hash of record `id` whose stored columns ([`HASHED_COLUMNS`]) are `fields` and whose
/// stored `prev_hash` text is `prev_hash`, as 64 lower-case hex characters.
pub(crate) fn record_hash_v1(prev_hash: &[u8], fields: &[ValueRef<'_>], id: i64) -> String {
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(DOMAIN_V1);
    buf.extend_from_slice(prev_hash);
    let (base, attribution) = fields.split_at(fields.len().min(BASE_COLUMNS));
    canonical_into(&mut buf, base);
    if attribution.iter().any(|f| *f != ValueRef::Null) {
        canonical_into(&mut buf, attribution);
    }
    buf.extend_from_slice(&id.to_be_bytes());
    hex(&Sha256::digest(&buf[..]))
}

/// The v2 hash of record `id` whose values ([`V2_COLUMNS`]) are `fields` and whose predecessor's
/// hash is `prev`. `buf` is a caller's scratch buffer, so a batch hashes without allocating.
pub(crate) fn record_hash_v2(
    buf: &mut Vec<u8>,
    prev: &Hash,
    fields: &[ValueRef<'_>],
    id: i64,
) -> Hash {
    buf.clear();
    buf.extend_from_slice(DOMAIN_V2);
    buf.extend_from_slice(prev);
    canonical_into(buf, fields);
    buf.extend_from_slice(&id.to_be_bytes());
    Sha256::digest(&buf[..]).into()
}

/// A stored hash (either format) as its 32 bytes: a 32-byte BLOB as is, 64 lower-case hex
/// characters decoded. `None` for anything else (an edited or damaged value).
pub(crate) fn hash_value(v: ValueRef<'_>) -> Option<Hash> {
    match v {
        ValueRef::Blob(b) => b.try_into().ok(),
        ValueRef::Text(t) => unhex(t),
        _ => None,
    }
}

/// A stored hash as the 64 lower-case hex characters that `EventRecord` and the export show.
pub(crate) fn hash_text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Blob(b) => hex(b),
        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
        _ => String::new(),
    }
}

/// 64 lower-case hex characters as 32 bytes.
pub(crate) fn unhex(text: &[u8]) -> Option<Hash> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
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

    fn v1(prev: &[u8], values: &[Value], id: i64) -> String {
        record_hash_v1(prev, &refs(values), id)
    }

    fn v2(prev: &Hash, values: &[Value], id: i64) -> Hash {
        record_hash_v2(&mut Vec::new(), prev, &refs(values), id)
    }

    const ZERO: Hash = [0; 32];

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
    fn the_hash_depends_on_every_input_in_both_formats() {
        let fields = [Value::Text("a".into()), Value::Integer(1), Value::Null];
        let edited = [Value::Text("b".into()), Value::Integer(1), Value::Null];
        // Same value, different SQLite type.
        let retyped = [
            Value::Text("a".into()),
            Value::Text("1".into()),
            Value::Null,
        ];
        let nulled = [
            Value::Text("a".into()),
            Value::Integer(1),
            Value::Text(String::new()),
        ];
        let base = v1(GENESIS_HASH.as_bytes(), &fields, 1);
        assert_eq!(base.len(), 64);
        assert_ne!(base, v1(b"1", &fields, 1));
        assert_ne!(base, v1(GENESIS_HASH.as_bytes(), &fields, 2));
        for other in [&edited, &retyped, &nulled] {
            assert_ne!(base, v1(GENESIS_HASH.as_bytes(), other, 1));
        }
        let base = v2(&ZERO, &fields, 1);
        assert_ne!(base, v2(&[1; 32], &fields, 1));
        assert_ne!(base, v2(&ZERO, &fields, 2));
        for other in [&edited, &retyped, &nulled] {
            assert_ne!(base, v2(&ZERO, other, 1));
        }
    }

    #[test]
    fn the_two_formats_never_give_the_same_hash_for_the_same_values() {
        let fields = [Value::Text("a".into()), Value::Integer(1)];
        assert_ne!(
            unhex(v1(GENESIS_HASH.as_bytes(), &fields, 1).as_bytes()),
            Some(v2(&ZERO, &fields, 1))
        );
    }

    #[test]
    fn moving_bytes_between_adjacent_text_fields_changes_the_hash() {
        let a = [Value::Text("ab".into()), Value::Text("c".into())];
        let b = [Value::Text("a".into()), Value::Text("bc".into())];
        assert_ne!(
            v1(GENESIS_HASH.as_bytes(), &a, 1),
            v1(GENESIS_HASH.as_bytes(), &b, 1)
        );
        assert_ne!(v2(&ZERO, &a, 1), v2(&ZERO, &b, 1));
    }

    #[test]
    fn null_attribution_columns_hash_as_a_schema_1_record_and_any_value_changes_it() {
        let mut base: Vec<Value> = (0..BASE_COLUMNS as i64).map(Value::Integer).collect();
        let old = v1(GENESIS_HASH.as_bytes(), &base, 1);
        base.extend([Value::Null, Value::Null, Value::Null]);
        assert_eq!(v1(GENESIS_HASH.as_bytes(), &base, 1), old);
        for i in 0..3 {
            let mut with = base.clone();
            with[BASE_COLUMNS + i] = Value::Integer(0);
            assert_ne!(v1(GENESIS_HASH.as_bytes(), &with, 1), old);
        }
        // Attribution values cannot be moved into the detail column unnoticed.
        let mut a = base.clone();
        a[BASE_COLUMNS - 1] = Value::Text("x".into());
        let mut b = base.clone();
        b[BASE_COLUMNS + 1] = Value::Text("x".into());
        assert_ne!(
            v1(GENESIS_HASH.as_bytes(), &a, 1),
            v1(GENESIS_HASH.as_bytes(), &b, 1)
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
    fn stored_hashes_read_back_as_32_bytes_and_as_hex_in_either_form() {
        let h = v2(&ZERO, &[Value::Integer(7)], 3);
        let text = hex(&h);
        assert_eq!(hash_value(ValueRef::Blob(&h)), Some(h));
        assert_eq!(hash_value(ValueRef::Text(text.as_bytes())), Some(h));
        assert_eq!(hash_text(ValueRef::Blob(&h)), text);
        assert_eq!(hash_text(ValueRef::Text(text.as_bytes())), text);
        assert_eq!(unhex(GENESIS_HASH.as_bytes()), Some(ZERO));
        // Anything but exactly 32 bytes or 64 lower-case hex digits is not a hash.
        assert_eq!(hash_value(ValueRef::Blob(&h[..31])), None);
        assert_eq!(
            hash_value(ValueRef::Text(text.to_uppercase().as_bytes())),
            None
        );
        assert_eq!(hash_value(ValueRef::Text(&text.as_bytes()[1..])), None);
        assert_eq!(hash_value(ValueRef::Integer(1)), None);
        assert_eq!(hash_value(ValueRef::Null), None);
    }

    #[test]
    fn the_hashes_are_pinned_so_the_formats_cannot_drift_silently() {
        let fields = [Value::Text("s".into()), Value::Integer(1)];
        let body = |input: &mut Vec<u8>| {
            input.extend_from_slice(&[0x02, 0, 0, 0, 0, 0, 0, 0, 1, b's']);
            input.extend_from_slice(&[0x01, 0, 0, 0, 0, 0, 0, 0, 1]);
            input.extend_from_slice(&7i64.to_be_bytes());
        };
        let mut input = Vec::new();
        input.extend_from_slice(b"cordon-audit-chain-v1\n");
        input.extend_from_slice(GENESIS_HASH.as_bytes());
        body(&mut input);
        assert_eq!(
            v1(GENESIS_HASH.as_bytes(), &fields, 7),
            hex(&Sha256::digest(&input))
        );
        let mut input = Vec::new();
        input.extend_from_slice(b"cordon-audit-chain-v2\n");
        input.extend_from_slice(&[9; 32]);
        body(&mut input);
        let expected: Hash = Sha256::digest(&input).into();
        assert_eq!(v2(&[9; 32], &fields, 7), expected);
    }
}
