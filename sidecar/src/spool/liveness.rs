//! Whether an unsealed segment's writer is gone, and whether the spool folder's file system
//! can tell.
//!
//! The rule is the writer lock (spool/FORMAT.md, *Writer lock*): a writer holds an exclusive
//! `flock` on its open segment for as long as it may append, and the kernel lets go when it
//! seals, abandons or dies. A segment is finished when it is sealed, or when its lock is free
//! and its bytes end; a held lock is never finished, however long the segment stays quiet.
//! The order matters: the tailer asks [`writer_gone`] *before* it looks at the file's size
//! and reads to its end, so the bytes it reads after seeing the lock free are all there will
//! ever be. No pid, no clock: this works across pid namespaces, `hidepid=`, pid reuse and
//! clock steps.
//!
//! The lock means something only where one kernel decides it: [`check_file_system`] refuses
//! a spool folder on a network file system and warns on FUSE.

use std::fs::File;
use std::io;
use std::path::Path;

use logtally_spool::{spool_file_system, writer_lock_state, FileSystemKind, WriterLock};
use tracing::warn;

/// Whether no writer holds the lock of the segment `file` is open on. Ask before reading the
/// size: bytes read after a `true` are the segment's last.
pub(super) fn writer_gone(file: &File) -> io::Result<bool> {
    Ok(writer_lock_state(file)? == WriterLock::Free)
}

/// The spool folder is on a file system whose locks this kernel does not decide.
#[derive(Debug, thiserror::Error)]
pub enum FileSystemError {
    #[error(
        "spool_dir {dir} is on a network file system ({kind}): writer locks are not reliable \
         there, so a live segment could be taken for finished; put the spool on a local file \
         system (ext4, xfs, tmpfs, a volume of this host)"
    )]
    Network { dir: String, kind: &'static str },
    #[error("spool_dir {dir}: cannot tell its file system: {source}")]
    Statfs {
        dir: String,
        #[source]
        source: io::Error,
    },
}

/// Checks that `dir` is on a local file system: `Err` on a network one, a warning on FUSE
/// (local or remote depending on its server). Returns the kind found.
pub fn check_file_system(dir: &Path) -> Result<FileSystemKind, FileSystemError> {
    let shown = || dir.display().to_string();
    let kind = spool_file_system(dir).map_err(|source| FileSystemError::Statfs {
        dir: shown(),
        source,
    })?;
    match kind {
        FileSystemKind::Network(kind) => Err(FileSystemError::Network { dir: shown(), kind }),
        FileSystemKind::Fuse => {
            warn!(
                spool = %dir.display(),
                "spool_dir is on a FUSE file system: writer locks hold only if its server \
                 enforces them for every container that opens the spool; prefer a local file \
                 system"
            );
            Ok(kind)
        }
        FileSystemKind::Local => Ok(kind),
    }
}
