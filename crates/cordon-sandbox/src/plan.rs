//! The sandbox plan: everything the sandbox init will do, decided up front by pure functions.
//!
//! Guarantees: building a plan performs no I/O beyond what the caller already gathered into
//! [`HostFacts`]; the same inputs give the same plan, so tests pin it with exact equality and
//! the result can record exactly what was applied. Paths in a [`MountOp`] are relative to the new
//! root; nothing in a plan names a host path except bind sources.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::landlock::LandlockPlan;

/// The uid and gid the sandboxed command runs as, inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// See [`SANDBOX_UID`].
pub const SANDBOX_GID: u32 = 1000;
/// The sandbox's `PATH`: the host's is never used (it may name directories the sandbox lacks).
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";
/// Host variables copied into the sandbox when set. Everything else is dropped.
pub const ENV_PASSTHROUGH: &[&str] = &["LANG", "TERM", "TZ"];

/// Top-level host directories bound read-only when they are directories, or recreated as the
/// same symlink when they are symlinks (merged-/usr systems).
pub const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// `/etc` entries bound read-only from the host when present. Everything else in the host's
/// `/etc` stays invisible: no `shadow`, `gshadow`, `sudoers`, `ssh`, `machine-id`, …
pub const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "os-release",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "services",
    "ssl",
    "timezone",
    "xdg",
];

/// Device nodes bound from the host's `/dev`.
pub const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// `/proc` files hidden behind `/dev/null` (kernel memory, keys, timing side channels, sysrq).
pub const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "key-users",
    "kallsyms",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "sysrq-trigger",
    "kmsg",
    "kpagecount",
    "kpageflags",
    "kpagecgroup",
    "config.gz",
    "vmallocinfo",
];
/// `/proc` directories hidden behind an empty read-only tmpfs.
pub const PROC_MASKED_DIRS: &[&str] = &["acpi", "asound", "scsi", "firmware", "driver"];
/// `/proc` directories kept visible but read-only.
pub const PROC_READONLY_DIRS: &[&str] = &["sys", "bus", "fs", "irq"];

/// What kind of thing a host path is; gathered by [`crate::probe::host_facts`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostEntry {
    Dir,
    File,
    Symlink(PathBuf),
    Missing,
}

/// The facts about the host the plan depends on, gathered once by a small probe so that the
/// plan itself stays pure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// `(name, kind)` for each of [`SYSTEM_DIRS`].
    pub system_dirs: Vec<(String, HostEntry)>,
    /// `(name, kind)` for each of [`ETC_ALLOWLIST`].
    pub etc: Vec<(String, HostEntry)>,
}

/// Where a bind mount comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum BindSource {
    /// A host path, looked up before anything is mounted over it.
    Host(PathBuf),
    /// The workspace, opened by the supervisor's plan as a path the init opens first.
    Workspace,
}

/// One step of building the sandbox's filesystem. Targets are relative to the new root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum MountOp {
    /// Create a directory on the (still writable) root tmpfs.
    Mkdir { path: PathBuf, mode: u32 },
    /// Create a symlink `path -> target`.
    Symlink { target: PathBuf, path: PathBuf },
    /// Write a generated file.
    WriteFile {
        path: PathBuf,
        contents: String,
        mode: u32,
    },
    /// The code given with `--code`, written read-only into the sandbox's root.
    Code {
        path: PathBuf,
        #[serde(skip)]
        bytes: Vec<u8>,
        len: usize,
    },
    /// Mount a fresh tmpfs.
    Tmpfs {
        path: PathBuf,
        size: u64,
        mode: u32,
        noexec: bool,
    },
    /// Copy a small host file into the root (read-only once the root is), which costs a
    /// fraction of a bind mount at start and at teardown; a file larger than `max_bytes`, or
    /// one the sandbox user cannot read, is bound read-only instead.
    CopyFile {
        source: PathBuf,
        path: PathBuf,
        max_bytes: u64,
    },
    /// Bind-mount a host directory or file (the mount point is created first).
    Bind {
        source: BindSource,
        path: PathBuf,
        dir: bool,
        writable: bool,
    },
    /// Mount a fresh procfs (nosuid, nodev, noexec).
    Proc { path: PathBuf },
    /// Hide a file behind the bind of `/dev/null` (skipped when the file does not exist).
    MaskFile { path: PathBuf },
    /// Hide a directory behind an empty read-only tmpfs (skipped when missing).
    MaskDir { path: PathBuf },
    /// Make an existing directory read-only, with its submounts when `recursive` (skipped when
    /// missing).
    ReadOnly { path: PathBuf, recursive: bool },
}

/// Options the mount plan depends on, taken from the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountOptions {
    pub tmp_size: u64,
    pub shm_size: u64,
    pub hostname: String,
    pub gateway_dns: bool,
    pub extra: Vec<ExtraBind>,
    /// `(file name, bytes)` of the `--code` file, placed at `/.cordon/<name>`.
    pub code: Option<(String, Vec<u8>)>,
    /// The sandbox's trust bundle (the host's bundle plus the session CA, PEM), written to
    /// [`CA_BUNDLE_PATH`] instead of binding the host's `/etc/ssl`.
    #[serde(skip)]
    pub ca_bundle: Option<String>,
}

/// Where the generated trust bundle is placed (Debian's system bundle path, which OpenSSL,
/// curl, Python, Node with `NODE_EXTRA_CA_CERTS`, pip and git read).
pub const CA_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the `--code` file is placed inside the sandbox.
pub fn code_path(name: &str) -> PathBuf {
    Path::new("/.cordon").join(name)
}

/// Largest `/etc` file copied into the root instead of bound ([`MountOp::CopyFile`]).
pub const ETC_COPY_MAX_BYTES: u64 = 128 * 1024;

/// The root tmpfs size a plan needs: room for the skeleton, the copied `/etc` files and the
/// code file.
pub fn root_size(opts: &MountOptions) -> u64 {
    4 * 1024 * 1024
        + ETC_ALLOWLIST.len() as u64 * ETC_COPY_MAX_BYTES
        + opts.code.as_ref().map_or(0, |(_, b)| b.len() as u64)
        + opts.ca_bundle.as_ref().map_or(0, |b| b.len() as u64)
}

/// An extra bind from the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtraBind {
    pub host: PathBuf,
    pub path: PathBuf,
    pub writable: bool,
    pub dir: bool,
}

fn rel(p: &str) -> PathBuf {
    PathBuf::from(p.trim_start_matches('/'))
}

/// Builds the ordered list of mount operations for a sandbox.
///
/// The root is a small tmpfs that the init remounts read-only once every op has run; only
/// `/workspace`, `/tmp` and `/dev/shm` (and writable extra binds) stay writable.
pub fn mount_plan(facts: &HostFacts, opts: &MountOptions) -> Vec<MountOp> {
    let mut ops = Vec::new();
    for (name, entry) in &facts.system_dirs {
        match entry {
            HostEntry::Dir => ops.push(MountOp::Bind {
                source: BindSource::Host(Path::new("/").join(name)),
                path: rel(name),
                dir: true,
                writable: false,
            }),
            HostEntry::Symlink(target) => ops.push(MountOp::Symlink {
                target: target.clone(),
                path: rel(name),
            }),
            HostEntry::File | HostEntry::Missing => {}
        }
    }

    ops.push(MountOp::Mkdir {
        path: rel("etc"),
        mode: 0o755,
    });
    for (contents, name) in generated_etc(opts) {
        ops.push(MountOp::WriteFile {
            path: rel("etc").join(name),
            contents,
            mode: 0o644,
        });
    }
    if let Some(bundle) = &opts.ca_bundle {
        // The session CA goes into the bundle every TLS library here reads; the host's /etc/ssl
        // is then not bound (a read-only bind could not take the file).
        for dir in ["etc/ssl", "etc/ssl/certs"] {
            ops.push(MountOp::Mkdir {
                path: rel(dir),
                mode: 0o755,
            });
        }
        ops.push(MountOp::WriteFile {
            path: rel(CA_BUNDLE_PATH),
            contents: bundle.clone(),
            mode: 0o644,
        });
    }
    for (name, entry) in &facts.etc {
        if opts.ca_bundle.is_some() && name == "ssl" {
            continue;
        }
        let path = rel("etc").join(name);
        match entry {
            HostEntry::Dir => ops.push(MountOp::Bind {
                source: BindSource::Host(Path::new("/etc").join(name)),
                path,
                dir: true,
                writable: false,
            }),
            HostEntry::File => ops.push(MountOp::CopyFile {
                source: Path::new("/etc").join(name),
                path,
                max_bytes: ETC_COPY_MAX_BYTES,
            }),
            HostEntry::Symlink(target) => ops.push(MountOp::Symlink {
                target: target.clone(),
                path,
            }),
            HostEntry::Missing => {}
        }
    }

    ops.push(MountOp::Tmpfs {
        path: rel("tmp"),
        size: opts.tmp_size,
        mode: 0o1777,
        noexec: false,
    });

    ops.push(MountOp::Tmpfs {
        path: rel("dev"),
        size: 64 * 1024,
        mode: 0o755,
        noexec: true,
    });
    for node in DEV_NODES {
        ops.push(MountOp::Bind {
            source: BindSource::Host(Path::new("/dev").join(node)),
            path: rel("dev").join(node),
            dir: false,
            writable: true,
        });
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
    ] {
        ops.push(MountOp::Symlink {
            target: PathBuf::from(target),
            path: rel("dev").join(link),
        });
    }
    ops.push(MountOp::Mkdir {
        path: rel("dev/shm"),
        mode: 0o755,
    });
    ops.push(MountOp::ReadOnly {
        path: rel("dev"),
        recursive: false,
    });
    ops.push(MountOp::Tmpfs {
        path: rel("dev/shm"),
        size: opts.shm_size,
        mode: 0o1777,
        noexec: true,
    });

    ops.push(MountOp::Proc { path: rel("proc") });
    for f in PROC_MASKED_FILES {
        ops.push(MountOp::MaskFile {
            path: rel("proc").join(f),
        });
    }
    for d in PROC_MASKED_DIRS {
        ops.push(MountOp::MaskDir {
            path: rel("proc").join(d),
        });
    }
    for d in PROC_READONLY_DIRS {
        ops.push(MountOp::ReadOnly {
            path: rel("proc").join(d),
            recursive: true,
        });
    }

    if let Some((name, bytes)) = &opts.code {
        ops.push(MountOp::Code {
            path: rel(".cordon").join(name),
            bytes: bytes.clone(),
            len: bytes.len(),
        });
    }
    // The workspace comes last but for the extra binds (which may lie inside it): the
    // supervisor prepares a workspace volume while the init mounts everything before it.
    ops.push(MountOp::Bind {
        source: BindSource::Workspace,
        path: rel("workspace"),
        dir: true,
        writable: true,
    });
    for extra in &opts.extra {
        ops.push(MountOp::Bind {
            source: BindSource::Host(extra.host.clone()),
            path: extra
                .path
                .strip_prefix("/")
                .unwrap_or(&extra.path)
                .to_path_buf(),
            dir: extra.dir,
            writable: extra.writable,
        });
    }
    ops
}

/// The generated `/etc` files: `(contents, name)`.
fn generated_etc(opts: &MountOptions) -> Vec<(String, &'static str)> {
    let passwd = format!(
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n\
         cordon:x:{SANDBOX_UID}:{SANDBOX_GID}:cordon sandbox:/workspace:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    );
    let group = format!("root:x:0:\ncordon:x:{SANDBOX_GID}:\nnogroup:x:65534:\n");
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{h}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        h = opts.hostname
    );
    // With network mode `none` nothing answers on 127.0.0.1:53, so lookups fail at once
    // instead of timing out against a server the sandbox cannot reach.
    let resolv = if opts.gateway_dns {
        "nameserver 127.0.0.1\noptions edns0 trust-ad\n".to_string()
    } else {
        "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n".to_string()
    };
    vec![
        (passwd, "passwd"),
        (group, "group"),
        (hosts, "hosts"),
        (format!("{}\n", opts.hostname), "hostname"),
        (resolv, "resolv.conf"),
        (
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
                .to_string(),
            "nsswitch.conf",
        ),
    ]
}

/// What the init mounts at `/workspace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WorkspaceMount {
    /// A host directory, bound directly (no size cap: only when the policy allows
    /// `workspace_cap` to be missing).
    Bind(PathBuf),
    /// The supervisor's capped volume, handed over as a detached mount (an inherited fd).
    Detached,
    /// A capped tmpfs the init makes in its own user namespace and hands to the supervisor,
    /// which fills it from the host directory before the command starts.
    Tmpfs { size_bytes: u64, nr_inodes: u64 },
}

/// Resource limits applied to the command with `setrlimit` (soft = hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimits {
    pub nofile: u64,
    pub file_size: u64,
    /// Always 0: a core dump of sandboxed code could land secrets on disk.
    pub core: u64,
}

/// How the sandbox's network namespace is set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NetworkPlan {
    /// Only `lo`, up; every connect elsewhere fails at once.
    None,
    /// `lo` plus transparent capture into the gateway's sockets, which the init creates inside
    /// the namespace and passes to the supervisor.
    Gateway,
}

/// How the uid/gid maps are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdMap {
    /// The host uid the sandbox user maps to (never 0).
    pub host_uid: u32,
    pub host_gid: u32,
    /// Whether the supervisor is host root (then it may clear supplementary groups, and
    /// `setgroups` stays allowed until the init has dropped them).
    pub rootful: bool,
}

impl IdMap {
    /// `/proc/PID/uid_map` contents: exactly one id is mapped, the sandbox user's. No id inside
    /// maps to host root, so even a full escape of the ids lands on an unprivileged host uid.
    pub fn uid_map(&self) -> String {
        format!("{SANDBOX_UID} {} 1\n", self.host_uid)
    }
    /// See [`IdMap::uid_map`].
    pub fn gid_map(&self) -> String {
        format!("{SANDBOX_GID} {} 1\n", self.host_gid)
    }
}

/// Everything the init applies, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxPlan {
    pub session_id: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub ids: IdMap,
    pub hostname: String,
    /// What is mounted at `/workspace`.
    pub workspace: WorkspaceMount,
    pub mounts: Vec<MountOp>,
    /// Size of the read-only root tmpfs (the skeleton, `/etc` files and the `--code` file).
    pub root_size: u64,
    pub network: NetworkPlan,
    pub rlimits: Rlimits,
    pub landlock: LandlockPlan,
    /// Whether Landlock may be missing (the policy lowered the bar).
    pub landlock_optional: bool,
    pub seccomp: bool,
    pub tty: bool,
}

/// Builds the sandbox's environment: the fixed variables, the host's pass-through ones that are
/// set, then the policy's (which win).
pub fn environment(
    host: &dyn Fn(&str) -> Option<String>,
    policy_env: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), SANDBOX_PATH.into()),
        ("HOME".into(), "/workspace".into()),
        ("USER".into(), "cordon".into()),
        ("LOGNAME".into(), "cordon".into()),
    ];
    for name in ENV_PASSTHROUGH {
        if let Some(v) = host(name) {
            env.push(((*name).to_string(), v));
        }
    }
    for (k, v) in policy_env {
        if k == "HOME" {
            continue;
        }
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// The Landlock rules for a sandbox's filesystem layout.
pub fn landlock_plan(extra: &[ExtraBind], allow_tcp_connect: bool, code: bool) -> LandlockPlan {
    let mut read_only: Vec<PathBuf> = [
        "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/etc", "/proc",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let mut read_write: Vec<PathBuf> = ["/workspace", "/tmp", "/dev"]
        .iter()
        .map(PathBuf::from)
        .collect();
    if code {
        read_only.push(PathBuf::from("/.cordon"));
    }
    for e in extra {
        if e.writable {
            read_write.push(e.path.clone());
        } else {
            read_only.push(e.path.clone());
        }
    }
    LandlockPlan {
        read_exec: read_only,
        read_only: Vec::new(),
        read_write,
        allow_tcp_connect,
        allow_tcp_bind: false,
        scope_abstract_unix: true,
        scope_signals: true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod ca_bundle_tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            system_dirs: vec![("usr".into(), HostEntry::Dir)],
            etc: vec![
                ("ssl".into(), HostEntry::Dir),
                ("os-release".into(), HostEntry::File),
            ],
        }
    }

    fn opts(bundle: Option<&str>) -> MountOptions {
        MountOptions {
            tmp_size: 1 << 20,
            shm_size: 1 << 20,
            hostname: "cordon".into(),
            gateway_dns: true,
            extra: Vec::new(),
            code: None,
            ca_bundle: bundle.map(str::to_owned),
        }
    }

    fn binds_host_ssl(ops: &[MountOp]) -> bool {
        ops.iter().any(|op| {
            matches!(op, MountOp::Bind { source: BindSource::Host(p), .. } if p == Path::new("/etc/ssl"))
        })
    }

    #[test]
    fn without_a_bundle_the_host_ssl_directory_is_bound() {
        let ops = mount_plan(&facts(), &opts(None));
        assert!(binds_host_ssl(&ops));
    }

    #[test]
    fn a_session_bundle_replaces_the_host_ssl_directory_with_the_generated_file() {
        let pem = "-----BEGIN CERTIFICATE-----\nhost\n-----END CERTIFICATE-----\n";
        let ops = mount_plan(&facts(), &opts(Some(pem)));
        assert!(!binds_host_ssl(&ops));
        let written: Vec<_> = ops
            .iter()
            .filter_map(|op| match op {
                MountOp::WriteFile {
                    path,
                    contents,
                    mode,
                } => Some((path.clone(), contents.clone(), *mode)),
                _ => None,
            })
            .filter(|(p, _, _)| p == Path::new("etc/ssl/certs/ca-certificates.crt"))
            .collect();
        assert_eq!(
            written,
            vec![(
                PathBuf::from("etc/ssl/certs/ca-certificates.crt"),
                pem.to_owned(),
                0o644
            )]
        );
        // The directories exist before the file is written; other /etc entries are still bound.
        let mkdir = ops.iter().position(|op| matches!(op, MountOp::Mkdir { path, .. } if path == Path::new("etc/ssl/certs"))).unwrap();
        let write = ops.iter().position(|op| matches!(op, MountOp::WriteFile { path, .. } if path == Path::new("etc/ssl/certs/ca-certificates.crt"))).unwrap();
        assert!(mkdir < write);
        assert!(ops.iter().any(|op| matches!(op,
            MountOp::Bind { source: BindSource::Host(p), .. } | MountOp::CopyFile { source: p, .. }
                if p == Path::new("/etc/os-release"))));
        assert_eq!(
            root_size(&opts(Some(pem))) - root_size(&opts(None)),
            pem.len() as u64
        );
    }
}
