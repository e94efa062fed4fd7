//! TLS ClientHello inspection: finds the server name (SNI) a client is about to ask for, without
//! terminating TLS.
//!
//! Guarantees:
//! - The parser never panics and never reads past the bytes it was given (fuzzed by proptest).
//! - It answers [`Peek::NotTls`] only when the first bytes cannot start a TLS handshake record, so
//!   a client cannot hide a ClientHello from the SNI check by making it look "not TLS".
//! - Anything that starts like a TLS handshake but is not a well-formed ClientHello is an error,
//!   and callers block on errors (fail closed): duplicate extensions, two host names, a name with
//!   bytes outside printable ASCII, lengths that disagree.
//! - A ClientHello split over several TLS records is reassembled (up to [`MAX_HANDSHAKE_LEN`]).
//! - A ClientHello must end where its last record ends: handshake bytes after it in the same
//!   record (a second ClientHello a server would read after a HelloRetryRequest) are refused, so
//!   [`client_hello_len`] always splits a stream between whole records.

use thiserror::Error;

/// Largest ClientHello handshake message we reassemble. Real ones are under 2 KiB (post-quantum
/// key shares included); anything bigger is refused rather than buffered.
pub const MAX_HANDSHAKE_LEN: usize = 64 * 1024;

pub(crate) const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0x0000;
const NAME_TYPE_HOST: u8 = 0x00;
/// TLSPlaintext.length may not exceed 2^14 (RFC 8446 §5.1).
pub(crate) const MAX_RECORD_LEN: usize = 1 << 14;

/// What the first bytes of a stream say about TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The bytes so far are a valid prefix of a ClientHello; read more.
    NeedMore,
    /// The stream does not start with a TLS handshake record.
    NotTls,
    /// A complete ClientHello; `sni` is the `host_name` it carries, if any (as sent, not yet
    /// normalised).
    ClientHello { sni: Option<String> },
}

/// Why bytes that start like TLS are not an acceptable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SniError {
    #[error("TLS record of type {0:#04x} where a handshake record was expected")]
    UnexpectedRecord(u8),
    #[error("TLS record length {0} exceeds 2^14")]
    RecordTooLong(usize),
    #[error("empty TLS record")]
    EmptyRecord,
    #[error("first handshake message is type {0:#04x}, not ClientHello")]
    NotClientHello(u8),
    #[error("ClientHello of {0} bytes exceeds the {MAX_HANDSHAKE_LEN}-byte limit")]
    TooLarge(usize),
    #[error("ClientHello is truncated or its lengths disagree ({0})")]
    Malformed(&'static str),
    #[error("ClientHello carries extension {0:#06x} twice")]
    DuplicateExtension(u16),
    #[error("ClientHello names more than one host")]
    MultipleHostNames,
    #[error("ClientHello server name is not printable ASCII")]
    BadHostName,
}

/// Looks at the first bytes of a client stream.
///
/// Returns `NeedMore` while `buf` is a valid but incomplete prefix; callers must cap how much they
/// read (they never need more than `MAX_HANDSHAKE_LEN` plus record headers).
pub fn peek_client_hello(buf: &[u8]) -> Result<Peek, SniError> {
    parse(buf).map(|(peek, _)| peek)
}

/// How many bytes of `buf` the records carrying its first complete ClientHello take (whatever
/// follows is the client's next record), or `None` if `buf` does not start with a complete,
/// well-formed ClientHello.
pub fn client_hello_len(buf: &[u8]) -> Option<usize> {
    match parse(buf) {
        Ok((Peek::ClientHello { .. }, len)) => Some(len),
        _ => None,
    }
}

/// [`peek_client_hello`], with how many bytes of `buf` a complete ClientHello's records take.
fn parse(buf: &[u8]) -> Result<(Peek, usize), SniError> {
    match buf {
        [] => return Ok((Peek::NeedMore, 0)),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Ok((Peek::NotTls, 0)),
        [_] => return Ok((Peek::NeedMore, 0)),
        // Record layer versions are 3.x (SSL 3.0 to TLS 1.3 all say 3.x on the wire).
        [_, major, ..] if *major != 0x03 => return Ok((Peek::NotTls, 0)),
        _ => {}
    }

    // Reassemble the handshake stream from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Ok((Peek::NeedMore, 0));
        }
        if rest[0] != CONTENT_HANDSHAKE {
            return Err(SniError::UnexpectedRecord(rest[0]));
        }
        if rest[1] != 0x03 {
            return Err(SniError::Malformed("record version"));
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len > MAX_RECORD_LEN {
            return Err(SniError::RecordTooLong(len));
        }
        if len == 0 {
            return Err(SniError::EmptyRecord);
        }
        if rest.len() < 5 + len {
            // Parse the part we have, so a bad prefix is refused early instead of waiting for
            // bytes that may never come.
            handshake.extend_from_slice(&rest[5..]);
            return check_partial(&handshake).map(|p| (p, 0));
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];

        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::NotClientHello(handshake[0]));
            }
            let body_len = u24(&handshake[1..4]);
            if body_len > MAX_HANDSHAKE_LEN {
                return Err(SniError::TooLarge(body_len));
            }
            if handshake.len() >= 4 + body_len {
                if handshake.len() > 4 + body_len {
                    // Coalesced with the next handshake message: after a HelloRetryRequest a
                    // server would read a second ClientHello from these bytes.
                    return Err(SniError::Malformed("handshake bytes after the ClientHello"));
                }
                let sni = parse_client_hello_body(&handshake[4..4 + body_len])?;
                return Ok((Peek::ClientHello { sni }, buf.len() - rest.len()));
            }
        }
    }
}

fn check_partial(handshake: &[u8]) -> Result<Peek, SniError> {
    if let Some(&kind) = handshake.first() {
        if kind != HANDSHAKE_CLIENT_HELLO {
            return Err(SniError::NotClientHello(kind));
        }
    }
    if handshake.len() >= 4 {
        let body_len = u24(&handshake[1..4]);
        if body_len > MAX_HANDSHAKE_LEN {
            return Err(SniError::TooLarge(body_len));
        }
    }
    Ok(Peek::NeedMore)
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.buf.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn parse_client_hello_body(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader { buf: body };
    let _legacy_version = r.take(2, "client version")?;
    let _random = r.take(32, "random")?;
    let session_id = r.vec_u8("session id")?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32"));
    }
    let suites = r.vec_u16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    let compression = r.vec_u8("compression methods")?;
    if compression.is_empty() {
        return Err(SniError::Malformed("compression methods"));
    }
    if r.is_empty() {
        // A ClientHello without extensions (pre-TLS 1.2 style) carries no name.
        return Ok(None);
    }
    let mut exts = Reader {
        buf: r.vec_u16("extensions")?,
    };
    if !r.is_empty() {
        return Err(SniError::Malformed("bytes after extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    let mut sni = None;
    while !exts.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec_u16("extension data")?;
        if seen.contains(&kind) {
            return Err(SniError::DuplicateExtension(kind));
        }
        seen.push(kind);
        if kind == EXT_SERVER_NAME {
            sni = parse_server_name(data)?;
        }
    }
    Ok(sni)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut outer = Reader { buf: data };
    let mut list = Reader {
        buf: outer.vec_u16("server name list")?,
    };
    if !outer.is_empty() {
        return Err(SniError::Malformed("bytes after server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type")?;
        let name = list.vec_u16("server name")?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(SniError::MultipleHostNames);
        }
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(SniError::BadHostName);
        }
        // All bytes are ASCII, so this conversion cannot fail; map the impossible error anyway.
        host = Some(
            std::str::from_utf8(name)
                .map_err(|_| SniError::BadHostName)?
                .to_owned(),
        );
    }
    Ok(host)
}

/// Builders for ClientHello bytes, shared by unit tests, proptests and integration tests.
#[doc(hidden)]
pub mod testing {
    /// A minimal but well-formed TLS 1.2/1.3-style ClientHello carrying `sni` (if any), split into
    /// records of at most `record_len` handshake bytes.
    pub fn client_hello(sni: Option<&str>, record_len: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let name = name.as_bytes();
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name);
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
            exts.extend_from_slice(&list);
        }
        // supported_versions: TLS 1.3
        exts.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x01];
        let len = body.len() as u32;
        hs.extend_from_slice(&len.to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in hs.chunks(record_len.max(1)) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::client_hello;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_client_hello_yields_its_server_name() {
        let hello = client_hello(Some("api.github.com"), 16384);
        assert_eq!(
            peek_client_hello(&hello),
            Ok(Peek::ClientHello {
                sni: Some("api.github.com".into())
            })
        );
    }

    #[test]
    fn a_client_hello_without_server_name_yields_none() {
        let hello = client_hello(None, 16384);
        assert_eq!(
            peek_client_hello(&hello),
            Ok(Peek::ClientHello { sni: None })
        );
    }

    #[test]
    fn a_client_hello_split_over_records_is_reassembled() {
        let hello = client_hello(Some("example.com"), 7);
        assert_eq!(
            peek_client_hello(&hello),
            Ok(Peek::ClientHello {
                sni: Some("example.com".into())
            })
        );
    }

    #[test]
    fn every_proper_prefix_of_a_client_hello_asks_for_more() {
        let hello = client_hello(Some("example.com"), 20);
        for n in 0..hello.len() {
            assert_eq!(peek_client_hello(&hello[..n]), Ok(Peek::NeedMore), "n={n}");
        }
    }

    #[test]
    fn http_and_other_protocols_are_not_tls() {
        assert_eq!(peek_client_hello(b"GET / HTTP/1.1\r\n"), Ok(Peek::NotTls));
        assert_eq!(peek_client_hello(b"SSH-2.0-x\r\n"), Ok(Peek::NotTls));
        assert_eq!(peek_client_hello(&[0x16, 0x02, 0, 0, 1]), Ok(Peek::NotTls));
    }

    #[test]
    fn a_non_client_hello_handshake_is_refused() {
        let mut hello = client_hello(Some("example.com"), 16384);
        hello[5] = 0x02; // ServerHello
        assert_eq!(
            peek_client_hello(&hello),
            Err(SniError::NotClientHello(0x02))
        );
    }

    #[test]
    fn two_server_name_extensions_are_refused() {
        // Build a hello by hand with two SNI extensions.
        let sni_ext = |name: &str| {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            let mut ext = vec![0, 0];
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
            ext
        };
        let mut exts = sni_ext("a.com");
        exts.extend(sni_ext("b.com"));
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[1u8; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        assert_eq!(
            peek_client_hello(&rec),
            Err(SniError::DuplicateExtension(0))
        );
    }

    #[test]
    fn a_server_name_with_control_bytes_is_refused() {
        let hello = client_hello(Some("evil\0.com"), 16384);
        assert_eq!(peek_client_hello(&hello), Err(SniError::BadHostName));
    }

    #[test]
    fn an_oversized_record_is_refused() {
        assert_eq!(
            peek_client_hello(&[0x16, 3, 1, 0x40, 0x01]),
            Err(SniError::RecordTooLong(0x4001))
        );
    }

    #[test]
    fn an_alert_between_handshake_records_is_refused() {
        let mut hello = client_hello(Some("example.com"), 10);
        // Turn the second record into an alert record.
        let second = 5 + 10;
        hello[second] = 0x15;
        assert_eq!(
            peek_client_hello(&hello),
            Err(SniError::UnexpectedRecord(0x15))
        );
    }

    proptest! {
        #[test]
        fn the_parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = peek_client_hello(&bytes);
        }

        #[test]
        fn the_parser_never_panics_on_mutated_client_hellos(
            name in "[a-z0-9.-]{1,60}",
            record_len in 1usize..300,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut hello = client_hello(Some(&name), record_len);
            for (i, b) in flips {
                let at = i.index(hello.len());
                hello[at] = b;
            }
            let end = cut.index(hello.len() + 1);
            let _ = peek_client_hello(&hello[..end]);
        }

        #[test]
        fn any_printable_server_name_round_trips(name in "[!-~]{1,200}", record_len in 1usize..400) {
            let hello = client_hello(Some(&name), record_len);
            prop_assert_eq!(peek_client_hello(&hello), Ok(Peek::ClientHello { sni: Some(name) }));
        }
    }
}
