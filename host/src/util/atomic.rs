//! Writing files so that no reader ever sees half of one: write a temporary file in the same
//! folder, then rename it over the destination (atomic on one file system).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temporary name next to `path` (`.name.tmp-<pid>`), on the same file system.
pub fn temp_path(path: &Path) -> PathBuf {
    let name =
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Runs `write` on a temporary path next to `path`, then renames the result to `path`. On
/// failure the temporary file is removed and `path` is left as it was.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_with(path, |tmp| {
        std::fs::write(tmp, bytes.as_ref())
            .with_context(|| format!("cannot write {}", tmp.display()))
    })
}

/// Copies `from` to `to` atomically.
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    write_with(to, |tmp| {
        std::fs::copy(from, tmp)
            .map(|_| ())
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ferrotune-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write(&p, "old").unwrap();
        let e = write_with(&p, |tmp| {
            std::fs::write(tmp, "half")?;
            anyhow::bail!("disk full")
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old");
        assert!(!temp_path(&p).exists());
        write(&p, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        std::fs::remove_dir_all(dir).ok();
    }
}
