//! One `cordon run`: policy → sandbox (+ cgroup, workspace) → supervise → result.
//!
//! Guarantees: a layer that cannot be set up stops the run before any user code starts, unless
//! the policy lists it in `sandbox.allow_missing`, in which case the result says so; when this
//! function returns — normally, on timeout, or after SIGINT/SIGTERM/SIGHUP — every process of
//! the sandbox is dead (the init is reaped, which the kernel allows only after every process in
//! its pid namespace is gone) and the session's cgroup is removed.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cordon_policy::{Layer, NetworkMode, Policy};
use cordon_sandbox::cgroup::{self, CgroupLimits, SessionCgroup};
use cordon_sandbox::plan::{self, MountOptions, SandboxPlan};
use cordon_sandbox::proto::{self, ExitStatus, ToSupervisor};
use cordon_sandbox::{landlock, probe, seccomp, spawn};

use crate::alerts::Alerts;
use crate::gateway_run::{self, RunningGateway};
use crate::result::{Layers, LimitHit, RunResult, SeccompInfo};
use crate::workspace::Workspace;

/// What to run.
pub struct RunRequest {
    pub policy: Policy,
    pub argv: Vec<String>,
    /// `(file name, bytes)` of `--code`.
    pub code: Option<(String, Vec<u8>)>,
    pub code_sha256: String,
    pub user: String,
    pub session_id: String,
    /// The audit store (default: `cordon_audit::default_path()`).
    pub audit: Option<PathBuf>,
    /// DNS servers the gateway asks (default: the host's `/etc/resolv.conf`).
    pub upstream_dns: Vec<std::net::SocketAddr>,
    /// An extra CA upstream servers may be verified against (`--upstream-ca`, for tests).
    pub upstream_ca: Option<PathBuf>,
}

/// A run that could not happen; `exit_code` is what cordon exits with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RunError {
    pub exit_code: i32,
    pub message: String,
}

impl RunError {
    pub fn cordon(message: impl Into<String>) -> RunError {
        RunError {
            exit_code: 125,
            message: message.into(),
        }
    }
}

/// How long a forwarded SIGTERM/SIGINT may take before the whole sandbox is killed.
const GRACE: Duration = Duration::from_secs(2);

fn lowered_or_fail(
    policy: &Policy,
    layer: Layer,
    lowered: &mut Vec<String>,
    err: String,
    fix: &str,
) -> Result<(), RunError> {
    if policy.sandbox.allow_missing.contains(&layer) {
        lowered.push(format!("{layer}: {err}"));
        Ok(())
    } else {
        Err(RunError::cordon(format!(
            "{layer} unavailable: {err}; {fix}, or allow it to be missing with sandbox.allow_missing = [\"{layer}\"] (--allow-missing {layer})"
        )))
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a session to its end.
pub fn run(req: RunRequest) -> Result<RunResult, RunError> {
    let started = Instant::now();
    let mut marks = Marks::new();
    let policy = &req.policy;
    let mut layers = Layers::default();
    let rootful = is_root();
    let (host_uid, host_gid) = if rootful {
        (policy.sandbox.host_uid, policy.sandbox.host_gid)
    } else {
        // SAFETY: getuid/getgid have no failure mode.
        unsafe { (libc::getuid(), libc::getgid()) }
    };

    // Secrets, placeholders and the session CA: before anything is created, so a missing
    // secret changes nothing.
    let intercept =
        crate::intercept_setup::prepare(policy, &req.session_id, req.upstream_ca.as_deref())
            .map_err(RunError::cordon)?;
    // Canary files: their tokens are fresh for this session; they are planted once the
    // workspace is filled, before the command starts.
    let canary_files = crate::canary::make_files(&policy.detect.canary.files)
        .map_err(|e| RunError::cordon(e.to_string()))?;
    // Landlock and seccomp: decided and compiled before anything is spawned.
    marks.mark("supervisor: policy loaded");
    let abi = landlock::probe_abi();
    if abi == 0 {
        lowered_or_fail(
            policy,
            Layer::Landlock,
            &mut layers.lowered,
            "the kernel has no Landlock (needs Linux 5.13+ with landlock in the lsm= list)".into(),
            "enable Landlock (boot with lsm=landlock,...)",
        )?;
    }
    let seccomp_plan = seccomp::default_plan();
    // Denials are counted when the sandbox rule asks for it: the EPERM rules then notify the
    // supervisor, which answers with the same errno (docs/sandbox.md, "Counting denials").
    let count_denials = policy.detect.sandbox.enabled && policy.detect.sandbox.seccomp_denied > 0;
    let loaded_plan = if count_denials {
        seccomp::notify_plan(seccomp_plan.clone())
    } else {
        seccomp_plan.clone()
    };
    let filter = match seccomp::compile(&loaded_plan) {
        Ok(f) => Some(f),
        Err(e) => {
            lowered_or_fail(
                policy,
                Layer::Seccomp,
                &mut layers.lowered,
                e.to_string(),
                "use a kernel with CONFIG_SECCOMP_FILTER",
            )?;
            None
        }
    };
    if filter.is_some() {
        layers.seccomp = Some(SeccompInfo {
            rules: seccomp_plan.rules,
            arch: seccomp_plan.arch.to_string(),
            denials_counted: count_denials,
            default_errno: "EPERM",
        });
    }

    marks.mark("supervisor: landlock probe, seccomp compiled");
    let limits = CgroupLimits {
        memory_bytes: Some(policy.limits.memory.0),
        pids: Some(policy.limits.pids),
        cpu_cores: Some(policy.limits.cpu),
    };
    // An ext4 volume is built after the clone, while the init mounts everything else (the
    // plan already says the init gets a detached volume); anything else is ready now.
    let uncapped = |layers: &mut Layers, reason: String| {
        lowered_or_fail(
            policy,
            Layer::WorkspaceCap,
            &mut layers.lowered,
            reason,
            "run cordon as root (the cap uses a loop-mounted ext4 volume) or let it use a tmpfs",
        )
    };
    let (mut early_ws, planned_ws) = match Workspace::plan(policy, host_uid, host_gid) {
        Ok(p) if p.mount() == plan::WorkspaceMount::Detached => {
            layers.workspace_cap = Some(p.cap_description());
            (None, Some(p))
        }
        Ok(p) => {
            let ws = p.prepare().or_else(|e| match e {
                crate::workspace::WorkspaceError::NoCap(reason) => {
                    uncapped(&mut layers, reason)?;
                    Workspace::prepare_uncapped(
                        policy,
                        &req.session_id,
                        host_uid,
                        host_gid,
                        rootful,
                    )
                    .map_err(|e| RunError::cordon(e.to_string()))
                }
                other => Err(RunError::cordon(other.to_string())),
            })?;
            layers.workspace_cap = ws.cap_description();
            (Some(ws), None)
        }
        Err(crate::workspace::WorkspaceError::NoCap(reason)) => {
            uncapped(&mut layers, reason)?;
            let ws =
                Workspace::prepare_uncapped(policy, &req.session_id, host_uid, host_gid, rootful)
                    .map_err(|e| RunError::cordon(e.to_string()))?;
            (Some(ws), None)
        }
        Err(other) => return Err(RunError::cordon(other.to_string())),
    };
    if let Some(ws) = early_ws.as_mut() {
        // A tmpfs volume keeps them until the sandbox hands it over (`Workspace::adopt`).
        if let Err(e) = ws.plant_canaries(canary_files.clone()) {
            cleanup(None, early_ws);
            return Err(RunError::cordon(e.to_string()));
        }
    }
    let facts = probe::host_facts(std::path::Path::new("/"));
    let extra: Vec<plan::ExtraBind> = policy
        .sandbox
        .mounts
        .iter()
        .map(|m| plan::ExtraBind {
            host: m.host.clone(),
            path: m.path.clone(),
            writable: m.writable,
            dir: m.host.is_dir(),
        })
        .collect();
    let gateway_mode = policy.network_mode() == NetworkMode::Gateway;
    let opts = MountOptions {
        tmp_size: policy.limits.tmp.0,
        shm_size: policy.limits.tmp.0,
        hostname: policy.sandbox.hostname.clone(),
        gateway_dns: gateway_mode,
        extra: extra.clone(),
        code: req.code.clone(),
        ca_bundle: intercept.as_ref().map(|i| i.bundle.clone()),
    };
    let host_env = |k: &str| std::env::var(k).ok();
    let mut policy_env: Vec<(String, String)> = Vec::new();
    if gateway_mode {
        policy_env.extend(gateway_run::proxy_env());
    }
    if let Some(i) = &intercept {
        policy_env.extend(i.env.iter().cloned());
    }
    policy_env.extend(
        policy
            .sandbox
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    // Honey tokens: fresh per session, known only to this supervisor and the sandbox.
    let mut canaries = Vec::new();
    for name in &policy.detect.canary.env {
        let token = cordon_gateway::detect::canary::new_token()
            .map_err(|e| RunError::cordon(format!("canary token: {e}")))?;
        canaries.push((name.clone(), token));
    }
    policy_env.extend(canaries.iter().cloned());
    let sandbox_plan = SandboxPlan {
        session_id: req.session_id.clone(),
        argv: req.argv.clone(),
        env: plan::environment(&host_env, &policy_env),
        ids: plan::IdMap {
            host_uid,
            host_gid,
            rootful,
        },
        hostname: policy.sandbox.hostname.clone(),
        workspace: match (&early_ws, &planned_ws) {
            (Some(ws), _) => ws.mount(),
            (None, Some(p)) => p.mount(),
            (None, None) => plan::WorkspaceMount::Detached,
        },
        mounts: plan::mount_plan(&facts, &opts),
        root_size: plan::root_size(&opts),
        network: if gateway_mode {
            plan::NetworkPlan::Gateway
        } else {
            plan::NetworkPlan::None
        },
        rlimits: plan::Rlimits {
            nofile: policy.limits.nofile,
            file_size: policy.limits.file_size.0,
            core: 0,
        },
        // Transparent capture needs connect() to any port: Landlock checks the port before
        // the nftables redirect, so in gateway mode the network boundary is the namespace.
        landlock: plan::landlock_plan(&extra, gateway_mode, req.code.is_some()),
        landlock_optional: policy.sandbox.allow_missing.contains(&Layer::Landlock),
        seccomp: filter.is_some(),
        tty: policy.sandbox.tty,
    };
    layers.uid_map = sandbox_plan.ids.uid_map().trim().to_string();
    layers.namespaces = vec!["user", "pid", "mount", "network", "ipc", "uts", "cgroup"];
    layers.network = if gateway_mode { "gateway" } else { "none" }.into();
    let attribution = cordon_audit::Attribution {
        session_id: req.session_id.clone(),
        user_id: req.user.clone(),
        code_sha256: req.code_sha256.clone(),
    };
    let alerts = Alerts::new(attribution.clone(), &policy.alerts);
    let audit_path = match &req.audit {
        Some(p) => p.clone(),
        None => cordon_audit::default_path()
            .map_err(|e| RunError::cordon(format!("audit store: {e}")))?,
    };

    marks.mark("supervisor: plan built");
    // On a cgroup v2 host the session cgroup is made first and the sandbox is born in it
    // (clone3 CLONE_INTO_CGROUP: no cgroup.procs write, so no wait for the kernel's attach
    // lock). On cgroup v1 the cgroup is made and joined after the clone, while the init builds
    // its filesystem.
    let early_cg = cgroup::unified_host().then(|| cgroup_for(&req.session_id, &limits));
    if early_cg.is_some() {
        marks.mark("supervisor: cgroup created");
    }
    let into = match &early_cg {
        Some(Ok(cg)) => cg.clone_into_fd(),
        _ => None,
    };
    let signals = SignalGuard::block()?;
    let spawned = spawn::spawn(&sandbox_plan, filter.as_ref(), into);
    let sandbox = match spawned {
        Ok(s) => s,
        Err(e) => {
            cleanup(early_cg.and_then(Result::ok), early_ws);
            return Err(RunError::cordon(e.to_string()));
        }
    };
    let kill = |sb: &spawn::Sandbox| {
        pidfd_signal(sb.pidfd.as_fd(), libc::SIGKILL);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(sb.pid, std::ptr::null_mut(), 0) };
    };
    marks.mark("supervisor: cloned, id maps, go sent");
    // The init builds its filesystem meanwhile. Here, side by side: the workspace volume,
    // which the init needs when it reaches /workspace, and the session's cgroup (v1: made and
    // joined now), which it waits for before it starts the command, so the command and
    // everything it forks run inside it.
    let in_cgroup = sandbox.in_cgroup;
    let (joined, handed) = std::thread::scope(|scope| {
        let join = scope.spawn(|| {
            match early_cg {
                Some(Ok(c)) if in_cgroup => Ok(c),
                Some(made) => made,
                None => cgroup_for(&req.session_id, &limits),
            }
            .and_then(|c| {
                if in_cgroup {
                    return Ok(c);
                }
                c.add_pid(sandbox.pid)
                    .map(|()| c)
                    .map_err(|e| e.to_string())
            })
        });
        let handed = planned_ws.map(|planned| {
            let built = planned.prepare().or_else(|e| match e {
                // The cap cannot be had after all: if the policy allows that, the init gets
                // the directory as a detached bind instead of the volume it expects.
                crate::workspace::WorkspaceError::NoCap(reason) => {
                    uncapped(&mut layers, reason)?;
                    layers.workspace_cap = None;
                    Workspace::prepare_uncapped_detached(
                        policy,
                        &req.session_id,
                        host_uid,
                        host_gid,
                        rootful,
                    )
                    .map_err(|e| RunError::cordon(e.to_string()))
                }
                other => Err(RunError::cordon(other.to_string())),
            });
            built.and_then(|mut ws| {
                // Planted before the volume is handed over: the command cannot start earlier.
                if let Err(e) = ws.plant_canaries(canary_files.clone()) {
                    cleanup(None, Some(ws));
                    return Err(RunError::cordon(e.to_string()));
                }
                match ws.detached_fd() {
                    Some(fd) => match spawn::send_workspace(&sandbox, fd) {
                        Ok(()) => Ok(ws),
                        Err(e) => {
                            cleanup(None, Some(ws));
                            Err(RunError::cordon(format!("sandbox set-up: {e}")))
                        }
                    },
                    None => {
                        cleanup(None, Some(ws));
                        Err(RunError::cordon("workspace: no volume to hand over"))
                    }
                }
            })
        });
        let joined = join
            .join()
            .unwrap_or_else(|_| Err("the cgroup set-up thread panicked".into()));
        (joined, handed)
    });
    match handed {
        Some(Ok(ws)) => {
            early_ws = Some(ws);
            marks.mark("supervisor: workspace volume prepared and handed over");
        }
        Some(Err(e)) => {
            kill(&sandbox);
            cleanup(joined.ok(), None);
            return Err(e);
        }
        None => {}
    }
    let Some(mut workspace) = early_ws else {
        kill(&sandbox);
        cleanup(joined.ok(), None);
        return Err(RunError::cordon("workspace: none was prepared"));
    };
    let cg: Option<Box<dyn SessionCgroup>> = match joined {
        Ok(cg) => {
            layers.cgroup = Some(format!("{:?}", cg.version()).to_lowercase());
            Some(cg)
        }
        Err(e) => {
            if let Err(err) = lowered_or_fail(
                policy,
                Layer::Cgroups,
                &mut layers.lowered,
                e,
                "run as root or under a delegated cgroup v2 (systemd-run --user --scope -p Delegate=yes)",
            ) {
                kill(&sandbox);
                cleanup(None, Some(workspace));
                return Err(err);
            }
            None
        }
    };
    if !sandbox.in_cgroup {
        if let Err(e) = spawn::send(&sandbox, &cordon_sandbox::proto::ToInit::CgroupReady) {
            kill(&sandbox);
            cleanup(cg, Some(workspace));
            return Err(RunError::cordon(format!("sandbox set-up: {e}")));
        }
        marks.mark("supervisor: cgroup created and joined");
    }
    let deadline = started + policy.sandbox.timeout;
    let sockets = match handshake(&sandbox, &sandbox_plan, &mut workspace, deadline) {
        Ok(s) => s,
        Err(e) => {
            kill(&sandbox);
            cleanup(cg, Some(workspace));
            return Err(RunError::cordon(e));
        }
    };
    // Every canary file is planted or skipped by now (the workspace is ready): say which, by
    // name only.
    let canary_report = crate::canary::CanaryReport {
        env: policy.detect.canary.env.clone(),
        files: workspace
            .canaries_planted()
            .iter()
            .map(|f| crate::canary::PlantedFile {
                path: f.path.clone(),
                shape: f.shape,
            })
            .collect(),
        skipped: workspace.canaries_skipped(),
    };
    for s in &canary_report.skipped {
        eprintln!(
            "cordon: warning: canary file {} not planted: {}",
            s.path, s.reason
        );
    }
    // Threads may start now: the sandbox is spawned.
    alerts.start();
    let mut writer = None;
    let mut gateway = None;
    // The live copy of the audit the policy asks for (`[audit] syslog`, `--syslog`).
    let syslog = match policy
        .audit
        .syslog
        .map(|t| start_syslog(t, policy))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            kill(&sandbox);
            cleanup(cg, Some(workspace));
            return Err(RunError::cordon(e));
        }
    };
    // A network-less session has only its start and end to record: open the store and write
    // the start while the sandbox runs, off the critical path.
    let quiet_audit = (!gateway_mode).then(|| {
        let path = audit_path.clone();
        let start =
            attribution.session_start(&req.argv, start_detail(&layers, policy, &canary_report));
        if let Some(s) = &syslog {
            s.offer(&start);
        }
        std::thread::spawn(move || -> Result<cordon_audit::Store, String> {
            let mut store = cordon_audit::Store::open(&path)
                .map_err(|e| format!("audit store {}: {e}", path.display()))?;
            store
                .append(&[start])
                .map_err(|e| format!("audit store {}: {e}", path.display()))?;
            Ok(store)
        })
    });
    if let Some(sockets) = sockets {
        let started_gw = cordon_audit::AuditWriter::open(&audit_path)
            .map_err(|e| format!("audit store {}: {e}", audit_path.display()))
            .and_then(|w| {
                let w = match &syslog {
                    Some(s) => w.with_tap(s.clone()),
                    None => w,
                };
                let w = std::sync::Arc::new(w);
                w.record(attribution.session_start(&req.argv, start_detail(&layers, policy, &canary_report)));
                alerts.set_writer(w.clone());
                let session = cordon_gateway::SessionInfo {
                    id: req.session_id.clone(),
                    user: req.user.clone(),
                    code_sha256: req.code_sha256.clone(),
                };
                // Which sandbox process made each request: looked up in the sandbox's /proc
                // through its init. Without it events still name the session.
                let owners = match crate::attribution::ProcSocketOwners::new(
                    sandbox.pid as u32,
                    sockets.sock_diag.try_clone().ok(),
                ) {
                    Ok(o) => Some(std::sync::Arc::new(o) as _),
                    Err(e) => {
                        eprintln!(
                            "cordon: warning: events will not name the sandbox process: /proc/{}: {e}",
                            sandbox.pid
                        );
                        None
                    }
                };
                RunningGateway::start(
                    policy,
                    session,
                    sockets,
                    &req.upstream_dns,
                    intercept.as_ref().map(|i| i.config.clone()),
                    w.clone(),
                    crate::canary::for_gateway(&canaries, workspace.canaries_planted()),
                    alerts.clone(),
                    owners,
                )
                .map(|g| (w, g))
            });
        match started_gw {
            Ok((w, g)) => {
                writer = Some(w);
                gateway = Some(g);
            }
            Err(e) => {
                kill(&sandbox);
                cleanup(cg, Some(workspace));
                return Err(RunError::cordon(e));
            }
        }
    }
    let watch = LimitWatch {
        rule: &policy.detect.sandbox,
        errno_plan: &seccomp_plan,
        alerts: &alerts,
        session: cordon_gateway::SessionInfo {
            id: req.session_id.clone(),
            user: req.user.clone(),
            code_sha256: req.code_sha256.clone(),
        },
    };
    // Held until the teardown: when the init exits, the kernel then does not unmount the
    // sandbox's ~40 mounts before telling us (exit_task_namespaces runs before the parent is
    // notified); that happens when this descriptor closes, after the result is final.
    let mount_ns = std::fs::File::open(format!("/proc/{}/ns/mnt", sandbox.pid)).ok();
    let mut outcome = supervise(
        &sandbox,
        &signals,
        deadline,
        cg.as_deref(),
        gateway.as_ref().map(|g| g.wake_fd()),
        &watch,
    );
    let terminated = gateway
        .as_ref()
        .and_then(|g| g.terminate_reason())
        .or_else(|| outcome.terminated_reason.clone());
    let network = gateway.map(RunningGateway::stop);
    // The init is reaped: everything in its pid namespace is gone. The cgroup may still hold
    // nothing, but kill it anyway before removal in case the kernel is slower than we think.
    marks.mark("supervisor: sandbox reaped");
    let stats = cg.as_ref().map(|c| c.stats());
    if let Some(c) = &cg {
        let _ = c.kill_all();
    }
    let workspace_desc = workspace.describe();
    let unreleased = finish(cg, workspace, mount_ns);
    marks.mark("supervisor: cgroup removed, workspace committed");
    drop(signals);
    if let Some(reason) = &terminated {
        eprintln!("cordon: session {} terminated: {reason}", req.session_id);
    }

    let mut limits_hit = Vec::new();
    if outcome.timed_out {
        limits_hit.push(LimitHit::Timeout);
    }
    if let Some(s) = &stats {
        if s.oom_killed {
            limits_hit.push(LimitHit::Oom);
        }
        if s.pids_limit_hit {
            limits_hit.push(LimitHit::Pids);
        }
    }
    if !outcome.full.is_empty() {
        limits_hit.push(LimitHit::Disk);
    }
    // Limits first seen at the end (or on a host whose cgroup could not be watched), and
    // processes that tried to outlive the command, are firings of the sandbox rule too.
    if let Some(s) = &stats {
        watch.check(s, &mut outcome.fired);
    }
    if !outcome.full.is_empty() {
        watch.fire(
            "disk",
            format!("disk full: {}", outcome.full.join(", ")),
            &mut outcome.fired,
        );
    }
    if outcome.lingering > 0 && watch.rule.enabled && watch.rule.lingering {
        watch.fire(
            "lingering",
            format!(
                "{} processes were still running when the command exited (killed with the session)",
                outcome.lingering
            ),
            &mut outcome.fired,
        );
    }
    alerts.finish();
    if let Some(a) = &outcome.applied {
        layers.landlock_abi = a.0;
        layers.landlock_enforced = a.1;
        layers.no_new_privs = a.2;
    }

    let limit_name = limits_hit.first().map(|l| {
        serde_json::to_value(l)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    });
    // What cordon exits with: the command's status, 126/127 when it could not be executed,
    // 137 when the sandbox was killed before the command reported (timeout, termination).
    let end_status = Some(i64::from(match (&outcome.exec_failed, outcome.status) {
        (Some((code, _)), _) => *code,
        (None, Some(st)) => st.as_shell_code(),
        (None, None) if outcome.setup_failed.is_some() => 125,
        (None, None) => 128 + libc::SIGKILL,
    }));
    let mut end_detail = serde_json::Map::new();
    // The layers as finally applied (Landlock's status is known only once the command ran).
    end_detail.insert("layers".into(), serde_json::json!(layers));
    if let Some(n) = &network {
        end_detail.insert("network".into(), serde_json::json!(n));
    }
    if let Some(r) = &terminated {
        end_detail.insert("terminated".into(), serde_json::json!(r));
    }
    if count_denials && filter.is_some() {
        end_detail.insert(
            "seccomp_denied".into(),
            serde_json::json!(outcome.seccomp_by_syscall),
        );
    }
    if let Some(s) = &syslog {
        // Losses so far: the end record itself is forwarded after this count.
        end_detail.insert("syslog".into(), serde_json::json!(s.stats()));
    }
    let end = attribution.session_end(end_status, limit_name.as_deref(), end_detail);
    if let (Some(s), None) = (&syslog, &writer) {
        // The writer's tap forwards it otherwise.
        s.offer(&end);
    }
    match writer.take() {
        Some(w) => {
            w.record(end);
            match std::sync::Arc::try_unwrap(w) {
                Ok(w) => {
                    if let Err(e) = w.close() {
                        eprintln!("cordon: warning: audit: {e}");
                    }
                }
                Err(w) => {
                    if let Err(e) = w.flush() {
                        eprintln!("cordon: warning: audit: {e}");
                    }
                }
            }
        }
        None => {
            let mut events = alerts.take_pending();
            events.push(end);
            let stored = quiet_audit
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err("audit thread panicked".into()))
                })
                .unwrap_or_else(|| Err("no audit thread".into()))
                .and_then(|mut store| {
                    store
                        .append(&events)
                        .map(drop)
                        .map_err(|e| format!("audit store {}: {e}", audit_path.display()))
                });
            // A network-less session can have no network event to lose: a failed audit
            // write is a warning, not a failed run.
            if let Err(e) = stored {
                eprintln!("cordon: warning: {e}");
            }
        }
    }

    if let Some(s) = &syslog {
        let stats = s.close(SYSLOG_CLOSE);
        if stats.dropped > 0 || stats.failed > 0 {
            eprintln!(
                "cordon: warning: syslog: {} audit event(s) not forwarded to {} ({} dropped: receiver too slow, {} failed to send); the audit store has them all",
                stats.dropped + stats.failed,
                policy.audit.syslog.map(|t| t.to_string()).unwrap_or_default(),
                stats.dropped,
                stats.failed
            );
        }
    }
    marks.mark("supervisor: audit recorded");
    // Everything the result depends on is done: the volume's release (and the sweep for other
    // sessions' leftovers) finishes in a detached child while we exit.
    if let Some((mount_ns, workspace)) = unreleased {
        crate::teardown::hand_off(move || {
            // The sandbox's mounts go first: one of them holds the workspace volume.
            drop(mount_ns);
            if let Some(w) = workspace {
                let spare_key = w.spare_key();
                let _ = w.release();
                // Leave a volume ready for the next session of the same cap, so its start
                // skips the template copy and the loop device's set-up.
                if let Some((state_dir, cap)) = spare_key {
                    let _ = cordon_sandbox::workspace::spares::replenish(&state_dir, cap);
                }
            }
            remove_stale_cgroups();
            tidy_wal(&audit_path);
        });
        marks.mark("supervisor: teardown handed off");
    } else {
        // No teardown child: the same housekeeping here (a stat unless the log is long).
        tidy_wal(&audit_path);
    }
    marks.extend(&outcome.marks);
    marks.report(started);
    if let Some(err) = outcome.setup_failed {
        return Err(RunError::cordon(err));
    }
    let (exit_status, exit_code, signal) = match (&outcome.exec_failed, outcome.status) {
        // The command could not be executed (126) or was not found (127): the session still
        // happened and is reported like any other, with the reason in `error`.
        (Some((code, _)), _) => (*code, None, None),
        (None, Some(ExitStatus::Code(c))) => (c, Some(c), None),
        (None, Some(ExitStatus::Signal(s))) => (128 + s, None, Some(s)),
        // Killed before it could report (timeout, interruption): SIGKILL.
        (None, None) => (128 + libc::SIGKILL, None, Some(libc::SIGKILL)),
    };
    Ok(RunResult {
        session_id: req.session_id,
        user: req.user,
        command: req.argv,
        code_sha256: req.code_sha256,
        exit_status,
        exit_code,
        signal,
        limit: limits_hit.first().copied(),
        limits_hit,
        wall_ms: started.elapsed().as_millis() as u64,
        cpu_ms: stats
            .as_ref()
            .and_then(|s| s.cpu_usage_ns)
            .map(|ns| ns / 1_000_000)
            .or_else(children_cpu_ms),
        peak_memory_bytes: stats.as_ref().and_then(|s| s.peak_memory_bytes),
        workspace: workspace_desc,
        layers,
        network,
        terminated,
        alerts: alerts.fired(),
        canaries: (!canary_report.is_empty()).then_some(canary_report),
        seccomp_denied: (count_denials && filter.is_some()).then_some(outcome.seccomp_denied),
        error: outcome.exec_failed.map(|(_, message)| message),
    })
}

/// Keeps the store's write-ahead log short: the next session that opens the store reads all of
/// it (cordon_audit::Store::checkpoint_if_wal_over). Housekeeping: a busy store is left alone.
fn tidy_wal(audit_path: &std::path::Path) {
    let _ = cordon_audit::Store::checkpoint_if_wal_over(audit_path, cordon_audit::WAL_TIDY_BYTES);
}

/// How long the end of a session waits for queued syslog messages.
const SYSLOG_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts the live syslog copy of the audit.
fn start_syslog(
    target: cordon_policy::SyslogTarget,
    policy: &Policy,
) -> Result<std::sync::Arc<cordon_audit::syslog::SyslogSink>, String> {
    use cordon_audit::syslog::{SyslogConfig, SyslogSink, Transport};
    use cordon_audit::Severity;
    let transport = match target.transport {
        cordon_policy::SyslogTransport::Udp => Transport::Udp,
        cordon_policy::SyslogTransport::Tcp => Transport::Tcp,
    };
    let min = match policy.audit.syslog_min_severity {
        cordon_policy::MinSeverity::Info => Severity::Info,
        cordon_policy::MinSeverity::Notice => Severity::Notice,
        cordon_policy::MinSeverity::Warning => Severity::Warning,
        cordon_policy::MinSeverity::High => Severity::High,
        cordon_policy::MinSeverity::Critical => Severity::Critical,
    };
    SyslogSink::start(SyslogConfig::new(transport, target.addr, min))
        .map(std::sync::Arc::new)
        .map_err(|e| e.to_string())
}

/// What the session starts with: its policy's network part and the layers decided so far (the
/// full list, with Landlock's status, is in the session's end record).
fn start_detail(
    layers: &Layers,
    policy: &Policy,
    canaries: &crate::canary::CanaryReport,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    if !canaries.is_empty() {
        m.insert("canaries".into(), serde_json::json!(canaries));
    }
    m.insert("namespaces".into(), serde_json::json!(layers.namespaces));
    m.insert("network".into(), serde_json::json!(layers.network));
    m.insert("lowered".into(), serde_json::json!(layers.lowered));
    m.insert(
        "allow".into(),
        serde_json::json!(policy
            .network
            .allow
            .iter()
            .map(|a| a.raw().to_string())
            .collect::<Vec<_>>()),
    );
    m.insert(
        cordon_audit::report::ALLOW_PRIVATE.into(),
        serde_json::json!(policy
            .network
            .allow_private
            .iter()
            .map(|a| a.raw().to_string())
            .collect::<Vec<_>>()),
    );
    m.insert(
        "mode".into(),
        serde_json::json!(policy.network.mode.as_str()),
    );
    // Names only: which credentials the gateway holds and which hosts it intercepts.
    if !policy.credentials.is_empty() {
        m.insert(
            "credentials".into(),
            serde_json::json!(policy
                .credentials
                .iter()
                .map(|c| serde_json::json!({
                    "name": c.name,
                    "hosts": c.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                }))
                .collect::<Vec<_>>()),
        );
    }
    let hosts = cordon_gateway::InterceptConfig::hosts_for(&policy.network, &policy.credentials);
    if !hosts.is_empty() {
        m.insert(
            "intercept".into(),
            serde_json::json!(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()),
        );
    }
    // Identifies the effective policy (file plus flags) for `cordon audit report`. Serialising
    // the policy model cannot fail; if it ever did, the report groups the session under no policy.
    if let Ok(json) = serde_json::to_vec(policy) {
        m.insert(
            cordon_audit::report::POLICY_SHA256.into(),
            serde_json::json!(cordon_audit::sha256_hex(&json)),
        );
    }
    m
}

fn cgroup_for(session_id: &str, limits: &CgroupLimits) -> Result<Box<dyn SessionCgroup>, String> {
    let mut detected = cgroup::detect_host().map_err(|e| e.to_string())?;
    // On a pure cgroup v2 host our own cgroup holds us, and v2 forbids handing controllers to
    // children of a cgroup with processes: move ourselves into cordon/_supervisor first.
    if let Some(v2) = &detected.v2 {
        if matches!(v2.status, cgroup::V2Status::OwnCgroupHasProcesses) {
            detected = cgroup::relocate_self(&detected).map_err(|e| e.to_string())?;
        }
    }
    cgroup::create(&detected, session_id, limits).map_err(|e| e.to_string())
}

/// A finished session's teardown, as far as its result depends on it: the cgroup removed, a
/// host workspace directory committed. What takes time and changes nothing the result says —
/// the sandbox's mount namespace (its unmounts) and a slow workspace release (an ext4 volume)
/// — is returned for [`crate::teardown::hand_off`]; anything else is released here.
#[allow(clippy::type_complexity)]
fn finish(
    cg: Option<Box<dyn SessionCgroup>>,
    mut workspace: Workspace,
    mount_ns: Option<std::fs::File>,
) -> Option<(Option<std::fs::File>, Option<Workspace>)> {
    if let Some(c) = cg {
        if let Err(e) = c.remove() {
            eprintln!("cordon: warning: removing the session cgroup: {e}");
        }
    }
    if let Err(e) = workspace.commit() {
        eprintln!("cordon: warning: workspace: {e}");
    }
    if workspace.slow_release() {
        return Some((mount_ns, Some(workspace)));
    }
    if let Err(e) = workspace.release() {
        eprintln!("cordon: warning: workspace: {e}");
    }
    if mount_ns.is_some() {
        return Some((mount_ns, None));
    }
    remove_stale_cgroups();
    None
}

fn cleanup(cg: Option<Box<dyn SessionCgroup>>, workspace: Option<Workspace>) {
    // Independent teardown steps, run side by side.
    std::thread::scope(|scope| {
        let cg_thread = scope.spawn(move || {
            let removed = match cg {
                Some(c) => c.remove().map_err(|e| e.to_string()),
                None => Ok(()),
            };
            remove_stale_cgroups();
            removed
        });
        if let Some(Err(e)) = workspace.map(Workspace::finish) {
            eprintln!("cordon: warning: workspace: {e}");
        }
        match cg_thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cordon: warning: removing the session cgroup: {e}"),
            Err(_) => eprintln!("cordon: warning: removing the session cgroup panicked"),
        }
    });
}

/// Removes empty session cgroups that a supervisor killed with SIGKILL left behind. A session
/// younger than a minute may be between creating its cgroup and joining it, so it is left alone.
pub fn remove_stale_cgroups() {
    if let Ok(detected) = cgroup::detect_host() {
        let young = |id: &str| crate::ids::age_ms(id).is_none_or(|age| age < 60_000);
        let _ = cgroup::cleanup_stale(&detected, &young);
    }
}

fn children_cpu_ms() -> Option<u64> {
    // SAFETY: rusage is plain data that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return None;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    Some(ms(ru.ru_utime) + ms(ru.ru_stime))
}

/// What the supervision loop saw.
#[derive(Default)]
struct Outcome {
    status: Option<ExitStatus>,
    full: Vec<String>,
    timed_out: bool,
    setup_failed: Option<String>,
    exec_failed: Option<(i32, String)>,
    applied: Option<(u32, bool, bool)>,
    terminated: bool,
    /// Why the supervisor itself ended the session (a sandbox-rule firing).
    terminated_reason: Option<String>,
    /// Sandbox-rule signals already fired (each fires once).
    fired: Vec<&'static str>,
    /// Processes other than the command still alive when it exited.
    lingering: u32,
    /// The command's seccomp notification listener, once it has sent it.
    listener: Option<std::os::fd::OwnedFd>,
    /// Syscalls the filter denied (answered by the supervisor), in total and per syscall.
    seccomp_denied: u64,
    seccomp_by_syscall: std::collections::BTreeMap<&'static str, u64>,
    marks: Vec<(String, u64)>,
}

/// The sandbox rule, watched by the supervision loop.
struct LimitWatch<'a> {
    rule: &'a cordon_policy::SandboxRule,
    /// The seccomp table with its errnos, to answer notifications with.
    errno_plan: &'a seccomp::SeccompPlan,
    alerts: &'a Alerts,
    session: cordon_gateway::SessionInfo,
}

/// How often the supervision loop reads the cgroup's limit counters.
const LIMIT_POLL: Duration = Duration::from_millis(100);

impl LimitWatch<'_> {
    fn watching(&self) -> bool {
        self.rule.enabled && self.rule.limits
    }

    /// Fires `signal` unless it already fired; returns whether the response is terminate.
    fn fire(&self, signal: &'static str, summary: String, fired: &mut Vec<&'static str>) -> bool {
        self.fire_with(signal, summary, Vec::new(), fired)
    }

    fn fire_with(
        &self,
        signal: &'static str,
        summary: String,
        evidence: Vec<(&'static str, cordon_gateway::Evidence)>,
        fired: &mut Vec<&'static str>,
    ) -> bool {
        if !self.rule.enabled || fired.contains(&signal) {
            return false;
        }
        fired.push(signal);
        let d = cordon_gateway::Detection::new(
            cordon_gateway::Rule::Sandbox,
            signal,
            cordon_gateway::Severity::Medium,
            self.rule.response,
            self.rule.alert,
            &self.session,
            summary,
            evidence,
        );
        self.alerts.fire(&d);
        self.rule.response == cordon_policy::Response::Terminate
    }

    /// Answers one seccomp notification and counts it; returns the summary when the count
    /// reaches the threshold and the response is terminate.
    fn denied(
        &self,
        listener: BorrowedFd<'_>,
        out: &mut Outcome,
    ) -> Result<Option<String>, nix::errno::Errno> {
        let Some(d) = seccomp::answer_one(listener, self.errno_plan)? else {
            return Ok(None);
        };
        out.seccomp_denied += 1;
        *out.seccomp_by_syscall.entry(d.syscall).or_default() += 1;
        let threshold = u64::from(self.rule.seccomp_denied);
        if threshold == 0 || out.seccomp_denied < threshold {
            return Ok(None);
        }
        let summary = format!(
            "{} syscalls denied by seccomp (last: {})",
            out.seccomp_denied, d.syscall
        );
        let by: serde_json::Value = serde_json::json!(out.seccomp_by_syscall);
        let evidence = vec![
            ("denied", cordon_gateway::Evidence::from(out.seccomp_denied)),
            ("threshold", threshold.into()),
            ("last_syscall", d.syscall.into()),
            ("by_syscall", by.to_string().into()),
        ];
        let terminate = self.fire_with("seccomp", summary.clone(), evidence, &mut out.fired);
        Ok(terminate.then_some(summary))
    }

    /// Fires for the limits `stats` show were hit; returns the first summary whose response
    /// is terminate.
    fn check(&self, stats: &cgroup::CgroupStats, fired: &mut Vec<&'static str>) -> Option<String> {
        if !self.watching() {
            return None;
        }
        let mut terminate = None;
        if stats.pids_limit_hit {
            let s = "pids limit hit (a fork failed: fork bomb or runaway process creation)";
            if self.fire("pids", s.into(), fired) {
                terminate.get_or_insert(s.to_owned());
            }
        }
        if stats.oom_killed {
            let s = "memory limit hit (the OOM killer killed a process)";
            if self.fire("oom", s.into(), fired) {
                terminate.get_or_insert(s.to_owned());
            }
        }
        terminate
    }
}

/// Where a session's time went, printed on stderr when `CORDON_TIMING` is set (see
/// docs/benchmarks.md). Marks are CLOCK_MONOTONIC, comparable with the sandbox's own.
struct Marks {
    enabled: bool,
    marks: Vec<(String, u64)>,
}

impl Marks {
    fn new() -> Marks {
        let enabled = std::env::var_os("CORDON_TIMING").is_some();
        let mut m = Marks {
            enabled,
            marks: Vec::new(),
        };
        m.mark("supervisor: start");
        m
    }

    fn mark(&mut self, name: &str) {
        if self.enabled {
            self.marks.push((name.to_string(), proto::monotonic_ns()));
        }
    }

    fn extend(&mut self, other: &[(String, u64)]) {
        if self.enabled {
            self.marks.extend(other.iter().cloned());
        }
    }

    fn report(&mut self, started: Instant) {
        if !self.enabled {
            return;
        }
        self.marks.sort_by_key(|(_, t)| *t);
        let t0 = self.marks.first().map_or(0, |(_, t)| *t);
        let mut prev = t0;
        // One write, so a line of the teardown child (or anything else sharing stderr) cannot
        // land inside one of ours.
        let mut text = String::new();
        for (name, t) in &self.marks {
            text.push_str(&format!(
                "cordon: timing {:>8.3} ms (+{:>7.3}) {name}\n",
                (t - t0) as f64 / 1e6,
                (t.saturating_sub(prev)) as f64 / 1e6
            ));
            prev = *t;
        }
        text.push_str(&format!(
            "cordon: timing {:>8.3} ms total (since main: process start not included)\n",
            started.elapsed().as_secs_f64() * 1e3
        ));
        eprint!("{text}");
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT and reads them from a signalfd, so an interrupted
/// cordon tears the sandbox down instead of dying with it half set up.
struct SignalGuard {
    fd: std::os::fd::OwnedFd,
    old: libc::sigset_t,
}

impl SignalGuard {
    fn block() -> Result<SignalGuard, RunError> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid sigset pointers.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
                libc::sigaddset(&mut set, s);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        }
        // SAFETY: valid sigset pointer; returns a new fd or -1.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(RunError::cordon(format!(
                "signalfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: signalfd returned a fresh descriptor that we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(SignalGuard { fd, old })
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: reading into a correctly sized buffer.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        (n == std::mem::size_of::<libc::signalfd_siginfo>() as isize)
            .then_some(info.ssi_signo as i32)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in `block`.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

fn pidfd_signal(pidfd: BorrowedFd<'_>, sig: i32) {
    // SAFETY: plain syscall on a pidfd we own; a pidfd cannot name a reused pid.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

fn supervise(
    sb: &spawn::Sandbox,
    signals: &SignalGuard,
    deadline: Instant,
    cg: Option<&dyn SessionCgroup>,
    wake: Option<BorrowedFd<'_>>,
    watch: &LimitWatch<'_>,
) -> Outcome {
    let mut out = Outcome::default();
    let mut kill_at: Option<Instant> = None;
    let watched = cg.filter(|_| watch.watching());
    let mut next_poll = Instant::now() + LIMIT_POLL;
    let mut chan_open = true;
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    // drain() reads until EAGAIN with recvmsg (descriptors may come along).
    let _ = nix::fcntl::fcntl(
        &sb.chan,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    loop {
        let now = Instant::now();
        let due = kill_at.map_or(deadline, |k| k.min(deadline));
        if now >= due {
            if now >= deadline && !out.timed_out && !out.terminated && out.status.is_none() {
                out.timed_out = true;
            }
            pidfd_signal(sb.pidfd.as_fd(), libc::SIGKILL);
            if let Some(c) = cg {
                let _ = c.kill_all();
            }
            kill_at = Some(now + Duration::from_secs(3600));
        }
        if let Some(c) = watched {
            if now >= next_poll {
                next_poll = now + LIMIT_POLL;
                if let Some(reason) = watch.check(&c.stats(), &mut out.fired) {
                    if kill_at.is_none_or(|k| k > now) && out.status.is_none() {
                        kill_at = Some(now);
                        out.terminated = true;
                        out.terminated_reason = Some(reason);
                        continue;
                    }
                }
            }
        }
        let mut due = due;
        if watched.is_some() {
            due = due.min(next_poll);
        }
        let wait_ms = due.saturating_duration_since(now).as_millis().min(60_000) as i32;
        let mut fds = [
            libc::pollfd {
                fd: sb.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if chan_open { sb.chan.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.map_or(-1, |w| w.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: out.listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms.max(1)) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 && drain(sb.chan.as_fd(), &mut buf, &mut out) {
            chan_open = false;
        }
        if fds[4].revents & libc::POLLIN != 0 {
            if let Some(l) = out.listener.take() {
                match watch.denied(l.as_fd(), &mut out) {
                    Ok(Some(reason)) if kill_at.is_none_or(|k| k > Instant::now()) => {
                        kill_at = Some(Instant::now());
                        out.terminated = true;
                        out.terminated_reason = Some(reason);
                    }
                    Ok(_) => {}
                    // A broken listener: drop it; pending and later denials fail with ENOSYS.
                    Err(e) => eprintln!("cordon: warning: seccomp listener: {e}"),
                }
                out.listener.get_or_insert(l);
            }
        } else if fds[4].revents != 0 {
            // POLLHUP: every process that had the filter is gone.
            out.listener = None;
        }
        if fds[2].revents != 0 {
            while let Some(sig) = signals.read() {
                // First signal: pass it on for a clean stop; then a grace period; a second
                // signal, or the end of the grace period, kills the sandbox.
                if kill_at.is_none() {
                    pidfd_signal(sb.pidfd.as_fd(), sig);
                    kill_at = Some(Instant::now() + GRACE);
                } else {
                    kill_at = Some(Instant::now());
                }
            }
        }
        if fds[3].revents != 0 && kill_at.is_none_or(|k| k > Instant::now()) {
            // The gateway asked for the session to end (a budget or the blocked-attempt
            // threshold): kill it now, not after a grace period.
            kill_at = Some(Instant::now());
            out.terminated = true;
        }
        if fds[0].revents != 0 {
            let mut status = 0;
            // SAFETY: our own child; `status` is a valid out-pointer.
            let r = unsafe { libc::waitpid(sb.pid, &mut status, libc::WNOHANG) };
            if r == sb.pid {
                // Collect anything still queued on the channel.
                drain(sb.chan.as_fd(), &mut buf, &mut out);
                return out;
            }
        }
    }
}

/// Waits for one message that carries descriptors (the sandbox is still setting up).
fn expect_fds(
    sb: &spawn::Sandbox,
    deadline: Instant,
) -> Result<(ToSupervisor, Vec<std::os::fd::OwnedFd>), String> {
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err("the sandbox did not finish setting up before the timeout".into());
        }
        let mut fds = [
            libc::pollfd {
                fd: sb.chan.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sb.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = wait.as_millis().min(60_000) as i32;
        // SAFETY: `fds` is a valid array of pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms.max(1)) };
        if n <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let (payload, received) =
                cordon_sandbox::fdpass::recv_fds(sb.chan.as_fd(), proto::MAX_MESSAGE, 8)
                    .map_err(|e| format!("sandbox set-up: {e}"))?;
            return match proto::decode::<ToSupervisor>(&payload) {
                Some(ToSupervisor::SetupFailed { layer, message }) => {
                    Err(format!("sandbox set-up failed at {layer}: {message}"))
                }
                Some(msg) => Ok((msg, received)),
                None => Err("sandbox set-up: unreadable message".into()),
            };
        }
        if fds[1].revents != 0 {
            return Err("the sandbox exited while setting up".into());
        }
    }
}

/// Finishes the set-up steps that need the supervisor: filling a tmpfs workspace, then taking
/// the gateway's sockets.
fn handshake(
    sb: &spawn::Sandbox,
    plan: &SandboxPlan,
    workspace: &mut Workspace,
    deadline: Instant,
) -> Result<Option<cordon_sandbox::netns::GatewaySockets>, String> {
    if let plan::WorkspaceMount::Tmpfs { .. } = plan.workspace {
        let (msg, mut fds) = expect_fds(sb, deadline)?;
        if msg != ToSupervisor::WorkspaceRoot || fds.len() != 1 {
            return Err(format!(
                "sandbox set-up: expected the workspace, got {msg:?}"
            ));
        }
        let root = fds.remove(0);
        workspace
            .adopt(root)
            .map_err(|e| format!("workspace: {e}"))?;
        let ready = proto::encode(&cordon_sandbox::proto::ToInit::WorkspaceReady);
        cordon_sandbox::fdpass::send_fds(sb.chan.as_fd(), &ready, &[])
            .map_err(|e| format!("sandbox set-up: {e}"))?;
    }
    if plan.network == plan::NetworkPlan::Gateway {
        let (msg, fds) = expect_fds(sb, deadline)?;
        let ToSupervisor::GatewaySockets { names } = msg else {
            return Err(format!(
                "sandbox set-up: expected the gateway's sockets, got {msg:?}"
            ));
        };
        return cordon_sandbox::netns::GatewaySockets::from_named(&names, fds)
            .map(Some)
            .map_err(|e| format!("sandbox set-up: {e}"));
    }
    Ok(None)
}

/// Reads every queued message into `out`; true when the sandbox side has closed the channel.
fn drain(chan: BorrowedFd<'_>, buf: &mut [u8], out: &mut Outcome) -> bool {
    loop {
        let (bytes, mut fds) = match cordon_sandbox::fdpass::recv_fds(chan, buf.len(), 8) {
            Ok(m) => m,
            Err(cordon_sandbox::fdpass::FdPassError::Closed) => return true,
            Err(_) => return false,
        };
        match proto::decode::<ToSupervisor>(&bytes) {
            Some(ToSupervisor::SeccompListener) if fds.len() == 1 => {
                out.listener = fds.pop();
            }
            Some(ToSupervisor::Applied {
                landlock_abi,
                landlock_enforced,
                no_new_privs,
                marks,
                ..
            }) => {
                out.applied = Some((landlock_abi, landlock_enforced, no_new_privs));
                out.marks = marks;
            }
            Some(ToSupervisor::SetupFailed { layer, message }) => {
                out.setup_failed = Some(format!("sandbox set-up failed at {layer}: {message}"))
            }
            Some(ToSupervisor::ExecFailed { errno, message }) => {
                let code = if errno == libc::ENOENT { 127 } else { 126 };
                out.exec_failed = Some((code, message));
            }
            Some(ToSupervisor::Exited {
                status,
                full,
                lingering,
            }) => {
                out.status = Some(status);
                out.full = full;
                out.lingering = lingering;
            }
            Some(
                ToSupervisor::GatewaySockets { .. }
                | ToSupervisor::WorkspaceRoot
                | ToSupervisor::SeccompListener,
            )
            | None => {}
        }
    }
}

/// The state directory for cordon's own files (volumes, audit).
pub fn state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/cordon");
    }
    if let Ok(x) = std::env::var("XDG_STATE_HOME") {
        if !x.is_empty() {
            return PathBuf::from(x).join("cordon");
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".local/state/cordon")
}
