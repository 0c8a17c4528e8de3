//! The checkpoint: a segment's committed read position, and the compare in each flush's
//! compare-and-swap, which makes a retried flush whose COMMIT did land a no-op and catches
//! a second sidecar running with the same node.

use std::collections::HashMap;

use super::StoreError;

/// A segment's committed read position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointEntry {
    /// The segment's file name (not its path).
    pub segment: String,
    /// Byte offset of the first byte not yet counted (always a frame boundary).
    pub offset: u64,
    /// No more bytes will be read from it (sealed, or its writer died).
    pub finished: bool,
}

/// What a flush did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOutcome {
    /// This call committed the batch.
    Committed,
    /// The checkpoint already holds exactly this batch's positions: an earlier attempt whose
    /// COMMIT outcome was unknown did land. Nothing was written again.
    AlreadyCommitted,
}

/// What the checkpoint rows of a flush's segments hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointState {
    /// What this process committed last: go ahead.
    AsExpected,
    /// The flush's own positions: it committed before. Write nothing.
    AlreadyThere,
}

/// The compare in the flush's compare-and-swap: the checkpoint rows `found` in the
/// database for `positions`' segments hold what this process committed last (`previous`),
/// or already hold `positions` (an earlier attempt of this flush landed), or something
/// else: a conflict.
pub(crate) fn compare_checkpoint(
    node: &str,
    positions: &[CheckpointEntry],
    previous: &HashMap<String, CheckpointEntry>,
    found: &HashMap<String, (u64, bool)>,
) -> Result<CheckpointState, StoreError> {
    let as_expected = positions.iter().all(|p| {
        let expected = previous.get(&p.segment).map(|e| (e.offset, e.finished));
        found.get(&p.segment).copied() == expected
    });
    if as_expected {
        return Ok(CheckpointState::AsExpected);
    }
    let already = positions
        .iter()
        .all(|p| found.get(&p.segment) == Some(&(p.offset, p.finished)));
    if already {
        return Ok(CheckpointState::AlreadyThere);
    }
    let bad = positions
        .iter()
        .find(|p| {
            let expected = previous.get(&p.segment).map(|e| (e.offset, e.finished));
            found.get(&p.segment).copied() != expected
        })
        .expect("some position differs");
    Err(StoreError::CheckpointConflict {
        node: node.to_string(),
        segment: bad.segment.clone(),
        expected: previous.get(&bad.segment).map(|e| (e.offset, e.finished)),
        found: found.get(&bad.segment).copied(),
    })
}
