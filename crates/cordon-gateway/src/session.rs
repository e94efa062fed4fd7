//! A session as the gateway sees it: attribution, budgets, and the count of blocked attempts.
//!
//! Guarantees: a session's budgets are shared by every path (proxy, CONNECT, transparent), and a
//! terminate request is sent at most once per session.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::budget::{Budget, BudgetLimits};
use crate::event::SessionInfo;

#[derive(Debug)]
pub(crate) struct Session {
    pub info: SessionInfo,
    pub budget: Budget,
    blocked: AtomicU64,
    terminate_sent: AtomicBool,
}

impl Session {
    pub fn new(info: SessionInfo, limits: BudgetLimits, enforce: bool) -> Self {
        Session {
            info,
            budget: Budget::new(limits, enforce),
            blocked: AtomicU64::new(0),
            terminate_sent: AtomicBool::new(false),
        }
    }

    /// Counts one blocked attempt; returns the new total.
    pub fn note_blocked(&self) -> u64 {
        self.blocked.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// True exactly once: the first time a terminate request is due.
    pub fn claim_terminate(&self) -> bool {
        !self.terminate_sent.swap(true, Ordering::AcqRel)
    }
}
