//! The spool folder: the configuration-time check (no side effects: `nginx -t` runs it
//! too), and the owner and mode the master gives the folder once nginx has created it
//! (through `ngx_add_path`, as nginx's temp folders: 0700 and the worker user).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The mode bits the spool folder always gets: rwx for its group, so a reader running as
/// another user in that group (the sidecar) can read and delete segments, and setgid, so
/// the segments the workers create belong to the folder's group too.
pub const GROUP_BITS: u32 = 0o2070;

/// What [`settle`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    pub group_changed: bool,
    pub mode_changed: bool,
}

/// Gives the spool folder its documented owner and mode: the group bits [`GROUP_BITS`]
/// added (none taken away), and, when `worker_group` is given, the worker's group when the
/// folder still has `master_group` (what the master's `mkdir` left: a group an operator
/// chose is kept). nginx made the worker user its owner already.
pub fn settle(
    dir: &Path,
    worker_group: Option<u32>,
    master_group: u32,
) -> std::io::Result<Settled> {
    let meta = std::fs::metadata(dir)?;
    let mut done = Settled::default();
    if let Some(gid) = worker_group {
        if meta.gid() == master_group && gid != master_group {
            std::os::unix::fs::chown(dir, None, Some(gid))?;
            done.group_changed = true;
        }
    }
    // After chown, which may clear the setgid bit.
    let mode = std::fs::metadata(dir)?.mode() & 0o7777;
    if mode & GROUP_BITS != GROUP_BITS {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | GROUP_BITS))?;
        done.mode_changed = true;
    }
    Ok(done)
}

fn writable(p: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: c is a valid NUL-terminated path; access() only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is not writable: {}",
            p.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Checks that `dir` is a writable folder, or does not exist yet and its parent is one.
/// The error says why not, for the directive's message.
pub fn check(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => writable(dir),
        Ok(_) => Err("exists and is not a folder".into()),
        // ENOTDIR: some ancestor is a file; the parent check below says which.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            let parent = dir.parent().ok_or("has no parent folder")?;
            match std::fs::metadata(parent) {
                Ok(m) if m.is_dir() => {
                    writable(parent).map_err(|e| format!("cannot be created: {e}"))
                }
                Ok(_) => Err(format!(
                    "cannot be created: \"{}\" is not a folder",
                    parent.display()
                )),
                Err(e) => Err(format!("cannot be created: \"{}\": {e}", parent.display())),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(check(tmp.path()), Ok(()));
        assert_eq!(check(&tmp.path().join("new")), Ok(()));
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check(&file).unwrap_err().contains("not a folder"));
        assert!(check(&file.join("sub"))
            .unwrap_err()
            .contains("not a folder"));
        assert!(check(&tmp.path().join("a/b")).is_err());
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn settling_adds_the_group_bits_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let gid = std::fs::metadata(&dir).unwrap().gid();
        // Without a worker group (an unprivileged master) only the mode changes.
        let done = settle(&dir, None, gid).unwrap();
        assert_eq!(mode(&dir), 0o2770);
        assert!(done.mode_changed && !done.group_changed);
        assert_eq!(settle(&dir, None, gid).unwrap(), Settled::default());
        // Others' bits an operator gave stay.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        settle(&dir, None, gid).unwrap();
        assert_eq!(mode(&dir), 0o2775);
        // A group that is not the master's is the operator's choice: kept.
        assert!(!settle(&dir, Some(gid + 1), gid + 2).unwrap().group_changed);
        assert_eq!(std::fs::metadata(&dir).unwrap().gid(), gid);
        assert!(settle(&tmp.path().join("missing"), None, gid).is_err());
    }
}
