//! Devices as a config/CLI choice (`cpu`, `cuda`, `cuda:N`) and what this build can run on.
use ferrotune_plugin_api::fingerprint::BuildFingerprint;
use ferrotune_plugin_api::tensor::{device_name, parse_device};
use tch::Device;

/// Parses a device name and checks this process can use it.
pub fn resolve(text: &str) -> anyhow::Result<Device> {
    let device = parse_device(text).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    if let Device::Cuda(i) = device {
        if !tch::Cuda::is_available() {
            anyhow::bail!(
                "device `{text}` requested but CUDA is not available here ({}; libtorch_cuda linked: {}). \
                 Use --device cpu, or run on a machine with a GPU and a CUDA build of torch {}",
                runtime_summary(),
                if cuda_linked() { "yes" } else { "no" },
                BuildFingerprint::current().libtorch_version.split('+').next().unwrap_or("")
            );
        }
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            anyhow::bail!("device `{text}` requested but this machine has {n} CUDA device(s) (cuda:0..cuda:{})", n.saturating_sub(1));
        }
    }
    Ok(device)
}

/// [`resolve_for_rank`] for a given `LOCAL_RANK` (`None`: not launched).
pub fn resolve_for_local_rank(text: &str, local_rank: Option<usize>) -> anyhow::Result<Device> {
    match local_rank {
        Some(r) if is_plain_cuda(text) => resolve(&format!("cuda:{r}")).map_err(|e| {
            anyhow::anyhow!("device `{text}` of the rank with LOCAL_RANK={r} means cuda:{r}: {e:#}")
        }),
        _ => resolve(text),
    }
}

/// Whether `text` names CUDA without a device index (`cuda`, `gpu`).
pub fn is_plain_cuda(text: &str) -> bool {
    matches!(text.trim().to_ascii_lowercase().as_str(), "cuda" | "gpu")
}

/// Whether the binary was linked against libtorch_cuda (the build found a CUDA libtorch).
pub fn cuda_linked() -> bool {
    cfg!(ferrotune_cuda_linked)
}

/// One line: CUDA availability and device count.
pub fn runtime_summary() -> String {
    if tch::Cuda::is_available() {
        format!(
            "CUDA available, {} device(s), cuDNN {}",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() { "yes" } else { "no" }
        )
    } else {
        "CUDA not available".to_string()
    }
}

/// The `doctor` report: build fingerprint, libtorch location, devices.
pub fn doctor_report() -> Vec<(String, String)> {
    let fp = BuildFingerprint::current();
    let mut rows = vec![
        ("ferrotune".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("plugin-api".to_string(), fp.api_version.clone()),
        ("tch".to_string(), fp.tch_version.clone()),
        ("libtorch (built against)".to_string(), fp.libtorch_version.clone()),
        ("libtorch dir (build)".to_string(), env!("FERROTUNE_BUILD_LIBTORCH_DIR").to_string()),
        ("C++11 ABI".to_string(), if fp.cxx11_abi { "on".into() } else { "off".into() }),
        (
            "libtorch_cuda linked".to_string(),
            if cuda_linked() { "yes".into() } else { "no".into() },
        ),
        ("CUDA".to_string(), runtime_summary()),
    ];
    if let Some(lib) = loaded_libtorch_path() {
        rows.push(("libtorch_cpu loaded from".to_string(), lib));
    }
    rows.push(("threads".to_string(), tch::get_num_threads().to_string()));
    rows.push(("default device".to_string(), device_name(Device::cuda_if_available())));
    rows
}

/// Where the dynamic loader found libtorch_cpu.so (LD_LIBRARY_PATH wins over RUNPATH).
fn loaded_libtorch_path() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|l| {
        l.split_whitespace().last().filter(|p| p.ends_with("libtorch_cpu.so")).map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_resolves_and_bad_names_explain() {
        assert_eq!(resolve("cpu").unwrap(), Device::Cpu);
        let e = resolve("tpu:0").unwrap_err().to_string();
        assert!(e.contains("tpu:0") && e.contains("cuda:N"), "{e}");
        if !tch::Cuda::is_available() {
            let e = resolve("cuda").unwrap_err().to_string();
            assert!(e.contains("CUDA is not available"), "{e}");
        }
    }

    #[test]
    fn plain_cuda_means_the_local_rank_gpu() {
        assert!(is_plain_cuda(" CUDA ") && is_plain_cuda("gpu"));
        assert!(!is_plain_cuda("cuda:0") && !is_plain_cuda("cpu"));
        assert_eq!(resolve_for_local_rank("cpu", Some(3)).unwrap(), Device::Cpu);
        if tch::Cuda::is_available() {
            let n = tch::Cuda::device_count() as usize;
            assert_eq!(resolve_for_local_rank("cuda", Some(n - 1)).unwrap(), Device::Cuda(n - 1));
            assert_eq!(resolve_for_local_rank("cuda:0", Some(n - 1)).unwrap(), Device::Cuda(0));
            let e = resolve_for_local_rank("cuda", Some(n)).unwrap_err().to_string();
            assert!(e.contains(&format!("LOCAL_RANK={n} means cuda:{n}")), "{e}");
        } else {
            let e = resolve_for_local_rank("cuda", Some(1)).unwrap_err().to_string();
            assert!(
                e.contains("LOCAL_RANK=1 means cuda:1") && e.contains("CUDA is not available"),
                "{e}"
            );
            let e = resolve_for_local_rank("cuda", None).unwrap_err().to_string();
            assert!(!e.contains("LOCAL_RANK"), "{e}");
        }
    }
}
