//! Volume images: one pre-formatted sparse ext4 template per cap, copied per session.
//!
//! Guarantees: a template is only ever seen complete (it is built under a temporary name,
//! fsynced, then renamed into place, so concurrent cordons and a crash mid-build leave at worst a
//! stale temporary that `cleanup_stale` removes); a session image is a fresh file created with
//! `O_EXCL`, mode 0600, locked with `flock` for as long as its creator lives, and holds only the
//! template's data blocks (holes stay holes), so a new session costs the host disk well under a
//! megabyte until the sandbox writes.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{loopdev, mountapi, WorkspaceError};

/// Bumped whenever the mkfs options below change, so old templates are not reused.
const TEMPLATE_VERSION: u32 = 2;

/// Bytes per inode: one inode per 8 KiB suits source trees and `node_modules` (many small
/// files) better than mke2fs's default of 16 KiB; unused inode tables stay sparse holes.
const BYTES_PER_INODE: &str = "8192";

/// Where mkfs.ext4 is looked for (root's PATH often lacks the sbin directories).
const MKFS_CANDIDATES: &[&str] = &[
    "/usr/sbin/mkfs.ext4",
    "/sbin/mkfs.ext4",
    "/usr/bin/mkfs.ext4",
    "/bin/mkfs.ext4",
];

/// What `mkfs.ext4` is told; pinned by a unit test so a change is deliberate.
pub fn mkfs_args(path: &Path) -> Vec<String> {
    vec![
        "-q".into(),
        "-F".into(),
        "-b".into(),
        "4096".into(),
        "-i".into(),
        BYTES_PER_INODE.into(),
        "-I".into(),
        "256".into(),
        // No blocks reserved for root: the cap is the sandbox's to use.
        "-m".into(),
        "0".into(),
        "-L".into(),
        "cordon-ws".into(),
        // No journal (the volume dies with the session), no online-resize reserve, and no backup
        // superblocks: each is one more extent the host must allocate and free per session.
        "-O".into(),
        "^has_journal,^resize_inode,sparse_super2".into(),
        "-E".into(),
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard,num_backup_sb=0,root_owner=0:0".into(),
        path.to_string_lossy().into_owned(),
    ]
}

pub fn template_path(state_dir: &Path, cap_bytes: u64) -> PathBuf {
    state_dir
        .join("templates")
        .join(format!("ext4-v{TEMPLATE_VERSION}-{cap_bytes}.img"))
}

/// Finds mkfs.ext4 in the usual places and on `PATH`.
pub fn find_mkfs() -> Result<PathBuf, WorkspaceError> {
    let mut searched: Vec<PathBuf> = MKFS_CANDIDATES.iter().map(PathBuf::from).collect();
    if let Some(path) = std::env::var_os("PATH") {
        searched.extend(std::env::split_paths(&path).map(|d| d.join("mkfs.ext4")));
    }
    for candidate in &searched {
        if candidate.is_file() {
            return Ok(candidate.clone());
        }
    }
    Err(WorkspaceError::MkfsMissing {
        searched: searched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn template_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> WorkspaceError + 'a {
    move |source| WorkspaceError::Template {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Creates `path` exclusively (mode 0600) and takes an exclusive `flock` on it, which marks it
/// as in use for `cleanup_stale` until the returned lock is dropped.
fn create_locked(path: &Path) -> Result<Flock<File>, std::io::Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| std::io::Error::from(e))
}

/// Returns the template for `cap_bytes`, building it on first use (about 10 ms plus an fsync).
pub fn ensure_template(state_dir: &Path, cap_bytes: u64) -> Result<PathBuf, WorkspaceError> {
    let path = template_path(state_dir, cap_bytes);
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.is_file() && meta.len() == cap_bytes {
            return Ok(path);
        }
        return Err(WorkspaceError::Template {
            path,
            op: "check (not a regular file of the cap's size; delete it)",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        });
    }
    let mkfs = find_mkfs()?;
    let dir = state_dir.join("templates");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(template_err(&dir, "create directory"))?;
    let tmp = dir.join(format!(".tmp-{}.img", unique_suffix()));
    let built = build_template(&mkfs, &tmp, cap_bytes);
    if let Err(e) = built {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // rename is atomic: a concurrent builder's identical template may win; both are fine.
    std::fs::rename(&tmp, &path).map_err(template_err(&path, "rename into place"))?;
    Ok(path)
}

fn build_template(mkfs: &Path, tmp: &Path, cap_bytes: u64) -> Result<(), WorkspaceError> {
    let file = create_locked(tmp).map_err(template_err(tmp, "create"))?;
    file.set_len(cap_bytes)
        .map_err(template_err(tmp, "truncate"))?;
    let out = Command::new(mkfs)
        .args(mkfs_args(tmp))
        .env_clear()
        .env("LC_ALL", "C")
        .output()
        .map_err(template_err(tmp, "run mkfs.ext4"))?;
    if !out.status.success() {
        return Err(WorkspaceError::Mkfs {
            program: mkfs.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    // mke2fs always makes lost+found; a workspace should start empty. Mount the template once
    // through the same path sessions use, which also proves the kernel accepts it.
    {
        let dev = loopdev::attach(&file, tmp)?;
        let root = mountapi::mount_ext4(&dev.path())?;
        drop(dev);
        nix::unistd::unlinkat(
            root.as_fd(),
            "lost+found",
            nix::unistd::UnlinkatFlags::RemoveDir,
        )
        .map_err(|e| WorkspaceError::Template {
            path: tmp.to_path_buf(),
            op: "remove lost+found",
            source: e.into(),
        })?;
        // Closing the last reference unmounts (writing the change back) and frees the device.
    }
    fill_small_gaps(&file).map_err(|e| WorkspaceError::Template {
        path: tmp.to_path_buf(),
        op: "fill small holes",
        source: e.into(),
    })?;
    file.sync_all().map_err(template_err(tmp, "fsync"))?;
    Ok(())
}

/// Largest hole between two data extents of the template that is filled with zeros.
const MAX_FILLED_GAP: i64 = 256 << 10;

/// Writes zeros into the small holes between the template's data extents. A hole reads as
/// zeros, so the filesystem is unchanged; but every extent of a session image is one more
/// allocation and one more free for the host (a synchronous TRIM per extent on a host mounted
/// with `-o discard`), and mke2fs leaves its first megabyte in several pieces.
fn fill_small_gaps(file: &File) -> Result<(), Errno> {
    let len = file
        .metadata()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
        .len() as i64;
    let zeros = vec![0u8; MAX_FILLED_GAP as usize];
    let mut offset = 0i64;
    let mut prev_end: Option<i64> = None;
    while offset < len {
        // SAFETY: lseek on an fd we own; -1/ENXIO means no data past `offset`.
        let data = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            match Errno::last() {
                Errno::ENXIO => break,
                e => return Err(e),
            }
        }
        // SAFETY: as above.
        let hole = Errno::result(unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) })?;
        if let Some(end) = prev_end {
            let gap = data - end;
            if gap > 0 && gap <= MAX_FILLED_GAP {
                std::os::unix::fs::FileExt::write_all_at(file, &zeros[..gap as usize], end as u64)
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
            }
        }
        prev_end = Some(hole);
        offset = hole;
    }
    Ok(())
}

/// A session image: created next to the others, locked, filled from the template.
pub struct SessionImage {
    pub path: PathBuf,
    pub file: Flock<File>,
}

/// Creates `<state_dir>/volumes/<unique>.img` from `template`: `FICLONE` where the host
/// filesystem shares blocks (btrfs, xfs), otherwise only the template's data extents are copied
/// (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`), keeping the image sparse.
pub fn clone_template(template: &Path, volumes_dir: &Path) -> Result<SessionImage, WorkspaceError> {
    clone_template_to(
        template,
        volumes_dir.join(format!("{}.img", unique_suffix())),
    )
}

/// [`clone_template`] to a name the caller chose (spares stage under a name their cleanup
/// recognises). `path` must not exist; it is locked from the moment it is created.
pub fn clone_template_to(template: &Path, path: PathBuf) -> Result<SessionImage, WorkspaceError> {
    let image_err = |op: &'static str| {
        let path = path.clone();
        move |source: std::io::Error| WorkspaceError::Image { path, op, source }
    };
    let src = File::open(template).map_err(template_err(template, "open"))?;
    let len = src
        .metadata()
        .map_err(template_err(template, "stat"))?
        .len();
    let dst = create_locked(&path).map_err(image_err("create"))?;
    let result = copy_sparse(&src, &dst, len).map_err(|e| image_err("copy template")(e.into()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(SessionImage { path, file: dst })
}

fn copy_sparse(src: &File, dst: &File, len: u64) -> Result<(), Errno> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let mut offset: i64 = 0;
    let end = len as i64;
    while offset < end {
        // SAFETY: lseek on an fd we own; returns the next data offset or -1 (ENXIO: none left).
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            match Errno::last() {
                Errno::ENXIO => break,
                e => return Err(e),
            }
        }
        // SAFETY: as above; a hole always exists at end of file.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = Errno::result(hole)?;
        let mut off_in = data;
        let mut off_out = data;
        while off_in < hole {
            // SAFETY: both fds are open; the offsets are valid i64s the kernel advances.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if Errno::result(n)? == 0 {
                return Err(Errno::EIO);
            }
        }
        offset = hole;
    }
    nix::unistd::ftruncate(dst.as_fd(), end)
}
