//! Which sandbox process owns a client socket: the supervisor's side of process attribution.
//!
//! Guarantees:
//! - The answer comes from the kernel only: the client socket's inode — for TCP, one exact
//!   `SOCK_DIAG_BY_FAMILY` lookup by the connection's four addresses on a NETLINK_SOCK_DIAG
//!   socket made inside the sandbox's network namespace (a hash lookup; reading
//!   `/proc/PID/net/tcp` instead walks every bucket of the host's TCP hash table, milliseconds
//!   on a big host); for UDP, and for TCP when that lookup finds nothing, the namespace's
//!   socket table (`/proc/INIT/net/{tcp,tcp6,udp,udp6}`, read through the sandbox init's pid,
//!   whose view is the sandbox's namespace) — then the process holding
//!   `socket:[INODE]` among its open files (`/proc/PID/fd`), then that process's pid in the
//!   sandbox's pid namespace (`NSpid` in `/proc/PID/status`), its executable
//!   (`/proc/PID/exe`, which the process cannot rewrite) and its command line
//!   (`/proc/PID/cmdline`, which it can). Nothing the sandboxed code sends is consulted.
//! - Only processes of the sandbox are considered: those in the init's pid namespace (compared
//!   by the namespace's inode). They are listed once and listed again only when a socket's owner
//!   is not among the known ones; the process that owned the previous socket is searched first
//!   (a script making 200 requests is found at once).
//! - When a socket is held by several processes (a descriptor inherited across `fork`), the one
//!   searched first wins; a process that exited before the lookup (it connected and quit
//!   without waiting) is reported as unknown, never guessed.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use cordon_gateway::{ProcessInfo, SocketOwners, Transport};

/// How many recent owners are searched before the others.
const RECENT: usize = 4;

/// Finds socket owners among the processes of one sandbox.
#[derive(Debug)]
pub struct ProcSocketOwners {
    proc_root: PathBuf,
    /// Host pid of the sandbox's init: its `/proc/PID/net` is the sandbox's network namespace.
    init: u32,
    /// Inode of the sandbox's pid namespace.
    pid_ns: u64,
    /// NETLINK_SOCK_DIAG in the sandbox's network namespace; one request at a time.
    sock_diag: Option<Mutex<OwnedFd>>,
    known: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    /// Host pids of the sandbox, most recently matched first.
    pids: VecDeque<u32>,
}

impl ProcSocketOwners {
    /// Attribution for the sandbox whose init has host pid `init` (read under `/proc`), with
    /// a NETLINK_SOCK_DIAG socket of its network namespace when there is one.
    pub fn new(init: u32, sock_diag: Option<OwnedFd>) -> std::io::Result<ProcSocketOwners> {
        let proc_root = PathBuf::from("/proc");
        let pid_ns = fs::metadata(proc_root.join(format!("{init}/ns/pid")))?.ino();
        Ok(ProcSocketOwners {
            proc_root,
            init,
            pid_ns,
            sock_diag: sock_diag.map(Mutex::new),
            known: Mutex::new(Known::default()),
        })
    }

    /// The inode of the TCP socket `client` → `server`, by an exact sock_diag lookup:
    /// `Some(Some(inode))`, `Some(None)` when the kernel says there is no such socket, `None`
    /// when the lookup could not be made.
    fn diag_lookup(&self, client: SocketAddr, server: SocketAddr) -> Option<Option<u64>> {
        let fd = match self.sock_diag.as_ref()?.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (client, server) = (canonical(client), canonical(server));
        let request = diag_request(client, server, next_seq())?;
        // SAFETY: `request` is a valid buffer of its length; `fd` is an open netlink socket.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if usize::try_from(sent).ok() != Some(request.len()) {
            return None;
        }
        let seq = u32::from_ne_bytes(request[8..12].try_into().ok()?);
        let mut buf = [0u8; 1024];
        // The kernel answers inside `send`; anything queued with another sequence number is a
        // stale answer to an abandoned request.
        for _ in 0..8 {
            // SAFETY: `buf` is writable for its length; `fd` is an open netlink socket.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let n = usize::try_from(n).ok()?;
            match parse_diag_reply(&buf[..n], seq) {
                DiagReply::Inode(inode) => return Some(Some(inode)),
                DiagReply::Gone => return Some(None),
                DiagReply::None => return None,
                DiagReply::Stale => continue,
            }
        }
        None
    }

    /// The inode of the socket whose local address is `client`, from the namespace's tables.
    fn socket_inode(&self, transport: Transport, client: SocketAddr) -> Option<u64> {
        let base = match transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        let client = canonical(client);
        let tables: &[&str] = match client.ip() {
            // An IPv4 socket may also be an IPv6 socket bound to a mapped address.
            IpAddr::V4(_) => &["", "6"],
            IpAddr::V6(_) => &["6"],
        };
        tables.iter().find_map(|suffix| {
            let path = self
                .proc_root
                .join(format!("{}/net/{base}{suffix}", self.init));
            let file = fs::File::open(path).ok()?;
            BufReader::new(file)
                .lines()
                .skip(1)
                .map_while(Result::ok)
                .find_map(|line| {
                    let (local, inode) = parse_socket_line(&line)?;
                    (canonical(local) == client && inode != 0).then_some(inode)
                })
        })
    }

    /// Whether host pid `pid` is in the sandbox's pid namespace (a remembered pid may have
    /// exited and been reused by a process outside it).
    fn in_sandbox(&self, pid: u32) -> bool {
        fs::metadata(self.proc_root.join(format!("{pid}/ns/pid")))
            .is_ok_and(|m| m.ino() == self.pid_ns)
    }

    /// Whether host pid `pid` holds `socket:[inode]`.
    fn holds(&self, pid: u32, inode: u64) -> bool {
        let wanted = format!("socket:[{inode}]");
        let Ok(dir) = fs::read_dir(self.proc_root.join(format!("{pid}/fd"))) else {
            return false;
        };
        dir.map_while(Result::ok).any(|entry| {
            fs::read_link(entry.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        })
    }

    /// Host pids of every process in the sandbox's pid namespace.
    fn list_sandbox_pids(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return Vec::new();
        };
        dir.map_while(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| self.in_sandbox(pid))
            .collect()
    }

    /// What the sandbox sees of host pid `pid`.
    fn describe(&self, pid: u32) -> Option<ProcessInfo> {
        let dir = self.proc_root.join(pid.to_string());
        let status = fs::read_to_string(dir.join("status")).ok()?;
        let ns_pid = parse_ns_pid(&status)?;
        let exe = fs::read_link(dir.join("exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default();
        Some(ProcessInfo {
            pid: ns_pid,
            exe,
            cmdline,
        })
    }

    fn find_holder(&self, inode: u64) -> Option<u32> {
        let mut known = match self.known.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let hit = known
            .pids
            .iter()
            .position(|&pid| self.holds(pid, inode) && self.in_sandbox(pid));
        let pid = match hit {
            Some(i) => known.pids.remove(i)?,
            None => {
                let fresh = self.list_sandbox_pids();
                let pid = fresh.iter().copied().find(|&pid| self.holds(pid, inode))?;
                // Keep the order of recent owners, then the rest as listed.
                let recent: Vec<u32> = known
                    .pids
                    .iter()
                    .take(RECENT)
                    .copied()
                    .filter(|p| fresh.contains(p))
                    .collect();
                known.pids = recent.into_iter().collect();
                for p in fresh {
                    if !known.pids.contains(&p) {
                        known.pids.push_back(p);
                    }
                }
                known.pids.retain(|&p| p != pid);
                pid
            }
        };
        known.pids.push_front(pid);
        Some(pid)
    }
}

impl SocketOwners for ProcSocketOwners {
    fn owner(
        &self,
        transport: Transport,
        client: SocketAddr,
        server: Option<SocketAddr>,
    ) -> Option<ProcessInfo> {
        let exact = match (transport, server) {
            (Transport::Tcp, Some(server)) => self.diag_lookup(client, server),
            _ => None,
        };
        let inode = match exact {
            Some(Some(inode)) => inode,
            // The kernel looked it up by its four addresses: the socket is gone (the client
            // closed it). Walking the table would find nothing either, slowly.
            Some(None) => return None,
            None => self.socket_inode(transport, client)?,
        };
        let pid = self.find_holder(inode)?;
        self.describe(pid)
    }
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

fn next_seq() -> u32 {
    SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`.
const DIAG_REQ: usize = 56;
/// Offset of `idiag_inode` in `struct inet_diag_msg` (72 bytes in all).
const DIAG_MSG_INODE: usize = 68;

/// One exact-match request (no `NLM_F_DUMP`) for the TCP socket whose local address is `client`
/// and whose peer is `server`: `struct nlmsghdr` + `struct inet_diag_req_v2` with the four
/// addresses in `id` (ports and addresses in network byte order) and no cookie. `None` when
/// the two addresses are of different families.
fn diag_request(client: SocketAddr, server: SocketAddr, seq: u32) -> Option<Vec<u8>> {
    let family = match (client.ip(), server.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        _ => return None,
    };
    let addr16 = |ip: IpAddr| -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    let len = NLMSG_HDR + DIAG_REQ;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states (all).
    m.push(family as u8);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0);
    m.push(0);
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    // inet_diag_sockid: sport, dport, src, dst, if, cookie (INET_DIAG_NOCOOKIE twice).
    m.extend_from_slice(&client.port().to_be_bytes());
    m.extend_from_slice(&server.port().to_be_bytes());
    m.extend_from_slice(&addr16(client.ip()));
    m.extend_from_slice(&addr16(server.ip()));
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    Some(m)
}

enum DiagReply {
    Inode(u64),
    /// The kernel answered this request: no such socket.
    Gone,
    /// The kernel answered with another error, or the reply made no sense.
    None,
    /// An answer to another request.
    Stale,
}

fn parse_diag_reply(buf: &[u8], seq: u32) -> DiagReply {
    let word = |at: usize| -> Option<u32> {
        buf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let (Some(_len), Some(kind_flags), Some(got_seq)) = (word(0), word(4), word(8)) else {
        return DiagReply::None;
    };
    if got_seq != seq {
        return DiagReply::Stale;
    }
    let kind = (kind_flags & 0xffff) as u16;
    if kind == libc::NLMSG_ERROR as u16 {
        // struct nlmsgerr: a negative errno, then the request.
        let errno = word(NLMSG_HDR).map(|e| e as i32);
        return if errno == Some(-libc::ENOENT) {
            DiagReply::Gone
        } else {
            DiagReply::None
        };
    }
    if kind != SOCK_DIAG_BY_FAMILY {
        return DiagReply::None;
    }
    match word(NLMSG_HDR + DIAG_MSG_INODE) {
        Some(inode) if inode != 0 => DiagReply::Inode(u64::from(inode)),
        _ => DiagReply::None,
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// `(local address, inode)` of one line of `/proc/net/{tcp,udp}{,6}`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …`,
/// addresses as the kernel's in-memory words in hex (so byte order is the host's) and the port in
/// hex.
fn parse_socket_line(line: &str) -> Option<(SocketAddr, u64)> {
    let mut fields = line.split_whitespace();
    let _slot = fields.next()?;
    let local = fields.next()?;
    let inode = fields.nth(7)?.parse().ok()?;
    let (addr, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), inode))
}

/// The innermost pid of `NSpid:` in a `/proc/PID/status` (the pid in the process's own pid
/// namespace).
fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// `/proc/PID/cmdline`: NUL-separated arguments (the last one NUL-terminated).
fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::path::Path;
    use std::process::{Command, Stdio};

    #[test]
    fn socket_lines_parse_to_the_local_address_and_inode() {
        let v4 = "   3: 0100007F:0CEA 0100007F:D2A4 01 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000000000000000 20 4 30 10 -1";
        let (addr, inode) = parse_socket_line(v4).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(addr, "127.0.0.1:3306".parse().unwrap());
        }
        assert_eq!(inode, 123456);
        let v6 = "   0: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 98765 2 0000000000000000 0";
        let (addr, inode) = parse_socket_line(v6).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(addr, "[::1]:53".parse().unwrap());
        }
        assert_eq!(inode, 98765);
        assert_eq!(parse_socket_line("  sl  local_address rem_address"), None);
        assert_eq!(parse_socket_line("0: zz:0035 0:0 0 0 0 0 0 0 1"), None);
    }

    #[test]
    fn ns_pid_is_the_innermost_and_cmdline_splits_at_nul() {
        assert_eq!(
            parse_ns_pid("Name:\tcurl\nNSpid:\t48211\t7\nNSpgid:\t1\n"),
            Some(7)
        );
        assert_eq!(parse_ns_pid("NSpid:\t12\n"), Some(12));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
        assert_eq!(
            parse_cmdline(b"curl\0-s\0\0x y\0"),
            vec!["curl", "-s", "", "x y"]
        );
        assert_eq!(parse_cmdline(b""), Vec::<String>::new());
        assert_eq!(
            canonical("[::ffff:127.0.0.1]:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
    }

    /// A child that connects to `to` and reports its local port, then waits for stdin to close.
    fn connector(argv0: &str, to: SocketAddr, name: Option<&str>) -> (std::process::Child, u16) {
        let script = format!(
            "import socket, sys, ctypes\n\
             {}\
             s = socket.create_connection(('{}', {}))\n\
             print(s.getsockname()[1], flush=True)\n\
             sys.stdin.read()\n",
            name.map(|n| format!(
                "ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b'{n}'), 0, 0, 0)\n"
            ))
            .unwrap_or_default(),
            to.ip(),
            to.port()
        );
        let mut child = Command::new("bash")
            .args([
                "-c",
                &format!("exec -a {argv0} /usr/bin/python3 -c \"$0\" extra-arg"),
            ])
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut line = String::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(char::from(byte[0]));
        }
        (child, line.trim().parse().unwrap())
    }

    /// A NETLINK_SOCK_DIAG socket in the test's own network namespace.
    fn diag_socket() -> OwnedFd {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        assert!(
            fd >= 0,
            "socket(NETLINK_SOCK_DIAG): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn the_owner_of_a_real_connection_is_found_by_exe_whatever_argv0_and_comm_say() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // The test process's own namespaces stand in for the sandbox's: once with the exact
        // sock_diag lookup, once with the /proc table only.
        let with_diag = ProcSocketOwners::new(std::process::id(), Some(diag_socket())).unwrap();
        let proc_only = ProcSocketOwners::new(std::process::id(), None).unwrap();
        let (mut honest, honest_port) = connector("python3", addr, None);
        let (mut liar, liar_port) = connector("/usr/bin/pip", addr, Some("pip"));
        let _accepted: Vec<_> = (0..2).map(|_| listener.accept().unwrap()).collect();
        let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
        let honest_addr = SocketAddr::new(addr.ip(), honest_port);
        let liar_addr = SocketAddr::new(addr.ip(), liar_port);

        // The exact lookup finds the socket by itself (no /proc table needed), and knows when
        // there is none.
        assert!(matches!(
            with_diag.diag_lookup(honest_addr, addr),
            Some(Some(_))
        ));
        assert_eq!(with_diag.diag_lookup(honest_addr, liar_addr), Some(None));
        assert_eq!(
            with_diag.owner(Transport::Tcp, honest_addr, Some(liar_addr)),
            None
        );
        for (owners, server) in [
            (&with_diag, Some(addr)),
            // Without a server address, or without sock_diag, the table is read.
            (&with_diag, None),
            (&proc_only, Some(addr)),
            (&proc_only, None),
        ] {
            let found = owners.owner(Transport::Tcp, honest_addr, server).unwrap();
            assert_eq!(found.pid, honest.id());
            assert_eq!(Path::new(&found.exe), python, "{found:?}");
            assert_eq!(found.cmdline[0], "python3");
            assert_eq!(found.cmdline.last().unwrap(), "extra-arg");

            let lied = owners.owner(Transport::Tcp, liar_addr, server).unwrap();
            assert_eq!(lied.pid, liar.id());
            // argv[0] and the thread name say pip; the executable is still python.
            assert_eq!(lied.cmdline[0], "/usr/bin/pip");
            assert_eq!(Path::new(&lied.exe), python, "{lied:?}");
        }
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", liar.id())).unwrap();
        assert_eq!(comm.trim(), "pip");

        // Nobody owns a port no socket has.
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free = unused.local_addr().unwrap();
        drop(unused);
        assert_eq!(with_diag.owner(Transport::Tcp, free, Some(addr)), None);
        for child in [&mut honest, &mut liar] {
            drop(child.stdin.take());
            child.wait().unwrap();
        }
    }

    #[test]
    fn a_diag_request_is_the_kernel_layout_and_replies_are_matched_by_sequence() {
        let r = diag_request(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:3128".parse().unwrap(),
            7,
        )
        .unwrap();
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], libc::IPPROTO_TCP as u8);
        assert_eq!(&r[24..26], &40000u16.to_be_bytes());
        assert_eq!(&r[26..28], &3128u16.to_be_bytes());
        assert_eq!(&r[28..32], &[127, 0, 0, 1]);
        assert_eq!(&r[44..48], &[127, 0, 0, 1]);
        assert!(diag_request(
            "127.0.0.1:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            1
        )
        .is_none());
        let mut reply = vec![0u8; 16 + 72];
        reply[4..6].copy_from_slice(&20u16.to_ne_bytes());
        reply[8..12].copy_from_slice(&7u32.to_ne_bytes());
        reply[16 + 68..16 + 72].copy_from_slice(&4242u32.to_ne_bytes());
        assert!(matches!(
            parse_diag_reply(&reply, 7),
            DiagReply::Inode(4242)
        ));
        assert!(matches!(parse_diag_reply(&reply, 8), DiagReply::Stale));
        reply[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        reply[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert!(matches!(parse_diag_reply(&reply, 7), DiagReply::Gone));
        reply[16..20].copy_from_slice(&(-libc::EINVAL).to_ne_bytes());
        assert!(matches!(parse_diag_reply(&reply, 7), DiagReply::None));
    }

    #[test]
    fn the_owner_of_a_udp_socket_is_found_by_its_source_address() {
        let owners = ProcSocketOwners::new(std::process::id(), Some(diag_socket())).unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let found = owners
            .owner(Transport::Udp, socket.local_addr().unwrap(), None)
            .unwrap();
        assert_eq!(found.pid, std::process::id());
        assert_eq!(
            found.exe,
            std::env::current_exe().unwrap().to_string_lossy()
        );
    }
}
