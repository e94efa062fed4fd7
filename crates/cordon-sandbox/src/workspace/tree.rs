//! Copy-in and commit between a host directory and a workspace volume, by directory fd.
//!
//! Guarantees, on both sides and in both directions:
//! - no symlink is ever followed: every open is `openat2` relative to an already-open directory
//!   with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, and a symlink is copied as a symlink (its
//!   target text, never resolved), so a link to `/etc/shadow` stays a link;
//! - a mount point on the host side is never crossed (`RESOLVE_NO_XDEV`): it is skipped and
//!   reported;
//! - fifos, sockets and device nodes are skipped and reported, never opened;
//! - setuid and setgid bits are never copied (a sandbox file must not become a setuid-root file
//!   on the host);
//! - a host file is replaced by renaming a fully written temporary over it, so a symlink or
//!   hardlink that sits at the target is replaced, never written through;
//! - a file the sandbox did not touch (same inode, ctime, mtime and size as copy-in left it; the
//!   sandbox cannot set a ctime back) is not rewritten, so edits made on the host during the
//!   session survive; a path the sandbox deleted is deleted on the host only if it was copied
//!   in, and a directory on the host that gained new entries during the session is kept;
//! - nesting deeper than [`MAX_DEPTH`] is refused on copy-in and skipped (reported) on commit,
//!   so a hostile tree cannot exhaust the supervisor's stack or file descriptors;
//! - a path reserved by cordon (a canary file planted after copy-in, see `plant`) is never
//!   committed, whatever the sandbox left there, and a directory made only to hold one is
//!   removed from the host again unless something else was committed into it.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, futimens, mkdirat, FileStat, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use serde::Serialize;

use super::WorkspaceError;

/// Deepest directory nesting copied in either direction (the walk holds two fds per level).
pub const MAX_DEPTH: usize = 128;

/// How many multiply-linked files are tracked to recreate their hardlinks; beyond this they are
/// copied as separate files (each tracked file holds one fd).
const MAX_TRACKED_LINKS: usize = 512;

const BLOCK: u64 = 4096;

/// Host uid/gid that copied-in entries get (the ids the sandbox user maps to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

/// The fingerprint of an inode as copy-in left it in the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: i64,
}

impl Fingerprint {
    fn of(st: &FileStat) -> Fingerprint {
        Fingerprint {
            ctime: (st.st_ctime, st.st_ctime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            size: st.st_size,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct SnapEntry {
    kind: Kind,
    ino: u64,
    mode: u32,
}

/// What copy-in put into the volume: the baseline commit compares against. Also what cordon
/// itself planted afterwards (canary files), which commit leaves out.
#[derive(Debug, Default)]
pub struct Snapshot {
    paths: HashMap<PathBuf, SnapEntry>,
    inodes: HashMap<u64, Fingerprint>,
    /// cordon's own files: never committed. The fingerprint tells whether the sandbox touched
    /// one (then commit reports it as skipped).
    reserved: HashMap<PathBuf, (u64, Fingerprint)>,
    /// Directories made in the volume only to hold reserved files.
    made_dirs: HashSet<PathBuf>,
}

impl Snapshot {
    /// Number of entries copied in.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    fn record(&mut self, rel: &Path, kind: Kind, st: &FileStat) {
        self.paths.insert(
            rel.to_path_buf(),
            SnapEntry {
                kind,
                ino: st.st_ino,
                mode: st.st_mode,
            },
        );
        self.inodes.insert(st.st_ino, Fingerprint::of(st));
    }

    /// Marks `rel` (a file cordon just created, `st` its status) as never to be committed, and
    /// `made_dirs` as made only to hold it.
    pub(super) fn reserve(&mut self, rel: &Path, st: &FileStat, made_dirs: Vec<PathBuf>) {
        self.reserved
            .insert(rel.to_path_buf(), (st.st_ino, Fingerprint::of(st)));
        self.made_dirs.extend(made_dirs);
    }

    /// Whether `rel` is a path cordon reserved.
    pub fn is_reserved(&self, rel: &Path) -> bool {
        self.reserved.contains_key(rel)
    }

    fn unchanged(&self, rel: &Path, kind: Kind, st: &FileStat) -> bool {
        self.paths
            .get(rel)
            .is_some_and(|e| e.kind == kind && e.ino == st.st_ino)
            && self.inodes.get(&st.st_ino) == Some(&Fingerprint::of(st))
    }
}

/// An entry that was not copied, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Bytes and inodes a host tree needs in a volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Estimate {
    pub bytes: u64,
    pub entries: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CopyInStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes: u64,
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CommitStats {
    pub files_written: u64,
    pub symlinks_written: u64,
    pub dirs_created: u64,
    pub hardlinks: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub bytes_written: u64,
    pub skipped: Vec<Skipped>,
}

// ---------------------------------------------------------------------------------------------
// Small, never-following primitives.

pub(super) fn how(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        )
}

/// Opens a directory beneath `parent` (`name` may be "." or a relative path).
pub(super) fn open_dir<P: ?Sized + nix::NixPath>(
    parent: BorrowedFd<'_>,
    name: &P,
) -> Result<OwnedFd, Errno> {
    openat2(parent, name, how(OFlag::O_RDONLY | OFlag::O_DIRECTORY))
}

/// Opens a file for reading; `O_NONBLOCK` so a fifo swapped in after `lstat` cannot hang us.
fn open_read(parent: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat2(
        parent,
        name,
        how(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY),
    )
}

pub(super) fn lstat_at(parent: BorrowedFd<'_>, name: &OsStr) -> Result<FileStat, Errno> {
    fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn kind_of(st: &FileStat) -> Option<Kind> {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Some(Kind::File),
        SFlag::S_IFDIR => Some(Kind::Dir),
        SFlag::S_IFLNK => Some(Kind::Symlink),
        _ => None,
    }
}

fn special_name(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFIFO => "fifo",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        _ => "unknown file type",
    }
}

/// Permission bits that may cross the boundary: never setuid/setgid; sticky only on dirs.
fn safe_mode(st: &FileStat, kind: Kind) -> Mode {
    let bits = match kind {
        Kind::Dir => st.st_mode & 0o1777,
        _ => st.st_mode & 0o777,
    };
    Mode::from_bits_truncate(bits)
}

fn times(st: &FileStat) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(st.st_atime, st.st_atime_nsec),
        TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
    )
}

fn list(dir: BorrowedFd<'_>) -> Result<Vec<OsString>, Errno> {
    let fd = open_dir(dir, ".")?;
    let mut handle = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for entry in handle.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Copies the data of `src` (a regular file of `size` bytes) into the empty file `dst`, only
/// its data extents (`SEEK_DATA`/`SEEK_HOLE`): holes stay holes, so a file that is mostly
/// hole (`truncate -s 16T`) costs the destination only the bytes actually written. Returns the
/// bytes copied.
fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, size: i64) -> Result<u64, Errno> {
    let mut copied = 0u64;
    let mut offset: i64 = 0;
    let mut out_pos: i64 = 0;
    while offset < size {
        // SAFETY: lseek on an open fd; -1/ENXIO means no data past `offset`.
        let data = unsafe { libc::lseek(src.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            match Errno::last() {
                Errno::ENXIO => break,
                e => return Err(e),
            }
        }
        // SAFETY: as above; there is always a hole at end of file.
        let hole = Errno::result(unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) })?
            .min(size);
        if out_pos != data {
            // SAFETY: lseek on an open fd.
            Errno::result(unsafe { libc::lseek(dst.as_raw_fd(), data, libc::SEEK_SET) })?;
        }
        let mut pos = data;
        while pos < hole {
            let mut from = pos;
            // SAFETY: both fds are open; `from` is a valid offset the kernel advances.
            let n = unsafe {
                libc::sendfile(
                    dst.as_raw_fd(),
                    src.as_raw_fd(),
                    &mut from,
                    (hole - pos) as usize,
                )
            };
            let n = Errno::result(n)?;
            if n == 0 {
                // The file shrank while we copied: stop at what is there.
                return finish_size(dst, pos, pos, copied);
            }
            pos += n as i64;
            copied += n as u64;
        }
        out_pos = hole;
        offset = hole;
    }
    finish_size(dst, out_pos, size, copied)
}

/// Gives `dst` (written up to `written_end`) its full length: only needed when the source
/// ends in a hole, which writes nothing.
fn finish_size(
    dst: BorrowedFd<'_>,
    written_end: i64,
    size: i64,
    copied: u64,
) -> Result<u64, Errno> {
    if written_end != size {
        nix::unistd::ftruncate(dst, size)?;
    }
    Ok(copied)
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn temp_name() -> OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    OsString::from(format!(
        ".cordon-commit-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Creates a fresh file in `dir` under an unused temporary name.
fn create_temp(dir: BorrowedFd<'_>) -> Result<(OsString, OwnedFd), Errno> {
    for _ in 0..16 {
        let name = temp_name();
        match openat2(
            dir,
            name.as_os_str(),
            how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL)
                .mode(Mode::from_bits_truncate(0o600)),
        ) {
            Ok(fd) => return Ok((name, fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::EEXIST)
}

/// Hardlinks the open file `existing` as `name` in `dir`: `AT_EMPTY_PATH` (root), else through
/// `/proc/self/fd` (which resolves to the open file itself, never to a path lookup).
fn link_fd(existing: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match linkat(existing, "", dir, name, AtFlags::AT_EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(Errno::ENOENT) | Err(Errno::EPERM) => {
            let proc_path = format!("/proc/self/fd/{}", existing.as_raw_fd());
            linkat(
                nix::fcntl::AT_FDCWD,
                proc_path.as_str(),
                dir,
                name,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        }
        Err(e) => Err(e),
    }
}

/// Removes `name` from `parent`, recursively for a directory, without following symlinks or
/// crossing mounts.
fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr, depth: usize) -> Result<(), Errno> {
    let st = match lstat_at(parent, name) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if kind_of(&st) != Some(Kind::Dir) {
        return unlinkat(parent, name, UnlinkatFlags::NoRemoveDir);
    }
    if depth > 2 * MAX_DEPTH {
        return Err(Errno::ELOOP);
    }
    let dir = open_dir(parent, name)?;
    for child in list(dir.as_fd())? {
        remove_tree(dir.as_fd(), &child, depth + 1)?;
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

// ---------------------------------------------------------------------------------------------
// Estimate.

/// What a copy of the tree under `root` would take: file sizes rounded up to 4 KiB blocks, or
/// the blocks allocated if fewer (holes are not copied); multiply-linked files once; a block per
/// directory and per long symlink.
pub fn estimate(root: BorrowedFd<'_>) -> Result<Estimate, WorkspaceError> {
    let fail = |path: &Path, op: &'static str| {
        let path = path.to_path_buf();
        move |errno| WorkspaceError::CopyIn { path, op, errno }
    };
    let top = open_dir(root, ".").map_err(fail(Path::new("."), "open"))?;
    let mut est = Estimate::default();
    let mut seen_links = HashSet::new();
    let mut stack = vec![(top, PathBuf::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        for name in list(dir.as_fd()).map_err(fail(&rel, "list"))? {
            let child = rel.join(&name);
            let st = match lstat_at(dir.as_fd(), &name) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(fail(&child, "stat")(e)),
            };
            est.entries += 1;
            match kind_of(&st) {
                Some(Kind::Dir) => {
                    if depth + 1 > MAX_DEPTH {
                        return Err(WorkspaceError::TooDeep {
                            path: child,
                            max: MAX_DEPTH,
                        });
                    }
                    est.bytes += BLOCK;
                    match open_dir(dir.as_fd(), name.as_os_str()) {
                        Ok(fd) => stack.push((fd, child, depth + 1)),
                        // Mount points and vanished dirs are not copied; copy-in reports them.
                        Err(Errno::EXDEV) | Err(Errno::ENOENT) => {}
                        Err(e) => return Err(fail(&child, "open")(e)),
                    }
                }
                Some(Kind::File) => {
                    if st.st_nlink > 1 && !seen_links.insert((st.st_dev, st.st_ino)) {
                        continue;
                    }
                    // Copies keep holes: a sparse file needs only its allocated blocks.
                    let apparent = (st.st_size as u64).div_ceil(BLOCK) * BLOCK;
                    est.bytes += apparent.min(st.st_blocks as u64 * 512);
                }
                // ext4 keeps symlink targets under 60 bytes in the inode.
                Some(Kind::Symlink) if st.st_size >= 60 => est.bytes += BLOCK,
                Some(Kind::Symlink) => {}
                None => {}
            }
        }
    }
    Ok(est)
}

// ---------------------------------------------------------------------------------------------
// Copy-in.

struct CopyIn {
    owner: Option<Owner>,
    snapshot: Snapshot,
    stats: CopyInStats,
    /// (host dev, host ino) of multiply-linked files -> the volume copy, open.
    links: HashMap<(u64, u64), OwnedFd>,
}

/// Copies the tree under `host` into the empty volume root `vol`, giving every entry to `owner`
/// (`None`: keep the caller's ids, for an unprivileged supervisor). Returns the baseline for
/// [`commit_tree`].
pub fn copy_in(
    host: BorrowedFd<'_>,
    vol: BorrowedFd<'_>,
    owner: Option<Owner>,
) -> Result<(Snapshot, CopyInStats), WorkspaceError> {
    let fail = |op: &'static str| {
        move |errno| WorkspaceError::CopyIn {
            path: ".".into(),
            op,
            errno,
        }
    };
    let host_root = open_dir(host, ".").map_err(fail("open host dir"))?;
    let vol_root = open_dir(vol, ".").map_err(fail("open volume"))?;
    let mut cx = CopyIn {
        owner,
        snapshot: Snapshot::default(),
        stats: CopyInStats::default(),
        links: HashMap::new(),
    };
    cx.walk(
        host_root,
        vol_root
            .try_clone()
            .map_err(|e| fail("dup volume fd")(io_errno(e)))?,
    )?;
    // The volume root takes the host dir's permissions; its owner is set by the caller.
    let st = fstat(host).map_err(fail("stat host dir"))?;
    fchmod(vol_root.as_fd(), safe_mode(&st, Kind::Dir)).map_err(fail("chmod volume root"))?;
    Ok((cx.snapshot, cx.stats))
}

/// One directory being walked: both sides open, the names still to visit, and what to do
/// once its children are done. The walk keeps an explicit stack of these (no recursion), so
/// depth costs two fds per level and no stack.
struct Frame<F> {
    from: OwnedFd,
    to: OwnedFd,
    rel: PathBuf,
    depth: usize,
    names: std::vec::IntoIter<OsString>,
    finish: Option<F>,
}

impl<F> Frame<F> {
    fn new(
        from: OwnedFd,
        to: OwnedFd,
        rel: PathBuf,
        depth: usize,
        finish: Option<F>,
    ) -> Result<Self, Errno> {
        let names = list(from.as_fd())?.into_iter();
        Ok(Frame {
            from,
            to,
            rel,
            depth,
            names,
            finish,
        })
    }
}

impl CopyIn {
    fn chown(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        match self.owner {
            Some(o) => fchown(fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid))),
            None => Ok(()),
        }
    }

    fn walk(&mut self, host_root: OwnedFd, vol_root: OwnedFd) -> Result<(), WorkspaceError> {
        let list_fail = |rel: &Path| {
            let path = rel.to_path_buf();
            move |errno| WorkspaceError::CopyIn {
                path,
                op: "list",
                errno,
            }
        };
        let mut stack: Vec<Frame<FileStat>> =
            vec![Frame::new(host_root, vol_root, PathBuf::new(), 0, None)
                .map_err(list_fail(Path::new(".")))?];
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.next() else {
                if let Some(frame) = stack.pop() {
                    self.finish_dir(&frame)?;
                }
                continue;
            };
            let (src, dst) = (top.from.as_fd(), top.to.as_fd());
            let child = top.rel.join(&name);
            let depth = top.depth + 1;
            let fail = |op: &'static str| {
                let path = child.clone();
                move |errno| WorkspaceError::CopyIn { path, op, errno }
            };
            let st = match lstat_at(src, &name) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(fail("stat")(e)),
            };
            match kind_of(&st) {
                Some(Kind::Dir) => {
                    if depth > MAX_DEPTH {
                        return Err(WorkspaceError::TooDeep {
                            path: child,
                            max: MAX_DEPTH,
                        });
                    }
                    let s = match open_dir(src, name.as_os_str()) {
                        Ok(fd) => fd,
                        Err(Errno::EXDEV) => {
                            self.skip(&child, "a mount point: not copied");
                            continue;
                        }
                        Err(Errno::ENOENT) => continue,
                        Err(e) => return Err(fail("open dir")(e)),
                    };
                    mkdirat(dst, name.as_os_str(), Mode::from_bits_truncate(0o700))
                        .map_err(fail("mkdir"))?;
                    let d = open_dir(dst, name.as_os_str()).map_err(fail("open new dir"))?;
                    let frame = Frame::new(s, d, child.clone(), depth, Some(st))
                        .map_err(list_fail(&child))?;
                    stack.push(frame);
                }
                Some(Kind::File) => self.file(src, dst, &name, &child, &st)?,
                Some(Kind::Symlink) => {
                    let target =
                        nix::fcntl::readlinkat(src, name.as_os_str()).map_err(fail("readlink"))?;
                    symlinkat(target.as_os_str(), dst, name.as_os_str())
                        .map_err(fail("symlink"))?;
                    if let Some(o) = self.owner {
                        fchownat(
                            dst,
                            name.as_os_str(),
                            Some(Uid::from_raw(o.uid)),
                            Some(Gid::from_raw(o.gid)),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map_err(fail("chown symlink"))?;
                    }
                    let now = lstat_at(dst, &name).map_err(fail("stat new symlink"))?;
                    self.snapshot.record(&child, Kind::Symlink, &now);
                    self.stats.symlinks += 1;
                }
                None => self.skip(&child, &format!("{}: not copied", special_name(&st))),
            }
        }
        Ok(())
    }

    /// After a directory's children: its owner, mode and times (setting them last keeps the
    /// copied mtime), and its snapshot entry.
    fn finish_dir(&mut self, frame: &Frame<FileStat>) -> Result<(), WorkspaceError> {
        let Some(st) = &frame.finish else {
            return Ok(());
        };
        let fail = |op: &'static str| {
            let path = frame.rel.clone();
            move |errno| WorkspaceError::CopyIn { path, op, errno }
        };
        let d = frame.to.as_fd();
        self.chown(d).map_err(fail("chown dir"))?;
        fchmod(d, safe_mode(st, Kind::Dir)).map_err(fail("chmod dir"))?;
        let (atime, mtime) = times(st);
        futimens(d, &atime, &mtime).map_err(fail("set dir times"))?;
        let now = fstat(d).map_err(fail("stat new dir"))?;
        self.snapshot.record(&frame.rel, Kind::Dir, &now);
        self.stats.dirs += 1;
        Ok(())
    }

    fn file(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        st: &FileStat,
    ) -> Result<(), WorkspaceError> {
        let fail = |op: &'static str| {
            let path = rel.to_path_buf();
            move |errno| WorkspaceError::CopyIn { path, op, errno }
        };
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)) {
                if link_fd(first.as_fd(), dst, name).is_ok() {
                    // A new link changes the inode's ctime: refresh its fingerprint.
                    let now = fstat(first.as_fd()).map_err(fail("stat linked file"))?;
                    self.snapshot.record(rel, Kind::File, &now);
                    self.stats.hardlinks += 1;
                    return Ok(());
                }
            }
        }
        let s = match open_read(src, name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(fail("open")(e)),
        };
        let opened = fstat(s.as_fd()).map_err(fail("stat open file"))?;
        if opened.st_ino != st.st_ino || kind_of(&opened) != Some(Kind::File) {
            self.skip(rel, "replaced while being copied: not copied");
            return Ok(());
        }
        let d = openat2(
            dst,
            name,
            how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL)
                .mode(Mode::from_bits_truncate(0o600)),
        )
        .map_err(fail("create"))?;
        let bytes = copy_data(s.as_fd(), d.as_fd(), opened.st_size).map_err(fail("copy data"))?;
        self.chown(d.as_fd()).map_err(fail("chown"))?;
        fchmod(d.as_fd(), safe_mode(st, Kind::File)).map_err(fail("chmod"))?;
        let (atime, mtime) = times(st);
        futimens(d.as_fd(), &atime, &mtime).map_err(fail("set times"))?;
        let now = fstat(d.as_fd()).map_err(fail("stat new file"))?;
        self.snapshot.record(rel, Kind::File, &now);
        self.stats.files += 1;
        self.stats.bytes += bytes;
        if st.st_nlink > 1 && self.links.len() < MAX_TRACKED_LINKS {
            self.links.insert((st.st_dev, st.st_ino), d);
        }
        Ok(())
    }

    fn skip(&mut self, path: &Path, reason: &str) {
        self.stats.skipped.push(Skipped {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Commit.

struct Commit<'a> {
    snapshot: &'a Snapshot,
    chown: bool,
    stats: CommitStats,
    seen: HashSet<PathBuf>,
    /// volume inode of a multiply-linked file -> its new host copy, open.
    links: HashMap<u64, OwnedFd>,
}

/// Brings the host tree under `host` in line with the volume under `vol` (the volume wins on a
/// conflict), measured against the copy-in `snapshot`. With `chown`, new host entries get the
/// uid/gid of their host parent directory and replaced ones keep the ids of what they replace
/// (needs root); without it, they stay the caller's.
pub fn commit_tree(
    vol: BorrowedFd<'_>,
    host: BorrowedFd<'_>,
    snapshot: &Snapshot,
    chown: bool,
) -> Result<CommitStats, WorkspaceError> {
    let fail = |op: &'static str| {
        move |errno| WorkspaceError::Commit {
            path: ".".into(),
            op,
            errno,
        }
    };
    let vol_root = open_dir(vol, ".").map_err(fail("open volume"))?;
    let host_root = open_dir(host, ".").map_err(fail("open host dir"))?;
    let mut cx = Commit {
        snapshot,
        chown,
        stats: CommitStats::default(),
        seen: HashSet::new(),
        links: HashMap::new(),
    };
    let host_again = open_dir(host_root.as_fd(), ".").map_err(fail("open host dir"))?;
    cx.walk(vol_root, host_root)?;
    cx.delete_gone(host_again.as_fd())?;
    Ok(cx.stats)
}

/// How to finish a host directory once its children are committed.
struct DirDone {
    vol_mode: u32,
    created: bool,
}

impl Commit<'_> {
    fn skip(&mut self, path: &Path, reason: &str) {
        self.stats.skipped.push(Skipped {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        });
    }

    fn give(&self, fd: BorrowedFd<'_>, owner: (u32, u32)) -> Result<(), Errno> {
        if self.chown {
            fchown(
                fd,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
            )?;
        }
        Ok(())
    }

    fn walk(&mut self, vol_root: OwnedFd, host_root: OwnedFd) -> Result<(), WorkspaceError> {
        let list_fail = |rel: &Path| {
            let path = rel.to_path_buf();
            move |errno| WorkspaceError::Commit {
                path,
                op: "list volume dir",
                errno,
            }
        };
        let mut stack: Vec<Frame<DirDone>> =
            vec![Frame::new(vol_root, host_root, PathBuf::new(), 0, None)
                .map_err(list_fail(Path::new(".")))?];
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.next() else {
                if let Some(frame) = stack.pop() {
                    self.finish_dir(&frame)?;
                    if let Some(parent) = stack.last() {
                        self.drop_if_only_for_canaries(parent.to.as_fd(), &frame);
                    }
                }
                continue;
            };
            let (vol, host) = (top.from.as_fd(), top.to.as_fd());
            let child = top.rel.join(&name);
            let depth = top.depth + 1;
            if let Some((ino, print)) = self.snapshot.reserved.get(&child) {
                // cordon's own file (a canary): never committed. Said only when the sandbox
                // changed or replaced it, so that a file the code wrote there is not lost
                // silently.
                let untouched = lstat_at(vol, &name).is_ok_and(|st| {
                    kind_of(&st) == Some(Kind::File)
                        && st.st_ino == *ino
                        && Fingerprint::of(&st) == *print
                });
                if !untouched {
                    self.skip(&child, "a canary file of this session: not committed");
                }
                continue;
            }
            self.seen.insert(child.clone());
            let fail = |op: &'static str| {
                let path = child.clone();
                move |errno| WorkspaceError::Commit { path, op, errno }
            };
            let parent = fstat(host).map_err(fail("stat host parent"))?;
            let st = lstat_at(vol, &name).map_err(fail("stat in volume"))?;
            let host_st = match lstat_at(host, &name) {
                Ok(h) => Some(h),
                Err(Errno::ENOENT) => None,
                Err(e) => return Err(fail("stat on host")(e)),
            };
            // New entries belong to the host parent's owner; replaced ones keep theirs.
            let owner = host_st.map_or((parent.st_uid, parent.st_gid), |h| (h.st_uid, h.st_gid));
            match kind_of(&st) {
                Some(Kind::Dir) => {
                    if depth > MAX_DEPTH {
                        self.skip(&child, "nested deeper than the limit: not committed");
                        continue;
                    }
                    let is_dir = host_st.as_ref().and_then(kind_of) == Some(Kind::Dir);
                    if !is_dir && host_st.is_some() && self.snapshot.made_dirs.contains(&child) {
                        // Made by cordon for a canary file, and the host has something else
                        // there now: the host's entry stays.
                        self.skip(
                            &child,
                            "made for a canary file, and the host has a non-directory there: not committed",
                        );
                        continue;
                    }
                    if !is_dir {
                        if host_st.is_some() {
                            remove_tree(host, &name, 0).map_err(fail("remove to make a dir"))?;
                        }
                        mkdirat(host, name.as_os_str(), Mode::from_bits_truncate(0o700))
                            .map_err(fail("mkdir"))?;
                    }
                    let h = match open_dir(host, name.as_os_str()) {
                        Ok(fd) => fd,
                        Err(Errno::EXDEV) => {
                            self.skip(&child, "a mount point on the host: not committed");
                            continue;
                        }
                        Err(e) => return Err(fail("open host dir")(e)),
                    };
                    if !is_dir {
                        self.give(h.as_fd(), (parent.st_uid, parent.st_gid))
                            .map_err(fail("chown dir"))?;
                        self.stats.dirs_created += 1;
                    }
                    let v = open_dir(vol, name.as_os_str()).map_err(fail("open volume dir"))?;
                    let done = DirDone {
                        vol_mode: st.st_mode,
                        created: !is_dir,
                    };
                    let frame = Frame::new(v, h, child.clone(), depth, Some(done))
                        .map_err(list_fail(&child))?;
                    stack.push(frame);
                }
                Some(Kind::File) => {
                    if self.snapshot.unchanged(&child, Kind::File, &st) {
                        self.stats.unchanged += 1;
                        continue;
                    }
                    self.file(vol, host, &name, &child, &st, owner)?;
                }
                Some(Kind::Symlink) => {
                    if self.snapshot.unchanged(&child, Kind::Symlink, &st) {
                        self.stats.unchanged += 1;
                        continue;
                    }
                    let target =
                        nix::fcntl::readlinkat(vol, name.as_os_str()).map_err(fail("readlink"))?;
                    let tmp = temp_name();
                    symlinkat(target.as_os_str(), host, tmp.as_os_str())
                        .map_err(fail("symlink"))?;
                    if self.chown {
                        let done = fchownat(
                            host,
                            tmp.as_os_str(),
                            Some(Uid::from_raw(owner.0)),
                            Some(Gid::from_raw(owner.1)),
                            AtFlags::AT_SYMLINK_NOFOLLOW,
                        );
                        if let Err(e) = done {
                            let _ = unlinkat(host, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                            return Err(fail("chown symlink")(e));
                        }
                    }
                    rename_over(host, &tmp, &name).map_err(fail("rename into place"))?;
                    self.stats.symlinks_written += 1;
                }
                None => self.skip(&child, &format!("{}: not committed", special_name(&st))),
            }
        }
        Ok(())
    }

    /// A host directory this commit created for a directory cordon made only to hold canary
    /// files is removed again if nothing was committed into it (`rmdir` fails otherwise).
    fn drop_if_only_for_canaries(&mut self, host_parent: BorrowedFd<'_>, frame: &Frame<DirDone>) {
        let created = frame.finish.as_ref().is_some_and(|d| d.created);
        if !created || !self.snapshot.made_dirs.contains(&frame.rel) {
            return;
        }
        if let Some(name) = frame.rel.file_name() {
            if unlinkat(host_parent, name, UnlinkatFlags::RemoveDir).is_ok() {
                self.stats.dirs_created = self.stats.dirs_created.saturating_sub(1);
            }
        }
    }

    /// A directory's mode, once its children are in: set when new or changed in the sandbox.
    fn finish_dir(&mut self, frame: &Frame<DirDone>) -> Result<(), WorkspaceError> {
        let Some(done) = &frame.finish else {
            return Ok(());
        };
        let old_mode = self.snapshot.paths.get(&frame.rel).map(|e| e.mode);
        if done.created || old_mode != Some(done.vol_mode) {
            let bits = Mode::from_bits_truncate(done.vol_mode & 0o1777);
            fchmod(frame.to.as_fd(), bits).map_err(|errno| WorkspaceError::Commit {
                path: frame.rel.clone(),
                op: "chmod dir",
                errno,
            })?;
        }
        Ok(())
    }

    fn file(
        &mut self,
        vol: BorrowedFd<'_>,
        host: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        st: &FileStat,
        owner: (u32, u32),
    ) -> Result<(), WorkspaceError> {
        let fail = |op: &'static str| {
            let path = rel.to_path_buf();
            move |errno| WorkspaceError::Commit { path, op, errno }
        };
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&st.st_ino) {
                let tmp = temp_name();
                if link_fd(first.as_fd(), host, &tmp).is_ok() {
                    rename_over(host, &tmp, name).map_err(fail("rename link into place"))?;
                    self.stats.hardlinks += 1;
                    return Ok(());
                }
            }
        }
        let src = open_read(vol, name).map_err(fail("open in volume"))?;
        let opened = fstat(src.as_fd()).map_err(fail("stat open file"))?;
        if opened.st_ino != st.st_ino || kind_of(&opened) != Some(Kind::File) {
            return Err(fail("open in volume")(Errno::ESTALE));
        }
        let (tmp, dst) = create_temp(host).map_err(fail("create temporary"))?;
        let written = (|| -> Result<u64, (&'static str, Errno)> {
            let bytes = copy_data(src.as_fd(), dst.as_fd(), opened.st_size)
                .map_err(|e| ("copy data", e))?;
            self.give(dst.as_fd(), owner).map_err(|e| ("chown", e))?;
            fchmod(dst.as_fd(), safe_mode(st, Kind::File)).map_err(|e| ("chmod", e))?;
            let (atime, mtime) = times(st);
            futimens(dst.as_fd(), &atime, &mtime).map_err(|e| ("set times", e))?;
            rename_over(host, &tmp, name).map_err(|e| ("rename into place", e))?;
            Ok(bytes)
        })();
        let bytes = match written {
            Ok(bytes) => bytes,
            Err((op, errno)) => {
                let _ = unlinkat(host, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                return Err(fail(op)(errno));
            }
        };
        self.stats.files_written += 1;
        self.stats.bytes_written += bytes;
        if st.st_nlink > 1 && self.links.len() < MAX_TRACKED_LINKS {
            self.links.insert(st.st_ino, dst);
        }
        Ok(())
    }

    /// Deletes, deepest first, what copy-in brought in and the volume no longer has.
    fn delete_gone(&mut self, host_root: BorrowedFd<'_>) -> Result<(), WorkspaceError> {
        let mut gone: Vec<(&PathBuf, Kind)> = self
            .snapshot
            .paths
            .iter()
            .filter(|(p, _)| !self.seen.contains(*p))
            .map(|(p, e)| (p, e.kind))
            .collect();
        gone.sort_by(|a, b| {
            b.0.components()
                .count()
                .cmp(&a.0.components().count())
                .then_with(|| a.0.cmp(b.0))
        });
        let mut skipped = Vec::new();
        for (rel, kind) in gone {
            let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
                continue;
            };
            let parent_fd = if parent.as_os_str().is_empty() {
                open_dir(host_root, ".")
            } else {
                open_dir(host_root, parent)
            };
            let parent_fd = match parent_fd {
                Ok(fd) => fd,
                // Already gone, or the path now runs through a symlink or a mount: leave it.
                Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR)
                | Err(Errno::EXDEV) => continue,
                Err(errno) => {
                    return Err(WorkspaceError::Commit {
                        path: rel.clone(),
                        op: "open parent to delete",
                        errno,
                    })
                }
            };
            let host_st = match lstat_at(parent_fd.as_fd(), name) {
                Ok(st) => st,
                Err(Errno::ENOENT) => continue,
                Err(errno) => {
                    return Err(WorkspaceError::Commit {
                        path: rel.clone(),
                        op: "stat to delete",
                        errno,
                    })
                }
            };
            let flag = if kind_of(&host_st) == Some(Kind::Dir) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            match unlinkat(parent_fd.as_fd(), name, flag) {
                Ok(()) => self.stats.deleted += 1,
                Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) if kind == Kind::Dir => {
                    skipped.push(Skipped {
                        path: rel.clone(),
                        reason: "deleted in the sandbox but holds new host entries: kept".into(),
                    })
                }
                Err(errno) => {
                    return Err(WorkspaceError::Commit {
                        path: rel.clone(),
                        op: "delete",
                        errno,
                    })
                }
            }
        }
        self.stats.skipped.extend(skipped);
        Ok(())
    }
}

/// Renames `tmp` over `name` in `dir`; a directory in the way is removed first (the volume
/// wins), and on failure the temporary is removed.
fn rename_over(dir: BorrowedFd<'_>, tmp: &OsStr, name: &OsStr) -> Result<(), Errno> {
    let first = nix::fcntl::renameat(dir, tmp, dir, name);
    let result = match first {
        Err(Errno::EISDIR) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {
            remove_tree(dir, name, 0).and_then(|()| nix::fcntl::renameat(dir, tmp, dir, name))
        }
        other => other,
    };
    if result.is_err() {
        let _ = unlinkat(dir, tmp, UnlinkatFlags::NoRemoveDir);
    }
    result
}
