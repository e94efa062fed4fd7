//! cordon-sandbox: the only crate that talks to the kernel's isolation APIs.
//!
//! A sandbox is built in two steps: a pure plan ([`plan::SandboxPlan`]) made from the policy, and
//! a single-threaded stage ([`init`]) that applies it in a freshly cloned child and ends in
//! `exec`. [`spawn`] is the supervisor's side of that hand-over.

pub mod cgroup;
pub mod fdpass;
pub mod init;
pub mod landlock;
pub mod mounts;
pub mod netns;
pub mod nft;
pub mod plan;
pub mod privs;
pub mod probe;
pub mod proctitle;
pub mod proto;
pub mod seccomp;
pub mod spawn;
pub mod sys;
pub mod workspace;
