//! Finding where cordon may create its cgroups, without changing anything.
//!
//! Guarantees:
//! - Detection only reads: `mountinfo`, `/proc/self/cgroup` (both passed in as text), and a few
//!   control files of our own cgroup (`cgroup.controllers`, `cgroup.subtree_control`,
//!   `cgroup.procs`), plus `access(W_OK)` probes. It never creates, writes or moves anything.
//! - Every path it reports is the mount point as `mountinfo` names it, joined under the injected
//!   root (`/` in production, a fixture directory in tests), followed by our own cgroup path as
//!   `/proc/self/cgroup` names it relative to that mount's root.
//! - cgroup v2 is chosen only when it provides memory, pids and cpu to our own cgroup and we can
//!   use them (writable, and our own cgroup can hand controllers to a child); otherwise v1 is
//!   chosen only when memory, pids and cpu are each mounted and writable; otherwise nothing is
//!   chosen and [`Detected::hint`] says what to fix.

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::fs::{CgroupFs, LinuxFs};
use super::{CgroupError, CgroupVersion, Controller, REQUIRED_CONTROLLERS};

/// One line of `/proc/<pid>/mountinfo`, with octal escapes (`\040`) decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountEntry {
    /// The path inside the filesystem that is mounted here (field 4).
    pub root: String,
    /// Where it is mounted (field 5).
    pub mount_point: String,
    /// Per-mount options (`rw`, `nosuid`, …).
    pub mount_options: Vec<String>,
    /// Filesystem type (`cgroup`, `cgroup2`, …).
    pub fs_type: String,
    /// Per-superblock options; for cgroup v1 these name the controllers (`rw,cpu,cpuacct`).
    pub super_options: Vec<String>,
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controller,list:/path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcCgroupEntry {
    pub hierarchy_id: u32,
    /// Empty for the v2 line (`0::/path`); `name=systemd` style entries are kept as written.
    pub controllers: Vec<String>,
    pub path: String,
}

/// Parses `/proc/<pid>/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, CgroupError> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &'static str| CgroupError::Parse {
            what: "mountinfo",
            line: index + 1,
            reason,
            text: line.to_owned(),
        };
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| bad("no ' - ' separator"))?;
        if separator < 6 {
            return Err(bad("fewer than 6 fields before the separator"));
        }
        let fs_type = fields
            .get(separator + 1)
            .filter(|f| !f.is_empty())
            .ok_or_else(|| bad("no filesystem type after the separator"))?;
        let super_options = fields.get(separator + 3).copied().unwrap_or("");
        entries.push(MountEntry {
            root: unescape_octal(fields[3]),
            mount_point: unescape_octal(fields[4]),
            mount_options: split_options(fields[5]),
            fs_type: unescape_octal(fs_type),
            super_options: split_options(super_options),
        });
    }
    Ok(entries)
}

/// Parses `/proc/<pid>/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Result<Vec<ProcCgroupEntry>, CgroupError> {
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: &'static str| CgroupError::Parse {
            what: "/proc/self/cgroup",
            line: index + 1,
            reason,
            text: line.to_owned(),
        };
        let mut parts = line.splitn(3, ':');
        let id = parts.next().ok_or_else(|| bad("empty line"))?;
        let controllers = parts.next().ok_or_else(|| bad("no controller field"))?;
        let path = parts.next().ok_or_else(|| bad("no path field"))?;
        let hierarchy_id = id
            .parse::<u32>()
            .map_err(|_| bad("hierarchy id is not a number"))?;
        if !path.starts_with('/') {
            return Err(bad("path is not absolute"));
        }
        entries.push(ProcCgroupEntry {
            hierarchy_id,
            controllers: controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
            path: path.to_owned(),
        });
    }
    Ok(entries)
}

fn split_options(options: &str) -> Vec<String> {
    options
        .split(',')
        .filter(|o| !o.is_empty())
        .map(unescape_octal)
        .collect()
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash in paths).
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = u32::from(digits[0] - b'0') * 64
                    + u32::from(digits[1] - b'0') * 8
                    + u32::from(digits[2] - b'0');
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One cgroup hierarchy cordon can use: where it is and where our own cgroup sits in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hierarchy {
    pub version: CgroupVersion,
    /// The controllers cordon uses that this hierarchy provides to our own cgroup (v1: from the
    /// mount options; v2: from our own `cgroup.controllers`).
    pub controllers: Vec<Controller>,
    /// The mount point, joined under the detection root.
    pub mount_point: PathBuf,
    /// Our own cgroup as `/proc/self/cgroup` names it.
    pub own_cgroup: String,
    /// The directory of our own cgroup, where cordon's cgroups go (`<own_dir>/cordon/`). On
    /// cgroup v2 after [`super::relocate_self`], the cgroup we moved out of.
    pub own_dir: PathBuf,
    /// Whether we may create cgroups here (mounted read-write and `access(W_OK)` passes).
    pub writable: bool,
}

impl Hierarchy {
    /// `<own_dir>/cordon`: the parent of every session cgroup in this hierarchy.
    pub fn cordon_dir(&self) -> PathBuf {
        self.own_dir.join(super::CORDON_DIR)
    }

    /// Whether this hierarchy provides `controller`.
    pub fn has(&self, controller: Controller) -> bool {
        self.controllers.contains(&controller)
    }
}

/// Why cgroup v2 can or cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum V2Status {
    Usable,
    /// Our own cgroup does not have these controllers (the parent did not delegate them).
    MissingControllers {
        missing: Vec<Controller>,
    },
    /// The mount is read-only, or `access(W_OK)` fails on this path.
    NotWritable {
        path: PathBuf,
    },
    /// Our own cgroup holds processes and has not enabled the controllers for its children, so
    /// it cannot (cgroup v2 "no internal processes" rule): `EBUSY` if we tried.
    OwnCgroupHasProcesses,
    /// A control file of our own cgroup could not be read.
    Unreadable {
        path: PathBuf,
        errno: String,
    },
}

/// The v2 hierarchy, whether or not it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V2Info {
    pub hierarchy: Hierarchy,
    /// Controllers already enabled in our own `cgroup.subtree_control`.
    pub enabled_for_children: Vec<Controller>,
    pub status: V2Status,
}

/// What detection found, and which version cordon will use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detected {
    /// The chosen version; `None` when no hierarchy is usable.
    pub version: Option<CgroupVersion>,
    /// The cgroup v2 hierarchy, when one is mounted and we have a place in it.
    pub v2: Option<V2Info>,
    /// cgroup v1 hierarchies holding a controller cordon uses (one entry per mount; co-mounted
    /// controllers such as `cpu,cpuacct` share one).
    pub v1: Vec<Hierarchy>,
    /// One line telling an operator how to make cgroups usable, when `version` is `None`.
    pub hint: Option<String>,
}

impl Detected {
    /// The hierarchies of the chosen version (empty when none was chosen).
    pub fn hierarchies(&self) -> Vec<&Hierarchy> {
        match self.version {
            Some(CgroupVersion::V2) => self.v2.iter().map(|v| &v.hierarchy).collect(),
            Some(CgroupVersion::V1) => self.v1.iter().collect(),
            None => Vec::new(),
        }
    }

    /// The v1 hierarchy providing `controller`.
    pub fn v1_for(&self, controller: Controller) -> Option<&Hierarchy> {
        self.v1.iter().find(|h| h.has(controller))
    }
}

impl fmt::Display for Detected {
    /// One line for `cordon doctor`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(CgroupVersion::V2) => {
                if let Some(v2) = &self.v2 {
                    write!(
                        f,
                        "cgroup v2 at {} ({}), writable",
                        v2.hierarchy.own_dir.display(),
                        names(&v2.hierarchy.controllers)
                    )?;
                }
            }
            Some(CgroupVersion::V1) => {
                let controllers: Vec<Controller> = self
                    .v1
                    .iter()
                    .flat_map(|h| h.controllers.iter().copied())
                    .collect();
                write!(f, "cgroup v1 ({}), writable", names(&controllers))?;
                if let Some(v2) = &self.v2 {
                    write!(
                        f,
                        "; v2 at {} not used: ",
                        v2.hierarchy.mount_point.display()
                    )?;
                    write_v2_status(f, &v2.status)?;
                }
            }
            None => {
                write!(f, "no usable cgroup hierarchy")?;
                if let Some(hint) = &self.hint {
                    write!(f, ": {hint}")?;
                }
            }
        }
        Ok(())
    }
}

fn write_v2_status(f: &mut fmt::Formatter<'_>, status: &V2Status) -> fmt::Result {
    match status {
        V2Status::Usable => write!(f, "usable"),
        V2Status::MissingControllers { missing } => write!(f, "missing {}", names(missing)),
        V2Status::NotWritable { path } => write!(f, "{} is not writable", path.display()),
        V2Status::OwnCgroupHasProcesses => {
            write!(f, "our own cgroup holds processes and cannot delegate")
        }
        V2Status::Unreadable { path, errno } => write!(f, "{}: {errno}", path.display()),
    }
}

pub(crate) fn names(controllers: &[Controller]) -> String {
    controllers
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Detects cgroups for the calling process: reads `/proc/self/mountinfo` and `/proc/self/cgroup`
/// with root `/`.
pub fn detect_host() -> Result<Detected, CgroupError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| CgroupError::Read {
            path: PathBuf::from(path),
            errno: super::fs::errno_of(&e),
        })
    };
    let mountinfo = read("/proc/self/mountinfo")?;
    let own = read("/proc/self/cgroup")?;
    detect(Path::new("/"), &mountinfo, &own)
}

/// Detects cgroups from `mountinfo` and `/proc/self/cgroup` text; mount points are joined under
/// `root`. Reads our own cgroup's control files through the real filesystem.
pub fn detect(
    root: &Path,
    mountinfo: &str,
    proc_self_cgroup: &str,
) -> Result<Detected, CgroupError> {
    detect_with(&LinuxFs, root, mountinfo, proc_self_cgroup)
}

/// [`detect`] with the filesystem behind the seam.
pub fn detect_with(
    fs: &dyn CgroupFs,
    root: &Path,
    mountinfo: &str,
    proc_self_cgroup: &str,
) -> Result<Detected, CgroupError> {
    let mounts = parse_mountinfo(mountinfo)?;
    let own = parse_proc_cgroup(proc_self_cgroup)?;

    let v2 = detect_v2(fs, root, &mounts, &own);
    let v1 = detect_v1(fs, root, &mounts, &own);

    let v2_usable = v2.as_ref().is_some_and(|v| v.status == V2Status::Usable);
    let v1_usable = REQUIRED_CONTROLLERS
        .iter()
        .all(|c| v1.iter().find(|h| h.has(*c)).is_some_and(|h| h.writable));
    let version = if v2_usable {
        Some(CgroupVersion::V2)
    } else if v1_usable {
        Some(CgroupVersion::V1)
    } else {
        None
    };
    let hint = match version {
        Some(_) => None,
        None => Some(hint(v2.as_ref(), &v1)),
    };
    Ok(Detected {
        version,
        v2,
        v1,
        hint,
    })
}

/// `own` relative to a mount's `root`, component-wise (`/a/b` under `/a` is `b`); `None` when
/// our cgroup is outside what this mount shows.
fn relative_to_mount(own: &str, mount_root: &str) -> Option<PathBuf> {
    let own = Path::new(own);
    let rel = own.strip_prefix(mount_root).ok()?;
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(rel.to_path_buf())
}

fn join_under(root: &Path, absolute: &str) -> PathBuf {
    let mut path = root.to_path_buf();
    for component in Path::new(absolute).components() {
        if let Component::Normal(part) = component {
            path.push(part);
        }
    }
    path
}

fn own_dir(root: &Path, mount: &MountEntry, own_path: &str) -> Option<PathBuf> {
    let rel = relative_to_mount(own_path, &mount.root)?;
    let mut dir = join_under(root, &mount.mount_point);
    if !rel.as_os_str().is_empty() {
        dir.push(rel);
    }
    Some(dir)
}

fn mount_is_writable(fs: &dyn CgroupFs, mount: &MountEntry, dir: &Path) -> bool {
    !mount.mount_options.iter().any(|o| o == "ro") && fs.is_writable(dir)
}

fn detect_v2(
    fs: &dyn CgroupFs,
    root: &Path,
    mounts: &[MountEntry],
    own: &[ProcCgroupEntry],
) -> Option<V2Info> {
    let own_path = &own
        .iter()
        .find(|e| e.hierarchy_id == 0 && e.controllers.is_empty())?
        .path;
    // After `relocate_self` we run in `<base>/cordon/_supervisor`; sessions go under `<base>`.
    let base_path = supervisor_base(own_path).unwrap_or(own_path);
    let (mount, dir) = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .find_map(|m| own_dir(root, m, base_path).map(|dir| (m, dir)))?;
    let mut hierarchy = Hierarchy {
        version: CgroupVersion::V2,
        controllers: Vec::new(),
        mount_point: join_under(root, &mount.mount_point),
        own_cgroup: own_path.clone(),
        own_dir: dir.clone(),
        writable: false,
    };
    let unreadable = |hierarchy: Hierarchy, path: PathBuf, errno: nix::errno::Errno| V2Info {
        hierarchy,
        enabled_for_children: Vec::new(),
        status: V2Status::Unreadable {
            path,
            errno: errno.to_string(),
        },
    };

    let controllers_file = dir.join("cgroup.controllers");
    let available = match fs.read(&controllers_file) {
        Ok(text) => parse_controller_list(&text),
        Err(errno) => return Some(unreadable(hierarchy, controllers_file, errno)),
    };
    hierarchy.controllers = available;
    let subtree_file = dir.join("cgroup.subtree_control");
    let enabled = match fs.read(&subtree_file) {
        Ok(text) => parse_controller_list(&text),
        Err(errno) => return Some(unreadable(hierarchy, subtree_file, errno)),
    };
    let procs_file = dir.join("cgroup.procs");
    let has_processes = match fs.read(&procs_file) {
        Ok(text) => text.split_whitespace().next().is_some(),
        Err(errno) => return Some(unreadable(hierarchy, procs_file, errno)),
    };

    // Moving a process into a child needs write access to the common ancestor's cgroup.procs,
    // which is our own cgroup; creating `cordon/` needs the directory; handing controllers
    // down needs subtree_control.
    let not_writable = if mount.mount_options.iter().any(|o| o == "ro") {
        Some(dir.clone())
    } else {
        [dir.clone(), subtree_file, procs_file]
            .into_iter()
            .find(|p| !fs.is_writable(p))
    };
    hierarchy.writable = not_writable.is_none();

    let missing: Vec<Controller> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !hierarchy.has(*c))
        .collect();
    let all_enabled = REQUIRED_CONTROLLERS.iter().all(|c| enabled.contains(c));
    // The real root cgroup is exempt from the no-internal-processes rule. A cgroup namespace
    // root (a container) also reads "/" but is not exempt; unlike the real root it has a
    // `cgroup.type` file (kernel 4.14+).
    let is_root = base_path == "/" && fs.read(&dir.join("cgroup.type")).is_err();
    let status = if !missing.is_empty() {
        V2Status::MissingControllers { missing }
    } else if let Some(path) = not_writable {
        V2Status::NotWritable { path }
    } else if !all_enabled && has_processes && !is_root {
        V2Status::OwnCgroupHasProcesses
    } else {
        V2Status::Usable
    };
    Some(V2Info {
        hierarchy,
        enabled_for_children: enabled,
        status,
    })
}

/// `<base>` when `own_path` is `<base>/cordon/_supervisor`.
fn supervisor_base(own_path: &str) -> Option<&str> {
    let suffix = format!("/{}/{}", super::CORDON_DIR, super::SUPERVISOR_LEAF);
    let base = own_path.strip_suffix(suffix.as_str())?;
    Some(if base.is_empty() { "/" } else { base })
}

/// Parses `cgroup.controllers` / `cgroup.subtree_control`: names cordon uses, in our order.
pub(crate) fn parse_controller_list(text: &str) -> Vec<Controller> {
    let listed: Vec<&str> = text.split_whitespace().collect();
    Controller::ALL
        .iter()
        .copied()
        .filter(|c| listed.contains(&c.name()))
        .collect()
}

fn detect_v1(
    fs: &dyn CgroupFs,
    root: &Path,
    mounts: &[MountEntry],
    own: &[ProcCgroupEntry],
) -> Vec<Hierarchy> {
    let mut found: Vec<Hierarchy> = Vec::new();
    for controller in Controller::ALL {
        let name = controller.name();
        let Some(own_entry) = own
            .iter()
            .find(|e| e.hierarchy_id != 0 && e.controllers.iter().any(|c| c == name))
        else {
            continue;
        };
        let located = mounts
            .iter()
            .filter(|m| m.fs_type == "cgroup" && m.super_options.iter().any(|o| o == name))
            .find_map(|m| own_dir(root, m, &own_entry.path).map(|dir| (m, dir)));
        let Some((mount, dir)) = located else {
            continue;
        };
        let mount_point = join_under(root, &mount.mount_point);
        if let Some(existing) = found.iter_mut().find(|h| h.mount_point == mount_point) {
            existing.controllers.push(controller);
            continue;
        }
        let writable = mount_is_writable(fs, mount, &dir);
        found.push(Hierarchy {
            version: CgroupVersion::V1,
            controllers: vec![controller],
            mount_point,
            own_cgroup: own_entry.path.clone(),
            own_dir: dir,
            writable,
        });
    }
    found
}

const DELEGATE_FIX: &str =
    "run cordon under `systemd-run --user --scope -p Delegate=yes`, or as root";

fn hint(v2: Option<&V2Info>, v1: &[Hierarchy]) -> String {
    let v1_missing: Vec<Controller> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !v1.iter().any(|h| h.has(*c)))
        .collect();
    let v1_complete = v1_missing.is_empty();
    if let Some(v2) = v2 {
        let dir = v2.hierarchy.own_dir.display();
        // A v1 layout that has everything but is read-only says more than an empty v2.
        let v2_relevant = !v1_complete || !v2.hierarchy.controllers.is_empty();
        if v2_relevant {
            return match &v2.status {
                V2Status::MissingControllers { missing } => format!(
                    "cgroup v2 {} controller{} not delegated to {dir}: {DELEGATE_FIX}",
                    names(missing),
                    if missing.len() == 1 { "" } else { "s" }
                ),
                V2Status::NotWritable { path } => format!(
                    "cgroup v2 {} is not writable: {DELEGATE_FIX}",
                    path.display()
                ),
                V2Status::OwnCgroupHasProcesses => format!(
                    "cgroup v2 {dir} holds processes, so it cannot hand controllers to a child \
                     (no-internal-process rule): start cordon as the only process of a delegated \
                     cgroup (`systemd-run --user --scope -p Delegate=yes cordon ...`) and let it \
                     move itself into a leaf, or run it in a cgroup whose subtree_control already \
                     enables memory, pids and cpu"
                ),
                V2Status::Unreadable { path, errno } => {
                    format!("cannot read {}: {errno}", path.display())
                }
                V2Status::Usable => format!("cgroup v2 at {dir} is usable"),
            };
        }
    }
    if !v1_complete {
        return format!(
            "no cgroup hierarchy provides {}: boot with cgroup v2 \
             (systemd.unified_cgroup_hierarchy=1) or mount the v1 controllers",
            names(&v1_missing)
        );
    }
    match v1.iter().find(|h| !h.writable) {
        Some(h) => format!(
            "cgroup v1 {} is not writable: run cordon as root (cgroup v1 has no safe delegation \
             to unprivileged users)",
            h.own_dir.display()
        ),
        None => "cgroup v1 is usable".to_owned(),
    }
}
