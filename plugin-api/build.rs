//! Records the build fingerprint (libtorch version, C++ ABI flag) that every plugin carries,
//! re-exports the libtorch directory to dependents, and compiles `csrc/optim.cpp` (the fused
//! AdamW and `_foreach` kernels tch does not bind) against the headers beside that `lib/`.
use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["LIBTORCH_USE_PYTORCH", "LIBTORCH", "LIBTORCH_CXX11_ABI", "DEP_TCH_LIBTORCH_LIB"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_default();
    println!("cargo:libtorch_lib={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");

    let (version, abi) = probe(Path::new(&lib));
    println!("cargo:rustc-env=FERROTUNE_LIBTORCH_VERSION={version}");
    println!("cargo:rustc-env=FERROTUNE_CXX11_ABI={abi}");
    compile_optim(Path::new(&lib), &abi);
}

/// `csrc/optim.cpp`, linked into every crate that calls `optim`'s multi-tensor steps.
fn compile_optim(lib: &Path, abi: &str) {
    println!("cargo:rerun-if-changed=csrc/optim.cpp");
    let include = lib.parent().unwrap_or(Path::new(".")).join("include");
    assert!(
        include.join("ATen/ATen.h").is_file(),
        "libtorch headers not found under {}: build with LIBTORCH_USE_PYTORCH=1 (or LIBTORCH)",
        include.display()
    );
    cc::Build::new()
        .cpp(true)
        .file("csrc/optim.cpp")
        .include(&include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi)
        .warnings(false)
        .extra_warnings(false)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("ferrotune_optim");
}

/// (libtorch version, "1"/"0" C++11 ABI) of the libtorch in `lib` (its `lib/` folder).
fn probe(lib: &Path) -> (String, String) {
    let root = lib.parent().unwrap_or(Path::new("."));
    // PyPI wheel: torch/version.py; standalone libtorch: build-version.
    let mut version = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
            })
        })
        .or_else(|| {
            std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    let mut abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args(["-c", "import torch; print(torch.__version__); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"])
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            if let (Some(v), Some(a)) = (lines.next(), lines.next()) {
                version = v.trim().to_string();
                abi = a.trim().to_string();
            }
        }
    }
    (version, abi)
}
