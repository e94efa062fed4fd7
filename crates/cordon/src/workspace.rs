//! The session's `/workspace`: a host directory, or a throwaway one, behind a size cap.
//!
//! Guarantees: a throwaway workspace is removed when the session ends; a host workspace is
//! created if missing (owned by the sandbox's host uid when cordon runs as root) and never
//! deleted.

use std::path::{Path, PathBuf};

use cordon_policy::Policy;

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
    Throwaway(PathBuf),
    Host(PathBuf),
}

/// A prepared workspace.
pub struct Workspace {
    kind: Kind,
    cap: Option<u64>,
}

fn other(path: &Path) -> impl FnOnce(std::io::Error) -> WorkspaceError + '_ {
    move |e| WorkspaceError::Other {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl Workspace {
    /// A workspace with the policy's size cap.
    pub fn prepare(
        _policy: &Policy,
        _session_id: &str,
        _uid: u32,
        _gid: u32,
        _rootful: bool,
    ) -> Result<Workspace, WorkspaceError> {
        Err(WorkspaceError::NoCap(
            "the capped workspace volume is not available in this build".into(),
        ))
    }

    /// A workspace without a size cap: the host directory bound directly.
    pub fn prepare_uncapped(
        policy: &Policy,
        session_id: &str,
        uid: u32,
        gid: u32,
        rootful: bool,
    ) -> Result<Workspace, WorkspaceError> {
        let (path, throwaway) = match &policy.sandbox.workspace {
            Some(p) => (absolute(p), false),
            None => (
                crate::session::state_dir().join("scratch").join(session_id),
                true,
            ),
        };
        let created = !path.exists();
        if created {
            std::fs::create_dir_all(&path).map_err(other(&path))?;
        } else if !path.is_dir() {
            return Err(WorkspaceError::Other {
                path,
                message: "exists and is not a directory".into(),
            });
        }
        if rootful && created {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(other(&path))?;
        }
        Ok(Workspace {
            kind: if throwaway {
                Kind::Throwaway(path)
            } else {
                Kind::Host(path)
            },
            cap: None,
        })
    }

    /// The host path the sandbox binds at `/workspace`.
    pub fn mount_source(&self) -> &Path {
        match &self.kind {
            Kind::Throwaway(p) | Kind::Host(p) => p,
        }
    }

    /// The cap, for the result.
    pub fn cap_description(&self) -> Option<String> {
        self.cap.map(|c| format!("{c} bytes"))
    }

    /// For the result: the host directory, or `throwaway`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Throwaway(_) => "throwaway".into(),
            Kind::Host(p) => p.display().to_string(),
        }
    }

    /// Ends the session's use of the workspace.
    pub fn finish(self) -> Result<(), String> {
        match self.kind {
            Kind::Throwaway(p) => {
                std::fs::remove_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))
            }
            Kind::Host(_) => Ok(()),
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
