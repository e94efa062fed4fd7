//! The sandbox's network namespace: loopback, transparent capture, and the gateway's sockets.
//!
//! Guarantees:
//! - Everything here runs in the sandbox's init (single-threaded, holding every capability in its
//!   own user namespace) except [`original_dst`] and [`read_drop_counters`], which the supervisor
//!   calls on descriptors the init handed over. Nothing shells out, spawns a thread, or sleeps.
//! - [`apply_none`] and [`install_capture`] refuse to touch a namespace in which any interface
//!   other than `lo` is up ([`NetnsError::NotIsolated`]): applied by mistake to the host's
//!   namespace they would change the host's routing, so they check first and change nothing.
//! - Mode `none` leaves exactly `lo` (127.0.0.1/8, ::1) and no route elsewhere: every other
//!   destination fails at once with `ENETUNREACH`.
//! - Mode `gateway` adds one IPv4 default route via `lo` (preferred source 127.0.0.1) and one
//!   nftables table; the table is a single netlink transaction (all of it or none of it):
//!   TCP and UDP to port 53 anywhere go to the gateway's DNS port; every other TCP connect to an
//!   address outside 127.0.0.0/8 goes to the transparent port (the original destination stays
//!   readable with `SO_ORIGINAL_DST`); every packet that would still leave loopback after that
//!   (other UDP, ICMP, IPv6 other than ::1, anything else) is dropped and counted in one of four
//!   named counters. There is no IPv6 route but ::1, so IPv6 connects elsewhere fail with
//!   `ENETUNREACH` before netfilter sees them.
//! - The gateway's sockets are created inside this namespace, non-blocking and close-on-exec; a
//!   socket keeps the namespace it was made in, so the supervisor can serve them from the host
//!   after they are passed over with [`crate::fdpass`].
//!
//! None of this is a boundary on its own: the namespace has no interface but `lo`, so nothing can
//! leave it whatever the rules say. The rules decide which local socket a connect lands on and
//! make refused traffic visible.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    listen, recv, send, socket, AddressFamily, Backlog, MsgFlags, SockFlag, SockProtocol, SockType,
};
use serde::{Deserialize, Serialize};

use crate::nft::{
    self, ack_errno, encode_get_counters, encode_table_batch, messages, parse_counter_dump, Chain,
    ChainType, CmpOp, DumpChunk, Expr, MetaKey, NftError, NlBuf, PayloadBase, Table, Verdict,
    NFPROTO_IPV4, NFPROTO_IPV6, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_EXCL, NLM_F_REQUEST,
};

/// The nftables table cordon installs (family `inet`).
pub const CAPTURE_TABLE: &str = "cordon";
/// Named counters of dropped packets.
pub const COUNTER_UDP: &str = "drop_udp";
pub const COUNTER_ICMP: &str = "drop_icmp";
pub const COUNTER_IPV6: &str = "drop_ipv6";
pub const COUNTER_OTHER: &str = "drop_other";
/// The loopback interface's index: the kernel gives `lo` index 1 in every namespace.
const LOOPBACK_IFINDEX: i32 = 1;
/// How long to wait for a netlink reply. The kernel answers synchronously, so this only bounds
/// a wait that should never happen.
const NETLINK_TIMEOUT_MS: u16 = 1000;
/// Listen backlog for the gateway's TCP sockets.
const LISTEN_BACKLOG: i32 = 1024;
/// The port DNS clients send to; redirected to [`GatewayPorts::dns`].
const DNS_PORT: u16 = 53;

/// Errors from setting up or reading the namespace's network; each names its step.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("gateway ports: {what}")]
    InvalidPorts { what: &'static str },
    #[error("socket({what}): {errno}")]
    Socket { what: &'static str, errno: Errno },
    #[error("bind({what} on {addr}): {errno}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        errno: Errno,
    },
    #[error("listen({what} on {addr}): {errno}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        errno: Errno,
    },
    #[error("netlink send ({what}): {errno}")]
    NetlinkSend { what: &'static str, errno: Errno },
    #[error("netlink recv ({what}): {errno}")]
    NetlinkRecv { what: &'static str, errno: Errno },
    #[error("netlink ({what}): no reply within {timeout_ms} ms")]
    NetlinkTimeout { what: &'static str, timeout_ms: u16 },
    #[error("netlink ({what}): the kernel did not acknowledge every request")]
    MissingAck { what: &'static str },
    /// The kernel refused a step.
    #[error("{step}: {errno}")]
    Kernel { step: String, errno: Errno },
    #[error(
        "refusing to configure a network namespace in which interface {ifname} (index {index}) \
         is up: this is not a fresh sandbox namespace"
    )]
    NotIsolated { ifname: String, index: i32 },
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("getsockopt(SO_ORIGINAL_DST): {errno}")]
    OriginalDst { errno: Errno },
    #[error(
        "counter {name} is missing from table inet {CAPTURE_TABLE} (is this the sandbox's \
         netfilter socket?)"
    )]
    CounterMissing { name: &'static str },
    #[error("gateway socket {name:?} is missing or named twice among the received descriptors")]
    SocketNames { name: String },
}

/// Where the gateway listens inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPorts {
    /// HTTP proxy (and CONNECT) on 127.0.0.1.
    pub http: u16,
    /// DNS over UDP and TCP on 127.0.0.1.
    pub dns: u16,
    /// Transparent TCP capture on 127.0.0.1.
    pub transparent: u16,
}

impl Default for GatewayPorts {
    fn default() -> Self {
        Self {
            http: 3128,
            dns: 53,
            transparent: 15001,
        }
    }
}

impl GatewayPorts {
    fn validate(&self) -> Result<(), NetnsError> {
        if self.http == 0 || self.dns == 0 || self.transparent == 0 {
            return Err(NetnsError::InvalidPorts {
                what: "every port must be fixed (not 0)",
            });
        }
        if self.http == self.transparent || self.http == self.dns || self.dns == self.transparent {
            return Err(NetnsError::InvalidPorts {
                what: "http, dns and transparent ports must differ",
            });
        }
        Ok(())
    }
}

/// Everything [`install_capture`] applies, decided up front and serialisable for the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturePlan {
    pub ports: GatewayPorts,
    /// Preferred source of the IPv4 default route via `lo`. Without it the kernel finds no
    /// source address for a link-scope route on `lo` and connects go out from 0.0.0.0.
    pub default_route_src: Ipv4Addr,
    pub table: Table,
}

impl CapturePlan {
    /// The capture for these ports. Pure.
    pub fn new(ports: GatewayPorts) -> Result<Self, NetnsError> {
        ports.validate()?;
        Ok(Self {
            ports,
            default_route_src: Ipv4Addr::LOCALHOST,
            table: capture_table(ports),
        })
    }
}

// Expression helpers; each mirrors what `nft` itself generates for the same match.

fn nfproto(family: u8) -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::NfProto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![family],
        },
    ]
}

fn l4proto(proto: u8) -> [Expr; 2] {
    [
        Expr::Meta(MetaKey::L4Proto),
        Expr::Cmp {
            op: CmpOp::Eq,
            data: vec![proto],
        },
    ]
}

/// `th dport <port>` (TCP and UDP keep the destination port at offset 2).
fn dport(port: u16) -> [Expr; 2] {
    [
        Expr::Payload {
            base: PayloadBase::Transport,
            offset: 2,
            len: 2,
        },
        Expr::Cmp {
            op: CmpOp::Eq,
            data: port.to_be_bytes().to_vec(),
        },
    ]
}

/// `ip daddr [!=] 127.0.0.0/8`: a /8 is its first byte, at offset 16 of the IPv4 header.
fn ipv4_daddr_loopback(op: CmpOp) -> [Expr; 2] {
    [
        Expr::Payload {
            base: PayloadBase::Network,
            offset: 16,
            len: 1,
        },
        Expr::Cmp {
            op,
            data: vec![127],
        },
    ]
}

fn redirect_to(port: u16) -> [Expr; 2] {
    [Expr::Immediate(port.to_be_bytes().to_vec()), Expr::Redirect]
}

fn count_and_drop(counter: &str) -> [Expr; 2] {
    [
        Expr::CounterRef(counter.to_owned()),
        Expr::Verdict(Verdict::Drop),
    ]
}

fn rule<const N: usize>(parts: [&[Expr]; N]) -> Vec<Expr> {
    parts.iter().flat_map(|p| p.iter().cloned()).collect()
}

/// The `inet cordon` table. Equivalent `nft` syntax:
///
/// ```text
/// chain capture { type nat hook output priority -100; policy accept;
///   meta nfproto ipv4 udp dport 53 redirect to :DNS
///   meta nfproto ipv4 tcp dport 53 redirect to :DNS
///   meta nfproto ipv4 meta l4proto tcp ip daddr != 127.0.0.0/8 redirect to :TRANSPARENT }
/// chain egress { type filter hook output priority 0; policy drop;
///   ip daddr 127.0.0.0/8 accept
///   ip6 daddr ::1 accept
///   meta nfproto ipv6 counter name drop_ipv6 drop
///   meta l4proto udp counter name drop_udp drop
///   meta l4proto icmp counter name drop_icmp drop
///   counter name drop_other drop }
/// ```
///
/// The filter chain matches on the destination address, not on `oif lo`: with the default route
/// via `lo`, every packet leaves through `lo`, so `oif lo` would accept everything. It runs after
/// NAT, so redirected connections already carry 127.0.0.1 and are accepted; replies from the
/// gateway's sockets go to 127.0.0.1 too, so no `ct state` rule is needed.
fn capture_table(ports: GatewayPorts) -> Table {
    const TCP: u8 = libc::IPPROTO_TCP as u8;
    const UDP: u8 = libc::IPPROTO_UDP as u8;
    const ICMP: u8 = libc::IPPROTO_ICMP as u8;
    let v4 = nfproto(NFPROTO_IPV4);
    let capture = Chain {
        name: "capture".into(),
        chain_type: ChainType::Nat,
        priority: -100,
        policy: Verdict::Accept,
        rules: vec![
            rule([
                &v4,
                &l4proto(UDP),
                &dport(DNS_PORT),
                &redirect_to(ports.dns),
            ]),
            rule([
                &v4,
                &l4proto(TCP),
                &dport(DNS_PORT),
                &redirect_to(ports.dns),
            ]),
            rule([
                &v4,
                &l4proto(TCP),
                &ipv4_daddr_loopback(CmpOp::Neq),
                &redirect_to(ports.transparent),
            ]),
        ],
    };
    let mut ipv6_loopback = [0u8; 16];
    ipv6_loopback[15] = 1;
    let egress = Chain {
        name: "egress".into(),
        chain_type: ChainType::Filter,
        priority: 0,
        policy: Verdict::Drop,
        rules: vec![
            rule([
                &v4,
                &ipv4_daddr_loopback(CmpOp::Eq),
                &[Expr::Verdict(Verdict::Accept)],
            ]),
            rule([
                &nfproto(NFPROTO_IPV6),
                &[
                    Expr::Payload {
                        base: PayloadBase::Network,
                        offset: 24,
                        len: 16,
                    },
                    Expr::Cmp {
                        op: CmpOp::Eq,
                        data: ipv6_loopback.to_vec(),
                    },
                    Expr::Verdict(Verdict::Accept),
                ],
            ]),
            rule([&nfproto(NFPROTO_IPV6), &count_and_drop(COUNTER_IPV6)]),
            rule([&l4proto(UDP), &count_and_drop(COUNTER_UDP)]),
            rule([&l4proto(ICMP), &count_and_drop(COUNTER_ICMP)]),
            rule([&count_and_drop(COUNTER_OTHER)]),
        ],
    };
    Table {
        name: CAPTURE_TABLE.into(),
        counters: [COUNTER_UDP, COUNTER_ICMP, COUNTER_IPV6, COUNTER_OTHER]
            .map(String::from)
            .to_vec(),
        chains: vec![capture, egress],
    }
}

// ---- netlink plumbing ----

/// Sequence numbers for requests; unique per process so a late reply is never mistaken for the
/// answer to a newer request on the same socket.
static SEQ: AtomicU32 = AtomicU32::new(1);

fn next_seqs(n: u32) -> u32 {
    SEQ.fetch_add(n, Ordering::Relaxed)
}

fn netlink_socket(protocol: SockProtocol, what: &'static str) -> Result<OwnedFd, NetnsError> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol,
    )
    .map_err(|errno| NetnsError::Socket { what, errno })
}

fn nl_send(fd: BorrowedFd<'_>, bytes: &[u8], what: &'static str) -> Result<(), NetnsError> {
    loop {
        match send(fd.as_raw_fd(), bytes, MsgFlags::empty()) {
            // Netlink takes a datagram whole or not at all.
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(NetnsError::NetlinkSend { what, errno }),
        }
    }
}

/// Receives one datagram; `None` if nothing is queued.
fn nl_recv_nowait(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    what: &'static str,
) -> Result<Option<usize>, NetnsError> {
    loop {
        match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(errno) => return Err(NetnsError::NetlinkRecv { what, errno }),
        }
    }
}

/// Receives one datagram, waiting up to the netlink timeout.
fn nl_recv(fd: BorrowedFd<'_>, buf: &mut [u8], what: &'static str) -> Result<usize, NetnsError> {
    if let Some(n) = nl_recv_nowait(fd, buf, what)? {
        return Ok(n);
    }
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(NETLINK_TIMEOUT_MS)) {
            Ok(0) => {
                return Err(NetnsError::NetlinkTimeout {
                    what,
                    timeout_ms: NETLINK_TIMEOUT_MS,
                })
            }
            Ok(_) => {
                if let Some(n) = nl_recv_nowait(fd, buf, what)? {
                    return Ok(n);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(NetnsError::NetlinkRecv { what, errno }),
        }
    }
}

/// Waits for the kernel's verdict on the requests numbered `seqs`, of which only the last asks
/// for an acknowledgement. Netlink reports an error for every failing request whether or not it
/// asked for an ack, in request order, so the last request's reply ends the exchange; one ack
/// instead of one per request saves a receive per message on the start-up path.
///
/// The kernel handles a netlink request inside `send`, so by the time `send` returns every
/// reply is queued: once an error has been seen, an empty queue means nothing more will come.
fn await_acks(
    fd: BorrowedFd<'_>,
    seqs: std::ops::RangeInclusive<u32>,
    what: &'static str,
    describe: &dyn Fn(u32) -> String,
) -> Result<(), NetnsError> {
    let first = *seqs.start();
    let last = seqs.end().wrapping_sub(first) as usize;
    let mut refused: Option<(usize, i32)> = None;
    let mut finished = false;
    let mut buf = vec![0u8; 16 * 1024];
    while !finished {
        let n = if refused.is_some() {
            match nl_recv_nowait(fd, &mut buf, what)? {
                Some(n) => n,
                None => break,
            }
        } else {
            nl_recv(fd, &mut buf, what)?
        };
        for msg in messages(&buf[..n]) {
            let msg = msg?;
            let idx = msg.seq.wrapping_sub(first) as usize;
            if msg.ty != NLMSG_ERROR || idx > last {
                continue;
            }
            let errno = ack_errno(msg.payload)?;
            if errno != 0 && refused.is_none_or(|(i, _)| idx < i) {
                refused = Some((idx, errno));
            }
            finished |= idx == last;
        }
    }
    match refused {
        Some((idx, errno)) => Err(NetnsError::Kernel {
            step: describe(first.wrapping_add(idx as u32)),
            errno: Errno::from_raw(errno),
        }),
        None if !finished => Err(NetnsError::MissingAck { what }),
        None => Ok(()),
    }
}

// ---- rtnetlink ----

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const IFLA_IFNAME: u16 = 3;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const IFF_UP: u32 = libc::IFF_UP as u32;

/// `struct ifinfomsg`: family, pad, type, index, flags, change.
fn ifinfomsg(index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// `RTM_NEWLINK` setting IFF_UP on `lo`. `ack`: whether this is the last request of its send
/// (see [`await_acks`]).
fn encode_loopback_up(b: &mut NlBuf, seq: u32, ack: bool) -> Result<(), NftError> {
    let flags = if ack {
        NLM_F_REQUEST | NLM_F_ACK
    } else {
        NLM_F_REQUEST
    };
    let m = b.begin(RTM_NEWLINK, flags, seq);
    b.put(&ifinfomsg(LOOPBACK_IFINDEX, IFF_UP, IFF_UP));
    b.end(m)
}

/// `RTM_NEWROUTE`: `default dev lo scope link src <src>` in the main table.
fn encode_default_route(b: &mut NlBuf, src: Ipv4Addr, seq: u32) -> Result<(), NftError> {
    let m = b.begin(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
    );
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    b.put(&[
        libc::AF_INET as u8,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_LINK,
        RTN_UNICAST,
        0,
        0,
        0,
        0,
    ]);
    b.attr_ne32(RTA_OIF, LOOPBACK_IFINDEX as u32)?;
    b.attr(RTA_PREFSRC, &src.octets())?;
    b.end(m)
}

/// Fails unless every interface other than `lo` is down. Checked before any change so that a
/// mistaken call in the host's namespace changes nothing.
fn ensure_no_uplink(rtnl: BorrowedFd<'_>) -> Result<(), NetnsError> {
    const WHAT: &str = "list interfaces";
    let seq = next_seqs(1);
    let mut b = NlBuf::with_capacity(32);
    let m = b.begin(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq);
    b.put(&ifinfomsg(0, 0, 0));
    b.end(m)?;
    nl_send(rtnl, b.as_bytes(), WHAT)?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = nl_recv(rtnl, &mut buf, WHAT)?;
        for msg in messages(&buf[..n]) {
            let msg = msg?;
            if msg.seq != seq {
                continue;
            }
            match msg.ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = ack_errno(msg.payload)?;
                    if errno != 0 {
                        return Err(NetnsError::Kernel {
                            step: "rtnetlink: list interfaces".into(),
                            errno: Errno::from_raw(errno),
                        });
                    }
                }
                RTM_NEWLINK => check_link(msg.payload)?,
                _ => {}
            }
        }
    }
}

fn check_link(payload: &[u8]) -> Result<(), NetnsError> {
    let hdr = payload.get(..16).ok_or(NftError::Malformed {
        what: "short ifinfomsg",
    })?;
    let index = i32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let flags = u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    if index == LOOPBACK_IFINDEX || flags & IFF_UP == 0 {
        return Ok(());
    }
    let mut ifname = String::from("?");
    for a in nft::attrs(&payload[16..]) {
        let (ty, v) = a?;
        if ty == IFLA_IFNAME {
            let s = v.split(|&c| c == 0).next().unwrap_or(&[]);
            ifname = String::from_utf8_lossy(s).into_owned();
        }
    }
    Err(NetnsError::NotIsolated { ifname, index })
}

fn describe_rtnl(first: u32) -> impl Fn(u32) -> String {
    move |seq| match seq.wrapping_sub(first) {
        0 => "rtnetlink: set lo up".into(),
        1 => "rtnetlink: add default route via lo".into(),
        _ => format!("rtnetlink: request with sequence number {seq}"),
    }
}

/// Sets `lo` up (which also gives it 127.0.0.1/8 and ::1). Does not check the namespace: the
/// init may call it on its own in any namespace it created.
pub fn bring_up_loopback() -> Result<(), NetnsError> {
    let rtnl = netlink_socket(SockProtocol::NetlinkRoute, "rtnetlink")?;
    loopback_up(rtnl.as_fd())
}

fn loopback_up(rtnl: BorrowedFd<'_>) -> Result<(), NetnsError> {
    let seq = next_seqs(1);
    let mut b = NlBuf::with_capacity(64);
    encode_loopback_up(&mut b, seq, true)?;
    nl_send(rtnl, b.as_bytes(), "set lo up")?;
    await_acks(rtnl, seq..=seq, "set lo up", &describe_rtnl(seq))
}

/// Network mode `none`: checks the namespace is fresh, then sets `lo` up; nothing else.
pub fn apply_none() -> Result<(), NetnsError> {
    let rtnl = netlink_socket(SockProtocol::NetlinkRoute, "rtnetlink")?;
    ensure_no_uplink(rtnl.as_fd())?;
    loopback_up(rtnl.as_fd())
}

/// Network mode `gateway`, routing and rules: checks the namespace is fresh, sets `lo` up, adds
/// the default route via `lo` and installs the nftables table. Bind the gateway's sockets
/// afterwards ([`bind_gateway_sockets`]), or use [`apply_gateway`] for both.
pub fn install_capture(plan: &CapturePlan) -> Result<(), NetnsError> {
    let nfnl = netlink_socket(SockProtocol::NetlinkNetFilter, "nfnetlink")?;
    install_capture_with(plan, nfnl.as_fd())
}

fn install_capture_with(plan: &CapturePlan, nfnl: BorrowedFd<'_>) -> Result<(), NetnsError> {
    let rtnl = netlink_socket(SockProtocol::NetlinkRoute, "rtnetlink")?;
    ensure_no_uplink(rtnl.as_fd())?;

    // Both rtnetlink requests in one datagram: the kernel handles them in order, so the route is
    // added after lo is up (a route via a down device is refused).
    let seq = next_seqs(2);
    let mut b = NlBuf::with_capacity(128);
    encode_loopback_up(&mut b, seq, false)?;
    encode_default_route(&mut b, plan.default_route_src, seq.wrapping_add(1))?;
    nl_send(rtnl.as_fd(), b.as_bytes(), "lo up and default route")?;
    await_acks(
        rtnl.as_fd(),
        seq..=seq.wrapping_add(1),
        "lo up and default route",
        &describe_rtnl(seq),
    )?;

    // Batch begin + one message per table element + batch end.
    let n = 3
        + plan.table.counters.len()
        + plan
            .table
            .chains
            .iter()
            .map(|c| 1 + c.rules.len())
            .sum::<usize>();
    let first = next_seqs(u32::try_from(n).unwrap_or(u32::MAX));
    let batch = encode_table_batch(&plan.table, first)?;
    nl_send(nfnl, batch.bytes(), "nftables batch")?;
    await_acks(nfnl, batch.seqs(), "nftables batch", &|s| {
        batch.describe(&plan.table, s)
    })
}

/// The gateway's sockets, created inside the sandbox's namespace. All are non-blocking and
/// close-on-exec.
#[derive(Debug)]
pub struct GatewaySockets {
    /// TCP, listening on 127.0.0.1:http.
    pub http: OwnedFd,
    /// UDP, bound to 127.0.0.1:dns.
    pub dns_udp: OwnedFd,
    /// TCP, listening on 127.0.0.1:dns.
    pub dns_tcp: OwnedFd,
    /// TCP, listening on 127.0.0.1:transparent; `REDIRECT` of a locally generated packet
    /// rewrites the destination to 127.0.0.1, so loopback is enough.
    pub transparent: OwnedFd,
    /// NETLINK_NETFILTER in this namespace, for [`read_drop_counters`].
    pub netlink: OwnedFd,
    /// NETLINK_SOCK_DIAG in this namespace: the supervisor asks it which socket a connection
    /// comes from (process attribution), without walking the host's socket tables.
    pub sock_diag: OwnedFd,
}

impl GatewaySockets {
    /// Names in the order of [`GatewaySockets::as_fds`], to send alongside the descriptors.
    pub const NAMES: [&'static str; 6] = [
        "http",
        "dns_udp",
        "dns_tcp",
        "transparent",
        "netlink",
        "sock_diag",
    ];

    pub fn as_fds(&self) -> [BorrowedFd<'_>; 6] {
        [
            self.http.as_fd(),
            self.dns_udp.as_fd(),
            self.dns_tcp.as_fd(),
            self.transparent.as_fd(),
            self.netlink.as_fd(),
            self.sock_diag.as_fd(),
        ]
    }

    /// Rebuilds the set from received descriptors and the names sent with them (any order).
    pub fn from_named(names: &[String], fds: Vec<OwnedFd>) -> Result<Self, NetnsError> {
        let mut slots: [Option<OwnedFd>; 6] = Default::default();
        for (name, fd) in names.iter().zip(fds) {
            let i = Self::NAMES
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| NetnsError::SocketNames { name: name.clone() })?;
            if slots[i].replace(fd).is_some() {
                return Err(NetnsError::SocketNames { name: name.clone() });
            }
        }
        let [http, dns_udp, dns_tcp, transparent, netlink, sock_diag] = slots;
        let take = |fd: Option<OwnedFd>, i: usize| {
            fd.ok_or_else(|| NetnsError::SocketNames {
                name: Self::NAMES[i].into(),
            })
        };
        Ok(Self {
            http: take(http, 0)?,
            dns_udp: take(dns_udp, 1)?,
            dns_tcp: take(dns_tcp, 2)?,
            transparent: take(transparent, 3)?,
            netlink: take(netlink, 4)?,
            sock_diag: take(sock_diag, 5)?,
        })
    }
}

fn inet_socket(ty: SockType, what: &'static str) -> Result<OwnedFd, NetnsError> {
    socket(
        AddressFamily::Inet,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|errno| NetnsError::Socket { what, errno })
}

fn bind_v4(fd: BorrowedFd<'_>, addr: SocketAddrV4, what: &'static str) -> Result<(), NetnsError> {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a fully initialised sockaddr_in and we pass its exact size; `fd` is a
    // valid open socket for the duration of the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(NetnsError::Bind {
            what,
            addr: addr.into(),
            errno: Errno::last(),
        });
    }
    Ok(())
}

fn tcp_listener(port: u16, what: &'static str) -> Result<OwnedFd, NetnsError> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let fd = inet_socket(SockType::Stream, what)?;
    bind_v4(fd.as_fd(), addr, what)?;
    let backlog = Backlog::new(LISTEN_BACKLOG).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|errno| NetnsError::Listen {
        what,
        addr: addr.into(),
        errno,
    })?;
    Ok(fd)
}

/// Creates the gateway's sockets in the current namespace. Binding 127.0.0.1 works even while
/// `lo` is down, but nothing reaches the sockets until it is up. Binding a port below 1024 needs
/// CAP_NET_BIND_SERVICE in the user namespace that owns this network namespace.
pub fn bind_gateway_sockets(ports: &GatewayPorts) -> Result<GatewaySockets, NetnsError> {
    ports.validate()?;
    let netlink = netlink_socket(SockProtocol::NetlinkNetFilter, "nfnetlink")?;
    bind_with(ports, netlink)
}

fn bind_with(ports: &GatewayPorts, netlink: OwnedFd) -> Result<GatewaySockets, NetnsError> {
    let http = tcp_listener(ports.http, "http proxy")?;
    let dns_udp = inet_socket(SockType::Datagram, "dns udp")?;
    bind_v4(
        dns_udp.as_fd(),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports.dns),
        "dns udp",
    )?;
    let dns_tcp = tcp_listener(ports.dns, "dns tcp")?;
    let transparent = tcp_listener(ports.transparent, "transparent")?;
    let sock_diag = netlink_socket(SockProtocol::NetlinkSockDiag, "sock_diag")?;
    Ok(GatewaySockets {
        http,
        dns_udp,
        dns_tcp,
        transparent,
        netlink,
        sock_diag,
    })
}

/// Network mode `gateway`, all of it: [`install_capture`] then [`bind_gateway_sockets`], sharing
/// one netfilter socket (the one returned for reading counters).
pub fn apply_gateway(plan: &CapturePlan) -> Result<GatewaySockets, NetnsError> {
    plan.ports.validate()?;
    let netlink = netlink_socket(SockProtocol::NetlinkNetFilter, "nfnetlink")?;
    install_capture_with(plan, netlink.as_fd())?;
    bind_with(&plan.ports, netlink)
}

/// The destination a redirected connection was originally sent to (`SO_ORIGINAL_DST`, or its
/// IPv6 twin for an IPv6 socket). On a connection that was not redirected (a client that
/// connected to the transparent port on 127.0.0.1 itself) this is the listener's own address:
/// the gateway must refuse that rather than connect to itself.
pub fn original_dst(fd: BorrowedFd<'_>) -> Result<SocketAddr, NetnsError> {
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value. It is large enough for
    // either answer.
    let mut ss: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let family = local_family(fd)?;
    let (level, opt, want) = if family == libc::AF_INET6 {
        (
            libc::SOL_IPV6,
            libc::IP6T_SO_ORIGINAL_DST,
            std::mem::size_of::<libc::sockaddr_in6>(),
        )
    } else {
        (
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            std::mem::size_of::<libc::sockaddr_in>(),
        )
    };
    let mut len = want as libc::socklen_t;
    // SAFETY: `ss` is a writable buffer of at least `len` bytes and `len` is a valid pointer;
    // the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut ss as *mut libc::sockaddr_in6).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(NetnsError::OriginalDst {
            errno: Errno::last(),
        });
    }
    if family == libc::AF_INET6 {
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ss.sin6_addr.s6_addr.into(),
            u16::from_be(ss.sin6_port),
            u32::from_be(ss.sin6_flowinfo),
            ss.sin6_scope_id,
        )))
    } else {
        // SAFETY: for SOL_IP the kernel filled a sockaddr_in at the start of `ss`, which is
        // larger and suitably aligned.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&ss as *const libc::sockaddr_in6).cast()) };
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    }
}

fn local_family(fd: BorrowedFd<'_>) -> Result<i32, NetnsError> {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` is writable for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(NetnsError::OriginalDst {
            errno: Errno::last(),
        });
    }
    Ok(i32::from(ss.ss_family))
}

/// Packets dropped by the capture's filter chain, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DropCounters {
    /// UDP to anything but loopback (DNS is redirected first, so it is not here).
    pub udp: u64,
    /// ICMP to anything but loopback.
    pub icmp: u64,
    /// IPv6 to anything but ::1.
    pub ipv6: u64,
    /// Everything else that tried to leave loopback (raw IP, SCTP, …).
    pub other: u64,
}

impl DropCounters {
    pub fn total(&self) -> u64 {
        self.udp + self.icmp + self.ipv6 + self.other
    }
}

/// Reads the drop counters through the NETLINK_NETFILTER socket created in the sandbox's
/// namespace ([`GatewaySockets::netlink`]). Meant for the supervisor: the caller needs
/// CAP_NET_ADMIN over that namespace, which root has and so does the (unprivileged) user who
/// owns the sandbox's user namespace. Calls on one socket must not overlap.
pub fn read_drop_counters(netlink: BorrowedFd<'_>) -> Result<DropCounters, NetnsError> {
    const WHAT: &str = "read drop counters";
    let seq = next_seqs(1);
    let req = encode_get_counters(CAPTURE_TABLE, seq)?;
    nl_send(netlink, &req, WHAT)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut found: [Option<u64>; 4] = [None; 4];
    let names = [COUNTER_UDP, COUNTER_ICMP, COUNTER_IPV6, COUNTER_OTHER];
    loop {
        let n = nl_recv(netlink, &mut buf, WHAT)?;
        let (values, done) = match parse_counter_dump(&buf[..n], seq)? {
            DumpChunk::More(v) => (v, false),
            DumpChunk::Done(v) => (v, true),
            DumpChunk::Failed(errno) => {
                return Err(NetnsError::Kernel {
                    step: format!("nftables: list counters of table inet {CAPTURE_TABLE}"),
                    errno: Errno::from_raw(errno),
                })
            }
        };
        for v in values {
            if let Some(i) = names.iter().position(|n| *n == v.name) {
                found[i] = Some(v.packets);
            }
        }
        if done {
            break;
        }
    }
    let get = |i: usize| found[i].ok_or(NetnsError::CounterMissing { name: names[i] });
    Ok(DropCounters {
        udp: get(0)?,
        icmp: get(1)?,
        ipv6: get(2)?,
        other: get(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ports_are_the_documented_ones() {
        assert_eq!(
            GatewayPorts::default(),
            GatewayPorts {
                http: 3128,
                dns: 53,
                transparent: 15001
            }
        );
    }

    #[test]
    fn a_capture_plan_refuses_ports_that_collide_or_float() {
        for ports in [
            GatewayPorts {
                http: 0,
                dns: 53,
                transparent: 15001,
            },
            GatewayPorts {
                http: 3128,
                dns: 53,
                transparent: 3128,
            },
            GatewayPorts {
                http: 53,
                dns: 53,
                transparent: 15001,
            },
        ] {
            assert!(matches!(
                CapturePlan::new(ports),
                Err(NetnsError::InvalidPorts { .. })
            ));
        }
    }

    #[test]
    fn the_nat_chain_redirects_dns_then_every_non_loopback_tcp_connect() {
        let plan = CapturePlan::new(GatewayPorts {
            http: 3128,
            dns: 5353,
            transparent: 15001,
        })
        .unwrap();
        let nat = &plan.table.chains[0];
        assert_eq!(nat.name, "capture");
        assert_eq!(nat.chain_type, ChainType::Nat);
        assert_eq!(nat.priority, -100);
        assert_eq!(nat.policy, Verdict::Accept);
        let v4 = [
            Expr::Meta(MetaKey::NfProto),
            Expr::Cmp {
                op: CmpOp::Eq,
                data: vec![2],
            },
        ];
        let dport53 = [
            Expr::Payload {
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
            },
            Expr::Cmp {
                op: CmpOp::Eq,
                data: vec![0, 53],
            },
        ];
        let to = |port: u16| [Expr::Immediate(port.to_be_bytes().to_vec()), Expr::Redirect];
        let proto = |p: u8| {
            [
                Expr::Meta(MetaKey::L4Proto),
                Expr::Cmp {
                    op: CmpOp::Eq,
                    data: vec![p],
                },
            ]
        };
        assert_eq!(
            nat.rules,
            vec![
                [&v4[..], &proto(17), &dport53, &to(5353)].concat(),
                [&v4[..], &proto(6), &dport53, &to(5353)].concat(),
                [
                    &v4[..],
                    &proto(6),
                    &[
                        Expr::Payload {
                            base: PayloadBase::Network,
                            offset: 16,
                            len: 1
                        },
                        Expr::Cmp {
                            op: CmpOp::Neq,
                            data: vec![127]
                        }
                    ],
                    &to(15001)
                ]
                .concat(),
            ]
        );
    }

    #[test]
    fn the_filter_chain_accepts_only_loopback_and_ends_in_a_counted_drop() {
        let plan = CapturePlan::new(GatewayPorts::default()).unwrap();
        let egress = &plan.table.chains[1];
        assert_eq!(egress.chain_type, ChainType::Filter);
        assert_eq!(egress.policy, Verdict::Drop);
        let last = egress.rules.last().unwrap();
        assert_eq!(
            last,
            &vec![
                Expr::CounterRef(COUNTER_OTHER.into()),
                Expr::Verdict(Verdict::Drop)
            ]
        );
        // Every accept rule is guarded by a loopback destination match.
        for r in &egress.rules {
            if r.last() == Some(&Expr::Verdict(Verdict::Accept)) {
                assert!(r.iter().any(|e| matches!(
                    e,
                    Expr::Cmp { op: CmpOp::Eq, data } if data == &[127] || data.len() == 16 && data[15] == 1
                )));
            }
        }
        // Every drop is counted, in a counter the table declares.
        for r in &egress.rules {
            if r.last() == Some(&Expr::Verdict(Verdict::Drop)) {
                let Some(Expr::CounterRef(name)) = r.iter().rev().nth(1) else {
                    panic!("uncounted drop: {r:?}");
                };
                assert!(plan.table.counters.contains(name));
            }
        }
        assert_eq!(
            plan.table.counters,
            ["drop_udp", "drop_icmp", "drop_ipv6", "drop_other"]
        );
    }

    #[test]
    fn the_plan_serialises_for_the_audit() {
        let plan = CapturePlan::new(GatewayPorts::default()).unwrap();
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["ports"]["transparent"], 15001);
        assert_eq!(json["default_route_src"], "127.0.0.1");
        assert_eq!(json["table"]["chains"][0]["chain_type"], "nat");
        assert_eq!(json["table"]["chains"][1]["rules"][5][1]["verdict"], "drop");
    }

    #[test]
    fn the_rtnetlink_requests_carry_lo_and_the_loopback_source() {
        let mut b = NlBuf::default();
        encode_loopback_up(&mut b, 7, false).unwrap();
        encode_default_route(&mut b, Ipv4Addr::LOCALHOST, 8).unwrap();
        let msgs: Vec<_> = messages(b.as_bytes()).map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].ty, RTM_NEWLINK);
        assert_eq!(msgs[0].payload, &ifinfomsg(1, 1, 1)[..]);
        assert_eq!(msgs[1].ty, RTM_NEWROUTE);
        assert_eq!(msgs[1].seq, 8);
        let rt = msgs[1].payload;
        assert_eq!(rt[0], libc::AF_INET as u8);
        assert_eq!(rt[1], 0, "dst_len 0: the default route");
        let attrs: Vec<_> = nft::attrs(&rt[12..]).map(|a| a.unwrap()).collect();
        assert_eq!(
            attrs,
            vec![
                (RTA_OIF, &1u32.to_ne_bytes()[..]),
                (RTA_PREFSRC, &[127, 0, 0, 1][..])
            ]
        );
    }

    #[test]
    fn a_namespace_with_an_interface_up_other_than_lo_is_refused() {
        let mut b = NlBuf::default();
        let m = b.begin(RTM_NEWLINK, 0, 1);
        b.put(&ifinfomsg(2, IFF_UP, 0));
        b.attr(IFLA_IFNAME, b"eth0\0").unwrap();
        b.end(m).unwrap();
        let msg = messages(b.as_bytes()).next().unwrap().unwrap();
        match check_link(msg.payload) {
            Err(NetnsError::NotIsolated { ifname, index }) => {
                assert_eq!((ifname.as_str(), index), ("eth0", 2));
            }
            other => panic!("{other:?}"),
        }
        assert!(check_link(&ifinfomsg(2, 0, 0)).is_ok(), "down is fine");
        assert!(check_link(&ifinfomsg(1, IFF_UP, 0)).is_ok(), "lo is fine");
    }

    #[test]
    fn received_sockets_are_matched_by_name_and_a_missing_one_is_an_error() {
        let fds = || {
            (0..GatewaySockets::NAMES.len())
                .map(|_| std::fs::File::open("/dev/null").unwrap().into())
                .collect::<Vec<OwnedFd>>()
        };
        let mut names: Vec<String> = GatewaySockets::NAMES
            .iter()
            .map(|s| s.to_string())
            .collect();
        names.reverse();
        assert!(GatewaySockets::from_named(&names, fds()).is_ok());
        names[0] = "http".into(); // "sock_diag" is now missing and "http" is named twice
        assert!(matches!(
            GatewaySockets::from_named(&names, fds()),
            Err(NetnsError::SocketNames { .. })
        ));
    }
}
