//! The seccomp filter against the real kernel. Every test runs the attack in a forked child, once
//! with the filter installed and once without, so the errno seen with the filter is proved to be
//! the filter's doing. The test process itself is never filtered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::c_long;
use std::panic::{catch_unwind, AssertUnwindSafe};

use cordon_sandbox::seccomp::{self, Action, CompiledFilter};

/// Exit codes at or above this mean the child's set-up failed, not the call under test.
const SETUP_FAILED: i32 = 200;
const CHILD_PANICKED: i32 = 250;

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The child exited with this code: 0 for success, else the errno of the call under test.
    Exited(i32),
    /// The child was killed by this signal.
    Killed(i32),
}

fn filter() -> CompiledFilter {
    seccomp::compile(&seccomp::default_plan()).unwrap()
}

/// Runs `prepare` then (when given) installs `filter`, then `attack`, in a forked child.
fn in_child(
    filter: Option<&CompiledFilter>,
    prepare: impl FnOnce() -> Result<(), i32>,
    attack: impl FnOnce() -> i32,
) -> Outcome {
    // SAFETY: the child runs only the closures (raw syscalls, glibc's fork-safe malloc) and
    // leaves with `_exit`, never returning into the test harness.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = catch_unwind(AssertUnwindSafe(|| {
                if let Err(step) = prepare() {
                    return SETUP_FAILED + step;
                }
                if let Some(f) = filter {
                    if seccomp::install(f).is_err() {
                        return SETUP_FAILED + 9;
                    }
                }
                attack()
            }))
            .unwrap_or(CHILD_PANICKED);
            // SAFETY: ends the child without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        pid => wait(pid),
    }
}

fn wait(pid: libc::pid_t) -> Outcome {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        Outcome::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Outcome::Killed(libc::WTERMSIG(status))
    } else {
        panic!("unexpected wait status {status:#x}")
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// 0 when `rc` is not -1, else errno: the child's exit code for "what did the call return".
fn code(rc: c_long) -> i32 {
    if rc == -1 {
        errno()
    } else {
        0
    }
}

/// Like [`code`] for calls that return a descriptor, which is closed.
fn fd_code(rc: c_long) -> i32 {
    if rc >= 0 {
        // SAFETY: closing the descriptor the call just returned.
        unsafe { libc::close(rc as i32) };
    }
    code(rc)
}

fn nothing() -> Result<(), i32> {
    Ok(())
}

/// A user namespace of our own (and optionally a network namespace): gives the capabilities a
/// control run needs without being root, and makes any call the filter misses harmless to the
/// host.
fn own_namespaces(flags: libc::c_int) -> impl FnOnce() -> Result<(), i32> {
    move || {
        // SAFETY: unshare takes flags only; the child is single-threaded.
        match unsafe { libc::unshare(libc::CLONE_NEWUSER | flags) } {
            0 => Ok(()),
            _ => Err(1),
        }
    }
}

fn expect_control_success(what: &str, without: Outcome) {
    assert_eq!(
        without,
        Outcome::Exited(0),
        "{what} must succeed without the filter"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Says loudly that a test did not run: straight to stderr, past the harness's output capture.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

#[test]
fn unshare_of_a_user_namespace_is_refused() {
    let attack = || {
        // SAFETY: unshare takes flags only; the child is single-threaded.
        code(unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into())
    };
    expect_control_success("unshare(CLONE_NEWUSER)", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

/// A raw `clone(flags)` whose child exits at once; returns 0 or errno.
fn raw_clone(flags: libc::c_int) -> i32 {
    let flags = (flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: with a null stack the child runs on a copy of ours, like fork, and only `_exit`s.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match pid {
        0 => unsafe {
            // SAFETY: the clone child leaves at once.
            libc::_exit(0)
        },
        -1 => errno(),
        pid => match wait(pid as libc::pid_t) {
            Outcome::Exited(0) => 0,
            _ => 255,
        },
    }
}

#[test]
fn clone_with_any_namespace_flag_is_refused() {
    let f = filter();
    for (name, flag) in [
        ("CLONE_NEWNS", libc::CLONE_NEWNS),
        ("CLONE_NEWUTS", libc::CLONE_NEWUTS),
        ("CLONE_NEWIPC", libc::CLONE_NEWIPC),
        ("CLONE_NEWUSER", libc::CLONE_NEWUSER),
        ("CLONE_NEWPID", libc::CLONE_NEWPID),
        ("CLONE_NEWNET", libc::CLONE_NEWNET),
        ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP),
    ] {
        let attack = || raw_clone(flag);
        // The other flags need CAP_SYS_ADMIN, which a user namespace of our own provides. A new
        // user namespace needs none, and cannot be nested in one whose ids are not mapped.
        let prepare = || match flag {
            libc::CLONE_NEWUSER => Ok(()),
            _ => own_namespaces(0)(),
        };
        let without = in_child(None, prepare, attack);
        assert_eq!(
            without,
            Outcome::Exited(0),
            "clone({name}) without the filter"
        );
        let with = in_child(Some(&f), prepare, attack);
        assert_eq!(
            with,
            Outcome::Exited(libc::EPERM),
            "clone({name}) with the filter"
        );
    }
}

#[test]
fn fork_threads_and_spawning_a_program_still_work() {
    let attack = || {
        if raw_clone(0) != 0 {
            return 1;
        }
        // SAFETY: fork in a single-threaded child; the grandchild only `_exit`s.
        match unsafe { libc::fork() } {
            0 => unsafe {
                // SAFETY: leaves the grandchild at once.
                libc::_exit(0)
            },
            -1 => return 2,
            pid => {
                if wait(pid) != Outcome::Exited(0) {
                    return 3;
                }
            }
        }
        // glibc creates threads with clone3 first; this passes only through the ENOSYS fallback.
        if std::thread::spawn(|| 7).join().ok() != Some(7) {
            return 4;
        }
        // posix_spawn (clone3 first too, then clone(CLONE_VM | CLONE_VFORK)) and execve.
        match std::process::Command::new("/bin/true").status() {
            Ok(s) if s.success() => 0,
            _ => 5,
        }
    };
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(0)
    );
}

/// `struct clone_args` of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

#[test]
fn clone3_reports_enosys_so_libc_falls_back_to_clone() {
    let attack = || {
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        // SAFETY: `args` is a valid clone_args of the size passed; with no stack the child runs
        // on a copy of ours, like fork, and only `_exit`s.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match pid {
            0 => unsafe {
                // SAFETY: the clone3 child leaves at once.
                libc::_exit(0)
            },
            -1 => errno(),
            pid => match wait(pid as libc::pid_t) {
                Outcome::Exited(0) => 0,
                _ => 255,
            },
        }
    };
    expect_control_success("clone3", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::ENOSYS)
    );
}

#[test]
fn ptrace_traceme_is_refused() {
    let attack = || {
        // SAFETY: PTRACE_TRACEME takes no pointers; the child then exits without a signal stop.
        code(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) })
    };
    expect_control_success("ptrace(PTRACE_TRACEME)", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

#[test]
fn bpf_map_creation_is_refused() {
    if !is_root() {
        return skip(
            "bpf_map_creation_is_refused",
            "the control run needs root for bpf(2)",
        );
    }
    let attack = || {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
        let mut attr = [0u32; 32];
        attr[..4].copy_from_slice(&[2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1]);
        // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
        fd_code(unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0, /* BPF_MAP_CREATE */
                attr.as_ptr(),
                128usize,
            )
        })
    };
    expect_control_success("bpf(BPF_MAP_CREATE)", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

#[test]
fn io_uring_setup_is_refused() {
    let attack = || {
        let mut params = [0u8; 120]; // struct io_uring_params
                                     // SAFETY: `params` is a zeroed io_uring_params the kernel may write into.
        fd_code(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) })
    };
    match in_child(None, nothing, attack) {
        Outcome::Exited(0) => {}
        other => {
            return skip(
                "io_uring_setup_is_refused",
                &format!("io_uring is unavailable without the filter ({other:?}); see kernel.io_uring_disabled"),
            )
        }
    }
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

#[test]
fn userfaultfd_is_refused() {
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    // User-mode-only needs no privilege (Linux >= 5.11), so the control run works for anyone.
    let attack = || {
        let flags = libc::O_CLOEXEC | UFFD_USER_MODE_ONLY;
        // SAFETY: userfaultfd takes flags only.
        fd_code(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })
    };
    expect_control_success("userfaultfd", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> i32 {
    // SAFETY: socket takes integers only.
    fd_code(unsafe { libc::socket(domain, ty, protocol) }.into())
}

/// Runs a socket attack in a fresh user + network namespace (CAP_NET_RAW there, no route to
/// anything) with and without the filter.
fn socket_outcomes(attack: impl Fn() -> i32) -> (Outcome, Outcome) {
    let f = filter();
    (
        in_child(None, own_namespaces(libc::CLONE_NEWNET), &attack),
        in_child(Some(&f), own_namespaces(libc::CLONE_NEWNET), &attack),
    )
}

#[test]
fn packet_sockets_are_refused() {
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    let (without, with) = socket_outcomes(|| socket(libc::AF_PACKET, libc::SOCK_RAW, eth_p_all));
    expect_control_success("socket(AF_PACKET)", without);
    assert_eq!(with, Outcome::Exited(libc::EPERM));
}

#[test]
fn raw_ip_sockets_are_refused_even_with_flag_bits_in_the_type() {
    for (domain, protocol) in [
        (libc::AF_INET, libc::IPPROTO_ICMP),
        (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    ] {
        let ty = libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        let (without, with) = socket_outcomes(|| socket(domain, ty, protocol));
        expect_control_success(&format!("socket({domain}, SOCK_RAW)"), without);
        assert_eq!(
            with,
            Outcome::Exited(libc::EPERM),
            "socket({domain}, SOCK_RAW)"
        );
    }
}

#[test]
fn netlink_sockets_are_refused_as_an_unsupported_family() {
    let (without, with) =
        socket_outcomes(|| socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE));
    expect_control_success("socket(AF_NETLINK)", without);
    assert_eq!(with, Outcome::Exited(libc::EAFNOSUPPORT));
}

#[test]
fn sctp_over_inet_is_refused_by_protocol() {
    const IPPROTO_SCTP: libc::c_int = 132;
    let (without, with) =
        socket_outcomes(|| socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_SCTP));
    // Without the filter this succeeds or fails for want of SCTP in the kernel; never EPERM.
    assert!(
        matches!(without, Outcome::Exited(e) if e != libc::EPERM),
        "{without:?}"
    );
    assert_eq!(with, Outcome::Exited(libc::EPERM));
}

#[test]
fn tcp_udp_and_unix_sockets_are_allowed() {
    let f = filter();
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    let attack = || {
        let cases = [
            (libc::AF_INET, libc::SOCK_STREAM | flags, 0),
            (libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP),
            (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP),
            (libc::AF_UNIX, libc::SOCK_SEQPACKET | flags, 0),
        ];
        for (i, (d, t, p)) in cases.into_iter().enumerate() {
            if socket(d, t, p) != 0 {
                return 100 + i as i32;
            }
        }
        let mut pair = [0; 2];
        // SAFETY: `pair` has room for the two descriptors.
        code(
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) }
                .into(),
        )
    };
    assert_eq!(
        in_child(Some(&f), own_namespaces(libc::CLONE_NEWNET), attack),
        Outcome::Exited(0)
    );
}

#[test]
fn socketpair_outside_af_unix_is_refused() {
    let attack = || {
        let mut pair = [0; 2];
        // SAFETY: `pair` has room for the two descriptors.
        code(
            unsafe { libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) }
                .into(),
        )
    };
    let (without, with) = socket_outcomes(attack);
    assert_eq!(without, Outcome::Exited(libc::EOPNOTSUPP));
    assert_eq!(with, Outcome::Exited(libc::EAFNOSUPPORT));
}

#[test]
fn keyctl_is_refused() {
    const KEYCTL_GET_KEYRING_ID: c_long = 0;
    const KEY_SPEC_USER_KEYRING: c_long = -4;
    let attack = || {
        // SAFETY: KEYCTL_GET_KEYRING_ID takes integers only.
        code(unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_GET_KEYRING_ID,
                KEY_SPEC_USER_KEYRING,
                1,
            )
        })
    };
    expect_control_success("keyctl", in_child(None, nothing, attack));
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

#[test]
fn personality_can_be_queried_but_not_used_to_disable_aslr() {
    const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
    // SAFETY: personality takes an integer only (this runs in the child).
    let persona = |p: libc::c_ulong| code(unsafe { libc::personality(p) }.into());
    let disable_aslr = || persona(ADDR_NO_RANDOMIZE);
    expect_control_success(
        "personality(ADDR_NO_RANDOMIZE)",
        in_child(None, nothing, disable_aslr),
    );
    assert_eq!(
        in_child(Some(&filter()), nothing, disable_aslr),
        Outcome::Exited(libc::EPERM)
    );
    let query = || persona(0xffff_ffff);
    assert_eq!(
        in_child(Some(&filter()), nothing, query),
        Outcome::Exited(0)
    );
}

/// Makes a fresh pty our controlling terminal; returns the slave fd in the error-free case.
fn controlling_pty() -> Result<libc::c_int, i32> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into our variables; the other arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(1);
    }
    // SAFETY: setsid and TIOCSCTTY take no pointers; a fresh session may take a terminal.
    if unsafe { libc::setsid() } == -1 || unsafe { libc::ioctl(slave, libc::TIOCSCTTY, 0) } == -1 {
        return Err(2);
    }
    Ok(slave)
}

#[test]
fn tiocsti_is_refused_even_with_high_bits_in_the_request() {
    let f = filter();
    for request in [libc::TIOCSTI, (1 << 32) | libc::TIOCSTI] {
        let attack = || {
            let slave = match controlling_pty() {
                Ok(fd) => fd,
                Err(step) => return SETUP_FAILED + step,
            };
            let byte = b'x';
            // SAFETY: TIOCSTI reads one byte from the pointer we pass.
            code(unsafe { libc::ioctl(slave, request as libc::c_ulong, &byte) }.into())
        };
        match in_child(None, nothing, attack) {
            Outcome::Exited(0) => {}
            other => {
                return skip(
                    "tiocsti_is_refused_even_with_high_bits_in_the_request",
                    &format!(
                        "TIOCSTI fails without the filter ({other:?}); see dev.tty.legacy_tiocsti"
                    ),
                )
            }
        }
        assert_eq!(
            in_child(Some(&f), nothing, attack),
            Outcome::Exited(libc::EPERM),
            "{request:#x}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn i386_getpid() -> i64 {
    let ret: i64;
    // SAFETY: `int 0x80` with eax = 20 is the i386 getpid, which takes no arguments and touches
    // no memory; the compat entry may clobber r8-r11, which are declared.
    unsafe {
        std::arch::asm!(
            "int 0x80",
            inlateout("rax") 20i64 => ret,
            lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "x86_64")]
#[test]
fn an_i386_syscall_kills_the_process() {
    // SAFETY: getpid cannot fail.
    let attack = || i32::from(i386_getpid() != i64::from(unsafe { libc::getpid() }));
    match in_child(None, nothing, attack) {
        Outcome::Exited(0) => {}
        other => {
            return skip(
                "an_i386_syscall_kills_the_process",
                &format!(
                    "int 0x80 does not work without the filter ({other:?}): no IA32 emulation"
                ),
            )
        }
    }
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Killed(libc::SIGSYS)
    );
}

#[cfg(target_arch = "x86_64")]
#[test]
fn an_x32_syscall_is_refused() {
    const X32_SYSCALL_BIT: c_long = 0x4000_0000;
    // SAFETY: x32 getpid takes no arguments.
    let attack = || code(unsafe { libc::syscall(X32_SYSCALL_BIT | libc::SYS_getpid) });
    // Without the filter: the pid, or ENOSYS on kernels built without x32. Never EPERM.
    let without = in_child(None, nothing, attack);
    assert!(
        matches!(without, Outcome::Exited(0) | Outcome::Exited(libc::ENOSYS)),
        "{without:?}"
    );
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(libc::EPERM)
    );
}

/// Every unconditional rule, end to end: the plan is recompiled with a sentinel errno that no
/// syscall returns by itself, and each denied syscall is made with all-zero arguments. This
/// proves the syscall numbers in the table are the kernel's. It runs in a fresh user namespace,
/// so a call the filter missed has no privilege over the host (and zero arguments do nothing).
#[test]
fn every_unconditional_rule_fires_in_the_kernel() {
    let sentinel = libc::ENOTRECOVERABLE;
    let plan = seccomp::default_plan().map_actions(|_| Action::Errno(sentinel));
    let f = seccomp::compile(&plan).unwrap();
    let unconditional: Vec<_> = plan.table().iter().filter(|r| r.when.is_empty()).collect();
    assert!(
        unconditional.len() > 40,
        "only {} unconditional rules",
        unconditional.len()
    );
    let attack = || {
        for (i, rule) in unconditional.iter().enumerate() {
            // SAFETY: the filter answers before the kernel runs the call; if it did not, zero
            // arguments in an unprivileged user namespace make every one of these a no-op or an
            // error (null pointers, fd 0, no capability).
            let rc = unsafe { libc::syscall(rule.nr, 0, 0, 0, 0, 0, 0) };
            if rc != -1 || errno() != sentinel {
                return 1 + i as i32;
            }
        }
        0
    };
    let got = in_child(Some(&f), own_namespaces(0), attack);
    if let Outcome::Exited(n @ 1..=199) = got {
        panic!(
            "{} was not refused by the filter",
            unconditional[n as usize - 1].syscall
        );
    }
    assert_eq!(got, Outcome::Exited(0));
}

#[test]
fn the_filter_stays_installed_across_exec() {
    let attack = || {
        // grep Seccomp: 2 (filter mode) in our own status, from an exec'd program.
        let status = std::process::Command::new("/bin/grep")
            .args(["-q", "^Seccomp:[[:space:]]*2$", "/proc/self/status"])
            .status();
        match status {
            Ok(s) if s.success() => 0,
            _ => 1,
        }
    };
    assert_eq!(
        in_child(None, nothing, attack),
        Outcome::Exited(1),
        "not filtered without install"
    );
    assert_eq!(
        in_child(Some(&filter()), nothing, attack),
        Outcome::Exited(0)
    );
}

#[test]
fn name_resolution_with_addrconfig_still_works_without_netlink() {
    // glibc's AI_ADDRCONFIG asks netlink which address families are configured; with netlink
    // refused it must fall back to assuming both, not fail (Node.js sets AI_ADDRCONFIG).
    let attack = || {
        let host = std::ffi::CString::new("localhost").unwrap();
        // SAFETY: addrinfo is plain data; all-zero is a valid "no hints" value.
        let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
        hints.ai_flags = libc::AI_ADDRCONFIG;
        hints.ai_socktype = libc::SOCK_STREAM;
        let mut res = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated host, hints and out-pointer; the result is freed below.
        let rc = unsafe { libc::getaddrinfo(host.as_ptr(), std::ptr::null(), &hints, &mut res) };
        if rc != 0 {
            return 100 + rc.unsigned_abs() as i32 % 100;
        }
        // SAFETY: `res` came from a successful getaddrinfo.
        unsafe { libc::freeaddrinfo(res) };
        0
    };
    let netlink_refused = || socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
    let f = filter();
    assert_eq!(
        in_child(Some(&f), nothing, netlink_refused),
        Outcome::Exited(libc::EAFNOSUPPORT)
    );
    assert_eq!(in_child(Some(&f), nothing, attack), Outcome::Exited(0));
}
