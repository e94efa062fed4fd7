//! Where a transparently captured connection was going.
//!
//! Guarantees: the original destination comes from the kernel's NAT table (`SO_ORIGINAL_DST`,
//! set by the sandbox's nftables redirect), never from anything the client sends. The lookup is a
//! trait so tests can inject a destination without nftables.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// Looks up the destination a redirected connection was originally sent to.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The kernel's answer: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (then the IPv6 variant).
#[derive(Debug, Default, Clone, Copy)]
pub struct SoOriginalDst;

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` are both 80 (linux/netfilter_ipv4.h,
/// linux/netfilter_ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let fd = stream.as_raw_fd();
        if stream.local_addr()?.is_ipv4() {
            let mut addr: libc::sockaddr_in = zeroed_sockaddr_in();
            let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: `fd` is a valid socket owned by `stream` for the duration of the call;
            // `addr` is a writable sockaddr_in and `len` holds its exact size, so the kernel
            // writes at most `len` bytes into it.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&mut addr as *mut libc::sockaddr_in).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )))
        } else {
            let mut addr: libc::sockaddr_in6 = zeroed_sockaddr_in6();
            let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: as above, with a sockaddr_in6 buffer of the stated size.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    (&mut addr as *mut libc::sockaddr_in6).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                0,
                0,
            )))
        }
    }
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: 0,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    }
}

fn zeroed_sockaddr_in6() -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    }
}

/// A fixed destination for every connection (tests, and tools that forward one port).
#[derive(Debug, Clone, Copy)]
pub struct FixedOriginalDst(pub SocketAddr);

impl OriginalDst for FixedOriginalDst {
    fn original_dst(&self, _stream: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}

/// Any closure from the accepted stream to a destination.
impl<F> OriginalDst for F
where
    F: Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync + 'static,
{
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        self(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_was_not_redirected_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Without a NAT entry the kernel answers ENOENT; it must surface as an error, never as a
        // made-up destination.
        let res = SoOriginalDst.original_dst(&server);
        assert!(res.is_err(), "{res:?}");
        drop(client);
    }
}
