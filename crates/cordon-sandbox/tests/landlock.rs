//! Landlock against the real kernel. Every test applies a plan in a forked child, and shows the
//! same access succeeding in a child without the plan (or with the plan's switch off), so the
//! errno seen under Landlock is proved to be Landlock's doing. The test process is never
//! restricted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use cordon_sandbox::landlock::{self, LandlockPlan, LandlockStatus};

const APPLY_FAILED: i32 = 200;
const CHILD_PANICKED: i32 = 250;

/// Runs `attack` in a forked child, after applying `plan` when given. Returns the child's exit
/// code: 0 for success, else the errno of the call under test.
fn in_child(plan: Option<&LandlockPlan>, attack: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `apply` and the attack (allocation through glibc's fork-safe
    // malloc, raw syscalls) and leaves with `_exit`, never returning into the test harness.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = catch_unwind(AssertUnwindSafe(|| {
                if let Some(p) = plan {
                    if landlock::apply(p).is_err() {
                        return APPLY_FAILED;
                    }
                }
                attack()
            }))
            .unwrap_or(CHILD_PANICKED);
            // SAFETY: ends the child without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out-pointer.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// open(2) then close; 0 or errno.
fn open(path: &CString, flags: libc::c_int) -> i32 {
    // SAFETY: `path` is NUL-terminated; the mode is read only with O_CREAT.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return errno();
    }
    // SAFETY: closing the descriptor we just opened.
    unsafe { libc::close(fd) };
    0
}

fn plan() -> LandlockPlan {
    LandlockPlan {
        read_exec: vec![],
        read_only: vec![],
        read_write: vec![],
        allow_tcp_connect: true,
        allow_tcp_bind: true,
        scope_abstract_unix: false,
        scope_signals: false,
    }
}

/// Landlock needs ABI >= 6 for every test here (scopes); say so loudly when it is missing.
fn landlock_available(test: &str) -> bool {
    let abi = landlock::probe_abi();
    if abi < 6 {
        // Straight to stderr, past the harness's output capture: a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: kernel Landlock ABI is {abi}, these tests need 6 or more"
        );
        return false;
    }
    true
}

struct Dirs {
    _root: tempfile::TempDir,
    allowed: PathBuf,
    read_only: PathBuf,
    outside: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let mk = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("file"), b"data").unwrap();
        d
    };
    Dirs {
        allowed: mk("allowed"),
        read_only: mk("read-only"),
        outside: mk("outside"),
        _root: root,
    }
}

#[test]
fn reading_a_file_outside_the_allowed_paths_is_refused() {
    if !landlock_available("reading_a_file_outside_the_allowed_paths_is_refused") {
        return;
    }
    let d = dirs();
    let p = LandlockPlan {
        read_write: vec![d.allowed.clone()],
        ..plan()
    };
    let secret = cpath(&d.outside.join("file"));
    let read = || open(&secret, libc::O_RDONLY);
    assert_eq!(in_child(None, read), 0, "readable without Landlock");
    assert_eq!(in_child(Some(&p), read), libc::EACCES);
    let inside = cpath(&d.allowed.join("file"));
    assert_eq!(in_child(Some(&p), || open(&inside, libc::O_RDONLY)), 0);
}

#[test]
fn writing_into_a_read_only_dir_is_refused_and_a_read_write_dir_takes_writes() {
    if !landlock_available(
        "writing_into_a_read_only_dir_is_refused_and_a_read_write_dir_takes_writes",
    ) {
        return;
    }
    let d = dirs();
    let p = LandlockPlan {
        read_only: vec![d.read_only.clone()],
        read_write: vec![d.allowed.clone()],
        ..plan()
    };
    let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
    let ro_new = cpath(&d.read_only.join("new"));
    let ro_file = cpath(&d.read_only.join("file"));
    let rw_new = cpath(&d.allowed.join("new"));
    assert_eq!(
        in_child(None, || open(&ro_new, create)),
        0,
        "creatable without Landlock"
    );
    std::fs::remove_file(d.read_only.join("new")).unwrap();
    assert_eq!(in_child(Some(&p), || open(&ro_new, create)), libc::EACCES);
    assert_eq!(
        in_child(Some(&p), || open(&ro_file, libc::O_WRONLY)),
        libc::EACCES
    );
    assert_eq!(in_child(Some(&p), || open(&ro_file, libc::O_RDONLY)), 0);
    assert_eq!(in_child(Some(&p), || open(&rw_new, create)), 0);
    assert!(d.allowed.join("new").exists());
}

#[test]
fn a_read_write_file_inside_a_read_only_dir_is_writable_like_dev_null() {
    if !landlock_available("a_read_write_file_inside_a_read_only_dir_is_writable_like_dev_null") {
        return;
    }
    // The sandbox's device nodes: /dev read-only, /dev/null itself writable.
    let p = LandlockPlan {
        read_only: vec!["/dev".into()],
        read_write: vec!["/dev/null".into()],
        ..plan()
    };
    let null = cpath(Path::new("/dev/null"));
    let zero = cpath(Path::new("/dev/zero"));
    assert_eq!(
        in_child(Some(&p), || open(&null, libc::O_WRONLY | libc::O_TRUNC)),
        0
    );
    assert_eq!(
        in_child(None, || open(&zero, libc::O_WRONLY)),
        0,
        "writable without Landlock"
    );
    assert_eq!(
        in_child(Some(&p), || open(&zero, libc::O_WRONLY)),
        libc::EACCES
    );
    assert_eq!(in_child(Some(&p), || open(&zero, libc::O_RDONLY)), 0);
}

fn tcp(op: &str, addr: std::net::SocketAddrV4) -> i32 {
    // SAFETY: socket takes integers only.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return 100;
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let sa_ptr = &sa as *const libc::sockaddr_in as *const libc::sockaddr;
    // SAFETY: `sa` is a valid sockaddr_in of `len` bytes.
    let rc = unsafe {
        match op {
            "connect" => libc::connect(fd, sa_ptr, len),
            _ => libc::bind(fd, sa_ptr, len),
        }
    };
    let result = if rc == 0 { 0 } else { errno() };
    // SAFETY: closing our socket.
    unsafe { libc::close(fd) };
    result
}

#[test]
fn tcp_connect_is_refused_when_the_plan_denies_it() {
    if !landlock_available("tcp_connect_is_refused_when_the_plan_denies_it") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let connect = || tcp("connect", addr);
    assert_eq!(
        in_child(Some(&plan()), connect),
        0,
        "connect allowed by the plan"
    );
    let deny = LandlockPlan {
        allow_tcp_connect: false,
        ..plan()
    };
    assert_eq!(in_child(Some(&deny), connect), libc::EACCES);
}

#[test]
fn tcp_bind_is_refused_when_the_plan_denies_it() {
    if !landlock_available("tcp_bind_is_refused_when_the_plan_denies_it") {
        return;
    }
    let bind = || tcp("bind", "127.0.0.1:0".parse().unwrap());
    assert_eq!(in_child(Some(&plan()), bind), 0, "bind allowed by the plan");
    let deny = LandlockPlan {
        allow_tcp_bind: false,
        ..plan()
    };
    assert_eq!(in_child(Some(&deny), bind), libc::EACCES);
}

#[test]
fn connecting_to_an_abstract_unix_socket_made_outside_is_refused_when_scoped() {
    if !landlock_available(
        "connecting_to_an_abstract_unix_socket_made_outside_is_refused_when_scoped",
    ) {
        return;
    }
    use std::os::linux::net::SocketAddrExt;
    let name = format!("cordon-landlock-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    let connect = || match std::os::unix::net::UnixStream::connect_addr(&addr) {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(101),
    };
    assert_eq!(
        in_child(Some(&plan()), connect),
        0,
        "reachable without the scope"
    );
    let scoped = LandlockPlan {
        scope_abstract_unix: true,
        ..plan()
    };
    assert_eq!(in_child(Some(&scoped), connect), libc::EPERM);
}

#[test]
fn signalling_a_process_outside_is_refused_when_scoped() {
    if !landlock_available("signalling_a_process_outside_is_refused_when_scoped") {
        return;
    }
    // Signal 0 to the test process: the permission check without a signal.
    let kill_parent = || {
        // SAFETY: kill with signal 0 only checks that the signal could be sent.
        if unsafe { libc::kill(libc::getppid(), 0) } == 0 {
            0
        } else {
            errno()
        }
    };
    assert_eq!(
        in_child(Some(&plan()), kill_parent),
        0,
        "signallable without the scope"
    );
    let scoped = LandlockPlan {
        scope_signals: true,
        ..plan()
    };
    assert_eq!(in_child(Some(&scoped), kill_parent), libc::EPERM);
    // Its own children stay signallable: they are inside the domain.
    let kill_own_child = || {
        // SAFETY: fork in a single-threaded child; the grandchild pauses until killed.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: waits for a signal; the grandchild is killed below.
                unsafe { libc::pause() };
            },
            pid => {
                // SAFETY: signals and reaps our own child.
                let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
                let err = if rc == 0 { 0 } else { errno() };
                // SAFETY: reaps the grandchild.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                err
            }
        }
    };
    assert_eq!(in_child(Some(&scoped), kill_own_child), 0);
}

#[test]
fn the_status_reports_full_enforcement_and_skipped_paths() {
    if !landlock_available("the_status_reports_full_enforcement_and_skipped_paths") {
        return;
    }
    let d = dirs();
    let missing = d.outside.join("does-not-exist");
    let p = LandlockPlan {
        read_exec: vec![missing.clone()],
        read_write: vec![d.allowed.clone()],
        allow_tcp_connect: false,
        scope_signals: true,
        scope_abstract_unix: true,
        ..plan()
    };
    let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let report = || match landlock::apply(&p) {
        Ok(status) => {
            let json = serde_json::to_vec(&status).unwrap();
            tx.send(&json).map(|_| 0).unwrap_or(102)
        }
        Err(_) => 103,
    };
    assert_eq!(in_child(None, report), 0);
    let mut buf = vec![0u8; 4096];
    let n = rx.recv(&mut buf).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
    let abi = landlock::probe_abi();
    let want = LandlockStatus {
        abi,
        fs: true,
        net: true,
        scoped: true,
        fully_enforced: true,
        skipped: vec![missing],
    };
    assert_eq!(got, serde_json::to_value(&want).unwrap());
}

#[test]
fn the_probe_agrees_with_the_landlock_crate() {
    use ::landlock::{Access, AccessFs, Ruleset, RulesetAttr, ABI};
    // The crate reports the ABI it detected when it restricts; do that in a child and compare.
    let (tx, rx) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let crate_view = || {
        let status = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI::V1))
            .and_then(|r| r.create())
            .and_then(|r| r.restrict_self());
        let seen = match status.map(|s| s.landlock) {
            Ok(::landlock::LandlockStatus::Available {
                effective_abi,
                kernel_abi,
            }) => kernel_abi.map_or_else(|| effective_abi.to_string(), |k| k.to_string()),
            Ok(_) => "0".to_string(),
            Err(_) => return 104,
        };
        tx.send(seen.as_bytes()).map(|_| 0).unwrap_or(102)
    };
    assert_eq!(in_child(None, crate_view), 0);
    let mut buf = [0u8; 16];
    let n = rx.recv(&mut buf).unwrap();
    let crate_abi: u32 = std::str::from_utf8(&buf[..n]).unwrap().parse().unwrap();
    assert_eq!(landlock::probe_abi(), crate_abi);
}
