//! The workspace volume: `/workspace` with a hard size cap that ends in `ENOSPC`.
//!
//! Guarantees:
//! - Writing past the cap fails with `ENOSPC` inside the sandbox; the host filesystem gives up
//!   at most the cap (plus under a megabyte of ext4 metadata) per session.
//! - No session volume is ever mounted in a host-visible mount namespace: the supervisor holds
//!   it as a detached mount (`fsmount`), the sandbox init attaches a clone of it at
//!   `/workspace` in its own namespace, and the kernel unmounts it when the last of the two
//!   goes away. The loop device is bound with `LO_FLAGS_AUTOCLEAR` and its image is unlinked
//!   as soon as it is bound, so a supervisor killed with SIGKILL leaves no mount, no loop
//!   device and no image behind ([`cleanup_stale`] handles the microseconds in between). The
//!   exception is a volume taken from a [`spares`] (bound without autoclear, detached at
//!   release): a SIGKILLed session leaves its device bound until the next replenish.
//! - Copy-in and commit never follow a symlink, never cross a host mount point, never copy a
//!   setuid/setgid bit or a device node (see [`tree`]).
//! - A host directory larger than the cap is refused before anything is created.
//!
//! How the cap works, by backend:
//! - [`VolumeBackend::LoopExt4`] (cordon runs as root): a per-session ext4 filesystem in a
//!   sparse image file under `<state_dir>/volumes/`, copied from a template that `mkfs.ext4`
//!   (e2fsprogs) formats once per cap size (`<state_dir>/templates/`), attached to a loop
//!   device with `LOOP_CONFIGURE`, mounted `nosuid,nodev,noinit_itable,nobarrier`. ext4 counts
//!   blocks and inodes, so a full volume is `ENOSPC` for the sandbox and never touches the rest
//!   of the host disk. Files copied in belong to the host uid/gid the sandbox user maps to.
//! - [`VolumeBackend::Tmpfs`] (no root, or no loop devices): the sandbox init mounts a tmpfs
//!   of `size=cap` in its own user namespace and hands the supervisor a descriptor of it for
//!   copy-in and commit. A tmpfs lives in memory and its pages are charged to the memory
//!   cgroup of the process that writes them, so a tmpfs larger than the sandbox's memory limit
//!   would end in the OOM killer, not `ENOSPC`: [`plan_volume`] clamps the cap to half the
//!   memory limit and says so in the plan's `note`.

mod image;
mod loopdev;
mod mountapi;
pub mod plant;
pub mod spares;
pub mod tree;

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use image::{ensure_template, find_mkfs, mkfs_args, template_path};
pub use mountapi::{attach_detached_mount, clone_mount, create_tmpfs_volume};
pub use plant::PlantError;
pub use tree::{CommitStats, CopyInStats, Estimate, Owner, Skipped, Snapshot};

/// Default cap of `/workspace`.
pub const DEFAULT_CAP_BYTES: u64 = 1 << 30;
/// Smallest cap: below this ext4's own metadata is a large share of the volume.
pub const MIN_CAP_BYTES: u64 = 16 << 20;
/// Largest cap accepted (1 TiB).
pub const MAX_CAP_BYTES: u64 = 1 << 40;
/// Where images and templates live when cordon runs as root.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cordon";

/// One inode per this many bytes of cap (tmpfs; ext4 uses the same ratio in `mkfs_args`).
const BYTES_PER_INODE: u64 = 8192;
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Volumes with at least this much in them are shut down before release (see `release`).
const SHUTDOWN_THRESHOLD_BYTES: u64 = 64 << 20;
/// How long release waits for the kernel to free an autoclear loop device (it is synchronous
/// on the kernels measured; this only guards against a sandbox still holding the mount).
const LOOP_RELEASE_WAIT: Duration = Duration::from_millis(200);

/// A failed workspace step.
#[derive(Debug, Error)]
pub enum WorkspaceError {
    #[error("workspace cap {cap_bytes} bytes is outside {min}..={max}")]
    CapOutOfRange { cap_bytes: u64, min: u64, max: u64 },
    #[error("workspace path {0} must be absolute")]
    RelativePath(PathBuf),
    #[error("workspace state dir {path}: {op}: {source}")]
    StateDir {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace {path}: {op}: {source}")]
    HostDir {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace {path} needs about {needed} bytes, more than the {available} bytes its cap allows (raise the workspace cap or shrink the directory)")]
    TooLarge {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("workspace {path} holds {needed} files and directories, more than the {available} its cap allows (raise the workspace cap or shrink the directory)")]
    TooManyFiles {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("workspace {path} is nested deeper than {max} directories")]
    TooDeep { path: PathBuf, max: usize },
    #[error("the filesystem holding {state_dir} has {free} bytes free, less than the workspace cap of {cap_bytes} bytes (free space or lower the cap)")]
    HostDiskTooFull {
        state_dir: PathBuf,
        free: u64,
        cap_bytes: u64,
    },
    #[error(
        "mkfs.ext4 not found (looked in {searched}); install e2fsprogs: apt-get install e2fsprogs"
    )]
    MkfsMissing { searched: String },
    #[error("{program} failed ({status}): {stderr}")]
    Mkfs {
        program: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("workspace template {path}: {op}: {source}")]
    Template {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace image {path}: {op}: {source}")]
    Image {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("loop device: {op}: {errno}")]
    Loop { op: String, errno: Errno },
    #[error("{fs} volume: {op}: {errno}{kernel_log}")]
    Mount {
        fs: &'static str,
        op: String,
        errno: Errno,
        kernel_log: String,
    },
    #[error("copying the workspace in: {path}: {op}: {errno}")]
    CopyIn {
        path: PathBuf,
        op: &'static str,
        errno: Errno,
    },
    #[error("committing the workspace: {path}: {op}: {errno}")]
    Commit {
        path: PathBuf,
        op: &'static str,
        errno: Errno,
    },
    #[error("volume root handed over by the sandbox: {0}")]
    BadTmpfsRoot(String),
    #[error("workspace usage: {op}: {errno}")]
    Usage { op: &'static str, errno: Errno },
    #[error("the sandbox has not handed over its tmpfs volume yet (adopt_tmpfs_root)")]
    NotAdopted,
    #[error("/dev/loop{index} is still bound to {backing} after the volume was released: something (a sandbox still running?) holds the workspace mount")]
    LoopStillAttached { index: u32, backing: String },
}

/// What `/workspace` starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceSource {
    /// An empty volume, discarded after the session.
    Throwaway,
    /// A host directory (absolute; created if missing): copied in, and changes copied back by
    /// [`WorkspaceVolume::commit`].
    HostDir(PathBuf),
}

/// How the cap is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeBackend {
    /// ext4 in a sparse image on a loop device, mounted by the (root) supervisor.
    LoopExt4,
    /// A tmpfs the sandbox init mounts in its own user namespace (memory-backed).
    Tmpfs,
}

/// The host facts the backend choice depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// Real root in the initial user namespace (loop devices and ext4 mounts need it).
    pub privileged: bool,
    /// `/dev/loop-control` exists.
    pub loop_control: bool,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let init_userns = std::fs::read_to_string("/proc/self/uid_map")
            .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
            .unwrap_or(false);
        HostFacts {
            privileged: nix::unistd::geteuid().is_root() && init_userns,
            loop_control: Path::new("/dev/loop-control").exists(),
        }
    }
}

/// What the caller asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeRequest {
    pub source: WorkspaceSource,
    pub cap_bytes: u64,
    /// Host ids the sandbox user maps to; copied-in files are theirs.
    pub owner: Owner,
    pub state_dir: PathBuf,
    /// The sandbox's memory limit, if any (bounds a tmpfs volume).
    pub memory_limit_bytes: Option<u64>,
}

/// The decided volume: what [`WorkspaceVolume::prepare`] will build.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VolumePlan {
    pub source: WorkspaceSource,
    pub backend: VolumeBackend,
    /// The cap that is enforced (may be lower than requested, see `note`).
    pub cap_bytes: u64,
    pub requested_cap_bytes: u64,
    pub owner: Owner,
    pub state_dir: PathBuf,
    /// Inode limit of a tmpfs volume (ext4 derives its own from the cap).
    pub nr_inodes: u64,
    /// Why the plan differs from the request, for the result and the audit.
    pub note: Option<String>,
    /// Whether copied entries are given away (copy-in: to `owner`; commit: to the host
    /// owner). Needs root; without it everything stays the supervisor's own.
    pub chown: bool,
}

/// Chooses the backend and the effective cap. Pure.
pub fn plan_volume(req: &VolumeRequest, facts: &HostFacts) -> Result<VolumePlan, WorkspaceError> {
    if !(MIN_CAP_BYTES..=MAX_CAP_BYTES).contains(&req.cap_bytes) {
        return Err(WorkspaceError::CapOutOfRange {
            cap_bytes: req.cap_bytes,
            min: MIN_CAP_BYTES,
            max: MAX_CAP_BYTES,
        });
    }
    if let WorkspaceSource::HostDir(p) = &req.source {
        if !p.is_absolute() {
            return Err(WorkspaceError::RelativePath(p.clone()));
        }
    }
    if !req.state_dir.is_absolute() {
        return Err(WorkspaceError::RelativePath(req.state_dir.clone()));
    }
    let (backend, mut note) = match (facts.privileged, facts.loop_control) {
        (true, true) => (VolumeBackend::LoopExt4, None),
        (true, false) => (
            VolumeBackend::Tmpfs,
            Some("no /dev/loop-control: workspace is a memory-backed tmpfs".to_string()),
        ),
        (false, _) => (
            VolumeBackend::Tmpfs,
            Some("not root: workspace is a memory-backed tmpfs".to_string()),
        ),
    };
    let mut cap = req.cap_bytes;
    if backend == VolumeBackend::Tmpfs {
        if let Some(mem) = req.memory_limit_bytes {
            let half = (mem / 2).max(MIN_CAP_BYTES);
            if half < cap {
                cap = half;
                let text = format!(
                    "; cap lowered from {} to {cap} bytes (half the memory limit) so a full workspace is ENOSPC, not OOM",
                    req.cap_bytes
                );
                note.get_or_insert_with(String::new).push_str(&text);
            }
        }
    }
    Ok(VolumePlan {
        source: req.source.clone(),
        backend,
        cap_bytes: cap,
        requested_cap_bytes: req.cap_bytes,
        owner: req.owner,
        state_dir: req.state_dir.clone(),
        nr_inodes: (cap / BYTES_PER_INODE).max(1024),
        note,
        chown: facts.privileged,
    })
}

/// Where prepare spent its time, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    pub scan_us: u64,
    pub template_us: u64,
    pub image_us: u64,
    pub loop_us: u64,
    pub mount_us: u64,
    pub copy_in_us: u64,
    pub total_us: u64,
    /// The volume was a spare (`spares.rs`): no template copy, no `LOOP_CONFIGURE`.
    pub spare: bool,
}

/// A volume's fill level. `available_bytes == 0` means the sandbox hit the cap (`ENOSPC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VolumeUsage {
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub cap_bytes: u64,
    /// Host disk blocks the image holds (ext4 volumes only); never more than the cap.
    pub host_bytes: Option<u64>,
}

/// What the sandbox init mounts at `/workspace`.
#[derive(Debug)]
pub enum SandboxMount {
    /// A detached clone of the volume: `attach_detached_mount(fd, "/…/workspace")`.
    Detached(OwnedFd),
    /// Make it yourself: `create_tmpfs_volume(size_bytes, nr_inodes)`, attach it, and hand a
    /// [`clone_mount`] of it to the supervisor's [`WorkspaceVolume::adopt_tmpfs_root`].
    Tmpfs { size_bytes: u64, nr_inodes: u64 },
}

/// A session's workspace volume, as the supervisor holds it.
#[derive(Debug)]
pub struct WorkspaceVolume {
    plan: VolumePlan,
    host_dir: Option<OwnedFd>,
    /// The volume's root: the detached ext4 mount, or the adopted tmpfs.
    root: Option<OwnedFd>,
    /// (loop index, resolved path of its image).
    loop_dev: Option<(u32, String)>,
    /// The (already unlinked) image, kept open to report how much host disk it takes.
    image: Option<Flock<std::fs::File>>,
    /// Bytes in use on the volume right after mount (ext4's own accounting).
    empty_used_bytes: u64,
    /// The loop device is a spare's (bound without autoclear): release detaches it.
    detach_on_release: bool,
    snapshot: Snapshot,
    /// What the host dir needs, measured once in `prepare`.
    estimate: Option<tree::Estimate>,
    copy_in: Option<CopyInStats>,
    timings: Timings,
}

fn us(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

fn state_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> WorkspaceError + 'a {
    move |source| WorkspaceError::StateDir {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn ensure_private_dir(path: &Path) -> Result<(), WorkspaceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(state_err(path, "create"))
}

fn open_host_dir(path: &Path) -> Result<OwnedFd, WorkspaceError> {
    let err = |op| {
        move |source| WorkspaceError::HostDir {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(err("create"))?;
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(err("open"))?;
    Ok(OwnedFd::from(dir))
}

fn free_bytes(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    let st = nix::sys::statvfs::fstatvfs(fd)?;
    Ok((
        st.blocks_available() * st.fragment_size(),
        st.files_available(),
    ))
}

impl WorkspaceVolume {
    /// Builds the volume (supervisor side, before the sandbox is cloned): for
    /// [`VolumeBackend::LoopExt4`] everything up to a populated, mounted volume; for
    /// [`VolumeBackend::Tmpfs`] only the checks, the rest happens in
    /// [`adopt_tmpfs_root`](Self::adopt_tmpfs_root).
    pub fn prepare(plan: &VolumePlan) -> Result<WorkspaceVolume, WorkspaceError> {
        let start = Instant::now();
        let mut timings = Timings::default();
        let (host_dir, estimate) = match &plan.source {
            WorkspaceSource::HostDir(path) => {
                let fd = open_host_dir(path)?;
                let t = Instant::now();
                let est = tree::estimate(fd.as_fd())?;
                timings.scan_us = us(t);
                if est.bytes > plan.cap_bytes {
                    return Err(WorkspaceError::TooLarge {
                        path: path.clone(),
                        needed: est.bytes,
                        available: plan.cap_bytes,
                    });
                }
                (Some(fd), Some(est))
            }
            WorkspaceSource::Throwaway => (None, None),
        };
        let mut volume = WorkspaceVolume {
            plan: plan.clone(),
            host_dir,
            root: None,
            loop_dev: None,
            image: None,
            empty_used_bytes: 0,
            detach_on_release: false,
            snapshot: Snapshot::default(),
            estimate,
            copy_in: None,
            timings,
        };
        if plan.backend == VolumeBackend::LoopExt4 {
            volume.build_loop_volume()?;
            volume.populate()?;
        }
        volume.timings.total_us = us(start);
        Ok(volume)
    }

    fn build_loop_volume(&mut self) -> Result<(), WorkspaceError> {
        let state_dir = self.plan.state_dir.clone();
        ensure_private_dir(&state_dir.join("volumes"))?;
        ensure_private_dir(&state_dir.join("templates"))?;
        // Resolved, because sysfs names a loop device's backing file by its resolved path.
        let volumes = std::fs::canonicalize(state_dir.join("volumes"))
            .map_err(state_err(&state_dir, "resolve volumes dir"))?;
        let dir = std::fs::File::open(&volumes).map_err(state_err(&volumes, "open"))?;
        let (free, _) =
            free_bytes(dir.as_fd()).map_err(|e| state_err(&volumes, "statvfs")(e.into()))?;
        if free < self.plan.cap_bytes {
            return Err(WorkspaceError::HostDiskTooFull {
                state_dir,
                free,
                cap_bytes: self.plan.cap_bytes,
            });
        }

        let t = Instant::now();
        let template = image::ensure_template(&state_dir, self.plan.cap_bytes)?;
        self.timings.template_us = us(t);

        let t = Instant::now();
        let dev = match spares::claim(&volumes, self.plan.cap_bytes) {
            // A spare left by an earlier session's teardown: already bound, never mounted.
            Some(spare) => {
                self.timings.spare = true;
                self.loop_dev = Some((spare.device.index, spare.path.display().to_string()));
                self.image = Some(spare.image);
                self.detach_on_release = true;
                self.timings.image_us = us(t);
                spare.device
            }
            None => {
                let image = image::clone_template(&template, &volumes)?;
                self.timings.image_us = us(t);
                let t = Instant::now();
                let attached = loopdev::attach(&image.file, &image.path);
                // Bound or not, the image needs no name any more: the loop device holds the
                // file, and the blocks go back to the host the moment the device is released.
                let _ = std::fs::remove_file(&image.path);
                let dev = attached?;
                self.timings.loop_us = us(t);
                self.loop_dev = Some((dev.index, image.path.display().to_string()));
                self.image = Some(image.file);
                dev
            }
        };

        let t = Instant::now();
        let root = mountapi::mount_ext4(&dev.path()).map_err(|e| match e {
            WorkspaceError::Mount {
                fs,
                op,
                errno,
                kernel_log,
            } => WorkspaceError::Mount {
                fs,
                op: format!(
                    "{op} (from template {}: delete it to rebuild)",
                    template.display()
                ),
                errno,
                kernel_log,
            },
            other => other,
        })?;
        self.timings.mount_us = us(t);
        if let Ok(st) = nix::sys::statvfs::fstatvfs(root.as_fd()) {
            self.empty_used_bytes = (st.blocks() - st.blocks_free()) * st.fragment_size();
        }
        // From here the filesystem holds the device; our fd is no longer needed, and closing it
        // makes the filesystem the last opener (autoclear fires when it goes).
        drop(dev);
        self.root = Some(root);
        Ok(())
    }

    /// Gives the volume root to the owner and copies the host dir in.
    fn populate(&mut self) -> Result<(), WorkspaceError> {
        let Some(root) = &self.root else {
            return Err(WorkspaceError::NotAdopted);
        };
        if self.plan.chown {
            let owner = self.plan.owner;
            nix::unistd::fchownat(
                root.as_fd(),
                "",
                Some(nix::unistd::Uid::from_raw(owner.uid)),
                Some(nix::unistd::Gid::from_raw(owner.gid)),
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            )
            .map_err(|errno| WorkspaceError::CopyIn {
                path: ".".into(),
                op: "chown volume root",
                errno,
            })?;
        }
        let (Some(host), WorkspaceSource::HostDir(path)) = (&self.host_dir, &self.plan.source)
        else {
            return Ok(());
        };
        let t = Instant::now();
        let (free, free_inodes) =
            free_bytes(root.as_fd()).map_err(|errno| WorkspaceError::CopyIn {
                path: ".".into(),
                op: "statvfs volume",
                errno,
            })?;
        let est = self.estimate.unwrap_or_default();
        if est.bytes > free {
            return Err(WorkspaceError::TooLarge {
                path: path.clone(),
                needed: est.bytes,
                available: free,
            });
        }
        if est.entries > free_inodes {
            return Err(WorkspaceError::TooManyFiles {
                path: path.clone(),
                needed: est.entries,
                available: free_inodes,
            });
        }
        let owner = self.plan.chown.then_some(self.plan.owner);
        let (snapshot, stats) =
            tree::copy_in(host.as_fd(), root.as_fd(), owner).map_err(|e| match e {
                WorkspaceError::CopyIn {
                    errno: Errno::ENOSPC | Errno::EDQUOT,
                    ..
                } => WorkspaceError::TooLarge {
                    path: path.clone(),
                    needed: est.bytes,
                    available: free,
                },
                other => other,
            })?;
        self.snapshot = snapshot;
        self.copy_in = Some(stats);
        self.timings.copy_in_us = us(t);
        Ok(())
    }

    /// How full the volume is, and (ext4) how much host disk its image takes right now.
    pub fn usage(&self) -> Result<VolumeUsage, WorkspaceError> {
        let root = self.root.as_ref().ok_or(WorkspaceError::NotAdopted)?;
        let fail = |op: &'static str| move |errno| WorkspaceError::Usage { op, errno };
        let st = nix::sys::statvfs::fstatvfs(root.as_fd()).map_err(fail("statvfs volume"))?;
        let block = st.fragment_size();
        let host_bytes = match &self.image {
            Some(image) => Some(
                nix::sys::stat::fstat(image.as_fd())
                    .map_err(fail("stat image"))?
                    .st_blocks as u64
                    * 512,
            ),
            None => None,
        };
        Ok(VolumeUsage {
            used_bytes: (st.blocks() - st.blocks_free()) * block,
            available_bytes: st.blocks_available() * block,
            cap_bytes: self.plan.cap_bytes,
            host_bytes,
        })
    }

    /// `(state dir, cap)` of an ext4 volume: what [`spares::replenish`] needs to leave a
    /// replacement for the next session once this one is released.
    pub fn spare_key(&self) -> Option<(PathBuf, u64)> {
        (self.plan.backend == VolumeBackend::LoopExt4)
            .then(|| (self.plan.state_dir.clone(), self.plan.cap_bytes))
    }

    /// The loop device number backing an ext4 volume (`/dev/loopN`), for diagnostics.
    pub fn loop_index(&self) -> Option<u32> {
        self.loop_dev.as_ref().map(|(index, _)| *index)
    }

    pub fn plan(&self) -> &VolumePlan {
        &self.plan
    }

    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// What copy-in did (None for a throwaway volume, or a tmpfs not yet adopted).
    pub fn copy_in_stats(&self) -> Option<&CopyInStats> {
        self.copy_in.as_ref()
    }

    /// The volume root as the supervisor holds it (an `O_PATH` descriptor of the detached
    /// mount, or the adopted tmpfs root).
    pub fn root(&self) -> Option<BorrowedFd<'_>> {
        self.root.as_ref().map(AsFd::as_fd)
    }

    /// `/proc/self/fd/N` for [`root`](Self::root): a path to the volume that works in this
    /// process and in children cloned or forked from it (not across `exec`: the fd is
    /// close-on-exec).
    pub fn mount_source(&self) -> Option<PathBuf> {
        self.root
            .as_ref()
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
    }

    /// What the sandbox init should put at `/workspace`.
    pub fn sandbox_mount(&self) -> Result<SandboxMount, WorkspaceError> {
        match (self.plan.backend, &self.root) {
            (VolumeBackend::LoopExt4, Some(root)) => {
                Ok(SandboxMount::Detached(mountapi::clone_mount(root.as_fd())?))
            }
            (VolumeBackend::LoopExt4, None) => Err(WorkspaceError::NotAdopted),
            (VolumeBackend::Tmpfs, _) => Ok(SandboxMount::Tmpfs {
                size_bytes: self.plan.cap_bytes,
                nr_inodes: self.plan.nr_inodes,
            }),
        }
    }

    /// Takes the tmpfs the sandbox init made (checked: a tmpfs no larger than the cap, with no
    /// more inodes than planned, empty) and copies the host dir into it. Tmpfs backend only.
    pub fn adopt_tmpfs_root(&mut self, fd: OwnedFd) -> Result<(), WorkspaceError> {
        if self.plan.backend != VolumeBackend::Tmpfs || self.root.is_some() {
            return Err(WorkspaceError::BadTmpfsRoot(
                "not expected: this volume is not a tmpfs waiting for its root".into(),
            ));
        }
        let fs = nix::sys::statfs::fstatfs(fd.as_fd())
            .map_err(|e| WorkspaceError::BadTmpfsRoot(format!("fstatfs: {e}")))?;
        if fs.filesystem_type().0 as i64 != TMPFS_MAGIC {
            return Err(WorkspaceError::BadTmpfsRoot("not a tmpfs".into()));
        }
        let size = fs.blocks() * fs.block_size() as u64;
        if size > self.plan.cap_bytes {
            return Err(WorkspaceError::BadTmpfsRoot(format!(
                "{size} bytes, larger than the cap {}",
                self.plan.cap_bytes
            )));
        }
        if fs.files() > self.plan.nr_inodes {
            return Err(WorkspaceError::BadTmpfsRoot(format!(
                "{} inodes, more than the plan's {}",
                fs.files(),
                self.plan.nr_inodes
            )));
        }
        let dir = nix::fcntl::openat(
            fd.as_fd(),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| WorkspaceError::BadTmpfsRoot(format!("open: {e}")))?;
        let mut entries = nix::dir::Dir::from_fd(dir)
            .map_err(|e| WorkspaceError::BadTmpfsRoot(format!("opendir: {e}")))?;
        let nonempty = entries.iter().flatten().any(|e| {
            let n = e.file_name().to_bytes();
            n != b"." && n != b".."
        });
        if nonempty {
            return Err(WorkspaceError::BadTmpfsRoot("not empty".into()));
        }
        self.root = Some(fd);
        let t = Instant::now();
        self.populate()?;
        self.timings.total_us += us(t);
        Ok(())
    }

    /// Plants one of cordon's own files (a canary credential) at `rel` in the volume, after
    /// copy-in and before the sandbox's command starts: owned by the sandbox user, never
    /// committed back to the host (see [`plant::plant`]).
    pub fn plant(&mut self, rel: &Path, contents: &[u8]) -> Result<(), PlantError> {
        let root = self.root.as_ref().ok_or(PlantError::NotReady)?;
        let owner = self.plan.chown.then_some(self.plan.owner);
        plant::plant(root.as_fd(), rel, contents, owner, &mut self.snapshot)
    }

    /// Copies the sandbox's changes back to the host dir (after the sandbox is gone), then
    /// releases the volume. A throwaway volume is just released.
    pub fn commit(mut self) -> Result<CommitStats, WorkspaceError> {
        let result = self.commit_changes();
        let released = self.release();
        let stats = result?;
        released?;
        Ok(stats)
    }

    /// Copies the sandbox's changes back to the host dir (after the sandbox is gone) and keeps
    /// the volume; [`discard`](Self::discard) releases it later. Nothing for a throwaway
    /// volume.
    pub fn commit_changes(&mut self) -> Result<CommitStats, WorkspaceError> {
        match (&self.plan.source, &self.root, &self.host_dir) {
            (WorkspaceSource::HostDir(_), Some(root), Some(host)) => tree::commit_tree(
                root.as_fd(),
                host.as_fd(),
                &self.snapshot,
                self.plan.chown,
                self.plan.cap_bytes,
            ),
            (WorkspaceSource::HostDir(_), None, _) => Err(WorkspaceError::NotAdopted),
            _ => Ok(CommitStats::default()),
        }
    }

    /// Drops the volume and everything written to it.
    pub fn discard(mut self) -> Result<(), WorkspaceError> {
        self.release()
    }

    /// Shutting ext4 down spares the write-back of everything the sandbox left dirty, but the
    /// kernel logs it at KERN_ALERT (onto the console): only worth it for a well-filled volume.
    fn worth_shutting_down(&self, root: &OwnedFd) -> bool {
        nix::sys::statvfs::fstatvfs(root.as_fd())
            .map(|st| {
                let used = (st.blocks() - st.blocks_free()) * st.fragment_size();
                used.saturating_sub(self.empty_used_bytes) >= SHUTDOWN_THRESHOLD_BYTES
            })
            .unwrap_or(false)
    }

    fn release(&mut self) -> Result<(), WorkspaceError> {
        if let Some(root) = self.root.take() {
            if self.plan.backend == VolumeBackend::LoopExt4 && self.worth_shutting_down(&root) {
                // Skip writing back data nobody will read; failure only costs time.
                if let Ok(dir) = nix::fcntl::openat(
                    root.as_fd(),
                    ".",
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                ) {
                    let _ = mountapi::shutdown_ext4(dir.as_fd());
                }
            }
            drop(root);
        }
        self.image = None;
        if self.detach_on_release {
            // A spare is bound without autoclear: detach it now that the filesystem is gone
            // (if a sandbox process still holds the mount, the kernel only sets autoclear).
            if let Some((index, _)) = &self.loop_dev {
                let _ = loopdev::clear(*index);
            }
        }
        if let Some((index, backing)) = self.loop_dev.take() {
            let deadline = Instant::now() + LOOP_RELEASE_WAIT;
            // sysfs appends " (deleted)" to the unlinked image's path.
            let still_ours =
                || loopdev::backing_file(index).is_some_and(|b| b.starts_with(backing.as_str()));
            while still_ours() {
                if Instant::now() >= deadline {
                    return Err(WorkspaceError::LoopStillAttached { index, backing });
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }
}

/// What [`cleanup_stale`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CleanupReport {
    pub loop_devices_cleared: Vec<u32>,
    pub files_removed: Vec<PathBuf>,
    /// Spare volumes released ([`spares`]).
    pub spares_released: usize,
}

/// Frees what a killed cordon may have left under `state_dir`: loop devices bound to its
/// images (an idle one is detached; one still mounted by a live session only gets autoclear,
/// which it already has) and image or template temporaries no live process holds a lock on.
/// Safe to run while other sessions are running.
pub fn cleanup_stale(state_dir: &Path) -> Result<CleanupReport, WorkspaceError> {
    let mut report = CleanupReport::default();
    let volumes = state_dir.join("volumes");
    // sysfs shows resolved paths; a state dir that does not exist has nothing to clean.
    let resolved = std::fs::canonicalize(&volumes).unwrap_or_else(|_| volumes.clone());
    report.spares_released = spares::release_all(&resolved);
    let prefix = format!("{}/", resolved.display());
    for (index, backing) in loopdev::bound_devices() {
        if backing.starts_with(&prefix) {
            loopdev::clear(index)?;
            if loopdev::backing_file(index).is_none() {
                report.loop_devices_cleared.push(index);
            }
        }
    }
    // Every file under volumes/; only build temporaries under templates/.
    let candidates = [(volumes, ""), (state_dir.join("templates"), ".tmp-")];
    for (dir, prefix) in candidates {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(state_err(&dir, "list")(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(prefix) {
                continue;
            }
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue; // spares/: released above
            }
            let Ok(file) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
            else {
                continue;
            };
            // A live creator holds an exclusive flock for as long as it needs the name.
            if let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                std::fs::remove_file(&path).map_err(state_err(&path, "remove stale file"))?;
                report.files_removed.push(path);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(source: WorkspaceSource, cap: u64, mem: Option<u64>) -> VolumeRequest {
        VolumeRequest {
            source,
            cap_bytes: cap,
            owner: Owner {
                uid: 1_900_000,
                gid: 1_900_000,
            },
            state_dir: PathBuf::from("/var/lib/cordon"),
            memory_limit_bytes: mem,
        }
    }

    const ROOT: HostFacts = HostFacts {
        privileged: true,
        loop_control: true,
    };
    const USER: HostFacts = HostFacts {
        privileged: false,
        loop_control: true,
    };

    #[test]
    fn root_with_loop_devices_gets_an_ext4_volume_with_the_full_cap() {
        let plan = plan_volume(
            &request(
                WorkspaceSource::Throwaway,
                DEFAULT_CAP_BYTES,
                Some(512 << 20),
            ),
            &ROOT,
        );
        assert!(matches!(
            plan,
            Ok(VolumePlan {
                backend: VolumeBackend::LoopExt4,
                cap_bytes: DEFAULT_CAP_BYTES,
                note: None,
                ..
            })
        ));
    }

    #[test]
    fn a_tmpfs_volume_is_capped_at_half_the_memory_limit_and_says_so() {
        let plan = plan_volume(
            &request(
                WorkspaceSource::Throwaway,
                DEFAULT_CAP_BYTES,
                Some(512 << 20),
            ),
            &USER,
        );
        let Ok(plan) = plan else {
            panic!("plan failed: {plan:?}")
        };
        assert_eq!(plan.backend, VolumeBackend::Tmpfs);
        assert_eq!(plan.cap_bytes, 256 << 20);
        assert_eq!(plan.requested_cap_bytes, DEFAULT_CAP_BYTES);
        assert_eq!(plan.nr_inodes, (256 << 20) / 8192);
        assert!(plan
            .note
            .is_some_and(|n| n.contains("not root") && n.contains("ENOSPC, not OOM")));
    }

    #[test]
    fn a_tmpfs_volume_below_half_the_memory_keeps_its_cap() {
        let plan = plan_volume(
            &request(WorkspaceSource::Throwaway, 64 << 20, Some(512 << 20)),
            &USER,
        );
        assert!(matches!(plan, Ok(VolumePlan { cap_bytes, .. }) if cap_bytes == 64 << 20));
    }

    #[test]
    fn root_without_loop_control_falls_back_to_tmpfs_with_a_note() {
        let facts = HostFacts {
            privileged: true,
            loop_control: false,
        };
        let plan = plan_volume(
            &request(WorkspaceSource::Throwaway, DEFAULT_CAP_BYTES, None),
            &facts,
        );
        assert!(matches!(
            plan,
            Ok(VolumePlan { backend: VolumeBackend::Tmpfs, cap_bytes: DEFAULT_CAP_BYTES, note: Some(ref n), .. })
                if n.contains("loop-control")
        ));
    }

    #[test]
    fn caps_outside_the_range_and_relative_paths_are_refused() {
        assert!(matches!(
            plan_volume(&request(WorkspaceSource::Throwaway, 1 << 20, None), &ROOT),
            Err(WorkspaceError::CapOutOfRange { .. })
        ));
        assert!(matches!(
            plan_volume(&request(WorkspaceSource::Throwaway, 2 << 40, None), &ROOT),
            Err(WorkspaceError::CapOutOfRange { .. })
        ));
        assert!(matches!(
            plan_volume(
                &request(
                    WorkspaceSource::HostDir("work".into()),
                    DEFAULT_CAP_BYTES,
                    None
                ),
                &ROOT
            ),
            Err(WorkspaceError::RelativePath(_))
        ));
    }

    #[test]
    fn mkfs_is_told_no_journal_no_reserve_and_lazy_init() {
        let args = mkfs_args(Path::new("/x.img"));
        assert_eq!(
            args.join(" "),
            "-q -F -b 4096 -i 8192 -I 256 -m 0 -L cordon-ws -O ^has_journal,^resize_inode,sparse_super2 \
             -E lazy_itable_init=1,lazy_journal_init=1,nodiscard,num_backup_sb=0,root_owner=0:0 /x.img"
        );
    }

    #[test]
    fn templates_are_keyed_by_cap_and_format_version() {
        assert_eq!(
            template_path(Path::new("/var/lib/cordon"), 1 << 30),
            PathBuf::from("/var/lib/cordon/templates/ext4-v2-1073741824.img")
        );
    }
}
