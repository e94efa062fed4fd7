//! Spare volumes: after a session, its teardown leaves a few volumes of the same cap ready for
//! the next session — a fresh copy of the template already bound to a loop device — so the next
//! start skips the copy and `LOOP_CONFIGURE`. Binding a loop device freezes its request queue,
//! which waits for an RCU grace period: 0.4-5 ms when sessions follow each other, more on an
//! idle host (docs/benchmarks.md). Mounting the spare is all that is left on the start's path.
//!
//! Guarantees:
//! - A spare is a copy of the template that was never mounted: nothing any sandbox wrote can
//!   reach another session. Each spare is used at most once: claiming it is an atomic `rename`
//!   out of the spares directory, and the claimer checks that the loop device named by the
//!   spare is still bound to exactly that file (inode and path) before it mounts anything, so a
//!   device that was freed and reused by someone else (after a reboot, or a `losetup -d`) is
//!   never mounted as a workspace.
//! - Spares are bound without autoclear (nothing holds them open between sessions, and setting
//!   autoclear later waits for another grace period), so the claimer detaches its device itself
//!   when the session's volume is released. Every file a spare operation creates has a name
//!   the cleanup recognises, so nothing a killed process leaves is lost: a spare is made as
//!   `spares/<cap>/staging-<random>.img`, locked by its maker from creation until it is bound
//!   and renamed to `<loop index>-<random>.img`; a claimed one is `claimed-<random>.img`,
//!   locked by its claimer. What a killed maker or claimer leaves (a staged or claimed file no
//!   live process holds a lock on, the device bound to it, or a device still bound to a
//!   claimed or staged image that is already unlinked) and spares older than [`MAX_AGE`] are
//!   released by the next [`replenish`] of any cap; `cleanup_stale` (`cordon doctor`)
//!   releases every spare. A file still locked is in use and left alone. A spare whose device
//!   is gone (a reboot) is deleted when it is found.
//! - At most [`PER_CAP`] spares exist per cap. Each costs one idle loop device and the
//!   template's allocated blocks on the host disk (about a megabyte).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;

use super::{image, loopdev, WorkspaceError};

/// Spares kept per cap: two, so that back-to-back sessions find one even while the previous
/// session's teardown is still making its replacement.
pub const PER_CAP: usize = 2;
/// A spare unused for this long is released (its loop device and disk space go back).
pub const MAX_AGE: Duration = Duration::from_secs(600);
/// Name prefix of a claimed spare's image while its claimer sets it up.
const CLAIMED_PREFIX: &str = "claimed-";
/// Name prefix of a spare being made (`staging-<random>.img` in its cap's directory), from its
/// creation until it is bound and renamed to its final name.
const STAGING_PREFIX: &str = "staging-";

/// `<volumes>/spares/<cap>`.
fn cap_dir(volumes: &Path, cap_bytes: u64) -> PathBuf {
    volumes.join("spares").join(cap_bytes.to_string())
}

/// A spare's file name: `<loop index>-<random>.img`.
fn parse_name(name: &str) -> Option<(u32, &str)> {
    let stem = name.strip_suffix(".img")?;
    let (index, nonce) = stem.split_once('-')?;
    if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((index.parse().ok()?, nonce))
}

/// Whether `name` is a spare being made: `staging-<random>.img`.
fn is_staging_name(name: &str) -> bool {
    name.strip_prefix(STAGING_PREFIX)
        .and_then(|rest| rest.strip_suffix(".img"))
        .is_some_and(|nonce| !nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn random_nonce() -> Option<String> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    (n == bytes.len() as isize).then(|| bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A spare taken for a session: its device, held open, and its (already unlinked) image.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub device: loopdev::LoopDevice,
    pub image: Flock<File>,
    /// The image's path at the time it was bound-checked (unlinked since).
    pub path: PathBuf,
}

/// Takes a spare of `cap_bytes` if there is one. `None` when there is none (or none that is
/// still good): the caller builds a volume the slow way. Never fails otherwise: a spare that
/// cannot be used is deleted and the next one tried.
pub(crate) fn claim(volumes: &Path, cap_bytes: u64) -> Option<Claimed> {
    let dir = cap_dir(volumes, cap_bytes);
    let entries = std::fs::read_dir(&dir).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((index, nonce)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        let claimed = volumes.join(format!("{CLAIMED_PREFIX}{nonce}.img"));
        // Atomic: of several sessions racing for this spare, exactly one gets it.
        if std::fs::rename(entry.path(), &claimed).is_err() {
            continue;
        }
        match verify(&claimed, index) {
            Some((image, device)) => {
                let _ = std::fs::remove_file(&claimed);
                return Some(Claimed {
                    device,
                    image,
                    path: claimed,
                });
            }
            None => {
                // Not ours any more (a reboot freed the device): the file is just disk space.
                let _ = std::fs::remove_file(&claimed);
            }
        }
    }
    None
}

/// The image, locked, and its device, when `loop<index>` is bound to exactly this file.
fn verify(path: &Path, index: u32) -> Option<(Flock<File>, loopdev::LoopDevice)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let image = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
    let meta = image.metadata().ok()?;
    let device = loopdev::LoopDevice::open(index).ok()?;
    let ino = device.backing_inode().ok()?;
    // sysfs names the backing file by its current path (after our rename).
    let backing = loopdev::backing_file(index)?;
    let expected = std::fs::canonicalize(path).ok()?;
    (ino == meta.ino() && backing == expected.display().to_string()).then_some((image, device))
}

/// What [`replenish`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplenishReport {
    /// Spares made now.
    pub made: usize,
    /// Spares and claimed left-overs released (too old, orphaned, or their device gone).
    pub released: usize,
}

/// Tops the spares of `cap_bytes` up to [`PER_CAP`] and releases the stale ones; for a
/// session's teardown, after its own volume is released. Another process replenishing the
/// same cap at the same moment makes this one return at once.
pub fn replenish(state_dir: &Path, cap_bytes: u64) -> Result<ReplenishReport, WorkspaceError> {
    let mut report = ReplenishReport::default();
    super::ensure_private_dir(&state_dir.join("volumes"))?;
    let volumes = std::fs::canonicalize(state_dir.join("volumes")).map_err(|source| {
        WorkspaceError::StateDir {
            path: state_dir.join("volumes"),
            op: "resolve",
            source,
        }
    })?;
    let dir = cap_dir(&volumes, cap_bytes);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| WorkspaceError::StateDir {
            path: dir.clone(),
            op: "create spares directory",
            source,
        })?;
    let lock_path = dir.join(".lock");
    let Ok(lock_file) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&lock_path)
    else {
        return Ok(report);
    };
    let Ok(_lock) = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) else {
        return Ok(report);
    };
    report.released += release_orphans(&volumes);
    let mut live = 0;
    let now = SystemTime::now();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some((index, _)) = name.to_str().and_then(parse_name) else {
            continue;
        };
        let old = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age > MAX_AGE);
        if old || loopdev::backing_file(index).is_none() {
            if release_one(&volumes, &entry.path(), index) {
                report.released += 1;
            }
        } else {
            live += 1;
        }
    }
    let template = image::ensure_template(state_dir, cap_bytes)?;
    while live < PER_CAP {
        make_one(&template, &dir)?;
        live += 1;
        report.made += 1;
    }
    Ok(report)
}

/// Copies the template and binds it to a free loop device (no autoclear); the result is only
/// visible under its final name once it is bound. Until then it is `staging-<nonce>.img`,
/// locked by this process: if the process dies (or errors) midway, [`release_orphans`] finds
/// the unlocked file and detaches the device bound to it.
fn make_one(template: &Path, dir: &Path) -> Result<(), WorkspaceError> {
    let Some(nonce) = random_nonce() else {
        return Err(WorkspaceError::Loop {
            op: "getrandom for a spare's name".into(),
            errno: nix::errno::Errno::EIO,
        });
    };
    let staged =
        image::clone_template_to(template, dir.join(format!("{STAGING_PREFIX}{nonce}.img")))?;
    let bound = loopdev::attach_persistent(&staged.file, &staged.path);
    let device = match bound {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&staged.path);
            return Err(e);
        }
    };
    let final_path = dir.join(format!("{}-{nonce}.img", device.index));
    if let Err(source) = std::fs::rename(&staged.path, &final_path) {
        // Detach before unlinking: dying in between leaves a staged file with no device,
        // never a device bound to a file nobody can find by name.
        let _ = loopdev::clear(device.index);
        let _ = std::fs::remove_file(&staged.path);
        return Err(WorkspaceError::Image {
            path: final_path,
            op: "name the spare",
            source,
        });
    }
    Ok(())
}

/// Claims the spare at `path` and detaches its device, if that device is still bound to it.
fn release_one(volumes: &Path, path: &Path, index: u32) -> bool {
    let Some(nonce) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_name)
        .map(|(_, n)| n.to_string())
    else {
        return false;
    };
    let claimed = volumes.join(format!("{CLAIMED_PREFIX}{nonce}.img"));
    if std::fs::rename(path, &claimed).is_err() {
        return false;
    }
    if let Some((_image, device)) = verify(&claimed, index) {
        drop(device);
        let _ = loopdev::clear(index);
    }
    let _ = std::fs::remove_file(&claimed);
    true
}

/// Deletes the staged spare at `path` if no live process holds its lock (its maker died or
/// gave up), after detaching any loop device still bound to it. A maker still at work holds
/// the lock from the file's creation to its rename, so it is never disturbed; a file renamed
/// to its final name after we opened it is recognised by its inode and left alone.
fn release_staged(path: &Path) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    let Ok(locked) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
        return false; // its maker is alive
    };
    let Ok(meta) = locked.metadata() else {
        return false;
    };
    // The maker may have renamed it to a live spare between our open and our lock.
    let still_here = std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
    if !still_here {
        return false;
    }
    let resolved = path.display().to_string();
    for (index, backing) in loopdev::bound_devices() {
        let same_inode = loopdev::LoopDevice::open(index)
            .and_then(|d| d.backing_inode())
            .is_ok_and(|i| i == meta.ino());
        if backing == resolved && same_inode {
            let _ = loopdev::clear(index);
        }
    }
    std::fs::remove_file(path).is_ok()
}

/// What dead claimers and dead makers left: claimed spares not yet unlinked (no lock held;
/// their devices are detached if still theirs, the files deleted), devices of claimed spares
/// no session holds any more, and staged spares of every cap whose maker is gone (see
/// [`release_staged`]). Returns how many.
fn release_orphans(volumes: &Path) -> usize {
    let mut released = 0;
    let spares = volumes.join("spares");
    for cap in std::fs::read_dir(&spares).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(cap.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let staged = entry.file_name().to_str().is_some_and(is_staging_name);
            if staged && release_staged(&entry.path()) {
                released += 1;
            }
        }
    }
    // A device bound to a staged file that is already unlinked: its maker died between
    // unlinking and detaching, or a cleanup deleted the file while the maker was still
    // creating it. A staged image is never mounted and, once unlinked, never becomes a
    // spare, so the device serves nobody.
    let staging_root = format!("{}/", spares.display());
    for (index, backing) in loopdev::bound_devices() {
        let Some(rest) = backing.strip_prefix(&staging_root) else {
            continue;
        };
        let Some(file) = rest.strip_suffix(" (deleted)") else {
            continue;
        };
        let staged = file
            .split_once('/')
            .is_some_and(|(cap, name)| !cap.contains('/') && is_staging_name(name));
        if staged {
            let _ = loopdev::clear(index);
            if loopdev::backing_file(index).is_none() {
                released += 1;
            }
        }
    }
    for entry in std::fs::read_dir(volumes).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(CLAIMED_PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        let Ok(locked) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue; // its claimer is alive
        };
        let ino = locked.metadata().map(|m| m.ino()).ok();
        let resolved = path.display().to_string();
        for (index, backing) in loopdev::bound_devices() {
            let same_inode = loopdev::LoopDevice::open(index)
                .and_then(|d| d.backing_inode())
                .is_ok_and(|i| Some(i) == ino);
            if backing.starts_with(&resolved) && same_inode {
                let _ = loopdev::clear(index);
            }
        }
        if std::fs::remove_file(&path).is_ok() {
            released += 1;
        }
    }
    // Devices of claimed spares whose session is gone (killed with SIGKILL: nothing detached
    // them, and they have no autoclear). `LOOP_CLR_FD` detaches an idle one; on one a live
    // session still has mounted it only sets autoclear, which its own release tolerates.
    let claimed = format!("{}/{CLAIMED_PREFIX}", volumes.display());
    for (index, backing) in loopdev::bound_devices() {
        if backing.starts_with(&claimed) && backing.ends_with(" (deleted)") {
            let _ = loopdev::clear(index);
            if loopdev::backing_file(index).is_none() {
                released += 1;
            }
        }
    }
    released
}

/// Releases every spare under `volumes` (for `cleanup_stale`). Returns how many.
pub(crate) fn release_all(volumes: &Path) -> usize {
    let mut released = release_orphans(volumes);
    for cap in std::fs::read_dir(volumes.join("spares"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for entry in std::fs::read_dir(cap.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name();
            if let Some((index, _)) = name.to_str().and_then(parse_name) {
                if release_one(volumes, &entry.path(), index) {
                    released += 1;
                }
            }
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spare_names_carry_the_loop_index_and_a_hex_nonce() {
        assert_eq!(parse_name("7-00ff.img"), Some((7, "00ff")));
        assert_eq!(
            parse_name("12-abcdef0123456789.img"),
            Some((12, "abcdef0123456789"))
        );
        for bad in [
            "7-.img",
            "x-00ff.img",
            "7-00ff",
            "7-../x.img",
            ".lock",
            "claimed-00ff.img",
            "7-00ff.img.tmp",
            "-1-00.img",
            "staging-00ff.img",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let a = random_nonce().unwrap_or_default();
        assert_eq!(a.len(), 16);
        assert_ne!(Some(a), random_nonce());
    }

    #[test]
    fn staged_names_are_recognised_and_never_taken_for_spares() {
        assert!(is_staging_name("staging-00ff.img"));
        assert!(is_staging_name("staging-abcdef0123456789.img"));
        for bad in [
            "staging-.img",
            "staging-00ff",
            "staging-0g.img",
            "staging-../x.img",
            "7-00ff.img",
            "claimed-00ff.img",
            ".lock",
            "123-1795426427577238120-0.img",
        ] {
            assert!(!is_staging_name(bad), "{bad}");
        }
    }
}
