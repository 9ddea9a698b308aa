//! This process's memory figures from `/proc/self/status` (Linux), for benchmarks and the
//! `peak_rss` of a run's metrics.
use anyhow::{Context, Result};

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`); `None` off Linux.
pub fn proc_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    line[key.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux ≥ 4.0: writing 5 to
/// `/proc/self/clear_refs`).
pub fn reset_peak_rss() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("cannot reset the peak RSS (/proc/self/clear_refs)")
}

/// KiB as MiB (NaN when the figure is unknown).
pub fn mib(kib: Option<u64>) -> f64 {
    kib.map(|k| k as f64 / 1024.0).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields() {
        if cfg!(target_os = "linux") {
            let (rss, hwm) = (proc_status_kib("VmRSS").unwrap(), proc_status_kib("VmHWM").unwrap());
            assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
        }
        assert_eq!(proc_status_kib("NoSuchField"), None);
    }
}
