//! cgroups for one sandbox session: limits, membership, statistics, kill, removal.
//!
//! Guarantees:
//! - cordon creates cgroups only as `<own cgroup>/cordon/<session-id>` in each hierarchy it uses
//!   (our own cgroup as `/proc/self/cgroup` names it), and removes only those. It never mounts,
//!   unmounts, moves or re-binds a hierarchy, and never writes to a cgroup it did not create,
//!   with two exceptions on cgroup v2: enabling memory/pids/cpu in our own
//!   `cgroup.subtree_control` so `cordon/` can have them, and, only when asked through
//!   [`relocate_self`], moving the supervisor's own process into `cordon/_supervisor`.
//! - The `cordon/` parent is created on demand and left in place: it is empty between sessions,
//!   costs nothing, and removing it would race with a concurrent session's creation.
//! - A session cgroup is created with all its limits written before [`create`] returns; if any
//!   step fails, the directories created so far are removed and the error names the step.
//! - After [`SessionCgroup::kill_all`] returns `Ok`, the session's cgroups held no process when
//!   last read; [`SessionCgroup::remove`] then leaves no directory of the session behind.
//! - Signals are sent through pidfds opened while the process was seen in the session's
//!   `cgroup.procs`, so a recycled pid never gets a signal meant for a sandboxed process.
//!
//! Two implementations sit behind [`SessionCgroup`]: cgroup v2 (one hierarchy, `cgroup.kill`)
//! and cgroup v1 (one directory per controller hierarchy, freezer plus SIGKILL). [`detect`]
//! chooses; all filesystem access goes through [`fs::CgroupFs`] so fixture trees can stand in
//! for the kernel in tests.

mod detect;
pub mod fs;
mod kill;
mod plan;
mod stats;
mod v1;
mod v2;

use std::fmt;
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use serde::Serialize;

pub use detect::{
    detect, detect_host, detect_with, parse_mountinfo, parse_proc_cgroup, Detected, Hierarchy,
    MountEntry, ProcCgroupEntry, V2Info, V2Status,
};
pub use fs::{CgroupFs, LinuxFs};
pub use plan::{plan, validate_session_id, CgroupPlan, Leaf, Step, CPU_PERIOD_US};
pub use v2::{relocate_self, relocate_self_with, SUPERVISOR_LEAF};

/// The directory under our own cgroup that holds every session cgroup.
pub const CORDON_DIR: &str = "cordon";

/// How long [`SessionCgroup::remove`] retries `rmdir` while killed tasks finish exiting.
const RMDIR_DEADLINE: Duration = Duration::from_secs(2);

/// Resource limits of one session; `None` leaves the resource unlimited (beyond our own
/// cgroup's limits).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CgroupLimits {
    /// Memory including swap, in bytes.
    pub memory_bytes: Option<u64>,
    /// Processes and threads alive at once.
    pub pids: Option<u64>,
    /// CPU bandwidth in cores (0.5 = half of one core), enforced per 100 ms period.
    pub cpu_cores: Option<f64>,
}

/// The cgroup version in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// The controllers cordon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    /// v1 only: CPU time accounting (v2 has it in `cpu.stat`).
    Cpuacct,
    /// v1 only: stops a fork loop while it is being killed (v2 has `cgroup.kill`).
    Freezer,
}

/// Controllers a hierarchy must provide to be chosen.
pub(crate) const REQUIRED_CONTROLLERS: [Controller; 3] =
    [Controller::Memory, Controller::Pids, Controller::Cpu];

impl Controller {
    pub const ALL: [Controller; 5] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Freezer,
    ];

    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the session used, read at the end. Values the kernel does not provide are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    /// Highest memory use (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`, kernel 5.19+).
    pub peak_memory_bytes: Option<u64>,
    /// The OOM killer killed a process of the session (v1 `oom_control` `oom_kill`, kernel
    /// 4.13+; v2 `memory.events` `oom_kill`).
    pub oom_killed: bool,
    /// Memory use reached the limit at least once; reclaim may have succeeded (v2
    /// `memory.events` `max`; v1 peak at `memory.limit_in_bytes`, `failcnt`, or an OOM kill).
    pub memory_limit_hit: bool,
    /// A fork or clone failed because of the pids limit (`pids.events` `max`).
    pub pids_limit_hit: bool,
    /// CPU time of all the session's tasks (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
    pub cpu_usage_ns: Option<u64>,
}

/// One failing step, with the path and errno an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("parse {what} line {line}: {reason}: {text:?}")]
    Parse {
        what: &'static str,
        line: usize,
        reason: &'static str,
        text: String,
    },
    #[error("read {}: {errno}", .path.display())]
    Read { path: PathBuf, errno: Errno },
    #[error("no usable cgroup hierarchy: {hint}")]
    Unavailable { hint: String },
    #[error("invalid session id {id:?}: {reason}")]
    InvalidSessionId { id: String, reason: &'static str },
    #[error("invalid {what} limit {value}: {reason}")]
    InvalidLimit {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "the {what} limit needs the {controller} controller, which cgroup {version} here lacks"
    )]
    MissingController {
        what: &'static str,
        controller: Controller,
        version: CgroupVersion,
    },
    #[error(
        "session cgroup {} already exists (session id reused, or left over: run `cordon doctor`)",
        .path.display()
    )]
    AlreadyExists { path: PathBuf },
    #[error("mkdir {}: {errno}", .path.display())]
    Mkdir { path: PathBuf, errno: Errno },
    #[error("write {contents:?} to {}: {errno}", .path.display())]
    Write {
        path: PathBuf,
        contents: String,
        errno: Errno,
    },
    #[error("enable {controllers} in {}/cgroup.subtree_control: {errno}: {reason}", .dir.display())]
    EnableControllers {
        dir: PathBuf,
        controllers: String,
        errno: Errno,
        reason: &'static str,
    },
    #[error("open {}: {errno}", .path.display())]
    Open { path: PathBuf, errno: Errno },
    #[error("invalid pid {pid}: must be positive (0 would move the supervisor itself)")]
    InvalidPid { pid: i32 },
    #[error("add pid {pid} to {}: {errno}", .path.display())]
    AddPid {
        pid: i32,
        path: PathBuf,
        errno: Errno,
    },
    #[error("pidfd_send_signal(SIGKILL) to pid {pid} of {}: {errno}", .path.display())]
    Signal {
        pid: i32,
        path: PathBuf,
        errno: Errno,
    },
    #[error("{remaining} processes still in {} after {rounds} kill rounds", .path.display())]
    KillTimeout {
        path: PathBuf,
        remaining: usize,
        rounds: u32,
    },
    #[error("rmdir {}: {errno}", .path.display())]
    Rmdir { path: PathBuf, errno: Errno },
    #[error("list {}: {errno}", .path.display())]
    List { path: PathBuf, errno: Errno },
    #[error(
        "cgroup v2 {} also holds {others} process(es) that are not cordon's, so cordon cannot \
         empty it: start cordon as the only process of a delegated cgroup \
         (`systemd-run --user --scope -p Delegate=yes cordon ...`)",
        .dir.display()
    )]
    SharedOwnCgroup { dir: PathBuf, others: usize },
}

/// The cgroups of one running session.
pub trait SessionCgroup: fmt::Debug + Send + Sync {
    fn version(&self) -> CgroupVersion;
    /// Moves process `pid` (all its threads) into the session in every hierarchy: one `pwrite`
    /// per hierarchy on descriptors opened by [`create`]. On error the process may already be in
    /// some hierarchies: kill it rather than let it run half-limited.
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
    /// Reads the session's statistics; missing files give `None` / `false`.
    fn stats(&self) -> CgroupStats;
    /// Kills every process in the session and waits (bounded) until none is left.
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// Removes the session's directories, retrying briefly while killed tasks exit. Call
    /// [`SessionCgroup::kill_all`] first: a live process keeps its cgroup busy.
    fn remove(self: Box<Self>) -> Result<(), CgroupError>;
    /// The session's cgroup directories, one per hierarchy.
    fn paths(&self) -> Vec<PathBuf>;
    /// What was applied, for the audit.
    fn plan(&self) -> &CgroupPlan;
    /// A descriptor of the session's cgroup directory for `clone3(CLONE_INTO_CGROUP)`, which
    /// starts the child inside the cgroup with no `add_pid` at all (cgroup v2 only).
    fn clone_into_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Whether `/sys/fs/cgroup` is itself a cgroup v2 mount (a pure "unified" host, the common
/// case on current distributions): then cordon creates the session cgroup before the clone and
/// starts the sandbox inside it. One `statfs`, no detection; a host that mounts v2 elsewhere
/// still works, the sandbox just joins its cgroup after the clone.
pub fn unified_host() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Creates the cgroup of session `session_id` with `limits`, using the version `detected`
/// chose.
pub fn create(
    detected: &Detected,
    session_id: &str,
    limits: &CgroupLimits,
) -> Result<Box<dyn SessionCgroup>, CgroupError> {
    create_with(Arc::new(LinuxFs), detected, session_id, limits)
}

/// [`create`] with the filesystem behind the seam.
pub fn create_with(
    fs: Arc<dyn CgroupFs>,
    detected: &Detected,
    session_id: &str,
    limits: &CgroupLimits,
) -> Result<Box<dyn SessionCgroup>, CgroupError> {
    let plan = plan(detected, session_id, limits)?;
    apply(&*fs, &plan)?;
    let opened = match plan.version {
        CgroupVersion::V1 => v1::V1Session::open(Arc::clone(&fs), plan.clone())
            .map(|s| Box::new(s) as Box<dyn SessionCgroup>),
        CgroupVersion::V2 => v2::V2Session::open(Arc::clone(&fs), plan.clone())
            .map(|s| Box::new(s) as Box<dyn SessionCgroup>),
    };
    opened.inspect_err(|_| undo(&*fs, &plan.leaves))
}

/// Applies `plan`; on failure removes the leaves it created and returns the first error.
fn apply(fs: &dyn CgroupFs, plan: &CgroupPlan) -> Result<(), CgroupError> {
    let mut created: Vec<Leaf> = Vec::new();
    for step in &plan.steps {
        let result = apply_step(fs, step);
        if let (Ok(()), Step::CreateLeaf { path, .. }) = (&result, step) {
            if let Some(leaf) = plan.leaves.iter().find(|l| &l.dir == path) {
                created.push(leaf.clone());
            }
        }
        if let Err(err) = result {
            undo(fs, &created);
            return Err(err);
        }
    }
    Ok(())
}

fn apply_step(fs: &dyn CgroupFs, step: &Step) -> Result<(), CgroupError> {
    match step {
        Step::EnsureDir { path } => ensure_dir(fs, path),
        Step::EnableControllers { dir, controllers } => enable_controllers(fs, dir, controllers),
        Step::CreateLeaf { path, parent } => match fs.mkdir(path) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => Err(CgroupError::AlreadyExists { path: path.clone() }),
            Err(Errno::ENOENT) => {
                ensure_dir(fs, parent)?;
                match fs.mkdir(path) {
                    Ok(()) => Ok(()),
                    Err(Errno::EEXIST) => Err(CgroupError::AlreadyExists { path: path.clone() }),
                    Err(errno) => Err(CgroupError::Mkdir {
                        path: path.clone(),
                        errno,
                    }),
                }
            }
            Err(errno) => Err(CgroupError::Mkdir {
                path: path.clone(),
                errno,
            }),
        },
        Step::Write {
            path,
            contents,
            optional,
        } => match fs.write(path, contents) {
            Ok(()) => Ok(()),
            Err(Errno::ENOENT) if *optional => Ok(()),
            Err(errno) => Err(CgroupError::Write {
                path: path.clone(),
                contents: contents.clone(),
                errno,
            }),
        },
    }
}

fn ensure_dir(fs: &dyn CgroupFs, path: &Path) -> Result<(), CgroupError> {
    match fs.mkdir(path) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(errno) => Err(CgroupError::Mkdir {
            path: path.to_path_buf(),
            errno,
        }),
    }
}

/// Writes `+memory +pids +cpu` (the given ones) to `<dir>/cgroup.subtree_control`.
pub(crate) fn enable_controllers(
    fs: &dyn CgroupFs,
    dir: &Path,
    controllers: &[Controller],
) -> Result<(), CgroupError> {
    let contents = controllers
        .iter()
        .map(|c| format!("+{}", c.name()))
        .collect::<Vec<_>>()
        .join(" ");
    fs.write(&dir.join("cgroup.subtree_control"), &contents)
        .map_err(|errno| CgroupError::EnableControllers {
            dir: dir.to_path_buf(),
            controllers: detect::names(controllers),
            errno,
            reason: match errno {
                Errno::EBUSY => {
                    "this cgroup holds processes, so it cannot enable controllers for children \
                     (cgroup v2 no-internal-process rule)"
                }
                Errno::EOPNOTSUPP => {
                    "a controller cannot be enabled here (threaded cgroup, or not supported)"
                }
                Errno::ENOENT => {
                    "a controller is not available here: the parent does not delegate it"
                }
                Errno::EACCES | Errno::EPERM => {
                    "not delegated to this user: run under `systemd-run --user --scope -p \
                     Delegate=yes`, or as root"
                }
                _ => "unexpected error from the kernel",
            },
        })
}

/// Best-effort removal of leaves created by a failed [`create`].
fn undo(fs: &dyn CgroupFs, leaves: &[Leaf]) {
    for leaf in leaves.iter().rev() {
        // The leaf is fresh and empty; an error here leaves a stale empty cgroup that
        // `cleanup_stale` removes later, and the original error is the one worth reporting.
        let _ = fs.rmdir(&leaf.dir);
    }
}

/// What both implementations share: the plan, the open `cgroup.procs` descriptors, removal.
#[derive(Debug)]
pub(crate) struct Leaves {
    fs: Arc<dyn CgroupFs>,
    plan: CgroupPlan,
    /// `cgroup.procs` of each leaf, in plan order, opened once so `add_pid` is one `pwrite`.
    procs: Vec<(PathBuf, File)>,
    removed: bool,
}

impl Leaves {
    fn open(fs: Arc<dyn CgroupFs>, plan: CgroupPlan) -> Result<Self, CgroupError> {
        let mut procs = Vec::with_capacity(plan.leaves.len());
        for leaf in &plan.leaves {
            let path = leaf.dir.join("cgroup.procs");
            let file = fs.open_write(&path).map_err(|errno| CgroupError::Open {
                path: path.clone(),
                errno,
            })?;
            procs.push((path, file));
        }
        Ok(Leaves {
            fs,
            plan,
            procs,
            removed: false,
        })
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        if pid <= 0 {
            return Err(CgroupError::InvalidPid { pid });
        }
        let mut buf = [0u8; 12];
        let text = format_pid(pid, &mut buf);
        for (path, file) in &self.procs {
            match file.write_at(text, 0) {
                Ok(n) if n == text.len() => {}
                Ok(_) => {
                    return Err(CgroupError::AddPid {
                        pid,
                        path: path.clone(),
                        errno: Errno::EIO,
                    })
                }
                Err(err) => {
                    return Err(CgroupError::AddPid {
                        pid,
                        path: path.clone(),
                        errno: fs::errno_of(&err),
                    })
                }
            }
        }
        Ok(())
    }

    fn paths(&self) -> Vec<PathBuf> {
        self.plan.leaves.iter().map(|l| l.dir.clone()).collect()
    }

    fn procs_paths(&self) -> Vec<PathBuf> {
        self.procs.iter().map(|(path, _)| path.clone()).collect()
    }

    fn leaf_for(&self, controller: Controller) -> Option<&Path> {
        self.plan.leaf_for(controller)
    }

    fn read(&self, dir: &Path, file: &str) -> Option<String> {
        self.fs.read(&dir.join(file)).ok()
    }

    /// Removes every leaf, retrying `EBUSY` until [`RMDIR_DEADLINE`]; reports the first
    /// failure after trying them all.
    fn remove(&mut self) -> Result<(), CgroupError> {
        self.procs.clear();
        let mut first_error = None;
        for leaf in self.plan.leaves.iter().rev() {
            let mut outcome = Ok(());
            let done = kill::wait_until(RMDIR_DEADLINE, || match self.fs.rmdir(&leaf.dir) {
                Ok(()) | Err(Errno::ENOENT) => {
                    outcome = Ok(());
                    true
                }
                Err(Errno::EBUSY) => {
                    outcome = Err(Errno::EBUSY);
                    false
                }
                Err(errno) => {
                    outcome = Err(errno);
                    true
                }
            });
            let result = if done { outcome } else { Err(Errno::EBUSY) };
            if let Err(errno) = result {
                first_error.get_or_insert(CgroupError::Rmdir {
                    path: leaf.dir.clone(),
                    errno,
                });
            }
        }
        self.removed = true;
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Leaves {
    fn drop(&mut self) {
        if !self.removed {
            self.procs.clear();
            // One try each, no waiting: a session dropped without `remove` (a panic, an early
            // return) should not leave empty cgroups behind; busy ones are for `cleanup_stale`.
            undo(&*self.fs, &self.plan.leaves);
        }
    }
}

/// Decimal digits of a positive pid without allocating.
fn format_pid(pid: i32, buf: &mut [u8; 12]) -> &[u8] {
    let mut value = pid.unsigned_abs();
    let mut start = buf.len();
    loop {
        start -= 1;
        // `value % 10` is a single digit.
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    &buf[start..]
}

/// What [`cleanup_stale`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StaleCleanup {
    /// Empty cgroups of sessions that are not running, now removed.
    pub removed: Vec<PathBuf>,
    /// Cgroups of sessions that are not running but still hold processes (left alone).
    pub busy: Vec<PathBuf>,
}

/// Removes the empty session cgroups under `cordon/` (in every detected hierarchy) whose
/// session is not running; `is_running` gets the session id.
pub fn cleanup_stale(
    detected: &Detected,
    is_running: &dyn Fn(&str) -> bool,
) -> Result<StaleCleanup, CgroupError> {
    cleanup_stale_with(&LinuxFs, detected, is_running)
}

/// [`cleanup_stale`] with the filesystem behind the seam.
pub fn cleanup_stale_with(
    fs: &dyn CgroupFs,
    detected: &Detected,
    is_running: &dyn Fn(&str) -> bool,
) -> Result<StaleCleanup, CgroupError> {
    let mut report = StaleCleanup::default();
    let hierarchies = detected
        .v2
        .iter()
        .map(|v| &v.hierarchy)
        .chain(detected.v1.iter())
        .filter(|h| h.writable);
    for hierarchy in hierarchies {
        let cordon_dir = hierarchy.cordon_dir();
        let names = match fs.subdirs(&cordon_dir) {
            Ok(names) => names,
            Err(Errno::ENOENT) => continue,
            Err(errno) => {
                return Err(CgroupError::List {
                    path: cordon_dir,
                    errno,
                })
            }
        };
        for name in names {
            // Only names cordon could have made for a session (not `_supervisor`).
            if validate_session_id(&name).is_err() || is_running(&name) {
                continue;
            }
            let dir = cordon_dir.join(&name);
            let populated = fs
                .read(&dir.join("cgroup.procs"))
                .map(|text| text.split_whitespace().next().is_some())
                .unwrap_or(true);
            if populated {
                report.busy.push(dir);
                continue;
            }
            match fs.rmdir(&dir) {
                Ok(()) => report.removed.push(dir),
                Err(Errno::ENOENT) => {}
                // Nested cgroups or a process that arrived since the read.
                Err(Errno::EBUSY) | Err(Errno::ENOTEMPTY) => report.busy.push(dir),
                Err(errno) => return Err(CgroupError::Rmdir { path: dir, errno }),
            }
        }
    }
    Ok(report)
}
