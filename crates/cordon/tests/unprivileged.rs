//! `cordon run` as a normal user (where the kernel allows unprivileged user namespaces): the
//! same boundaries hold, the sandbox maps to the caller's own uid, and what cannot be had
//! without root (cgroup v1 limits) fails closed unless the policy lowers the bar.
//!
//! CI runs as root, so these tests drop to `nobody` with `setpriv` to get a real normal user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::process::{Command, Output, Stdio};

const NOBODY: u32 = 65534;

/// `cordon ARGS` as uid/gid 65534, or None (with a loud note) when that cannot be arranged.
fn as_nobody(args: &[&str], home: &std::path::Path) -> Option<Output> {
    if !is_root() {
        eprintln!(
            "SKIPPED: needs root to switch to a normal user (run the suite as root, as CI does)"
        );
        return None;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_cordon"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_STATE_HOME")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv");
    Some(out)
}

fn nobody_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cordon-nobody")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    dir
}

#[test]
fn a_normal_user_gets_a_sandbox_mapped_to_its_own_uid() {
    let home = nobody_dir();
    let Some(out) = as_nobody(
        &[
            "run",
            "--allow-missing",
            "cgroups",
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; grep CapEff /proc/self/status",
        ],
        home.path(),
    ) else {
        return;
    };
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["1000", "65534", "1"]
    );
    assert!(lines[2].ends_with("0000000000000000"));
}

#[test]
fn without_root_missing_cgroups_fail_closed_with_a_clear_error() {
    let home = nobody_dir();
    let Some(out) = as_nobody(&["run", "--", "true"], home.path()) else {
        return;
    };
    assert_eq!(out.status.code(), Some(125));
    let err = stderr(&out);
    assert!(err.starts_with("cordon: cgroups unavailable"), "{err}");
    assert!(err.contains("allow_missing"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
}

#[test]
fn a_normal_users_sandbox_cannot_read_files_the_user_itself_can() {
    let home = nobody_dir();
    let secret = home.path().join("secret.txt");
    std::fs::write(&secret, "nobody-can-read-this-outside").unwrap();
    std::os::unix::fs::chown(&secret, Some(NOBODY), Some(NOBODY)).unwrap();
    // Control: as that user, without the sandbox, the file is readable.
    let control = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&secret)
        .output()
        .unwrap();
    if is_root() {
        assert_eq!(stdout(&control), "nobody-can-read-this-outside");
    }
    let Some(out) = as_nobody(
        &[
            "run",
            "--allow-missing",
            "cgroups",
            "--",
            "cat",
            secret.to_str().unwrap(),
        ],
        home.path(),
    ) else {
        return;
    };
    assert!(!stdout(&out).contains("nobody-can-read-this-outside"));
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn a_normal_users_workspace_is_capped_and_written_back() {
    let home = nobody_dir();
    let ws = home.path().join("ws");
    let Some(out) = as_nobody(
        &[
            "run",
            "--allow-missing",
            "cgroups",
            "--workspace",
            ws.to_str().unwrap(),
            "--workspace-size",
            "16M",
            "--",
            "sh",
            "-c",
            "echo kept > kept.txt; dd if=/dev/zero of=big bs=1M count=64 2>&1 | grep -o 'No space left on device' | head -1; rm -f big",
        ],
        home.path(),
    ) else {
        return;
    };
    assert_eq!(
        stdout(&out).trim(),
        "No space left on device",
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("kept.txt")).unwrap(),
        "kept\n"
    );
    assert!(!ws.join("big").exists());
}

/// As a normal user the workspace is a tmpfs the sandbox makes; canary files are planted in it
/// after copy-in, belong to the sandbox user, and never reach the host directory: not the
/// canary a host file already stands for (skipped, the host's file kept), not one the command
/// rewrote, not the directory made for it — while what the command wrote next to them does.
#[test]
fn a_normal_users_canary_files_belong_to_the_sandbox_user_and_never_reach_the_host() {
    let home = nobody_dir();
    let ws = home.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join(".env"), "REAL=1\n").unwrap();
    for p in [&ws, &ws.join(".env")] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let policy = home.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[detect.canary]\nfiles = [\".env\", \".aws/credentials\", \".ssh/id_ed25519\"]\n",
    )
    .unwrap();
    let result = home.path().join("result.json");
    let script = "stat -c '%n %u %a' /workspace/.aws/credentials /workspace/.ssh /workspace/.ssh/id_ed25519; \
                  head -1 /workspace/.aws/credentials; cat /workspace/.env; \
                  echo cfg > /workspace/.aws/config; echo mine >> /workspace/.ssh/id_ed25519";
    let Some(out) = as_nobody(
        &[
            "run",
            "--allow-missing",
            "cgroups",
            "--policy",
            policy.to_str().unwrap(),
            "--workspace",
            ws.to_str().unwrap(),
            "--result",
            result.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            script,
        ],
        home.path(),
    ) else {
        return;
    };
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "/workspace/.aws/credentials 1000 600\n/workspace/.ssh 1000 700\n\
         /workspace/.ssh/id_ed25519 1000 600\n[default]\nREAL=1\n"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert!(
        r["layers"]["workspace_cap"]
            .as_str()
            .is_some_and(|c| c.contains("tmpfs")),
        "{r}"
    );
    let planted: Vec<&str> = r["canaries"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(planted, [".aws/credentials", ".ssh/id_ed25519"]);
    assert_eq!(r["canaries"]["skipped"][0]["path"], ".env");
    assert!(
        stderr(&out).contains(
            "cordon: workspace: not copied back: .ssh/id_ed25519: a canary file of this session: not committed"
        ),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(ws.join(".env")).unwrap(),
        "REAL=1\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join(".aws/config")).unwrap(),
        "cfg\n"
    );
    assert!(!ws.join(".aws/credentials").exists());
    assert!(!ws.join(".ssh").exists());
}
