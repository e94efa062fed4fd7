//! Starts a sandbox: `clone` into new namespaces, id maps, cgroup, then "go".
//!
//! Guarantees: the child is created with new user, pid, mount, network, ipc and uts namespaces
//! in one `clone`, and does nothing but wait until the supervisor has written its id maps and
//! run `before_go` (which moves it into its cgroup); if the supervisor dies first, the child
//! exits without running anything. Only a single-threaded process may spawn (a `clone` of a
//! multi-threaded process could inherit a lock held by another thread); a multi-threaded caller
//! gets [`SpawnError::Threaded`] instead of undefined behaviour.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use thiserror::Error;

use crate::init::{self, InitContext};
use crate::plan::SandboxPlan;
use crate::proto::{self, ToInit};
use crate::seccomp::CompiledFilter;

/// A failed spawn step.
#[derive(Debug, Error)]
pub enum SpawnError {
    #[error("the supervisor has {0} threads; sandboxes must be spawned before any thread starts")]
    Threaded(usize),
    #[error("socketpair: {0}")]
    Socketpair(#[source] io::Error),
    #[error("clone(CLONE_NEWUSER|CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS): {0} (are unprivileged user namespaces disabled? see `cordon doctor`)")]
    Clone(#[source] io::Error),
    #[error("writing {file} for pid {pid}: {source}")]
    IdMap {
        file: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pidfd_open: {0}")]
    Pidfd(#[source] io::Error),
    #[error("sending go to the sandbox: {0}")]
    Go(#[source] io::Error),
}

/// A running sandbox, as the supervisor sees it.
#[derive(Debug)]
pub struct Sandbox {
    /// The init's pid in the supervisor's pid namespace.
    pub pid: i32,
    /// A pidfd for the init: pollable for exit, and immune to pid reuse when signalling.
    pub pidfd: OwnedFd,
    /// The supervisor's end of the channel (SOCK_SEQPACKET).
    pub chan: OwnedFd,
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Spawns the sandbox's init and lets it build its filesystem. The init then waits for
/// [`ToInit::CgroupReady`] (send it with [`send`] once the pid is in its cgroup) before it
/// starts the command.
pub fn spawn(
    plan: &SandboxPlan,
    filter: Option<&CompiledFilter>,
    workspace_fd: Option<BorrowedFd<'_>>,
) -> Result<Sandbox, SpawnError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(SpawnError::Threaded(threads));
    }
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(SpawnError::Socketpair(io::Error::last_os_error()));
    }
    // SAFETY: socketpair returned two fresh descriptors that we now own.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: a fork-style clone (no new stack): the child continues on a copy of our stack.
    // We checked above that we are single-threaded, so the child inherits no lock held by
    // another thread and may run ordinary Rust code.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (CLONE_FLAGS | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(SpawnError::Clone(io::Error::last_os_error()));
    }
    if pid == 0 {
        drop(ours);
        init::init_main(InitContext {
            plan,
            chan: theirs,
            filter,
            workspace_fd,
        });
    }
    let pid = pid as i32;
    drop(theirs);
    // From here on, any error must not leave the child behind: it is waiting for "go" and exits
    // by itself when `ours` is dropped (EOF), and we reap it.
    let reap = |e: SpawnError| {
        // SAFETY: plain syscalls on our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        e
    };
    write_id_maps(plan, pid).map_err(reap)?;
    // SAFETY: plain syscall; returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(reap(SpawnError::Pidfd(io::Error::last_os_error())));
    }
    // SAFETY: pidfd_open returned a fresh descriptor that we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let go = proto::encode(&ToInit::Go);
    // SAFETY: `go` is a valid buffer.
    let sent = unsafe {
        libc::send(
            ours.as_raw_fd(),
            go.as_ptr() as *const libc::c_void,
            go.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(reap(SpawnError::Go(io::Error::last_os_error())));
    }
    Ok(Sandbox {
        pid,
        pidfd,
        chan: ours,
    })
}

/// Sends one message to the sandbox's init.
pub fn send(sb: &Sandbox, msg: &ToInit) -> Result<(), io::Error> {
    let bytes = proto::encode(msg);
    // SAFETY: `bytes` is a valid buffer of the given length.
    let sent = unsafe {
        libc::send(
            sb.chan.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn write_id_maps(plan: &SandboxPlan, pid: i32) -> Result<(), SpawnError> {
    let write = |file: &'static str, contents: &str| {
        std::fs::write(format!("/proc/{pid}/{file}"), contents)
            .map_err(|source| SpawnError::IdMap { file, pid, source })
    };
    if !plan.ids.rootful {
        // An unprivileged process may write a gid_map only after denying setgroups.
        write("setgroups", "deny")?;
    }
    write("uid_map", &plan.ids.uid_map())?;
    write("gid_map", &plan.ids.gid_map())
}
