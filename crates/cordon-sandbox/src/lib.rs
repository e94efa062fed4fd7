//! cordon-sandbox: the only crate that talks to the kernel's isolation APIs.
//!
//! A sandbox is built in two steps: a pure plan ([`plan::SandboxPlan`]) made from the policy, and
//! a single-threaded stage that applies it in a freshly cloned child and ends in `exec`.

pub mod cgroup;
pub mod landlock;
pub mod seccomp;
