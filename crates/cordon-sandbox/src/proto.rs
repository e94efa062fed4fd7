//! Messages between the supervisor and the sandbox's init over their SOCK_SEQPACKET pair.
//!
//! Guarantees: one message per datagram, JSON-encoded, at most [`MAX_MESSAGE`] bytes; file
//! descriptors travel only with [`ToSupervisor::GatewaySockets`], [`ToSupervisor::WorkspaceRoot`]
//! and [`ToInit::WorkspaceVolume`]. The sandboxed command never
//! holds this socket: it is close-on-exec and closed before `exec`.

use serde::{Deserialize, Serialize};

/// CLOCK_MONOTONIC in nanoseconds: comparable across the supervisor and the sandbox.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Upper bound on an encoded message.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// From the supervisor to the init.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToInit {
    /// The id maps and cgroup are in place: go on.
    Go,
    /// The workspace volume handed over is filled: go on.
    WorkspaceReady,
    /// The init is in the session's cgroup: it may start the command.
    CgroupReady,
    /// The workspace volume, a detached mount, follows as SCM_RIGHTS (plan
    /// `WorkspaceMount::Detached`): the supervisor prepares it while the init mounts the rest.
    WorkspaceVolume,
}

/// From the sandbox (init or the command's process before `exec`) to the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToSupervisor {
    /// A set-up step failed; the sandbox is exiting with status 125.
    SetupFailed { layer: String, message: String },
    /// The layers applied to the command, sent just before `exec`.
    Applied {
        landlock_abi: u32,
        landlock_enforced: bool,
        seccomp: bool,
        no_new_privs: bool,
        /// CLOCK_MONOTONIC marks (ns) of the set-up steps, for `CORDON_TIMING`.
        marks: Vec<(String, u64)>,
    },
    /// `exec` of the command failed with this errno.
    ExecFailed { errno: i32, message: String },
    /// A second mount of the sandbox's tmpfs workspace follows as SCM_RIGHTS, for the
    /// supervisor to fill from the host directory.
    WorkspaceRoot,
    /// The gateway's listening sockets follow as SCM_RIGHTS, in the order named.
    GatewaySockets { names: Vec<String> },
    /// The command's seccomp notification listener follows as SCM_RIGHTS (a filter with
    /// `Notify` rules); the command's process has closed its own copy before `exec`.
    SeccompListener,
    /// The command's process ended. `full` names the writable mounts that were out of space
    /// when it did (`/workspace`, `/tmp`, `/dev/shm`).
    Exited {
        status: ExitStatus,
        full: Vec<String>,
        /// Processes other than the init still alive (not zombies) when the command's main
        /// process ended: something that tries to outlive its session. They die with the init.
        #[serde(default)]
        lingering: u32,
    },
}

/// How the command's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn as_shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Encodes a message; encoding our own plain enums cannot fail, but an error is reported rather
/// than unwrapped.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap_or_default()
}

/// Decodes a message.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}
