//! The local binlog: after every commit, the same checkpoint as one JSON line, fsynced.
//!
//! The database checkpoint is the truth; the binlog is this node's own record of what it
//! committed and when, for audits and for recovering by hand if the database is lost. Each
//! line is a self-contained, versioned record (`"v": 1`), so a reader needs nothing else and
//! a torn last line (a crash mid-append) is recognisable and skipped. The file is bounded:
//! once it passes `max_bytes` it is renamed to `<name>.1` (replacing the previous one) and a
//! new file starts, so at most about twice `max_bytes` stay on disk.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use logtally_spool::sync_dir;

use crate::db::CheckpointEntry;

/// The record format version written into every line.
pub const BINLOG_VERSION: u32 = 1;

/// Default size after which the binlog rotates.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// One segment's position in a binlog record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogSegment {
    pub segment: String,
    pub offset: u64,
    pub finished: bool,
}

/// One committed flush.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogRecord {
    /// Format version, [`BINLOG_VERSION`].
    pub v: u32,
    /// Flush sequence number of this process run (starts at 1 on each start).
    pub seq: u64,
    /// Commit time, ms since the Unix epoch.
    pub time_ms: u64,
    pub node: String,
    /// Rows upserted by the flush, all rules together.
    pub rows: u64,
    /// Every segment position the checkpoint holds after the commit.
    pub segments: Vec<BinlogSegment>,
}

impl BinlogRecord {
    pub fn new(
        seq: u64,
        time_ms: u64,
        node: &str,
        rows: u64,
        positions: &[CheckpointEntry],
    ) -> Self {
        BinlogRecord {
            v: BINLOG_VERSION,
            seq,
            time_ms,
            node: node.to_string(),
            rows,
            segments: positions
                .iter()
                .map(|p| BinlogSegment {
                    segment: p.segment.clone(),
                    offset: p.offset,
                    finished: p.finished,
                })
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BinlogError {
    #[error("binlog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binlog {path} line {line}: {source}")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "binlog {path} line {line}: format version {version}, this build reads {BINLOG_VERSION}"
    )]
    Version {
        path: PathBuf,
        line: usize,
        version: u32,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BinlogError + '_ {
    move |source| BinlogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The rotated file's path: `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Cuts a torn last line (a crash during an append, never acknowledged) so the next record
/// starts on a line of its own. Returns the file's length afterwards.
fn cut_torn_tail(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    let mut last = [0u8; 1];
    if len == 0 || (file.read_exact_at(&mut last, len - 1).is_ok() && last[0] == b'\n') {
        return Ok(len);
    }
    let mut all = vec![0u8; len as usize];
    file.read_exact_at(&mut all, 0)?;
    let keep = all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64;
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(keep)
}

/// An open binlog, appending.
#[derive(Debug)]
pub struct Binlog {
    path: PathBuf,
    file: File,
    len: u64,
    max_bytes: u64,
}

impl Binlog {
    /// Opens (creating it and its folder, both fsynced) the binlog at `path`.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Binlog, BinlogError> {
        let dir = parent_of(path);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            if let Some(grandparent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(grandparent).map_err(io_err(grandparent))?;
            }
        }
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        if !existed {
            sync_dir(&dir).map_err(io_err(&dir))?;
        }
        let len = cut_torn_tail(&file).map_err(io_err(path))?;
        Ok(Binlog {
            path: path.to_path_buf(),
            file,
            len,
            max_bytes: max_bytes.max(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line and fsyncs it; rotates first if the file is full.
    pub fn append(&mut self, record: &BinlogRecord) -> Result<(), BinlogError> {
        if self.len >= self.max_bytes {
            self.rotate()?;
        }
        let mut line = serde_json::to_vec(record).expect("a binlog record always serializes");
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.len += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), BinlogError> {
        let to = rotated_path(&self.path);
        std::fs::rename(&self.path, &to).map_err(io_err(&self.path))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        let dir = parent_of(&self.path);
        sync_dir(&dir).map_err(io_err(&dir))?;
        self.file = file;
        self.len = 0;
        Ok(())
    }
}

/// Reads every complete record of a binlog file (oldest first), skipping a torn last line.
/// Pass `include_rotated` to read `<path>.1` first.
pub fn read(path: &Path, include_rotated: bool) -> Result<Vec<BinlogRecord>, BinlogError> {
    let mut out = Vec::new();
    if include_rotated {
        let old = rotated_path(path);
        if old.exists() {
            read_file(&old, &mut out)?;
        }
    }
    read_file(path, &mut out)?;
    Ok(out)
}

fn read_file(path: &Path, out: &mut Vec<BinlogRecord>) -> Result<(), BinlogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let complete = buf.last() == Some(&b'\n');
        let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if text.is_empty() {
            continue;
        }
        match serde_json::from_slice::<BinlogRecord>(text) {
            Ok(r) if r.v != BINLOG_VERSION => {
                return Err(BinlogError::Version {
                    path: path.into(),
                    line: line_no,
                    version: r.v,
                })
            }
            Ok(r) => out.push(r),
            // Only the last line may be torn: a crash stopped the append before its newline.
            Err(_) if !complete => return Ok(()),
            Err(source) => {
                return Err(BinlogError::Parse {
                    path: path.into(),
                    line: line_no,
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str, offset: u64) -> CheckpointEntry {
        CheckpointEntry {
            segment: s.into(),
            offset,
            finished: false,
        }
    }

    #[test]
    fn appends_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/binlog");
        let mut b = Binlog::open(&path, DEFAULT_MAX_BYTES).unwrap();
        let r1 = BinlogRecord::new(1, 1000, "n", 3, &[entry("a.seg", 10)]);
        let r2 = BinlogRecord::new(2, 2000, "n", 0, &[entry("a.seg", 20), entry("b.seg", 5)]);
        b.append(&r1).unwrap();
        b.append(&r2).unwrap();
        drop(b);
        assert_eq!(read(&path, true).unwrap(), vec![r1.clone(), r2.clone()]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("{\"v\":1,\"seq\":1,"), "{text}");
        // Reopening appends after what is there.
        let r3 = BinlogRecord::new(1, 3000, "n", 1, &[]);
        Binlog::open(&path, DEFAULT_MAX_BYTES)
            .unwrap()
            .append(&r3)
            .unwrap();
        assert_eq!(read(&path, false).unwrap(), vec![r1, r2, r3]);
    }

    #[test]
    fn torn_last_line_is_skipped_but_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("binlog");
        let mut b = Binlog::open(&path, DEFAULT_MAX_BYTES).unwrap();
        let r1 = BinlogRecord::new(1, 1000, "n", 3, &[entry("a.seg", 10)]);
        b.append(&r1).unwrap();
        drop(b);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"seq\":2,\"ti").unwrap();
        assert_eq!(read(&path, false).unwrap(), vec![r1]);
        f.write_all(b"\n").unwrap();
        assert!(matches!(
            read(&path, false),
            Err(BinlogError::Parse { line: 2, .. })
        ));
    }

    #[test]
    fn reopening_cuts_a_torn_tail_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("binlog");
        let r1 = BinlogRecord::new(1, 1000, "n", 3, &[entry("a.seg", 10)]);
        Binlog::open(&path, DEFAULT_MAX_BYTES)
            .unwrap()
            .append(&r1)
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"se").unwrap();
        let r2 = BinlogRecord::new(1, 2000, "n", 1, &[entry("a.seg", 20)]);
        Binlog::open(&path, DEFAULT_MAX_BYTES)
            .unwrap()
            .append(&r2)
            .unwrap();
        assert_eq!(read(&path, false).unwrap(), vec![r1, r2]);
    }

    #[test]
    fn rotates_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("binlog");
        let mut b = Binlog::open(&path, 200).unwrap();
        for seq in 1..=20 {
            b.append(&BinlogRecord::new(
                seq,
                seq * 10,
                "n",
                1,
                &[entry("a.seg", seq)],
            ))
            .unwrap();
        }
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(cur <= 200 + 120 && old <= 200 + 120, "{cur} {old}");
        let all = read(&path, true).unwrap();
        // Oldest first, ending with the last append, no gaps within what is kept.
        assert_eq!(all.last().unwrap().seq, 20);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert!(all.len() < 20, "rotation dropped the oldest records");
    }

    #[test]
    fn newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("binlog");
        std::fs::write(
            &path,
            b"{\"v\":2,\"seq\":1,\"time_ms\":1,\"node\":\"n\",\"rows\":0,\"segments\":[]}\n",
        )
        .unwrap();
        assert!(matches!(
            read(&path, false),
            Err(BinlogError::Version { version: 2, .. })
        ));
    }
}
