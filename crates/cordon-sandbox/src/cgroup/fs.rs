//! The seam between cgroup orchestration and the kernel's cgroup filesystem.
//!
//! Every file operation the cgroup code performs goes through [`CgroupFs`], so the ordering and
//! contents of writes can be tested against a fake tree without root. [`LinuxFs`] is the real
//! implementation: plain `open`/`write`/`mkdir`/`rmdir`, never creating a file that the kernel
//! did not create (cgroupfs refuses `O_CREAT`, and a missing control file must read as
//! `ENOENT`, not be silently made).

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;

/// File operations on a cgroup filesystem. Paths are absolute (already joined under the
/// detection root). Errors are plain errnos: callers add the path and the step.
pub trait CgroupFs: fmt::Debug + Send + Sync {
    /// `mkdir(path)`. `EEXIST` when it exists.
    fn mkdir(&self, path: &Path) -> Result<(), Errno>;
    /// `rmdir(path)`.
    fn rmdir(&self, path: &Path) -> Result<(), Errno>;
    /// One `write(2)` of `contents` to an existing file (cgroupfs takes a value per write).
    fn write(&self, path: &Path, contents: &str) -> Result<(), Errno>;
    /// The whole file as text.
    fn read(&self, path: &Path) -> Result<String, Errno>;
    /// `access(path, W_OK)`: whether the caller may write there.
    fn is_writable(&self, path: &Path) -> bool;
    /// Names of the directories directly under `path`.
    fn subdirs(&self, path: &Path) -> Result<Vec<String>, Errno>;
    /// An existing file opened write-only and close-on-exec, kept open for repeated writes
    /// (`cgroup.procs`, so adding a process costs one `pwrite`).
    fn open_write(&self, path: &Path) -> Result<File, Errno>;
    /// A directory opened `O_RDONLY | O_DIRECTORY | O_CLOEXEC` (for `CLONE_INTO_CGROUP`).
    fn open_dir(&self, path: &Path) -> Result<OwnedFd, Errno>;
}

/// The real cgroup filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxFs;

/// The errno of an I/O error; `EIO` for errors that carry none.
pub(crate) fn errno_of(err: &io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

impl CgroupFs for LinuxFs {
    fn mkdir(&self, path: &Path) -> Result<(), Errno> {
        std::fs::create_dir(path).map_err(|e| errno_of(&e))
    }

    fn rmdir(&self, path: &Path) -> Result<(), Errno> {
        std::fs::remove_dir(path).map_err(|e| errno_of(&e))
    }

    fn write(&self, path: &Path, contents: &str) -> Result<(), Errno> {
        let mut file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| errno_of(&e))?;
        let written = file.write(contents.as_bytes()).map_err(|e| errno_of(&e))?;
        if written != contents.len() {
            // cgroupfs consumes a value in one write; a short write means it was cut.
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> Result<String, Errno> {
        let mut file = File::open(path).map_err(|e| errno_of(&e))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| errno_of(&e))?;
        Ok(text)
    }

    fn is_writable(&self, path: &Path) -> bool {
        let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; access(2)
        // only reads it.
        unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
    }

    fn subdirs(&self, path: &Path) -> Result<Vec<String>, Errno> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| errno_of(&e))? {
            let entry = entry.map_err(|e| errno_of(&e))?;
            let is_dir = entry.file_type().map_err(|e| errno_of(&e))?.is_dir();
            if is_dir {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn open_write(&self, path: &Path) -> Result<File, Errno> {
        // std opens with O_CLOEXEC: the sandbox never inherits these descriptors.
        OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| errno_of(&e))
    }

    fn open_dir(&self, path: &Path) -> Result<OwnedFd, Errno> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(|e| errno_of(&e))?;
        Ok(OwnedFd::from(file))
    }
}
