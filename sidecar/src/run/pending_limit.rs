//! When the reader must stop reading and ask for a flush: pending keys reach
//! `max_pending_keys` or the estimated pending bytes ([`crate::aggregate::Aggregator::pending_bytes`],
//! sketches included) reach `max_pending_memory`, whichever comes first. Pure.

use crate::config::Config;

/// The two bounds on pending state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingLimit {
    pub keys: usize,
    pub bytes: u64,
}

impl PendingLimit {
    pub fn of(config: &Config) -> PendingLimit {
        PendingLimit {
            keys: config.max_pending_keys,
            bytes: config.max_pending_memory,
        }
    }

    /// Reading pauses (and a flush is asked for).
    pub fn full(&self, keys: usize, bytes: u64) -> bool {
        keys >= self.keys || bytes >= self.bytes
    }

    /// How many bytes of spool the next poll may read, so that the pending state does not
    /// pass either bound by much: at most half of the room left to each bound, at the rate
    /// the previous poll grew it per byte of spool read (`growth`), between [`MIN_BUDGET`]
    /// and `max`. Without a rate (the first poll after a drain, or one that read nothing)
    /// the poll is [`FIRST_BUDGET`]: from empty state, that much spool cannot go far past
    /// any bound worth setting.
    pub fn budget(&self, keys: usize, bytes: u64, growth: Option<Growth>, max: u64) -> u64 {
        let Some(g) = growth else {
            return FIRST_BUDGET.min(max);
        };
        let room = |limit: u64, held: u64, per_byte: f64| {
            let left = limit.saturating_sub(held) as f64;
            if per_byte > 0.0 {
                (left / per_byte / 2.0).min(u64::MAX as f64) as u64
            } else {
                u64::MAX
            }
        };
        room(self.keys as u64, keys as u64, g.keys_per_byte)
            .min(room(self.bytes, bytes, g.bytes_per_byte))
            .clamp(MIN_BUDGET, max.max(MIN_BUDGET))
    }
}

/// Smallest poll budget (a few dozen events): polls stay worth their overhead.
pub(crate) const MIN_BUDGET: u64 = 4 << 10;
/// The budget of a poll with no growth rate to go by.
pub(crate) const FIRST_BUDGET: u64 = 16 << 10;

/// How much one poll grew the pending state per byte of spool it read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Growth {
    pub keys_per_byte: f64,
    pub bytes_per_byte: f64,
}

impl Growth {
    /// From the state before and after a poll that read `read` bytes (`None` when it read
    /// nothing, or the state shrank: a drain came between).
    pub fn measure(before: (usize, u64), after: (usize, u64), read: u64) -> Option<Growth> {
        if read == 0 || after.0 < before.0 || after.1 < before.1 {
            return None;
        }
        Some(Growth {
            keys_per_byte: (after.0 - before.0) as f64 / read as f64,
            bytes_per_byte: (after.1 - before.1) as f64 / read as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whichever_bound_is_reached_first() {
        let l = PendingLimit {
            keys: 100,
            bytes: 1 << 20,
        };
        assert!(!l.full(99, (1 << 20) - 1));
        assert!(l.full(100, 0));
        assert!(l.full(1, 1 << 20));
    }

    #[test]
    fn the_budget_keeps_each_bound_within_half_the_room_left() {
        let l = PendingLimit {
            keys: 10_000,
            bytes: 1 << 20,
        };
        const MAX: u64 = 4 << 20;
        // No rate yet: the first budget.
        assert_eq!(l.budget(0, 0, None, MAX), FIRST_BUDGET);
        // 2 bytes of pending state per byte of spool, 1 MiB left: half of it is 256 KiB of
        // spool.
        let g = Growth::measure((0, 0), (10, 2 << 16), 1 << 16).unwrap();
        assert_eq!(l.budget(10, 0, Some(g), MAX), 1 << 18);
        // Nearly full: the smallest budget, never zero.
        assert_eq!(l.budget(10, (1 << 20) - 10, Some(g), MAX), MIN_BUDGET);
        assert_eq!(l.budget(10, 2 << 20, Some(g), MAX), MIN_BUDGET);
        // Keys the tighter bound: 0.01 keys a byte, 1,000 keys left → 50,000 bytes.
        let k = Growth::measure((0, 0), (100, 0), 10_000).unwrap();
        assert_eq!(l.budget(9_000, 0, Some(k), MAX), 50_000);
        // Nothing grows (every key already pending): the largest budget.
        let none = Growth::measure((5, 100), (5, 100), 1 << 20).unwrap();
        assert_eq!(l.budget(5, 100, Some(none), MAX), MAX);
        // A poll that read nothing, or a drain in between: no rate.
        assert_eq!(Growth::measure((0, 0), (0, 0), 0), None);
        assert_eq!(Growth::measure((5, 100), (0, 10), 100), None);
    }

    /// Fed a stream whose state grows at a steady or a falling rate, polls sized by the
    /// budget stop within the bound plus one smallest poll's growth.
    #[test]
    fn polls_sized_by_the_budget_barely_pass_the_bound() {
        let l = PendingLimit {
            keys: usize::MAX,
            bytes: 1 << 20,
        };
        for rate in [0.5f64, 3.0, 40.0] {
            let (mut bytes, mut growth, mut read) = (0u64, None, 0u64);
            while !l.full(0, bytes) {
                let b = l.budget(0, bytes, growth, 4 << 20);
                // The rate falls as the stream goes on (keys seen before add nothing).
                let r = rate / (1.0 + read as f64 / (8 << 20) as f64);
                let after = bytes + (b as f64 * r) as u64;
                growth = Growth::measure((0, bytes), (0, after), b);
                bytes = after;
                read += b;
            }
            let over = bytes - l.bytes;
            assert!(
                over as f64
                    <= (MIN_BUDGET as f64 * rate).max(FIRST_BUDGET as f64 * rate - l.bytes as f64),
                "rate {rate}: {bytes} bytes for a bound of {}",
                l.bytes
            );
        }
    }
}
