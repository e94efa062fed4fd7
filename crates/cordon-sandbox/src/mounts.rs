//! Builds the sandbox's filesystem from a mount plan and pivots into it.
//!
//! Guarantees, once [`apply`] returns `Ok`: the process is in its own mount namespace whose
//! mounts do not propagate to the host; its root is a small tmpfs, remounted read-only, holding
//! only what the plan names; every host directory is bound read-only, `nosuid`, `nodev`
//! (device nodes keep `dev`), except the workspace and writable extra binds; the host's old root
//! is detached, so no path, `..` or symlink inside the sandbox resolves to a host file that was
//! not bound in. Any failed step aborts with the step and path.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::plan::{BindSource, MountOp, WorkspaceMount};
use crate::sys::{self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// A failed mount step.
#[derive(Debug, Error)]
pub enum MountError {
    #[error("{step}({path}): {source}")]
    Step {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MountError + 'a {
    move |source| MountError::Step {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the new root is assembled (in the sandbox's private mount namespace, so mounting a
/// tmpfs over this path hides nothing from the host).
pub const STAGING_ROOT: &str = "/tmp";

/// Host paths opened before the staging tmpfs covers `/tmp`, so binds from under `/tmp` (a
/// throwaway workspace, say) still find their source.
pub struct Sources {
    fds: Vec<(BindSource, OwnedFd)>,
}

impl Sources {
    /// Opens every bind source of the plan with `O_PATH` (the workspace only when it is a
    /// plain host directory).
    pub fn open(ops: &[MountOp], workspace: &WorkspaceMount) -> Result<Sources, MountError> {
        let mut fds = Vec::new();
        for op in ops {
            if let MountOp::CopyFile { source, .. } = op {
                // Readable if the sandbox user may read it (then it is copied); otherwise an
                // O_PATH descriptor, which can only be bound.
                let fd = sys::open_for_copy(source)
                    .or_else(|_| sys::open_path(source))
                    .map_err(step("open", source))?;
                fds.push((BindSource::Host(source.clone()), fd));
                continue;
            }
            if let MountOp::Bind { source, .. } = op {
                let host = match (source, workspace) {
                    (BindSource::Host(p), _) => p.as_path(),
                    (BindSource::Workspace, WorkspaceMount::Bind(p)) => p.as_path(),
                    (BindSource::Workspace, _) => continue,
                };
                let fd = sys::open_path(host).map_err(step("open", host))?;
                fds.push((source.clone(), fd));
            }
        }
        Ok(Sources { fds })
    }

    fn get(&self, source: &BindSource) -> Option<&OwnedFd> {
        self.fds.iter().find(|(s, _)| s == source).map(|(_, fd)| fd)
    }
}

/// How the workspace reaches the sandbox, at run time.
pub enum WorkspaceAttach<'a> {
    /// Bind the host directory opened in [`Sources`].
    Bind,
    /// Attach the supervisor's detached volume mount, which `receive` waits for: the
    /// supervisor prepares the volume while the rest of the filesystem is built.
    Detached(&'a mut dyn FnMut() -> Result<OwnedFd, String>),
    /// Make a capped tmpfs here.
    Tmpfs { size_bytes: u64, nr_inodes: u64 },
}

/// Makes every mount private, assembles the plan under [`STAGING_ROOT`], pivots into it and
/// makes the root read-only. For a tmpfs workspace, returns a second detached mount of it for
/// the supervisor.
pub fn apply(
    ops: &[MountOp],
    sources: &Sources,
    root_size: u64,
    mut workspace: WorkspaceAttach<'_>,
) -> Result<Option<OwnedFd>, MountError> {
    let root = Path::new(STAGING_ROOT);
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("make-private", Path::new("/")))?;
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!("size={root_size},nr_inodes=4096,mode=755")),
    )
    .map_err(step("mount-root-tmpfs", root))?;

    let mut handed_over = None;
    for op in ops {
        match (op, &mut workspace) {
            (
                MountOp::Bind {
                    source: BindSource::Workspace,
                    path,
                    ..
                },
                WorkspaceAttach::Detached(receive),
            ) => {
                let p = root.join(path);
                sys::mkdir_all(&p, 0o755).map_err(step("mkdir", &p))?;
                let fd = receive().map_err(|e| MountError::Step {
                    step: "workspace-volume",
                    path: p.clone(),
                    source: io::Error::other(e),
                })?;
                attach(fd.as_fd(), &p)?;
            }
            (
                MountOp::Bind {
                    source: BindSource::Workspace,
                    path,
                    ..
                },
                WorkspaceAttach::Tmpfs {
                    size_bytes,
                    nr_inodes,
                },
            ) => {
                let p = root.join(path);
                sys::mkdir_all(&p, 0o755).map_err(step("mkdir", &p))?;
                let fs = crate::workspace::create_tmpfs_volume(*size_bytes, *nr_inodes)
                    .map_err(|e| ws_err(&p, e))?;
                let clone = crate::workspace::clone_mount(fs.as_fd()).map_err(|e| ws_err(&p, e))?;
                attach(fs.as_fd(), &p)?;
                handed_over = Some(clone);
            }
            _ => apply_op(root, op, sources)?,
        }
    }

    std::env::set_current_dir(root).map_err(step("chdir", root))?;
    sys::pivot_into_cwd().map_err(step("pivot_root", root))?;
    std::env::set_current_dir("/").map_err(step("chdir", Path::new("/")))?;
    sys::mount_setattr(Path::new("/"), false, MOUNT_ATTR_RDONLY, 0)
        .map_err(step("remount-root-readonly", Path::new("/")))?;
    Ok(handed_over)
}

fn ws_err(path: &Path, e: crate::workspace::WorkspaceError) -> MountError {
    MountError::Step {
        step: "workspace-volume",
        path: path.to_path_buf(),
        source: io::Error::other(e.to_string()),
    }
}

/// Attaches a detached mount at `target`, then makes it `nosuid,nodev`.
fn attach(fd: BorrowedFd<'_>, target: &Path) -> Result<(), MountError> {
    crate::workspace::attach_detached_mount(fd, target).map_err(|e| ws_err(target, e))?;
    sys::mount_setattr(target, false, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0)
        .map_err(step("workspace-flags", target))
}

fn apply_op(root: &Path, op: &MountOp, sources: &Sources) -> Result<(), MountError> {
    match op {
        MountOp::Mkdir { path, mode } => {
            let p = root.join(path);
            sys::mkdir_all(&p, *mode).map_err(step("mkdir", &p))
        }
        MountOp::Symlink { target, path } => {
            let p = root.join(path);
            std::os::unix::fs::symlink(target, &p).map_err(step("symlink", &p))
        }
        MountOp::WriteFile {
            path,
            contents,
            mode,
        } => {
            use std::os::unix::fs::PermissionsExt;
            let p = root.join(path);
            std::fs::write(&p, contents).map_err(step("write", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                .map_err(step("chmod", &p))
        }
        MountOp::Code { path, bytes, .. } => {
            use std::os::unix::fs::PermissionsExt;
            let p = root.join(path);
            if let Some(parent) = p.parent() {
                sys::mkdir_all(parent, 0o755).map_err(step("mkdir", parent))?;
            }
            std::fs::write(&p, bytes).map_err(step("write", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                .map_err(step("chmod", &p))
        }
        MountOp::Tmpfs {
            path,
            size,
            mode,
            noexec,
        } => {
            let p = root.join(path);
            if !p.exists() {
                sys::mkdir_all(&p, 0o755).map_err(step("mkdir", &p))?;
            }
            let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
            if *noexec {
                flags |= libc::MS_NOEXEC;
            }
            let data = format!("size={size},mode={mode:o}");
            sys::mount(
                Some(Path::new("tmpfs")),
                &p,
                Some("tmpfs"),
                flags,
                Some(&data),
            )
            .map_err(step("mount-tmpfs", &p))
        }
        MountOp::CopyFile {
            source,
            path,
            max_bytes,
        } => {
            let p = root.join(path);
            let key = BindSource::Host(source.clone());
            let fd = sources.get(&key).ok_or_else(|| MountError::Step {
                step: "copy-source",
                path: p.clone(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })?;
            if sys::copy_small_file(fd, &p, *max_bytes).map_err(step("copy", &p))? {
                return Ok(());
            }
            let bind = MountOp::Bind {
                source: key,
                path: path.clone(),
                dir: false,
                writable: false,
            };
            apply_op(root, &bind, sources)
        }
        MountOp::Bind {
            source,
            path,
            dir,
            writable,
        } => {
            let p = root.join(path);
            let fd = sources.get(source).ok_or_else(|| MountError::Step {
                step: "bind-source",
                path: p.clone(),
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })?;
            if *dir {
                sys::mkdir_all(&p, 0o755).map_err(step("mkdir", &p))?;
            } else {
                sys::touch(&p).map_err(step("create-mountpoint", &p))?;
            }
            sys::mount(
                Some(&sys::fd_path(fd)),
                &p,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )
            .map_err(step("bind", &p))?;
            let is_device = matches!(source, BindSource::Host(h) if h.starts_with("/dev"));
            let mut set = MOUNT_ATTR_NOSUID;
            if !is_device {
                set |= MOUNT_ATTR_NODEV;
            }
            if !writable {
                set |= MOUNT_ATTR_RDONLY;
            }
            sys::mount_setattr(&p, true, set, 0).map_err(step("bind-flags", &p))
        }
        MountOp::Proc { path } => {
            let p = root.join(path);
            sys::mkdir_all(&p, 0o555).map_err(step("mkdir", &p))?;
            sys::mount(
                Some(Path::new("proc")),
                &p,
                Some("proc"),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                None,
            )
            .map_err(step("mount-proc", &p))
        }
        MountOp::MaskFile { path } => {
            let p = root.join(path);
            if !p.exists() {
                return Ok(());
            }
            sys::mount(Some(Path::new("/dev/null")), &p, None, libc::MS_BIND, None)
                .map_err(step("mask-file", &p))
        }
        MountOp::MaskDir { path } => {
            let p = root.join(path);
            if !p.is_dir() {
                return Ok(());
            }
            sys::mount(
                Some(Path::new("tmpfs")),
                &p,
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=0"),
            )
            .map_err(step("mask-dir", &p))
        }
        MountOp::ReadOnly { path, recursive } => {
            let p = root.join(path);
            if !p.exists() {
                return Ok(());
            }
            // A bind of the directory onto itself gives it a mount of its own whose flags we
            // may change without touching the parent mount.
            sys::mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None)
                .map_err(step("bind-self", &p))?;
            sys::mount_setattr(
                &p,
                *recursive,
                MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                0,
            )
            .map_err(step("readonly", &p))
        }
    }
}
