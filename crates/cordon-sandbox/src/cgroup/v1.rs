//! cgroup v1: one session directory per controller hierarchy.
//!
//! Guarantees: `kill_all` freezes the session (when the freezer hierarchy is mounted) before
//! listing and killing, so a fork loop cannot outrun it, always thaws afterwards (a frozen task
//! cannot die), and repeats until every hierarchy's `cgroup.procs` is empty or
//! [`KILL_DEADLINE`] has passed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fs::CgroupFs;
use super::kill::{kill_listed, listed_pids, wait_until};
use super::stats::{keyed, single};
use super::{
    CgroupError, CgroupPlan, CgroupStats, CgroupVersion, Controller, Leaves, SessionCgroup,
};

/// The longest `kill_all` keeps trying.
const KILL_DEADLINE: Duration = Duration::from_secs(5);
/// How long to wait for `freezer.state` to read `FROZEN` before killing anyway (a task in
/// uninterruptible sleep can hold it in `FREEZING`).
const FREEZE_WAIT: Duration = Duration::from_millis(100);
/// How long one round waits for killed tasks to leave before listing again.
const ROUND_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub(crate) struct V1Session {
    leaves: Leaves,
}

impl V1Session {
    pub(crate) fn open(fs: Arc<dyn CgroupFs>, plan: CgroupPlan) -> Result<Self, CgroupError> {
        Ok(V1Session {
            leaves: Leaves::open(fs, plan)?,
        })
    }

    fn freeze(&self, dir: &Path) {
        let state = dir.join("freezer.state");
        // Best effort: without freezing, killing still works, only with more rounds.
        if self.leaves.fs.write(&state, "FROZEN").is_ok() {
            wait_until(FREEZE_WAIT, || {
                self.leaves
                    .fs
                    .read(&state)
                    .is_ok_and(|s| s.trim() == "FROZEN")
            });
        }
    }

    fn thaw(&self, dir: &Path) -> Result<(), CgroupError> {
        let state = dir.join("freezer.state");
        self.leaves
            .fs
            .write(&state, "THAWED")
            .map_err(|errno| CgroupError::Write {
                path: state,
                contents: "THAWED".to_owned(),
                errno,
            })
    }
}

impl SessionCgroup for V1Session {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.leaves.add_pid(pid)
    }

    fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::default();
        if let Some(dir) = self.leaves.leaf_for(Controller::Memory) {
            let read = |file| self.leaves.read(dir, file);
            stats.peak_memory_bytes = read("memory.max_usage_in_bytes").and_then(|t| single(&t));
            stats.oom_killed = read("memory.oom_control")
                .and_then(|t| keyed(&t, "oom_kill"))
                .is_some_and(|n| n > 0);
            // `failcnt` is not reliable (kernel 6.18 leaves it at 0 through an OOM kill), but
            // usage can never pass the limit, so a peak at the limit means it was reached.
            let limit = read("memory.limit_in_bytes").and_then(|t| single(&t));
            let peak_at_limit = matches!(
                (stats.peak_memory_bytes, limit),
                (Some(peak), Some(limit)) if peak >= limit
            );
            let failed = ["memory.failcnt", "memory.memsw.failcnt"]
                .into_iter()
                .filter_map(|file| read(file).and_then(|t| single(&t)))
                .any(|n| n > 0);
            stats.memory_limit_hit = peak_at_limit || failed || stats.oom_killed;
        }
        if let Some(dir) = self.leaves.leaf_for(Controller::Pids) {
            stats.pids_limit_hit = self
                .leaves
                .read(dir, "pids.events")
                .and_then(|t| keyed(&t, "max"))
                .is_some_and(|n| n > 0);
        }
        if let Some(dir) = self.leaves.leaf_for(Controller::Cpuacct) {
            stats.cpu_usage_ns = self
                .leaves
                .read(dir, "cpuacct.usage")
                .and_then(|t| single(&t));
        }
        stats
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        let fs = &*self.leaves.fs;
        let procs = self.leaves.procs_paths();
        let freezer = self.leaves.leaf_for(Controller::Freezer);
        let where_ = self
            .leaves
            .plan
            .leaves
            .first()
            .map(|l| l.dir.clone())
            .unwrap_or_default();
        let start = Instant::now();
        let mut rounds = 0;
        loop {
            let remaining = listed_pids(fs, &procs).len();
            if remaining == 0 {
                return Ok(());
            }
            if start.elapsed() >= KILL_DEADLINE {
                return Err(CgroupError::KillTimeout {
                    path: where_,
                    remaining,
                    rounds,
                });
            }
            rounds += 1;
            if let Some(dir) = freezer {
                self.freeze(dir);
            }
            let killed = kill_listed(fs, &procs, &where_);
            // Thaw even when killing failed: SIGKILL takes effect only once a task runs.
            if let Some(dir) = freezer {
                self.thaw(dir)?;
            }
            killed?;
            wait_until(ROUND_WAIT, || listed_pids(fs, &procs).is_empty());
        }
    }

    fn remove(mut self: Box<Self>) -> Result<(), CgroupError> {
        self.leaves.remove()
    }

    fn paths(&self) -> Vec<std::path::PathBuf> {
        self.leaves.paths()
    }

    fn plan(&self) -> &CgroupPlan {
        &self.leaves.plan
    }
}
