//! The session's `/workspace`: a host directory or a throwaway one, behind a size cap.
//!
//! Guarantees: by default the workspace is a capped volume (see `cordon_sandbox::workspace`):
//! writing past the cap is `ENOSPC` inside the sandbox and never fills the host disk; a host
//! directory is copied in before the command starts and the changes are copied back when the
//! session ends (never following a symlink out of it). Only when the policy allows
//! `workspace_cap` to be missing and no volume can be made is the host directory bound
//! directly, uncapped — and the result says so. A throwaway workspace leaves nothing behind.
//!
//! Canary files (`[detect.canary] files`) are planted after copy-in and before the command
//! starts, owned by the sandbox user; they never reach the host: never committed, never planted
//! over an entry the workspace already has (that canary is skipped, and the session says so),
//! and never planted into a host directory bound directly.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use cordon_policy::Policy;
use cordon_sandbox::plan::WorkspaceMount;
use cordon_sandbox::workspace::{
    self as volume, HostFacts, Owner, PlantError, SandboxMount, VolumeBackend, VolumeRequest,
    WorkspaceSource, WorkspaceVolume,
};

use crate::canary::{CanaryFile, SkippedFile};

/// Why a workspace could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The size cap cannot be enforced here (the run may go on uncapped only if the policy
    /// allows `workspace_cap` to be missing).
    #[error("{0}")]
    NoCap(String),
    #[error("workspace {path}: {message}")]
    Other { path: PathBuf, message: String },
}

enum Kind {
    Volume {
        volume: Box<WorkspaceVolume>,
        /// The detached mount handed to the sandbox (ext4 backend).
        detached: Option<OwnedFd>,
    },
    Bind {
        path: PathBuf,
        throwaway: bool,
        /// Who planted files belong to (root only; else they are the supervisor's own, which
        /// is the sandbox user).
        owner: Option<Owner>,
        /// A detached bind of `path` handed to the sandbox, when the plan already promised it
        /// a detached volume (the volume failed after the clone and the cap may be missing).
        detached: Option<OwnedFd>,
    },
}

/// A workspace decided but not yet built: the sandbox can be cloned meanwhile, since what it
/// mounts at `/workspace` ([`PlannedWorkspace::mount`]) is already known.
pub struct PlannedWorkspace {
    plan: volume::VolumePlan,
    source: WorkspaceSource,
}

impl PlannedWorkspace {
    /// What the sandbox's init mounts at `/workspace`.
    pub fn mount(&self) -> WorkspaceMount {
        match self.plan.backend {
            VolumeBackend::LoopExt4 => WorkspaceMount::Detached,
            VolumeBackend::Tmpfs => WorkspaceMount::Tmpfs {
                size_bytes: self.plan.cap_bytes,
                nr_inodes: self.plan.nr_inodes,
            },
        }
    }

    /// The cap and backend, for the result.
    pub fn cap_description(&self) -> String {
        cap_description(&self.plan)
    }

    /// Builds the volume (an ext4 volume: image, loop device, mount, copy-in).
    pub fn prepare(self) -> Result<Workspace, WorkspaceError> {
        let volume = WorkspaceVolume::prepare(&self.plan).map_err(|e| match e {
            volume::WorkspaceError::TooLarge { .. } => WorkspaceError::Other {
                path: match &self.source {
                    WorkspaceSource::HostDir(p) => p.clone(),
                    WorkspaceSource::Throwaway => PathBuf::new(),
                },
                message: e.to_string(),
            },
            other => WorkspaceError::NoCap(other.to_string()),
        })?;
        let detached = match volume
            .sandbox_mount()
            .map_err(|e| WorkspaceError::NoCap(e.to_string()))?
        {
            SandboxMount::Detached(fd) => Some(fd),
            SandboxMount::Tmpfs { .. } => None,
        };
        Ok(Workspace {
            kind: Kind::Volume {
                volume: Box::new(volume),
                detached,
            },
            source: self.source,
            canaries: Canaries::default(),
        })
    }
}

fn cap_description(p: &volume::VolumePlan) -> String {
    let backend = match p.backend {
        VolumeBackend::LoopExt4 => "ext4 volume",
        VolumeBackend::Tmpfs => "tmpfs",
    };
    match &p.note {
        Some(n) => format!("{} bytes ({backend}; {n})", p.cap_bytes),
        None => format!("{} bytes ({backend})", p.cap_bytes),
    }
}

/// A prepared workspace.
pub struct Workspace {
    kind: Kind,
    source: WorkspaceSource,
    canaries: Canaries,
}

/// The session's canary files: waiting for the workspace to be ready, planted, or skipped.
#[derive(Default)]
struct Canaries {
    pending: Vec<CanaryFile>,
    planted: Vec<CanaryFile>,
    skipped: Vec<SkippedFile>,
}

fn other(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |e| WorkspaceError::Other {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn source_of(policy: &Policy) -> Result<WorkspaceSource, WorkspaceError> {
    match &policy.sandbox.workspace {
        None => Ok(WorkspaceSource::Throwaway),
        Some(p) => {
            let path = absolute(p);
            if !path.exists() {
                std::fs::create_dir_all(&path).map_err(other(&path))?;
            } else if !path.is_dir() {
                return Err(WorkspaceError::Other {
                    path,
                    message: "exists and is not a directory".into(),
                });
            }
            Ok(WorkspaceSource::HostDir(path))
        }
    }
}

impl Workspace {
    /// Decides the workspace with the policy's size cap (checks only; see
    /// [`PlannedWorkspace::prepare`]).
    pub fn plan(policy: &Policy, uid: u32, gid: u32) -> Result<PlannedWorkspace, WorkspaceError> {
        let source = source_of(policy)?;
        let req = VolumeRequest {
            source: source.clone(),
            cap_bytes: policy.limits.workspace.0,
            owner: Owner { uid, gid },
            state_dir: crate::session::state_dir(),
            memory_limit_bytes: Some(policy.limits.memory.0),
        };
        let plan = volume::plan_volume(&req, &HostFacts::probe())
            .map_err(|e| WorkspaceError::NoCap(e.to_string()))?;
        Ok(PlannedWorkspace { plan, source })
    }

    /// A workspace without a size cap: the host directory bound directly.
    pub fn prepare_uncapped(
        policy: &Policy,
        session_id: &str,
        uid: u32,
        gid: u32,
        rootful: bool,
    ) -> Result<Workspace, WorkspaceError> {
        let source = source_of(policy)?;
        let (path, throwaway) = match &source {
            WorkspaceSource::HostDir(p) => (p.clone(), false),
            WorkspaceSource::Throwaway => {
                let p = crate::session::state_dir().join("scratch").join(session_id);
                std::fs::create_dir_all(&p).map_err(other(&p))?;
                if rootful {
                    std::os::unix::fs::chown(&p, Some(uid), Some(gid)).map_err(other(&p))?;
                }
                (p, true)
            }
        };
        Ok(Workspace {
            kind: Kind::Bind {
                path,
                throwaway,
                owner: rootful.then_some(Owner { uid, gid }),
                detached: None,
            },
            source,
            canaries: Canaries::default(),
        })
    }

    /// [`prepare_uncapped`](Self::prepare_uncapped), handed to the sandbox as a detached bind
    /// mount of the directory: for when the plan promised a detached volume that then could
    /// not be built. Submounts of the directory are not included.
    pub fn prepare_uncapped_detached(
        policy: &Policy,
        session_id: &str,
        uid: u32,
        gid: u32,
        rootful: bool,
    ) -> Result<Workspace, WorkspaceError> {
        let mut ws = Workspace::prepare_uncapped(policy, session_id, uid, gid, rootful)?;
        if let Kind::Bind { path, detached, .. } = &mut ws.kind {
            let dir = std::fs::File::open(&*path).map_err(other(path))?;
            let bind = volume::clone_mount(std::os::fd::AsFd::as_fd(&dir)).map_err(|e| {
                WorkspaceError::Other {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            *detached = Some(bind);
        }
        Ok(ws)
    }

    /// What the sandbox's init mounts at `/workspace`.
    pub fn mount(&self) -> WorkspaceMount {
        match &self.kind {
            Kind::Bind {
                detached: Some(_), ..
            } => WorkspaceMount::Detached,
            Kind::Bind { path, .. } => WorkspaceMount::Bind(path.clone()),
            Kind::Volume { volume, detached } => match (volume.plan().backend, detached) {
                (VolumeBackend::LoopExt4, Some(_)) => WorkspaceMount::Detached,
                _ => WorkspaceMount::Tmpfs {
                    size_bytes: volume.plan().cap_bytes,
                    nr_inodes: volume.plan().nr_inodes,
                },
            },
        }
    }

    /// The detached mount handed to the init ([`WorkspaceMount::Detached`]), if any.
    pub fn detached_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::Volume {
                detached: Some(fd), ..
            }
            | Kind::Bind {
                detached: Some(fd), ..
            } => Some(std::os::fd::AsFd::as_fd(fd)),
            _ => None,
        }
    }

    /// Takes the tmpfs the init made, fills it from the host directory, and plants the canary
    /// files that were waiting for it.
    pub fn adopt(&mut self, root: OwnedFd) -> Result<(), String> {
        match &mut self.kind {
            Kind::Volume { volume, .. } => {
                volume.adopt_tmpfs_root(root).map_err(|e| e.to_string())?
            }
            Kind::Bind { .. } => return Err("no tmpfs workspace was expected".into()),
        }
        self.plant_pending().map_err(|e| e.to_string())
    }

    /// Plants the session's canary files now if the workspace is ready, or as soon as it is
    /// (a tmpfs volume: when [`adopt`](Self::adopt) fills it). A canary whose path is taken
    /// (by a file, a symlink, …) is skipped, never planted over what is there; any other
    /// failure is an error.
    pub fn plant_canaries(&mut self, files: Vec<CanaryFile>) -> Result<(), WorkspaceError> {
        self.canaries.pending.extend(files);
        self.plant_pending()
    }

    fn plant_pending(&mut self) -> Result<(), WorkspaceError> {
        let ws_path = match &self.source {
            WorkspaceSource::HostDir(p) => p.clone(),
            WorkspaceSource::Throwaway => PathBuf::from("/workspace"),
        };
        let pending = std::mem::take(&mut self.canaries.pending);
        let mut pending = pending.into_iter();
        while let Some(file) = pending.next() {
            let rel = Path::new(&file.path);
            let planted = match &mut self.kind {
                Kind::Volume { volume, .. } => volume.plant(rel, &file.contents),
                Kind::Bind {
                    path,
                    throwaway: true,
                    owner,
                    ..
                } => {
                    let dir = std::fs::File::open(&*path).map_err(other(path))?;
                    // Nothing is committed from a throwaway directory: no record to keep.
                    let mut unused = volume::Snapshot::default();
                    volume::plant::plant(
                        std::os::fd::AsFd::as_fd(&dir),
                        rel,
                        &file.contents,
                        *owner,
                        &mut unused,
                    )
                }
                Kind::Bind {
                    throwaway: false, ..
                } => {
                    self.canaries.skipped.push(SkippedFile {
                        path: file.path.clone(),
                        reason: "the workspace is the host directory itself (no size cap): a canary file there would be written to the host".into(),
                    });
                    continue;
                }
            };
            match planted {
                Ok(()) => self.canaries.planted.push(file),
                Err(PlantError::Occupied { path, what }) => {
                    self.canaries.skipped.push(SkippedFile {
                        path: file.path.clone(),
                        reason: format!(
                            "the workspace already has {what} at {}; it is kept as it is",
                            path.display()
                        ),
                    });
                }
                Err(PlantError::NotReady) => {
                    // A tmpfs volume before the sandbox handed it over: later, in `adopt`.
                    self.canaries.pending.push(file);
                    self.canaries.pending.extend(pending);
                    return Ok(());
                }
                Err(e) => {
                    return Err(WorkspaceError::Other {
                        path: ws_path,
                        message: format!("canary file {}: {e}", file.path),
                    })
                }
            }
        }
        Ok(())
    }

    /// The canary files planted so far (their tokens go to the gateway).
    pub fn canaries_planted(&self) -> &[CanaryFile] {
        &self.canaries.planted
    }

    /// The canary files that were not planted, and why (one still waiting counts: the command
    /// has started by the time anyone asks).
    pub fn canaries_skipped(&self) -> Vec<SkippedFile> {
        let mut skipped = self.canaries.skipped.clone();
        skipped.extend(self.canaries.pending.iter().map(|f| SkippedFile {
            path: f.path.clone(),
            reason: "the workspace was never ready for it".into(),
        }));
        skipped
    }

    /// The cap and backend, for the result (`None` when uncapped).
    pub fn cap_description(&self) -> Option<String> {
        match &self.kind {
            Kind::Volume { volume, .. } => Some(cap_description(volume.plan())),
            Kind::Bind { .. } => None,
        }
    }

    /// For the result: the host directory, or `throwaway`.
    pub fn describe(&self) -> String {
        match &self.source {
            WorkspaceSource::Throwaway => "throwaway".into(),
            WorkspaceSource::HostDir(p) => p.display().to_string(),
        }
    }

    /// Ends the session's use of the workspace: the changes go back to the host directory
    /// (or, for a throwaway workspace, everything is dropped).
    pub fn finish(mut self) -> Result<(), String> {
        let committed = self.commit();
        let released = self.release();
        committed.and(released)
    }

    /// Copies the sandbox's changes back to the host directory (nothing for a throwaway
    /// workspace or a directly bound one). Call once, after the sandbox is gone, then
    /// [`release`](Self::release).
    pub fn commit(&mut self) -> Result<(), String> {
        if let (Kind::Volume { volume, .. }, WorkspaceSource::HostDir(_)) =
            (&mut self.kind, &self.source)
        {
            let stats = volume.commit_changes().map_err(|e| e.to_string())?;
            for s in &stats.skipped {
                eprintln!(
                    "cordon: workspace: not copied back: {}: {}",
                    s.path.display(),
                    s.reason
                );
            }
        }
        Ok(())
    }

    /// Whether releasing takes real time (an ext4 volume: unmount and loop device detach), so
    /// it is worth handing to a detached process (see `teardown`).
    pub fn slow_release(&self) -> bool {
        matches!(&self.kind, Kind::Volume { volume, .. } if volume.loop_index().is_some())
    }

    /// `(state dir, cap)` when this is an ext4 volume: the next session of the same cap can be
    /// given a spare (`cordon_sandbox::workspace::spares`).
    pub fn spare_key(&self) -> Option<(PathBuf, u64)> {
        match &self.kind {
            Kind::Volume { volume, .. } => volume.spare_key(),
            Kind::Bind { .. } => None,
        }
    }

    /// Releases what the workspace holds, copying nothing: a volume is unmounted and its loop
    /// device freed, a throwaway scratch directory removed.
    pub fn release(self) -> Result<(), String> {
        match self.kind {
            Kind::Volume { volume, detached } => {
                drop(detached);
                volume.discard().map_err(|e| e.to_string())
            }
            Kind::Bind {
                path,
                throwaway: true,
                detached,
                ..
            } => {
                drop(detached);
                std::fs::remove_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))
            }
            Kind::Bind { .. } => Ok(()),
        }
    }
}

/// Makes a path absolute against the current directory, without touching the filesystem.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host directory bound directly (no cap could be had, and the policy allowed that) is
    /// the host's own directory: a canary planted there would be a file on the host, so none
    /// is, and the session says why.
    #[test]
    fn no_canary_file_is_planted_in_a_host_directory_bound_directly() {
        let dir = tempfile::tempdir().unwrap();
        let mut policy = Policy::default();
        policy.sandbox.workspace = Some(dir.path().to_path_buf());
        // SAFETY: getuid/getgid have no failure mode.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let mut ws = Workspace::prepare_uncapped(&policy, "s-1", uid, gid, false).unwrap();
        let files = crate::canary::make_files(&[".env".into(), ".aws/credentials".into()]).unwrap();
        ws.plant_canaries(files).unwrap();
        assert!(ws.canaries_planted().is_empty());
        let skipped = ws.canaries_skipped();
        assert_eq!(skipped.len(), 2);
        assert!(
            skipped[0].reason.contains("the host directory itself"),
            "{skipped:?}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        ws.release().unwrap();
    }
}
