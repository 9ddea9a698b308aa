//! Writing files so that no reader ever sees half of one: write a temporary file in the same
//! folder, then rename it over the destination (atomic on one file system). A write that fails
//! removes its temporary ([`write_with`], [`TempGuard`]); temporaries a killed process left
//! behind are recognised by name ([`is_stale_temp`]) and removed by the next run.
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

/// Whether `name` is a temporary of [`temp_path`] (`.NAME.tmp-PID`) whose process is gone (no
/// `/proc/PID`; without procfs, any other process's): what a killed writer left behind.
pub fn is_stale_temp(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix('.')
        .and_then(|n| n.rsplit_once(".tmp-"))
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
    else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    let proc = Path::new("/proc");
    !proc.join("self").exists() || !proc.join(pid.to_string()).exists()
}

/// A temporary file or folder that is removed when the guard is dropped, unless
/// [`TempGuard::keep`] was called (after it was renamed into place): a write that fails half
/// way (disk full) returns its error and leaves nothing behind.
pub struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    /// The temporary is in place (renamed): nothing to remove.
    pub fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let removed =
                if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            if let Err(e) = removed {
                if p.exists() {
                    tracing::warn!("cannot remove the temporary {}: {e}", p.display());
                }
            }
        }
    }
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

    #[test]
    fn a_guarded_temporary_folder_is_removed_unless_kept() {
        let dir = std::env::temp_dir().join(format!("ferrotune-guard-{}", std::process::id()));
        let tmp = dir.join(".checkpoint-2.tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let fill = |tmp: &Path| -> Result<()> {
            let _guard = TempGuard::new(tmp.to_path_buf());
            std::fs::write(tmp.join("optimizer.safetensors"), [0u8; 64])?;
            anyhow::bail!("No space left on device")
        };
        assert!(fill(&tmp).is_err());
        assert!(!tmp.exists(), "the failed write removed its temporary folder");
        std::fs::create_dir_all(&tmp).unwrap();
        TempGuard::new(tmp.clone()).keep();
        assert!(tmp.is_dir(), "a kept temporary stays");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn stale_temporaries_are_those_of_processes_that_are_gone() {
        let ours = temp_path(Path::new("/x/metrics.jsonl"));
        let ours = ours.file_name().unwrap().to_str().unwrap();
        assert!(ours.starts_with(".metrics.jsonl.tmp-"));
        assert!(!is_stale_temp(ours), "this process's own temporary is not stale");
        // pid_max is at most 2^22 on Linux: this process cannot exist.
        assert!(is_stale_temp(".metrics.jsonl.tmp-99999999"));
        assert!(!is_stale_temp("metrics.jsonl"));
        assert!(!is_stale_temp(".metrics.jsonl.tmp-abc"));
        assert!(!is_stale_temp(".hidden"));
    }
}
