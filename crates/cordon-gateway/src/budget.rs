//! Per-session budgets: requests per minute (total and per host), concurrent connections, and
//! bytes out/in.
//!
//! Guarantees:
//! - Byte budgets are reserved before bytes move (compare-and-swap on one counter per direction),
//!   so concurrent connections of a session together never exceed the limit under enforcement.
//! - Request rates use GCRA (governor): a burst of up to the per-minute quota, then one request
//!   every `60s / quota`.
//! - A connection slot is held for as long as the permit lives, and is returned on every exit
//!   path (drop).
//! - In report mode nothing here refuses: callers learn that a limit *would* have refused
//!   (`Grant::OverInReport`, [`RateCheck::OverInReport`]) and record it.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limits for one session; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetLimits {
    pub requests_per_minute: Option<u32>,
    pub requests_per_minute_per_host: Option<u32>,
    pub max_connections: Option<u32>,
    pub max_bytes_out: Option<u64>,
    pub max_bytes_in: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteDirection {
    Out,
    In,
}

/// The answer to a byte reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// This many bytes (≤ asked) may move.
    Granted(u64),
    /// The budget is used up: nothing may move.
    Exhausted,
    /// Report mode: the budget is used up but the bytes may move anyway.
    OverInReport(u64),
}

/// Which budget refused (or would have refused) something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Limit {
    RequestsPerMinute(u32),
    RequestsPerMinutePerHost(u32),
    Connections(u32),
    BytesOut(u64),
    BytesIn(u64),
    /// A detection rule blocked the session's egress.
    Quarantined,
}

impl Limit {
    /// The policy key that set this limit; used as the event's rule.
    pub fn rule(&self) -> &'static str {
        match self {
            Limit::RequestsPerMinute(_) => "network.rate.requests_per_minute",
            Limit::RequestsPerMinutePerHost(_) => "network.rate.requests_per_minute_per_host",
            Limit::Connections(_) => "network.rate.max_connections",
            Limit::BytesOut(_) => "network.rate.max_bytes_out",
            Limit::BytesIn(_) => "network.rate.max_bytes_in",
            Limit::Quarantined => "detect",
        }
    }

    /// What the agent is told (the `X-Cordon-Reason` header).
    pub fn reason(&self, host: Option<&str>) -> String {
        match self {
            Limit::RequestsPerMinute(n) => format!("request rate limit exceeded ({n} per minute)"),
            Limit::RequestsPerMinutePerHost(n) => match host {
                Some(h) => format!("request rate limit for {h} exceeded ({n} per minute)"),
                None => format!("per-host request rate limit exceeded ({n} per minute)"),
            },
            Limit::Connections(n) => format!("connection limit reached ({n} concurrent)"),
            Limit::BytesOut(_) | Limit::BytesIn(_) => "byte budget exhausted".into(),
            Limit::Quarantined => "egress blocked for this session by a detection rule".into(),
        }
    }
}

#[derive(Debug)]
pub(crate) enum RateCheck {
    Ok,
    Refused(Limit),
    OverInReport(Limit),
}

pub(crate) enum ConnCheck {
    Ok(Option<OwnedSemaphorePermit>),
    Refused(Limit),
    OverInReport(Limit),
}

pub(crate) struct Budget {
    limits: BudgetLimits,
    enforce: bool,
    rpm: Option<DefaultDirectRateLimiter>,
    /// Keyed by a keyed hash of the host name (no allocation per request); a collision, which
    /// nobody can aim for without the random key, would only make two hosts share a quota.
    rpm_host: Option<DefaultKeyedRateLimiter<u64>>,
    host_hasher: std::collections::hash_map::RandomState,
    conns: Option<Arc<Semaphore>>,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    checks: AtomicU64,
    /// Set by a detection rule's `block` or `terminate` response: no more egress.
    quarantined: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("limits", &self.limits)
            .field("enforce", &self.enforce)
            .field("bytes_out", &self.bytes_out)
            .field("bytes_in", &self.bytes_in)
            .finish()
    }
}

fn quota(per_minute: Option<u32>) -> Option<Quota> {
    per_minute.and_then(NonZeroU32::new).map(Quota::per_minute)
}

impl Budget {
    pub fn new(limits: BudgetLimits, enforce: bool) -> Self {
        Budget {
            limits,
            enforce,
            rpm: quota(limits.requests_per_minute).map(RateLimiter::direct),
            rpm_host: quota(limits.requests_per_minute_per_host).map(RateLimiter::keyed),
            host_hasher: Default::default(),
            conns: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            quarantined: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Blocks all further egress (a detection rule's response); enforced in report mode too.
    pub fn quarantine(&self) {
        self.quarantined.store(true, Ordering::Release);
    }

    pub fn quarantined(&self) -> bool {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Counts one request to `host` against the rate limits.
    pub fn check_request(&self, host: &str) -> RateCheck {
        if self.quarantined() {
            return RateCheck::Refused(Limit::Quarantined);
        }
        // A quota of zero has no GCRA form: it refuses every request.
        if self.limits.requests_per_minute == Some(0) {
            return self.refuse_or_report(Limit::RequestsPerMinute(0));
        }
        if self.limits.requests_per_minute_per_host == Some(0) {
            return self.refuse_or_report(Limit::RequestsPerMinutePerHost(0));
        }
        if let (Some(rl), Some(n)) = (&self.rpm, self.limits.requests_per_minute) {
            if rl.check().is_err() {
                return self.refuse_or_report(Limit::RequestsPerMinute(n));
            }
        }
        if let (Some(rl), Some(n)) = (&self.rpm_host, self.limits.requests_per_minute_per_host) {
            let key = std::hash::BuildHasher::hash_one(&self.host_hasher, host);
            if rl.check_key(&key).is_err() {
                return self.refuse_or_report(Limit::RequestsPerMinutePerHost(n));
            }
            // Now and then forget hosts whose buckets are full again, so the table stays small.
            if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
                rl.retain_recent();
            }
        }
        RateCheck::Ok
    }

    fn refuse_or_report(&self, limit: Limit) -> RateCheck {
        if self.enforce {
            RateCheck::Refused(limit)
        } else {
            RateCheck::OverInReport(limit)
        }
    }

    /// Takes a connection slot, or says why not.
    pub fn acquire_connection(&self) -> ConnCheck {
        if self.quarantined() {
            return ConnCheck::Refused(Limit::Quarantined);
        }
        let (Some(sem), Some(n)) = (&self.conns, self.limits.max_connections) else {
            return ConnCheck::Ok(None);
        };
        match sem.clone().try_acquire_owned() {
            Ok(permit) => ConnCheck::Ok(Some(permit)),
            Err(_) if self.enforce => ConnCheck::Refused(Limit::Connections(n)),
            Err(_) => ConnCheck::OverInReport(Limit::Connections(n)),
        }
    }

    /// True when a byte budget is already used up (checked before a new request starts).
    pub fn bytes_exhausted(&self) -> Option<Limit> {
        if let Some(max) = self.limits.max_bytes_out {
            if self.bytes_out.load(Ordering::Relaxed) >= max {
                return Some(Limit::BytesOut(max));
            }
        }
        if let Some(max) = self.limits.max_bytes_in {
            if self.bytes_in.load(Ordering::Relaxed) >= max {
                return Some(Limit::BytesIn(max));
            }
        }
        None
    }

    pub fn enforcing(&self) -> bool {
        self.enforce
    }

    fn counter(&self, d: ByteDirection) -> (&AtomicU64, Option<u64>) {
        match d {
            ByteDirection::Out => (&self.bytes_out, self.limits.max_bytes_out),
            ByteDirection::In => (&self.bytes_in, self.limits.max_bytes_in),
        }
    }

    /// Reserves up to `want` bytes in direction `d`.
    pub fn reserve_bytes(&self, d: ByteDirection, want: u64) -> Grant {
        if d == ByteDirection::Out && self.quarantined() {
            return Grant::Exhausted;
        }
        let (counter, max) = self.counter(d);
        let Some(max) = max else {
            counter.fetch_add(want, Ordering::Relaxed);
            return Grant::Granted(want);
        };
        if !self.enforce {
            let before = counter.fetch_add(want, Ordering::Relaxed);
            return if before.saturating_add(want) > max {
                Grant::OverInReport(want)
            } else {
                Grant::Granted(want)
            };
        }
        let mut granted = 0;
        let res = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            let left = max.saturating_sub(used);
            granted = left.min(want);
            (granted > 0).then_some(used + granted)
        });
        match res {
            Ok(_) => Grant::Granted(granted),
            Err(_) => Grant::Exhausted,
        }
    }

    /// Returns reserved bytes that did not move.
    pub fn release_bytes(&self, d: ByteDirection, unused: u64) {
        if unused > 0 {
            self.counter(d).0.fetch_sub(unused, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits {
            requests_per_minute: Some(3),
            requests_per_minute_per_host: Some(2),
            max_connections: Some(1),
            max_bytes_out: Some(10),
            max_bytes_in: Some(5),
        }
    }

    #[test]
    fn byte_reservations_never_pass_the_limit() {
        let b = Budget::new(limits(), /*enforce*/ true);
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 4), Grant::Granted(4));
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 100), Grant::Granted(6));
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 1), Grant::Exhausted);
        b.release_bytes(ByteDirection::Out, 3);
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 100), Grant::Granted(3));
        assert_eq!(b.bytes_exhausted(), Some(Limit::BytesOut(10)));
        assert_eq!(b.reserve_bytes(ByteDirection::In, 5), Grant::Granted(5));
        assert_eq!(b.reserve_bytes(ByteDirection::In, 1), Grant::Exhausted);
    }

    #[test]
    fn report_mode_lets_bytes_through_but_says_it_would_not() {
        let b = Budget::new(limits(), /*enforce*/ false);
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 10), Grant::Granted(10));
        assert_eq!(
            b.reserve_bytes(ByteDirection::Out, 1),
            Grant::OverInReport(1)
        );
    }

    #[test]
    fn unlimited_budgets_grant_everything() {
        let b = Budget::new(BudgetLimits::default(), true);
        assert_eq!(
            b.reserve_bytes(ByteDirection::Out, u64::MAX / 4),
            Grant::Granted(u64::MAX / 4)
        );
        assert!(matches!(b.check_request("a"), RateCheck::Ok));
        assert!(matches!(b.acquire_connection(), ConnCheck::Ok(None)));
    }

    #[test]
    fn request_rates_refuse_past_the_burst_total_and_per_host() {
        let b = Budget::new(limits(), true);
        assert!(matches!(b.check_request("a"), RateCheck::Ok));
        assert!(matches!(b.check_request("a"), RateCheck::Ok));
        assert!(matches!(
            b.check_request("a"),
            RateCheck::Refused(Limit::RequestsPerMinutePerHost(2))
        ));
        // The refused request still used a slot of the total quota (3).
        assert!(matches!(
            b.check_request("b"),
            RateCheck::Refused(Limit::RequestsPerMinute(3))
        ));
    }

    #[test]
    fn zero_limits_refuse_everything() {
        let b = Budget::new(
            BudgetLimits {
                requests_per_minute: Some(0),
                requests_per_minute_per_host: Some(0),
                max_connections: Some(0),
                max_bytes_out: Some(0),
                max_bytes_in: Some(0),
            },
            true,
        );
        assert!(matches!(b.check_request("a"), RateCheck::Refused(_)));
        assert!(matches!(b.acquire_connection(), ConnCheck::Refused(_)));
        assert_eq!(b.reserve_bytes(ByteDirection::Out, 1), Grant::Exhausted);
        assert_eq!(b.reserve_bytes(ByteDirection::In, 1), Grant::Exhausted);
    }

    #[test]
    fn connection_slots_come_back_when_the_permit_drops() {
        let b = Budget::new(limits(), true);
        let ConnCheck::Ok(permit) = b.acquire_connection() else {
            panic!("first connection refused")
        };
        assert!(matches!(
            b.acquire_connection(),
            ConnCheck::Refused(Limit::Connections(1))
        ));
        drop(permit);
        assert!(matches!(b.acquire_connection(), ConnCheck::Ok(Some(_))));
    }

    #[test]
    fn the_byte_reason_is_the_documented_one() {
        assert_eq!(Limit::BytesOut(1).reason(None), "byte budget exhausted");
        assert_eq!(Limit::BytesIn(1).reason(None), "byte budget exhausted");
    }
}
