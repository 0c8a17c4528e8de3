//! Segment files: naming, creating, appending batches, rolling, sealing and abandoning.
//!
//! One writer owns one open segment at a time and no other process writes it. The writer
//! holds the segment's lock (see `lock.rs`) from before the file has its segment name until
//! it seals or abandons it. Batches are appended whole with one `write` each. A failed
//! write is never cut back (a reader may already have read the bytes): the segment is
//! abandoned, and the next batch goes to a new one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::lock::lock_for_writing;
use crate::{
    decode_frame, encode_header, encode_seal, Decoded, Frame, HeaderError, SegmentHeader,
    SEGMENT_EXTENSION,
};

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

/// Event frames and dropped events (the sum of drop markers) in some frames.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub events: u64,
    pub dropped: u64,
}

/// An append that failed. The open segment was abandoned (its lock let go, its bytes left
/// as they are); the next append starts a new segment.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct AppendError {
    pub source: io::Error,
    /// What of the batch is in the spool anyway, in whole frames a reader will count: the
    /// frames written before the write failed (or the whole batch, if sealing after it
    /// failed). The caller counts the rest as dropped and reports it in a later drop marker.
    pub written: FrameCounts,
    /// The segment abandoned, if one was open (or had just been created).
    pub abandoned: Option<PathBuf>,
}

impl From<AppendError> for io::Error {
    fn from(e: AppendError) -> Self {
        e.source
    }
}

/// Open segments that lost their last link (deleted by hand) since the last
/// [`SegmentWriter::take_unlinked`]. The writer let each go and moved on to a new one;
/// whatever was written into them is gone, unless a reader still had them open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlinkedSegments {
    pub count: u64,
    /// The latest of them, as the writer named it.
    pub last: PathBuf,
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

/// How often, by the caller's clock, [`SegmentWriter::append`] checks that the open segment
/// still has a name. The check is a `statx`, which on a big tmpfs file costs a third of
/// appending a 4 KB batch (`benches/writer.rs`); once a second it costs nothing.
const LINK_CHECK_INTERVAL_MS: u64 = 1000;

/// Suffix of the temporary name a segment is created under (`.<segment name>.tmp`).
const TEMP_SUFFIX: &str = ".tmp";

fn temp_file_name(segment_name: &str) -> String {
    format!(".{segment_name}{TEMP_SUFFIX}")
}

/// Whether a file name is a segment's temporary name, under which a writer creates, locks
/// and fills in the header before linking it under its segment name. Readers ignore these.
pub fn is_segment_temp_file_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_suffix(TEMP_SUFFIX))
        .is_some_and(is_segment_file_name)
}

/// Removes temporary files no writer holds: debris of a writer that died while creating a
/// segment (they hold a header and no events) or between linking a segment and removing its
/// temporary name (then only that extra name goes). Returns how many it removed.
///
/// Safe against a writer creating its file at the same moment: a writer locks its new file
/// and then checks it still has a link, starting over if this took it away.
pub fn remove_stale_temp_files(dir: &Path) -> io::Result<u64> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(is_segment_temp_file_name);
        if !is_temp || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        let Ok(file) = File::open(&path) else {
            continue; // gone meanwhile
        };
        if file.try_lock().is_err() {
            continue; // a writer holds it
        }
        // Remove the name only if it still names the file we locked.
        let same = std::fs::symlink_metadata(&path)
            .and_then(|m| Ok(m.ino() == file.metadata()?.ino()))
            .unwrap_or(false);
        if same && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Counts the whole frames at the front of `bytes` (a prefix of a batch the writer built).
fn count_frames(mut bytes: &[u8]) -> FrameCounts {
    let mut counts = FrameCounts::default();
    while let Decoded::Frame { frame, len } = decode_frame(bytes) {
        match frame {
            Frame::Event(_) => counts.events += 1,
            Frame::Dropped { count, .. } => counts.dropped += count,
            Frame::Seal { .. } => {}
        }
        bytes = &bytes[len..];
    }
    counts
}

/// `write_all` that says how many bytes made it when it fails.
fn write_all_counted(file: &mut File, buf: &[u8]) -> Result<(), (io::Error, usize)> {
    let mut done = 0;
    while done < buf.len() {
        match file.write(&buf[done..]) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), done)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, done)),
        }
    }
    Ok(())
}

#[derive(Debug)]
struct OpenSegment {
    /// Holds the writer's exclusive lock; closing it lets the lock go.
    file: File,
    path: PathBuf,
    len: u64,
    events: u64,
    dropped: u64,
    unsynced: bool,
    /// When `append` last checked the link count (caller's clock).
    link_checked_ms: u64,
}

impl OpenSegment {
    /// Whether the file lost its last name (someone deleted it).
    fn is_unlinked(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// Stops writing to the segment: lets the lock go (explicitly, in case a forked
    /// process shares the descriptor) and closes it.
    fn release(self) {
        let _ = self.file.unlock();
    }
}

/// Writes batches of encoded frames into rolling segment files.
#[derive(Debug)]
pub struct SegmentWriter {
    config: SegmentWriterConfig,
    current: Option<OpenSegment>,
    seq: u64,
    scratch: Vec<u8>,
    unlinked: Option<UnlinkedSegments>,
    /// Whether this writer has looked for other writers' stale temporary files yet.
    cleaned: bool,
}

/// Whether `link(2)` failed because the file system has no hard links (EPERM, EOPNOTSUPP).
fn no_hard_links(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(1 | 95))
}

/// Gives `temp` a free segment name, bumping `seq` until one is: a hard link, which never
/// replaces a file (another writer with the same pid, in another pid namespace, may use the
/// same names). Where the file system has no hard links (vfat, some FUSE), a rename after
/// checking the name is free: only two such writers in the same millisecond could collide.
fn link_free_name(
    temp: &Path,
    config: &SegmentWriterConfig,
    now_ms: u64,
    seq: &mut u64,
) -> io::Result<PathBuf> {
    loop {
        let path = config.dir.join(segment_file_name(now_ms, config.pid, *seq));
        let taken = match std::fs::hard_link(temp, &path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => true,
            Err(e) if no_hard_links(&e) => match std::fs::symlink_metadata(&path) {
                Ok(_) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        if !taken {
            std::fs::rename(temp, &path)?;
            return Ok(path);
        }
        *seq += 1;
    }
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
            unlinked: None,
            cleaned: false,
        })
    }

    /// The segment being written, if one is open.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|s| s.path.as_path())
    }

    /// Open segments found deleted since the last call, if any.
    pub fn take_unlinked(&mut self) -> Option<UnlinkedSegments> {
        self.unlinked.take()
    }

    /// Creates a locked temporary file, free of any other process's lock and still linked.
    fn create_locked_temp(&mut self, now_ms: u64) -> io::Result<(File, PathBuf)> {
        let mut raced = 0;
        loop {
            self.seq += 1;
            let name = segment_file_name(now_ms, self.config.pid, self.seq);
            let temp = self.config.dir.join(temp_file_name(&name));
            // 0640: the spool holds request data; the reader runs as the
            // writer's user or its group (or root).
            let file = match OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o640)
                .open(&temp)
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            if let Err(e) = lock_for_writing(&file) {
                let _ = std::fs::remove_file(&temp);
                return Err(e);
            }
            // A cleaner may have taken the name between create and lock.
            if file.metadata()?.nlink() > 0 {
                return Ok((file, temp));
            }
            raced += 1;
            if raced == 3 {
                return Err(io::Error::other(
                    "segment temporary files keep vanishing before they are locked",
                ));
            }
        }
    }

    /// Creates a segment: under a temporary name, locked, header written (and synced), then
    /// linked under its segment name. So a file under a segment name always has a whole
    /// header, and is locked for as long as its writer may append.
    fn open(&mut self, now_ms: u64) -> io::Result<&mut OpenSegment> {
        if !std::mem::replace(&mut self.cleaned, true) {
            // Best effort: debris only costs a few bytes of disk.
            let _ = remove_stale_temp_files(&self.config.dir);
        }
        let header = SegmentHeader {
            writer_pid: self.config.pid,
            created_ms: now_ms,
            fields: self.config.fields.clone(),
        };
        self.scratch.clear();
        encode_header(&header, &mut self.scratch).map_err(io::Error::other)?;
        let (mut file, temp) = self.create_locked_temp(now_ms)?;
        let linked = file
            .write_all(&self.scratch)
            .and_then(|()| match self.config.fsync {
                true => file.sync_data(),
                false => Ok(()),
            })
            .and_then(|()| link_free_name(&temp, &self.config, now_ms, &mut self.seq));
        // The temporary name goes in any case; on success the file keeps its segment name.
        let _ = std::fs::remove_file(&temp);
        let path = linked?;
        if self.config.fsync {
            crate::sync_dir(&self.config.dir)?;
        }
        Ok(self.current.insert(OpenSegment {
            file,
            path,
            len: self.scratch.len() as u64,
            events: 0,
            dropped: 0,
            unsynced: !self.config.fsync,
            link_checked_ms: now_ms,
        }))
    }

    /// Lets go of the open segment if someone deleted it, and records that.
    fn drop_if_unlinked(&mut self) {
        let Some(seg) = self.current.take_if(|s| s.is_unlinked()) else {
            return;
        };
        let count = self.unlinked.as_ref().map_or(0, |u| u.count) + 1;
        self.unlinked = Some(UnlinkedSegments {
            count,
            last: seg.path.clone(),
        });
        seg.release();
    }

    /// Stops appending to the open segment without sealing it: its lock goes, and a reader
    /// finishes it as it is. The next append starts a new segment.
    pub fn abandon(&mut self) {
        if let Some(seg) = self.current.take() {
            seg.release();
        }
    }

    /// Appends a batch of whole frames holding `events` event frames and drop markers
    /// totalling `dropped` events. Opens a segment first if none is open, or if the open one
    /// was found deleted (checked when `now_ms` is a second past the last check, and at each
    /// [`sync`](Self::sync): see [`take_unlinked`](Self::take_unlinked)); seals it after the
    /// batch if it reached `segment_size`, and returns it then.
    ///
    /// On error the segment is abandoned, never cut: [`AppendError::written`] says what of
    /// the batch is in it anyway; the caller counts the rest as dropped.
    pub fn append(
        &mut self,
        frames: &[u8],
        events: u64,
        dropped: u64,
        now_ms: u64,
    ) -> Result<Option<WrittenSegment>, AppendError> {
        if frames.is_empty() {
            return Ok(None);
        }
        if let Some(seg) = self.current.as_mut() {
            // A clock stepping back checks at once too.
            if now_ms.wrapping_sub(seg.link_checked_ms) >= LINK_CHECK_INTERVAL_MS {
                seg.link_checked_ms = now_ms;
                self.drop_if_unlinked();
            }
        }
        let segment_size = self.config.segment_size;
        let seg = match self.current {
            Some(ref mut seg) => seg,
            None => self.open(now_ms).map_err(|source| AppendError {
                source,
                written: FrameCounts::default(),
                abandoned: None,
            })?,
        };
        if let Err((source, done)) = write_all_counted(&mut seg.file, frames) {
            let abandoned = Some(seg.path.clone());
            self.abandon();
            return Err(AppendError {
                source,
                written: count_frames(&frames[..done]),
                abandoned,
            });
        }
        seg.len += frames.len() as u64;
        seg.events += events;
        seg.dropped += dropped;
        seg.unsynced = true;
        if seg.len >= segment_size {
            let path = seg.path.clone();
            return self.seal(now_ms).map_err(|source| AppendError {
                source,
                written: FrameCounts { events, dropped },
                abandoned: Some(path),
            });
        }
        Ok(None)
    }

    /// Flushes the open segment's data to disk (fdatasync), if anything is unsynced. Also
    /// notices an open segment that was deleted, and lets it go.
    pub fn sync(&mut self) -> io::Result<()> {
        self.drop_if_unlinked();
        if let Some(seg) = self.current.as_mut().filter(|s| s.unsynced) {
            seg.file.sync_data()?;
            seg.unsynced = false;
        }
        Ok(())
    }

    /// Writes the seal frame, fsyncs (when configured) and closes the open segment, letting
    /// its lock go. A segment found deleted is let go unsealed and not returned. On error
    /// the segment is abandoned as it is.
    pub fn seal(&mut self, now_ms: u64) -> io::Result<Option<WrittenSegment>> {
        self.drop_if_unlinked();
        let Some(mut seg) = self.current.take() else {
            return Ok(None);
        };
        self.scratch.clear();
        encode_seal(&mut self.scratch, now_ms, seg.events, seg.dropped);
        let sealed = seg.file.write_all(&self.scratch).and_then(|()| {
            seg.len += self.scratch.len() as u64;
            match self.config.fsync {
                true => seg.file.sync_data(),
                false => Ok(()),
            }
        });
        let written = WrittenSegment {
            path: seg.path.clone(),
            bytes: seg.len,
        };
        seg.release();
        sealed.map(|()| Some(written))
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

    #[test]
    fn temp_names_are_not_segment_names() {
        let t = temp_file_name(&segment_file_name(1_764_300_000_123, 77, 3));
        assert_eq!(t, ".1764300000123-77-000003.seg.tmp");
        assert!(is_segment_temp_file_name(&t));
        assert!(!is_segment_file_name(&t));
        for bad in [
            "1764300000123-77-000003.seg",
            ".1764300000123-77-000003.seg",
            "1764300000123-77-000003.seg.tmp",
            ".x.seg.tmp",
        ] {
            assert!(!is_segment_temp_file_name(bad), "{bad}");
        }
    }

    #[test]
    fn counts_whole_frames_of_a_prefix() {
        let mut batch = Vec::new();
        crate::encode_event(&mut batch, 1, [Some(&b"a"[..])]);
        let first = batch.len();
        crate::encode_event(&mut batch, 2, [Some(&b"b"[..])]);
        crate::encode_drop_marker(&mut batch, 3, 5);
        let all = FrameCounts {
            events: 2,
            dropped: 5,
        };
        assert_eq!(count_frames(&batch), all);
        assert_eq!(count_frames(&batch[..batch.len() - 1]).dropped, 0);
        assert_eq!(count_frames(&batch[..first]).events, 1);
        assert_eq!(count_frames(&batch[..first - 1]), FrameCounts::default());
    }
}
