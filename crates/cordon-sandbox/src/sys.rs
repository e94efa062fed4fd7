//! Thin, errno-preserving wrappers over the mount and file syscalls the sandbox set-up needs.
//!
//! Guarantees: every wrapper returns the raw errno together with the step it belongs to, so an
//! operator reads `mount(tmpfs -> /tmp/dev): EPERM` instead of a bare error code. Nothing here
//! allocates after the arguments are converted, and nothing here decides anything.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct mount_attr` from `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// Converts a path into a C string; paths with an interior NUL are rejected as `EINVAL`.
pub fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mount(2)`. `source`/`fstype`/`data` may be absent.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cpath).transpose()?;
    let target = cpath(target)?;
    let fstype = fstype
        .map(|s| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let data = data
        .map(|s| CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    // SAFETY: every pointer is either null or a valid NUL-terminated string that outlives the
    // call; mount(2) does not retain them.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
        )
    };
    check(rc)
}

/// `mount_setattr(2)` on `path`, optionally recursive (Linux 5.12+).
pub fn mount_setattr(path: &Path, recursive: bool, set: u64, clear: u64) -> io::Result<()> {
    let p = cpath(path)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 } | libc::AT_NO_AUTOMOUNT;
    // SAFETY: `p` is a valid C string and `attr` a properly laid-out `struct mount_attr` whose
    // size we pass; the kernel only reads them during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            p.as_ptr(),
            flags as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(rc as libc::c_int)
}

/// `pivot_root(".", ".")` followed by a lazy unmount of the old root, as runc does: no
/// directory for the old root is needed and nothing of it stays reachable.
pub fn pivot_into_cwd() -> io::Result<()> {
    let dot = c".";
    // SAFETY: both arguments are valid NUL-terminated strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(rc as libc::c_int)?;
    // SAFETY: valid C string; MNT_DETACH detaches the old root stacked under ".".
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
}

/// `open(path, O_PATH | O_CLOEXEC)`.
pub fn open_path(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    // SAFETY: valid C string; the returned fd is owned by the OwnedFd below.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a regular file for [`copy_small_file`]: read-only, never following a symlink, never
/// blocking on a FIFO.
pub fn open_for_copy(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    // SAFETY: valid C string; the returned fd is owned by the OwnedFd below.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Copies the regular file open at `src` to a new file `dst` (permissions kept, minus
/// set-id, sticky and write bits for group and others) when it holds at most `max_bytes`.
/// `Ok(false)`, with nothing created, when it is larger, not a regular file, or not readable
/// through `src` (an `O_PATH` descriptor): the caller binds it instead.
pub fn copy_small_file(src: &OwnedFd, dst: &Path, max_bytes: u64) -> io::Result<bool> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let dup = src.try_clone()?;
    let mut file = std::fs::File::from(dup);
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(_) => return Ok(false),
    };
    if !meta.is_file() || meta.len() > max_bytes {
        return Ok(false);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One more byte than allowed tells a file that grew since the fstat.
    match (&mut file).take(max_bytes + 1).read_to_end(&mut bytes) {
        Ok(n) if n as u64 <= max_bytes => {}
        Ok(_) => return Ok(false),
        // EBADF: an O_PATH descriptor, the sandbox user may not read the file.
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => return Ok(false),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dst.parent() {
        mkdir_all(parent, 0o755)?;
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o755;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dst)?;
    out.write_all(&bytes)?;
    // Exactly `mode`, whatever the umask.
    out.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(true)
}

/// The `/proc/self/fd/N` path of an open descriptor, usable as a mount source even after the
/// original path has been covered by another mount.
pub fn fd_path(fd: &OwnedFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `mkdir -p` with `mode` for the directories it creates.
pub fn mkdir_all(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
}

/// Creates an empty file to bind a file over, with its parents.
pub fn touch(path: &Path) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent, 0o755)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_small_file_is_copied_with_its_mode_minus_setid_and_group_write() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello\n").unwrap();
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o4775)).unwrap();
        let dst = dir.path().join("etc/dst");
        let fd = open_for_copy(&src).unwrap();
        assert!(copy_small_file(&fd, &dst, 6).unwrap());
        assert_eq!(std::fs::read(&dst).unwrap(), b"hello\n");
        assert_eq!(mode(&dst), 0o755);
    }

    #[test]
    fn a_file_above_the_limit_a_fifo_or_an_unreadable_descriptor_is_left_to_a_bind() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, b"1234567").unwrap();
        let dst = dir.path().join("dst");
        assert!(!copy_small_file(&open_for_copy(&big).unwrap(), &dst, 6).unwrap());
        assert!(!copy_small_file(&open_path(&big).unwrap(), &dst, 64).unwrap());
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(!copy_small_file(&open_for_copy(&fifo).unwrap(), &dst, 64).unwrap());
        assert!(!dst.exists());
    }

    #[test]
    fn a_symlink_is_not_followed_when_opening_for_a_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("target"), b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("target", &link).unwrap();
        let err = open_for_copy(&link).err().map(|e| e.raw_os_error());
        assert_eq!(err, Some(Some(libc::ELOOP)));
    }
}
