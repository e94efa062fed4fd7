//! Zero-copy transfers between two TCP sockets: `splice(2)` from the source socket into a pipe
//! and from the pipe into the destination socket, so bulk bytes (tunnels, large bodies) never
//! pass through user space.
//!
//! Guarantees:
//! - A transfer moves exactly the bytes the source sent, in order, up to its `limit` and never
//!   one byte past it (each `splice` from the source asks for at most what is left), so the
//!   bytes after an HTTP body stay in the socket for the next message.
//! - Upstream bytes are metered like user-space I/O (`crate::io::Meter`): bytes read from
//!   upstream are reserved before the splice that reads them; bytes sent upstream are reserved
//!   before the splice that sends them, so the upstream host receives at most the budget, to the
//!   byte, and the transfer then fails with "byte budget exhausted".
//! - The pipe is filled only when it is empty, so a would-block from `splice` always comes from
//!   the socket, never the pipe: tokio's readiness is cleared only for a socket that really is
//!   not ready, and no wake-up is ever lost.
//! - A tunnel ends when both directions reached EOF (each EOF is passed on as a half-close), when
//!   either fails, or when the cancellation token fires.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::budget::ByteDirection;
use crate::io::Meter;

/// Pipe size asked for: bigger pipes mean fewer system calls per byte, but every pipe counts
/// against the user's pipe quota (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default; past
/// it new pipes get two pages), and 64 KiB, 256 KiB and 1 MiB measured the same on loopback.
/// Best effort: the default size stays if the kernel refuses.
const PIPE_SIZE: libc::c_int = 256 * 1024;

/// A pipe used as the in-kernel buffer of one transfer direction.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes sitting in the pipe.
    held: usize,
    /// The pipe's capacity.
    cap: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; failure only leaves the default size.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        // SAFETY: fcntl on a descriptor we own.
        let cap = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let cap = usize::try_from(cap)
            .ok()
            .filter(|&c| c > 0)
            .unwrap_or(65536);
        Ok(Pipe {
            read,
            write,
            held: 0,
            cap,
        })
    }

    /// Whether bytes of an interrupted transfer are still inside (the pipe is then unusable).
    pub fn is_dirty(&self) -> bool {
        self.held > 0
    }
}

/// One non-blocking `splice(2)` call.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain descriptors and null offsets (both ends are a socket or a pipe, which
        // have no file position); the kernel reads nothing from our memory.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Which end of a transfer is the upstream host, whose bytes are metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamEnd {
    /// Bytes come from upstream (a response body, a tunnel's downstream half).
    Source,
    /// Bytes go to upstream (a request body, a tunnel's upstream half).
    Destination,
}

/// Where a transfer failed.
#[derive(Debug)]
pub(crate) struct TransferError {
    /// True when the failure is on the source side (reading), false on the destination side.
    pub at_source: bool,
    pub error: io::Error,
}

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// How a transfer ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    pub bytes: u64,
    /// The source reached EOF (before `limit`, if there was one).
    pub eof: bool,
}

/// Splices `src` → `dst` through `pipe` until `limit` bytes moved (or EOF when `limit` is
/// `None`, or earlier EOF). `pipe` must be clean.
pub(crate) async fn transfer(
    pipe: &mut Pipe,
    src: &TcpStream,
    dst: &TcpStream,
    limit: Option<u64>,
    meter: &Meter,
    upstream: UpstreamEnd,
) -> Result<Moved, TransferError> {
    let src_err = |error| TransferError {
        at_source: true,
        error,
    };
    let dst_err = |error| TransferError {
        at_source: false,
        error,
    };
    // Budget failures belong to the upstream end.
    let budget_err = |error| TransferError {
        at_source: upstream == UpstreamEnd::Source,
        error,
    };
    if pipe.is_dirty() {
        return Err(dst_err(io::Error::other("splice pipe holds stale bytes")));
    }
    let mut moved: u64 = 0;
    let mut eof = false;
    loop {
        if pipe.held == 0 {
            let left = limit.map_or(u64::MAX, |l| l - moved);
            if eof || left == 0 {
                return Ok(Moved { bytes: moved, eof });
            }
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(pipe.cap);
            let n = if upstream == UpstreamEnd::Source {
                let allowed = meter.reserve(ByteDirection::In, want).map_err(budget_err)?;
                let res = fill(src, pipe, allowed).await;
                meter.settle(ByteDirection::In, allowed, *res.as_ref().unwrap_or(&0));
                res
            } else {
                fill(src, pipe, want).await
            }
            .map_err(src_err)?;
            if n == 0 {
                eof = true;
            }
            pipe.held = n;
            continue;
        }
        let want = pipe.held;
        let n = if upstream == UpstreamEnd::Destination {
            let allowed = meter
                .reserve(ByteDirection::Out, want)
                .map_err(budget_err)?;
            let res = drain(pipe, dst, allowed).await;
            meter.settle(ByteDirection::Out, allowed, *res.as_ref().unwrap_or(&0));
            res
        } else {
            drain(pipe, dst, want).await
        }
        .map_err(dst_err)?;
        pipe.held -= n;
        moved += n as u64;
    }
}

/// One splice from the socket into the (empty) pipe, waiting for the socket as needed.
async fn fill(src: &TcpStream, pipe: &Pipe, len: usize) -> io::Result<usize> {
    let (from, to) = (src.as_raw_fd(), pipe.write.as_raw_fd());
    loop {
        match src.try_io(Interest::READABLE, || splice_once(from, to, len)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
            other => return other,
        }
    }
}

/// One splice from the (non-empty) pipe into the socket, waiting for the socket as needed.
async fn drain(pipe: &Pipe, dst: &TcpStream, len: usize) -> io::Result<usize> {
    let (from, to) = (pipe.read.as_raw_fd(), dst.as_raw_fd());
    loop {
        match dst.try_io(Interest::WRITABLE, || splice_once(from, to, len)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            other => return other,
        }
    }
}

/// Half-closes `stream` for writing (passes an EOF on).
pub(crate) fn shutdown_write(stream: &TcpStream) {
    // ENOTCONN when the peer is already gone: nothing left to tell it.
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
}

/// Splices both ways between `client` and `upstream` until both directions reached EOF, either
/// fails, or `cancel` fires. Byte counts live in `meter`.
pub(crate) async fn tunnel(
    client: &TcpStream,
    upstream: &TcpStream,
    meter: &Meter,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let mut to_upstream = Pipe::new()?;
    let mut to_client = Pipe::new()?;
    let up = async {
        transfer(
            &mut to_upstream,
            client,
            upstream,
            None,
            meter,
            UpstreamEnd::Destination,
        )
        .await
        .map_err(|e| e.error)?;
        shutdown_write(upstream);
        Ok::<_, io::Error>(())
    };
    let down = async {
        transfer(
            &mut to_client,
            upstream,
            client,
            None,
            meter,
            UpstreamEnd::Source,
        )
        .await
        .map_err(|e| e.error)?;
        shutdown_write(client);
        Ok::<_, io::Error>(())
    };
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        _ = cancel.cancelled() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::meter_with_budget;
    use crate::core::testing::tcp_pair;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Sends `data` into a transfer (source → gateway → destination) with a budget on the given
    /// upstream end; returns what the far end received and the transfer's outcome.
    async fn run_transfer(
        data: Vec<u8>,
        limit: Option<u64>,
        budget: Option<u64>,
        upstream: UpstreamEnd,
    ) -> (Vec<u8>, Result<Moved, String>, (u64, u64)) {
        let (mut sender, src) = tcp_pair().await;
        let (dst, mut receiver) = tcp_pair().await;
        let (meter, _ctx) = meter_with_budget(budget, budget);
        let writer = tokio::spawn(async move {
            let _ = sender.write_all(&data).await;
            let _ = sender.shutdown().await;
            sender
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let _ = receiver.read_to_end(&mut got).await;
            got
        });
        let mut pipe = Pipe::new().unwrap();
        let res = transfer(&mut pipe, &src, &dst, limit, &meter, upstream)
            .await
            .map_err(|e| e.error.to_string());
        drop(dst);
        let got = reader.await.unwrap();
        drop(writer.await.unwrap());
        (got, res, meter.counters().snapshot())
    }

    #[tokio::test]
    async fn a_transfer_to_eof_delivers_every_byte_and_reports_eof() {
        let data = pattern(3 << 20, 7);
        let (got, res, (up, down)) =
            run_transfer(data.clone(), None, None, UpstreamEnd::Source).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        assert_eq!(
            res.unwrap(),
            Moved {
                bytes: data.len() as u64,
                eof: true
            }
        );
        assert_eq!((up, down), (0, data.len() as u64));
    }

    #[tokio::test]
    async fn a_transfer_with_a_limit_stops_there_and_leaves_the_rest_in_the_socket() {
        let (mut sender, src) = tcp_pair().await;
        let (dst, mut receiver) = tcp_pair().await;
        let (meter, _ctx) = meter_with_budget(None, None);
        sender.write_all(b"0123456789NEXT").await.unwrap();
        let mut pipe = Pipe::new().unwrap();
        let moved = transfer(
            &mut pipe,
            &src,
            &dst,
            Some(10),
            &meter,
            UpstreamEnd::Destination,
        )
        .await
        .unwrap();
        assert_eq!(
            moved,
            Moved {
                bytes: 10,
                eof: false
            }
        );
        let mut got = [0u8; 10];
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"0123456789");
        let mut rest = [0u8; 4];
        let mut src = src;
        src.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"NEXT");
        assert_eq!(meter.counters().snapshot(), (10, 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn spliced_bytes_are_exactly_those_sent_and_budgets_cut_at_exactly_the_limit(
            len in 0usize..(3 << 20),
            limit in proptest::option::of(0u64..(4 << 20)),
            budget in proptest::option::of(0u64..(4 << 20)),
            to_upstream in any::<bool>(),
            seed in any::<u8>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let data = pattern(len, seed);
            let upstream = if to_upstream { UpstreamEnd::Destination } else { UpstreamEnd::Source };
            let (got, res, (up, down)) =
                rt.block_on(run_transfer(data.clone(), limit, budget, upstream));
            let by_limit = limit.map_or(len as u64, |l| l.min(len as u64));
            let expect = by_limit.min(budget.unwrap_or(u64::MAX)) as usize;
            prop_assert_eq!(got.len(), expect);
            prop_assert!(got[..] == data[..expect]);
            let metered = if to_upstream { up } else { down };
            let other = if to_upstream { down } else { up };
            prop_assert_eq!(other, 0);
            match res {
                Ok(m) => {
                    prop_assert_eq!(m.bytes as usize, expect);
                    prop_assert_eq!(metered as usize, expect);
                    prop_assert_eq!(m.eof, limit.is_none_or(|l| l > len as u64));
                }
                Err(e) => {
                    // Only the budget may stop a transfer here, and only at the budget.
                    prop_assert_eq!(e.as_str(), "byte budget exhausted");
                    // Reading on after a used-up budget fails even where EOF would have come.
                    prop_assert!(budget.is_some_and(|b| b < by_limit
                        || (!to_upstream && b == by_limit && limit.is_none_or(|l| l > len as u64))));
                    if to_upstream {
                        prop_assert_eq!(metered, budget.unwrap_or(0));
                    } else {
                        prop_assert!(metered <= budget.unwrap_or(0));
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_tunnel_passes_both_directions_and_half_closes() {
        let (mut client_far, client) = tcp_pair().await;
        let (upstream, mut upstream_far) = tcp_pair().await;
        let (meter, _ctx) = meter_with_budget(None, None);
        let cancel = CancellationToken::new();
        let far = tokio::spawn(async move {
            // Upstream: read everything until EOF, then answer and close.
            let mut got = Vec::new();
            upstream_far.read_to_end(&mut got).await.unwrap();
            upstream_far.write_all(&pattern(1 << 20, 3)).await.unwrap();
            upstream_far.shutdown().await.unwrap();
            got
        });
        let client_task = tokio::spawn(async move {
            client_far.write_all(&pattern(700_000, 1)).await.unwrap();
            client_far.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_far.read_to_end(&mut back).await.unwrap();
            back
        });
        tunnel(&client, &upstream, &meter, &cancel).await.unwrap();
        assert!(far.await.unwrap() == pattern(700_000, 1));
        assert!(client_task.await.unwrap() == pattern(1 << 20, 3));
        assert_eq!(meter.counters().snapshot(), (700_000, 1 << 20));
    }

    #[tokio::test]
    async fn a_tunnel_ends_when_cancelled() {
        let (_client_far, client) = tcp_pair().await;
        let (upstream, _upstream_far) = tcp_pair().await;
        let (meter, _ctx) = meter_with_budget(None, None);
        let cancel = CancellationToken::new();
        cancel.cancel();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tunnel(&client, &upstream, &meter, &cancel),
        )
        .await
        .unwrap()
        .unwrap();
    }
}
