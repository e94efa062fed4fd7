//! `cordon doctor`: what this host supports, and a self-test sandbox that proves it.
//!
//! Guarantees: every layer cordon uses gets one row (ok / missing / lowered-ok) with the detail
//! an operator needs and, when missing, the fix; the self-test runs a real sandbox through the
//! same `cordon run` path users take and asserts from the inside that it cannot reach the
//! host's loopback, cannot read a host canary file, and that the pids limit bites. The exit
//! status is non-zero when a required layer is missing or the self-test fails.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};

use cordon_sandbox::{cgroup, landlock, seccomp};

struct Row {
    layer: &'static str,
    ok: bool,
    required: bool,
    detail: String,
}

fn userns_row() -> Row {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let ok = max != "0";
    Row {
        layer: "user namespaces",
        ok,
        required: true,
        detail: if ok {
            format!("user.max_user_namespaces = {max}")
        } else {
            "disabled: sysctl -w user.max_user_namespaces=15000".into()
        },
    }
}

fn landlock_row() -> Row {
    let abi = landlock::probe_abi();
    Row {
        layer: "landlock",
        ok: abi > 0,
        required: true,
        detail: if abi > 0 {
            format!("ABI {abi} (cordon targets ABI {})", landlock::TARGET_ABI)
        } else {
            "not available: boot with lsm=landlock,… (Linux 5.13+)".into()
        },
    }
}

fn seccomp_row() -> Row {
    let plan = seccomp::default_plan();
    match seccomp::compile(&plan) {
        Ok(_) => Row {
            layer: "seccomp",
            ok: true,
            required: true,
            detail: format!("{} deny rules compiled for {}", plan.rules, plan.arch),
        },
        Err(e) => Row {
            layer: "seccomp",
            ok: false,
            required: true,
            detail: e.to_string(),
        },
    }
}

fn cgroup_row() -> Row {
    let detected = cgroup::detect_host().map_err(|e| e.to_string());
    match detected {
        Ok(d) => match d.version {
            Some(v) => {
                let where_ = d
                    .hierarchies()
                    .iter()
                    .map(|h| h.mount_point.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                Row {
                    layer: "cgroups",
                    ok: true,
                    required: true,
                    detail: format!("{v} (memory, pids, cpu) at {where_}"),
                }
            }
            None => Row {
                layer: "cgroups",
                ok: false,
                required: true,
                detail: d
                    .hint
                    .unwrap_or_else(|| "no usable cgroup hierarchy".into()),
            },
        },
        Err(e) => Row {
            layer: "cgroups",
            ok: false,
            required: true,
            detail: e,
        },
    }
}

fn workspace_row() -> Row {
    let facts = cordon_sandbox::workspace::HostFacts::probe();
    let ok = facts.privileged && facts.loop_control;
    Row {
        layer: "workspace cap",
        ok,
        required: true,
        detail: if ok {
            "loop-mounted ext4 volumes (ENOSPC at the cap)".into()
        } else if !facts.privileged {
            "needs root for loop devices; as a normal user pass --allow-missing workspace_cap"
                .into()
        } else {
            "no /dev/loop-control: modprobe loop".into()
        },
    }
}

/// How a sandbox joins its cgroup here, decided from the cgroup mounts (`/proc/self/mounts`
/// text), whether `/sys/fs/cgroup` is cgroup v2, and which cgroup version cordon uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attach {
    /// cgroup v2 at `/sys/fs/cgroup`: the sandbox is born in its cgroup (clone3).
    CloneIntoCgroup,
    /// A `cgroup.procs` write, cheap because a cgroup mount has `favordynmods`.
    FavorDynMods { mount: String },
    /// A `cgroup.procs` write that waits for an RCU grace period; `cgroup2` is the v2 mount to
    /// remount with `favordynmods`, if there is one.
    GracePeriod { cgroup2: Option<String> },
}

fn attach_mode(mounts: &str, unified: bool, version: Option<cgroup::CgroupVersion>) -> Attach {
    if unified && version == Some(cgroup::CgroupVersion::V2) {
        return Attach::CloneIntoCgroup;
    }
    let cgroup_mounts = mounts.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        match f.as_slice() {
            [_, point, fs @ ("cgroup" | "cgroup2"), opts, ..] => Some((*point, *fs, *opts)),
            _ => None,
        }
    });
    let mut cgroup2 = None;
    for (point, fs, opts) in cgroup_mounts {
        if opts.split(',').any(|o| o == "favordynmods") {
            return Attach::FavorDynMods {
                mount: point.to_string(),
            };
        }
        if fs == "cgroup2" && cgroup2.is_none() {
            cgroup2 = Some(point.to_string());
        }
    }
    Attach::GracePeriod { cgroup2 }
}

/// Times one `cgroup.procs` write of a sleeping child into a throwaway session cgroup, after a
/// pause long enough for any earlier cgroup write's fast path to lapse. `None` when no cgroup
/// can be made here (the cgroups row says why).
fn measure_attach_ms() -> Option<f64> {
    let detected = cgroup::detect_host().ok()?;
    detected.version?;
    // A session id like any other, so a crash here leaves a cgroup the stale cleanup removes.
    let id = crate::ids::new_session_id();
    let cg = cgroup::create(&detected, &id, &cgroup::CgroupLimits::default()).ok()?;
    // SAFETY: doctor is single-threaded here; the child only waits for its signal.
    let child = unsafe { libc::fork() };
    if child < 0 {
        let _ = cg.remove();
        return None;
    }
    if child == 0 {
        // SAFETY: pause and _exit are async-signal-safe.
        unsafe {
            libc::pause();
            libc::_exit(0)
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t = std::time::Instant::now();
    let added = cg.add_pid(child);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: our own child, killed and reaped by pid.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    let _ = cg.kill_all();
    let _ = cg.remove();
    added.ok().map(|()| ms)
}

fn attach_row() -> Row {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let version = cgroup::detect_host().ok().and_then(|d| d.version);
    let mode = attach_mode(&mounts, cgroup::unified_host(), version);
    let measured = match mode {
        Attach::CloneIntoCgroup => None,
        _ => measure_attach_ms(),
    };
    let took = measured.map_or(String::new(), |ms| format!(" (measured: {ms:.2} ms)"));
    let (ok, detail) = match mode {
        Attach::CloneIntoCgroup => (
            true,
            "cgroup v2: sandboxes start inside their cgroup (clone3 CLONE_INTO_CGROUP)".into(),
        ),
        Attach::FavorDynMods { mount } => (
            true,
            format!("{mount} has favordynmods: joining the cgroup does not wait{took}"),
        ),
        // Kernels 6.18+ keep the fast path once favordynmods was ever set since boot, even
        // after a remount without it: the measurement tells.
        Attach::GracePeriod { .. } if measured.is_some_and(|ms| ms < 1.0) => (
            true,
            format!(
                "no cgroup mount has favordynmods, but joining the cgroup does not wait{took} \
                 (the kernel keeps the fast path once favordynmods was set since boot)"
            ),
        ),
        Attach::GracePeriod { cgroup2 } => (
            false,
            format!(
                "each start writes cgroup.procs, which waits for an RCU grace period (10-20 ms \
                 when the host is idle){took}; to avoid it: {}. It makes fork and exit a \
                 little slower host-wide; cordon never changes the host's mounts itself",
                match cgroup2 {
                    Some(m) => format!("mount -o remount,favordynmods {m} (Linux 6.1+)"),
                    None => "mount the cgroup hierarchies with -o favordynmods (Linux 6.1+)".into(),
                }
            ),
        ),
    };
    Row {
        layer: "cgroup attach",
        ok,
        required: false,
        detail,
    }
}

/// The self-test: a real sandbox, asserting its own isolation from the inside.
fn self_test() -> Row {
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(e) => {
            return Row {
                layer: "self-test",
                ok: false,
                required: true,
                detail: format!("cannot open a host listener for the test: {e}"),
            }
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("cordon-doctor-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let canary = dir.join("canary");
    let secret = format!("doctor-canary-{}", crate::ids::new_session_id());
    let _ = std::fs::write(&canary, &secret);
    let result = dir.join("result.json");
    let script = format!(
        "[ \"$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ')\" = lo ] || echo NET-INTERFACES\n\
         if command -v bash >/dev/null; then bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo NET-REACHED; fi\n\
         cat {c} 2>/dev/null; cat /etc/shadow 2>/dev/null && echo SHADOW-READ\n\
         (i=0; while [ $i -lt 40 ]; do sleep 3 & i=$((i+1)); done) 2>/dev/null\n\
         echo SELFTEST-DONE",
        c = canary.display()
    );
    let exe = std::env::current_exe().unwrap_or_else(|_| "cordon".into());
    let out = Command::new(exe)
        .args(["run", "--pids", "16", "--timeout", "20s", "--result"])
        .arg(&result)
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    drop(listener);
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return Row {
                layer: "self-test",
                ok: false,
                required: true,
                detail: format!("could not start cordon run: {e}"),
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut problems = Vec::new();
    if !stdout.contains("SELFTEST-DONE") {
        let err = String::from_utf8_lossy(&out.stderr);
        problems.push(format!("the sandbox did not run: {}", err.trim()));
    }
    for (marker, what) in [
        ("NET-INTERFACES", "sees network interfaces besides lo"),
        ("NET-REACHED", "reached the host's loopback"),
        ("SHADOW-READ", "read /etc/shadow"),
    ] {
        if stdout.contains(marker) {
            problems.push(what.to_string());
        }
    }
    if stdout.contains(&secret) {
        problems.push("read the host canary file".into());
    }
    let pids_bit = std::fs::read_to_string(&result)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            v["limits_hit"]
                .as_array()
                .is_some_and(|a| a.iter().any(|h| h == "pids"))
        });
    match pids_bit {
        Some(true) => {}
        Some(false) => problems.push("the pids limit did not bite".into()),
        None => {}
    }
    Row {
        layer: "self-test",
        ok: problems.is_empty(),
        required: true,
        detail: if problems.is_empty() {
            "no network, host canary unreadable, pids limit bites".into()
        } else {
            format!("FAILED: {}", problems.join("; "))
        },
    }
}

/// The `core dumps` row for a `kernel.core_pattern` value. A pipe pattern starts a host helper
/// (systemd-coredump, apport, …) as root in the host's namespaces for every crash in a sandbox,
/// fed the crashing process's memory: the kernel ignores `RLIMIT_CORE` for pipes (only the
/// value 1 stops it, and a sandbox may lower its own limit), so cordon's `RLIMIT_CORE = 0` does
/// not keep the helper from running. Advice, not a requirement: the helper is the host's.
fn core_pattern_row(pattern: &str) -> Row {
    let pattern = pattern.trim();
    let pipe = pattern.starts_with('|');
    Row {
        layer: "core dumps",
        ok: !pipe,
        required: false,
        detail: if pipe {
            let helper = pattern.trim_start_matches('|');
            let helper: String = helper.split_whitespace().next().unwrap_or("").into();
            format!(
                "kernel.core_pattern pipes to {helper}: it runs as host root for every crash in a sandbox \
                 (RLIMIT_CORE does not stop pipes); keep it patched, or set a file pattern \
                 (sysctl -w kernel.core_pattern=core)"
            )
        } else {
            format!("kernel.core_pattern = {pattern:?}: sandbox crashes write no core (RLIMIT_CORE = 0)")
        },
    }
}

/// Prints the table; returns the exit status.
pub fn doctor() -> i32 {
    // Leftovers of supervisors killed with SIGKILL: empty cgroups, unlinked volume images.
    crate::session::remove_stale_cgroups();
    let _ = cordon_sandbox::workspace::cleanup_stale(&crate::session::state_dir());
    let mut rows = vec![
        userns_row(),
        landlock_row(),
        seccomp_row(),
        cgroup_row(),
        attach_row(),
        workspace_row(),
        core_pattern_row(
            &std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default(),
        ),
    ];
    let uname = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy()
            )
        })
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "cordon {} on {uname}", env!("CARGO_PKG_VERSION"));
    let _ = out.flush();
    rows.push(self_test());
    let _ = writeln!(out, "{:<16} {:<8} detail", "layer", "status");
    for r in &rows {
        let status = match (r.ok, r.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "advice",
        };
        let _ = writeln!(out, "{:<16} {:<8} {}", r.layer, status, r.detail);
    }
    let failed = rows.iter().filter(|r| r.required && !r.ok).count();
    if failed > 0 {
        let _ = writeln!(
            out,
            "\n{failed} required layer(s) missing: cordon refuses to run unless the policy lists them in sandbox.allow_missing"
        );
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cordon_sandbox::cgroup::CgroupVersion;

    const HYBRID: &str = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";

    #[test]
    fn a_pipe_core_pattern_is_advice_with_the_helper_named() {
        let r = core_pattern_row(
            "|/lib/systemd/systemd-coredump %P %u %g %s %t 9223372036854775808 %h\n",
        );
        assert!(!r.ok && !r.required);
        assert!(
            r.detail.contains("pipes to /lib/systemd/systemd-coredump:"),
            "{}",
            r.detail
        );
        let r = core_pattern_row("core\n");
        assert!(r.ok, "{}", r.detail);
    }

    #[test]
    fn a_pure_v2_host_clones_into_the_cgroup_whatever_the_mount_options() {
        let mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n";
        assert_eq!(
            attach_mode(mounts, true, Some(CgroupVersion::V2)),
            Attach::CloneIntoCgroup
        );
    }

    #[test]
    fn a_v1_host_without_favordynmods_is_told_which_mount_to_remount() {
        assert_eq!(
            attach_mode(HYBRID, false, Some(CgroupVersion::V1)),
            Attach::GracePeriod {
                cgroup2: Some("/sys/fs/cgroup/unified".into())
            }
        );
    }

    #[test]
    fn favordynmods_on_any_cgroup_mount_is_seen() {
        let mounts = HYBRID.replace("cgroup2 rw,relatime", "cgroup2 rw,relatime,favordynmods");
        assert_eq!(
            attach_mode(&mounts, false, Some(CgroupVersion::V1)),
            Attach::FavorDynMods {
                mount: "/sys/fs/cgroup/unified".into()
            }
        );
        // An option that merely contains the word does not count.
        let mounts = HYBRID.replace("relatime,memory", "relatime,memory,nofavordynmods");
        assert!(matches!(
            attach_mode(&mounts, false, Some(CgroupVersion::V1)),
            Attach::GracePeriod { .. }
        ));
    }

    #[test]
    fn a_v2_mount_that_is_not_at_sys_fs_cgroup_still_pays_the_write() {
        assert!(matches!(
            attach_mode(HYBRID, false, Some(CgroupVersion::V2)),
            Attach::GracePeriod { .. }
        ));
    }
}
