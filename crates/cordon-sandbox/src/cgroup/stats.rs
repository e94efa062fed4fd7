//! Parsers for the statistics files cordon reads at the end of a session.
//!
//! Guarantees: pure functions over file text; malformed or missing values read as `None`, never
//! as zero, so "the kernel did not say" is never mistaken for "nothing happened".

/// The value of `key` in a flat-keyed file (`key value` per line: `memory.events`,
/// `pids.events`, `memory.oom_control`, `cpu.stat`).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != key {
            return None;
        }
        words.next()?.parse().ok()
    })
}

/// A file holding one number (`memory.peak`, `cpuacct.usage`, `memory.failcnt`).
pub(crate) fn single(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_are_found_by_exact_key() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(events, "max"), Some(12));
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(2));
        assert_eq!(keyed(events, "missing"), None);
    }

    #[test]
    fn malformed_values_read_as_unknown_not_zero() {
        assert_eq!(keyed("max lots\n", "max"), None);
        assert_eq!(keyed("max\n", "max"), None);
        assert_eq!(single(""), None);
        assert_eq!(single("max\n"), None);
        assert_eq!(single("33554432\n"), Some(33_554_432));
    }
}
