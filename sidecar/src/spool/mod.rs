//! Reading the spool folder: the I/O shell around the spool crate's pure decoder.
//!
//! - `tail.rs`: the [`Tailer`](tail::Tailer), which follows every segment of the folder and
//!   delivers their frames with the positions the daemon checkpoints;
//! - `segment.rs`: one followed segment and the read of its new bytes;
//! - `liveness.rs`: whether an unsealed segment's writer is gone (its lock), and whether the
//!   spool folder's file system can tell;
//! - `node.rs`: the node id stored in the folder (whose checkpoint the spool has);
//! - `usage.rs`: what the segments take on disk, the file system's free bytes, and the
//!   age of the oldest uncommitted byte (a thread of its own, outside the reader);
//! - `dump.rs`: `logtally dump`, segments as JSON lines.
//!
//! Frames are walked by `logtally_spool::SegmentReader` in both the tailer and the dump.
//! What else the sidecar keeps in or learns from the spool folder (a node id stored there,
//! the folder's file system and free space) belongs here too.

pub mod dump;
pub mod liveness;
pub mod node;
mod segment;
pub mod tail;
pub mod usage;
