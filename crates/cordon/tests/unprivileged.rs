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
