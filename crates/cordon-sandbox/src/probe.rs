//! Reads the few host facts a sandbox plan depends on.
//!
//! Guarantees: only `lstat`/`readlink` on fixed paths under `/` and `/etc`; never follows a
//! symlink, so the plan recreates links as links instead of binding what they point to.

use std::path::Path;

use crate::plan::{HostEntry, HostFacts, ETC_ALLOWLIST, SYSTEM_DIRS};

fn entry(path: &Path) -> HostEntry {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(path) {
            Ok(t) => HostEntry::Symlink(t),
            Err(_) => HostEntry::Missing,
        },
        Ok(m) if m.is_dir() => HostEntry::Dir,
        Ok(m) if m.is_file() => HostEntry::File,
        _ => HostEntry::Missing,
    }
}

/// Looks at `root` (normally `/`).
pub fn host_facts(root: &Path) -> HostFacts {
    HostFacts {
        system_dirs: SYSTEM_DIRS
            .iter()
            .map(|n| (n.to_string(), entry(&root.join(n))))
            .collect(),
        etc: ETC_ALLOWLIST
            .iter()
            .map(|n| (n.to_string(), entry(&root.join("etc").join(n))))
            .collect(),
    }
}
