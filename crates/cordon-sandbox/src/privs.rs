//! Ids, capabilities, `no_new_privs` and rlimits.
//!
//! Guarantees: after [`drop_everything`] the calling process has empty effective, permitted,
//! inheritable, ambient and bounding capability sets and `no_new_privs` set, so neither `exec`
//! of a setuid/file-capability binary nor anything else can give it a capability back.

use std::io;

use caps::CapSet;
use thiserror::Error;

use crate::plan::{Rlimits, SANDBOX_GID, SANDBOX_UID};

/// A failed privilege step.
#[derive(Debug, Error)]
pub enum PrivError {
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{step}: {source}")]
    Caps {
        step: &'static str,
        #[source]
        source: caps::errors::CapsError,
    },
}

fn caps_err(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivError {
    move |source| PrivError::Caps { step, source }
}

fn check(rc: libc::c_int, step: &'static str) -> Result<(), PrivError> {
    if rc < 0 {
        Err(PrivError::Sys {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Switches the init to the sandbox user while keeping its capabilities in its own user
/// namespace. When cordon runs as host root, the init starts with host uid 0 (unmapped inside)
/// and host root's supplementary groups: both are dropped here, so not even the set-up stage
/// touches host files as root.
pub fn become_sandbox_user(rootful: bool) -> Result<(), PrivError> {
    if rootful {
        // SAFETY: setgroups with an empty list reads no memory.
        let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
        check(rc, "setgroups")?;
    }
    // SAFETY: plain syscalls with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    check(rc, "keepcaps")?;
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID) };
    check(rc, "setresgid")?;
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID) };
    check(rc, "setresuid")?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err("read-caps"))?;
    caps::set(None, CapSet::Effective, &permitted).map_err(caps_err("restore-caps"))?;
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    check(rc, "keepcaps")?;
    Ok(())
}

/// Drops every capability from every set and sets `no_new_privs`.
pub fn drop_everything() -> Result<(), PrivError> {
    // The bounding set must go first: dropping from it needs CAP_SETPCAP in the effective set.
    caps::clear(None, CapSet::Bounding).map_err(caps_err("drop-bounding"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err("drop-ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("drop-inheritable"))?;
    caps::clear(None, CapSet::Effective).map_err(caps_err("drop-effective"))?;
    caps::clear(None, CapSet::Permitted).map_err(caps_err("drop-permitted"))?;
    set_no_new_privs()
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), PrivError> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "no_new_privs")
}

/// Makes the process non-dumpable: its `/proc/PID` files become inaccessible to processes of
/// the same uid, and it cannot be ptrace-attached without CAP_SYS_PTRACE.
pub fn set_non_dumpable() -> Result<(), PrivError> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    check(rc, "dumpable")
}

/// Applies the rlimits (soft = hard, so the command cannot raise them).
pub fn apply_rlimits(r: &Rlimits) -> Result<(), PrivError> {
    for (res, value, step) in [
        (libc::RLIMIT_NOFILE, r.nofile, "rlimit-nofile"),
        (libc::RLIMIT_FSIZE, r.file_size, "rlimit-fsize"),
        (libc::RLIMIT_CORE, r.core, "rlimit-core"),
    ] {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `lim` is a valid rlimit that outlives the call.
        check(unsafe { libc::setrlimit(res, &lim) }, step)?;
    }
    Ok(())
}
