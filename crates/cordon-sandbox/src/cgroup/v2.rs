//! cgroup v2: one session directory in the unified hierarchy.
//!
//! Guarantees: `kill_all` uses `cgroup.kill` (kernel 5.14+), which kills every task atomically
//! with respect to forks; on older kernels it freezes with `cgroup.freeze` (5.2+) and kills
//! listed tasks round by round. [`relocate_self`] moves only the calling process, only into
//! `<own>/cordon/_supervisor`, and only when nothing but the calling process is in our own
//! cgroup; if enabling controllers then fails it moves the process back.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::detect::{Detected, V2Status};
use super::fs::{CgroupFs, LinuxFs};
use super::kill::{kill_listed, listed_pids, wait_until};
use super::stats::{keyed, single};
use super::{
    enable_controllers, ensure_dir, CgroupError, CgroupPlan, CgroupStats, CgroupVersion, Leaves,
    SessionCgroup, CORDON_DIR, REQUIRED_CONTROLLERS,
};

/// The longest `kill_all` waits for the session to empty.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// How long one fallback round waits for killed tasks to leave before listing again.
const ROUND_WAIT: Duration = Duration::from_millis(50);
/// Where [`relocate_self`] puts the supervisor: under `cordon/`, with a name no session id can
/// take (session ids start with a letter or digit).
pub const SUPERVISOR_LEAF: &str = "_supervisor";

#[derive(Debug)]
pub(crate) struct V2Session {
    leaves: Leaves,
    dir: PathBuf,
    dir_fd: OwnedFd,
}

impl V2Session {
    pub(crate) fn open(fs: Arc<dyn CgroupFs>, plan: CgroupPlan) -> Result<Self, CgroupError> {
        let dir =
            plan.leaves
                .first()
                .map(|l| l.dir.clone())
                .ok_or_else(|| CgroupError::Unavailable {
                    hint: "cgroup v2 plan without a leaf".to_owned(),
                })?;
        let dir_fd = fs.open_dir(&dir).map_err(|errno| CgroupError::Open {
            path: dir.clone(),
            errno,
        })?;
        Ok(V2Session {
            leaves: Leaves::open(fs, plan)?,
            dir,
            dir_fd,
        })
    }

    fn read(&self, file: &str) -> Option<String> {
        self.leaves.read(&self.dir, file)
    }

    fn kill_by_rounds(&self) -> Result<(), CgroupError> {
        let fs = &*self.leaves.fs;
        let procs = self.leaves.procs_paths();
        let freeze = self.dir.join("cgroup.freeze");
        let start = Instant::now();
        let mut rounds = 0;
        loop {
            let remaining = listed_pids(fs, &procs).len();
            if remaining == 0 {
                return Ok(());
            }
            if start.elapsed() >= KILL_DEADLINE {
                return Err(CgroupError::KillTimeout {
                    path: self.dir.clone(),
                    remaining,
                    rounds,
                });
            }
            rounds += 1;
            // Best effort (kernel 5.2+); unlike v1, SIGKILL reaches frozen v2 tasks.
            let _ = fs.write(&freeze, "1");
            let killed = kill_listed(fs, &procs, &self.dir);
            let _ = fs.write(&freeze, "0");
            killed?;
            wait_until(ROUND_WAIT, || listed_pids(fs, &procs).is_empty());
        }
    }
}

impl SessionCgroup for V2Session {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.leaves.add_pid(pid)
    }

    fn stats(&self) -> CgroupStats {
        let events = self.read("memory.events");
        let event = |key| events.as_deref().and_then(|t| keyed(t, key));
        CgroupStats {
            peak_memory_bytes: self.read("memory.peak").and_then(|t| single(&t)),
            oom_killed: event("oom_kill").is_some_and(|n| n > 0),
            memory_limit_hit: event("max").is_some_and(|n| n > 0),
            pids_limit_hit: self
                .read("pids.events")
                .and_then(|t| keyed(&t, "max"))
                .is_some_and(|n| n > 0),
            cpu_usage_ns: self
                .read("cpu.stat")
                .and_then(|t| keyed(&t, "usage_usec"))
                .and_then(|us| us.checked_mul(1000)),
        }
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let fs = &*self.leaves.fs;
        let kill_file = self.dir.join("cgroup.kill");
        match fs.write(&kill_file, "1") {
            Ok(()) => {}
            Err(Errno::ENOENT) => return self.kill_by_rounds(),
            Err(errno) => {
                return Err(CgroupError::Write {
                    path: kill_file,
                    contents: "1".to_owned(),
                    errno,
                })
            }
        }
        let procs = self.leaves.procs_paths();
        if wait_until(KILL_DEADLINE, || listed_pids(fs, &procs).is_empty()) {
            return Ok(());
        }
        Err(CgroupError::KillTimeout {
            path: self.dir.clone(),
            remaining: listed_pids(fs, &procs).len(),
            rounds: 1,
        })
    }

    fn remove(mut self: Box<Self>) -> Result<(), CgroupError> {
        self.leaves.remove()
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.leaves.paths()
    }

    fn plan(&self) -> &CgroupPlan {
        &self.leaves.plan
    }

    fn clone_into_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.dir_fd.as_fd())
    }
}

/// On cgroup v2, when our own cgroup holds only this process and cannot hand controllers to a
/// child for that reason ([`V2Status::OwnCgroupHasProcesses`]), moves this process into
/// `<own>/cordon/_supervisor` and enables memory, pids and cpu for `<own>`'s children. Returns
/// the detection as it now stands. Any other state is returned unchanged.
///
/// Call it at start-up, before any child exists; the whole process (every thread) moves.
pub fn relocate_self(detected: &Detected) -> Result<Detected, CgroupError> {
    relocate_self_with(&LinuxFs, detected, std::process::id())
}

/// [`relocate_self`] with the filesystem behind the seam and the pid to move.
pub fn relocate_self_with(
    fs: &dyn CgroupFs,
    detected: &Detected,
    self_pid: u32,
) -> Result<Detected, CgroupError> {
    let Some(v2) = &detected.v2 else {
        return Ok(detected.clone());
    };
    if v2.status != V2Status::OwnCgroupHasProcesses {
        return Ok(detected.clone());
    }
    let own = v2.hierarchy.own_dir.clone();
    let own_procs = own.join("cgroup.procs");
    let others = listed_pids(fs, std::slice::from_ref(&own_procs))
        .into_iter()
        .filter(|pid| u32::try_from(*pid).ok() != Some(self_pid))
        .count();
    if others > 0 {
        return Err(CgroupError::SharedOwnCgroup { dir: own, others });
    }
    let cordon_dir = own.join(CORDON_DIR);
    ensure_dir(fs, &cordon_dir)?;
    let leaf = cordon_dir.join(SUPERVISOR_LEAF);
    ensure_dir(fs, &leaf)?;
    move_pid(fs, &leaf, self_pid)?;
    let missing: Vec<_> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !v2.enabled_for_children.contains(c))
        .collect();
    if let Err(err) = enable_controllers(fs, &own, &missing) {
        // Put the supervisor back where it was; the error already says what to fix.
        let _ = move_pid(fs, &own, self_pid);
        return Err(err);
    }
    let mut relocated = detected.clone();
    if let Some(v2) = relocated.v2.as_mut() {
        v2.enabled_for_children = REQUIRED_CONTROLLERS.to_vec();
        v2.status = V2Status::Usable;
    }
    relocated.version = Some(CgroupVersion::V2);
    relocated.hint = None;
    Ok(relocated)
}

fn move_pid(fs: &dyn CgroupFs, dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    fs.write(&path, &pid.to_string())
        .map_err(|errno| CgroupError::AddPid {
            pid: i32::try_from(pid).unwrap_or(i32::MAX),
            path,
            errno,
        })
}
