//! The sandbox's init: pid 1 of the new pid namespace.
//!
//! Guarantees: user code runs only after every layer of the plan is applied, in this order:
//! namespaces (already entered by `clone`) → cgroup namespace → mounts and `pivot_root` →
//! hostname → network → (in the command's process) session, rlimits, capabilities dropped and
//! `no_new_privs`, Landlock, fds closed, seccomp last → `exec`. If any required step fails, the
//! command never runs and the supervisor gets a `SetupFailed` naming the layer. The init
//! itself drops every capability, becomes non-dumpable and takes the same seccomp filter once
//! the command is started; it reaps every orphan, forwards signals to the command's process
//! group, and exits when the command does — at which point the kernel kills everything left in
//! the pid namespace, double-forked daemons included.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::fdpass;
use crate::landlock;
use crate::mounts::{self, Sources, WorkspaceAttach};
use crate::plan::{NetworkPlan, SandboxPlan, WorkspaceMount};
use crate::privs;
use crate::proto::{self, ExitStatus, ToInit, ToSupervisor};
use crate::seccomp::{self, CompiledFilter};

/// What the init needs besides the plan.
pub struct InitContext<'a> {
    pub plan: &'a SandboxPlan,
    /// The init's end of the supervisor channel.
    pub chan: OwnedFd,
    /// The seccomp filter, compiled by the supervisor before `clone`.
    pub filter: Option<&'a CompiledFilter>,
}

/// Set-up milestones, reported with `Applied` (the init's marks are inherited by the command's
/// process through `fork`).
static MARKS: std::sync::Mutex<Vec<(&'static str, u64)>> = std::sync::Mutex::new(Vec::new());

fn mark(name: &'static str) {
    if let Ok(mut m) = MARKS.lock() {
        m.push((name, proto::monotonic_ns()));
    }
}

struct SetupError {
    layer: &'static str,
    message: String,
}

fn fail<E: std::fmt::Display>(layer: &'static str) -> impl FnOnce(E) -> SetupError {
    move |e| SetupError {
        layer,
        message: e.to_string(),
    }
}

/// Sends one message; errors are ignored (the supervisor may already be gone, and then the
/// parent-death signal ends us anyway).
fn send(chan: BorrowedFd<'_>, msg: &ToSupervisor) {
    let bytes = proto::encode(msg);
    // SAFETY: `bytes` is a valid buffer of the given length; MSG_NOSIGNAL avoids SIGPIPE.
    unsafe {
        libc::send(
            chan.as_raw_fd(),
            bytes.as_ptr() as *const libc::c_void,
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
}

/// Runs the init and never returns.
pub fn init_main(ctx: InitContext<'_>) -> ! {
    // A clone of the supervisor still shows the supervisor's command line (host paths, flags)
    // in /proc/1/cmdline, which the sandboxed code can read.
    crate::proctitle::set(INIT_TITLE.as_bytes());
    crate::proctitle::set_name(INIT_TITLE);
    let code = match run(&ctx) {
        Ok(code) => code,
        Err(e) => {
            send(
                ctx.chan.as_fd(),
                &ToSupervisor::SetupFailed {
                    layer: e.layer.to_string(),
                    message: e.message,
                },
            );
            125
        }
    };
    // SAFETY: _exit never returns and runs no atexit handlers (we are a clone of the supervisor).
    unsafe { libc::_exit(code) }
}

/// What the init's `/proc/PID/cmdline` and `comm` say, inside the sandbox and on the host.
pub const INIT_TITLE: &str = "cordon-init";

/// Messages from the supervisor; "cgroup ready" may arrive before an expected reply and is
/// remembered.
#[derive(Default)]
struct Inbox {
    cgroup_ready: bool,
}

impl Inbox {
    /// Waits for `expected` and returns the descriptors that came with it.
    fn wait_for(
        &mut self,
        chan: BorrowedFd<'_>,
        expected: ToInit,
    ) -> Result<Vec<OwnedFd>, SetupError> {
        if expected == ToInit::CgroupReady && self.cgroup_ready {
            return Ok(Vec::new());
        }
        let gone = || SetupError {
            layer: "supervisor",
            message: "the supervisor went away before the sandbox was ready".into(),
        };
        loop {
            let (payload, fds) = fdpass::recv_fds(chan, 64, 1).map_err(|_| gone())?;
            if payload.is_empty() {
                return Err(gone());
            }
            match proto::decode::<ToInit>(&payload) {
                Some(m) if m == expected => return Ok(fds),
                Some(ToInit::CgroupReady) if fds.is_empty() => self.cgroup_ready = true,
                _ => {
                    return Err(SetupError {
                        layer: "supervisor",
                        message: "unexpected message from the supervisor".into(),
                    })
                }
            }
        }
    }

    /// Waits for the workspace volume (exactly one descriptor).
    fn workspace_volume(&mut self, chan: BorrowedFd<'_>) -> Result<OwnedFd, String> {
        let mut fds = self
            .wait_for(chan, ToInit::WorkspaceVolume)
            .map_err(|e| e.message)?;
        match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => Ok(fd),
            _ => Err("the workspace volume message carried no descriptor".into()),
        }
    }
}

fn run(ctx: &InitContext<'_>) -> Result<i32, SetupError> {
    let plan = ctx.plan;
    let chan = ctx.chan.as_fd();
    // SAFETY: plain prctl; if the supervisor dies we die with it.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // Our own process group: the terminal's Ctrl-C reaches the supervisor, which forwards it
    // once, instead of reaching both of us.
    // SAFETY: plain syscall on our own process.
    unsafe { libc::setpgid(0, 0) };
    let mut inbox = Inbox::default();
    inbox.wait_for(chan, ToInit::Go)?;
    mark("init: go received");

    privs::become_sandbox_user(plan.ids.rootful).map_err(fail("user-namespace"))?;
    // Changing credentials clears the parent-death signal: set it again. If the supervisor is
    // already gone, the channel reads EOF below and we exit before running anything.
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };

    let sources = Sources::open(&plan.mounts, &plan.workspace).map_err(fail("mounts"))?;
    let mut receive_volume = || inbox.workspace_volume(chan);
    let attach = match &plan.workspace {
        WorkspaceMount::Bind(_) => WorkspaceAttach::Bind,
        WorkspaceMount::Detached => WorkspaceAttach::Detached(&mut receive_volume),
        WorkspaceMount::Tmpfs {
            size_bytes,
            nr_inodes,
        } => WorkspaceAttach::Tmpfs {
            size_bytes: *size_bytes,
            nr_inodes: *nr_inodes,
        },
    };
    let handed_over =
        mounts::apply(&plan.mounts, &sources, plan.root_size, attach).map_err(fail("mounts"))?;
    drop(sources);
    mark("init: mounts and pivot_root");
    if let Some(root) = handed_over {
        // The supervisor fills the tmpfs from the host directory; the command starts after.
        fdpass::send_fds(
            chan,
            &proto::encode(&ToSupervisor::WorkspaceRoot),
            &[root.as_fd()],
        )
        .map_err(fail("workspace"))?;
        drop(root);
        inbox.wait_for(chan, ToInit::WorkspaceReady)?;
    }
    nix::unistd::sethostname(&plan.hostname).map_err(fail("hostname"))?;

    match plan.network {
        NetworkPlan::None => crate::netns::apply_none().map_err(fail("network"))?,
        NetworkPlan::Gateway => {
            // The gateway's sockets are made here, inside the sandbox's network namespace, and
            // handed to the supervisor: the sandbox can reach them and nothing else.
            let capture = crate::netns::CapturePlan::new(crate::netns::GatewayPorts::default())
                .map_err(fail("network"))?;
            let sockets = crate::netns::apply_gateway(&capture).map_err(fail("network"))?;
            let names = crate::netns::GatewaySockets::NAMES
                .iter()
                .map(|n| n.to_string())
                .collect();
            fdpass::send_fds(
                chan,
                &proto::encode(&ToSupervisor::GatewaySockets { names }),
                &sockets.as_fds(),
            )
            .map_err(fail("network"))?;
            drop(sockets);
        }
    }

    mark("init: hostname and network");
    // The supervisor moves us into the session's cgroup meanwhile; wait for it, then make that
    // cgroup our root: from here on, nothing outside it is visible.
    inbox.wait_for(chan, ToInit::CgroupReady)?;
    // SAFETY: plain syscall with an integer argument.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } < 0 {
        return Err(fail("cgroup-namespace")(io::Error::last_os_error()));
    }
    mark("init: in the session cgroup");
    let all = block_all_signals();
    let child = start_command(ctx).map_err(fail("fork"))?;

    privs::drop_everything().map_err(fail("capabilities"))?;
    privs::set_non_dumpable().map_err(fail("capabilities"))?;
    if let Some(filter) = ctx.filter {
        seccomp::install(filter).map_err(fail("seccomp"))?;
    }
    Ok(supervise(chan, child, &all))
}

/// Starts the command's process with `clone(CLONE_VM | CLONE_VFORK)` on a stack of its own, as
/// `posix_spawn` does: the child borrows the init's memory until it execs or exits instead of
/// getting a copy of the init's page tables (a `fork` of the init, a copy of the supervisor,
/// took 0.4 ms), and the init sleeps until then. What the child changes before `exec` is state
/// it does not share with the init: credentials, capabilities, Landlock and seccomp (per task),
/// rlimits, session and process group (per process), its working directory and descriptor
/// table (no `CLONE_FS`, no `CLONE_FILES`), its signal mask. What it writes to memory (the
/// set-up marks, the buffers it allocates) it writes while the init sleeps, and the init never
/// looks at it. Returns once the command runs (or has failed to).
fn start_command(ctx: &InitContext<'_>) -> io::Result<libc::pid_t> {
    const STACK_SIZE: usize = 1 << 20;
    extern "C" fn entry(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `InitContext` the init passed to clone below; the init sleeps
        // (CLONE_VFORK) and keeps it alive until this process has exec'd or exited, which is
        // all this reference is used for.
        let ctx = unsafe { &*(arg as *const InitContext<'static>) };
        command_main(ctx)
    }
    // SAFETY: a fresh anonymous private mapping; the result is checked below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // The stack grows down from the (16-byte aligned) end of the mapping.
    let top = (stack as usize + STACK_SIZE) & !15;
    // SAFETY: `entry` never returns into the init's frames: it runs on its own stack and ends in
    // exec or _exit. CLONE_VFORK keeps the init asleep (and `ctx` and the stack alive) until
    // then; the init is single-threaded, so no other thread runs on the shared memory meanwhile.
    let pid = unsafe {
        libc::clone(
            entry,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            ctx as *const InitContext<'_> as *mut libc::c_void,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: the child has exec'd (it has a new address space) or exited: nothing uses the
    // stack any more.
    unsafe { libc::munmap(stack, STACK_SIZE) };
    if pid < 0 {
        return Err(err);
    }
    Ok(pid)
}

fn block_all_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigfillset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Reaps children and forwards signals until the command's main process exits.
fn supervise(chan: BorrowedFd<'_>, child: libc::pid_t, set: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: siginfo_t is plain data that sigwaitinfo fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `info` are valid.
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        if sig < 0 {
            continue;
        }
        if sig == libc::SIGCHLD {
            loop {
                let mut status = 0;
                // SAFETY: `status` is a valid out-pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if pid == child {
                    let st = if libc::WIFSIGNALED(status) {
                        ExitStatus::Signal(libc::WTERMSIG(status))
                    } else {
                        ExitStatus::Code(libc::WEXITSTATUS(status))
                    };
                    send(
                        chan,
                        &ToSupervisor::Exited {
                            status: st,
                            full: full_mounts(),
                            lingering: lingering(),
                        },
                    );
                    return 0;
                }
            }
        } else {
            // Forward to the command's process group (it leads its own session/group).
            // SAFETY: plain syscall.
            unsafe { libc::kill(-child, sig) };
        }
    }
}

/// Live processes in the sandbox's pid namespace besides the init (pid 1): numeric entries of
/// its own /proc whose state is not zombie (`Z`) or dead (`X`).
fn lingering() -> u32 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == 1 {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if !matches!(state, Some('Z' | 'X') | None) {
            n += 1;
        }
    }
    n
}

/// The writable mounts that are full: less than 2% (at least 1 MiB) left. ext4 refuses writes
/// with a few hundred KiB still free (kept back for its own metadata and delayed allocation),
/// so "full" cannot mean exactly zero.
fn full_mounts() -> Vec<String> {
    ["/workspace", "/tmp", "/dev/shm"]
        .iter()
        .filter(|m| {
            matches!(nix::sys::statvfs::statvfs(**m), Ok(s)
            if s.blocks() > 0 && {
                let avail = s.blocks_available() * s.fragment_size();
                let total = s.blocks() * s.fragment_size();
                avail < (1024 * 1024).max(total / 50)
            })
        })
        .map(|m| m.to_string())
        .collect()
}

/// The command's process: finishes the per-process layers and execs. Never returns.
fn command_main(ctx: &InitContext<'_>) -> ! {
    let chan = ctx.chan.as_fd();
    let (code, msg) = match prepare_command(ctx) {
        Ok(()) => exec_command(ctx.plan),
        Err(e) => (
            125,
            ToSupervisor::SetupFailed {
                layer: e.layer.to_string(),
                message: e.message,
            },
        ),
    };
    send(chan, &msg);
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(code) }
}

fn prepare_command(ctx: &InitContext<'_>) -> Result<(), SetupError> {
    let plan = ctx.plan;
    // SAFETY: sigset_t is plain data; an empty mask unblocks everything the init blocked.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    if plan.tty {
        // Own process group, in the foreground of the caller's terminal, so that job control
        // and Ctrl-C reach the command; TIOCSTI stays blocked by seccomp.
        // SAFETY: plain syscalls on our own process.
        unsafe {
            libc::setpgid(0, 0);
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpid());
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
        }
    } else if nix::unistd::setsid().is_err() {
        return Err(fail("session")(io::Error::last_os_error()));
    }
    mark("command: forked");
    std::env::set_current_dir("/workspace").map_err(fail("workspace"))?;
    privs::apply_rlimits(&plan.rlimits).map_err(fail("rlimits"))?;
    privs::drop_everything().map_err(fail("capabilities"))?;

    let status = match landlock::apply(&plan.landlock) {
        Ok(s) => s,
        Err(e) if plan.landlock_optional => {
            let _ = e;
            landlock::LandlockStatus::default()
        }
        Err(e) => return Err(fail("landlock")(e)),
    };
    mark("command: rlimits, capabilities, landlock");
    // Every descriptor but 0, 1 and 2 closes at exec (the channel stays usable until then to
    // report an exec failure).
    // SAFETY: plain syscall with integer arguments.
    if unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } < 0
    {
        return Err(fail("fds")(io::Error::last_os_error()));
    }
    if let Some(filter) = ctx.filter {
        if filter.notifies() {
            // The listener decides the denied syscalls: it goes to the supervisor and our copy
            // is closed here, before any untrusted code runs (it is close-on-exec as well).
            let listener = seccomp::install_with_listener(filter).map_err(fail("seccomp"))?;
            fdpass::send_fds(
                ctx.chan.as_fd(),
                &proto::encode(&ToSupervisor::SeccompListener),
                &[listener.as_fd()],
            )
            .map_err(fail("seccomp"))?;
            drop(listener);
        } else {
            seccomp::install(filter).map_err(fail("seccomp"))?;
        }
    }
    send(
        ctx.chan.as_fd(),
        &ToSupervisor::Applied {
            landlock_abi: status.abi,
            landlock_enforced: status.fully_enforced,
            seccomp: ctx.filter.is_some(),
            no_new_privs: true,
            marks: {
                mark("command: fds closed, seccomp installed");
                MARKS
                    .lock()
                    .map(|m| m.iter().map(|(n, t)| (n.to_string(), *t)).collect())
                    .unwrap_or_default()
            },
        },
    );
    Ok(())
}

/// Looks the command up in the sandbox's `PATH` and execs it. Returns only on failure, with
/// the exit code (127 not found, 126 cannot execute) and the message for the supervisor.
fn exec_command(plan: &SandboxPlan) -> (i32, ToSupervisor) {
    let to_c = |s: &str| CString::new(s.as_bytes()).unwrap_or_default();
    let argv: Vec<CString> = plan.argv.iter().map(|a| to_c(a)).collect();
    let envp: Vec<CString> = plan
        .env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect();
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_p.push(std::ptr::null());

    let name = plan.argv.first().map(String::as_str).unwrap_or("");
    let path_var = plan
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(crate::plan::SANDBOX_PATH);
    let candidates: Vec<String> = if name.contains('/') {
        vec![name.to_string()]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{name}"))
            .collect()
    };
    let mut errno = libc::ENOENT;
    for cand in candidates {
        let c = to_c(&cand);
        // SAFETY: argv/envp are NUL-terminated arrays of valid C strings kept alive above.
        unsafe { libc::execve(c.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOENT);
        // Remember the most telling error, as execvp does: EACCES beats ENOENT.
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    let code = if errno == libc::ENOENT { 127 } else { 126 };
    let message = if name.is_empty() {
        "no command given".to_string()
    } else if errno == libc::ENOENT {
        format!("{name}: command not found in the sandbox")
    } else {
        format!("{name}: {}", io::Error::from_raw_os_error(errno))
    };
    (code, ToSupervisor::ExecFailed { errno, message })
}
