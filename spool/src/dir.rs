//! The spool folder's entries on disk.

use std::fs::File;
use std::io;
use std::path::Path;

/// Makes the entries of folder `dir` durable: fsyncs the folder itself, so a file created,
/// renamed or removed in it stays so after a power loss (fsyncing a file does not make its
/// name durable). Used wherever logtally creates, renames or removes a file that matters:
/// segments, the sidecar's binlog.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
