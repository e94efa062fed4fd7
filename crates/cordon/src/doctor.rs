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
        workspace_row(),
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
        let status = if r.ok { "ok" } else { "MISSING" };
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
