//! Killing the processes listed in a cgroup without ever signalling a stranger.
//!
//! Guarantees: a pid read from `cgroup.procs` is signalled only through a pidfd opened after
//! the read and confirmed by a second read of the same files: if the second read still lists
//! the pid and the pidfd's process is alive when signalled, that process is the one listed (a
//! pid is not reused while its process exists). Kernels without pidfds (before 5.3) fall back
//! to `kill(2)` on pids listed by both reads.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::fs::CgroupFs;
use super::CgroupError;

/// Polls `done` with growing pauses (50 µs up to 5 ms) until it returns true or `deadline`
/// has passed; returns whether it became true.
pub(crate) fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Every pid listed in the given `cgroup.procs` files (missing files list nothing).
pub(crate) fn listed_pids(fs: &dyn CgroupFs, procs: &[PathBuf]) -> BTreeSet<i32> {
    procs
        .iter()
        .filter_map(|path| fs.read(path).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|word| word.parse::<i32>().ok())
                .filter(|pid| *pid > 0)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_kill(fd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: a valid pidfd, SIGKILL, a null siginfo (the kernel fills in a default) and no
    // flags; no memory is shared with the kernel.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// SIGKILLs every process listed in `procs` (one round). Returns how many were listed.
/// `where_` names the cgroup in errors.
pub(crate) fn kill_listed(
    fs: &dyn CgroupFs,
    procs: &[PathBuf],
    where_: &Path,
) -> Result<usize, CgroupError> {
    let first = listed_pids(fs, procs);
    if first.is_empty() {
        return Ok(0);
    }
    let mut pidfds = Vec::with_capacity(first.len());
    let mut no_pidfd = false;
    for &pid in &first {
        match pidfd_open(pid) {
            Ok(fd) => pidfds.push((pid, fd)),
            Err(Errno::ESRCH) => {}
            Err(Errno::ENOSYS) => {
                no_pidfd = true;
                break;
            }
            Err(errno) => {
                return Err(CgroupError::Signal {
                    pid,
                    path: where_.to_path_buf(),
                    errno,
                })
            }
        }
    }
    let confirmed = listed_pids(fs, procs);
    if no_pidfd {
        for &pid in first.intersection(&confirmed) {
            // SAFETY: kill(2) takes two integers. Without pidfds this is the best available;
            // the freezer (when present) keeps listed tasks from exiting meanwhile.
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            if rc < 0 && Errno::last() != Errno::ESRCH {
                return Err(CgroupError::Signal {
                    pid,
                    path: where_.to_path_buf(),
                    errno: Errno::last(),
                });
            }
        }
        return Ok(first.len());
    }
    for (pid, fd) in &pidfds {
        if !confirmed.contains(pid) {
            continue;
        }
        match pidfd_kill(fd) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => {
                return Err(CgroupError::Signal {
                    pid: *pid,
                    path: where_.to_path_buf(),
                    errno,
                })
            }
        }
    }
    Ok(first.len())
}
