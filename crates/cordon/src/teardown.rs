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

use std::io;

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
    set_process_title(TITLE);
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

/// Overwrites this process's argument block (what `/proc/PID/cmdline` and `ps` show) with
/// `title`, as `setproctitle` does. Nothing reads our arguments afterwards.
fn set_process_title(title: &[u8]) {
    let Ok((start, end)) = arg_block() else {
        return;
    };
    let len = end.saturating_sub(start);
    if len < 2 {
        return;
    }
    // SAFETY: [arg_start, arg_end) is the argument block the kernel placed on our stack at
    // exec: mapped, writable and ours. std copies arguments out of it when asked and keeps no
    // reference into it. The last byte stays NUL, so the kernel reports exactly this block.
    unsafe {
        let block = std::slice::from_raw_parts_mut(start as *mut u8, len);
        block.fill(0);
        let n = title.len().min(len - 1);
        block[..n].copy_from_slice(&title[..n]);
    }
}

/// `arg_start` and `arg_end` from `/proc/self/stat` (fields 48 and 49).
fn arg_block() -> io::Result<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    parse_arg_block(&stat).ok_or_else(|| io::Error::other("unexpected /proc/self/stat"))
}

fn parse_arg_block(stat: &str) -> Option<(usize, usize)> {
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(48 - 3);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_block_is_read_after_the_command_name_whatever_it_holds() {
        let fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        let stat = format!("1234 (a) b) c) {}", fields.join(" "));
        assert_eq!(parse_arg_block(&stat), Some((48, 49)));
        assert_eq!(parse_arg_block("1234 (cordon) S 1"), None);
    }

    #[test]
    fn this_process_has_an_argument_block_that_matches_its_cmdline() {
        let (start, end) = arg_block().unwrap_or((0, 0));
        let cmdline = std::fs::read("/proc/self/cmdline").unwrap_or_default();
        assert_eq!(end - start, cmdline.len());
    }
}
