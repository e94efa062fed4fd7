//! What creating one session cgroup does, decided before anything is touched.
//!
//! Guarantees:
//! - [`plan`] is pure: it validates the session id and the limits and returns the exact list of
//!   directories and control-file writes, or an error, without touching the filesystem.
//! - Every path in a plan is under `<own cgroup>/cordon/` of a detected hierarchy, except the
//!   one `cgroup.subtree_control` write to our own cgroup that cgroup v2 needs to hand
//!   controllers to `cordon/` (and only when detection saw them not yet enabled).
//! - Limits are written in an order the kernel accepts: v1 `memory.limit_in_bytes` before
//!   `memory.memsw.limit_in_bytes` (memsw may never be below the memory limit), and
//!   `cpu.cfs_period_us` before `cpu.cfs_quota_us`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::detect::Detected;
use super::{CgroupError, CgroupLimits, CgroupVersion, Controller, REQUIRED_CONTROLLERS};

/// The CFS period cordon uses, in microseconds (the kernel default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel accepts, in microseconds.
const MIN_CPU_QUOTA_US: u64 = 1_000;
/// A ceiling that catches unit mistakes (cores, not millicores).
const MAX_CPU_CORES: f64 = 1024.0;
/// The smallest memory limit that is not a mistake.
const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// `pids.max` must be below `PIDS_MAX` (`PID_MAX_LIMIT + 1`).
const MAX_PIDS: u64 = 4 * 1024 * 1024;
/// Longest accepted session id (it becomes a directory name).
const MAX_SESSION_ID_LEN: usize = 64;

/// One session cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leaf {
    pub dir: PathBuf,
    /// The controllers of the hierarchy this leaf lives in.
    pub controllers: Vec<Controller>,
}

/// One filesystem step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// `mkdir`; an existing directory is fine (cordon's shared `cordon/` parent).
    EnsureDir { path: PathBuf },
    /// Write `+c1 +c2 …` to `<dir>/cgroup.subtree_control` (cgroup v2; idempotent).
    EnableControllers {
        dir: PathBuf,
        controllers: Vec<Controller>,
    },
    /// `mkdir` the session cgroup, which must not exist. If `parent` is missing, it is created
    /// first (so the common case costs one `mkdir`).
    CreateLeaf { path: PathBuf, parent: PathBuf },
    /// One write to a control file; when `optional`, a missing file (`ENOENT`) is skipped.
    Write {
        path: PathBuf,
        contents: String,
        optional: bool,
    },
}

/// Everything creating one session cgroup does, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupPlan {
    pub version: CgroupVersion,
    pub session_id: String,
    pub leaves: Vec<Leaf>,
    pub steps: Vec<Step>,
}

impl CgroupPlan {
    /// The leaf that holds `controller`.
    pub fn leaf_for(&self, controller: Controller) -> Option<&Path> {
        self.leaves
            .iter()
            .find(|l| l.controllers.contains(&controller))
            .map(|l| l.dir.as_path())
    }
}

/// Limits after validation, in the units the kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelLimits {
    memory_bytes: Option<u64>,
    pids: Option<u64>,
    cpu_quota_us: Option<u64>,
}

/// Whether `id` may name a session cgroup: 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter
/// or digit. No dots, so it can never be `.`, `..` or collide with a control file name such as
/// `memory.max`; names starting with `_` stay free for cordon's own use.
pub fn validate_session_id(id: &str) -> Result<(), CgroupError> {
    let bad = |reason: &'static str| CgroupError::InvalidSessionId {
        id: id.to_owned(),
        reason,
    };
    let first = id.bytes().next().ok_or_else(|| bad("empty"))?;
    if id.len() > MAX_SESSION_ID_LEN {
        return Err(bad("longer than 64 bytes"));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad("only letters, digits, '-' and '_' are allowed"));
    }
    Ok(())
}

fn validate_limits(limits: &CgroupLimits) -> Result<KernelLimits, CgroupError> {
    let memory_bytes = match limits.memory_bytes {
        Some(bytes) if bytes < MIN_MEMORY_BYTES => {
            return Err(CgroupError::InvalidLimit {
                what: "memory",
                value: bytes.to_string(),
                reason: "below 1 MiB",
            })
        }
        // The kernel's page counters are signed 64-bit.
        Some(bytes) if bytes > i64::MAX as u64 => {
            return Err(CgroupError::InvalidLimit {
                what: "memory",
                value: bytes.to_string(),
                reason: "above 2^63-1 bytes",
            })
        }
        other => other,
    };
    let pids = match limits.pids {
        Some(0) => {
            return Err(CgroupError::InvalidLimit {
                what: "pids",
                value: "0".to_owned(),
                reason: "at least one process is needed",
            })
        }
        Some(n) if n > MAX_PIDS => {
            return Err(CgroupError::InvalidLimit {
                what: "pids",
                value: n.to_string(),
                reason: "above the kernel's PID_MAX_LIMIT (4194304)",
            })
        }
        other => other,
    };
    let cpu_quota_us = match limits.cpu_cores {
        None => None,
        Some(cores) => {
            let bad = |reason: &'static str| CgroupError::InvalidLimit {
                what: "cpu",
                value: cores.to_string(),
                reason,
            };
            if !cores.is_finite() || cores <= 0.0 {
                return Err(bad("must be a positive number of cores"));
            }
            if cores > MAX_CPU_CORES {
                return Err(bad("above 1024 cores"));
            }
            // In range (0, 1024] * 100000, so the cast cannot truncate or wrap.
            let quota = (cores * CPU_PERIOD_US as f64).round() as u64;
            if quota < MIN_CPU_QUOTA_US {
                return Err(bad("below 0.01 cores (the kernel's 1 ms minimum quota)"));
            }
            Some(quota)
        }
    };
    Ok(KernelLimits {
        memory_bytes,
        pids,
        cpu_quota_us,
    })
}

/// Decides how to create the cgroup of session `session_id` with `limits`.
pub fn plan(
    detected: &Detected,
    session_id: &str,
    limits: &CgroupLimits,
) -> Result<CgroupPlan, CgroupError> {
    validate_session_id(session_id)?;
    let limits = validate_limits(limits)?;
    match detected.version {
        Some(CgroupVersion::V2) => plan_v2(detected, session_id, limits),
        Some(CgroupVersion::V1) => plan_v1(detected, session_id, limits),
        None => Err(unavailable(detected)),
    }
}

fn unavailable(detected: &Detected) -> CgroupError {
    CgroupError::Unavailable {
        hint: detected
            .hint
            .clone()
            .unwrap_or_else(|| "cgroup detection found nothing".to_owned()),
    }
}

fn write(dir: &Path, file: &str, contents: String, optional: bool) -> Step {
    Step::Write {
        path: dir.join(file),
        contents,
        optional,
    }
}

fn plan_v2(
    detected: &Detected,
    session_id: &str,
    limits: KernelLimits,
) -> Result<CgroupPlan, CgroupError> {
    let v2 = detected.v2.as_ref().ok_or_else(|| unavailable(detected))?;
    let hierarchy = &v2.hierarchy;
    for (what, controller, wanted) in [
        ("memory", Controller::Memory, limits.memory_bytes.is_some()),
        ("pids", Controller::Pids, limits.pids.is_some()),
        ("cpu", Controller::Cpu, limits.cpu_quota_us.is_some()),
    ] {
        if wanted && !hierarchy.has(controller) {
            return Err(CgroupError::MissingController {
                what,
                controller,
                version: CgroupVersion::V2,
            });
        }
    }
    let cordon_dir = hierarchy.cordon_dir();
    let leaf = cordon_dir.join(session_id);
    let mut steps = Vec::new();
    // Enabled even without a limit: the controllers also provide the statistics.
    let not_yet_enabled: Vec<Controller> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !v2.enabled_for_children.contains(c))
        .collect();
    if !not_yet_enabled.is_empty() {
        steps.push(Step::EnableControllers {
            dir: hierarchy.own_dir.clone(),
            controllers: not_yet_enabled,
        });
    }
    steps.push(Step::EnsureDir {
        path: cordon_dir.clone(),
    });
    // Always written: `cordon/` may have been left half-made by a crash between its mkdir and
    // this write, and the kernel treats already-enabled controllers as a no-op.
    steps.push(Step::EnableControllers {
        dir: cordon_dir.clone(),
        controllers: REQUIRED_CONTROLLERS.to_vec(),
    });
    steps.push(Step::CreateLeaf {
        path: leaf.clone(),
        parent: cordon_dir,
    });
    if let Some(bytes) = limits.memory_bytes {
        steps.push(write(&leaf, "memory.max", bytes.to_string(), false));
        // Swap counts against nothing in v2 unless capped separately; absent without swap
        // accounting, where swap is not usable by the cgroup's pages anyway.
        steps.push(write(&leaf, "memory.swap.max", "0".to_owned(), true));
    }
    if let Some(pids) = limits.pids {
        steps.push(write(&leaf, "pids.max", pids.to_string(), false));
    }
    if let Some(quota) = limits.cpu_quota_us {
        steps.push(write(
            &leaf,
            "cpu.max",
            format!("{quota} {CPU_PERIOD_US}"),
            false,
        ));
    }
    Ok(CgroupPlan {
        version: CgroupVersion::V2,
        session_id: session_id.to_owned(),
        leaves: vec![Leaf {
            dir: leaf,
            controllers: hierarchy.controllers.clone(),
        }],
        steps,
    })
}

fn plan_v1(
    detected: &Detected,
    session_id: &str,
    limits: KernelLimits,
) -> Result<CgroupPlan, CgroupError> {
    let mut leaves = Vec::new();
    let mut steps = Vec::new();
    // Optional hierarchies (cpuacct, freezer) that we cannot write are left out; the required
    // ones were checked writable by detection.
    for hierarchy in detected.v1.iter().filter(|h| h.writable) {
        let cordon_dir = hierarchy.cordon_dir();
        let dir = cordon_dir.join(session_id);
        steps.push(Step::CreateLeaf {
            path: dir.clone(),
            parent: cordon_dir,
        });
        leaves.push(Leaf {
            dir,
            controllers: hierarchy.controllers.clone(),
        });
    }
    let leaf_for = |what: &'static str, controller: Controller| {
        leaves
            .iter()
            .find(|l| l.controllers.contains(&controller))
            .map(|l| l.dir.clone())
            .ok_or(CgroupError::MissingController {
                what,
                controller,
                version: CgroupVersion::V1,
            })
    };
    if let Some(bytes) = limits.memory_bytes {
        let leaf = leaf_for("memory", Controller::Memory)?;
        steps.push(write(
            &leaf,
            "memory.limit_in_bytes",
            bytes.to_string(),
            false,
        ));
        // Same value: memory plus swap may not exceed the limit, so swap cannot extend it.
        // Absent when swap accounting is off, where swap is not charged or usable beyond it.
        steps.push(write(
            &leaf,
            "memory.memsw.limit_in_bytes",
            bytes.to_string(),
            true,
        ));
    }
    if let Some(pids) = limits.pids {
        let leaf = leaf_for("pids", Controller::Pids)?;
        steps.push(write(&leaf, "pids.max", pids.to_string(), false));
    }
    if let Some(quota) = limits.cpu_quota_us {
        let leaf = leaf_for("cpu", Controller::Cpu)?;
        steps.push(write(
            &leaf,
            "cpu.cfs_period_us",
            CPU_PERIOD_US.to_string(),
            false,
        ));
        steps.push(write(&leaf, "cpu.cfs_quota_us", quota.to_string(), false));
    }
    if leaves.is_empty() {
        return Err(unavailable(detected));
    }
    Ok(CgroupPlan {
        version: CgroupVersion::V1,
        session_id: session_id.to_owned(),
        leaves,
        steps,
    })
}
