//! The configuration-time check of the spool folder. It has no side effects (`nginx -t`
//! runs it too); the master creates the folder afterwards through `ngx_add_path` and hands
//! it to the worker user, the way nginx treats its temp folders.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
}
