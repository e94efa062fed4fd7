//! A session as the gateway sees it: attribution, budgets, and its detection state.
//!
//! Guarantees: a session's budgets are shared by every path (proxy, CONNECT, transparent), a
//! terminate request is sent at most once per session, and once its token is revoked a session
//! says so ([`Session::revoked`]) to every connection that remembered it.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::budget::{Budget, BudgetLimits};
use crate::detect::Detector;
use crate::event::SessionInfo;

#[derive(Debug)]
pub(crate) struct Session {
    pub info: SessionInfo,
    pub budget: Budget,
    pub detector: Detector,
    terminate_sent: AtomicBool,
    revoked: AtomicBool,
}

impl Session {
    pub fn new(info: SessionInfo, limits: BudgetLimits, enforce: bool, detector: Detector) -> Self {
        Session {
            info,
            budget: Budget::new(limits, enforce),
            detector,
            terminate_sent: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
        }
    }

    /// Marks the session's token revoked (standalone mode).
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    /// Whether the session's token was revoked: a connection that remembered the session for
    /// its token must look the token up again (and get 407).
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// True exactly once: the first time a terminate request is due.
    pub fn claim_terminate(&self) -> bool {
        !self.terminate_sent.swap(true, Ordering::AcqRel)
    }
}
