//! The process title: what `/proc/PID/cmdline` (and so `ps`, and `/proc/1/cmdline` inside a
//! sandbox) shows for a cordon process that is not the command the user asked for.
//!
//! Guarantees: [`set`] overwrites the argument block the kernel placed on the stack at `exec`
//! in place — no allocation, nothing moved — so a clone of the supervisor (the sandbox's init,
//! the teardown child) stops showing the supervisor's command line, with its host paths and
//! flags, to anyone who reads it, the sandboxed code included.

use std::io;

/// Sets this process's title to `title` (cut to the argument block's size).
pub fn set(title: &[u8]) {
    set_args(title);
}

/// Sets this process's `comm` (the name in `/proc/PID/stat` and `/proc/PID/comm`, at most 15
/// bytes; longer names are cut).
pub fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Overwrites this process's argument block (what `/proc/PID/cmdline` and `ps` show) with
/// `title`, as `setproctitle` does. Nothing reads our arguments afterwards.
fn set_args(title: &[u8]) {
    let Ok((start, end)) = arg_block() else {
        return;
    };
    let len = end.saturating_sub(start);
    if len < 2 {
        return;
    }
    // SAFETY: [arg_start, arg_end) is the argument block the kernel placed on our stack at
    // exec: mapped, writable and ours, and no Rust reference into it is alive (std reads
    // `argv` from it afresh on each `std::env::args()`, so a later call in this process would
    // see the title: only processes that never read their arguments again are retitled — the
    // sandbox's init and the teardown child). The last byte stays NUL, so the kernel reports
    // exactly this block.
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
