//! Sliding windows over time stamps.
//!
//! Guarantees: a window never holds more than [`MAX_ENTRIES`] entries (older ones are dropped
//! first), so a flood costs bounded memory; once a window holds that many entries every
//! threshold a policy can reasonably set has long been reached.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most entries one window keeps.
pub(crate) const MAX_ENTRIES: usize = 65_536;

/// Times of events, oldest first, with an optional weight (bytes).
#[derive(Debug, Default)]
pub(crate) struct Window {
    items: VecDeque<(Instant, u64)>,
    sum: u64,
}

impl Window {
    /// Adds an event of `weight` at `now` and forgets those older than `span`; returns
    /// (events, total weight) within the window.
    pub fn add(&mut self, now: Instant, span: Duration, weight: u64) -> (u64, u64) {
        self.expire(now, span);
        if self.items.len() >= MAX_ENTRIES {
            if let Some((_, w)) = self.items.pop_front() {
                self.sum -= w;
            }
        }
        self.items.push_back((now, weight));
        self.sum += weight;
        (self.items.len() as u64, self.sum)
    }

    fn expire(&mut self, now: Instant, span: Duration) {
        while let Some(&(t, w)) = self.items.front() {
            if now.duration_since(t) <= span {
                break;
            }
            self.items.pop_front();
            self.sum -= w;
        }
    }
}

/// Distinct keys seen within a window (last sighting per key).
#[derive(Debug, Default)]
pub(crate) struct Distinct {
    last: HashMap<String, Instant>,
    /// No sighting in `last` is older than this (a lower bound: refreshing a key may leave it
    /// lower than the true oldest). While it is within the span, nothing can have expired and
    /// counting needs no pass over the map.
    oldest: Option<Instant>,
}

impl Distinct {
    /// Distinct keys seen within `span` of `now`.
    pub fn count(&mut self, now: Instant, span: Duration) -> u64 {
        self.prune(now, span);
        self.last.len() as u64
    }

    /// Notes `key` at `now`; returns how many distinct keys were seen within `span`.
    pub fn add(&mut self, key: &str, now: Instant, span: Duration) -> u64 {
        match self.last.get_mut(key) {
            Some(t) => *t = now,
            None => {
                if self.last.len() >= MAX_ENTRIES {
                    self.prune(now, span);
                }
                if self.last.len() < MAX_ENTRIES {
                    self.last.insert(key.to_owned(), now);
                    self.oldest = Some(self.oldest.map_or(now, |o| o.min(now)));
                }
            }
        }
        self.prune(now, span);
        self.last.len() as u64
    }

    /// Drops the keys last seen more than `span` before `now`, when any can be that old.
    fn prune(&mut self, now: Instant, span: Duration) {
        if self
            .oldest
            .is_none_or(|o| now.saturating_duration_since(o) <= span)
        {
            return;
        }
        self.last
            .retain(|_, t| now.saturating_duration_since(*t) <= span);
        self.oldest = self.last.values().min().copied();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_forget_what_is_older_than_their_span() {
        let t0 = Instant::now();
        let span = Duration::from_secs(10);
        let mut w = Window::default();
        assert_eq!(w.add(t0, span, 5), (1, 5));
        assert_eq!(w.add(t0 + Duration::from_secs(5), span, 7), (2, 12));
        assert_eq!(w.add(t0 + Duration::from_secs(11), span, 1), (2, 8));
        assert_eq!(w.add(t0 + Duration::from_secs(30), span, 0), (1, 0));
    }

    #[test]
    fn distinct_keys_count_each_key_once_within_the_span() {
        let t0 = Instant::now();
        let span = Duration::from_secs(10);
        let mut d = Distinct::default();
        assert_eq!(d.add("a", t0, span), 1);
        assert_eq!(d.add("a", t0, span), 1);
        assert_eq!(d.add("b", t0 + Duration::from_secs(3), span), 2);
        assert_eq!(d.add("c", t0 + Duration::from_secs(12), span), 2);
    }

    proptest::proptest! {
        /// The pruning shortcut never changes a count: every answer equals a plain count of
        /// the keys last seen within the span.
        #[test]
        fn distinct_counts_match_a_plain_recount(
            steps in proptest::collection::vec((0u8..6, 0u64..4_000, proptest::bool::ANY), 1..200)
        ) {
            let t0 = Instant::now();
            let span = Duration::from_secs(3);
            let mut d = Distinct::default();
            let mut plain: HashMap<String, Instant> = HashMap::new();
            let mut now = t0;
            for (key, advance_ms, just_count) in steps {
                now += Duration::from_millis(advance_ms);
                let key = format!("k{key}");
                let got = if just_count {
                    d.count(now, span)
                } else {
                    plain.insert(key.clone(), now);
                    d.add(&key, now, span)
                };
                let want = plain
                    .values()
                    .filter(|t| now.duration_since(**t) <= span)
                    .count() as u64;
                proptest::prop_assert_eq!(got, want);
            }
        }
    }
}
