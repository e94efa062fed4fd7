//! Landlock: the filesystem, TCP and IPC allowlist the sandboxed command runs under.
//!
//! Guarantees, once [`apply`] has returned `Ok(status)` in a thread (and so in everything it
//! later forks or execs; Landlock domains are inherited and cannot be left):
//!
//! - The filesystem is deny-by-default: only the hierarchies a [`LandlockPlan`] names can be
//!   reached, each with the rights of its class (read+execute, read-only, or read-write), for
//!   every right Landlock ABI [`TARGET_ABI`] knows. Paths are taken in the caller's current mount
//!   namespace (inside the sandbox: after `pivot_root`); a path that does not exist grants
//!   nothing and is listed in [`LandlockStatus::skipped`].
//! - When the plan says so, TCP `connect` and/or `bind` fail with `EACCES` (ABI >= 4), connecting
//!   to an abstract UNIX socket made outside the domain and signalling a process outside it fail
//!   with `EPERM` (ABI >= 6).
//! - `no_new_privs` is set.
//! - The returned [`LandlockStatus`] says exactly what the kernel enforces: which of the
//!   filesystem, network and scope restrictions are in force, and whether every requested right
//!   was (`fully_enforced`). Missing kernel support degrades a right to "not enforced" (best
//!   effort) and shows there; it never shows as enforced. A kernel without Landlock is an error
//!   ([`LandlockError::Unsupported`]): the caller decides whether to fail closed.
//!
//! Rights are requested at a fixed ABI, [`TARGET_ABI`], the one the tests ran against, rather than
//! at whatever a future kernel offers: newer ABIs add rights that deny by default (UDP, pathname
//! UNIX sockets), which would change what the sandboxed code can do without anyone testing it.
//! Raising [`TARGET_ABI`] is a reviewed change.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use landlock::{
    make_bitflags, Access, AccessFs, AccessNet, BitFlags, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use serde::{Deserialize, Serialize};

/// The Landlock ABI whose rights are requested (see the module docs).
pub const TARGET_ABI: u32 = 7;
const TARGET: ABI = ABI::V7;

/// What the sandboxed command may reach. Paths are inside the sandbox's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LandlockPlan {
    /// Read, list and execute (system directories).
    pub read_exec: Vec<PathBuf>,
    /// Read and list, no execute.
    pub read_only: Vec<PathBuf>,
    /// Everything: create, write, remove, rename, truncate, execute, device ioctls.
    pub read_write: Vec<PathBuf>,
    /// Whether TCP `connect` stays allowed (to any port).
    pub allow_tcp_connect: bool,
    /// Whether TCP `bind` stays allowed (to any port).
    pub allow_tcp_bind: bool,
    /// Refuse connecting to abstract UNIX sockets created outside the sandbox.
    pub scope_abstract_unix: bool,
    /// Refuse signalling processes outside the sandbox.
    pub scope_signals: bool,
}

/// What the kernel enforces after [`apply`]; recorded in the sandbox result. The default is
/// "nothing applied" (ABI 0, nothing enforced): what to record when the kernel has no Landlock
/// and the policy explicitly allowed running without it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LandlockStatus {
    /// The kernel's Landlock ABI; 0 when it has none.
    pub abi: u32,
    /// Filesystem access is restricted to the plan's paths.
    pub fs: bool,
    /// The TCP restrictions the plan asked for are in force (false when it asked for none).
    pub net: bool,
    /// The scopes the plan asked for are in force (false when it asked for none).
    pub scoped: bool,
    /// Every right and scope requested is enforced; nothing was dropped for lack of support.
    pub fully_enforced: bool,
    /// Plan paths that did not exist, so granted nothing.
    pub skipped: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("landlock: not supported by this kernel (ABI 0: not built in or not enabled at boot)")]
    Unsupported,
    #[error("landlock: open {}: {errno}", path.display())]
    OpenPath { path: PathBuf, errno: Errno },
    #[error("landlock: stat {}: {errno}", path.display())]
    StatPath { path: PathBuf, errno: Errno },
    #[error("landlock: {step}: {source}")]
    Ruleset {
        step: &'static str,
        source: RulesetError,
    },
    #[error("landlock: restrict_self reported nothing enforced on a kernel with ABI {abi}")]
    NotEnforced { abi: u32 },
    #[error("landlock: no_new_privs was not set")]
    NoNewPrivs,
}

/// The access class of a plan path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathClass {
    ReadExec,
    ReadOnly,
    ReadWrite,
}

/// Rights a file (not a directory) can carry; the kernel refuses directory rights on a file.
const FILE_RIGHTS: BitFlags<AccessFs> =
    make_bitflags!(AccessFs::{ReadFile | WriteFile | Execute | Truncate | IoctlDev});

/// The filesystem rights of a class, at [`TARGET_ABI`].
pub fn class_access(class: PathClass) -> BitFlags<AccessFs> {
    match class {
        PathClass::ReadExec => make_bitflags!(AccessFs::{Execute | ReadFile | ReadDir}),
        PathClass::ReadOnly => make_bitflags!(AccessFs::{ReadFile | ReadDir}),
        PathClass::ReadWrite => AccessFs::from_all(TARGET),
    }
}

/// The plan's paths with their classes, in the order rules are added.
pub fn path_rules(plan: &LandlockPlan) -> Vec<(&Path, PathClass)> {
    let classed = [
        (&plan.read_exec, PathClass::ReadExec),
        (&plan.read_only, PathClass::ReadOnly),
        (&plan.read_write, PathClass::ReadWrite),
    ];
    classed
        .into_iter()
        .flat_map(|(paths, class)| paths.iter().map(move |p| (p.as_path(), class)))
        .collect()
}

/// The TCP rights the plan takes away (handled, with no rule granting them back).
pub fn denied_net(plan: &LandlockPlan) -> BitFlags<AccessNet> {
    let mut denied = BitFlags::EMPTY;
    if !plan.allow_tcp_connect {
        denied |= AccessNet::ConnectTcp;
    }
    if !plan.allow_tcp_bind {
        denied |= AccessNet::BindTcp;
    }
    denied
}

/// The scopes the plan asks for.
pub fn scopes(plan: &LandlockPlan) -> BitFlags<Scope> {
    let mut scopes = BitFlags::EMPTY;
    if plan.scope_abstract_unix {
        scopes |= Scope::AbstractUnixSocket;
    }
    if plan.scope_signals {
        scopes |= Scope::Signal;
    }
    scopes
}

/// What a kernel of Landlock ABI `abi` enforces of `plan`, given the ruleset was applied.
/// Pure: [`apply`] reports this, cross-checked with the `landlock` crate's own verdict.
pub fn expected_status(plan: &LandlockPlan, abi: u32, skipped: Vec<PathBuf>) -> LandlockStatus {
    // Rights and the ABI that introduced them: Refer 2, Truncate 3, TCP 4, IoctlDev 5, scopes 6.
    let fs_full = abi >= 5;
    let net = !denied_net(plan).is_empty() && abi >= 4;
    let scoped = !scopes(plan).is_empty() && abi >= 6;
    let net_ok = denied_net(plan).is_empty() || net;
    let scopes_ok = scopes(plan).is_empty() || scoped;
    LandlockStatus {
        abi,
        fs: abi >= 1,
        net,
        scoped,
        fully_enforced: abi >= 1 && fs_full && net_ok && scopes_ok,
        skipped,
    }
}

/// The kernel's Landlock ABI version: `landlock_create_ruleset(NULL, 0, VERSION)`; 0 when the
/// kernel has no Landlock or it is disabled.
pub fn probe_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer and size 0 the call reads no memory; it returns the
    // ABI version or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).unwrap_or(0)
}

fn ruleset_err(step: &'static str) -> impl FnOnce(RulesetError) -> LandlockError {
    move |source| LandlockError::Ruleset { step, source }
}

/// Opens a plan path for a rule: `Ok(None)` when it does not exist.
fn open_path(path: &Path) -> Result<Option<(OwnedFd, bool)>, LandlockError> {
    let fd = match nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(errno) => {
            return Err(LandlockError::OpenPath {
                path: path.to_owned(),
                errno,
            })
        }
    };
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(|errno| LandlockError::StatPath {
        path: path.to_owned(),
        errno,
    })?;
    let is_dir = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    Ok(Some((fd, is_dir)))
}

/// Restricts the calling thread, and everything it later starts, to `plan`.
///
/// Call it in the single-threaded sandbox init after `pivot_root`, before seccomp and `exec`.
/// It allocates, so it must not run between `fork` and `exec` of a multi-threaded process.
pub fn apply(plan: &LandlockPlan) -> Result<LandlockStatus, LandlockError> {
    let abi = probe_abi();
    if abi == 0 {
        return Err(LandlockError::Unsupported);
    }
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET))
        .map_err(ruleset_err("handle filesystem rights"))?;
    let net = denied_net(plan);
    if !net.is_empty() {
        ruleset = ruleset
            .handle_access(net)
            .map_err(ruleset_err("handle TCP rights"))?;
    }
    let scopes = scopes(plan);
    if !scopes.is_empty() {
        ruleset = ruleset.scope(scopes).map_err(ruleset_err("scope"))?;
    }
    let mut created = ruleset.create().map_err(ruleset_err("create ruleset"))?;
    let mut skipped = Vec::new();
    for (path, class) in path_rules(plan) {
        let Some((fd, is_dir)) = open_path(path)? else {
            skipped.push(path.to_owned());
            continue;
        };
        let access = if is_dir {
            class_access(class)
        } else {
            class_access(class) & FILE_RIGHTS
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(ruleset_err("add path rule"))?;
    }
    let restricted = created
        .restrict_self()
        .map_err(ruleset_err("restrict_self"))?;
    if !restricted.no_new_privs {
        return Err(LandlockError::NoNewPrivs);
    }
    let status = expected_status(plan, abi, skipped);
    match restricted.ruleset {
        RulesetStatus::NotEnforced => Err(LandlockError::NotEnforced { abi }),
        RulesetStatus::FullyEnforced => Ok(status),
        // The crate saw something dropped; never claim more than it did.
        _ => Ok(LandlockStatus {
            fully_enforced: false,
            ..status
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LandlockPlan {
        LandlockPlan {
            read_exec: vec!["/usr".into(), "/bin".into()],
            read_only: vec!["/etc".into()],
            read_write: vec!["/workspace".into(), "/tmp".into()],
            allow_tcp_connect: true,
            allow_tcp_bind: false,
            scope_abstract_unix: true,
            scope_signals: true,
        }
    }

    #[test]
    fn paths_keep_plan_order_with_their_class() {
        let p = plan();
        let rules: Vec<_> = path_rules(&p)
            .into_iter()
            .map(|(p, c)| (p.to_owned(), c))
            .collect();
        assert_eq!(
            rules,
            vec![
                ("/usr".into(), PathClass::ReadExec),
                ("/bin".into(), PathClass::ReadExec),
                ("/etc".into(), PathClass::ReadOnly),
                ("/workspace".into(), PathClass::ReadWrite),
                ("/tmp".into(), PathClass::ReadWrite),
            ]
        );
    }

    #[test]
    fn read_only_paths_cannot_execute_or_write_and_read_write_gets_every_right() {
        let ro = class_access(PathClass::ReadOnly);
        assert!(!ro.contains(AccessFs::Execute));
        assert!((ro & AccessFs::from_write(TARGET)).is_empty());
        assert!(class_access(PathClass::ReadExec).contains(AccessFs::Execute));
        assert_eq!(
            class_access(PathClass::ReadWrite),
            AccessFs::from_all(TARGET)
        );
        assert!(class_access(PathClass::ReadWrite).contains(AccessFs::IoctlDev));
    }

    #[test]
    fn only_the_tcp_rights_the_plan_withholds_are_handled() {
        let mut p = plan();
        assert_eq!(denied_net(&p), BitFlags::from(AccessNet::BindTcp));
        p.allow_tcp_connect = false;
        assert_eq!(denied_net(&p), AccessNet::BindTcp | AccessNet::ConnectTcp);
        p.allow_tcp_connect = true;
        p.allow_tcp_bind = true;
        assert!(denied_net(&p).is_empty());
    }

    #[test]
    fn status_reports_what_each_abi_enforces() {
        let p = plan();
        let at = |abi| {
            let s = expected_status(&p, abi, vec![]);
            (s.fs, s.net, s.scoped, s.fully_enforced)
        };
        assert_eq!(at(1), (true, false, false, false));
        assert_eq!(at(3), (true, false, false, false));
        assert_eq!(at(4), (true, true, false, false));
        assert_eq!(at(5), (true, true, false, false));
        assert_eq!(at(6), (true, true, true, true));
        assert_eq!(at(7), (true, true, true, true));
    }

    #[test]
    fn a_plan_that_withholds_nothing_from_the_network_is_not_reported_as_net_restricted() {
        let p = LandlockPlan {
            allow_tcp_bind: true,
            scope_signals: false,
            scope_abstract_unix: false,
            ..plan()
        };
        let s = expected_status(&p, 7, vec![]);
        assert!(!s.net && !s.scoped && s.fully_enforced);
        // Nothing asked of the network, so an ABI without it drops nothing but IoctlDev.
        assert!(!expected_status(&p, 4, vec![]).fully_enforced);
        assert!(expected_status(&p, 5, vec![]).fully_enforced);
    }

    #[test]
    fn the_published_target_abi_is_the_one_requested() {
        assert_eq!(TARGET.to_string(), TARGET_ABI.to_string());
    }

    #[test]
    fn plans_reject_unknown_fields() {
        let json = r#"{"read_exec":[],"read_only":[],"read_write":[],"allow_tcp_connect":true,
            "allow_tcp_bind":true,"scope_abstract_unix":true,"scope_signals":true,"typo":1}"#;
        assert!(serde_json::from_str::<LandlockPlan>(json).is_err());
    }
}
