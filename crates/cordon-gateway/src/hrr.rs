//! TLS 1.3 HelloRetryRequest detection for tunnels that do not terminate TLS.
//!
//! A server that answers a ClientHello with a HelloRetryRequest (RFC 8446 §4.1.4) makes the
//! client send a second, plaintext ClientHello, which may name another host than the first. A
//! tunnel therefore reads the server's first handshake message with [`ServerHelloScan`] and, on
//! a HelloRetryRequest, checks the client's next handshake message with [`retried_hello`].
//!
//! Guarantees:
//! - Neither parser panics or reads past the bytes it was given (proptest).
//! - [`ServerHelloScan`] keeps at most a record header and the first [`HELLO_PREFIX`] handshake
//!   bytes, however the server's bytes are split across records and reads: a HelloRetryRequest
//!   is told from a ServerHello by its fixed `random` (RFC 8446 §4.1.3), which sits at a fixed
//!   offset, so the rest of the message is never needed. Anything that is not a handshake
//!   record starting a ServerHello (an alert, another protocol, a malformed record) is
//!   [`ServerFirst::NotRetry`]: a server that did not send a HelloRetryRequest does not read a
//!   second plaintext ClientHello (after a TLS 1.3 ServerHello it expects encrypted records;
//!   TLS 1.2 renegotiation happens inside the encrypted connection).
//! - [`retried_hello`] skips `change_cipher_spec` records (TLS 1.3 middlebox compatibility,
//!   sent before the second ClientHello) and `application_data` records (0-RTT early data sent
//!   with the first ClientHello, which a server that asked for a retry discards unread, RFC 8446
//!   §4.2.10); the first handshake record must then start a well-formed ClientHello that ends on
//!   a record boundary (the `sni` parser's rules). Any other record type is refused.

use crate::sni::{
    client_hello_len, peek_client_hello, Peek, SniError, CONTENT_HANDSHAKE, MAX_RECORD_LEN,
};

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

/// `ServerHello.random` of a HelloRetryRequest: SHA-256("HelloRetryRequest").
pub const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
    0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];

/// Handshake bytes needed to decide: type (1), length (3), legacy_version (2), random (32).
pub const HELLO_PREFIX: usize = 4 + 2 + 32;

/// What the server's first handshake message is, as far as seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFirst {
    /// Not decided yet: feed more bytes.
    Pending,
    /// A HelloRetryRequest: the client's next ClientHello must be checked.
    HelloRetry,
    /// Anything else (why, for logs): the server will not read a second plaintext ClientHello.
    NotRetry(&'static str),
}

/// Streams the server's bytes until its first handshake message is known to be a
/// HelloRetryRequest or not. Memory is fixed; any split of the input gives the same answer.
#[derive(Debug, Clone)]
pub struct ServerHelloScan {
    header: [u8; 5],
    header_len: usize,
    /// Payload bytes of the current record not yet seen.
    record_left: usize,
    prefix: [u8; HELLO_PREFIX],
    prefix_len: usize,
    state: ServerFirst,
}

impl Default for ServerHelloScan {
    fn default() -> Self {
        ServerHelloScan {
            header: [0; 5],
            header_len: 0,
            record_left: 0,
            prefix: [0; HELLO_PREFIX],
            prefix_len: 0,
            state: ServerFirst::Pending,
        }
    }
}

impl ServerHelloScan {
    /// Feeds the next bytes the server sent; returns the state after them (once decided, the
    /// answer never changes and further bytes are ignored).
    pub fn feed(&mut self, mut data: &[u8]) -> ServerFirst {
        while self.state == ServerFirst::Pending && !data.is_empty() {
            if self.record_left == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len == 5 {
                    self.header_len = 0;
                    self.state = self.start_record();
                }
            } else {
                let take = self
                    .record_left
                    .min(data.len())
                    .min(HELLO_PREFIX - self.prefix_len);
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
                self.prefix_len += take;
                self.record_left -= take;
                data = &data[take..];
                self.state = self.judge_prefix();
            }
        }
        self.state
    }

    /// The answer so far.
    pub fn state(&self) -> ServerFirst {
        self.state
    }

    fn start_record(&mut self) -> ServerFirst {
        let [kind, major, _, hi, lo] = self.header;
        if kind != CONTENT_HANDSHAKE {
            return ServerFirst::NotRetry("the server's first record is not a handshake record");
        }
        if major != 0x03 {
            return ServerFirst::NotRetry("the server's first record is not TLS");
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 || len > MAX_RECORD_LEN {
            return ServerFirst::NotRetry("the server's handshake record has a bad length");
        }
        self.record_left = len;
        ServerFirst::Pending
    }

    fn judge_prefix(&self) -> ServerFirst {
        let p = &self.prefix[..self.prefix_len];
        if let Some(&kind) = p.first() {
            if kind != HANDSHAKE_SERVER_HELLO {
                return ServerFirst::NotRetry(
                    "the server's first handshake message is not a ServerHello",
                );
            }
        }
        if p.len() >= 4 {
            let body = (usize::from(p[1]) << 16) | (usize::from(p[2]) << 8) | usize::from(p[3]);
            if body < HELLO_PREFIX - 4 {
                return ServerFirst::NotRetry("the server's ServerHello is too short");
            }
        }
        if p.len() < HELLO_PREFIX {
            return ServerFirst::Pending;
        }
        if p[6..HELLO_PREFIX] == HELLO_RETRY_RANDOM {
            ServerFirst::HelloRetry
        } else {
            ServerFirst::NotRetry("ServerHello")
        }
    }
}

/// What the client sent after a HelloRetryRequest, as far as seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// A valid prefix: read more.
    NeedMore,
    /// A complete ClientHello carrying `sni` (if any), ending at byte `end` of the input.
    ClientHello { sni: Option<String>, end: usize },
}

/// Looks at what the client sent after a HelloRetryRequest: `change_cipher_spec` and
/// `application_data` records are skipped; the first handshake record must start a
/// ClientHello (see the module guarantees).
pub fn retried_hello(buf: &[u8]) -> Result<Retried, SniError> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(&kind) = rest.first() else {
            return Ok(Retried::NeedMore);
        };
        match kind {
            CONTENT_HANDSHAKE => break,
            CONTENT_CHANGE_CIPHER_SPEC | CONTENT_APPLICATION_DATA => {
                if rest.len() < 5 {
                    return Ok(Retried::NeedMore);
                }
                if rest[1] != 0x03 {
                    return Err(SniError::Malformed("record version"));
                }
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                // Early data is protected: its records may be 256 bytes over 2^14.
                if len > MAX_RECORD_LEN + 256 {
                    return Err(SniError::RecordTooLong(len));
                }
                if rest.len() < 5 + len {
                    return Ok(Retried::NeedMore);
                }
                at += 5 + len;
            }
            other => return Err(SniError::UnexpectedRecord(other)),
        }
    }
    let rest = &buf[at..];
    match peek_client_hello(rest)? {
        Peek::NeedMore => Ok(Retried::NeedMore),
        Peek::NotTls => Err(SniError::Malformed("record version")),
        Peek::ClientHello { sni } => {
            let len = client_hello_len(rest).ok_or(SniError::Malformed("ClientHello length"))?;
            Ok(Retried::ClientHello { sni, end: at + len })
        }
    }
}

/// Builders for server handshake bytes, shared by unit and integration tests.
#[doc(hidden)]
pub mod testing {
    use super::HELLO_RETRY_RANDOM;

    /// A TLS 1.3-style ServerHello (a HelloRetryRequest if `retry`), split into records of at
    /// most `record_len` handshake bytes.
    pub fn server_hello(retry: bool, record_len: usize) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        if retry {
            body.extend_from_slice(&HELLO_RETRY_RANDOM);
        } else {
            body.extend_from_slice(&[0x42; 32]);
        }
        body.push(0); // legacy_session_id_echo
        body.extend_from_slice(&[0x13, 0x01]); // TLS_AES_128_GCM_SHA256
        body.push(0); // compression
                      // supported_versions: TLS 1.3; key_share (HRR form): secp256r1.
        let mut exts = vec![0x00, 0x2b, 0x00, 0x02, 0x03, 0x04];
        exts.extend_from_slice(&[0x00, 0x33, 0x00, 0x02, 0x00, 0x17]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x02];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in hs.chunks(record_len.max(1)) {
            out.extend_from_slice(&[0x16, 0x03, 0x03]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A `change_cipher_spec` record.
    pub const CHANGE_CIPHER_SPEC: [u8; 6] = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
}

#[cfg(test)]
mod tests {
    use super::testing::{server_hello, CHANGE_CIPHER_SPEC};
    use super::*;
    use crate::sni::testing::client_hello;
    use proptest::prelude::*;

    fn scan_in_pieces(bytes: &[u8], piece: usize) -> ServerFirst {
        let mut s = ServerHelloScan::default();
        for chunk in bytes.chunks(piece.max(1)) {
            s.feed(chunk);
        }
        s.state()
    }

    #[test]
    fn a_hello_retry_request_is_recognised_however_it_is_split() {
        for record_len in [1, 5, 37, 38, 16384] {
            let hrr = server_hello(true, record_len);
            for piece in [1, 2, 5, 6, 7, 100, hrr.len()] {
                assert_eq!(
                    scan_in_pieces(&hrr, piece),
                    ServerFirst::HelloRetry,
                    "record_len={record_len} piece={piece}"
                );
            }
        }
    }

    #[test]
    fn a_server_hello_is_not_a_retry_however_it_is_split() {
        for record_len in [1, 7, 16384] {
            let sh = server_hello(false, record_len);
            for piece in [1, 3, sh.len()] {
                assert_eq!(
                    scan_in_pieces(&sh, piece),
                    ServerFirst::NotRetry("ServerHello")
                );
            }
        }
    }

    #[test]
    fn the_answer_waits_for_the_whole_random() {
        let hrr = server_hello(true, 16384);
        // Header (5) + type, length, version (6) + random (32): one byte short of deciding.
        let mut s = ServerHelloScan::default();
        assert_eq!(s.feed(&hrr[..5 + HELLO_PREFIX - 1]), ServerFirst::Pending);
        assert_eq!(
            s.feed(&hrr[5 + HELLO_PREFIX - 1..]),
            ServerFirst::HelloRetry
        );
        // Once decided, more bytes change nothing.
        assert_eq!(s.feed(&[0x15; 10]), ServerFirst::HelloRetry);
    }

    #[test]
    fn a_tls12_server_hello_is_not_a_retry() {
        // TLS 1.2: legacy version 3.3, a random of its own, no supported_versions.
        let mut sh = server_hello(false, 16384);
        sh[2] = 0x01;
        sh[11..43].copy_from_slice(&[0x5a; 32]);
        assert_eq!(scan_in_pieces(&sh, 4), ServerFirst::NotRetry("ServerHello"));
    }

    #[test]
    fn an_alert_or_another_protocol_first_is_not_a_retry() {
        // handshake_failure alert.
        let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
        assert!(matches!(
            scan_in_pieces(&alert, 1),
            ServerFirst::NotRetry(_)
        ));
        // A change_cipher_spec record is not a handshake record either.
        assert!(matches!(
            scan_in_pieces(&CHANGE_CIPHER_SPEC, 6),
            ServerFirst::NotRetry(_)
        ));
        assert!(matches!(
            scan_in_pieces(b"SSH-2.0-OpenSSH_9.2p1\r\n", 3),
            ServerFirst::NotRetry(_)
        ));
        assert!(matches!(
            scan_in_pieces(b"HTTP/1.1 400 Bad Request\r\n", 30),
            ServerFirst::NotRetry(_)
        ));
    }

    #[test]
    fn oversized_empty_or_foreign_handshake_records_are_not_a_retry() {
        assert!(matches!(
            scan_in_pieces(&[0x16, 0x03, 0x03, 0x40, 0x01, 0x02], 6),
            ServerFirst::NotRetry(_)
        ));
        assert!(matches!(
            scan_in_pieces(&[0x16, 0x03, 0x03, 0x00, 0x00], 6),
            ServerFirst::NotRetry(_)
        ));
        // A ClientHello echoed back is not a ServerHello.
        assert!(matches!(
            scan_in_pieces(&client_hello(Some("a.test"), 100), 9),
            ServerFirst::NotRetry(_)
        ));
        // A ServerHello too short to hold a random.
        assert!(matches!(
            scan_in_pieces(&[0x16, 0x03, 0x03, 0x00, 0x06, 0x02, 0, 0, 2, 3, 3], 11),
            ServerFirst::NotRetry(_)
        ));
    }

    #[test]
    fn a_partial_hello_retry_request_stays_pending() {
        let hrr = server_hello(true, 3);
        for n in 0..hrr.len() {
            let s = scan_in_pieces(&hrr[..n], 2);
            assert!(
                s == ServerFirst::Pending || s == ServerFirst::HelloRetry,
                "n={n}: {s:?}"
            );
        }
    }

    #[test]
    fn the_retried_client_hello_is_found_after_change_cipher_spec_and_early_data() {
        let ch = client_hello(Some("b.test"), 50);
        let early = [0x17, 0x03, 0x03, 0x00, 0x03, 1, 2, 3];
        let mut buf = CHANGE_CIPHER_SPEC.to_vec();
        buf.extend_from_slice(&early);
        buf.extend_from_slice(&ch);
        let end = buf.len();
        buf.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 9]);
        assert_eq!(
            retried_hello(&buf),
            Ok(Retried::ClientHello {
                sni: Some("b.test".into()),
                end
            })
        );
        for n in 0..end {
            assert_eq!(retried_hello(&buf[..n]), Ok(Retried::NeedMore), "n={n}");
        }
    }

    #[test]
    fn anything_but_a_client_hello_after_a_retry_is_refused() {
        // An alert.
        assert_eq!(
            retried_hello(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]),
            Err(SniError::UnexpectedRecord(0x15))
        );
        // Another handshake message.
        let mut ch = client_hello(Some("a.test"), 16384);
        ch[5] = 0x0b;
        assert_eq!(retried_hello(&ch), Err(SniError::NotClientHello(0x0b)));
        // Not TLS at all.
        assert!(retried_hello(b"GET / HTTP/1.1\r\n").is_err());
        assert!(retried_hello(&[0x16, 0x02, 0x00, 0x00, 0x01]).is_err());
        // A change_cipher_spec record claiming more than a record may hold.
        assert_eq!(
            retried_hello(&[0x14, 0x03, 0x03, 0x50, 0x00]),
            Err(SniError::RecordTooLong(0x5000))
        );
    }

    #[test]
    fn a_client_hello_sharing_its_record_with_more_handshake_bytes_is_refused() {
        // Two ClientHellos in one record: a server that asked for a retry would read the second.
        let one = client_hello(Some("a.test"), 16384);
        let two = client_hello(Some("evil.test"), 16384);
        let mut hs = one[5..].to_vec();
        hs.extend_from_slice(&two[5..]);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        assert!(peek_client_hello(&rec).is_err());
        assert!(retried_hello(&rec).is_err());
        assert_eq!(client_hello_len(&rec), None);
        // Two records, one hello each: the first ends where its record does.
        let mut both = one.clone();
        both.extend_from_slice(&two);
        assert_eq!(client_hello_len(&both), Some(one.len()));
    }

    proptest! {
        #[test]
        fn the_scanner_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            piece in 1usize..50,
        ) {
            let _ = scan_in_pieces(&bytes, piece);
            let _ = retried_hello(&bytes);
        }

        #[test]
        fn the_scanner_gives_one_answer_for_any_split(
            retry in any::<bool>(),
            record_len in 1usize..100,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            piece in 1usize..60,
        ) {
            let mut bytes = server_hello(retry, record_len);
            for (i, b) in flips {
                let at = i.index(bytes.len());
                bytes[at] = b;
            }
            prop_assert_eq!(scan_in_pieces(&bytes, piece), scan_in_pieces(&bytes, bytes.len()));
        }

        #[test]
        fn retried_hello_never_panics_on_mutated_input(
            name in "[a-z0-9.-]{1,40}",
            record_len in 1usize..200,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut buf = CHANGE_CIPHER_SPEC.to_vec();
            buf.extend_from_slice(&client_hello(Some(&name), record_len));
            for (i, b) in flips {
                let at = i.index(buf.len());
                buf[at] = b;
            }
            let end = cut.index(buf.len() + 1);
            if let Ok(Retried::ClientHello { end: e, .. }) = retried_hello(&buf[..end]) {
                prop_assert!(e <= end);
            }
        }
    }
}
