//! Detached mounts through the new mount API (`fsopen`, `fsmount`, `open_tree`, `move_mount`).
//!
//! Guarantees: a volume made here is never attached to any mount namespace by this module; it
//! exists only as a file descriptor. When the last descriptor (and the last namespace it was
//! moved into) goes away, the kernel unmounts it — so a killed supervisor leaves no mount
//! behind, and nothing on the host's mount table ever shows a session volume. Mounts are
//! `nosuid,nodev`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;

use super::WorkspaceError;

const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D; // _IOR('X', 125, __u32)
const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;

fn mount_err(fs: &'static str, op: impl Into<String>) -> impl FnOnce(Errno) -> WorkspaceError {
    let op = op.into();
    move |errno| WorkspaceError::Mount {
        fs,
        op,
        errno,
        kernel_log: String::new(),
    }
}

fn cstring(s: &str) -> Result<CString, WorkspaceError> {
    CString::new(s).map_err(|_| WorkspaceError::Mount {
        fs: "-",
        op: format!("argument {s:?} contains NUL"),
        errno: Errno::EINVAL,
        kernel_log: String::new(),
    })
}

/// Drains the messages the kernel attached to an fs context ("e ext4: ...").
fn fs_context_log(fsfd: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 512];
    // Bounded: the kernel keeps at most 8 messages per context.
    for _ in 0..8 {
        // SAFETY: reads into a stack buffer of the given length from an fd we own.
        let n = unsafe { libc::read(fsfd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let msg = String::from_utf8_lossy(&buf[..n as usize]);
        out.push_str("; ");
        out.push_str(msg.trim_end());
    }
    out
}

fn fsopen(fs: &'static CStr) -> Result<OwnedFd, Errno> {
    // SAFETY: `fs` is a valid C string; fsopen returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, fs.as_ptr(), libc::FSOPEN_CLOEXEC) };
    let fd = Errno::result(fd)? as i32;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fsconfig(
    fsfd: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> Result<(), Errno> {
    let key_ptr = key.map_or(std::ptr::null(), CStr::as_ptr);
    let value_ptr = value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: key/value are null or valid C strings that outlive the call; aux is unused (0).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd.as_raw_fd(),
            cmd,
            key_ptr,
            value_ptr,
            0,
        )
    };
    Errno::result(rc).map(drop)
}

fn fsmount(fsfd: &OwnedFd, attrs: u64) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall on an fd we own; returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fsfd.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs,
        )
    };
    let fd = Errno::result(fd)? as i32;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Builds a detached mount of `fs` with string options `opts` and flag options `flags`.
fn detached_mount(
    fs_name: &'static str,
    fs: &'static CStr,
    opts: &[(&str, &str)],
    flags: &[&str],
) -> Result<OwnedFd, WorkspaceError> {
    let fsfd = fsopen(fs).map_err(mount_err(fs_name, "fsopen"))?;
    let fail = |op: String, errno: Errno| WorkspaceError::Mount {
        fs: fs_name,
        op,
        errno,
        kernel_log: fs_context_log(&fsfd),
    };
    for (key, value) in opts {
        let (k, v) = (cstring(key)?, cstring(value)?);
        fsconfig(&fsfd, libc::FSCONFIG_SET_STRING, Some(&k), Some(&v))
            .map_err(|e| fail(format!("fsconfig {key}={value}"), e))?;
    }
    for flag in flags {
        let k = cstring(flag)?;
        fsconfig(&fsfd, libc::FSCONFIG_SET_FLAG, Some(&k), None)
            .map_err(|e| fail(format!("fsconfig {flag}"), e))?;
    }
    fsconfig(&fsfd, libc::FSCONFIG_CMD_CREATE, None, None)
        .map_err(|e| fail("fsconfig create".into(), e))?;
    fsmount(&fsfd, libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV)
        .map_err(|e| fail("fsmount".into(), e))
}

/// Mounts the ext4 filesystem on `device` as a detached mount.
///
/// `noinit_itable` keeps the kernel from zeroing inode tables in the background (which would
/// write megabytes into the image for nothing: its holes already read as zeros); `nobarrier`
/// keeps the sandbox's `fsync` calls from flushing the host disk (the volume is scratch space
/// until commit copies it out).
pub fn mount_ext4(device: &Path) -> Result<OwnedFd, WorkspaceError> {
    let source = device.to_string_lossy();
    detached_mount(
        "ext4",
        c"ext4",
        &[("source", &source)],
        &["noinit_itable", "nobarrier"],
    )
}

/// Makes a detached tmpfs of at most `size_bytes` and `nr_inodes` inodes, root mode 0755.
///
/// Works in a user namespace that owns the caller's mount namespace (tmpfs may be mounted
/// there), which is how an unprivileged sandbox init gets a capped workspace. Pages written to
/// a tmpfs are charged to the writer's memory cgroup: see the module docs of `workspace`.
pub fn create_tmpfs_volume(size_bytes: u64, nr_inodes: u64) -> Result<OwnedFd, WorkspaceError> {
    let size = size_bytes.to_string();
    let inodes = nr_inodes.to_string();
    detached_mount(
        "tmpfs",
        c"tmpfs",
        &[("size", &size), ("nr_inodes", &inodes), ("mode", "0755")],
        &[],
    )
}

/// A second detached mount of the same filesystem (`open_tree(OPEN_TREE_CLONE)`), for handing
/// to the sandbox while the supervisor keeps its own.
pub fn clone_mount(mount: BorrowedFd<'_>) -> Result<OwnedFd, WorkspaceError> {
    // SAFETY: "" is a valid C string; with AT_EMPTY_PATH the fd itself is the tree to clone.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    let fd = Errno::result(fd).map_err(mount_err("-", "open_tree(OPEN_TREE_CLONE)"))? as i32;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches a detached mount (from [`clone_mount`] or [`create_tmpfs_volume`]) at `target` in
/// the caller's mount namespace: what the sandbox init calls to put the volume at
/// `/workspace`. The caller needs `CAP_SYS_ADMIN` over its mount namespace (the init has it in
/// its own user namespace).
pub fn attach_detached_mount(mount: BorrowedFd<'_>, target: &Path) -> Result<(), WorkspaceError> {
    let target_c = cstring(&target.to_string_lossy())?;
    // SAFETY: both strings are valid C strings that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(rc).map(drop).map_err(mount_err(
        "-",
        format!("move_mount to {}", target.display()),
    ))
}

/// Marks an ext4 volume shut down without flushing: its dirty pages are dropped instead of being
/// written into an image that is about to be freed. Any later access fails with `EIO`.
pub fn shutdown_ext4(root: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags: u32 = EXT4_GOING_FLAGS_NOLOGFLUSH;
    // SAFETY: EXT4_IOC_SHUTDOWN reads one u32 from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags as *const u32) };
    Errno::result(rc).map(drop)
}
