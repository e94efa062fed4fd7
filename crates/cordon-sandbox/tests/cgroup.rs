//! cgroup tests, in two parts.
//!
//! 1. Fixture trees: a temp directory laid out like `/sys/fs/cgroup` and a fake kernel
//!    ([`FakeKernel`]) behind the `CgroupFs` seam that creates control files on `mkdir`,
//!    enforces the v2 no-internal-process rule and records every operation. These pin detection,
//!    the exact files and contents written, statistics parsing, kill and cleanup, without root.
//! 2. Real cgroups on this host (whatever `detect_host` chooses): pids and memory limits hit by
//!    forked children, CPU quota, kill of a double-forked grandchild and of a fork loop, timing.
//!    They skip loudly when no writable hierarchy exists, and each child is killed by pid.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cordon_sandbox::cgroup::{
    cleanup_stale, cleanup_stale_with, create, create_with, detect_host, detect_with,
    parse_mountinfo, parse_proc_cgroup, plan, relocate_self_with, CgroupError, CgroupFs,
    CgroupLimits, CgroupPlan, CgroupStats, CgroupVersion, Controller, Detected, Leaf,
    SessionCgroup, StaleCleanup, Step, V2Status,
};
use nix::errno::Errno;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// The fake kernel
// ---------------------------------------------------------------------------------------------

/// One operation the code under test asked of the filesystem (paths relative to the fixture
/// root, with a leading `/`). Failed attempts are recorded too.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Mkdir(String),
    Rmdir(String),
    Write(String, String),
}

fn mkdir(path: &str) -> Op {
    Op::Mkdir(path.to_owned())
}

fn write(path: &str, contents: &str) -> Op {
    Op::Write(path.to_owned(), contents.to_owned())
}

#[derive(Debug, Clone)]
enum Kind {
    V2,
    V1(Vec<&'static str>),
}

/// A cgroupfs stand-in over a temp directory.
#[derive(Debug)]
struct FakeKernel {
    root: PathBuf,
    mounts: Vec<(PathBuf, Kind)>,
    swap_accounting: bool,
    read_only: Vec<PathBuf>,
    /// Writes to paths ending in `.0` fail with `.1`.
    failing_writes: Vec<(String, Errno)>,
    ops: Mutex<Vec<Op>>,
}

/// Kernel order of controllers in `cgroup.controllers` / `cgroup.subtree_control`.
const V2_ORDER: [&str; 8] = [
    "cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc",
];

impl FakeKernel {
    fn rel(&self, path: &Path) -> String {
        format!("/{}", path.strip_prefix(&self.root).unwrap().display())
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn clear_ops(&self) {
        self.ops.lock().unwrap().clear();
    }

    fn mount_of(&self, path: &Path) -> Option<&(PathBuf, Kind)> {
        self.mounts
            .iter()
            .filter(|(mount, _)| path.starts_with(mount))
            .max_by_key(|(mount, _)| mount.as_os_str().len())
    }

    fn put(&self, path: &Path, contents: &str) {
        fs::write(path, contents).unwrap();
    }

    /// Creates the control files the kernel would show in a new cgroup directory.
    fn populate(&self, dir: &Path) {
        let (mount, kind) = self.mount_of(dir).unwrap().clone();
        let mut files: Vec<(&str, String)> = vec![("cgroup.procs", String::new())];
        match kind {
            Kind::V2 => {
                let parent_enabled = if dir == mount {
                    String::new()
                } else {
                    fs::read_to_string(dir.parent().unwrap().join("cgroup.subtree_control"))
                        .unwrap_or_default()
                };
                let has = |c: &str| parent_enabled.split_whitespace().any(|e| e == c);
                if dir != mount {
                    files.push(("cgroup.type", "domain\n".into()));
                }
                files.push(("cgroup.controllers", parent_enabled.clone()));
                files.push(("cgroup.subtree_control", String::new()));
                files.push(("cgroup.kill", String::new()));
                files.push(("cgroup.freeze", "0\n".into()));
                files.push(("cgroup.events", "populated 0\nfrozen 0\n".into()));
                files.push((
                    "cpu.stat",
                    "usage_usec 0\nuser_usec 0\nsystem_usec 0\n".into(),
                ));
                if has("memory") {
                    files.push(("memory.max", "max\n".into()));
                    files.push(("memory.peak", "0\n".into()));
                    files.push((
                        "memory.events",
                        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n".into(),
                    ));
                    if self.swap_accounting {
                        files.push(("memory.swap.max", "max\n".into()));
                    }
                }
                if has("pids") {
                    files.push(("pids.max", "max\n".into()));
                    files.push(("pids.events", "max 0\n".into()));
                }
                if has("cpu") {
                    files.push(("cpu.max", "max 100000\n".into()));
                }
            }
            Kind::V1(controllers) => {
                files.push(("tasks", String::new()));
                for controller in controllers {
                    match controller {
                        "memory" => {
                            files.push(("memory.limit_in_bytes", "9223372036854771712\n".into()));
                            files.push(("memory.max_usage_in_bytes", "0\n".into()));
                            files.push(("memory.failcnt", "0\n".into()));
                            files.push((
                                "memory.oom_control",
                                "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n".into(),
                            ));
                            if self.swap_accounting {
                                files.push((
                                    "memory.memsw.limit_in_bytes",
                                    "9223372036854771712\n".into(),
                                ));
                                files.push(("memory.memsw.failcnt", "0\n".into()));
                            }
                        }
                        "pids" => {
                            files.push(("pids.max", "max\n".into()));
                            files.push(("pids.events", "max 0\n".into()));
                        }
                        "cpu" => {
                            files.push(("cpu.cfs_period_us", "100000\n".into()));
                            files.push(("cpu.cfs_quota_us", "-1\n".into()));
                        }
                        "cpuacct" => files.push(("cpuacct.usage", "0\n".into())),
                        "freezer" => files.push(("freezer.state", "THAWED\n".into())),
                        _ => {}
                    }
                }
            }
        }
        // Like the kernel, never resets a file that exists (a parent enabling a controller
        // adds its files to existing children).
        for (name, contents) in files {
            let path = dir.join(name);
            if !path.exists() {
                self.put(&path, &contents);
            }
        }
    }

    /// A cgroup that exists before the test (a mount root or our own cgroup).
    fn existing_cgroup(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        self.populate(dir);
    }

    fn all_procs_files(&self, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                self.all_procs_files(&entry.path(), out);
            } else if entry.file_name() == "cgroup.procs" {
                out.push(entry.path());
            }
        }
    }

    fn write_subtree_control(&self, path: &Path, contents: &str) -> Result<(), Errno> {
        let dir = path.parent().unwrap();
        let (mount, _) = self.mount_of(dir).unwrap();
        let available = self.available(dir);
        let mut enabled: Vec<String> = fs::read_to_string(path)
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut newly = false;
        for token in contents.split_whitespace() {
            let (sign, name) = token.split_at(1);
            if !available.split_whitespace().any(|a| a == name) {
                return Err(Errno::ENOENT);
            }
            match sign {
                "+" if !enabled.iter().any(|e| e == name) => {
                    newly = true;
                    enabled.push(name.to_owned());
                }
                "-" => enabled.retain(|e| e != name),
                "+" => {}
                _ => return Err(Errno::EINVAL),
            }
        }
        let populated = !fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap()
            .trim()
            .is_empty();
        if newly && populated && dir != mount {
            return Err(Errno::EBUSY);
        }
        let ordered: Vec<&str> = V2_ORDER
            .iter()
            .copied()
            .filter(|c| enabled.iter().any(|e| e == c))
            .collect();
        let enabled_text = format!("{}\n", ordered.join(" "));
        self.put(path, &enabled_text);
        for child in fs::read_dir(dir).unwrap() {
            let child = child.unwrap();
            if child.file_type().unwrap().is_dir() {
                self.put(&child.path().join("cgroup.controllers"), &enabled_text);
                self.populate(&child.path());
            }
        }
        Ok(())
    }

    /// What `cgroup.controllers` of `dir` holds: the parent's `subtree_control`, or the file
    /// itself for a mount root or a fixture-made cgroup whose parent is not a cgroup.
    fn available(&self, dir: &Path) -> String {
        let (mount, _) = self.mount_of(dir).unwrap();
        let parent_control = dir.parent().unwrap().join("cgroup.subtree_control");
        if dir == mount || !parent_control.exists() {
            fs::read_to_string(dir.join("cgroup.controllers")).unwrap()
        } else {
            fs::read_to_string(parent_control).unwrap()
        }
    }

    fn move_pid(&self, path: &Path, contents: &str) {
        let (mount, _) = self.mount_of(path).unwrap().clone();
        let mut files = Vec::new();
        self.all_procs_files(&mount, &mut files);
        for file in files {
            let kept: String = fs::read_to_string(&file)
                .unwrap()
                .lines()
                .filter(|line| line.trim() != contents.trim())
                .map(|line| format!("{line}\n"))
                .collect();
            self.put(&file, &kept);
        }
        let mut text = fs::read_to_string(path).unwrap();
        text.push_str(contents.trim());
        text.push('\n');
        self.put(path, &text);
    }
}

impl CgroupFs for FakeKernel {
    fn mkdir(&self, path: &Path) -> Result<(), Errno> {
        self.record(Op::Mkdir(self.rel(path)));
        if path.exists() {
            return Err(Errno::EEXIST);
        }
        if !path.parent().unwrap().is_dir() {
            return Err(Errno::ENOENT);
        }
        fs::create_dir(path).unwrap();
        self.populate(path);
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> Result<(), Errno> {
        self.record(Op::Rmdir(self.rel(path)));
        if !path.is_dir() {
            return Err(Errno::ENOENT);
        }
        let populated = fs::read_to_string(path.join("cgroup.procs"))
            .map(|t| !t.trim().is_empty())
            .unwrap_or(false);
        let has_children = fs::read_dir(path)
            .unwrap()
            .any(|e| e.unwrap().file_type().unwrap().is_dir());
        if populated || has_children {
            return Err(Errno::EBUSY);
        }
        fs::remove_dir_all(path).unwrap();
        Ok(())
    }

    fn write(&self, path: &Path, contents: &str) -> Result<(), Errno> {
        self.record(Op::Write(self.rel(path), contents.to_owned()));
        let rel = self.rel(path);
        if let Some((_, errno)) = self.failing_writes.iter().find(|(s, _)| rel.ends_with(s)) {
            return Err(*errno);
        }
        if !path.is_file() {
            return Err(Errno::ENOENT);
        }
        let name = path.file_name().unwrap().to_str().unwrap();
        let v2 = matches!(self.mount_of(path), Some((_, Kind::V2)));
        match name {
            "cgroup.subtree_control" if v2 => self.write_subtree_control(path, contents),
            "cgroup.procs" => {
                self.move_pid(path, contents);
                Ok(())
            }
            "cgroup.kill" => {
                // Every task dies at once.
                self.put(&path.parent().unwrap().join("cgroup.procs"), "");
                Ok(())
            }
            _ => {
                self.put(path, contents);
                Ok(())
            }
        }
    }

    fn read(&self, path: &Path) -> Result<String, Errno> {
        fs::read_to_string(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(5)))
    }

    fn is_writable(&self, path: &Path) -> bool {
        !self.read_only.iter().any(|r| path.starts_with(r))
    }

    fn subdirs(&self, path: &Path) -> Result<Vec<String>, Errno> {
        let entries = fs::read_dir(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap()))?;
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        names.sort();
        Ok(names)
    }

    fn open_write(&self, path: &Path) -> Result<fs::File, Errno> {
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap()))
    }

    fn open_dir(&self, path: &Path) -> Result<OwnedFd, Errno> {
        fs::File::open(path)
            .map(OwnedFd::from)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap()))
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn fixture_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cgroup")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Fixture {
    dir: TempDir,
    kernel: Arc<FakeKernel>,
    mountinfo: String,
    own: String,
}

impl Fixture {
    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel.trim_start_matches('/'))
    }

    fn detect(&self) -> Detected {
        detect_with(&*self.kernel, self.root(), &self.mountinfo, &self.own).unwrap()
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    fn put(&self, rel: &str, contents: &str) {
        fs::write(self.path(rel), contents).unwrap();
    }

    fn create(
        &self,
        detected: &Detected,
        id: &str,
        limits: &CgroupLimits,
    ) -> Box<dyn SessionCgroup> {
        create_with(self.kernel.clone(), detected, id, limits).unwrap()
    }
}

struct FixtureOptions {
    swap_accounting: bool,
    read_only: Vec<&'static str>,
    failing_writes: Vec<(&'static str, Errno)>,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        FixtureOptions {
            swap_accounting: true,
            read_only: Vec::new(),
            failing_writes: Vec::new(),
        }
    }
}

fn new_fixture(
    mountinfo: String,
    own: String,
    mounts: Vec<(&str, Kind)>,
    options: FixtureOptions,
) -> Fixture {
    let dir = TempDir::new().unwrap();
    let root = dir.path().to_path_buf();
    let abs = |rel: &str| root.join(rel.trim_start_matches('/'));
    let kernel = Arc::new(FakeKernel {
        root: root.clone(),
        mounts: mounts.iter().map(|(m, k)| (abs(m), k.clone())).collect(),
        swap_accounting: options.swap_accounting,
        read_only: options.read_only.iter().map(|r| abs(r)).collect(),
        failing_writes: options
            .failing_writes
            .iter()
            .map(|(s, e)| (s.to_string(), *e))
            .collect(),
        ops: Mutex::new(Vec::new()),
    });
    for (mount, _) in &mounts {
        kernel.existing_cgroup(&abs(mount));
    }
    Fixture {
        dir,
        kernel,
        mountinfo,
        own,
    }
}

const OWN_MEMORY: &str = "/sys/fs/cgroup/memory/process_api/aa5613d5edaf47f389a818dc7523e1f2";

/// This host: v1 for every controller, our memory cgroup nested, v2 with only hugetlb.
fn hybrid_fixture(options: FixtureOptions) -> Fixture {
    let v1 = |c: &'static str| Kind::V1(vec![c]);
    let fx = new_fixture(
        fixture_text("hybrid.mountinfo"),
        fixture_text("hybrid.cgroup"),
        vec![
            ("/sys/fs/cgroup/cpu", v1("cpu")),
            ("/sys/fs/cgroup/cpuacct", v1("cpuacct")),
            ("/sys/fs/cgroup/cpuset", v1("cpuset")),
            ("/sys/fs/cgroup/memory", v1("memory")),
            ("/sys/fs/cgroup/devices", v1("devices")),
            ("/sys/fs/cgroup/freezer", v1("freezer")),
            ("/sys/fs/cgroup/blkio", v1("blkio")),
            ("/sys/fs/cgroup/pids", v1("pids")),
            ("/sys/fs/cgroup/systemd", Kind::V1(vec![])),
            ("/sys/fs/cgroup/unified", Kind::V2),
        ],
        options,
    );
    fx.put("/sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
    fx.kernel.existing_cgroup(&fx.path(OWN_MEMORY));
    fx.put(&format!("{OWN_MEMORY}/cgroup.procs"), "4242\n");
    fx
}

const SCOPE: &str =
    "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/run-r5e1c2.scope";

/// A systemd host with pure v2; cordon runs alone in a delegated scope.
fn systemd_v2_fixture(own_controllers: &str, procs: &str) -> Fixture {
    let fx = new_fixture(
        fixture_text("v2-systemd.mountinfo"),
        fixture_text("v2-systemd.cgroup"),
        vec![("/sys/fs/cgroup", Kind::V2)],
        FixtureOptions::default(),
    );
    fs::create_dir_all(fx.path(SCOPE)).unwrap();
    fx.put(&format!("{SCOPE}/cgroup.controllers"), own_controllers);
    fx.put(&format!("{SCOPE}/cgroup.subtree_control"), "");
    fx.put(&format!("{SCOPE}/cgroup.procs"), procs);
    fx.put(&format!("{SCOPE}/cgroup.type"), "domain\n");
    fx
}

/// Pure v2 and cordon in the root cgroup (a VM without systemd, or root in an init-less box).
fn root_v2_fixture(options: FixtureOptions) -> Fixture {
    let fx = new_fixture(
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n".into(),
        "0::/\n".into(),
        vec![("/sys/fs/cgroup", Kind::V2)],
        options,
    );
    fx.put(
        "/sys/fs/cgroup/cgroup.controllers",
        "cpuset cpu io memory hugetlb pids rdma misc\n",
    );
    fx.put("/sys/fs/cgroup/cgroup.procs", "1\n4242\n");
    fx
}

fn limits() -> CgroupLimits {
    CgroupLimits {
        memory_bytes: Some(32 << 20),
        pids: Some(64),
        cpu_cores: Some(0.5),
    }
}

// ---------------------------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------------------------

#[test]
fn detection_on_this_hosts_hybrid_layout_chooses_v1_with_the_nested_memory_cgroup() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let d = fx.detect();
    assert_eq!(d.version, Some(CgroupVersion::V1));
    assert_eq!(d.hint, None);
    let dirs: Vec<(Vec<Controller>, PathBuf)> =
        d.v1.iter()
            .map(|h| (h.controllers.clone(), h.own_dir.clone()))
            .collect();
    assert_eq!(
        dirs,
        vec![
            (vec![Controller::Memory], fx.path(OWN_MEMORY)),
            (vec![Controller::Pids], fx.path("/sys/fs/cgroup/pids")),
            (vec![Controller::Cpu], fx.path("/sys/fs/cgroup/cpu")),
            (vec![Controller::Cpuacct], fx.path("/sys/fs/cgroup/cpuacct")),
            (vec![Controller::Freezer], fx.path("/sys/fs/cgroup/freezer")),
        ]
    );
    assert!(d.v1.iter().all(|h| h.writable));
    let v2 = d.v2.as_ref().unwrap();
    assert_eq!(v2.hierarchy.own_dir, fx.path("/sys/fs/cgroup/unified"));
    assert_eq!(
        v2.status,
        V2Status::MissingControllers {
            missing: vec![Controller::Memory, Controller::Pids, Controller::Cpu]
        }
    );
    let line = d.to_string();
    assert!(line.starts_with("cgroup v1 (memory, pids, cpu, cpuacct, freezer), writable; v2 at "));
    assert!(
        line.ends_with("not used: missing memory, pids, cpu"),
        "{line}"
    );
}

#[test]
fn detection_on_pure_v1_shares_one_hierarchy_for_comounted_cpu_and_cpuacct() {
    let fx = new_fixture(
        fixture_text("v1.mountinfo"),
        fixture_text("v1.cgroup"),
        vec![
            (
                "/sys/fs/cgroup/cpu,cpuacct",
                Kind::V1(vec!["cpu", "cpuacct"]),
            ),
            ("/sys/fs/cgroup/memory", Kind::V1(vec!["memory"])),
            ("/sys/fs/cgroup/pids", Kind::V1(vec!["pids"])),
            ("/sys/fs/cgroup/freezer", Kind::V1(vec!["freezer"])),
        ],
        FixtureOptions::default(),
    );
    let d = fx.detect();
    assert_eq!(d.version, Some(CgroupVersion::V1));
    assert!(d.v2.is_none(), "no cgroup2 mount and no 0:: line");
    let dirs: Vec<(Vec<Controller>, PathBuf)> =
        d.v1.iter()
            .map(|h| (h.controllers.clone(), h.own_dir.clone()))
            .collect();
    assert_eq!(
        dirs,
        vec![
            (
                vec![Controller::Memory],
                fx.path("/sys/fs/cgroup/memory/user.slice")
            ),
            (
                vec![Controller::Pids],
                fx.path("/sys/fs/cgroup/pids/user.slice/user-1000.slice/session-3.scope")
            ),
            (
                vec![Controller::Cpu, Controller::Cpuacct],
                fx.path("/sys/fs/cgroup/cpu,cpuacct/user.slice")
            ),
            (vec![Controller::Freezer], fx.path("/sys/fs/cgroup/freezer")),
        ]
    );
}

#[test]
fn detection_in_a_container_maps_our_cgroup_below_the_bind_mounted_root() {
    let fx = new_fixture(
        fixture_text("container-v1.mountinfo"),
        fixture_text("container-v1.cgroup"),
        vec![
            ("/sys/fs/cgroup/memory", Kind::V1(vec!["memory"])),
            ("/sys/fs/cgroup/pids", Kind::V1(vec!["pids"])),
            (
                "/sys/fs/cgroup/cpu,cpuacct",
                Kind::V1(vec!["cpu", "cpuacct"]),
            ),
            ("/sys/fs/cgroup/freezer", Kind::V1(vec!["freezer"])),
        ],
        FixtureOptions::default(),
    );
    let d = fx.detect();
    assert_eq!(d.version, Some(CgroupVersion::V1));
    let memory = d.v1_for(Controller::Memory).unwrap();
    assert_eq!(memory.own_cgroup, "/docker/4f1c/agent");
    assert_eq!(memory.own_dir, fx.path("/sys/fs/cgroup/memory/agent"));
    assert_eq!(
        d.v1_for(Controller::Pids).unwrap().own_dir,
        fx.path("/sys/fs/cgroup/pids")
    );
    // The freezer is mounted read-only: usable for nothing, and left out of the plan.
    assert!(!d.v1_for(Controller::Freezer).unwrap().writable);
    let p = plan(&d, "s1", &limits()).unwrap();
    assert!(p.leaf_for(Controller::Freezer).is_none());
    assert_eq!(p.leaves.len(), 3);
}

#[test]
fn detection_on_systemd_v2_sees_that_our_own_scope_holds_processes() {
    let fx = systemd_v2_fixture("cpu io memory pids\n", "4242\n");
    let d = fx.detect();
    assert_eq!(d.version, None);
    let v2 = d.v2.as_ref().unwrap();
    assert_eq!(v2.hierarchy.own_dir, fx.path(SCOPE));
    assert_eq!(
        v2.hierarchy.controllers,
        vec![Controller::Memory, Controller::Pids, Controller::Cpu]
    );
    assert_eq!(v2.status, V2Status::OwnCgroupHasProcesses);
    let hint = d.hint.clone().unwrap();
    assert!(hint.contains("no-internal-process rule"), "{hint}");
    assert!(hint.contains("Delegate=yes"), "{hint}");
    assert!(matches!(
        plan(&d, "s1", &limits()),
        Err(CgroupError::Unavailable { .. })
    ));
}

#[test]
fn detection_on_v2_without_the_memory_controller_tells_how_to_delegate_it() {
    let fx = systemd_v2_fixture("cpu pids\n", "4242\n");
    let d = fx.detect();
    assert_eq!(d.version, None);
    assert_eq!(
        d.hint.as_deref(),
        Some(
            format!(
                "cgroup v2 memory controller not delegated to {}: run cordon under \
                 `systemd-run --user --scope -p Delegate=yes`, or as root",
                fx.path(SCOPE).display()
            )
            .as_str()
        )
    );
}

#[test]
fn detection_with_read_only_v1_hierarchies_says_to_run_as_root() {
    let fx = hybrid_fixture(FixtureOptions {
        read_only: vec!["/sys/fs/cgroup/pids"],
        ..FixtureOptions::default()
    });
    let d = fx.detect();
    assert_eq!(d.version, None);
    let hint = d.hint.unwrap();
    assert!(hint.starts_with("cgroup v1 "), "{hint}");
    assert!(
        hint.contains("/sys/fs/cgroup/pids is not writable: run cordon as root"),
        "{hint}"
    );
}

#[test]
fn detection_without_any_cgroup_mount_says_what_is_missing() {
    let d = detect_with(
        &cordon_sandbox::cgroup::LinuxFs,
        Path::new("/nonexistent"),
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n",
        "0::/\n",
    )
    .unwrap();
    assert_eq!(d.version, None);
    assert!(d.v1.is_empty() && d.v2.is_none());
    assert!(d
        .hint
        .unwrap()
        .starts_with("no cgroup hierarchy provides memory, pids, cpu"));
}

#[test]
fn detected_layout_serializes_for_cordon_doctor() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let json = serde_json::to_value(fx.detect()).unwrap();
    assert_eq!(json["version"], "v1");
    assert_eq!(json["v1"][0]["controllers"][0], "memory");
    assert_eq!(json["v2"]["status"]["status"], "missing_controllers");
}

// ---------------------------------------------------------------------------------------------
// Parsers
// ---------------------------------------------------------------------------------------------

#[test]
fn mountinfo_octal_escapes_and_optional_fields_are_decoded() {
    let mounts = parse_mountinfo(&fixture_text("container-v1.mountinfo")).unwrap();
    let work = mounts.iter().find(|m| m.mount_point == "/my work").unwrap();
    assert_eq!(work.fs_type, "tmpfs");
    let memory = mounts
        .iter()
        .find(|m| m.mount_point == "/sys/fs/cgroup/memory")
        .unwrap();
    assert_eq!(memory.root, "/docker/4f1c");
    assert_eq!(memory.super_options, vec!["rw", "memory"]);
    assert_eq!(memory.mount_options[0], "rw");
}

#[test]
fn malformed_proc_files_give_an_error_naming_the_line() {
    let err = parse_proc_cgroup("4:memory:/a\nx:pids:/\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "parse /proc/self/cgroup line 2: hierarchy id is not a number: \"x:pids:/\""
    );
    let err = parse_mountinfo("22 27 0:21 / /proc rw,relatime proc proc rw\n").unwrap_err();
    assert!(err
        .to_string()
        .starts_with("parse mountinfo line 1: no ' - ' separator"));
    assert!(parse_proc_cgroup("1:cpu:relative\n").is_err());
}

#[test]
fn parsers_never_panic_on_arbitrary_input() {
    // A deterministic xorshift stream over an alphabet rich in separators and escapes.
    let alphabet = b" :-/\\0123457abcmemorypids,=\n\t";
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let len = (next() % 160) as usize;
        let text: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
            .collect();
        let _ = parse_mountinfo(&text);
        let _ = parse_proc_cgroup(&text);
        let _ = detect_with(
            &cordon_sandbox::cgroup::LinuxFs,
            Path::new("/nonexistent"),
            &text,
            &text,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// v2 creation
// ---------------------------------------------------------------------------------------------

#[test]
fn relocating_on_v2_moves_only_the_supervisor_and_makes_v2_usable() {
    let fx = systemd_v2_fixture("cpu io memory pids\n", "4242\n");
    let d = relocate_self_with(&*fx.kernel, &fx.detect(), 4242).unwrap();
    assert_eq!(d.version, Some(CgroupVersion::V2));
    let scope = SCOPE;
    assert_eq!(
        fx.kernel.ops(),
        vec![
            mkdir(&format!("{scope}/cordon")),
            mkdir(&format!("{scope}/cordon/_supervisor")),
            write(&format!("{scope}/cordon/_supervisor/cgroup.procs"), "4242"),
            write(
                &format!("{scope}/cgroup.subtree_control"),
                "+memory +pids +cpu"
            ),
        ]
    );
    assert_eq!(fx.read(&format!("{scope}/cgroup.procs")), "");
    assert_eq!(
        fx.read(&format!("{scope}/cordon/_supervisor/cgroup.procs")),
        "4242\n"
    );
    assert_eq!(
        fx.read(&format!("{scope}/cgroup.subtree_control")),
        "cpu memory pids\n"
    );

    // Detecting again from inside `_supervisor` finds the same place for sessions.
    let again = detect_with(
        &*fx.kernel,
        fx.root(),
        &fx.mountinfo,
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r5e1c2.scope/cordon/_supervisor\n",
    )
    .unwrap();
    assert_eq!(again.version, Some(CgroupVersion::V2));
    assert_eq!(again.v2.unwrap().hierarchy.own_dir, fx.path(SCOPE));
}

#[test]
fn relocating_refuses_when_another_process_shares_our_cgroup() {
    let fx = systemd_v2_fixture("cpu io memory pids\n", "4242\n777\n");
    let err = relocate_self_with(&*fx.kernel, &fx.detect(), 4242).unwrap_err();
    assert!(
        matches!(err, CgroupError::SharedOwnCgroup { others: 1, .. }),
        "{err}"
    );
    assert_eq!(fx.kernel.ops(), vec![]);
}

#[test]
fn v2_create_writes_exactly_the_limit_files() {
    let fx = systemd_v2_fixture("cpu io memory pids\n", "4242\n");
    let d = relocate_self_with(&*fx.kernel, &fx.detect(), 4242).unwrap();
    fx.kernel.clear_ops();
    let leaf = format!("{SCOPE}/cordon/s1");
    let expected_plan = CgroupPlan {
        version: CgroupVersion::V2,
        session_id: "s1".into(),
        leaves: vec![Leaf {
            dir: fx.path(&leaf),
            controllers: vec![Controller::Memory, Controller::Pids, Controller::Cpu],
        }],
        steps: vec![
            Step::EnsureDir {
                path: fx.path(&format!("{SCOPE}/cordon")),
            },
            Step::EnableControllers {
                dir: fx.path(&format!("{SCOPE}/cordon")),
                controllers: vec![Controller::Memory, Controller::Pids, Controller::Cpu],
            },
            Step::CreateLeaf {
                path: fx.path(&leaf),
                parent: fx.path(&format!("{SCOPE}/cordon")),
            },
            Step::Write {
                path: fx.path(&format!("{leaf}/memory.max")),
                contents: "33554432".into(),
                optional: false,
            },
            Step::Write {
                path: fx.path(&format!("{leaf}/memory.swap.max")),
                contents: "0".into(),
                optional: true,
            },
            Step::Write {
                path: fx.path(&format!("{leaf}/pids.max")),
                contents: "64".into(),
                optional: false,
            },
            Step::Write {
                path: fx.path(&format!("{leaf}/cpu.max")),
                contents: "50000 100000".into(),
                optional: false,
            },
        ],
    };
    assert_eq!(plan(&d, "s1", &limits()).unwrap(), expected_plan);

    let session = fx.create(&d, "s1", &limits());
    assert_eq!(
        fx.kernel.ops(),
        vec![
            mkdir(&format!("{SCOPE}/cordon")),
            write(
                &format!("{SCOPE}/cordon/cgroup.subtree_control"),
                "+memory +pids +cpu"
            ),
            mkdir(&leaf),
            write(&format!("{leaf}/memory.max"), "33554432"),
            write(&format!("{leaf}/memory.swap.max"), "0"),
            write(&format!("{leaf}/pids.max"), "64"),
            write(&format!("{leaf}/cpu.max"), "50000 100000"),
        ]
    );
    assert_eq!(fx.read(&format!("{leaf}/memory.max")), "33554432");
    assert_eq!(fx.read(&format!("{leaf}/memory.swap.max")), "0");
    assert_eq!(fx.read(&format!("{leaf}/pids.max")), "64");
    assert_eq!(fx.read(&format!("{leaf}/cpu.max")), "50000 100000");
    assert_eq!(
        fx.read(&format!("{SCOPE}/cordon/cgroup.subtree_control")),
        "cpu memory pids\n"
    );
    assert_eq!(session.version(), CgroupVersion::V2);
    assert_eq!(session.paths(), vec![fx.path(&leaf)]);
    assert!(session.clone_into_fd().is_some());
    assert_eq!(session.plan(), &expected_plan);
}

#[test]
fn v2_in_the_root_cgroup_enables_controllers_for_cordon_and_skips_absent_swap_files() {
    let fx = root_v2_fixture(FixtureOptions {
        swap_accounting: false,
        ..FixtureOptions::default()
    });
    let d = fx.detect();
    assert_eq!(
        d.version,
        Some(CgroupVersion::V2),
        "the root cgroup is exempt"
    );
    let _session = fx.create(&d, "s1", &limits());
    assert_eq!(
        fx.kernel.ops(),
        vec![
            write(
                "/sys/fs/cgroup/cgroup.subtree_control",
                "+memory +pids +cpu"
            ),
            mkdir("/sys/fs/cgroup/cordon"),
            write(
                "/sys/fs/cgroup/cordon/cgroup.subtree_control",
                "+memory +pids +cpu"
            ),
            mkdir("/sys/fs/cgroup/cordon/s1"),
            write("/sys/fs/cgroup/cordon/s1/memory.max", "33554432"),
            write("/sys/fs/cgroup/cordon/s1/memory.swap.max", "0"),
            write("/sys/fs/cgroup/cordon/s1/pids.max", "64"),
            write("/sys/fs/cgroup/cordon/s1/cpu.max", "50000 100000"),
        ]
    );
    assert!(!fx.path("/sys/fs/cgroup/cordon/s1/memory.swap.max").exists());
}

#[test]
fn v2_in_a_container_cgroup_namespace_root_is_not_taken_for_the_exempt_root() {
    // Docker with a private cgroup namespace: "/" is the container's cgroup, which has a
    // cgroup.type file and holds the container's processes.
    let fx = root_v2_fixture(FixtureOptions::default());
    fx.put("/sys/fs/cgroup/cgroup.type", "domain\n");
    fx.put("/sys/fs/cgroup/cgroup.procs", "1\n");
    let d = fx.detect();
    assert_eq!(
        d.v2.as_ref().unwrap().status,
        V2Status::OwnCgroupHasProcesses
    );
    // cordon as the container's only process (pid 1) moves into a leaf and can go on.
    let d = relocate_self_with(&*fx.kernel, &d, 1).unwrap();
    assert_eq!(d.version, Some(CgroupVersion::V2));
    assert_eq!(
        fx.read("/sys/fs/cgroup/cordon/_supervisor/cgroup.procs"),
        "1\n"
    );
    let session = fx.create(&d, "s1", &limits());
    assert_eq!(session.paths(), vec![fx.path("/sys/fs/cgroup/cordon/s1")]);
    assert_eq!(fx.read("/sys/fs/cgroup/cordon/s1/pids.max"), "64");
}

#[test]
fn v2_enabling_controllers_in_a_busy_cgroup_fails_clearly_and_creates_nothing() {
    // Detection said usable, but by creation time our cgroup holds processes (or it is a
    // cgroup namespace root, which reads "/" but is not exempt).
    let fx = systemd_v2_fixture("cpu io memory pids\n", "4242\n");
    let mut d = fx.detect();
    d.version = Some(CgroupVersion::V2);
    d.v2.as_mut().unwrap().status = V2Status::Usable;
    let err = create_with(fx.kernel.clone(), &d, "s1", &limits()).unwrap_err();
    match &err {
        CgroupError::EnableControllers { errno, .. } => assert_eq!(*errno, Errno::EBUSY),
        other => panic!("unexpected {other}"),
    }
    let text = err.to_string();
    assert!(text.contains("cgroup.subtree_control: EBUSY"), "{text}");
    assert!(text.contains("no-internal-process rule"), "{text}");
    assert!(!fx.path(&format!("{SCOPE}/cordon")).exists());
}

#[test]
fn v2_kill_writes_cgroup_kill_and_waits_for_the_cgroup_to_empty() {
    let fx = root_v2_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    fx.put("/sys/fs/cgroup/cordon/s1/cgroup.procs", "999999\n");
    fx.kernel.clear_ops();
    session.kill_all().unwrap();
    assert_eq!(
        fx.kernel.ops(),
        vec![write("/sys/fs/cgroup/cordon/s1/cgroup.kill", "1")]
    );
    session.remove().unwrap();
    assert!(!fx.path("/sys/fs/cgroup/cordon/s1").exists());
    assert!(
        fx.path("/sys/fs/cgroup/cordon").exists(),
        "the shared parent stays"
    );
}

#[test]
fn v2_stats_are_read_from_memory_events_pids_events_and_cpu_stat() {
    let fx = root_v2_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    let leaf = "/sys/fs/cgroup/cordon/s1";
    fx.put(&format!("{leaf}/memory.peak"), "33550336\n");
    fx.put(
        &format!("{leaf}/memory.events"),
        "low 0\nhigh 0\nmax 218\noom 1\noom_kill 1\noom_group_kill 0\n",
    );
    fx.put(&format!("{leaf}/pids.events"), "max 43\n");
    fx.put(
        &format!("{leaf}/cpu.stat"),
        "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 3\n",
    );
    assert_eq!(
        session.stats(),
        CgroupStats {
            peak_memory_bytes: Some(33_550_336),
            oom_killed: true,
            memory_limit_hit: true,
            pids_limit_hit: true,
            cpu_usage_ns: Some(2_500_000),
        }
    );
    // A kernel before 5.19 has no memory.peak: unknown, not zero.
    fs::remove_file(fx.path(&format!("{leaf}/memory.peak"))).unwrap();
    fx.put(
        &format!("{leaf}/memory.events"),
        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    );
    fx.put(&format!("{leaf}/pids.events"), "max 0\n");
    let stats = session.stats();
    assert_eq!(stats.peak_memory_bytes, None);
    assert!(!stats.oom_killed && !stats.memory_limit_hit && !stats.pids_limit_hit);
}

// ---------------------------------------------------------------------------------------------
// v1 creation
// ---------------------------------------------------------------------------------------------

#[test]
fn v1_create_writes_exactly_the_limit_files_in_an_order_the_kernel_accepts() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let d = fx.detect();
    let session = fx.create(&d, "s1", &limits());
    let memory = format!("{OWN_MEMORY}/cordon/s1");
    let mut expected = Vec::new();
    for base in [
        OWN_MEMORY,
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/freezer",
    ] {
        // First session: the leaf's mkdir finds no `cordon/`, which is made, then the leaf.
        expected.push(mkdir(&format!("{base}/cordon/s1")));
        expected.push(mkdir(&format!("{base}/cordon")));
        expected.push(mkdir(&format!("{base}/cordon/s1")));
    }
    expected.extend([
        write(&format!("{memory}/memory.limit_in_bytes"), "33554432"),
        write(&format!("{memory}/memory.memsw.limit_in_bytes"), "33554432"),
        write("/sys/fs/cgroup/pids/cordon/s1/pids.max", "64"),
        write("/sys/fs/cgroup/cpu/cordon/s1/cpu.cfs_period_us", "100000"),
        write("/sys/fs/cgroup/cpu/cordon/s1/cpu.cfs_quota_us", "50000"),
    ]);
    assert_eq!(fx.kernel.ops(), expected);
    assert_eq!(
        fx.read(&format!("{memory}/memory.limit_in_bytes")),
        "33554432"
    );
    assert_eq!(
        fx.read(&format!("{memory}/memory.memsw.limit_in_bytes")),
        "33554432"
    );
    assert_eq!(fx.read("/sys/fs/cgroup/pids/cordon/s1/pids.max"), "64");
    assert_eq!(
        fx.read("/sys/fs/cgroup/cpu/cordon/s1/cpu.cfs_period_us"),
        "100000"
    );
    assert_eq!(
        fx.read("/sys/fs/cgroup/cpu/cordon/s1/cpu.cfs_quota_us"),
        "50000"
    );
    assert_eq!(session.paths().len(), 5);
    assert!(session.clone_into_fd().is_none());

    // Later sessions cost one mkdir per hierarchy.
    fx.kernel.clear_ops();
    let _s2 = fx.create(&d, "s2", &CgroupLimits::default());
    assert_eq!(
        fx.kernel.ops(),
        vec![
            mkdir(&format!("{OWN_MEMORY}/cordon/s2")),
            mkdir("/sys/fs/cgroup/pids/cordon/s2"),
            mkdir("/sys/fs/cgroup/cpu/cordon/s2"),
            mkdir("/sys/fs/cgroup/cpuacct/cordon/s2"),
            mkdir("/sys/fs/cgroup/freezer/cordon/s2"),
        ],
        "no limits, no writes"
    );
}

#[test]
fn v1_without_swap_accounting_still_limits_memory() {
    let fx = hybrid_fixture(FixtureOptions {
        swap_accounting: false,
        ..FixtureOptions::default()
    });
    let _session = fx.create(&fx.detect(), "s1", &limits());
    let memory = format!("{OWN_MEMORY}/cordon/s1");
    assert_eq!(
        fx.read(&format!("{memory}/memory.limit_in_bytes")),
        "33554432"
    );
    assert!(!fx
        .path(&format!("{memory}/memory.memsw.limit_in_bytes"))
        .exists());
}

#[test]
fn a_failed_limit_write_removes_every_directory_already_created() {
    let fx = hybrid_fixture(FixtureOptions {
        failing_writes: vec![("/pids.max", Errno::EINVAL)],
        ..FixtureOptions::default()
    });
    let err = create_with(fx.kernel.clone(), &fx.detect(), "s1", &limits()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "write \"64\" to {}: EINVAL: Invalid argument",
            fx.path("/sys/fs/cgroup/pids/cordon/s1/pids.max").display()
        )
    );
    for base in [OWN_MEMORY, "/sys/fs/cgroup/pids", "/sys/fs/cgroup/freezer"] {
        assert!(!fx.path(&format!("{base}/cordon/s1")).exists(), "{base}");
    }
}

#[test]
fn an_existing_session_cgroup_is_refused_and_left_alone() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let d = fx.detect();
    let first = fx.create(&d, "s1", &limits());
    let err = create_with(fx.kernel.clone(), &d, "s1", &limits()).unwrap_err();
    assert!(matches!(err, CgroupError::AlreadyExists { .. }), "{err}");
    for path in first.paths() {
        assert!(path.is_dir(), "{}", path.display());
    }
    assert_eq!(
        fx.read(&format!("{OWN_MEMORY}/cordon/s1/memory.limit_in_bytes")),
        "33554432"
    );
}

#[test]
fn bad_session_ids_and_limits_are_refused_before_anything_is_touched() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let d = fx.detect();
    for id in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "_supervisor",
        "memory.max",
        "a b",
        &"x".repeat(65),
    ] {
        let err = create_with(fx.kernel.clone(), &d, id, &limits()).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidSessionId { .. }),
            "{id:?}: {err}"
        );
    }
    let bad = [
        CgroupLimits {
            memory_bytes: Some(0),
            ..Default::default()
        },
        CgroupLimits {
            memory_bytes: Some(u64::MAX),
            ..Default::default()
        },
        CgroupLimits {
            pids: Some(0),
            ..Default::default()
        },
        CgroupLimits {
            pids: Some(1 << 40),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(f64::NAN),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(-1.0),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(0.001),
            ..Default::default()
        },
        CgroupLimits {
            cpu_cores: Some(5000.0),
            ..Default::default()
        },
    ];
    for limits in bad {
        let err = create_with(fx.kernel.clone(), &d, "s1", &limits).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidLimit { .. }),
            "{limits:?}: {err}"
        );
    }
    assert_eq!(fx.kernel.ops(), vec![]);
}

#[test]
fn add_pid_writes_the_pid_to_every_hierarchy_and_refuses_zero() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    session.add_pid(4321).unwrap();
    for path in session.paths() {
        assert_eq!(
            fs::read_to_string(path.join("cgroup.procs")).unwrap(),
            "4321"
        );
    }
    assert!(matches!(
        session.add_pid(0),
        Err(CgroupError::InvalidPid { pid: 0 })
    ));
    assert!(session.add_pid(-1).is_err());
}

#[test]
fn v1_stats_are_read_from_oom_control_failcnt_pids_events_and_cpuacct() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    let memory = format!("{OWN_MEMORY}/cordon/s1");
    fx.put(&format!("{memory}/memory.max_usage_in_bytes"), "33554432\n");
    fx.put(
        &format!("{memory}/memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    );
    fx.put(&format!("{memory}/memory.failcnt"), "17\n");
    fx.put("/sys/fs/cgroup/pids/cordon/s1/pids.events", "max 43\n");
    fx.put(
        "/sys/fs/cgroup/cpuacct/cordon/s1/cpuacct.usage",
        "123456789\n",
    );
    assert_eq!(
        session.stats(),
        CgroupStats {
            peak_memory_bytes: Some(33_554_432),
            oom_killed: true,
            memory_limit_hit: true,
            pids_limit_hit: true,
            cpu_usage_ns: Some(123_456_789),
        }
    );
    // Nothing happened: fresh files.
    let quiet = fx.create(&fx.detect(), "s2", &limits());
    assert_eq!(
        quiet.stats(),
        CgroupStats {
            peak_memory_bytes: Some(0),
            cpu_usage_ns: Some(0),
            ..CgroupStats::default()
        }
    );
}

#[test]
fn remove_deletes_every_leaf_and_keeps_the_shared_parent() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    let paths = session.paths();
    session.remove().unwrap();
    for path in paths {
        assert!(!path.exists(), "{}", path.display());
        assert!(path.parent().unwrap().is_dir());
    }
}

#[test]
fn a_dropped_session_removes_its_empty_directories() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let session = fx.create(&fx.detect(), "s1", &limits());
    let paths = session.paths();
    drop(session);
    assert!(paths.iter().all(|p| !p.exists()));
}

#[test]
fn cleanup_stale_removes_only_empty_sessions_that_are_not_running() {
    let fx = hybrid_fixture(FixtureOptions::default());
    let d = fx.detect();
    for id in ["old", "live", "busy"] {
        std::mem::forget(fx.create(&d, id, &CgroupLimits::default()));
    }
    fx.kernel
        .mkdir(&fx.path("/sys/fs/cgroup/pids/cordon/_supervisor"))
        .unwrap();
    fx.put("/sys/fs/cgroup/pids/cordon/busy/cgroup.procs", "55\n");
    fx.put("/sys/fs/cgroup/pids/cordon/_supervisor/cgroup.procs", "");
    let report = cleanup_stale_with(&*fx.kernel, &d, &|id| id == "live").unwrap();
    let bases = [
        OWN_MEMORY,
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/freezer",
    ];
    // The busy session is empty in every hierarchy but pids.
    let mut expected_removed = Vec::new();
    for base in bases {
        if base != "/sys/fs/cgroup/pids" {
            expected_removed.push(fx.path(&format!("{base}/cordon/busy")));
        }
        expected_removed.push(fx.path(&format!("{base}/cordon/old")));
    }
    assert_eq!(
        report,
        StaleCleanup {
            removed: expected_removed,
            busy: vec![fx.path("/sys/fs/cgroup/pids/cordon/busy")],
        }
    );
    assert!(fx.path("/sys/fs/cgroup/pids/cordon/_supervisor").is_dir());
    assert!(fx.path("/sys/fs/cgroup/pids/cordon/live").is_dir());
}

// ---------------------------------------------------------------------------------------------
// Real cgroups on this host
// ---------------------------------------------------------------------------------------------

/// Real-cgroup tests run one at a time: they measure CPU time and fill memory.
static HOST: Mutex<()> = Mutex::new(());

fn host(test: &str) -> Option<(Detected, MutexGuard<'static, ()>)> {
    let guard = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let detected = match detect_host() {
        Ok(d) => d,
        Err(err) => {
            eprintln!("SKIP {test}: cgroup detection failed: {err}");
            return None;
        }
    };
    if detected.version.is_none() {
        eprintln!("SKIP {test}: {detected}");
        return None;
    }
    Some((detected, guard))
}

fn session_id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// Kills and removes the session even when an assertion fails first.
struct Session(Option<Box<dyn SessionCgroup>>);

impl Session {
    fn new(detected: &Detected, name: &str, limits: &CgroupLimits) -> Session {
        Session(Some(create(detected, &session_id(name), limits).unwrap()))
    }

    fn get(&self) -> &dyn SessionCgroup {
        self.0.as_deref().unwrap()
    }

    /// Kills, removes, and checks that no directory is left.
    fn finish(mut self) {
        let session = self.0.take().unwrap();
        session.kill_all().unwrap();
        let paths = session.paths();
        session.remove().unwrap();
        for path in paths {
            assert!(!path.exists(), "{} left behind", path.display());
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(session) = self.0.take() {
            let _ = session.kill_all();
            let _ = session.remove();
        }
    }
}

/// A forked child that waits for `start` before running `body`; killed by pid if still alive
/// when dropped. `body` runs after `fork` in a multi-threaded process, so it makes only
/// async-signal-safe libc calls and never returns into Rust's runtime (the child `_exit`s).
struct Forked {
    pid: i32,
    go: Option<OwnedFd>,
    report: OwnedFd,
    reaped: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    Signal(i32),
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn fork_child(body: fn(report: i32) -> i32) -> Forked {
    let (go_read, go_write) = pipe();
    let (report_read, report_write) = pipe();
    // SAFETY: the child only calls async-signal-safe functions (read, the body's raw libc
    // calls, _exit) and never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut byte = 0u8;
        // SAFETY: reading one byte into a live local; then `_exit` without unwinding.
        unsafe {
            if libc::read(go_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) != 1 {
                libc::_exit(101);
            }
            let code = body(report_write.as_raw_fd());
            libc::_exit(code);
        }
    }
    drop(go_read);
    drop(report_write);
    Forked {
        pid,
        go: Some(go_write),
        report: report_read,
        reaped: false,
    }
}

impl Forked {
    fn start(&mut self) {
        let go = self.go.take().unwrap();
        // SAFETY: writing one byte from a live local to an open pipe.
        let n = unsafe { libc::write(go.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        assert_eq!(n, 1);
    }

    /// Reads one i32 the child reported, waiting at most 10 s.
    fn read_report(&self) -> i32 {
        let mut pfd = libc::pollfd {
            fd: self.report.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "child did not report within 10 s");
        let mut value = [0u8; 4];
        // SAFETY: reading 4 bytes into a live 4-byte buffer.
        let n = unsafe { libc::read(self.report.as_raw_fd(), value.as_mut_ptr().cast(), 4) };
        assert_eq!(n, 4, "child closed its report pipe");
        i32::from_ne_bytes(value)
    }

    /// Waits (at most 20 s, then SIGKILL) for the child to end.
    fn wait(&mut self) -> Exit {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a live status pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            assert!(rc >= 0, "waitpid failed");
            if rc == self.pid {
                self.reaped = true;
                break;
            }
            if Instant::now() > deadline {
                // SAFETY: signalling our own unreaped child by pid.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: our own child, not yet reaped, so the pid is still ours.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn report(fd: i32, value: i32) {
    let bytes = value.to_ne_bytes();
    // SAFETY: writing 4 bytes from a live local.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), 4) };
}

/// Child body: fork 50 times; children wait to be killed. Reports how many forks failed with
/// EAGAIN, then waits too.
fn fork_fifty(report_fd: i32) -> i32 {
    let mut eagain = 0;
    for _ in 0..50 {
        // SAFETY: fork in a single-threaded child; the grandchild only pauses.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause takes no arguments.
                unsafe { libc::pause() };
            }
        }
        // SAFETY: reading this thread's errno.
        if pid < 0 && unsafe { *libc::__errno_location() } == libc::EAGAIN {
            eagain += 1;
        }
    }
    report(report_fd, eagain);
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
    }
}

#[test]
fn pids_limit_makes_forks_fail_with_eagain_and_is_reported() {
    let Some((detected, _guard)) = host("pids_limit") else {
        return;
    };
    let run = |name: &str, pids: u64| {
        let session = Session::new(
            &detected,
            name,
            &CgroupLimits {
                pids: Some(pids),
                ..Default::default()
            },
        );
        let mut child = fork_child(fork_fifty);
        session.get().add_pid(child.pid).unwrap();
        child.start();
        let eagain = child.read_report();
        let stats = session.get().stats();
        session.finish();
        assert_eq!(child.wait(), Exit::Signal(libc::SIGKILL));
        (eagain, stats.pids_limit_hit)
    };
    // The child itself plus 7 forks fill 8 slots; the other 43 forks fail.
    assert_eq!(run("pids8", 8), (43, true));
    // Control: the same child with room for everything.
    assert_eq!(run("pids64", 64), (0, false));
}

/// Child body: touch 256 MiB of anonymous memory.
fn allocate_256m(_report: i32) -> i32 {
    touch_memory(256 << 20)
}

fn allocate_48m(_report: i32) -> i32 {
    touch_memory(48 << 20)
}

fn touch_memory(size: usize) -> i32 {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return 2;
    }
    let base = base.cast::<u8>();
    for offset in (0..size).step_by(4096) {
        // SAFETY: `offset < size`, inside the mapping made above.
        unsafe { base.add(offset).write_volatile(1) };
    }
    0
}

#[test]
fn memory_limit_oom_kills_an_allocation_past_it_and_is_reported() {
    let Some((detected, _guard)) = host("memory_limit") else {
        return;
    };
    let run = |name: &str, limit: u64, body: fn(i32) -> i32| {
        let session = Session::new(
            &detected,
            name,
            &CgroupLimits {
                memory_bytes: Some(limit),
                ..Default::default()
            },
        );
        let mut child = fork_child(body);
        session.get().add_pid(child.pid).unwrap();
        child.start();
        let exit = child.wait();
        let stats = session.get().stats();
        session.finish();
        (exit, stats)
    };
    let (exit, stats) = run("mem32", 32 << 20, allocate_256m);
    assert_eq!(exit, Exit::Signal(libc::SIGKILL));
    assert!(stats.oom_killed, "{stats:?}");
    assert!(stats.memory_limit_hit, "{stats:?}");
    let peak = stats.peak_memory_bytes.unwrap();
    assert!((24 << 20..=32 << 20).contains(&peak), "peak {peak}");

    // Control: the same kind of child under a limit it fits in.
    let (exit, stats) = run("mem128", 128 << 20, allocate_48m);
    assert_eq!(exit, Exit::Code(0));
    assert!(!stats.oom_killed, "{stats:?}");
    assert!(stats.peak_memory_bytes.unwrap() >= 48 << 20);
}

/// Child body: a grandchild that forks a great-grandchild and exits (so it is orphaned),
/// the great-grandchild reports its pid; everyone else waits.
fn double_fork(report_fd: i32) -> i32 {
    // SAFETY: fork in a single-threaded child; each branch makes only raw libc calls.
    unsafe {
        let middle = libc::fork();
        if middle == 0 {
            if libc::fork() == 0 {
                report(report_fd, libc::getpid());
                loop {
                    libc::pause();
                }
            }
            libc::_exit(0);
        }
        libc::waitpid(middle, std::ptr::null_mut(), 0);
        loop {
            libc::pause();
        }
    }
}

fn process_state(pid: i32) -> Option<char> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("State:"))?;
    line.split_whitespace().nth(1)?.chars().next()
}

#[test]
fn kill_all_kills_a_child_and_its_double_forked_grandchild() {
    let Some((detected, _guard)) = host("kill_all") else {
        return;
    };
    let session = Session::new(&detected, "kill", &CgroupLimits::default());
    let mut child = fork_child(double_fork);
    session.get().add_pid(child.pid).unwrap();
    child.start();
    let orphan = child.read_report();
    let state = process_state(orphan);
    assert!(
        matches!(state, Some(s) if s != 'Z'),
        "orphan should be alive: {state:?}"
    );
    session.get().kill_all().unwrap();
    assert_eq!(child.wait(), Exit::Signal(libc::SIGKILL));
    // The orphan is dead: gone, or a zombie until pid 1 reaps it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(process_state(orphan), Some(s) if s != 'Z') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let state = process_state(orphan);
    assert!(
        matches!(state, None | Some('Z')),
        "orphan {orphan} still {state:?}"
    );
    session.finish();
}

/// Child body: every process forks forever.
fn fork_loop(_report: i32) -> i32 {
    loop {
        // SAFETY: fork in a single-threaded process; every branch keeps looping here.
        unsafe {
            if libc::fork() < 0 {
                libc::usleep(1000);
            }
        }
    }
}

#[test]
fn kill_all_stops_a_fork_loop_within_its_deadline() {
    let Some((detected, _guard)) = host("fork_loop") else {
        return;
    };
    // Bounded: at most 32 tasks, half a core.
    let session = Session::new(
        &detected,
        "forkloop",
        &CgroupLimits {
            pids: Some(32),
            cpu_cores: Some(0.5),
            ..Default::default()
        },
    );
    let mut child = fork_child(fork_loop);
    session.get().add_pid(child.pid).unwrap();
    child.start();
    std::thread::sleep(Duration::from_millis(200));
    assert!(session.get().stats().pids_limit_hit);
    let started = Instant::now();
    session.get().kill_all().unwrap();
    let took = started.elapsed();
    eprintln!("kill_all of a fork loop took {took:?}");
    assert!(took < Duration::from_secs(5));
    assert_eq!(child.wait(), Exit::Signal(libc::SIGKILL));
    session.finish();
}

/// Child body: spin until this process has used 60 ms of CPU time.
fn spin_60ms_of_cpu(_report: i32) -> i32 {
    let cpu_ns = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills a live timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    while cpu_ns() < 60_000_000 {}
    0
}

#[test]
fn cpu_quota_slows_a_busy_loop_and_cpu_time_is_reported() {
    let Some((detected, _guard)) = host("cpu_quota") else {
        return;
    };
    let run = |name: &str, cores: Option<f64>| {
        let session = Session::new(
            &detected,
            name,
            &CgroupLimits {
                cpu_cores: cores,
                ..Default::default()
            },
        );
        let mut child = fork_child(spin_60ms_of_cpu);
        session.get().add_pid(child.pid).unwrap();
        let started = Instant::now();
        child.start();
        assert_eq!(child.wait(), Exit::Code(0));
        let wall = started.elapsed();
        let stats = session.get().stats();
        session.finish();
        (wall, stats.cpu_usage_ns)
    };
    // 60 ms of CPU at 10 ms per 100 ms period needs at least 5 full periods of waiting.
    let (limited, limited_cpu) = run("cpu10", Some(0.1));
    // Control: unthrottled, 60 ms of CPU takes far less, even on a busy 2-core machine.
    let (unlimited, unlimited_cpu) = run("cpufree", None);
    eprintln!(
        "60 ms of CPU: {limited:?} wall at 0.1 cores ({limited_cpu:?} ns), \
         {unlimited:?} unlimited ({unlimited_cpu:?} ns)"
    );
    assert!(
        limited >= Duration::from_millis(400),
        "limited took {limited:?}"
    );
    assert!(
        unlimited < Duration::from_millis(400),
        "unlimited took {unlimited:?}"
    );
    match (limited_cpu, unlimited_cpu) {
        (Some(a), Some(b)) => assert!(a >= 60_000_000 && b >= 60_000_000, "{a} {b}"),
        _ => eprintln!("note: no CPU accounting here (no cpuacct), usage not checked"),
    }
}

#[test]
fn create_and_remove_are_fast() {
    let Some((detected, _guard)) = host("timing") else {
        return;
    };
    let mut create_times = Vec::new();
    let mut add_times = Vec::new();
    let mut remove_times = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        let session = create(&detected, &session_id(&format!("time{i}")), &limits()).unwrap();
        create_times.push(started.elapsed());
        // The test process itself would move; a fresh child is the realistic target.
        let mut child = fork_child(|_| 0);
        let started = Instant::now();
        session.add_pid(child.pid).unwrap();
        add_times.push(started.elapsed());
        child.start();
        child.wait();
        let started = Instant::now();
        session.remove().unwrap();
        remove_times.push(started.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (c, a, r) = (
        median(&mut create_times),
        median(&mut add_times),
        median(&mut remove_times),
    );
    eprintln!(
        "cgroup {} timing (median of 30): create {c:?}, add_pid {a:?}, remove {r:?}",
        detected.version.unwrap()
    );
    assert!(
        c + r < Duration::from_millis(20),
        "create {c:?} + remove {r:?}"
    );
}

#[test]
fn cleanup_stale_on_the_host_removes_only_the_stale_session() {
    let Some((detected, _guard)) = host("cleanup_stale") else {
        return;
    };
    let stale_id = session_id("stale");
    let live = Session::new(&detected, "live", &CgroupLimits::default());
    let stale = create(&detected, &stale_id, &CgroupLimits::default()).unwrap();
    let stale_paths = stale.paths();
    // A crashed supervisor: the directories stay, nobody will remove them.
    std::mem::forget(stale);
    let report = cleanup_stale(&detected, &|id| id != stale_id).unwrap();
    let mut removed = report.removed.clone();
    removed.sort();
    let mut expected = stale_paths.clone();
    expected.sort();
    assert_eq!(removed, expected);
    assert!(stale_paths.iter().all(|p| !p.exists()));
    assert!(live.get().paths().iter().all(|p| p.is_dir()));
    live.finish();
}
