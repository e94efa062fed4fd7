//! Starts a sandbox: `clone` into new namespaces (and, on cgroup v2, into its cgroup), id maps,
//! then "go".
//!
//! Guarantees: the child is created with new user, pid, mount, network, ipc and uts namespaces
//! in one `clone`, and does nothing but wait until the supervisor has written its id maps; if
//! the supervisor dies first, the child exits without running anything. Given a cgroup v2
//! directory, the child is born in that cgroup (`clone3` with `CLONE_INTO_CGROUP`): nothing is
//! written to `cgroup.procs`, so the start never waits for the kernel's cgroup attach lock
//! (an RCU grace period, 10-20 ms, on hosts without `favordynmods`). Otherwise, or when the
//! kernel has no `CLONE_INTO_CGROUP` (before 5.7), the caller moves it into its cgroup and
//! then sends [`ToInit::CgroupReady`]; [`Sandbox::in_cgroup`] says which happened. Only a single-threaded process may spawn (a `clone` of a
//! multi-threaded process could inherit a lock held by another thread); a multi-threaded caller
//! gets [`SpawnError::Threaded`] instead of undefined behaviour.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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
    /// Born in the cgroup given to [`spawn`] (and already told so): the caller must neither
    /// move it nor send [`ToInit::CgroupReady`].
    pub in_cgroup: bool,
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

/// `clone3`'s "start in this cgroup" flag (kernel 5.7+; libc's `c_int` constant overflows).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Spawns the sandbox's init and lets it build its filesystem. With `cgroup` (a cgroup v2
/// directory) the init is born in that cgroup; otherwise (or on a kernel without
/// `CLONE_INTO_CGROUP`; see [`Sandbox::in_cgroup`]) it waits for [`ToInit::CgroupReady`] (send
/// it with [`send`] once the pid is in its cgroup) before it starts the command.
pub fn spawn(
    plan: &SandboxPlan,
    filter: Option<&CompiledFilter>,
    cgroup: Option<BorrowedFd<'_>>,
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

    // We checked above that we are single-threaded, so the child inherits no lock held by
    // another thread and may run ordinary Rust code.
    let (pid, in_cgroup) = match cgroup.map(clone_into_cgroup) {
        Some(Ok(pid)) => (pid, true),
        Some(Err(e)) if !clone3_unsupported(&e) => return Err(SpawnError::Clone(e)),
        Some(Err(_)) | None => (clone_namespaces()?, false),
    };
    if pid == 0 {
        drop(ours);
        init::init_main(InitContext {
            plan,
            chan: theirs,
            filter,
        });
    }
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
    let sandbox = Sandbox {
        pid,
        pidfd,
        chan: ours,
        in_cgroup,
    };
    send(&sandbox, &ToInit::Go).map_err(|e| reap(SpawnError::Go(e)))?;
    if in_cgroup {
        send(&sandbox, &ToInit::CgroupReady).map_err(|e| reap(SpawnError::Go(e)))?;
    }
    Ok(sandbox)
}

/// `clone(2)` into the new namespaces; returns 0 in the child.
fn clone_namespaces() -> Result<libc::pid_t, SpawnError> {
    // SAFETY: a fork-style clone (no new stack): the child continues on a copy of our stack.
    // The caller checked that the process is single-threaded.
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
    Ok(pid as libc::pid_t)
}

/// `clone3(2)` into the new namespaces and straight into the cgroup v2 directory `cgroup`;
/// returns 0 in the child.
fn clone_into_cgroup(cgroup: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    // SAFETY: clone_args is plain data; all-zero is "no option set".
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = (CLONE_FLAGS as u64) | CLONE_INTO_CGROUP;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup.as_raw_fd() as u64;
    // SAFETY: a fork-style clone3 (stack 0: the child continues on a copy of our stack, as with
    // fork); `args` is a valid clone_args of the size passed. The caller checked that the
    // process is single-threaded.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid as libc::pid_t)
}

/// `clone3` missing (before 5.3), or too old to know `CLONE_INTO_CGROUP` (before 5.7): the
/// caller falls back to `clone` and moves the child itself.
fn clone3_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::E2BIG) | Some(libc::EINVAL)
    )
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

/// Hands the sandbox its workspace volume (a detached mount; plan `WorkspaceMount::Detached`),
/// which the init waits for when it reaches `/workspace`.
pub fn send_workspace(sb: &Sandbox, volume: BorrowedFd<'_>) -> Result<(), io::Error> {
    crate::fdpass::send_fds(
        sb.chan.as_fd(),
        &proto::encode(&ToInit::WorkspaceVolume),
        &[volume],
    )
    .map_err(|e| io::Error::other(e.to_string()))
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
