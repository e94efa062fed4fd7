//! Passing file descriptors between the sandbox's init and the supervisor.
//!
//! Guarantees:
//! - One message is one `SOCK_SEQPACKET` datagram: a payload and the descriptors sent with it
//!   arrive together or not at all.
//! - Received descriptors are close-on-exec from the moment they exist (`MSG_CMSG_CLOEXEC`), so
//!   a concurrent `exec` elsewhere in the receiving process never leaks them.
//! - Nothing is silently lost: a payload larger than the receiver's buffer or more descriptors
//!   than it allows is an error ([`FdPassError::Truncated`]), and every descriptor that did
//!   arrive is closed before the error is returned.
//! - Every received descriptor is an [`OwnedFd`]: the caller cannot forget to close one.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, socketpair as nix_socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType,
};

/// The kernel's limit on descriptors in one SCM_RIGHTS message (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Errors from sending or receiving descriptors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdPassError {
    #[error("socketpair(AF_UNIX, SOCK_SEQPACKET): {errno}")]
    Socketpair { errno: Errno },
    /// An empty payload would be indistinguishable from the peer closing the socket.
    #[error("refusing to send an empty payload")]
    EmptyPayload,
    #[error("{count} descriptors in one message; at most {MAX_FDS}")]
    TooManyFds { count: usize },
    #[error("sendmsg(SCM_RIGHTS): {errno}")]
    Send { errno: Errno },
    #[error("sendmsg sent {sent} of {len} bytes")]
    ShortSend { sent: usize, len: usize },
    #[error("recvmsg(SCM_RIGHTS): {errno}")]
    Recv { errno: Errno },
    #[error("the peer closed the socket")]
    Closed,
    /// The message did not fit: the payload was longer than `max_payload`, or more than
    /// `max_fds` descriptors came with it. What did arrive has been closed.
    #[error("message truncated ({what}): larger than the receiver allows")]
    Truncated { what: &'static str },
}

/// A connected `AF_UNIX`/`SOCK_SEQPACKET` pair, close-on-exec.
pub fn socketpair() -> Result<(OwnedFd, OwnedFd), FdPassError> {
    nix_socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|errno| FdPassError::Socketpair { errno })
}

/// Sends `payload` with `fds` attached as one datagram. The descriptors stay open here; the
/// receiver gets its own copies.
pub fn send_fds(
    sock: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassError> {
    if payload.is_empty() {
        return Err(FdPassError::EmptyPayload);
    }
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds { count: fds.len() });
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(payload)];
    let sent = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(FdPassError::Send { errno }),
        }
    };
    if sent != payload.len() {
        return Err(FdPassError::ShortSend {
            sent,
            len: payload.len(),
        });
    }
    Ok(())
}

/// Receives one datagram of at most `max_payload` bytes with at most `max_fds` descriptors.
/// Blocks if the socket is blocking; on a non-blocking socket with nothing queued the error is
/// `Recv { errno: EAGAIN }`.
pub fn recv_fds(
    sock: BorrowedFd<'_>,
    max_payload: usize,
    max_fds: usize,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut payload = vec![0u8; max_payload.max(1)];
    let fd_bytes = (max_fds * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];

    let (n, msg_flags, fds) = loop {
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if max_fds > 0 {
            mh.msg_control = control.as_mut_ptr().cast();
            mh.msg_controllen = space;
        }
        // SAFETY: `mh` points at `iov` (covering `payload`) and at `control` (at least `space`
        // bytes); both outlive the call and the kernel writes within the given lengths.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                errno => return Err(FdPassError::Recv { errno }),
            }
        }
        // Take ownership before looking at anything else, so every descriptor is closed on
        // any error below. On MSG_CTRUNC the kernel still installs the descriptors that fit
        // and describes exactly those in the (shortened) header, so this walk is still valid.
        // SAFETY: `mh` was filled by a successful recvmsg; `take_rights` only reads headers
        // that lie inside `msg_control`/`msg_controllen`.
        let fds = unsafe { take_rights(&mh) };
        break (n as usize, mh.msg_flags, fds);
    };
    if msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(FdPassError::Truncated {
            what: "descriptors",
        });
    }
    if msg_flags & libc::MSG_TRUNC != 0 {
        return Err(FdPassError::Truncated { what: "payload" });
    }
    if n == 0 && fds.is_empty() {
        return Err(FdPassError::Closed);
    }
    payload.truncate(n);
    Ok((payload, fds))
}

/// Collects the descriptors of every SCM_RIGHTS message in `mh`'s control buffer.
///
/// # Safety
/// `mh` must come from a successful `recvmsg`, with `msg_control` still pointing at the buffer
/// it was given (or null).
unsafe fn take_rights(mh: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    if mh.msg_control.is_null() {
        return fds;
    }
    let end = (mh.msg_control as usize).saturating_add(mh.msg_controllen);
    // SAFETY: `mh` is a valid header per the caller; CMSG_FIRSTHDR only reads its fields.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(mh) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR return null or a header that starts inside the buffer.
        let hdr = unsafe { std::ptr::read_unaligned(c) };
        // SAFETY: pure arithmetic.
        let data_off = unsafe { libc::CMSG_LEN(0) } as usize;
        let len = hdr.cmsg_len;
        if len < data_off || (c as usize).saturating_add(len) > end {
            break;
        }
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: `c` is a valid header inside the buffer.
            let data = unsafe { libc::CMSG_DATA(c) };
            let count = (len - data_off) / std::mem::size_of::<RawFd>();
            for i in 0..count {
                // SAFETY: the `count` descriptors lie within `len` bytes of the header, which we
                // checked is inside the buffer; read_unaligned tolerates any alignment.
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel has just installed `fd` in our table for this message;
                // nothing else refers to it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: `c` is a valid header of `mh`.
        c = unsafe { libc::CMSG_NXTHDR(mh, c) };
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFD on a valid descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn a_descriptor_sent_arrives_as_a_working_close_on_exec_copy() {
        let (a, b) = socketpair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"hello").unwrap();
        send_fds(a.as_fd(), b"one", &[file.as_fd()]).unwrap();
        let (payload, fds) = recv_fds(b.as_fd(), 64, 4).unwrap();
        assert_eq!(payload, b"one");
        assert_eq!(fds.len(), 1);
        assert_ne!(fds[0].as_raw_fd(), file.as_raw_fd());
        assert!(cloexec(fds[0].as_fd()));
        let mut copy = std::fs::File::from(fds.into_iter().next().unwrap());
        copy.rewind().unwrap();
        let mut s = String::new();
        copy.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn message_boundaries_are_kept_and_a_payload_may_travel_alone() {
        let (a, b) = socketpair().unwrap();
        send_fds(a.as_fd(), b"first", &[]).unwrap();
        send_fds(a.as_fd(), b"second", &[a.as_fd(), b.as_fd()]).unwrap();
        let (p1, f1) = recv_fds(b.as_fd(), 64, 4).unwrap();
        let (p2, f2) = recv_fds(b.as_fd(), 64, 4).unwrap();
        assert_eq!((p1.as_slice(), f1.len()), (&b"first"[..], 0));
        assert_eq!((p2.as_slice(), f2.len()), (&b"second"[..], 2));
    }

    #[test]
    fn more_descriptors_than_allowed_is_an_error_and_none_leak() {
        let (a, b) = socketpair().unwrap();
        // Three copies of a pipe's write end: if the receiver kept any, the reader would never
        // see end-of-file.
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut reader = std::fs::File::from(reader);
        let w = writer.as_fd();
        send_fds(a.as_fd(), b"x", &[w, w, w]).unwrap();
        drop(writer);
        assert_eq!(
            recv_fds(b.as_fd(), 64, 1).unwrap_err(),
            FdPassError::Truncated {
                what: "descriptors"
            }
        );
        // Non-blocking, so a leaked copy fails the test (EAGAIN) instead of hanging it.
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut rest = [0u8; 1];
        assert_eq!(
            reader.read(&mut rest).unwrap(),
            0,
            "end-of-file: no copy leaked"
        );
    }

    #[test]
    fn a_payload_larger_than_the_buffer_is_an_error() {
        let (a, b) = socketpair().unwrap();
        send_fds(a.as_fd(), &[7u8; 100], &[]).unwrap();
        assert_eq!(
            recv_fds(b.as_fd(), 10, 0).unwrap_err(),
            FdPassError::Truncated { what: "payload" }
        );
    }

    #[test]
    fn a_closed_peer_and_an_empty_payload_are_distinct_errors() {
        let (a, b) = socketpair().unwrap();
        assert_eq!(
            send_fds(a.as_fd(), b"", &[]).unwrap_err(),
            FdPassError::EmptyPayload
        );
        drop(a);
        assert_eq!(recv_fds(b.as_fd(), 8, 1).unwrap_err(), FdPassError::Closed);
    }
}
