//! Planting cordon's own files (canary credentials) in a workspace after copy-in.
//!
//! Guarantees:
//! - A planted file is created only beneath the given root, through entries that are real
//!   directories there: every step is `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_XDEV`, and the file is created with `O_CREAT | O_EXCL`. Nothing that exists is
//!   overwritten or written through: a file, symlink or mount point in the way is
//!   [`PlantError::Occupied`], and nothing is created.
//! - The path is made of plain names only (no `/` prefix, `.`, `..` or empty component);
//!   anything else is refused before the filesystem is touched.
//! - What is made belongs to `owner` (the sandbox user's host ids) when one is given: files
//!   `0600`, directories made for them `0700`, as real credential files are.
//! - The file and the directories made for it are recorded in the [`Snapshot`] as cordon's own:
//!   `commit_tree` never copies the file back to the host, and removes a directory made only
//!   for it from the host again unless something else was committed into it.
//! - On a failure after something was made, what was made is removed again.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};
use thiserror::Error;

use super::tree::{how, lstat_at, open_dir, Owner, Snapshot};

/// Why a file could not be planted.
#[derive(Debug, Error)]
pub enum PlantError {
    #[error("{0}: not a plain relative path")]
    BadPath(PathBuf),
    /// Something is already where the file (or one of its directories) would go.
    #[error("{path}: {what} is already there")]
    Occupied { path: PathBuf, what: &'static str },
    #[error("{path}: {op}: {errno}")]
    Io {
        path: PathBuf,
        op: &'static str,
        errno: Errno,
    },
    #[error("the workspace volume is not ready yet")]
    NotReady,
}

fn what_is(st: &nix::sys::stat::FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFREG => "a file",
        _ => "a special file",
    }
}

fn plain_names(rel: &Path) -> Option<Vec<&OsStr>> {
    let names: Option<Vec<&OsStr>> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    // `components` folds `a//b` and `a/./b`; the text must have been plain already.
    let text = rel.as_os_str().as_encoded_bytes();
    let folded = text.is_empty()
        || text.ends_with(b"/")
        || text.windows(2).any(|w| w == b"//")
        || text.starts_with(b"./")
        || text.windows(3).any(|w| w == b"/./");
    names.filter(|n| !n.is_empty() && !folded)
}

/// Creates `rel` beneath `root` holding `contents`, making missing directories, and records it
/// in `snapshot` as never to be committed. See the module documentation.
pub fn plant(
    root: BorrowedFd<'_>,
    rel: &Path,
    contents: &[u8],
    owner: Option<Owner>,
    snapshot: &mut Snapshot,
) -> Result<(), PlantError> {
    let names = plain_names(rel).ok_or_else(|| PlantError::BadPath(rel.to_path_buf()))?;
    let root = open_dir(root, ".").map_err(|errno| PlantError::Io {
        path: ".".into(),
        op: "open workspace root",
        errno,
    })?;
    let mut made = Made::default();
    let result = plant_in(root.as_fd(), rel, &names, contents, owner, &mut made);
    match result {
        Ok(st) => {
            snapshot.reserve(rel, &st, made.dirs);
            Ok(())
        }
        Err(e) => {
            // Nothing of a failed plant stays behind: the file if this call created it, then
            // the directories made for it, deepest first (nothing runs in the workspace yet).
            if made.file {
                let _ = unlinkat(root.as_fd(), rel, UnlinkatFlags::NoRemoveDir);
            }
            for dir in made.dirs.iter().rev() {
                let _ = unlinkat(root.as_fd(), dir.as_path(), UnlinkatFlags::RemoveDir);
            }
            Err(e)
        }
    }
}

/// What one plant made so far.
#[derive(Default)]
struct Made {
    dirs: Vec<PathBuf>,
    file: bool,
}

fn plant_in(
    root: BorrowedFd<'_>,
    rel: &Path,
    names: &[&OsStr],
    contents: &[u8],
    owner: Option<Owner>,
    made: &mut Made,
) -> Result<nix::sys::stat::FileStat, PlantError> {
    let io = |path: &Path, op: &'static str| {
        let path = path.to_path_buf();
        move |errno| PlantError::Io { path, op, errno }
    };
    let give = |fd: BorrowedFd<'_>| match owner {
        Some(o) => fchown(fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))),
        None => Ok(()),
    };
    let Some((file, dirs)) = names.split_last() else {
        return Err(PlantError::BadPath(rel.to_path_buf()));
    };
    let mut dir: OwnedFd = open_dir(root, ".").map_err(io(Path::new("."), "open"))?;
    let mut walked = PathBuf::new();
    for name in dirs {
        walked.push(name);
        match lstat_at(dir.as_fd(), name) {
            Ok(st)
                if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
                    == SFlag::S_IFDIR => {}
            Ok(st) => {
                return Err(PlantError::Occupied {
                    path: walked,
                    what: what_is(&st),
                })
            }
            Err(Errno::ENOENT) => {
                mkdirat(dir.as_fd(), *name, Mode::from_bits_truncate(0o700))
                    .map_err(io(&walked, "mkdir"))?;
                made.dirs.push(walked.clone());
            }
            Err(errno) => return Err(io(&walked, "stat")(errno)),
        }
        let next = match open_dir(dir.as_fd(), *name) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => {
                return Err(PlantError::Occupied {
                    path: walked,
                    what: "a symlink",
                })
            }
            Err(Errno::EXDEV) => {
                return Err(PlantError::Occupied {
                    path: walked,
                    what: "a mount point",
                })
            }
            Err(errno) => return Err(io(&walked, "open dir")(errno)),
        };
        if made.dirs.last() == Some(&walked) {
            give(next.as_fd()).map_err(io(&walked, "chown dir"))?;
            // mkdir's mode is filtered by the umask; the directory is the owner's alone.
            fchmod(next.as_fd(), Mode::from_bits_truncate(0o700))
                .map_err(io(&walked, "chmod dir"))?;
        }
        dir = next;
    }
    let fd = match openat2(
        dir.as_fd(),
        *file,
        how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL).mode(Mode::from_bits_truncate(0o600)),
    ) {
        Ok(fd) => fd,
        Err(Errno::EEXIST) => {
            let what = lstat_at(dir.as_fd(), file).map_or("an entry", |st| what_is(&st));
            return Err(PlantError::Occupied {
                path: rel.to_path_buf(),
                what,
            });
        }
        Err(errno) => return Err(io(rel, "create")(errno)),
    };
    made.file = true;
    let mut out = std::fs::File::from(fd);
    out.write_all(contents)
        .map_err(|e| io(rel, "write")(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    give(out.as_fd()).map_err(io(rel, "chown"))?;
    fchmod(out.as_fd(), Mode::from_bits_truncate(0o600)).map_err(io(rel, "chmod"))?;
    fstat(out.as_fd()).map_err(io(rel, "stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        for ok in [".env", ".aws/credentials", "a/b/c"] {
            assert!(plain_names(Path::new(ok)).is_some(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            ".",
            "..",
        ] {
            assert!(plain_names(Path::new(bad)).is_none(), "{bad}");
        }
    }
}
