//! Shared helpers for the integration tests: run cordon, run the same thing bare, read results.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const PY: &str = "/usr/bin/python3";

/// The cordon binary under test.
pub fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

/// `cordon run ARGS` with stdin closed; returns the output.
pub fn run(args: &[&str]) -> Output {
    let mut c = cordon();
    c.arg("run").args(args).stdin(Stdio::null());
    c.output().expect("spawn cordon")
}

/// `cordon run --result FILE ARGS`; returns the output and the parsed result object.
pub fn run_json(args: &[&str]) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let result = dir.path().join("result.json");
    let mut full = vec!["--result", result.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = run(&full);
    let text = std::fs::read_to_string(&result).unwrap_or_else(|_| {
        panic!(
            "no result file; status {:?}, stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, serde_json::from_str(&text).expect("result json"))
}

/// Runs `sh -c SCRIPT` on the host, without any sandbox (the control half of a boundary test).
pub fn bare(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sh")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// A host file with random contents outside any workspace; returns (path, contents).
pub fn canary(dir: &Path) -> (PathBuf, String) {
    let secret = format!(
        "canary-{}",
        std::process::id() as u64 * 7919 + rand_u32() as u64
    );
    let path = dir.join("host-secret.txt");
    std::fs::write(&path, &secret).unwrap();
    (path, secret)
}

pub fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer.
    unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 4, 0) };
    u32::from_le_bytes(b)
}

/// Pids of host processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && pid != std::process::id() {
                found.push(pid);
            }
        }
    }
    found
}
