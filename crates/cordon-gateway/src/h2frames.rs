//! What the HTTP/2 layer says to the sandbox on its own: the frames the gateway's HTTP/2 server
//! writes, watched for stream resets and connection errors that no request handler saw.
//!
//! hyper's HTTP/2 server refuses some streams before they become requests — a connection-specific
//! header, a `:path` it cannot parse, a header block over the bound, streams over the concurrency
//! limit — by writing `RST_STREAM` (and whole connections by `GOAWAY`) without calling the
//! gateway. [`FrameWatch`] sits between hyper and the TLS stream and reads the frame headers of
//! what hyper writes (plaintext, before encryption), so those refusals can be recorded too.
//!
//! Guarantees:
//! - [`FrameScan::feed`] reads any split of the server's output and reports each `RST_STREAM`
//!   whose stream never had a `HEADERS` frame written (so no handler answered it) with a code
//!   other than `NO_ERROR` or `CANCEL`, and each `GOAWAY` with an error code, exactly once.
//! - It never panics and keeps bounded state: the streams answered so far are kept as a window
//!   below the highest answered stream id (a reset of a stream far below it is taken as answered).
//! - The watch adds no copy and no syscall: it reads the bytes hyper already wrote.

use std::collections::BTreeSet;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
/// Answered stream ids kept below the highest one: client streams are opened in increasing id
/// order and at most a few hundred are open at once, so a refusal is always within this window.
const ANSWERED_WINDOW: u32 = 4096;

/// What the server side of the HTTP/2 layer did on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `RST_STREAM` on a stream no handler answered.
    Stream { id: u32, code: u32 },
    /// `GOAWAY` with an error code: the whole connection ends.
    Connection { code: u32 },
}

/// The name of an HTTP/2 error code (RFC 9113 §7).
pub(crate) fn code_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        other => return format!("error {other:#x}"),
    };
    name.to_owned()
}

/// Reads frame headers out of a server's output stream.
#[derive(Debug, Default)]
pub(crate) struct FrameScan {
    /// The frame header being read.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// The current frame: its type, stream, payload bytes still to come, and the first eight
    /// payload bytes (what `RST_STREAM` and `GOAWAY` carry).
    kind: u8,
    stream: u32,
    left: usize,
    payload: [u8; 8],
    got: usize,
    /// Streams a `HEADERS` frame was written on, within [`ANSWERED_WINDOW`] of the highest.
    answered: BTreeSet<u32>,
    highest: u32,
}

impl FrameScan {
    /// Feeds bytes the server wrote; calls `report` for each refusal completed by them.
    pub fn feed(&mut self, mut bytes: &[u8], report: &mut dyn FnMut(Refused)) {
        while !bytes.is_empty() {
            if self.have < FRAME_HEADER {
                let take = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                self.have += take;
                bytes = &bytes[take..];
                if self.have == FRAME_HEADER {
                    self.start_frame(report);
                }
                continue;
            }
            let take = self.left.min(bytes.len());
            let want = self.payload.len().saturating_sub(self.got).min(take);
            self.payload[self.got..self.got + want].copy_from_slice(&bytes[..want]);
            self.got += want;
            self.left -= take;
            bytes = &bytes[take..];
            if self.left == 0 {
                self.end_frame(report);
            }
        }
    }

    fn start_frame(&mut self, report: &mut dyn FnMut(Refused)) {
        let h = self.header;
        self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        self.kind = h[3];
        self.stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        self.got = 0;
        if matches!(self.kind, HEADERS | CONTINUATION) && self.stream != 0 {
            self.answer(self.stream);
        }
        if self.left == 0 {
            self.end_frame(report);
        }
    }

    fn end_frame(&mut self, report: &mut dyn FnMut(Refused)) {
        let p = self.payload;
        match self.kind {
            RST_STREAM if self.got >= 4 && self.stream != 0 => {
                let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                let id = self.stream;
                let answered =
                    self.answered.remove(&id) || id < self.highest.saturating_sub(ANSWERED_WINDOW);
                // NO_ERROR and CANCEL end streams the gateway itself finished or dropped.
                if !answered && code != 0x0 && code != 0x8 {
                    report(Refused::Stream { id, code });
                }
            }
            GOAWAY if self.got >= 8 => {
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                if code != 0x0 {
                    report(Refused::Connection { code });
                }
            }
            _ => {}
        }
        self.have = 0;
        self.got = 0;
    }

    fn answer(&mut self, id: u32) {
        self.answered.insert(id);
        if id > self.highest {
            self.highest = id;
            let floor = id.saturating_sub(ANSWERED_WINDOW);
            while let Some(&low) = self.answered.first() {
                if low >= floor {
                    break;
                }
                self.answered.pop_first();
            }
        }
    }
}

/// An I/O stream whose written bytes go through a [`FrameScan`]; `report` gets the refusals.
pub(crate) struct FrameWatch<IO> {
    inner: IO,
    scan: FrameScan,
    report: Box<dyn FnMut(Refused) + Send>,
}

impl<IO> FrameWatch<IO> {
    pub fn new(inner: IO, report: Box<dyn FnMut(Refused) + Send>) -> Self {
        FrameWatch {
            inner,
            scan: FrameScan::default(),
            report,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameWatch<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameWatch<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.scan
                .feed(&buf[..(*n).min(buf.len())], &mut *this.report);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            let mut left = *n;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(b.len());
                this.scan.feed(&b[..take], &mut *this.report);
                left -= take;
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn rst(stream: u32, code: u32) -> Vec<u8> {
        frame(RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    fn goaway(last: u32, code: u32) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(b"debug data");
        frame(GOAWAY, 0, 0, &p)
    }

    /// A server's output: settings, a response on stream 1 with data, a refusal of stream 3,
    /// a reset of the answered stream 5, a cancel of 7, and a GOAWAY with PROTOCOL_ERROR.
    fn output() -> Vec<u8> {
        [
            frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]),
            frame(HEADERS, 0x4, 1, &[0x88]),
            frame(0x0, 0x1, 1, &[b'x'; 300]),
            rst(3, 0x1),
            frame(HEADERS, 0x4, 5, &[0x88]),
            rst(5, 0x1),
            rst(7, 0x8),
            rst(9, 0x7),
            goaway(9, 0x1),
        ]
        .concat()
    }

    fn scan_in(pieces: &[&[u8]]) -> Vec<Refused> {
        let mut s = FrameScan::default();
        let mut out = Vec::new();
        for p in pieces {
            s.feed(p, &mut |r| out.push(r));
        }
        out
    }

    const EXPECTED: [Refused; 3] = [
        Refused::Stream { id: 3, code: 0x1 },
        Refused::Stream { id: 9, code: 0x7 },
        Refused::Connection { code: 0x1 },
    ];

    #[test]
    fn refusals_of_unanswered_streams_and_connection_errors_are_reported() {
        assert_eq!(scan_in(&[&output()]), EXPECTED);
    }

    #[test]
    fn any_split_of_the_output_gives_the_same_reports() {
        let out = output();
        for at in 0..out.len() {
            assert_eq!(
                scan_in(&[&out[..at], &out[at..]]),
                EXPECTED,
                "split at {at}"
            );
        }
        let bytes: Vec<&[u8]> = out.chunks(1).collect();
        assert_eq!(scan_in(&bytes), EXPECTED);
    }

    #[test]
    fn a_clean_goaway_and_old_streams_are_not_refusals() {
        let mut s = FrameScan::default();
        let mut out = Vec::new();
        s.feed(&goaway(1, 0), &mut |r| out.push(r));
        // A long connection: answered streams far below the highest are forgotten, and a reset
        // of one of them is taken as answered.
        for id in (1..20_000).step_by(2) {
            s.feed(&frame(HEADERS, 0x5, id, &[0x88]), &mut |r| out.push(r));
        }
        assert!(s.answered.len() <= ANSWERED_WINDOW as usize / 2 + 1);
        s.feed(&rst(3, 0x1), &mut |r| out.push(r));
        s.feed(&rst(19_999, 0x1), &mut |r| out.push(r));
        assert_eq!(out, []);
        s.feed(&rst(20_001, 0x1), &mut |r| out.push(r));
        assert_eq!(
            out,
            [Refused::Stream {
                id: 20_001,
                code: 1
            }]
        );
    }

    #[test]
    fn code_names_follow_the_rfc() {
        assert_eq!(code_name(1), "PROTOCOL_ERROR");
        assert_eq!(code_name(7), "REFUSED_STREAM");
        assert_eq!(code_name(0x42), "error 0x42");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_output_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..16)
        ) {
            let mut s = FrameScan::default();
            for c in &chunks {
                s.feed(c, &mut |_| {});
            }
        }
    }
}
