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

    /// Half way to either bound: read in small steps so the bound is not overshot by much.
    pub fn near(&self, keys: usize, bytes: u64) -> bool {
        keys >= self.keys / 2 || bytes >= self.bytes / 2
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
        assert!(!l.near(49, (1 << 19) - 1));
        assert!(l.near(50, 0) && l.near(0, 1 << 19));
    }
}
