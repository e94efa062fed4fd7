//! A session as the gateway sees it: attribution, budgets, and its detection state.
//!
//! Guarantees: a session's budgets are shared by every path (proxy, CONNECT, transparent), and a
//! terminate request is sent at most once per session.

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
}

impl Session {
    pub fn new(info: SessionInfo, limits: BudgetLimits, enforce: bool, detector: Detector) -> Self {
        Session {
            info,
            budget: Budget::new(limits, enforce),
            detector,
            terminate_sent: AtomicBool::new(false),
        }
    }

    /// True exactly once: the first time a terminate request is due.
    pub fn claim_terminate(&self) -> bool {
        !self.terminate_sent.swap(true, Ordering::AcqRel)
    }
}
