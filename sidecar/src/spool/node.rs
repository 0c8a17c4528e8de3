//! The node id stored in the spool folder: whose checkpoint rows the spool's segments have.
//!
//! The checkpoint belongs to the spool, not to the machine: a new hostname or a recreated
//! container must never make a sidecar read a spool again from its start under a new name.
//! So with `node` unset the sidecar stores an id in the spool folder once, file
//! [`NODE_FILE`] (the id and a newline, nothing else), and uses it from then on without
//! looking at the hostname again. The first id is the hostname: a spool that a sidecar of
//! an earlier version counted under its hostname keeps its checkpoint rows. A configured
//! `node` is stored the same way when nothing is stored yet, and refused when it differs
//! from the stored one.
//!
//! Created atomically: written to a temporary name, fsynced, hard-linked under its name (a
//! link never replaces a file, so of two sidecars starting at once one wins and the other
//! reads its id), the temporary name removed, the folder fsynced.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use logtally_spool::sync_dir;

/// The file in the spool folder holding the node id.
pub const NODE_FILE: &str = "logtally-node";
/// Longest node id, in bytes.
const MAX_NODE_LEN: usize = 255;

/// Why the node id cannot be settled.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "node {configured:?} is configured, but the spool folder belongs to node {stored:?} \
         ({path}): its checkpoint rows are under that name. Set node = {stored:?} (or remove \
         node to use the stored one); to count this spool as a new node, stop the sidecar, \
         empty the spool folder and delete {path}"
    )]
    Mismatch {
        path: String,
        stored: String,
        configured: String,
    },
    #[error("{path}: {problem}; fix or delete the file (it holds only the node id)")]
    Bad { path: String, problem: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("no node id stored in {dir} and cannot determine the hostname; set node")]
    NoHostname { dir: String },
}

/// The node this sidecar counts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub id: String,
    /// Stored by this call (else it was stored before).
    pub created: bool,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks a node id as stored or configured.
fn validate(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("the node id is empty");
    }
    if id.len() > MAX_NODE_LEN {
        return Err("the node id is longer than 255 bytes");
    }
    if id.chars().any(char::is_control) || id.trim() != id {
        return Err("the node id has control characters or surrounding spaces");
    }
    Ok(())
}

/// The id stored in spool folder `dir`, if any.
pub fn stored(dir: &Path) -> Result<Option<String>, NodeError> {
    let path = dir.join(NODE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(NodeError::Bad {
                path: path.display().to_string(),
                problem: "not UTF-8",
            })
        }
        Err(e) => return Err(io_error(&path)(e)),
    };
    let id = text.strip_suffix('\n').unwrap_or(&text);
    validate(id).map_err(|problem| NodeError::Bad {
        path: path.display().to_string(),
        problem,
    })?;
    Ok(Some(id.to_string()))
}

/// Settles the node of spool folder `dir`: the stored id (refusing a `configured` one that
/// differs), else `configured` or else the hostname, stored now. `hostname` is called only
/// when nothing is stored and nothing configured.
pub fn resolve(
    dir: &Path,
    configured: Option<&str>,
    hostname: impl FnOnce() -> Option<String>,
) -> Result<NodeId, NodeError> {
    if let Some(id) = stored(dir)? {
        return settle(dir, id, configured);
    }
    let id = match configured {
        Some(c) => c.to_string(),
        None => hostname().ok_or_else(|| NodeError::NoHostname {
            dir: dir.display().to_string(),
        })?,
    };
    let path = dir.join(NODE_FILE);
    validate(&id).map_err(|problem| NodeError::Bad {
        path: path.display().to_string(),
        problem,
    })?;
    if store(dir, &id)? {
        return Ok(NodeId { id, created: true });
    }
    // Another sidecar stored one first: that one holds.
    let id = stored(dir)?
        .ok_or_else(|| io_error(&path)(io::Error::new(io::ErrorKind::NotFound, "vanished")))?;
    settle(dir, id, configured)
}

/// The stored id, unless a configured one differs.
fn settle(dir: &Path, stored: String, configured: Option<&str>) -> Result<NodeId, NodeError> {
    match configured {
        Some(c) if c != stored => Err(NodeError::Mismatch {
            path: dir.join(NODE_FILE).display().to_string(),
            stored,
            configured: c.to_string(),
        }),
        _ => Ok(NodeId {
            id: stored,
            created: false,
        }),
    }
}

/// Stores `id` atomically; `Ok(false)` when a node file appeared meanwhile.
fn store(dir: &Path, id: &str) -> Result<bool, NodeError> {
    let path = dir.join(NODE_FILE);
    let tmp: PathBuf = dir.join(format!(".{NODE_FILE}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()
    };
    write().map_err(io_error(&tmp))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io_error(&path)(e)),
    }
    sync_dir(dir).map_err(io_error(dir))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_once_then_the_stored_id() {
        let dir = tempfile::tempdir().unwrap();
        let n = resolve(dir.path(), None, || Some("edge-1".into())).unwrap();
        assert_eq!(
            n,
            NodeId {
                id: "edge-1".into(),
                created: true
            }
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(NODE_FILE)).unwrap(),
            "edge-1\n"
        );
        // A new hostname later: never asked.
        let n = resolve(dir.path(), None, || panic!("hostname read")).unwrap();
        assert_eq!(
            n,
            NodeId {
                id: "edge-1".into(),
                created: false
            }
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![NODE_FILE], "no temporary file left");
    }

    #[test]
    fn configured_is_stored_and_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let n = resolve(dir.path(), Some("a"), || panic!("hostname read")).unwrap();
        assert_eq!(
            n,
            NodeId {
                id: "a".into(),
                created: true
            }
        );
        assert_eq!(resolve(dir.path(), Some("a"), || None).unwrap().id, "a");
        let e = resolve(dir.path(), Some("b"), || None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("node \"b\" is configured, but the spool folder belongs to node \"a\""),
            "{e}"
        );
        assert!(e.contains(NODE_FILE), "{e}");
    }

    #[test]
    fn bad_file_and_no_hostname() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(dir.path(), None, || None).unwrap_err().to_string();
        assert!(e.contains("cannot determine the hostname; set node"), "{e}");
        std::fs::write(dir.path().join(NODE_FILE), "\n").unwrap();
        let e = resolve(dir.path(), None, || None).unwrap_err().to_string();
        assert!(e.ends_with("logtally-node: the node id is empty; fix or delete the file (it holds only the node id)"), "{e}");
        assert_eq!(stored(tempfile::tempdir().unwrap().path()).unwrap(), None);
    }
}
