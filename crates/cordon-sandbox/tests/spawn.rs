//! `spawn` on this host's real cgroup v2 hierarchy: a sandbox given a cgroup v2 directory is born
//! in it (`clone3` with `CLONE_INTO_CGROUP`), with nothing written to `cgroup.procs`; one given
//! none starts where its parent is. Each test forks a child (spawn refuses a multi-threaded
//! caller, and the test harness has threads) that spawns the sandbox, reads the sandbox init's
//! `/proc/<pid>/cgroup`, kills and reaps it, and reports over a pipe. Needs root and a writable
//! cgroup2 mount (any controllers: none are used); otherwise the tests say SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use cordon_sandbox::plan::{self, IdMap, NetworkPlan, Rlimits, SandboxPlan, WorkspaceMount};
use cordon_sandbox::spawn;

/// The cgroup2 mount point and our own cgroup's directory in it, when both are usable.
fn own_v2_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(path.trim_start_matches('/')))
}

/// A throwaway cgroup v2 leaf, removed on drop.
struct Leaf {
    dir: PathBuf,
    fd: OwnedFd,
}

impl Leaf {
    fn new(parent: &std::path::Path, name: &str) -> Leaf {
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let fd = OwnedFd::from(std::fs::File::open(&dir).unwrap());
        Leaf { dir, fd }
    }
}

impl Drop for Leaf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The smallest plan: no mounts but the root tmpfs, no network, `true` (which the empty root
/// cannot even find: the test kills the init long before).
fn minimal_plan() -> SandboxPlan {
    SandboxPlan {
        session_id: "spawn-test".into(),
        argv: vec!["true".into()],
        env: Vec::new(),
        ids: IdMap {
            host_uid: 65534,
            host_gid: 65534,
            rootful: true,
        },
        hostname: "spawn-test".into(),
        workspace: WorkspaceMount::Bind(PathBuf::from("/nonexistent")),
        mounts: Vec::new(),
        root_size: 1 << 20,
        network: NetworkPlan::None,
        rlimits: Rlimits {
            nofile: 64,
            file_size: 1 << 20,
            core: 0,
        },
        landlock: plan::landlock_plan(&[], false, false),
        landlock_optional: true,
        seccomp: false,
        tty: false,
    }
}

/// In a forked (single-threaded) child: spawns a sandbox, optionally into `cgroup`, and
/// returns `<in_cgroup> <the init's cgroup v2 path>` as the child saw it.
fn spawn_and_report(cgroup: Option<BorrowedFd<'_>>) -> String {
    let mut fds = [0; 2];
    // SAFETY: valid out-array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two fresh descriptors.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only spawns, reads a file, kills, reaps, writes to a pipe and _exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        drop(rd);
        let plan = minimal_plan();
        let report = match spawn::spawn(&plan, None, cgroup) {
            Ok(sb) => {
                let text =
                    std::fs::read_to_string(format!("/proc/{}/cgroup", sb.pid)).unwrap_or_default();
                let v2 = text
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("?")
                    .to_string();
                // SAFETY: our own child, killed and reaped by pid.
                unsafe {
                    libc::kill(sb.pid, libc::SIGKILL);
                    libc::waitpid(sb.pid, std::ptr::null_mut(), 0);
                }
                format!("{} {v2}", sb.in_cgroup)
            }
            Err(e) => format!("error {e}"),
        };
        let mut w = std::fs::File::from(wr);
        let _ = w.write_all(report.as_bytes());
        drop(w);
        // SAFETY: _exit never returns; no atexit handlers of the test harness run here.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    let mut out = String::new();
    std::fs::File::from(rd).read_to_string(&mut out).unwrap();
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
    out
}

#[test]
fn a_sandbox_given_a_cgroup_v2_directory_is_born_in_it() {
    let Some(parent) = own_v2_dir() else {
        eprintln!("SKIPPED: needs root and a cgroup2 mount");
        return;
    };
    let leaf = Leaf::new(&parent, "cordon-spawn-into");
    let report = spawn_and_report(Some(leaf.fd.as_fd()));
    let rel = leaf
        .dir
        .strip_prefix(&parent)
        .unwrap()
        .display()
        .to_string();
    let (flag, path) = report.split_once(' ').unwrap();
    assert_eq!(flag, "true", "not cloned into the cgroup: {report}");
    assert!(
        path.ends_with(&format!("/{rel}")),
        "the init is in {path}, not in {}",
        leaf.dir.display()
    );
    // Nothing was written to cgroup.procs: the cgroup is empty again once the init is reaped.
    let procs = std::fs::read_to_string(leaf.dir.join("cgroup.procs")).unwrap();
    assert_eq!(procs, "", "the init was not reaped");
}

#[test]
fn a_sandbox_given_no_cgroup_starts_in_its_parents() {
    let Some(parent) = own_v2_dir() else {
        eprintln!("SKIPPED: needs root and a cgroup2 mount");
        return;
    };
    // The same leaf exists but is not handed over: the init must not end up there.
    let leaf = Leaf::new(&parent, "cordon-spawn-not-into");
    let report = spawn_and_report(None);
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert_eq!(report, format!("false {own}"));
    assert!(!report.contains(leaf.dir.file_name().unwrap().to_str().unwrap()));
}
