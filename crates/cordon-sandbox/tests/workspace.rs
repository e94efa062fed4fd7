//! Workspace volumes: the cap ends in ENOSPC, copy-in and commit never follow a symlink, and
//! nothing (mount, loop device, image) outlives a session, even a SIGKILLed one.
//!
//! Tests that need root (loop devices, ext4 mounts) print `SKIPPED` and return when not root.
//! The tree-copy tests run as any user on plain directories.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cordon_sandbox::workspace::tree::{self, MAX_DEPTH};
use cordon_sandbox::workspace::{
    attach_detached_mount, cleanup_stale, plan_volume, HostFacts, Owner, PlantError, SandboxMount,
    VolumeBackend, VolumePlan, VolumeRequest, WorkspaceError, WorkspaceSource, WorkspaceVolume,
};

const SANDBOX_UID: u32 = 1_900_000;
const MIB: u64 = 1 << 20;

// ----------------------------------------------------------------------------------------------
// Helpers.

fn have_loop_volumes(test: &str) -> bool {
    let facts = HostFacts::probe();
    if !(facts.privileged && facts.loop_control) {
        eprintln!("SKIPPED {test}: needs root in the initial user namespace and /dev/loop-control");
        return false;
    }
    if cordon_sandbox::workspace::find_mkfs().is_err() {
        eprintln!("SKIPPED {test}: mkfs.ext4 missing (apt-get install e2fsprogs)");
        return false;
    }
    true
}

fn state_dir() -> tempfile::TempDir {
    // On the host disk (not a tmpfs), like /var/lib/cordon.
    tempfile::Builder::new()
        .prefix("cordon-ws-state-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn loop_plan(source: WorkspaceSource, cap: u64, state: &Path) -> VolumePlan {
    let req = VolumeRequest {
        source,
        cap_bytes: cap,
        owner: Owner {
            uid: SANDBOX_UID,
            gid: SANDBOX_UID,
        },
        state_dir: state.to_path_buf(),
        memory_limit_bytes: Some(512 * MIB),
    };
    let plan = plan_volume(&req, &HostFacts::probe()).unwrap();
    assert_eq!(plan.backend, VolumeBackend::LoopExt4);
    plan
}

fn dirfd(p: &Path) -> OwnedFd {
    File::open(p).unwrap().into()
}

fn host_free(p: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(p).unwrap();
    st.blocks_available() * st.fragment_size()
}

/// Loop devices whose backing file lies under `state`.
fn loops_under(state: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) {
            if backing.starts_with(&state.display().to_string()) {
                out.push((name, backing.trim().to_string()));
            }
        }
    }
    out
}

/// Mountinfo lines that mention `needle`.
fn mounts_mentioning(needle: &str) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

fn loop_major_minor(index: u32) -> String {
    fs::read_to_string(format!("/sys/block/loop{index}/dev"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("7:{index}"))
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Runs `argv` as the sandbox host uid with the volume root as fd 3 (so the child reaches the
/// volume at `/proc/self/fd/3`), the way sandboxed code would write `/workspace`.
fn run_as_sandbox_user(root: RawFd, argv: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: the closure only makes async-signal-safe syscalls (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if root == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(root, 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(SANDBOX_UID) != 0
                || libc::setuid(SANDBOX_UID) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

// ----------------------------------------------------------------------------------------------
// Loop-backed ext4 volumes (root).

#[test]
fn writing_past_the_cap_fails_with_enospc_and_costs_the_host_at_most_the_cap() {
    if !have_loop_volumes("writing_past_the_cap_fails_with_enospc") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    let plan = loop_plan(WorkspaceSource::Throwaway, cap, state.path());
    // Build the template first so its one-off cost is not counted against the session.
    cordon_sandbox::workspace::ensure_template(state.path(), cap).unwrap();
    let before = host_free(state.path());
    let vol = WorkspaceVolume::prepare(&plan).unwrap();
    let root = vol.root().unwrap().as_raw_fd();

    let out = run_as_sandbox_user(
        root,
        &[
            "/bin/dd",
            "if=/dev/zero",
            "of=/proc/self/fd/3/fill",
            "bs=1M",
            "count=64",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "dd wrote 64 MiB into a 32 MiB volume: {stderr}"
    );
    assert!(
        stderr.contains("No space left on device"),
        "expected ENOSPC, got: {stderr}"
    );

    // The same write without the volume succeeds (so the test can fail).
    let scratch = tempfile::tempdir_in("/var/tmp").unwrap();
    let control = Command::new("/bin/dd")
        .args([
            "if=/dev/zero",
            &format!("of={}/fill", scratch.path().display()),
            "bs=1M",
            "count=64",
        ])
        .output()
        .unwrap();
    assert!(control.status.success());
    drop(scratch);

    let written = fs::metadata(vol.mount_source().unwrap().join("fill"))
        .unwrap()
        .len();
    assert!(
        written > cap / 2 && written <= cap,
        "wrote {written} bytes into a {cap}-byte volume"
    );
    let usage = vol.usage().unwrap();
    assert!(usage.available_bytes < MIB, "{usage:?}");
    // The loop device ends where the image ends, so the image can never hold more than the cap;
    // once the volume's pages are written back, the host blocks it holds stay below the cap.
    let index = vol.loop_index().unwrap();
    let sectors: u64 = fs::read_to_string(format!("/sys/block/loop{index}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(sectors * 512, cap);
    let dir = File::open(vol.mount_source().unwrap()).unwrap();
    // SAFETY: syncfs on an fd we own.
    assert_eq!(unsafe { libc::syncfs(dir.as_raw_fd()) }, 0);
    drop(dir);
    let host_bytes = vol.usage().unwrap().host_bytes.unwrap();
    assert!(
        host_bytes > cap / 2 && host_bytes <= cap,
        "image holds {host_bytes} host bytes for a {cap}-byte cap"
    );
    // Host-wide free space is shared with whatever else runs on this machine, so it only gets
    // a loose check: the session did not take much more than its cap.
    let used = before.saturating_sub(host_free(state.path()));
    assert!(
        used <= 2 * cap + 64 * MIB,
        "host free space dropped by {used} bytes for a {cap}-byte volume"
    );
    vol.discard().unwrap();
}

#[test]
fn a_host_dirs_files_appear_in_the_volume_owned_by_the_sandbox_user() {
    if !have_loop_volumes("a_host_dirs_files_appear_in_the_volume") {
        return;
    }
    let state = state_dir();
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("a.txt"), "alpha").unwrap();
    fs::create_dir(host.path().join("sub")).unwrap();
    fs::write(host.path().join("sub/b.txt"), "beta").unwrap();
    fs::write(host.path().join("run.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        host.path().join("run.sh"),
        fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    symlink("sub/b.txt", host.path().join("link")).unwrap();

    let plan = loop_plan(
        WorkspaceSource::HostDir(host.path().to_path_buf()),
        64 * MIB,
        state.path(),
    );
    let vol = WorkspaceVolume::prepare(&plan).unwrap();
    let v = vol.mount_source().unwrap();
    assert_eq!(fs::read_to_string(v.join("a.txt")).unwrap(), "alpha");
    assert_eq!(fs::read_to_string(v.join("sub/b.txt")).unwrap(), "beta");
    assert_eq!(
        fs::read_link(v.join("link")).unwrap(),
        PathBuf::from("sub/b.txt")
    );
    assert_eq!(
        fs::metadata(v.join("run.sh")).unwrap().mode() & 0o7777,
        0o750
    );
    for p in [".", "a.txt", "sub", "sub/b.txt", "run.sh"] {
        let m = fs::metadata(v.join(p)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (SANDBOX_UID, SANDBOX_UID),
            "{p} not owned by the sandbox user"
        );
    }
    assert_eq!(
        fs::symlink_metadata(v.join("link")).unwrap().uid(),
        SANDBOX_UID
    );
    // mke2fs's lost+found is not part of anyone's workspace.
    assert!(!v.join("lost+found").exists());
    let stats = vol.copy_in_stats().unwrap();
    assert_eq!((stats.files, stats.dirs, stats.symlinks), (3, 1, 1));
    // The sandbox user can write its workspace.
    let out = run_as_sandbox_user(
        vol.root().unwrap().as_raw_fd(),
        &["/bin/sh", "-c", "echo hi > /proc/self/fd/3/out.txt"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    vol.discard().unwrap();
    // Discard leaves the host dir as it was.
    assert!(!host.path().join("out.txt").exists());
}

#[test]
fn commit_copies_new_and_modified_files_back_and_removes_deleted_ones() {
    if !have_loop_volumes("commit_copies_new_and_modified_files_back") {
        return;
    }
    let state = state_dir();
    let host = tempfile::tempdir().unwrap();
    let h = host.path();
    fs::write(h.join("keep.txt"), "keep").unwrap();
    fs::write(h.join("modify.txt"), "old").unwrap();
    fs::write(h.join("delete.txt"), "bye").unwrap();
    fs::create_dir(h.join("olddir")).unwrap();
    fs::write(h.join("olddir/f"), "f").unwrap();
    let keep_ino = fs::metadata(h.join("keep.txt")).unwrap().ino();

    let plan = loop_plan(
        WorkspaceSource::HostDir(h.to_path_buf()),
        64 * MIB,
        state.path(),
    );
    let vol = WorkspaceVolume::prepare(&plan).unwrap();
    let script = "cd /proc/self/fd/3 && echo new > modify.txt && rm delete.txt && rm -r olddir \
                  && mkdir -p newdir/deep && echo x > newdir/deep/x && echo hi > out.txt && chmod 4755 out.txt";
    let out = run_as_sandbox_user(vol.root().unwrap().as_raw_fd(), &["/bin/sh", "-c", script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = vol.commit().unwrap();

    assert_eq!(fs::read_to_string(h.join("keep.txt")).unwrap(), "keep");
    assert_eq!(
        fs::metadata(h.join("keep.txt")).unwrap().ino(),
        keep_ino,
        "unchanged file was rewritten"
    );
    assert_eq!(fs::read_to_string(h.join("modify.txt")).unwrap(), "new\n");
    assert!(!h.join("delete.txt").exists());
    assert!(!h.join("olddir").exists());
    assert_eq!(fs::read_to_string(h.join("newdir/deep/x")).unwrap(), "x\n");
    assert_eq!(fs::read_to_string(h.join("out.txt")).unwrap(), "hi\n");
    // Committed files belong to the host dir's owner, never keep setuid.
    let owner = fs::metadata(h).unwrap();
    for p in ["modify.txt", "out.txt", "newdir", "newdir/deep/x"] {
        let m = fs::metadata(h.join(p)).unwrap();
        assert_eq!((m.uid(), m.gid()), (owner.uid(), owner.gid()), "{p}");
    }
    assert_eq!(
        fs::metadata(h.join("out.txt")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(stats.unchanged, 1);
    assert_eq!(stats.files_written, 3);
    assert_eq!(stats.deleted, 3); // delete.txt, olddir/f, olddir
    assert_eq!(stats.dirs_created, 2);
}

#[test]
fn a_symlink_to_etc_shadow_is_committed_as_a_symlink_and_never_followed() {
    if !have_loop_volumes("a_symlink_to_etc_shadow_is_committed_as_a_symlink") {
        return;
    }
    let state = state_dir();
    let host = tempfile::tempdir().unwrap();
    let plan = loop_plan(
        WorkspaceSource::HostDir(host.path().to_path_buf()),
        32 * MIB,
        state.path(),
    );
    let vol = WorkspaceVolume::prepare(&plan).unwrap();
    let out = run_as_sandbox_user(
        vol.root().unwrap().as_raw_fd(),
        &[
            "/bin/sh",
            "-c",
            "cd /proc/self/fd/3 && ln -s /etc/shadow leak && ln -s /etc leakdir",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = vol.commit().unwrap();
    assert_eq!(stats.symlinks_written, 2);
    let leak = host.path().join("leak");
    assert!(fs::symlink_metadata(&leak)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_link(&leak).unwrap(), PathBuf::from("/etc/shadow"));
    let shadow = fs::read(Path::new("/etc/shadow")).unwrap();
    for entry in fs::read_dir(host.path()).unwrap().flatten() {
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        assert!(
            !meta.is_file() || fs::read(entry.path()).unwrap() != shadow,
            "shadow copied into {:?}",
            entry.path()
        );
    }
}

#[test]
fn a_workspace_bigger_than_the_cap_is_refused_before_anything_is_created() {
    let state = state_dir();
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("big.bin"), vec![1u8; 20 * MIB as usize]).unwrap();
    let facts = HostFacts::probe();
    let req = VolumeRequest {
        source: WorkspaceSource::HostDir(host.path().to_path_buf()),
        cap_bytes: 16 * MIB,
        owner: Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        },
        state_dir: state.path().to_path_buf(),
        memory_limit_bytes: None,
    };
    let plan = plan_volume(&req, &facts).unwrap();
    let err = WorkspaceVolume::prepare(&plan).unwrap_err();
    assert!(
        matches!(err, WorkspaceError::TooLarge { needed, available, .. } if needed >= 20 * MIB && available == 16 * MIB),
        "{err}"
    );
    assert!(err.to_string().contains("raise the workspace cap"), "{err}");
    assert!(
        !state.path().join("volumes").exists()
            || fs::read_dir(state.path().join("volumes")).unwrap().count() == 0
    );
    if facts.privileged {
        assert!(loops_under(state.path()).is_empty());
    }
}

/// Data ranges of a file, by SEEK_DATA/SEEK_HOLE.
fn data_ranges(path: &Path) -> Vec<(i64, i64)> {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < len {
        // SAFETY: lseek on an fd we own.
        let data = unsafe { libc::lseek(f.as_raw_fd(), offset, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: lseek on an fd we own.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data, hole));
        offset = hole;
    }
    out
}

#[test]
fn a_template_is_built_once_sparse_and_in_at_most_two_data_ranges() {
    if !have_loop_volumes("a_template_is_built_once_sparse_and_in_at_most_two_data_ranges") {
        return;
    }
    let state = state_dir();
    let cap = cordon_sandbox::workspace::DEFAULT_CAP_BYTES;
    let path = cordon_sandbox::workspace::ensure_template(state.path(), cap).unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), cap);
    assert_eq!(meta.mode() & 0o777, 0o600);
    // Every data range is one allocation and one free per session (a synchronous TRIM each on
    // a host mounted with -o discard): mke2fs's scattered first blocks are merged.
    let ranges = data_ranges(&path);
    assert!(ranges.len() <= 2, "{ranges:?}");
    let data: i64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(data <= 512 << 10, "template holds {data} bytes of data");
    // Built once: a second call reuses it.
    let again = cordon_sandbox::workspace::ensure_template(state.path(), cap).unwrap();
    assert_eq!(fs::metadata(&again).unwrap().ino(), meta.ino());
}

#[test]
fn no_loop_device_and_no_mount_remain_after_commit_or_discard() {
    if !have_loop_volumes("no_loop_device_and_no_mount_remain") {
        return;
    }
    let state = state_dir();
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("a"), "a").unwrap();
    for source in [
        WorkspaceSource::Throwaway,
        WorkspaceSource::HostDir(host.path().to_path_buf()),
    ] {
        for commit in [false, true] {
            let plan = loop_plan(source.clone(), 32 * MIB, state.path());
            let vol = WorkspaceVolume::prepare(&plan).unwrap();
            let index = vol.loop_index().unwrap();
            let devnum = loop_major_minor(index);
            assert_eq!(
                loops_under(state.path()).len(),
                1,
                "the volume's loop device is bound while it lives"
            );
            // A detached mount is in no mount table, the host's included.
            assert!(mounts_mentioning(&format!(" {devnum} ")).is_empty());
            fs::write(vol.mount_source().unwrap().join("scratch"), "x").unwrap();
            if commit {
                vol.commit().unwrap();
            } else {
                vol.discard().unwrap();
            }
            assert!(
                loops_under(state.path()).is_empty(),
                "{:?}",
                loops_under(state.path())
            );
            assert!(mounts_mentioning(&format!(" {devnum} ")).is_empty());
            assert!(mounts_mentioning(&state.path().display().to_string()).is_empty());
            assert_eq!(
                fs::read_dir(state.path().join("volumes")).unwrap().count(),
                0,
                "image left behind"
            );
        }
    }
    // Commit brought `scratch` home; discard did not.
    assert!(host.path().join("scratch").exists());
}

#[test]
fn cleanup_stale_removes_a_leftover_volume_and_spares_a_live_one() {
    if !have_loop_volumes("cleanup_stale_removes_a_leftover_volume") {
        return;
    }
    let state = state_dir();
    let live = WorkspaceVolume::prepare(&loop_plan(
        WorkspaceSource::Throwaway,
        32 * MIB,
        state.path(),
    ))
    .unwrap();
    // What a cordon killed between creating its image and unlinking it leaves: an image with no
    // lock holder, still bound to a loop device (here without autoclear, the worst case).
    let stale = state.path().join("volumes/stale.img");
    File::create(&stale).unwrap().set_len(32 * MIB).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&stale)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stale_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(loops_under(state.path()).len(), 2);

    let report = cleanup_stale(state.path()).unwrap();
    let stale_index: u32 = stale_dev.trim_start_matches("/dev/loop").parse().unwrap();
    assert_eq!(report.loop_devices_cleared, vec![stale_index]);
    assert_eq!(report.files_removed, vec![stale.clone()]);
    assert!(!stale.exists());
    // The live session is untouched and still works.
    assert_eq!(loops_under(state.path()).len(), 1);
    fs::write(live.mount_source().unwrap().join("still-here"), "yes").unwrap();
    live.discard().unwrap();
    assert!(loops_under(state.path()).is_empty());
}

#[test]
fn release_reports_a_volume_the_sandbox_still_holds_and_the_kernel_frees_it_later() {
    if !have_loop_volumes("release_reports_a_volume_the_sandbox_still_holds") {
        return;
    }
    let state = state_dir();
    let vol = WorkspaceVolume::prepare(&loop_plan(
        WorkspaceSource::Throwaway,
        32 * MIB,
        state.path(),
    ))
    .unwrap();
    let index = vol.loop_index().unwrap();
    // The sandbox's clone of the mount, as if its init were still alive.
    let SandboxMount::Detached(held) = vol.sandbox_mount().unwrap() else {
        panic!("detached mount expected");
    };
    let err = vol.discard().unwrap_err();
    assert!(
        matches!(err, WorkspaceError::LoopStillAttached { index: i, .. } if i == index),
        "{err}"
    );
    assert_eq!(loops_under(state.path()).len(), 1);
    // When the sandbox goes, so does the device.
    drop(held);
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
}

#[test]
fn concurrent_sessions_get_their_own_loop_devices() {
    if !have_loop_volumes("concurrent_sessions_get_their_own_loop_devices") {
        return;
    }
    let state = state_dir();
    cordon_sandbox::workspace::ensure_template(state.path(), 32 * MIB).unwrap();
    let plan = loop_plan(WorkspaceSource::Throwaway, 32 * MIB, state.path());
    let volumes: Vec<WorkspaceVolume> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| WorkspaceVolume::prepare(&plan).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut indices: Vec<u32> = volumes.iter().map(|v| v.loop_index().unwrap()).collect();
    indices.sort_unstable();
    indices.dedup();
    assert_eq!(indices.len(), 4, "two sessions shared a loop device");
    for (i, v) in volumes.iter().enumerate() {
        fs::write(v.mount_source().unwrap().join("who"), i.to_string()).unwrap();
    }
    for (i, v) in volumes.iter().enumerate() {
        assert_eq!(
            fs::read_to_string(v.mount_source().unwrap().join("who")).unwrap(),
            i.to_string()
        );
    }
    for v in volumes {
        v.discard().unwrap();
    }
    assert!(loops_under(state.path()).is_empty());
}

/// Helper process for the SIGKILL test: prepares a volume under `$CORDON_WS_HELPER_STATE`,
/// writes into it, reports its loop device and sleeps until killed. Does nothing otherwise.
#[test]
#[ignore = "helper process for the tests that SIGKILL a volume holder"]
fn helper_prepare_and_sleep() {
    let Some(state) = std::env::var_os("CORDON_WS_HELPER_STATE") else {
        return;
    };
    let plan = loop_plan(WorkspaceSource::Throwaway, 32 * MIB, Path::new(&state));
    let vol = WorkspaceVolume::prepare(&plan).unwrap();
    fs::write(
        vol.mount_source().unwrap().join("data"),
        vec![7u8; 4 * MIB as usize],
    )
    .unwrap();
    println!("READY {}", vol.loop_index().unwrap());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

/// Kills a process by pid when dropped.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Starts [`helper_prepare_and_sleep`] on `state`; returns it (killed when the guard drops)
/// and the loop device its volume is on.
fn start_volume_holder(state: &Path) -> (std::process::Child, KillOnDrop, u32) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_prepare_and_sleep",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CORDON_WS_HELPER_STATE", state)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id() as i32);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let index: u32 = loop {
        let line = lines.next().expect("helper exited before READY").unwrap();
        // libtest prints "test helper_prepare_and_sleep ... " on the same line.
        if let Some((_, rest)) = line.split_once("READY ") {
            break rest.trim().parse().unwrap();
        }
    };
    (child, guard, index)
}

#[test]
fn a_session_killed_after_it_took_a_spare_leaves_a_device_the_next_replenish_frees() {
    if !have_loop_volumes("a_session_killed_after_it_took_a_spare") {
        return;
    }
    let state = state_dir();
    spares::replenish(state.path(), 32 * MIB).unwrap();
    let spare_devices: Vec<u32> = spares_of(state.path(), 32 * MIB)
        .iter()
        .map(|(i, _)| *i)
        .collect();
    let (mut child, _guard, index) = start_volume_holder(state.path());
    assert!(
        spare_devices.contains(&index),
        "the holder did not take a spare"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // The kernel unmounted the volume, but a spare has no autoclear: its device stays bound
    // to the deleted image (holding what the session wrote) ...
    let backing = format!("/sys/block/loop{index}/loop/backing_file");
    assert!(wait_until(Duration::from_secs(2), || mounts_mentioning(
        &format!(" {} ", loop_major_minor(index))
    )
    .is_empty()));
    assert!(fs::read_to_string(&backing)
        .unwrap_or_default()
        .contains("/claimed-"));
    // ... until the next session's teardown replenishes, which frees it.
    let report = spares::replenish(state.path(), 32 * MIB).unwrap();
    assert!(report.released >= 1, "{report:?}");
    assert!(!fs::read_to_string(&backing)
        .unwrap_or_default()
        .contains("/claimed-"));
    assert_eq!(spares_of(state.path(), 32 * MIB).len(), spares::PER_CAP);
    cleanup_stale(state.path()).unwrap();
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
}

#[test]
fn a_killed_supervisor_leaves_no_mount_loop_device_or_image() {
    if !have_loop_volumes("a_killed_supervisor_leaves_no_mount_loop_device_or_image") {
        return;
    }
    let state = state_dir();
    cordon_sandbox::workspace::ensure_template(state.path(), 32 * MIB).unwrap();
    let (mut child, _guard, index) = start_volume_holder(state.path());
    assert_eq!(loops_under(state.path()).len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // The kernel unmounts the detached volume and autoclear frees the device, without us.
    assert!(
        wait_until(Duration::from_secs(2), || loops_under(state.path())
            .is_empty()),
        "loop{index} still bound: {:?}",
        loops_under(state.path())
    );
    assert!(mounts_mentioning(&format!(" {} ", loop_major_minor(index))).is_empty());
    assert_eq!(
        fs::read_dir(state.path().join("volumes")).unwrap().count(),
        0
    );
    assert_eq!(cleanup_stale(state.path()).unwrap(), Default::default());
}

#[test]
fn the_sandbox_init_can_attach_the_volume_in_its_own_user_and_mount_namespace() {
    if !have_loop_volumes("the_sandbox_init_can_attach_the_volume") {
        return;
    }
    let state = state_dir();
    let vol = WorkspaceVolume::prepare(&loop_plan(
        WorkspaceSource::Throwaway,
        32 * MIB,
        state.path(),
    ))
    .unwrap();
    fs::write(
        vol.mount_source().unwrap().join("hello.txt"),
        "hello from the volume",
    )
    .unwrap();
    let SandboxMount::Detached(clone) = vol.sandbox_mount().unwrap() else {
        panic!("a loop volume hands the sandbox a detached mount");
    };
    let target = tempfile::tempdir().unwrap();
    let target_c = CString::new(target.path().to_str().unwrap()).unwrap();
    let fd = clone.as_raw_fd();
    let mut cmd = Command::new("/bin/cat");
    cmd.arg(target.path().join("hello.txt"));
    // SAFETY: the closure only makes syscalls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::syscall(
                libc::SYS_move_mount,
                fd,
                c"".as_ptr(),
                libc::AT_FDCWD,
                target_c.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            );
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the volume"
    );
    // The host's namespace never saw it.
    assert!(!target.path().join("hello.txt").exists());
    drop(clone);
    vol.discard().unwrap();
    assert!(loops_under(state.path()).is_empty());
}

#[test]
fn attach_detached_mount_puts_a_volume_clone_at_a_path_in_a_private_mount_namespace() {
    if !have_loop_volumes("attach_detached_mount_puts_a_volume_clone_at_a_path") {
        return;
    }
    let state = state_dir();
    let vol = WorkspaceVolume::prepare(&loop_plan(
        WorkspaceSource::Throwaway,
        32 * MIB,
        state.path(),
    ))
    .unwrap();
    fs::write(vol.mount_source().unwrap().join("x"), "in the volume").unwrap();
    let SandboxMount::Detached(clone) = vol.sandbox_mount().unwrap() else {
        panic!("a loop volume hands the sandbox a detached mount");
    };
    let target = tempfile::tempdir().unwrap();
    let path = target.path().to_path_buf();
    // A throwaway thread with its own mount namespace (unshare(CLONE_NEWNS) moves only the
    // calling thread), so the host's mount table is never touched; it dies with the thread.
    let seen = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let bad = attach_detached_mount(clone.as_fd(), Path::new("/nonexistent/cordon-target"))
            .unwrap_err();
        assert!(
            bad.to_string()
                .contains("move_mount to /nonexistent/cordon-target"),
            "{bad}"
        );
        attach_detached_mount(clone.as_fd(), &path).unwrap();
        fs::read_to_string(path.join("x")).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(seen, "in the volume");
    assert!(
        !target.path().join("x").exists(),
        "the attach leaked into the host's mount namespace"
    );
    vol.discard().unwrap();
    assert!(loops_under(state.path()).is_empty());
}

// ----------------------------------------------------------------------------------------------
// Tmpfs volumes made by an (unprivileged) init in its own user namespace.

/// Starts `sleep` in a new user + mount namespace holding a detached tmpfs of `size` bytes as
/// fd 3, and returns it with that fd fetched over `pidfd_getfd`. `None` if user namespaces are
/// unavailable.
fn spawn_tmpfs_holder(size: u64) -> Option<(std::process::Child, OwnedFd)> {
    let uid_map = CString::new(format!("0 {} 1", nix::unistd::geteuid())).unwrap();
    let gid_map = CString::new(format!("0 {} 1", nix::unistd::getegid())).unwrap();
    let size_c = CString::new(size.to_string()).unwrap();
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("30");
    // SAFETY: the closure only makes syscalls on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
                return fail();
            }
            for (file, text) in [
                (c"/proc/self/setgroups", c"deny"),
                (c"/proc/self/uid_map", uid_map.as_c_str()),
                (c"/proc/self/gid_map", gid_map.as_c_str()),
            ] {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return fail();
                }
                let bytes = text.to_bytes();
                let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                libc::close(fd);
                if n != bytes.len() as isize {
                    return fail();
                }
            }
            let fsfd =
                libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), libc::FSOPEN_CLOEXEC) as i32;
            if fsfd < 0 {
                return fail();
            }
            let set = libc::syscall(
                libc::SYS_fsconfig,
                fsfd,
                libc::FSCONFIG_SET_STRING,
                c"size".as_ptr(),
                size_c.as_ptr(),
                0,
            );
            // As the sandbox init is told to (SandboxMount::Tmpfs { nr_inodes, .. }).
            let inodes = libc::syscall(
                libc::SYS_fsconfig,
                fsfd,
                libc::FSCONFIG_SET_STRING,
                c"nr_inodes".as_ptr(),
                c"1024".as_ptr(),
                0,
            );
            let create =
                libc::syscall(libc::SYS_fsconfig, fsfd, libc::FSCONFIG_CMD_CREATE, 0, 0, 0);
            if set != 0 || inodes != 0 || create != 0 {
                return fail();
            }
            let mnt = libc::syscall(libc::SYS_fsmount, fsfd, 0, 0) as i32;
            if mnt < 0 || libc::dup2(mnt, 3) != 3 {
                return fail();
            }
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("user namespace with a tmpfs unavailable: {e}");
            return None;
        }
    };
    // SAFETY: pidfd_open on our own child's pid; returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as i32, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just gave us this fd.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd duplicates the child's fd 3 into this process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 3, 0) } as i32;
    assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just gave us this fd.
    Some((child, unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[test]
fn a_tmpfs_volume_from_a_user_namespace_caps_writes_with_enospc_and_commits() {
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("in.txt"), "from host").unwrap();
    let cap = 16 * MIB;
    let req = VolumeRequest {
        source: WorkspaceSource::HostDir(host.path().to_path_buf()),
        cap_bytes: cap,
        owner: Owner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        },
        state_dir: PathBuf::from("/nonexistent-state"),
        memory_limit_bytes: Some(512 * MIB),
    };
    let facts = HostFacts {
        privileged: false,
        loop_control: false,
    };
    let plan = plan_volume(&req, &facts).unwrap();
    assert_eq!(plan.backend, VolumeBackend::Tmpfs);
    let mut vol = WorkspaceVolume::prepare(&plan).unwrap();
    assert!(matches!(
        vol.sandbox_mount().unwrap(),
        SandboxMount::Tmpfs { size_bytes, .. } if size_bytes == cap
    ));
    // An uncapped tmpfs is refused.
    if let Some((mut big_child, big)) = spawn_tmpfs_holder(4 * cap) {
        assert!(matches!(
            vol.adopt_tmpfs_root(big),
            Err(WorkspaceError::BadTmpfsRoot(_))
        ));
        let _ = big_child.kill();
        let _ = big_child.wait();
    }
    let Some((mut child, root)) = spawn_tmpfs_holder(cap) else {
        eprintln!("SKIPPED a_tmpfs_volume_from_a_user_namespace: no user namespaces here");
        return;
    };
    vol.adopt_tmpfs_root(root).unwrap();
    let v = vol.mount_source().unwrap();
    assert_eq!(fs::read_to_string(v.join("in.txt")).unwrap(), "from host");
    let err = fs::write(v.join("fill"), vec![0u8; 2 * cap as usize]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    fs::remove_file(v.join("fill")).unwrap();
    fs::write(v.join("out.txt"), "made in the sandbox").unwrap();
    // The holder (the "init") dies first, as it would at the end of a session.
    child.kill().unwrap();
    child.wait().unwrap();
    let stats = vol.commit().unwrap();
    assert_eq!(stats.files_written, 1);
    assert_eq!(
        fs::read_to_string(host.path().join("out.txt")).unwrap(),
        "made in the sandbox"
    );
}

// ----------------------------------------------------------------------------------------------
// The tree engine on plain directories (any user).

struct Pair {
    _dirs: tempfile::TempDir,
    host: PathBuf,
    vol: PathBuf,
}

fn pair() -> Pair {
    let dirs = tempfile::tempdir().unwrap();
    let host = dirs.path().join("host");
    let vol = dirs.path().join("vol");
    fs::create_dir(&host).unwrap();
    fs::create_dir(&vol).unwrap();
    Pair {
        _dirs: dirs,
        host,
        vol,
    }
}

fn copy_in(p: &Pair) -> (tree::Snapshot, tree::CopyInStats) {
    tree::copy_in(dirfd(&p.host).as_fd(), dirfd(&p.vol).as_fd(), None).unwrap()
}

fn commit(p: &Pair, snap: &tree::Snapshot) -> tree::CommitStats {
    tree::commit_tree(
        dirfd(&p.vol).as_fd(),
        dirfd(&p.host).as_fd(),
        snap,
        false,
        u64::MAX,
    )
    .unwrap()
}

#[test]
fn copy_in_copies_symlinks_as_symlinks_and_never_reads_through_them() {
    let p = pair();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), "host secret").unwrap();
    symlink(outside.path().join("secret"), p.host.join("to-secret")).unwrap();
    symlink(outside.path(), p.host.join("to-dir")).unwrap();
    let (_, stats) = copy_in(&p);
    assert_eq!(stats.symlinks, 2);
    assert_eq!(stats.files, 0);
    assert!(fs::symlink_metadata(p.vol.join("to-secret"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::symlink_metadata(p.vol.join("to-dir"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn commit_replaces_a_host_symlink_instead_of_writing_through_it() {
    // A symlink left in the host dir (say, by an earlier session) must not let this session
    // write outside: the sandbox replaces `escape` with a directory holding a file.
    let p = pair();
    let outside = tempfile::tempdir().unwrap();
    symlink(outside.path(), p.host.join("escape")).unwrap();
    symlink(outside.path().join("target.txt"), p.host.join("file-link")).unwrap();
    let (snap, _) = copy_in(&p);
    fs::remove_file(p.vol.join("escape")).unwrap();
    fs::create_dir(p.vol.join("escape")).unwrap();
    fs::write(p.vol.join("escape/pwned"), "x").unwrap();
    fs::remove_file(p.vol.join("file-link")).unwrap();
    fs::write(p.vol.join("file-link"), "overwrite?").unwrap();
    commit(&p, &snap);
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "commit wrote outside the host dir"
    );
    assert!(fs::symlink_metadata(p.host.join("escape"))
        .unwrap()
        .is_dir());
    assert_eq!(
        fs::read_to_string(p.host.join("escape/pwned")).unwrap(),
        "x"
    );
    assert!(fs::symlink_metadata(p.host.join("file-link"))
        .unwrap()
        .is_file());
}

#[test]
fn fifos_and_sockets_are_skipped_with_a_reason() {
    let p = pair();
    nix::unistd::mkfifo(
        &p.host.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(p.host.join("sock")).unwrap();
    let (snap, stats) = copy_in(&p);
    let reasons: Vec<_> = stats
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (PathBuf::from("pipe"), "fifo: not copied".to_string()),
            (PathBuf::from("sock"), "socket: not copied".to_string())
        ]
    );
    assert!(!p.vol.join("pipe").exists());
    nix::unistd::mkfifo(
        &p.vol.join("newpipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let stats = commit(&p, &snap);
    assert_eq!(stats.skipped.len(), 1);
    assert_eq!(stats.skipped[0].reason, "fifo: not committed");
    assert!(!p.host.join("newpipe").exists());
    // Skipped host entries are not "deleted in the sandbox".
    assert!(p.host.join("pipe").exists());
}

#[test]
fn setuid_and_setgid_bits_never_cross() {
    let p = pair();
    fs::write(p.host.join("suid"), "x").unwrap();
    fs::set_permissions(p.host.join("suid"), fs::Permissions::from_mode(0o6755)).unwrap();
    let (snap, _) = copy_in(&p);
    assert_eq!(
        fs::metadata(p.vol.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    fs::write(p.vol.join("new-suid"), "y").unwrap();
    fs::set_permissions(p.vol.join("new-suid"), fs::Permissions::from_mode(0o4711)).unwrap();
    commit(&p, &snap);
    assert_eq!(
        fs::metadata(p.host.join("new-suid")).unwrap().mode() & 0o7777,
        0o711
    );
}

#[test]
fn hardlinks_stay_hardlinks_both_ways() {
    let p = pair();
    fs::write(p.host.join("a"), "shared").unwrap();
    fs::hard_link(p.host.join("a"), p.host.join("b")).unwrap();
    let (snap, stats) = copy_in(&p);
    assert_eq!((stats.files, stats.hardlinks), (1, 1));
    assert_eq!(
        fs::metadata(p.vol.join("a")).unwrap().ino(),
        fs::metadata(p.vol.join("b")).unwrap().ino()
    );
    fs::write(p.vol.join("c"), "new pair").unwrap();
    fs::hard_link(p.vol.join("c"), p.vol.join("d")).unwrap();
    let stats = commit(&p, &snap);
    assert_eq!(stats.hardlinks, 1);
    assert_eq!(
        fs::metadata(p.host.join("c")).unwrap().ino(),
        fs::metadata(p.host.join("d")).unwrap().ino()
    );
    // a and b were not touched in the sandbox: still one inode on the host.
    assert_eq!(
        fs::metadata(p.host.join("a")).unwrap().ino(),
        fs::metadata(p.host.join("b")).unwrap().ino()
    );
}

#[test]
fn host_edits_during_the_session_survive_when_the_sandbox_left_the_file_alone() {
    let p = pair();
    fs::write(p.host.join("notes"), "v1").unwrap();
    fs::create_dir(p.host.join("d")).unwrap();
    let (snap, _) = copy_in(&p);
    fs::write(p.host.join("notes"), "edited on the host").unwrap();
    fs::write(p.host.join("d/host-new"), "made on the host").unwrap();
    // The sandbox deletes the directory; the host added to it meanwhile.
    fs::remove_dir(p.vol.join("d")).unwrap();
    let stats = commit(&p, &snap);
    assert_eq!(
        fs::read_to_string(p.host.join("notes")).unwrap(),
        "edited on the host"
    );
    assert_eq!(
        fs::read_to_string(p.host.join("d/host-new")).unwrap(),
        "made on the host"
    );
    assert_eq!(stats.skipped.len(), 1, "{:?}", stats.skipped);
    assert!(stats.skipped[0].reason.contains("holds new host entries"));
}

#[test]
fn a_file_replaced_in_the_sandbox_is_committed_even_with_the_same_size_and_mtime() {
    let p = pair();
    fs::write(p.host.join("f"), "aaaa").unwrap();
    let (snap, _) = copy_in(&p);
    let mtime = fs::metadata(p.vol.join("f")).unwrap().modified().unwrap();
    fs::write(p.vol.join("f"), "bbbb").unwrap();
    File::options()
        .write(true)
        .open(p.vol.join("f"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    commit(&p, &snap);
    assert_eq!(fs::read_to_string(p.host.join("f")).unwrap(), "bbbb");
}

#[test]
fn nesting_deeper_than_the_limit_is_refused_on_copy_in_and_skipped_on_commit() {
    let p = pair();
    let mut deep = p.host.clone();
    for _ in 0..=MAX_DEPTH {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    let err = tree::copy_in(dirfd(&p.host).as_fd(), dirfd(&p.vol).as_fd(), None).unwrap_err();
    assert!(
        matches!(err, WorkspaceError::TooDeep { max, .. } if max == MAX_DEPTH),
        "{err}"
    );

    let q = pair();
    let (snap, _) = copy_in(&q);
    let mut deep = q.vol.clone();
    for _ in 0..=MAX_DEPTH {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    let stats = commit(&q, &snap);
    assert_eq!(stats.skipped.len(), 1);
    assert!(stats.skipped[0].reason.contains("deeper than the limit"));
    assert_eq!(stats.dirs_created, MAX_DEPTH as u64);
}

#[test]
fn estimate_counts_allocated_blocks_of_sparse_files_and_hardlinks_once() {
    let p = pair();
    File::create(p.host.join("sparse"))
        .unwrap()
        .set_len(10 * MIB)
        .unwrap();
    fs::write(p.host.join("dense"), vec![1u8; 10_000]).unwrap();
    fs::hard_link(p.host.join("dense"), p.host.join("dense2")).unwrap();
    fs::create_dir(p.host.join("d")).unwrap();
    let est = tree::estimate(dirfd(&p.host).as_fd()).unwrap();
    assert_eq!(est.bytes, 3 * 4096 + 4096);
    assert_eq!(est.entries, 4);
}

#[test]
fn a_huge_sparse_file_costs_the_host_only_its_data_on_commit_and_copy_in() {
    // `truncate -s 1T` in a 1 GiB volume must not become a terabyte of zeros on the host.
    let p = pair();
    let (snap, _) = copy_in(&p);
    let tera = 1u64 << 40;
    let f = File::create(p.vol.join("huge")).unwrap();
    f.set_len(tera).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"needle", tera / 2).unwrap();
    drop(f);
    let stats = commit(&p, &snap);
    // Data extents are block-granular: the one block holding the needle.
    assert!(stats.bytes_written <= 4096, "{stats:?}");
    let m = fs::metadata(p.host.join("huge")).unwrap();
    assert_eq!(m.len(), tera);
    assert!(
        m.blocks() * 512 <= MIB,
        "host allocated {} bytes",
        m.blocks() * 512
    );
    let mut buf = [0u8; 6];
    std::os::unix::fs::FileExt::read_exact_at(
        &File::open(p.host.join("huge")).unwrap(),
        &mut buf,
        tera / 2,
    )
    .unwrap();
    assert_eq!(&buf, b"needle");

    // And the other way round.
    let q = pair();
    fs::rename(p.host.join("huge"), q.host.join("huge")).unwrap();
    let (_, stats) = copy_in(&q);
    assert!(stats.bytes <= 4096, "{stats:?}");
    assert!(fs::metadata(q.vol.join("huge")).unwrap().blocks() * 512 <= MIB);
}

// ----------------------------------------------------------------------------------------------
// Timings (run with --ignored --nocapture).

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
#[ignore = "prints timings; run with --ignored --nocapture"]
fn print_prepare_and_commit_timings() {
    if !have_loop_volumes("print_prepare_and_commit_timings") {
        return;
    }
    let state = state_dir();
    let cap = cordon_sandbox::workspace::DEFAULT_CAP_BYTES;
    let t = Instant::now();
    cordon_sandbox::workspace::ensure_template(state.path(), cap).unwrap();
    println!(
        "template (once per cap, mkfs + mount + fsync): {} us",
        t.elapsed().as_micros()
    );

    let host = tempfile::tempdir().unwrap();
    for i in 0..10 {
        fs::write(
            host.path().join(format!("file{i}.txt")),
            format!("content {i}\n").repeat(100),
        )
        .unwrap();
    }
    fs::create_dir(host.path().join("src")).unwrap();
    fs::write(host.path().join("src/main.py"), "print('hi')\n").unwrap();

    for (label, source) in [
        ("throwaway", WorkspaceSource::Throwaway),
        (
            "host dir (11 files)",
            WorkspaceSource::HostDir(host.path().to_path_buf()),
        ),
    ] {
        let plan = loop_plan(source, cap, state.path());
        let mut prepare = Vec::new();
        let mut end = Vec::new();
        let mut parts = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let vol = WorkspaceVolume::prepare(&plan).unwrap();
            prepare.push(t.elapsed().as_micros() as u64);
            parts.push(vol.timings());
            fs::write(vol.mount_source().unwrap().join("out.txt"), "x").unwrap();
            let t = Instant::now();
            vol.commit().unwrap();
            end.push(t.elapsed().as_micros() as u64);
        }
        println!(
            "{label}: prepare median {} us (image {} + loop {} + mount {} + scan {} + copy-in {}), commit+release median {} us",
            median(prepare),
            median(parts.iter().map(|p| p.image_us).collect()),
            median(parts.iter().map(|p| p.loop_us).collect()),
            median(parts.iter().map(|p| p.mount_us).collect()),
            median(parts.iter().map(|p| p.scan_us).collect()),
            median(parts.iter().map(|p| p.copy_in_us).collect()),
            median(end),
        );
    }
    let plan = loop_plan(WorkspaceSource::Throwaway, cap, state.path());
    let mut discard = Vec::new();
    for _ in 0..30 {
        let vol = WorkspaceVolume::prepare(&plan).unwrap();
        let t = Instant::now();
        vol.discard().unwrap();
        discard.push(t.elapsed().as_micros() as u64);
    }
    println!("throwaway discard median {} us", median(discard));
}

// ----------------------------------------------------------------------------------------------
// Canary files planted after copy-in (any user).

fn plant(p: &Pair, snap: &mut tree::Snapshot, rel: &str, text: &str) -> Result<(), PlantError> {
    cordon_sandbox::workspace::plant::plant(
        dirfd(&p.vol).as_fd(),
        Path::new(rel),
        text.as_bytes(),
        None,
        snap,
    )
}

#[test]
fn a_planted_canary_file_is_never_committed_and_its_made_directory_leaves_no_trace() {
    let p = pair();
    fs::write(p.host.join("code.py"), "print(1)").unwrap();
    let (mut snap, _) = copy_in(&p);
    plant(&p, &mut snap, ".aws/credentials", "[default]\n").unwrap();
    plant(&p, &mut snap, ".env", "API_KEY=x\n").unwrap();
    plant(&p, &mut snap, "deploy/keys/id_ed25519", "key\n").unwrap();
    assert_eq!(
        fs::read_to_string(p.vol.join(".aws/credentials")).unwrap(),
        "[default]\n"
    );
    // Shaped like real credential files: the owner's alone.
    assert_eq!(
        fs::metadata(p.vol.join(".env")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(
        fs::metadata(p.vol.join("deploy/keys")).unwrap().mode() & 0o7777,
        0o700
    );
    assert!(snap.is_reserved(Path::new(".env")));
    // The sandbox works next to them.
    fs::write(p.vol.join("out.txt"), "result").unwrap();
    let stats = commit(&p, &snap);
    assert_eq!(
        stats.skipped,
        vec![],
        "untouched canaries are left out silently"
    );
    assert_eq!(
        fs::read_to_string(p.host.join("out.txt")).unwrap(),
        "result"
    );
    let mut left: Vec<String> = fs::read_dir(&p.host)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["code.py", "out.txt"]);
}

#[test]
fn a_canary_path_the_sandbox_rewrote_or_replaced_is_not_committed_and_is_reported() {
    let p = pair();
    let (mut snap, _) = copy_in(&p);
    plant(&p, &mut snap, ".env", "API_KEY=canary\n").unwrap();
    plant(&p, &mut snap, ".aws/credentials", "[default]\n").unwrap();
    plant(&p, &mut snap, ".netrc", "machine x\n").unwrap();
    // Rewritten in place, replaced by a directory, and a real file next to a canary.
    fs::write(p.vol.join(".env"), "API_KEY=mine\n").unwrap();
    fs::remove_file(p.vol.join(".netrc")).unwrap();
    fs::create_dir(p.vol.join(".netrc")).unwrap();
    fs::write(p.vol.join(".netrc/inside"), "x").unwrap();
    fs::write(p.vol.join(".aws/config"), "[default]\nregion = x\n").unwrap();
    let stats = commit(&p, &snap);
    let mut skipped: Vec<(String, String)> = stats
        .skipped
        .iter()
        .map(|s| (s.path.display().to_string(), s.reason.clone()))
        .collect();
    skipped.sort();
    let reason = "a canary file of this session: not committed".to_string();
    assert_eq!(
        skipped,
        [
            (".env".to_string(), reason.clone()),
            (".netrc".to_string(), reason)
        ]
    );
    assert!(!p.host.join(".env").exists());
    assert!(!p.host.join(".netrc").exists());
    // The directory made for a canary holds something of the sandbox's own: it stays, the
    // canary does not.
    assert_eq!(
        fs::read_to_string(p.host.join(".aws/config")).unwrap(),
        "[default]\nregion = x\n"
    );
    assert!(!p.host.join(".aws/credentials").exists());
}

#[test]
fn planting_never_clobbers_or_writes_through_what_the_workspace_already_has() {
    let p = pair();
    let outside = tempfile::tempdir().unwrap();
    fs::write(p.host.join(".env"), "REAL=1\n").unwrap();
    symlink(outside.path(), p.host.join(".ssh")).unwrap();
    fs::write(p.host.join(".aws"), "not a dir").unwrap();
    symlink("/etc/passwd", p.host.join(".netrc")).unwrap();
    let (mut snap, _) = copy_in(&p);
    let occupied = |r: Result<(), PlantError>| match r {
        Err(PlantError::Occupied { path, what }) => (path.display().to_string(), what),
        other => panic!("expected Occupied, got {other:?}"),
    };
    assert_eq!(
        occupied(plant(&p, &mut snap, ".env", "x")),
        (".env".into(), "a file")
    );
    assert_eq!(
        occupied(plant(&p, &mut snap, ".ssh/id_rsa", "x")),
        (".ssh".into(), "a symlink")
    );
    assert_eq!(
        occupied(plant(&p, &mut snap, ".aws/credentials", "x")),
        (".aws".into(), "a file")
    );
    assert_eq!(
        occupied(plant(&p, &mut snap, ".netrc", "x")),
        (".netrc".into(), "a symlink")
    );
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(fs::read_to_string(p.vol.join(".env")).unwrap(), "REAL=1\n");
    assert!(!snap.is_reserved(Path::new(".env")));
    // The host's own file is committed as usual: the sandbox's change to it reaches the host.
    fs::write(p.vol.join(".env"), "REAL=2\n").unwrap();
    commit(&p, &snap);
    assert_eq!(fs::read_to_string(p.host.join(".env")).unwrap(), "REAL=2\n");
}

#[test]
fn plant_refuses_paths_that_are_not_plain_names_before_touching_anything() {
    let p = pair();
    let (mut snap, _) = copy_in(&p);
    for bad in [
        "../escape",
        "/etc/cordon-canary",
        "a/../../b",
        "./x",
        "a//b",
        "",
    ] {
        assert!(
            matches!(plant(&p, &mut snap, bad, "x"), Err(PlantError::BadPath(_))),
            "{bad:?}"
        );
    }
    assert_eq!(fs::read_dir(&p.vol).unwrap().count(), 0);
    assert!(!p.vol.parent().unwrap().join("escape").exists());
}

#[test]
fn a_directory_the_host_turned_into_a_file_during_the_session_is_left_alone() {
    let p = pair();
    let (mut snap, _) = copy_in(&p);
    plant(&p, &mut snap, ".aws/credentials", "[default]\n").unwrap();
    fs::write(p.vol.join(".aws/config"), "x").unwrap();
    // Meanwhile, on the host.
    fs::write(p.host.join(".aws"), "host file").unwrap();
    let stats = commit(&p, &snap);
    assert_eq!(
        fs::read_to_string(p.host.join(".aws")).unwrap(),
        "host file"
    );
    assert_eq!(stats.skipped.len(), 1, "{:?}", stats.skipped);
    assert!(stats.skipped[0].reason.contains("made for a canary file"));
}

// ----------------------------------------------------------------------------------------------
// Spare volumes (`spares.rs`): made by a session's teardown, each used by one later session.

use cordon_sandbox::workspace::spares;

/// The spare files of `cap` under `state`, as `(loop index, path)`.
fn spares_of(state: &Path, cap: u64) -> Vec<(u32, PathBuf)> {
    let dir = state.join("volumes/spares").join(cap.to_string());
    let mut out: Vec<(u32, PathBuf)> = fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let index = name.strip_suffix(".img")?.split_once('-')?.0.parse().ok()?;
                    Some((index, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn a_spare_is_used_by_exactly_one_session_and_its_device_is_detached_at_release() {
    if !have_loop_volumes("a_spare_is_used_by_exactly_one_session") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    // A first session builds its own volume; its teardown leaves PER_CAP spares.
    let first = WorkspaceVolume::prepare(&loop_plan(WorkspaceSource::Throwaway, cap, state.path()))
        .unwrap();
    assert!(!first.timings().spare);
    fs::write(
        first.mount_source().unwrap().join("secret"),
        "first session",
    )
    .unwrap();
    first.discard().unwrap();
    let report = spares::replenish(state.path(), cap).unwrap();
    assert_eq!(report.made, spares::PER_CAP);
    let made = spares_of(state.path(), cap);
    assert_eq!(made.len(), spares::PER_CAP);
    // Bound (without autoclear: nothing holds them), never mounted.
    for (index, _) in &made {
        assert!(mounts_mentioning(&format!(" {} ", loop_major_minor(*index))).is_empty());
        assert_eq!(
            fs::read_to_string(format!("/sys/block/loop{index}/loop/autoclear"))
                .unwrap()
                .trim(),
            "0"
        );
    }
    // Two sessions take one each; a third finds none and builds its own.
    let mut used = Vec::new();
    let mut volumes = Vec::new();
    for _ in 0..spares::PER_CAP {
        let v = WorkspaceVolume::prepare(&loop_plan(WorkspaceSource::Throwaway, cap, state.path()))
            .unwrap();
        assert!(v.timings().spare);
        used.push(v.loop_index().unwrap());
        // A spare is a fresh copy of the template: nothing of an earlier session is in it.
        assert_eq!(fs::read_dir(v.mount_source().unwrap()).unwrap().count(), 0);
        volumes.push(v);
    }
    used.sort();
    assert_eq!(used, made.iter().map(|(i, _)| *i).collect::<Vec<_>>());
    assert!(spares_of(state.path(), cap).is_empty());
    let third = WorkspaceVolume::prepare(&loop_plan(WorkspaceSource::Throwaway, cap, state.path()))
        .unwrap();
    assert!(!third.timings().spare);
    // The cap still holds on a spare.
    let v = &volumes[0];
    let root = v.root().unwrap().as_raw_fd();
    let out = run_as_sandbox_user(
        root,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/proc/self/fd/3/fill bs=1M count=64 2>&1; true",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("No space left on device"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Released: every device detached, no image left under the state dir.
    for v in volumes {
        v.discard().unwrap();
    }
    third.discard().unwrap();
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
    let left: Vec<_> = fs::read_dir(state.path().join("volumes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_spare_whose_device_now_serves_another_file_is_never_mounted() {
    if !have_loop_volumes("a_spare_whose_device_now_serves_another_file") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    spares::replenish(state.path(), cap).unwrap();
    let made = spares_of(state.path(), cap);
    // Simulate a reboot or an administrator: both devices are freed, one is rebound to an
    // unrelated file (say, someone else's disk image).
    let other_dir = state_dir();
    let other = other_dir.path().join("someone-elses.img");
    File::create(&other).unwrap().set_len(32 * MIB).unwrap();
    for (index, _) in &made {
        let st = Command::new("losetup")
            .args(["-d", &format!("/dev/loop{index}")])
            .status()
            .unwrap();
        assert!(st.success());
    }
    // (Tests run in parallel: if another test's volume took the freed device first, that is
    // the same situation — the device serves a file that is not the spare.)
    let (victim, _) = made[0];
    let ours = Command::new("losetup")
        .args([&format!("/dev/loop{victim}"), other.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    let v = WorkspaceVolume::prepare(&loop_plan(WorkspaceSource::Throwaway, cap, state.path()))
        .unwrap();
    // Neither spare was usable: the volume was built afresh.
    assert!(!v.timings().spare);
    if ours {
        // The unrelated device is untouched, and not this session's.
        assert_ne!(v.loop_index(), Some(victim));
        assert!(
            fs::read_to_string(format!("/sys/block/loop{victim}/loop/backing_file"))
                .unwrap()
                .starts_with(other.to_str().unwrap())
        );
    }
    // The dead spares are gone.
    assert!(spares_of(state.path(), cap).is_empty());
    v.discard().unwrap();
    if ours {
        let _ = Command::new("losetup")
            .args(["-d", &format!("/dev/loop{victim}")])
            .status();
    }
}

#[test]
fn sessions_racing_for_spares_never_share_one() {
    if !have_loop_volumes("sessions_racing_for_spares_never_share_one") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    spares::replenish(state.path(), cap).unwrap();
    let path = state.path().to_path_buf();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                WorkspaceVolume::prepare(&loop_plan(WorkspaceSource::Throwaway, cap, &path))
                    .unwrap()
            })
        })
        .collect();
    let volumes: Vec<WorkspaceVolume> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let from_spares = volumes.iter().filter(|v| v.timings().spare).count();
    assert_eq!(from_spares, spares::PER_CAP);
    let mut indexes: Vec<u32> = volumes.iter().map(|v| v.loop_index().unwrap()).collect();
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), 6, "two sessions got the same device");
    for v in volumes {
        v.discard().unwrap();
    }
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
}

#[test]
fn old_spares_are_released_by_the_next_replenish_and_all_by_cleanup() {
    if !have_loop_volumes("old_spares_are_released") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    spares::replenish(state.path(), cap).unwrap();
    let before = spares_of(state.path(), cap);
    // Age one spare past MAX_AGE.
    let old = &before[0].1;
    let when = std::time::SystemTime::now() - spares::MAX_AGE - Duration::from_secs(60);
    File::options()
        .write(true)
        .open(old)
        .unwrap()
        .set_modified(when)
        .unwrap();
    let report = spares::replenish(state.path(), cap).unwrap();
    assert_eq!((report.released, report.made), (1, 1));
    let after = spares_of(state.path(), cap);
    assert_eq!(after.len(), spares::PER_CAP);
    assert!(!after.iter().any(|(_, p)| p == old));
    // Its device went back (or serves a new spare: then under a new name).
    assert!(loops_under(state.path())
        .iter()
        .all(|(_, b)| !b.starts_with(old.to_str().unwrap())));
    // `cordon doctor`'s cleanup releases every spare.
    let report = cleanup_stale(state.path()).unwrap();
    assert_eq!(report.spares_released, spares::PER_CAP);
    assert!(spares_of(state.path(), cap).is_empty());
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
}

/// Binds `image` to a free loop device without autoclear (`LOOP_SET_FD`), the way a spare is
/// bound, and closes every descriptor: the device stays bound until someone detaches it.
fn bind_without_autoclear(image: &Path) -> u32 {
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LOOP_SET_FD: libc::c_ulong = 0x4C00;
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .unwrap();
    let img = File::options().read(true).write(true).open(image).unwrap();
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns an index or -1.
        let index = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        assert!(index >= 0, "{}", std::io::Error::last_os_error());
        let dev = File::options()
            .read(true)
            .write(true)
            .open(format!("/dev/loop{index}"))
            .unwrap();
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor, which is open.
        let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, img.as_raw_fd()) };
        if rc == 0 {
            return index as u32;
        }
        // EBUSY: another process bound it first.
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EBUSY)
        );
    }
    panic!("no free loop device");
}

fn backing_of(index: u32) -> String {
    fs::read_to_string(format!("/sys/block/loop{index}/loop/backing_file"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

#[test]
fn a_spare_whose_maker_died_before_naming_it_is_released_and_one_being_made_is_left_alone() {
    if !have_loop_volumes("a_spare_whose_maker_died_before_naming_it") {
        return;
    }
    let state = state_dir();
    let cap = 32 * MIB;
    // What a teardown of another cap left when it was SIGKILLed between binding a new spare
    // and naming it: the staged copy, no lock on it, its device bound without autoclear.
    let dir = fs::canonicalize(state.path())
        .unwrap()
        .join("volumes/spares")
        .join((48 * MIB).to_string());
    fs::create_dir_all(&dir).unwrap();
    let staged = |name: &str| {
        let path = dir.join(name);
        let f = File::create_new(&path).unwrap();
        f.set_len(4 * MIB).unwrap();
        (f, path)
    };
    let (orphan_file, orphan) = staged("staging-00aa11bb22cc33dd.img");
    drop(orphan_file);
    let orphan_dev = bind_without_autoclear(&orphan);
    // A teardown of that cap making a spare right now: it holds the staged file's lock.
    let (making_file, making) = staged("staging-44ee55ff66007788.img");
    let making_lock = nix::fcntl::Flock::lock(making_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let making_dev = bind_without_autoclear(&making);
    assert_eq!(backing_of(orphan_dev), orphan.display().to_string());

    // The next teardown (of any cap) releases the orphan: device detached, file deleted ...
    let report = spares::replenish(state.path(), cap).unwrap();
    assert!(report.released >= 1, "{report:?}");
    assert!(!orphan.exists(), "the staged file survived");
    assert!(
        !backing_of(orphan_dev).starts_with(&orphan.display().to_string()),
        "loop{orphan_dev} is still bound to the dead maker's file"
    );
    // ... and leaves the one being made as it is.
    assert!(making.exists());
    assert_eq!(backing_of(making_dev), making.display().to_string());

    // Once its maker is gone too, `cordon doctor`'s cleanup releases it and every spare.
    drop(making_lock);
    let report = cleanup_stale(state.path()).unwrap();
    assert!(report.spares_released > spares::PER_CAP, "{report:?}");
    assert!(!making.exists());
    assert!(fs::read_dir(&dir).unwrap().next().is_none());
    assert!(wait_until(Duration::from_secs(2), || loops_under(
        state.path()
    )
    .is_empty()));
}

/// 520 linked pairs under `a/` fill the commit's relink table (512), then `z/big` (1 MiB) gets
/// 15 more names, each of which the commit must copy.
fn many_names_for_one_file(vol: &Path) {
    fs::create_dir(vol.join("a")).unwrap();
    fs::create_dir(vol.join("z")).unwrap();
    for i in 0..520 {
        fs::write(vol.join(format!("a/l{i}")), "x").unwrap();
        fs::hard_link(vol.join(format!("a/l{i}")), vol.join(format!("a/l{i}b"))).unwrap();
    }
    fs::write(vol.join("z/big"), vec![7u8; 1 << 20]).unwrap();
    for i in 0..15 {
        fs::hard_link(vol.join("z/big"), vol.join(format!("z/big{i}"))).unwrap();
    }
}

#[test]
fn a_commit_writes_no_more_file_data_than_its_budget() {
    let p = pair();
    let (snap, _) = copy_in(&p);
    many_names_for_one_file(&p.vol);
    let budget = 4 << 20;
    let stats = tree::commit_tree(
        dirfd(&p.vol).as_fd(),
        dirfd(&p.host).as_fd(),
        &snap,
        false,
        budget,
    )
    .unwrap();
    assert!(stats.bytes_written <= budget, "{stats:?}");
    assert!(p.host.join("z/big").is_file());
    let skipped: Vec<_> = stats
        .skipped
        .iter()
        .filter(|s| s.reason.contains("workspace cap of 4194304 bytes"))
        .collect();
    assert!(skipped.len() >= 12, "{:?}", stats.skipped);
    // Control: without a budget every name is a copy, so the multiplication is real.
    let p = pair();
    let (snap, _) = copy_in(&p);
    many_names_for_one_file(&p.vol);
    let stats = commit(&p, &snap);
    assert!(stats.bytes_written >= 16 << 20, "{stats:?}");
}
