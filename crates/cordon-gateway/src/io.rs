//! Byte-counted streams and the tunnel splice.
//!
//! Guarantees:
//! - Every byte the gateway sends to or receives from an upstream host passes through a
//!   [`Metered`] stream, which charges it to the session's byte budget *before* it moves: with
//!   enforcement on, a session never sends more than `max_bytes_out` nor receives more than
//!   `max_bytes_in` bytes upstream, and the stream fails with "byte budget exhausted" at the limit.
//! - Counts are exact per stream (the bytes the kernel accepted or returned), so per-connection
//!   events report what really moved.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::budget::{ByteDirection, Grant};
use crate::core::{BudgetHit, Ctx};
use crate::session::Session;

/// Byte counts of one upstream stream.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// What a metered stream reports a budget hit against.
pub(crate) struct MeterTarget {
    pub ctx: Arc<Ctx>,
    pub session: Arc<Session>,
    pub hit: BudgetHit,
}

/// An upstream stream whose bytes are counted and charged to the session's budget.
pub(crate) struct Metered<S> {
    inner: S,
    counters: Arc<Counters>,
    target: Arc<MeterTarget>,
    reported: AtomicBool,
}

impl<S> Metered<S> {
    pub fn new(inner: S, target: Arc<MeterTarget>) -> Self {
        Metered {
            inner,
            counters: Arc::new(Counters::default()),
            target,
            reported: AtomicBool::new(false),
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn grant(&self, direction: ByteDirection, want: usize) -> Grant {
        let grant = self
            .target
            .session
            .budget
            .reserve_bytes(direction, want as u64);
        let hit = matches!(grant, Grant::Exhausted | Grant::OverInReport(_));
        if hit && !self.reported.swap(true, Ordering::Relaxed) {
            self.target.ctx.budget_exhausted_mid_stream(
                &self.target.session,
                &self.target.hit,
                direction,
                matches!(grant, Grant::OverInReport(_)),
            );
        }
        grant
    }
}

fn exhausted() -> io::Error {
    io::Error::other("byte budget exhausted")
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        if want == 0 {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let allowed = match self.grant(ByteDirection::In, want) {
            Grant::Exhausted => return Poll::Ready(Err(exhausted())),
            Grant::Granted(n) | Grant::OverInReport(n) => n as usize,
        };
        // Never read more than the budget grants, so a session cannot receive past its limit.
        let mut limited = buf.take(allowed.min(want));
        let res = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let got = limited.filled().len();
        // Hand back the part of the reservation that was not used.
        let unused = (allowed.min(want) - got) as u64;
        self.target
            .session
            .budget
            .release_bytes(ByteDirection::In, unused);
        match res {
            Poll::Ready(Ok(())) => {
                // SAFETY: `limited` was taken from `buf`'s unfilled part and filled `got` bytes of
                // it, so those bytes of `buf` are initialised.
                unsafe { buf.assume_init(got) };
                buf.advance(got);
                self.counters.down.fetch_add(got as u64, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, data);
        }
        let allowed = match self.grant(ByteDirection::Out, data.len()) {
            Grant::Exhausted => return Poll::Ready(Err(exhausted())),
            Grant::Granted(n) | Grant::OverInReport(n) => (n as usize).min(data.len()),
        };
        let res = Pin::new(&mut self.inner).poll_write(cx, &data[..allowed]);
        let sent = match &res {
            Poll::Ready(Ok(n)) => *n,
            _ => 0,
        };
        self.target
            .session
            .budget
            .release_bytes(ByteDirection::Out, (allowed - sent) as u64);
        self.counters.up.fetch_add(sent as u64, Ordering::Relaxed);
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that first yields bytes already read from it (a peeked ClientHello or request head).
pub(crate) struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads from `stream` into `buf` until `done(buf)` says enough, the stream ends, `max` bytes
/// are buffered, or `timeout` passes. Returns whether it timed out.
pub(crate) async fn read_until<S, F>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: std::time::Duration,
    mut done: F,
) -> io::Result<bool>
where
    S: AsyncRead + Unpin,
    F: FnMut(&[u8]) -> bool,
{
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    while !done(buf) && buf.len() < max {
        let room = (max - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return Ok(true),
            Ok(Ok(0)) => return Ok(false),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(false)
}

/// Copies bytes both ways until both sides are done or `cancel` fires. Errors end the splice;
/// the byte counts live in the metered side's counters.
pub(crate) async fn splice<A, B>(
    mut client: A,
    mut upstream: B,
    cancel: &tokio_util::sync::CancellationToken,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        res = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 256 * 1024, 256 * 1024) => res.map(|_| ()),
        _ = cancel.cancelled() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_prefixed_stream_yields_the_prefix_then_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn read_until_stops_at_the_predicate_the_cap_or_the_timeout() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"abc\n").await.unwrap();
        let mut buf = Vec::new();
        let timed_out = read_until(
            &mut b,
            &mut buf,
            100,
            std::time::Duration::from_secs(5),
            |b| b.contains(&b'\n'),
        )
        .await
        .unwrap();
        assert!(!timed_out);
        assert_eq!(buf, b"abc\n");

        let mut buf = Vec::new();
        let timed_out = read_until(
            &mut b,
            &mut buf,
            100,
            std::time::Duration::from_millis(50),
            |_| false,
        )
        .await
        .unwrap();
        assert!(timed_out);
        assert!(buf.is_empty());
    }
}
