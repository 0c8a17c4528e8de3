//! Segment files: naming, creating, appending batches, rolling and sealing.
//!
//! One writer owns one open segment at a time and no other process writes it. Batches are
//! appended whole with one `write` each; a failed write is cut back off the file so a
//! segment never holds half a batch followed by good frames.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{encode_header, encode_seal, HeaderError, SegmentHeader, SEGMENT_EXTENSION};

/// How a [`SegmentWriter`] writes.
#[derive(Debug, Clone)]
pub struct SegmentWriterConfig {
    /// The spool folder.
    pub dir: PathBuf,
    /// Field names every event carries, in order.
    pub fields: Vec<String>,
    /// A segment is sealed once it reaches this many bytes (checked after each batch).
    pub segment_size: u64,
    /// Process id written into headers and file names.
    pub pid: u32,
    /// Whether creating and sealing a segment fsyncs it (and the folder).
    pub fsync: bool,
}

/// A segment the writer has sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSegment {
    pub path: PathBuf,
    pub bytes: u64,
}

/// The file name of a segment: `<created ms, 13 digits>-<pid>-<seq, 6 digits>.seg`, so names
/// sort by creation time.
pub fn segment_file_name(created_ms: u64, pid: u32, seq: u64) -> String {
    format!("{created_ms:013}-{pid}-{seq:06}.{SEGMENT_EXTENSION}")
}

/// Whether a file name is a segment's (as [`segment_file_name`] makes them).
pub fn is_segment_file_name(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(SEGMENT_EXTENSION)
        .and_then(|s| s.strip_suffix('.'))
    else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug)]
struct OpenSegment {
    file: File,
    path: PathBuf,
    len: u64,
    events: u64,
    dropped: u64,
    unsynced: bool,
}

/// Writes batches of encoded frames into rolling segment files.
#[derive(Debug)]
pub struct SegmentWriter {
    config: SegmentWriterConfig,
    current: Option<OpenSegment>,
    seq: u64,
    scratch: Vec<u8>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl SegmentWriter {
    /// Checks the field list; creates no file until the first batch.
    pub fn new(config: SegmentWriterConfig) -> Result<Self, HeaderError> {
        SegmentHeader {
            writer_pid: config.pid,
            created_ms: 0,
            fields: config.fields.clone(),
        }
        .validate()?;
        Ok(SegmentWriter {
            config,
            current: None,
            seq: 0,
            scratch: Vec::with_capacity(256),
        })
    }

    /// The segment being written, if one is open.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|s| s.path.as_path())
    }

    fn open(&mut self, now_ms: u64) -> io::Result<&mut OpenSegment> {
        let header = SegmentHeader {
            writer_pid: self.config.pid,
            created_ms: now_ms,
            fields: self.config.fields.clone(),
        };
        self.scratch.clear();
        encode_header(&header, &mut self.scratch).map_err(io::Error::other)?;
        let (file, path) = loop {
            self.seq += 1;
            let path = self
                .config
                .dir
                .join(segment_file_name(now_ms, self.config.pid, self.seq));
            // 0640: the spool holds request data; the reader runs as the
            // writer's user or its group (or root).
            match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o640)
                .open(&path)
            {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let mut seg = OpenSegment {
            file,
            path,
            len: 0,
            events: 0,
            dropped: 0,
            unsynced: true,
        };
        if let Err(e) = seg.file.write_all(&self.scratch) {
            // A segment without a whole header is useless to readers: remove it.
            let _ = std::fs::remove_file(&seg.path);
            return Err(e);
        }
        seg.len = self.scratch.len() as u64;
        if self.config.fsync {
            seg.file.sync_data()?;
            sync_dir(&self.config.dir)?;
            seg.unsynced = false;
        }
        Ok(self.current.insert(seg))
    }

    /// Appends a batch of whole frames holding `events` event frames and drop markers
    /// totalling `dropped` events. Opens a segment first if none is open; seals it after
    /// the batch if it reached `segment_size`, and returns it then.
    ///
    /// On error nothing of the batch stays in the file (it is cut back), and the caller
    /// should count the batch's events as dropped.
    pub fn append(
        &mut self,
        frames: &[u8],
        events: u64,
        dropped: u64,
        now_ms: u64,
    ) -> io::Result<Option<WrittenSegment>> {
        if frames.is_empty() {
            return Ok(None);
        }
        let seg = match self.current {
            Some(ref mut seg) => seg,
            None => self.open(now_ms)?,
        };
        if let Err(e) = seg.file.write_all(frames) {
            if seg.file.set_len(seg.len).is_err() {
                // The file holds a partial batch we cannot remove: never append to it again.
                self.current = None;
            }
            return Err(e);
        }
        seg.len += frames.len() as u64;
        seg.events += events;
        seg.dropped += dropped;
        seg.unsynced = true;
        if seg.len >= self.config.segment_size {
            return self.seal(now_ms);
        }
        Ok(None)
    }

    /// Flushes the open segment's data to disk (fdatasync), if anything is unsynced.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(seg) = self.current.as_mut().filter(|s| s.unsynced) {
            seg.file.sync_data()?;
            seg.unsynced = false;
        }
        Ok(())
    }

    /// Writes the seal frame, fsyncs (when configured) and closes the open segment.
    pub fn seal(&mut self, now_ms: u64) -> io::Result<Option<WrittenSegment>> {
        let Some(mut seg) = self.current.take() else {
            return Ok(None);
        };
        self.scratch.clear();
        encode_seal(&mut self.scratch, now_ms, seg.events, seg.dropped);
        seg.file.write_all(&self.scratch)?;
        seg.len += self.scratch.len() as u64;
        if self.config.fsync {
            seg.file.sync_data()?;
        }
        Ok(Some(WrittenSegment {
            path: seg.path,
            bytes: seg.len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = segment_file_name(1_764_300_000_123, 77, 3);
        assert_eq!(n, "1764300000123-77-000003.seg");
        assert!(is_segment_file_name(&n));
        for bad in [
            "x.seg",
            "1-2.seg",
            "1-2-3.tmp",
            "1-2-3-4.seg",
            "a-2-3.seg",
            "--.seg",
        ] {
            assert!(!is_segment_file_name(bad), "{bad}");
        }
    }
}
