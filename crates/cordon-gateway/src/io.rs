//! Byte metering for everything that crosses to or from an upstream host, and the small socket
//! helpers the HTTP and tunnel paths share.
//!
//! Guarantees:
//! - Every byte the gateway sends to or receives from an upstream host is charged to the
//!   session's byte budget through a [`Meter`] *before* it moves, whether it moves through user
//!   space ([`write_up`], [`read_up`]) or through a pipe (`crate::splice`): with enforcement on,
//!   a session never sends more than `max_bytes_out` nor receives more than `max_bytes_in` bytes
//!   upstream, and the transfer fails with "byte budget exhausted" at the limit.
//! - Counts are exact per upstream connection (the bytes the kernel accepted or returned), so
//!   per-request and per-connection events report what really moved.
//! - A budget hit is reported (one `BudgetExhausted` event) once per upstream connection.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::budget::{ByteDirection, Grant};
use crate::core::{BudgetHit, Ctx};
use crate::session::Session;

/// Byte counts of one upstream connection.
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

/// What a meter reports a budget hit against.
pub(crate) struct MeterTarget {
    pub ctx: Arc<Ctx>,
    pub session: Arc<Session>,
    pub hit: BudgetHit,
}

/// Charges one upstream connection's bytes to its session's budget and counts them.
pub(crate) struct Meter {
    counters: Arc<Counters>,
    target: MeterTarget,
    reported: AtomicBool,
}

/// The error a transfer fails with when the byte budget runs out.
pub(crate) fn exhausted() -> io::Error {
    io::Error::other(BUDGET_EXHAUSTED)
}

const BUDGET_EXHAUSTED: &str = "byte budget exhausted";

impl Meter {
    pub fn new(target: MeterTarget) -> Self {
        Meter {
            counters: Arc::new(Counters::default()),
            target,
            reported: AtomicBool::new(false),
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Reserves up to `want` bytes in direction `d`: how many may move now, or the
    /// "byte budget exhausted" error. Follow with [`Meter::settle`].
    pub fn reserve(&self, d: ByteDirection, want: usize) -> io::Result<usize> {
        if want == 0 {
            return Ok(0);
        }
        let grant = self.target.session.budget.reserve_bytes(d, want as u64);
        let hit = matches!(grant, Grant::Exhausted | Grant::OverInReport(_));
        if hit && !self.reported.swap(true, Ordering::Relaxed) {
            self.target.ctx.budget_exhausted_mid_stream(
                &self.target.session,
                &self.target.hit,
                d,
                matches!(grant, Grant::OverInReport(_)),
            );
        }
        match grant {
            Grant::Exhausted => Err(exhausted()),
            Grant::Granted(n) | Grant::OverInReport(n) => {
                Ok(usize::try_from(n).unwrap_or(usize::MAX).min(want))
            }
        }
    }

    /// After a reservation of `reserved` bytes of which `moved` really moved: hands back the
    /// rest and counts what moved.
    pub fn settle(&self, d: ByteDirection, reserved: usize, moved: usize) {
        self.target
            .session
            .budget
            .release_bytes(d, reserved.saturating_sub(moved) as u64);
        let counter = match d {
            ByteDirection::Out => &self.counters.up,
            ByteDirection::In => &self.counters.down,
        };
        counter.fetch_add(moved as u64, Ordering::Relaxed);
    }
}

/// Writes all of `data` to the upstream `stream`, charging it to the budget as it goes.
pub(crate) async fn write_up(stream: &TcpStream, meter: &Meter, data: &[u8]) -> io::Result<()> {
    write_all(stream, data, Some(meter)).await
}

/// `write_all` through a shared reference (a tunnel relays both ways on borrowed sockets);
/// bytes are metered as sent upstream when `meter` is given. It writes at once and waits for
/// room only when the socket has none: a connected socket nearly always has room, and asking
/// the reactor first cost a few per cent of the proxy's CPU per request.
pub(crate) async fn write_all(
    stream: &TcpStream,
    mut data: &[u8],
    meter: Option<&Meter>,
) -> io::Result<()> {
    while !data.is_empty() {
        let allowed = match meter {
            Some(m) => m.reserve(ByteDirection::Out, data.len())?,
            None => data.len(),
        };
        let res = stream.try_write(&data[..allowed]);
        if let Some(m) = meter {
            m.settle(ByteDirection::Out, allowed, *res.as_ref().unwrap_or(&0));
        }
        match res {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What [`relay_down`] did.
pub(crate) enum Relayed {
    /// Nothing was ready after all.
    Nothing,
    /// The server closed: the client's side was shut down for writing.
    Eof,
    /// These bytes (metered in) went to the client.
    Data(usize),
}

/// Once `upstream` is readable: reads what it has (charged to the inbound budget) into `buf`
/// and relays it to `client`. The server-first phases of a tunnel share it.
pub(crate) async fn relay_down(
    upstream: &TcpStream,
    client: &TcpStream,
    meter: &Meter,
    buf: &mut [u8],
) -> io::Result<Relayed> {
    let allowed = meter.reserve(ByteDirection::In, buf.len())?;
    let res = upstream.try_read(&mut buf[..allowed]);
    meter.settle(ByteDirection::In, allowed, *res.as_ref().unwrap_or(&0));
    match res {
        Ok(0) => {
            crate::splice::shutdown_write(client);
            Ok(Relayed::Eof)
        }
        Ok(n) => {
            write_all(client, &buf[..n], None).await?;
            Ok(Relayed::Data(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Relayed::Nothing),
        Err(e) => Err(e),
    }
}

/// Reads from the upstream `stream` into `buf` (at most `max` bytes), charging them to the
/// budget. Returns 0 at EOF.
pub(crate) async fn read_up(
    stream: &mut TcpStream,
    meter: &Meter,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<usize> {
    let allowed = meter.reserve(ByteDirection::In, max)?;
    buf.reserve(allowed);
    let res = stream.read_buf(&mut (&mut *buf).limit(allowed)).await;
    let got = *res.as_ref().unwrap_or(&0);
    meter.settle(ByteDirection::In, allowed, got);
    res
}

/// Reads from the client `stream` into `buf` (at most `max` bytes). Returns 0 at EOF.
pub(crate) async fn read_client(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<usize> {
    buf.reserve(max);
    stream.read_buf(&mut (&mut *buf).limit(max)).await
}

/// Reads from `stream` into `buf` until `done(buf)` says enough, the stream ends, `max` bytes
/// are buffered, or `timeout` passes. Returns whether it timed out.
pub(crate) async fn read_until<F>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: std::time::Duration,
    mut done: F,
) -> io::Result<bool>
where
    F: FnMut(&[u8]) -> bool,
{
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::tcp_pair;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn read_until_stops_at_the_predicate_the_cap_or_the_timeout() {
        let (mut a, mut b) = tcp_pair().await;
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
