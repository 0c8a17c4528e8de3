//! Writer liveness: the lock a writer holds on its open segment, and the file systems on
//! which that lock means something.
//!
//! A writer holds an exclusive `flock` on its open segment for as long as it may append to
//! it, and lets go only once it has sealed or abandoned it; the kernel lets go when the
//! writer dies. So a reader in another container, another pid namespace, or behind
//! `hidepid=` can still tell a quiet live segment from a dead one, and pid reuse fools
//! nobody. `flock` and not a POSIX record lock: record locks belong to a process and vanish
//! when it closes *any* descriptor of the file, and std offers `flock` without `unsafe`.
//! `flock` locks belong to the open file description, which `O_CLOEXEC` (std's default)
//! keeps out of exec'd children.

use std::fs::{File, TryLockError};
use std::io;
use std::path::Path;
use std::time::Duration;

/// What a reader learns from a segment's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterLock {
    /// A writer holds the segment and may still append: the segment is not finished, however
    /// long it stays quiet.
    Held,
    /// No writer holds it: it was sealed, abandoned after a failed write, or its writer died.
    /// Bytes read *after* seeing this are all the segment will ever hold.
    Free,
}

/// Tells whether a writer holds the lock of the segment `file` is open on (the reader's own
/// descriptor; read access is enough).
///
/// It takes a shared lock without waiting and gives it back at once, so a writer never
/// waits on a reader. To decide that a segment is finished, call this first and read to the
/// end of the file afterwards: a writer may append right up to the moment it lets go, so
/// bytes read before seeing [`WriterLock::Free`] may not be the last.
pub fn writer_lock_state(file: &File) -> io::Result<WriterLock> {
    match file.try_lock_shared() {
        Ok(()) => {
            file.unlock()?;
            Ok(WriterLock::Free)
        }
        Err(TryLockError::WouldBlock) => Ok(WriterLock::Held),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// How many times, and how long apart, a writer tries to lock a file it has just created.
/// Only a cleaner looking at a temporary file (see `remove_stale_temp_files`) can hold it,
/// for the time of one unlink.
const LOCK_ATTEMPTS: u32 = 100;
const LOCK_RETRY: Duration = Duration::from_millis(2);

/// Takes the writer's exclusive lock, retrying briefly while someone else holds it.
pub(crate) fn lock_for_writing(file: &File) -> io::Result<()> {
    for _ in 1..LOCK_ATTEMPTS {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) => std::thread::sleep(LOCK_RETRY),
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    file.try_lock().map_err(io::Error::from)
}

/// What kind of file system a spool folder is on, as far as its lock is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSystemKind {
    /// A local file system (ext4, xfs, btrfs, tmpfs, overlayfs, … and anything not known to
    /// be otherwise): one kernel sees every lock.
    Local,
    /// A network or cluster file system, named: locks are not reliable there (`flock` over
    /// NFS is emulated with server-side record locks that a lease expiry or a client
    /// reboot can lose), so a reader may finish a live segment. The spool must not be here.
    Network(&'static str),
    /// A FUSE file system: local or remote depending on what serves it (sshfs, a
    /// container runtime's host share); locks may be enforced by the FUSE server or only
    /// by this kernel. Warn.
    Fuse,
}

/// `statfs` `f_type` magic numbers (`linux/magic.h` and the file systems' own headers) of
/// file systems whose locks other machines, or a server, decide.
const NETWORK_FILE_SYSTEMS: &[(u32, &str)] = &[
    (0x0000_6969, "nfs"),
    (0x0000_517B, "smb"),
    (0xFF53_4D42, "cifs"),
    (0xFE53_4D42, "smb2"),
    (0x00C3_6400, "ceph"),
    (0x5346_414F, "afs"),
    (0x6B41_4653, "afs"),
    (0x7375_7245, "coda"),
    (0x0102_1997, "9p"),
    (0x0000_564C, "ncp"),
    (0x0116_1970, "gfs2"),
    (0x7461_636F, "ocfs2"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
];
const FUSE_SUPER_MAGIC: u32 = 0x6573_5546;

/// Classifies a `statfs` `f_type` (its low 32 bits: every magic number fits, and 32-bit
/// targets report it as a signed 32-bit word).
pub fn classify_file_system(f_type: u32) -> FileSystemKind {
    if f_type == FUSE_SUPER_MAGIC {
        return FileSystemKind::Fuse;
    }
    NETWORK_FILE_SYSTEMS
        .iter()
        .find(|(magic, _)| *magic == f_type)
        .map_or(FileSystemKind::Local, |(_, name)| {
            FileSystemKind::Network(name)
        })
}

/// The kind of file system `dir` is on (`statfs`, through rustix's safe wrapper: std has no
/// `statfs`, and this crate has no `unsafe`).
pub fn spool_file_system(dir: &Path) -> io::Result<FileSystemKind> {
    let stat = rustix::fs::statfs(dir)?;
    // Truncation wanted: magic numbers are 32-bit, and sign-extended on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    Ok(classify_file_system(stat.f_type as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_magic_numbers() {
        assert_eq!(classify_file_system(0xEF53), FileSystemKind::Local); // ext4
        assert_eq!(classify_file_system(0x0102_1994), FileSystemKind::Local); // tmpfs
        assert_eq!(classify_file_system(0x794C_7630), FileSystemKind::Local); // overlayfs
        assert_eq!(classify_file_system(0x6969), FileSystemKind::Network("nfs"));
        assert_eq!(
            classify_file_system(0xFF53_4D42),
            FileSystemKind::Network("cifs")
        );
        assert_eq!(classify_file_system(0x6573_5546), FileSystemKind::Fuse);
        // A 32-bit target's signed f_type, truncated as spool_file_system does.
        let signed: i32 = 0xFF53_4D42_u32 as i32;
        assert_eq!(
            classify_file_system(i64::from(signed) as u32),
            FileSystemKind::Network("cifs")
        );
    }
}
