//! seccomp: the last layer, installed just before `exec` of the user's command.
//!
//! Guarantees, once [`install`] has returned `Ok` in a process:
//!
//! - Every rule of [`RULES`] whose argument condition holds makes its syscall return the rule's
//!   action (almost always `EPERM`) without the kernel ever running it. Rules are tried in table
//!   order and the first match decides; a syscall no rule matches is allowed (this is a deny-list:
//!   the namespaces, ids, capabilities and Landlock below it do the confining, this layer removes
//!   the kernel attack surface and escape hatches they leave).
//! - A syscall made through a non-native ABI (i386 `int 0x80` on x86_64, AArch32 on aarch64)
//!   kills the whole process: the table speaks native syscall numbers only, so such a syscall
//!   could not be judged.
//! - On x86_64, a syscall number with the x32 bit (`0x4000_0000`) set returns `EPERM`: x32 numbers
//!   alias native syscalls under other numbers and would slip past the table.
//! - The filter is inherited by every child and survives `execve`, and `no_new_privs` is set, so
//!   nothing the sandboxed code runs can drop it or gain privileges through a set-uid binary.
//!
//! The policy is data: [`RULES`] is a reviewed table (syscall, argument condition, action,
//! reason); [`compile`] turns a [`SeccompPlan`] into classic BPF without touching the kernel, so
//! the parent compiles before `fork` and the child only calls [`install`], which allocates
//! nothing and is async-signal-safe.
//!
//! The BPF is built here rather than with `seccompiler`: seccompiler gives a whole filter one
//! match action (we need `EPERM`, `ENOSYS` and `EAFNOSUPPORT` side by side, and per-rule actions
//! so a later "count denied syscalls" mode can change them), and it has neither a bit-test
//! condition (`CLONE_NEW*`) nor an x32 check.
//!
//! **Counting denials** ([`notify_plan`], [`install_with_listener`], [`answer_one`]): the
//! `EPERM` rules can be compiled to `SECCOMP_RET_USER_NOTIF` instead. The command's process
//! loads that filter with `SECCOMP_FILTER_FLAG_NEW_LISTENER`, passes the listener to the
//! supervisor over the set-up channel and closes its copy before `exec`; the supervisor answers
//! every notification with the rule's own errno (the syscall is never run: the answer carries
//! no `SECCOMP_USER_NOTIF_FLAG_CONTINUE`) and counts it. If nobody listens (the supervisor
//! died, or a process that loaded the filter without a listener, like the init), the kernel
//! fails the call with `ENOSYS`: still denied.
//!
//! Argument conditions compare the low 32 bits of an argument. That is exactly what the kernel
//! uses for every argument tested here: `socket`'s and `socketpair`'s family, type and protocol,
//! `ioctl`'s request and `personality`'s persona are `int`/`unsigned int` in the kernel (so
//! `ioctl(fd, TIOCSTI | 1 << 32)` is still `TIOCSTI` to the kernel, and to this filter), and the
//! `CLONE_NEW*` bits tested in `clone`'s flags all lie in the low word.

use serde::Serialize;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("cordon's seccomp filter supports x86_64 and aarch64 only");

/// What the filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Let the kernel run it.
    Allow,
    /// Fail it with this errno without running it.
    Errno(i32),
    /// Kill the whole process (every thread) with `SIGSYS`.
    KillProcess,
    /// Ask the listener (`SECCOMP_RET_USER_NOTIF`); the supervisor answers with the errno of
    /// the rule in the errno plan and counts the denial. `ENOSYS` when nobody listens.
    Notify,
}

/// What an argument condition checks, on `arg & mask` (see [`ArgCond`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cmp {
    /// `arg & mask` is one of these values.
    In(&'static [u32]),
    /// `arg & mask` is none of these values.
    NotIn(&'static [u32]),
    /// `arg & mask` is not zero: at least one bit of `mask` is set.
    AnyBitSet,
}

/// A condition on the low 32 bits of one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ArgCond {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// Bits of the argument that the comparison looks at.
    pub mask: u32,
    pub cmp: Cmp,
}

impl ArgCond {
    /// `arg` is one of `values`.
    pub const fn one_of(arg: u8, values: &'static [u32]) -> Self {
        ArgCond {
            arg,
            mask: u32::MAX,
            cmp: Cmp::In(values),
        }
    }
    /// `arg` is none of `values`.
    pub const fn none_of(arg: u8, values: &'static [u32]) -> Self {
        ArgCond {
            arg,
            mask: u32::MAX,
            cmp: Cmp::NotIn(values),
        }
    }
    /// `arg & mask` is one of `values`.
    pub const fn masked_one_of(arg: u8, mask: u32, values: &'static [u32]) -> Self {
        ArgCond {
            arg,
            mask,
            cmp: Cmp::In(values),
        }
    }
    /// `arg & mask` is none of `values`.
    pub const fn masked_none_of(arg: u8, mask: u32, values: &'static [u32]) -> Self {
        ArgCond {
            arg,
            mask,
            cmp: Cmp::NotIn(values),
        }
    }
    /// `arg & mask != 0`.
    pub const fn any_bit_set(arg: u8, mask: u32) -> Self {
        ArgCond {
            arg,
            mask,
            cmp: Cmp::AnyBitSet,
        }
    }

    /// Whether the condition holds for this argument value (the reference semantics that the
    /// compiled BPF must reproduce).
    pub fn holds(&self, arg_value: u64) -> bool {
        // Truncation is the point: the kernel reads these arguments as 32-bit values.
        let v = (arg_value as u32) & self.mask;
        match self.cmp {
            Cmp::In(values) => values.contains(&v),
            Cmp::NotIn(values) => !values.contains(&v),
            Cmp::AnyBitSet => v != 0,
        }
    }
}

/// One reviewed line of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub syscall: &'static str,
    pub nr: i64,
    /// All must hold for the rule to match; empty means always.
    pub when: &'static [ArgCond],
    pub action: Action,
    /// Why the rule exists, for the reviewer.
    #[serde(skip)]
    pub reason: &'static str,
}

impl Rule {
    /// Whether this rule matches a native syscall with these arguments.
    pub fn matches(&self, nr: i64, args: &[u64; 6]) -> bool {
        self.nr == nr
            && self
                .when
                .iter()
                .all(|c| args.get(usize::from(c.arg)).is_some_and(|a| c.holds(*a)))
    }
}

/// The architecture the filter is built for, and what counts as foreign.
struct NativeArch {
    name: &'static str,
    audit_arch: u32,
}

// AUDIT_ARCH_* from <linux/audit.h>: EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
#[cfg(target_arch = "x86_64")]
const NATIVE: NativeArch = NativeArch {
    name: "x86_64",
    audit_arch: 0xC000_003E,
};
#[cfg(target_arch = "aarch64")]
const NATIVE: NativeArch = NativeArch {
    name: "aarch64",
    audit_arch: 0xC000_00B7,
};

/// `__X32_SYSCALL_BIT`: x32 syscalls arrive with the native audit arch and this bit in `nr`.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const EPERM: Action = Action::Errno(libc::EPERM);

/// Every `CLONE_NEW*` flag that `clone(2)` accepts. `CLONE_NEWTIME` (0x80) is absent on purpose:
/// in `clone(2)` that bit belongs to the exit-signal byte (`CSIGNAL`), so `clone` cannot ask for
/// a time namespace; only `unshare` and `clone3` can, and both are refused outright.
const CLONE_NEW_MASK: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// `SOCK_TYPE_MASK`: the socket type without `SOCK_NONBLOCK | SOCK_CLOEXEC`.
const SOCK_TYPE_MASK: u32 = 0xf;

/// Personas `personality(2)` may set, and the `0xffffffff` query. The same set Docker's default
/// profile allows; it refuses `ADDR_NO_RANDOMIZE`, `READ_IMPLIES_EXEC`, `MMAP_PAGE_ZERO` and
/// foreign personas, which only weaken the sandboxed process or reach little-used kernel code.
const PERSONAS_ALLOWED: &[u32] = &[
    0x0000_0000,
    0x0000_0008,
    0x0002_0000,
    0x0002_0008,
    0xffff_ffff,
];

macro_rules! rule {
    ($name:ident => $action:expr, $reason:expr) => {
        rule!($name when &[] => $action, $reason)
    };
    ($name:ident when $when:expr => $action:expr, $reason:expr) => {
        Rule {
            syscall: stringify!($name),
            nr: sys_nr::$name,
            when: $when,
            action: $action,
            reason: $reason,
        }
    };
}

/// Syscall numbers by name, so the table can say `mount` and mean `libc::SYS_mount`.
#[allow(non_upper_case_globals)]
mod sys_nr {
    macro_rules! nrs {
        ($($name:ident => $sys:ident),* $(,)?) => { $(pub const $name: i64 = libc::$sys;)* };
    }
    nrs! {
        mount => SYS_mount, umount2 => SYS_umount2, pivot_root => SYS_pivot_root,
        move_mount => SYS_move_mount, open_tree => SYS_open_tree, fsopen => SYS_fsopen,
        fsconfig => SYS_fsconfig, fsmount => SYS_fsmount, fspick => SYS_fspick,
        mount_setattr => SYS_mount_setattr, chroot => SYS_chroot,
        unshare => SYS_unshare, setns => SYS_setns, clone => SYS_clone, clone3 => SYS_clone3,
        ptrace => SYS_ptrace, process_vm_readv => SYS_process_vm_readv,
        process_vm_writev => SYS_process_vm_writev, kcmp => SYS_kcmp,
        pidfd_getfd => SYS_pidfd_getfd,
        bpf => SYS_bpf, perf_event_open => SYS_perf_event_open, userfaultfd => SYS_userfaultfd,
        io_uring_setup => SYS_io_uring_setup, io_uring_enter => SYS_io_uring_enter,
        io_uring_register => SYS_io_uring_register,
        add_key => SYS_add_key, request_key => SYS_request_key, keyctl => SYS_keyctl,
        init_module => SYS_init_module, finit_module => SYS_finit_module,
        delete_module => SYS_delete_module, kexec_load => SYS_kexec_load,
        kexec_file_load => SYS_kexec_file_load, reboot => SYS_reboot,
        swapon => SYS_swapon, swapoff => SYS_swapoff, acct => SYS_acct, syslog => SYS_syslog,
        quotactl => SYS_quotactl, quotactl_fd => SYS_quotactl_fd,
        lookup_dcookie => SYS_lookup_dcookie, vhangup => SYS_vhangup,
        nfsservctl => SYS_nfsservctl,
        open_by_handle_at => SYS_open_by_handle_at, name_to_handle_at => SYS_name_to_handle_at,
        personality => SYS_personality, ioctl => SYS_ioctl,
        socket => SYS_socket, socketpair => SYS_socketpair,
    }
    /// `open_tree_attr(2)` (Linux 6.15), too new for the `libc` crate; one number on every arch.
    pub const open_tree_attr: i64 = 467;
    #[cfg(target_arch = "x86_64")]
    nrs! {
        _sysctl => SYS__sysctl, uselib => SYS_uselib, ustat => SYS_ustat, sysfs => SYS_sysfs, iopl => SYS_iopl,
        ioperm => SYS_ioperm, modify_ldt => SYS_modify_ldt,
    }
}

/// The reviewed deny-list, in evaluation order (first match wins within one syscall).
///
/// Adding a rule: give the reason; `cargo test` proves it is neither a duplicate nor shadowed by
/// an earlier rule, and that the compiled BPF agrees with [`Rule::matches`].
pub const RULES: &[Rule] = &[
    // --- Mounts and the root: the mount namespace was set up by cordon and must stay as it is.
    rule!(mount => EPERM, "remount or cover the read-only system dirs"),
    rule!(umount2 => EPERM, "uncover what cordon's mounts hide"),
    rule!(pivot_root => EPERM, "swap the root cordon built"),
    rule!(move_mount => EPERM, "new mount API: attach a mount"),
    rule!(open_tree => EPERM, "new mount API: clone a mount tree"),
    rule!(open_tree_attr => EPERM, "new mount API: clone a mount tree with new attributes"),
    rule!(fsopen => EPERM, "new mount API: create a filesystem context"),
    rule!(fsconfig => EPERM, "new mount API: configure a filesystem (superblock parsers)"),
    rule!(fsmount => EPERM, "new mount API: make a mount from a context"),
    rule!(fspick => EPERM, "new mount API: reconfigure an existing superblock"),
    rule!(mount_setattr => EPERM, "drop read-only/nosuid/noexec from a mount"),
    rule!(chroot => EPERM, "classic chroot escapes need a second chroot"),
    // --- Namespaces: nested user namespaces hand out capabilities over fresh kernel code.
    rule!(unshare => EPERM, "new namespaces: capabilities in a nested user namespace"),
    rule!(setns => EPERM, "join another namespace through an inherited fd"),
    rule!(clone when &[ArgCond::any_bit_set(0, CLONE_NEW_MASK)] => EPERM,
        "clone(2) with a CLONE_NEW* flag; plain fork and thread creation stay allowed"),
    // clone3(2) takes its flags in a struct in user memory, which seccomp BPF cannot read, so
    // CLONE_NEW* cannot be told apart there. ENOSYS (not EPERM) makes glibc >= 2.34, musl and Go
    // fall back to clone(2), whose flags are in a register and checked by the rule above.
    rule!(clone3 => Action::Errno(libc::ENOSYS),
        "flags out of reach of BPF; ENOSYS makes libcs fall back to clone(2)"),
    // --- Reading or steering other processes (the init, the other sandboxed processes).
    rule!(ptrace => EPERM, "debug/steer another process; also a classic seccomp bypass"),
    rule!(process_vm_readv => EPERM, "read another process's memory"),
    rule!(process_vm_writev => EPERM, "write another process's memory"),
    rule!(kcmp => EPERM, "compare kernel objects of two processes: kernel pointer-order oracle"),
    rule!(pidfd_getfd => EPERM, "steal a file descriptor from another process"),
    // --- Large kernel attack surface with a record of local privilege escalations.
    rule!(bpf => EPERM, "eBPF verifier and maps"),
    rule!(perf_event_open => EPERM, "perf events: kernel pointers and a long CVE record"),
    rule!(userfaultfd => EPERM, "stalls kernel page faults: race-window widener for exploits"),
    rule!(io_uring_setup => EPERM, "io_uring: bypasses per-syscall filtering, many CVEs"),
    rule!(io_uring_enter => EPERM, "io_uring: bypasses per-syscall filtering, many CVEs"),
    rule!(io_uring_register => EPERM, "io_uring: bypasses per-syscall filtering, many CVEs"),
    // --- Kernel keyrings are not namespaced: keys could leak between sessions.
    rule!(add_key => EPERM, "kernel keyring: not namespaced"),
    rule!(request_key => EPERM, "kernel keyring: not namespaced, can call up to userspace"),
    rule!(keyctl => EPERM, "kernel keyring: not namespaced"),
    // --- Whole-machine administration. Already refused for lack of capabilities; refused here
    // too so a capability leak alone is not enough.
    rule!(init_module => EPERM, "load a kernel module"),
    rule!(finit_module => EPERM, "load a kernel module"),
    rule!(delete_module => EPERM, "unload a kernel module"),
    rule!(kexec_load => EPERM, "replace the running kernel"),
    rule!(kexec_file_load => EPERM, "replace the running kernel"),
    rule!(reboot => EPERM, "reboot the host"),
    rule!(swapon => EPERM, "host swap configuration"),
    rule!(swapoff => EPERM, "host swap configuration"),
    rule!(acct => EPERM, "host process accounting"),
    rule!(syslog => EPERM, "kernel log: kernel addresses, host activity"),
    rule!(quotactl => EPERM, "filesystem quotas"),
    rule!(quotactl_fd => EPERM, "filesystem quotas"),
    rule!(lookup_dcookie => EPERM, "profiling interface, removed from recent kernels"),
    rule!(vhangup => EPERM, "hang up the controlling terminal"),
    rule!(nfsservctl => EPERM, "removed NFS server interface"),
    // --- File handles resolve inodes without a path: the "shocker" container escape.
    rule!(open_by_handle_at => EPERM, "open any inode of the filesystem by handle"),
    rule!(name_to_handle_at => EPERM, "make file handles for open_by_handle_at"),
    // --- Obsolete x86 interfaces nothing in a sandbox needs.
    #[cfg(target_arch = "x86_64")]
    rule!(uselib => EPERM, "obsolete a.out library loader"),
    #[cfg(target_arch = "x86_64")]
    rule!(ustat => EPERM, "obsolete filesystem statistics"),
    #[cfg(target_arch = "x86_64")]
    rule!(sysfs => EPERM, "obsolete filesystem type query"),
    #[cfg(target_arch = "x86_64")]
    rule!(_sysctl => EPERM, "removed binary sysctl"),
    #[cfg(target_arch = "x86_64")]
    rule!(iopl => EPERM, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    rule!(ioperm => EPERM, "raw I/O port access"),
    #[cfg(target_arch = "x86_64")]
    rule!(modify_ldt => EPERM, "x86 LDT: a record of kernel bugs, only Wine/DOSEMU use it"),
    // --- Arguments that matter.
    rule!(personality when &[ArgCond::none_of(0, PERSONAS_ALLOWED)] => EPERM,
        "ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO weaken the process"),
    rule!(ioctl when &[ArgCond::one_of(1, &[libc::TIOCSTI as u32, libc::TIOCLINUX as u32])]
        => EPERM,
        "TIOCSTI/TIOCLINUX push keystrokes into a terminal shared with the host"),
    rule!(socket when &[ArgCond::one_of(0, &[libc::AF_PACKET as u32])] => EPERM,
        "link-layer raw sockets"),
    rule!(socket when &[ArgCond::none_of(0, INET_OR_UNIX)]
        => Action::Errno(libc::EAFNOSUPPORT),
        "netlink, vsock, xdp, bluetooth, can, alg...: not needed, large attack surface; \
         EAFNOSUPPORT is what programs expect from a missing family"),
    rule!(socket when &[
            ArgCond::one_of(0, INET),
            ArgCond::masked_none_of(1, SOCK_TYPE_MASK, STREAM_OR_DGRAM),
        ] => EPERM,
        "raw IP (forged packets, ICMP tunnels), SOCK_PACKET, and SCTP/DCCP by type"),
    rule!(socket when &[
            ArgCond::one_of(0, INET),
            ArgCond::none_of(2, INET_PROTOCOLS),
        ] => EPERM,
        "SCTP, DCCP, UDP-Lite, L2TP...: module autoload and rarely audited protocol code"),
    rule!(socketpair when &[ArgCond::none_of(0, &[libc::AF_UNIX as u32])]
        => Action::Errno(libc::EAFNOSUPPORT),
        "only AF_UNIX has socket pairs; keep the families closed as for socket(2)"),
];

const INET_OR_UNIX: &[u32] = &[
    libc::AF_UNIX as u32,
    libc::AF_INET as u32,
    libc::AF_INET6 as u32,
];
const INET: &[u32] = &[libc::AF_INET as u32, libc::AF_INET6 as u32];
const STREAM_OR_DGRAM: &[u32] = &[libc::SOCK_STREAM as u32, libc::SOCK_DGRAM as u32];
/// 0 (the default for the type), TCP, UDP and MPTCP (built in, used by Go's listeners).
const INET_PROTOCOLS: &[u32] = &[
    0,
    libc::IPPROTO_TCP as u32,
    libc::IPPROTO_UDP as u32,
    libc::IPPROTO_MPTCP as u32,
];

/// The filter to build: recorded in the sandbox result as the seccomp layer that was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeccompPlan {
    /// Number of rules in the table.
    pub rules: usize,
    /// Native architecture the filter judges syscalls for.
    pub arch: &'static str,
    /// Action for a syscall from another ABI (i386 or AArch32 compat).
    pub foreign_abi: Action,
    /// Action for an x32 syscall (x86_64 only).
    pub x32_abi: Option<Action>,
    /// The table itself; not serialized (it is a compile-time constant of this build).
    #[serde(skip)]
    table: Vec<Rule>,
}

impl SeccompPlan {
    /// The rules, in evaluation order.
    pub fn table(&self) -> &[Rule] {
        &self.table
    }

    /// The same plan with each rule's action replaced by `f(rule)`. The hook for modes that keep
    /// the rules but change what they do (e.g. log or count instead of deny).
    pub fn map_actions(mut self, f: impl Fn(&Rule) -> Action) -> Self {
        for rule in &mut self.table {
            rule.action = f(rule);
        }
        self
    }
}

/// `plan` with every `EPERM` rule turned into [`Action::Notify`], so that the supervisor sees
/// (and counts) each denial; other errnos (`clone3`'s `ENOSYS`, which glibc probes on every
/// fork, and the socket families' `EAFNOSUPPORT`) stay in the kernel.
pub fn notify_plan(plan: SeccompPlan) -> SeccompPlan {
    plan.map_actions(|r| {
        if r.action == EPERM {
            Action::Notify
        } else {
            r.action
        }
    })
}

/// The default filter: [`RULES`], foreign ABIs killed, x32 refused.
pub fn default_plan() -> SeccompPlan {
    SeccompPlan {
        rules: RULES.len(),
        arch: NATIVE.name,
        foreign_abi: Action::KillProcess,
        #[cfg(target_arch = "x86_64")]
        x32_abi: Some(EPERM),
        #[cfg(not(target_arch = "x86_64"))]
        x32_abi: None,
        table: RULES.to_vec(),
    }
}

/// A BPF program ready for [`install`].
#[derive(Clone)]
pub struct CompiledFilter {
    program: Vec<libc::sock_filter>,
    notifies: bool,
}

impl CompiledFilter {
    /// Whether some rule asks a listener ([`Action::Notify`]): the command's process then
    /// loads it with [`install_with_listener`].
    pub fn notifies(&self) -> bool {
        self.notifies
    }

    /// The instructions, for inspection and tests.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.program
    }
}

impl std::fmt::Debug for CompiledFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledFilter")
            .field("instructions", &self.program.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: rule for {syscall}: {problem}")]
    InvalidRule {
        syscall: &'static str,
        problem: &'static str,
    },
    #[error("seccomp: filter has {len} instructions, the kernel takes at most {max}")]
    TooLarge { len: usize, max: usize },
    #[error("seccomp: prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(nix::errno::Errno),
    #[error("seccomp: seccomp(SECCOMP_SET_MODE_FILTER): {0}")]
    Load(nix::errno::Errno),
}

// Classic BPF opcodes (<linux/bpf_common.h>), as the u16 `code` of `sock_filter`.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const BPF_ALU_AND_K: u16 = 0x04 | 0x50; // BPF_ALU | BPF_AND | BPF_K
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
/// `BPF_MAXINSNS`.
const BPF_MAX_LEN: usize = 4096;
/// `MAX_ERRNO`: larger values would not read as an error return.
const MAX_ERRNO: i32 = 4095;

// Offsets in `struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const fn data_arg_low(arg: u8) -> u32 {
    let low_word = if cfg!(target_endian = "little") { 0 } else { 4 };
    16 + 8 * arg as u32 + low_word
}

/// A jump target while a rule's block is being built.
#[derive(Clone, Copy)]
enum To {
    /// The next instruction.
    Next,
    /// `n` instructions further on than the next one.
    Skip(u8),
    /// The first instruction of the next rule's block.
    NextRule,
}

struct Insn {
    code: u16,
    jt: To,
    jf: To,
    k: u32,
}

impl Insn {
    fn stmt(code: u16, k: u32) -> Self {
        Insn {
            code,
            jt: To::Next,
            jf: To::Next,
            k,
        }
    }
    fn jump(code: u16, k: u32, jt: To, jf: To) -> Self {
        Insn { code, jt, jf, k }
    }
}

fn ret(action: Action, syscall: &'static str) -> Result<libc::sock_filter, SeccompError> {
    let k = match action {
        Action::Allow => libc::SECCOMP_RET_ALLOW,
        Action::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        Action::Notify => libc::SECCOMP_RET_USER_NOTIF,
        Action::Errno(e) if (1..=MAX_ERRNO).contains(&e) => libc::SECCOMP_RET_ERRNO | e as u32,
        Action::Errno(_) => {
            return Err(SeccompError::InvalidRule {
                syscall,
                problem: "errno must be 1..=4095",
            })
        }
    };
    Ok(sf(BPF_RET_K, 0, 0, k))
}

fn sf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn check_rule(rule: &Rule) -> Result<(), SeccompError> {
    let bad = |problem| {
        Err(SeccompError::InvalidRule {
            syscall: rule.syscall,
            problem,
        })
    };
    if !(0..i64::from(u32::MAX)).contains(&rule.nr) {
        return bad("syscall number out of range");
    }
    for c in rule.when {
        if c.arg > 5 {
            return bad("argument index must be 0..=5");
        }
        if c.mask == 0 {
            return bad("empty mask: the condition can never depend on the argument");
        }
        match c.cmp {
            Cmp::In(values) | Cmp::NotIn(values) => {
                if values.is_empty() {
                    return bad("empty value set");
                }
                if values.iter().any(|v| v & !c.mask != 0) {
                    return bad("value has bits outside the mask: it can never compare equal");
                }
                if values
                    .iter()
                    .enumerate()
                    .any(|(i, v)| values[..i].contains(v))
                {
                    return bad("value listed twice");
                }
            }
            Cmp::AnyBitSet => {}
        }
    }
    Ok(())
}

/// One rule as a self-contained block: reload `nr`, test it, test each condition, return the
/// action; any failed test jumps to the next rule's block.
fn rule_block(rule: &Rule) -> Result<Vec<libc::sock_filter>, SeccompError> {
    check_rule(rule)?;
    let mut insns = vec![
        Insn::stmt(BPF_LD_W_ABS, DATA_NR),
        // check_rule bounded nr to u32.
        Insn::jump(BPF_JMP_JEQ_K, rule.nr as u32, To::Next, To::NextRule),
    ];
    for c in rule.when {
        insns.push(Insn::stmt(BPF_LD_W_ABS, data_arg_low(c.arg)));
        match c.cmp {
            Cmp::AnyBitSet => {
                insns.push(Insn::jump(BPF_JMP_JSET_K, c.mask, To::Next, To::NextRule));
            }
            Cmp::In(values) => {
                if c.mask != u32::MAX {
                    insns.push(Insn::stmt(BPF_ALU_AND_K, c.mask));
                }
                let last = values.len() - 1;
                for (i, v) in values.iter().enumerate() {
                    if i == last {
                        insns.push(Insn::jump(BPF_JMP_JEQ_K, *v, To::Next, To::NextRule));
                    } else {
                        let skip =
                            u8::try_from(last - i).map_err(|_| SeccompError::InvalidRule {
                                syscall: rule.syscall,
                                problem: "too many values in one condition",
                            })?;
                        insns.push(Insn::jump(BPF_JMP_JEQ_K, *v, To::Skip(skip), To::Next));
                    }
                }
            }
            Cmp::NotIn(values) => {
                if c.mask != u32::MAX {
                    insns.push(Insn::stmt(BPF_ALU_AND_K, c.mask));
                }
                for v in values {
                    insns.push(Insn::jump(BPF_JMP_JEQ_K, *v, To::NextRule, To::Next));
                }
            }
        }
    }
    let len = insns.len() + 1; // + the return
    let resolve = |at: usize, to: To| -> Result<u8, SeccompError> {
        let offset = match to {
            To::Next => 0,
            To::Skip(n) => usize::from(n),
            // From instruction `at`, the next block starts `len - at - 1` instructions later.
            To::NextRule => len - at - 1,
        };
        u8::try_from(offset).map_err(|_| SeccompError::InvalidRule {
            syscall: rule.syscall,
            problem: "rule too long for an 8-bit jump",
        })
    };
    let mut block = Vec::with_capacity(len);
    for (at, i) in insns.iter().enumerate() {
        block.push(sf(i.code, resolve(at, i.jt)?, resolve(at, i.jf)?, i.k));
    }
    block.push(ret(rule.action, rule.syscall)?);
    Ok(block)
}

/// Compiles a plan to BPF. Pure: no syscalls, so it runs in the parent before `fork`.
pub fn compile(plan: &SeccompPlan) -> Result<CompiledFilter, SeccompError> {
    let mut program = vec![
        sf(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        sf(BPF_JMP_JEQ_K, 1, 0, NATIVE.audit_arch),
        ret(plan.foreign_abi, "(foreign ABI)")?,
    ];
    if let Some(x32) = plan.x32_abi {
        #[cfg(target_arch = "x86_64")]
        {
            program.push(sf(BPF_LD_W_ABS, 0, 0, DATA_NR));
            program.push(sf(BPF_JMP_JSET_K, 0, 1, X32_SYSCALL_BIT));
            program.push(ret(x32, "(x32 ABI)")?);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = x32;
            return Err(SeccompError::InvalidRule {
                syscall: "(x32)",
                problem: "x32 exists on x86_64 only",
            });
        }
    }
    for rule in &plan.table {
        program.extend(rule_block(rule)?);
    }
    program.push(ret(Action::Allow, "(default)")?);
    if program.len() > BPF_MAX_LEN {
        return Err(SeccompError::TooLarge {
            len: program.len(),
            max: BPF_MAX_LEN,
        });
    }
    let notifies = plan.table.iter().any(|r| r.action == Action::Notify);
    Ok(CompiledFilter { program, notifies })
}

/// Sets `no_new_privs` and loads the filter into the calling thread (and so into everything it
/// later forks or execs). Allocates nothing and is async-signal-safe: it runs in the child
/// between `fork` and `exec`. No `SECCOMP_FILTER_FLAG_TSYNC`: that child is single-threaded.
pub fn install(filter: &CompiledFilter) -> Result<(), SeccompError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SeccompError::NoNewPrivs(nix::errno::Errno::last()));
    }
    let len = u16::try_from(filter.program.len()).map_err(|_| SeccompError::TooLarge {
        len: filter.program.len(),
        max: BPF_MAX_LEN,
    })?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads through this pointer (copy_from_user), despite the `*mut` type.
        filter: filter.program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `len` valid instructions that outlive the call; the kernel copies
    // the program and keeps no reference to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            0 as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Load(nix::errno::Errno::last()));
    }
    Ok(())
}

/// [`install`], with `SECCOMP_FILTER_FLAG_NEW_LISTENER`: returns the notification listener
/// (close-on-exec, as the kernel makes it). The caller must hand it to the supervisor and close
/// its own copy before running untrusted code: whoever holds it decides the denied syscalls.
pub fn install_with_listener(
    filter: &CompiledFilter,
) -> Result<std::os::fd::OwnedFd, SeccompError> {
    use std::os::fd::FromRawFd;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SeccompError::NoNewPrivs(nix::errno::Errno::last()));
    }
    let len = u16::try_from(filter.program.len()).map_err(|_| SeccompError::TooLarge {
        len: filter.program.len(),
        max: BPF_MAX_LEN,
    })?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.program.as_ptr().cast_mut(),
    };
    // SAFETY: as in `install`; the flag makes the kernel return a new descriptor.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(SeccompError::Load(nix::errno::Errno::last()));
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// One denial, as the supervisor answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// The rule's syscall name (`unshare`, `mount`, …).
    pub syscall: &'static str,
    pub errno: i32,
    /// The caller's pid as the supervisor sees it (0 if it is in no namespace of ours).
    pub pid: u32,
}

/// Receives one notification from `listener` and answers it with the errno that `plan` (the
/// errno plan the notify plan was made from) gives the syscall — `EPERM` if no rule matches,
/// which cannot happen for a filter compiled from the same table. Never lets a call run.
/// `Ok(None)`: the notification was gone (its caller died) before it could be answered.
pub fn answer_one(
    listener: std::os::fd::BorrowedFd<'_>,
    plan: &SeccompPlan,
) -> Result<Option<Denied>, nix::errno::Errno> {
    use std::os::fd::AsRawFd;
    // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed before RECV.
    let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: `req` is a valid, writable seccomp_notif for the kernel to fill.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut req as *mut libc::seccomp_notif,
        )
    };
    if rc < 0 {
        return match nix::errno::Errno::last() {
            // The caller died between the wake-up and the receive.
            nix::errno::Errno::ENOENT => Ok(None),
            e => Err(e),
        };
    }
    let nr = i64::from(req.data.nr);
    let args = req.data.args;
    let (syscall, errno) = plan
        .table
        .iter()
        .find(|r| r.matches(nr, &args))
        .map(|r| match r.action {
            Action::Errno(e) => (r.syscall, e),
            _ => (r.syscall, libc::EPERM),
        })
        .unwrap_or(("(unknown)", libc::EPERM));
    let mut resp = libc::seccomp_notif_resp {
        id: req.id,
        val: 0,
        error: -errno,
        flags: 0,
    };
    // SAFETY: `resp` is a valid seccomp_notif_resp that the kernel only reads.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND as _,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    };
    if rc < 0 {
        return match nix::errno::Errno::last() {
            nix::errno::Errno::ENOENT => Ok(None),
            e => Err(e),
        };
    }
    Ok(Some(Denied {
        syscall,
        errno,
        pid: req.pid,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference semantics of a plan, written independently of the BPF.
    fn reference(plan: &SeccompPlan, arch: u32, nr: u32, args: &[u64; 6]) -> Action {
        if arch != NATIVE.audit_arch {
            return plan.foreign_abi;
        }
        #[cfg(target_arch = "x86_64")]
        if nr & X32_SYSCALL_BIT != 0 {
            if let Some(a) = plan.x32_abi {
                return a;
            }
        }
        plan.table
            .iter()
            .find(|r| r.matches(i64::from(nr), args))
            .map_or(Action::Allow, |r| r.action)
    }

    /// A classic-BPF interpreter for the instructions `compile` emits, over a `seccomp_data`.
    fn run(program: &[libc::sock_filter], arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let mut acc: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = program[pc];
            pc += 1;
            let jump = |cond: bool| {
                if cond {
                    usize::from(i.jt)
                } else {
                    usize::from(i.jf)
                }
            };
            match i.code {
                BPF_LD_W_ABS => {
                    let at = i.k as usize;
                    assert!(
                        at.is_multiple_of(4) && at + 4 <= data.len(),
                        "bad load offset {at}"
                    );
                    acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                BPF_ALU_AND_K => acc &= i.k,
                BPF_JMP_JEQ_K => pc += jump(acc == i.k),
                BPF_JMP_JSET_K => pc += jump(acc & i.k != 0),
                BPF_RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            assert!(pc < program.len(), "fell off the end of the program");
        }
    }

    fn encode(action: Action) -> u32 {
        ret(action, "test").unwrap().k
    }

    /// Argument values worth trying for the rules of one syscall: every value and bit the
    /// conditions name, the same with stray high or masked-out bits, and values outside them.
    fn candidates(rules: &[&Rule]) -> Vec<[u64; 6]> {
        let mut per_arg: [Vec<u64>; 6] = Default::default();
        for list in per_arg.iter_mut() {
            list.extend([0, 1, u64::from(u32::MAX), 1 << 32]);
        }
        for r in rules {
            for c in r.when {
                let list = &mut per_arg[usize::from(c.arg)];
                let outside = u64::from(!c.mask);
                let mut push = |v: u64| {
                    list.extend([v, v | (1 << 32), v | (outside & 0x0800_0800)]);
                };
                match c.cmp {
                    Cmp::In(values) | Cmp::NotIn(values) => {
                        values.iter().for_each(|v| push(u64::from(*v)));
                        // A value the set does not name.
                        let free = (0..=u32::MAX).find(|x| !values.contains(&(x & c.mask)));
                        push(u64::from(free.unwrap()));
                    }
                    Cmp::AnyBitSet => {
                        (0..32)
                            .filter(|b| c.mask & (1 << b) != 0)
                            .for_each(|b| push(1 << b));
                    }
                }
            }
        }
        for list in per_arg.iter_mut() {
            list.sort_unstable();
            list.dedup();
        }
        // Only arguments some condition looks at vary; the others stay 0.
        let used: Vec<usize> = (0..6)
            .filter(|a| {
                rules
                    .iter()
                    .any(|r| r.when.iter().any(|c| usize::from(c.arg) == *a))
            })
            .collect();
        let mut out = vec![[0u64; 6]];
        for a in used {
            out = out
                .into_iter()
                .flat_map(|base| {
                    per_arg[a].iter().map(move |v| {
                        let mut args = base;
                        args[a] = *v;
                        args
                    })
                })
                .collect();
        }
        out
    }

    fn rules_for(table: &[Rule], nr: i64) -> Vec<&Rule> {
        table.iter().filter(|r| r.nr == nr).collect()
    }

    /// Pairs `(earlier, later)` of rules that say the same thing, or name one number twice.
    fn duplicates(table: &[Rule]) -> Vec<(usize, usize)> {
        let mut found = Vec::new();
        for (i, a) in table.iter().enumerate() {
            for (j, b) in table[..i].iter().enumerate() {
                if a.nr == b.nr && (a.when == b.when || a.syscall != b.syscall) {
                    found.push((j, i));
                }
            }
        }
        found
    }

    /// Rules that never decide because earlier rules catch every input they match. Liveness is
    /// shown by a witness: an input for which the rule is the first match.
    fn dead_rules(table: &[Rule]) -> Vec<usize> {
        (0..table.len())
            .filter(|i| {
                let rule = &table[*i];
                !candidates(&rules_for(table, rule.nr))
                    .into_iter()
                    .any(|args| table.iter().position(|r| r.matches(rule.nr, &args)) == Some(*i))
            })
            .collect()
    }

    const SOCKET_RAW: &[ArgCond] = &[ArgCond::masked_one_of(1, 0xf, &[3])];
    const SOCKET_INET: &[ArgCond] = &[ArgCond::one_of(0, &[2])];
    const SOCKET_INET_RAW: &[ArgCond] = &[
        ArgCond::one_of(0, &[2]),
        ArgCond::masked_one_of(1, 0xf, &[3]),
    ];

    fn socket_rule(when: &'static [ArgCond]) -> Rule {
        Rule {
            syscall: "socket",
            nr: libc::SYS_socket,
            when,
            action: EPERM,
            reason: "test",
        }
    }

    #[test]
    fn the_table_has_no_duplicate_rules() {
        assert_eq!(duplicates(RULES), vec![]);
    }

    #[test]
    fn the_duplicate_check_finds_a_repeated_rule() {
        let table = [
            socket_rule(SOCKET_RAW),
            socket_rule(SOCKET_INET),
            socket_rule(SOCKET_RAW),
        ];
        assert_eq!(duplicates(&table), vec![(0, 2)]);
    }

    #[test]
    fn every_rule_is_reachable_so_none_is_shadowed_by_an_earlier_one() {
        let dead: Vec<_> = dead_rules(RULES)
            .into_iter()
            .map(|i| (RULES[i].syscall, RULES[i].when))
            .collect();
        assert_eq!(dead, vec![]);
    }

    #[test]
    fn the_dead_rule_check_finds_shadowed_rules() {
        // A narrower rule after a broader one never decides; the other way round, both do.
        let shadowed = [socket_rule(SOCKET_INET), socket_rule(SOCKET_INET_RAW)];
        assert_eq!(dead_rules(&shadowed), vec![1]);
        let unconditional = [socket_rule(&[]), socket_rule(SOCKET_RAW)];
        assert_eq!(dead_rules(&unconditional), vec![1]);
        let ordered = [socket_rule(SOCKET_INET_RAW), socket_rule(SOCKET_INET)];
        assert_eq!(dead_rules(&ordered), Vec::<usize>::new());
    }

    #[test]
    fn the_notify_plan_asks_the_listener_only_for_eperm_rules() {
        let plan = notify_plan(default_plan());
        let filter = compile(&plan).unwrap();
        assert!(filter.notifies());
        assert!(!compile(&default_plan()).unwrap().notifies());
        for (errno_rule, notify_rule) in default_plan().table().iter().zip(plan.table()) {
            let expected = if errno_rule.action == EPERM {
                Action::Notify
            } else {
                errno_rule.action
            };
            assert_eq!(notify_rule.action, expected, "{}", errno_rule.syscall);
        }
        let program = filter.instructions();
        let unshare = run(
            program,
            NATIVE.audit_arch,
            libc::SYS_unshare as u32,
            &[0x1000_0000, 0, 0, 0, 0, 0],
        );
        assert_eq!(unshare, libc::SECCOMP_RET_USER_NOTIF);
        let clone3 = run(program, NATIVE.audit_arch, libc::SYS_clone3 as u32, &[0; 6]);
        assert_eq!(clone3, encode(Action::Errno(libc::ENOSYS)));
        let read = run(program, NATIVE.audit_arch, libc::SYS_read as u32, &[0; 6]);
        assert_eq!(read, libc::SECCOMP_RET_ALLOW);
    }

    #[test]
    fn every_rule_has_a_reason_and_a_deny_action() {
        for r in RULES {
            assert!(!r.reason.is_empty(), "{} has no reason", r.syscall);
            assert_ne!(
                r.action,
                Action::Allow,
                "{} allows: the table is a deny-list",
                r.syscall
            );
        }
    }

    #[test]
    fn compiled_filter_agrees_with_the_table_on_every_interesting_input() {
        let plan = default_plan();
        let filter = compile(&plan).unwrap();
        let mut checked = 0;
        for rule in plan.table() {
            for args in candidates(&rules_for(plan.table(), rule.nr)) {
                let nr = rule.nr as u32;
                let want = encode(reference(&plan, NATIVE.audit_arch, nr, &args));
                let got = run(filter.instructions(), NATIVE.audit_arch, nr, &args);
                assert_eq!(got, want, "{} {args:x?}", rule.syscall);
                checked += 1;
            }
        }
        assert!(checked > RULES.len() * 4, "only {checked} inputs checked");
    }

    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        run(
            compile(&default_plan()).unwrap().instructions(),
            NATIVE.audit_arch,
            nr as u32,
            &args,
        )
    }

    #[test]
    fn everyday_syscalls_are_allowed() {
        let allow = encode(Action::Allow);
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
        let nonblock_cloexec = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        let cases: &[(&str, i64, [u64; 6])] = &[
            ("read", libc::SYS_read, [0, 0, 0, 0, 0, 0]),
            ("openat", libc::SYS_openat, [0, 0, 0, 0, 0, 0]),
            ("clone thread", libc::SYS_clone, [thread, 0, 0, 0, 0, 0]),
            ("clone fork", libc::SYS_clone, [fork, 0, 0, 0, 0, 0]),
            (
                "clone vfork",
                libc::SYS_clone,
                [
                    (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            (
                "tcp",
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    libc::SOCK_STREAM as u64 | nonblock_cloexec,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            (
                "tcp6 explicit",
                libc::SYS_socket,
                [
                    libc::AF_INET6 as u64,
                    libc::SOCK_STREAM as u64,
                    libc::IPPROTO_TCP as u64,
                    0,
                    0,
                    0,
                ],
            ),
            (
                "udp",
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    libc::SOCK_DGRAM as u64,
                    libc::IPPROTO_UDP as u64,
                    0,
                    0,
                    0,
                ],
            ),
            (
                "unix seqpacket",
                libc::SYS_socket,
                [
                    libc::AF_UNIX as u64,
                    libc::SOCK_SEQPACKET as u64 | nonblock_cloexec,
                    0,
                    0,
                    0,
                    0,
                ],
            ),
            (
                "unix pair",
                libc::SYS_socketpair,
                [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
            ),
            ("tcgets", libc::SYS_ioctl, [0, libc::TCGETS, 0, 0, 0, 0]),
            (
                "persona query",
                libc::SYS_personality,
                [0xffff_ffff, 0, 0, 0, 0, 0],
            ),
            ("persona linux", libc::SYS_personality, [0, 0, 0, 0, 0, 0]),
        ];
        for (what, nr, args) in cases {
            assert_eq!(verdict(*nr, *args), allow, "{what}");
        }
    }

    #[test]
    fn namespace_flags_raw_sockets_and_terminal_injection_are_refused() {
        let eperm = encode(EPERM);
        let eafnosupport = encode(Action::Errno(libc::EAFNOSUPPORT));
        let cases: &[(&str, i64, [u64; 6], u32)] = &[
            (
                "clone newuser",
                libc::SYS_clone,
                [(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0, 0],
                eperm,
            ),
            (
                "clone newnet high bits",
                libc::SYS_clone,
                [(1 << 40) | libc::CLONE_NEWNET as u64, 0, 0, 0, 0, 0],
                eperm,
            ),
            (
                "clone3",
                libc::SYS_clone3,
                [0; 6],
                encode(Action::Errno(libc::ENOSYS)),
            ),
            (
                "packet",
                libc::SYS_socket,
                [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0],
                eperm,
            ),
            (
                "netlink",
                libc::SYS_socket,
                [libc::AF_NETLINK as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0],
                eafnosupport,
            ),
            (
                "raw v4",
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    (libc::SOCK_RAW | libc::SOCK_CLOEXEC) as u64,
                    1,
                    0,
                    0,
                    0,
                ],
                eperm,
            ),
            (
                "raw v6",
                libc::SYS_socket,
                [libc::AF_INET6 as u64, libc::SOCK_RAW as u64, 58, 0, 0, 0],
                eperm,
            ),
            (
                "sctp",
                libc::SYS_socket,
                [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 132, 0, 0, 0],
                eperm,
            ),
            (
                "inet pair",
                libc::SYS_socketpair,
                [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0],
                eafnosupport,
            ),
            (
                "tiocsti",
                libc::SYS_ioctl,
                [0, libc::TIOCSTI, 0, 0, 0, 0],
                eperm,
            ),
            (
                "tiocsti high bits",
                libc::SYS_ioctl,
                [0, (1 << 32) | libc::TIOCSTI, 0, 0, 0, 0],
                eperm,
            ),
            (
                "tioclinux",
                libc::SYS_ioctl,
                [0, libc::TIOCLINUX, 0, 0, 0, 0],
                eperm,
            ),
            (
                "no aslr",
                libc::SYS_personality,
                [0x0040000, 0, 0, 0, 0, 0],
                eperm,
            ),
        ];
        for (what, nr, args, want) in cases {
            assert_eq!(verdict(*nr, *args), *want, "{what}");
        }
    }

    #[test]
    fn foreign_abis_are_killed_and_x32_is_refused() {
        let program = compile(&default_plan()).unwrap();
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        const AUDIT_ARCH_ARM: u32 = 0x4000_0028;
        for arch in [AUDIT_ARCH_I386, AUDIT_ARCH_ARM, 0] {
            let got = run(program.instructions(), arch, libc::SYS_read as u32, &[0; 6]);
            assert_eq!(got, encode(Action::KillProcess), "arch {arch:#x}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let x32_getpid = X32_SYSCALL_BIT | libc::SYS_getpid as u32;
            let got = run(
                program.instructions(),
                NATIVE.audit_arch,
                x32_getpid,
                &[0; 6],
            );
            assert_eq!(got, encode(EPERM));
        }
    }

    #[test]
    fn actions_can_be_changed_per_rule_and_the_bpf_follows() {
        let counted = Action::Errno(libc::ENOTRECOVERABLE);
        let plan = default_plan().map_actions(|r| {
            if r.syscall == "bpf" {
                counted
            } else {
                r.action
            }
        });
        let filter = compile(&plan).unwrap();
        let at = |nr: i64| run(filter.instructions(), NATIVE.audit_arch, nr as u32, &[0; 6]);
        assert_eq!(at(libc::SYS_bpf), encode(counted));
        assert_eq!(at(libc::SYS_ptrace), encode(EPERM));
    }

    #[test]
    fn malformed_rules_are_rejected_at_compile_time() {
        let base = Rule {
            syscall: "x",
            nr: libc::SYS_ioctl,
            when: &[],
            action: EPERM,
            reason: "t",
        };
        const BAD: &[(&[ArgCond], Action)] = &[
            (&[ArgCond::any_bit_set(6, 1)], EPERM),
            (&[ArgCond::masked_one_of(1, 0xf, &[0x10])], EPERM),
            (&[ArgCond::masked_one_of(1, 0xf, &[])], EPERM),
            (&[ArgCond::masked_none_of(1, 0xf, &[1, 1])], EPERM),
            (&[ArgCond::any_bit_set(1, 0)], EPERM),
            (&[], Action::Errno(0)),
            (&[], Action::Errno(5000)),
        ];
        for (when, action) in BAD {
            let mut plan = default_plan();
            plan.table = vec![Rule {
                when,
                action: *action,
                ..base
            }];
            assert!(
                matches!(compile(&plan), Err(SeccompError::InvalidRule { .. })),
                "{when:?} {action:?} compiled"
            );
        }
    }

    #[test]
    fn the_plan_records_what_will_be_applied() {
        let plan = default_plan();
        assert_eq!(plan.rules, plan.table().len());
        let json = serde_json::to_value(&plan).unwrap();
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            json,
            serde_json::json!({
                "rules": RULES.len(),
                "arch": "x86_64",
                "foreign_abi": "kill_process",
                "x32_abi": {"errno": libc::EPERM},
            })
        );
        #[cfg(target_arch = "aarch64")]
        assert_eq!(json["arch"], "aarch64");
    }

    #[test]
    fn the_program_fits_and_ends_in_allow() {
        let filter = compile(&default_plan()).unwrap();
        let program = filter.instructions();
        assert!(program.len() < BPF_MAX_LEN);
        assert_eq!(program.last().map(|i| i.k), Some(libc::SECCOMP_RET_ALLOW));
    }
}
