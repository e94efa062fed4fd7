//! The last of a session's teardown, off the critical path: once the session's result and exit
//! status are final, releasing the workspace volume (ext4 unmount and loop device detach, about
//! 1 ms) and sweeping other sessions' stale cgroups run in a detached child while cordon exits.
//!
//! Guarantees: [`hand_off`] is called only after every process of the sandbox is reaped, the
//! session's cgroup is removed and a host workspace directory is committed, so the child only
//! releases kernel objects that nothing can reach any more. The child holds none of the
//! caller's terminals or pipes (its 0, 1 and 2 are `/dev/null`, in a session of its own), so
//! `$(cordon run …)` and test harnesses see end-of-file when cordon exits, and its command line
//! reads `cordon: releasing workspace`, so nothing mistakes it for the session's command. If it
//! is killed, the kernel still unmounts the volume when its descriptor closes and the loop device
//! clears itself (autoclear); the next session's stale cleanup removes anything else. Only a
//! single-threaded cordon forks; otherwise, or if `fork` fails, the work runs in-process.

/// What the child's command line becomes.
const TITLE: &[u8] = b"cordon: releasing workspace";

/// Runs `work` in a detached child and returns at once, or runs it here when a child cannot be
/// made safely.
pub fn hand_off(work: impl FnOnce()) {
    if !single_threaded() {
        work();
        return;
    }
    // The title is set before the fork, so the child never shows the session's command line,
    // not even for the microseconds after its birth; the parent is about to exit.
    cordon_sandbox::proctitle::set(TITLE);
    // SAFETY: the process is single-threaded (checked above), so the child inherits no lock
    // held by another thread; it runs the work and `_exit`s without returning to our caller.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => {
            detach();
            work();
            // SAFETY: _exit skips atexit handlers and stdio flushes that belong to the parent.
            unsafe { libc::_exit(0) }
        }
        p if p < 0 => work(),
        _ => {}
    }
}

/// Whether this is the only thread left. A thread that was just joined may still be listed
/// for a few microseconds while the kernel finishes its exit, so look again briefly.
fn single_threaded() -> bool {
    for _ in 0..20 {
        if thread_count() == 1 {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    false
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// A session of its own and `/dev/null` for 0, 1 and 2.
fn detach() {
    // SAFETY: plain syscalls on our own process and descriptors.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            libc::close(null);
        } else {
            for fd in 0..3 {
                libc::close(fd);
            }
        }
    }
}
