//! Hard limits: each one is hit on purpose, bounded, and the result names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

fn need_cgroups() -> bool {
    if !is_root() {
        eprintln!("SKIPPED: cgroup limits need root or a delegated cgroup v2 here");
        return false;
    }
    true
}

#[test]
fn a_fork_bomb_hits_the_pids_limit_and_the_host_survives() {
    if !need_cgroups() {
        return;
    }
    // Bounded: at most 16 tasks, and a 20 s timeout.
    let (out, result) = run_json(&[
        "--pids",
        "16",
        "--timeout",
        "20s",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 200 ]; do sleep 5 & i=$((i+1)); done 2>/dev/null; echo spawned",
    ]);
    let hits = result["limits_hit"].as_array().unwrap();
    assert!(
        hits.iter().any(|h| h == "pids"),
        "{result} {}",
        stderr(&out)
    );
}

#[test]
fn a_memory_hog_is_killed_and_the_result_says_oom() {
    if !need_cgroups() {
        return;
    }
    let (out, result) = run_json(&[
        "--memory",
        "64M",
        "--timeout",
        "30s",
        "--",
        "python3",
        "-c",
        "a = bytearray(512 * 1024 * 1024); print('allocated')",
    ]);
    assert!(!stdout(&out).contains("allocated"));
    assert_eq!(result["limit"], "oom", "{result}");
    assert_eq!(result["signal"], 9);
    assert_eq!(result["exit_status"], 137);
    let peak = result["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak <= 64 * 1024 * 1024 + 4096 * 16, "peak {peak}");
}

#[test]
fn filling_tmp_ends_in_enospc() {
    let (out, result) = run_json(&[
        "--tmp-size",
        "8M",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1 | head -1",
    ]);
    assert!(
        stdout(&out).contains("No space left on device"),
        "{}",
        stdout(&out)
    );
    assert!(
        result["limits_hit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "disk"),
        "{result}"
    );
}

#[test]
fn filling_the_workspace_ends_in_enospc_not_a_full_host_disk() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let before = free_bytes(dir.path());
    let (out, result) = run_json(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--workspace-size",
        "32M",
        "--file-size",
        "1G",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=fill bs=1M count=256 2>&1 | grep -o 'No space left on device' | head -1",
    ]);
    assert_eq!(
        stdout(&out).trim(),
        "No space left on device",
        "{}",
        stderr(&out)
    );
    assert!(
        result["limits_hit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "disk"),
        "{result}"
    );
    // The volume's image goes back to the host when its release finishes, which may be just
    // after cordon exits (src/teardown.rs).
    let until = Instant::now() + Duration::from_secs(5);
    let mut after = free_bytes(dir.path());
    while before.saturating_sub(after) >= 64 * 1024 * 1024 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        after = free_bytes(dir.path());
    }
    assert!(
        before.saturating_sub(after) < 64 * 1024 * 1024,
        "host lost {} bytes",
        before - after
    );
}

fn free_bytes(p: &std::path::Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() * s.fragment_size()
}

#[test]
fn a_timeout_kills_the_whole_sandbox_including_a_double_forked_child() {
    let marker = format!("{}.{}", 900 + rand_u32() % 99, rand_u32() % 1000);
    let script = format!("(setsid sleep {marker} &) ; sleep {marker}");
    let t = Instant::now();
    let (out, result) = run_json(&["--timeout", "1s", "--", "sh", "-c", &script]);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(result["limit"], "timeout", "{result}");
    assert_eq!(out.status.code(), Some(137));
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "a sandbox process survived"
    );
}

#[test]
fn no_sandbox_process_survives_a_normal_exit() {
    let marker = format!("{}.{}", 800 + rand_u32() % 99, rand_u32() % 1000);
    let script =
        format!("setsid sleep {marker} >/dev/null 2>&1 & nohup sleep {marker} >/dev/null 2>&1 & echo started");
    let out = run(&["--", "sh", "-c", &script]);
    assert_eq!(stdout(&out).trim(), "started");
    assert!(
        processes_with(&format!("sleep {marker}")).is_empty(),
        "a daemon outlived its session"
    );
    // Control: the same script on the host leaves the daemons behind (we clean them up).
    let out = bare(&script);
    assert_eq!(stdout(&out).trim(), "started");
    let left = processes_with(&format!("sleep {marker}"));
    assert!(!left.is_empty());
    for pid in left {
        // SAFETY: signalling a process we started, by pid.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

#[test]
fn sigterm_to_cordon_stops_the_sandbox_cleanly_and_leaves_nothing() {
    let marker = format!("{}.{}", 700 + rand_u32() % 99, rand_u32() % 1000);
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("r.json");
    let mut child = cordon()
        .args([
            "run",
            "--result",
            result.to_str().unwrap(),
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            "(setsid sleep {marker} &); trap 'echo got-term; exit 3' TERM; sleep {marker} & wait"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("got-term"), "the command saw SIGTERM: {out}");
    assert_eq!(status.code(), Some(3));
    assert!(processes_with(&format!("sleep {marker}")).is_empty());
}

#[test]
fn the_session_cgroup_is_removed_afterwards() {
    if !need_cgroups() {
        return;
    }
    let (_, result) = run_json(&["--", "true"]);
    let sid = result["session_id"].as_str().unwrap();
    let mut found = Vec::new();
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let _ = walk(std::path::Path::new(base), sid, 0, &mut found);
    }
    assert!(found.is_empty(), "left behind: {found:?}");
}

fn walk(
    dir: &std::path::Path,
    needle: &str,
    depth: usize,
    found: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    if depth > 6 {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            if e.file_name().to_string_lossy().contains(needle) {
                found.push(e.path());
            }
            let _ = walk(&e.path(), needle, depth + 1, found);
        }
    }
    Ok(())
}

#[test]
fn nofile_and_core_rlimits_apply() {
    let out = run(&[
        "--nofile",
        "64",
        "--",
        "sh",
        "-c",
        "ulimit -n; ulimit -c; ulimit -Hn",
    ]);
    assert_eq!(stdout(&out), "64\n0\n64\n");
}

#[test]
fn a_cgroup_left_by_a_killed_supervisor_is_removed_by_the_next_session() {
    if !need_cgroups() {
        return;
    }
    // The pids hierarchy of cgroup v1, as on this kind of host; elsewhere the test says so.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let Some(path) = own
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))
    else {
        eprintln!("SKIPPED: no cgroup v1 pids hierarchy here");
        return;
    };
    let base = std::path::Path::new("/sys/fs/cgroup/pids")
        .join(path.trim_start_matches('/'))
        .join("cordon");
    // A session id from 1970: long dead.
    let stale = base.join("00000000000000000000000000");
    std::fs::create_dir_all(&stale).unwrap();
    let out = run(&["--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The sweep runs in the session's teardown, which may finish just after cordon exits
    // (src/teardown.rs): give it a moment.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stale.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!stale.exists(), "the stale cgroup is still there");
}

/// The loop device behind a sandbox's `/workspace` (`major:minor` from the sandbox's own
/// mountinfo), as `loopN`.
fn workspace_loop_device(mountinfo: &str) -> Option<String> {
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/workspace"))?;
    let dev = line.split(' ').nth(2)?;
    let target = std::fs::read_link(format!("/sys/dev/block/{dev}")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

#[test]
fn the_workspace_volume_is_released_after_the_session_ends() {
    if !is_root() {
        eprintln!("SKIPPED: ext4 workspace volumes need root");
        return;
    }
    let mut child = cordon()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "cat /proc/self/mountinfo; echo END; read _; exit 0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut mountinfo = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "END" {
            break;
        }
        mountinfo.push_str(&line);
        mountinfo.push('\n');
    }
    let dev = workspace_loop_device(&mountinfo).expect("no loop device behind /workspace");
    let backing_path = format!("/sys/block/{dev}/loop/backing_file");
    let backing = std::fs::read_to_string(&backing_path).unwrap();
    assert!(
        backing.contains("/volumes/"),
        "{dev} is backed by {backing}"
    );
    drop(child.stdin.take()); // `read` ends: the command exits
    assert!(child.wait().unwrap().success());
    // The release may finish in the teardown child just after cordon exits (src/teardown.rs),
    // but it must finish: this image's loop device is freed (another session may reuse it).
    let until = Instant::now() + Duration::from_secs(5);
    let still_bound =
        || std::fs::read_to_string(&backing_path).is_ok_and(|b| b.trim() == backing.trim());
    while still_bound() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!still_bound(), "{dev} still holds {backing}");
}

#[test]
fn a_host_workspace_larger_than_its_cap_is_refused_and_the_started_sandbox_is_gone() {
    if !is_root() {
        eprintln!("SKIPPED: ext4 workspace volumes need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    std::fs::write(ws.join("big"), vec![7u8; 20 << 20]).unwrap();
    let marker = format!("cap-refused-{}", rand_u32());
    // The volume is built after the sandbox is cloned: its failure must stop that sandbox
    // before the command runs.
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--workspace-size",
        "16M",
        "--",
        "sh",
        "-c",
        &format!("echo {marker}"),
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs about"), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&marker));
    assert!(processes_with(&marker).is_empty());
    assert_eq!(std::fs::read_dir(&ws).unwrap().count(), 1);
}

/// Bytes the files under `dir` occupy (allocated blocks, each inode once).
fn used_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if seen.insert(m.ino()) {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

#[test]
fn hardlinks_cannot_make_the_commit_write_more_than_the_workspace_cap() {
    // The attack: the commit relinks at most 512 multiply-linked files and copies the rest, so
    // 512 linked pairs of tiny files and then an 8 MiB file with 15 more names would make the
    // host write 128 MiB from a 32 MiB volume (and 65 000 names, terabytes).
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    // `a/` sorts (and is committed) before `z/`, so the pairs fill the relink table first.
    let script = "import os\n\
        os.mkdir('a'); os.mkdir('z')\n\
        for i in range(520):\n    open(f'a/l{i}', 'w').write('x'); os.link(f'a/l{i}', f'a/l{i}b')\n\
        open('z/big', 'wb').write(os.urandom(8 << 20))\n\
        for i in range(15):\n    os.link('z/big', f'z/big{i}')\n\
        print(os.stat('z/big').st_nlink)\n";
    let out = run(&[
        "--workspace",
        ws.to_str().unwrap(),
        "--workspace-size",
        "32M",
        "--",
        "python3",
        "-c",
        script,
    ]);
    // The sandbox did it all inside its cap (the attack is real) ...
    assert_eq!(stdout(&out).trim(), "16", "{}", stderr(&out));
    // ... and the host got no more than the cap.
    let used = used_bytes(&ws);
    assert!(
        used <= 32 << 20,
        "the commit wrote {used} bytes to the host from a 32 MiB workspace; stderr: {}",
        stderr(&out)
    );
    assert!(ws.join("z/big").exists(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("workspace cap"),
        "the skipped names are reported: {}",
        stderr(&out)
    );
}
