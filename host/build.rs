fn main() {
    ferrotune_build::executable();
    // Where the workspace build puts plugins, for the default search path and `doctor`.
    let libtorch = ferrotune_build::libtorch_lib_dir().unwrap_or_default();
    println!("cargo:rustc-env=FERROTUNE_BUILD_LIBTORCH_DIR={}", libtorch.display());
    native_layer(&libtorch);
}

/// The C++ layer (host/csrc): activation checkpointing always, the c10d Gloo process group
/// when the gloo headers are installed (`apt-get install libgloo-dev`; the torch wheel
/// ships gloo's code but not its headers), and its NCCL backend when, in addition, this
/// libtorch is a CUDA build and the CUDA and NCCL headers are found ([`nccl_headers`]).
/// Sets `cfg(ferrotune_c10d)` when c10d is built and `cfg(ferrotune_nccl)` with NCCL.
fn native_layer(libtorch_lib: &std::path::Path) {
    println!("cargo:rustc-check-cfg=cfg(ferrotune_c10d)");
    println!("cargo:rustc-check-cfg=cfg(ferrotune_nccl)");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=FERROTUNE_GLOO_INCLUDE");
    let Some(root) = libtorch_lib.parent() else { return };
    let include = root.join("include");
    if !include.join("torch").is_dir() {
        println!(
            "cargo:warning=libtorch headers not found under {}: no C++ layer",
            include.display()
        );
        return;
    }
    let gloo = std::env::var("FERROTUNE_GLOO_INCLUDE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| "/usr/include".into());
    let with_c10d = gloo.join("gloo/config.h").is_file();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .flag("-std=c++20")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-missing-field-initializers")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .file("csrc/checkpoint.cpp")
        .file("csrc/attention.cpp");
    let mut with_nccl = false;
    if with_c10d {
        build.define("USE_C10D_GLOO", None).include(&gloo).file("csrc/c10d.cpp");
        println!("cargo:rustc-cfg=ferrotune_c10d");
        match nccl_headers(libtorch_lib, &include) {
            Ok(dirs) => {
                // ProcessGroupNCCL.hpp compiles to nothing without USE_C10D_NCCL; no other
                // define is needed (USE_CUDA is not read by the headers c10d.cpp includes).
                build.define("USE_C10D_NCCL", None).flag_if_supported("-Wno-interference-size");
                for d in &dirs {
                    build.include(d);
                }
                println!("cargo:rustc-cfg=ferrotune_nccl");
                with_nccl = true;
            }
            Err(why) => println!("cargo:warning=building c10d without NCCL: {why}"),
        }
    } else {
        println!("cargo:warning=gloo headers not found ({}): building without the c10d process group (apt-get install libgloo-dev)", gloo.join("gloo").display());
    }
    build.compile("ferrotune_native");
    println!("cargo:rustc-link-search=native={}", libtorch_lib.display());
    if with_nccl {
        // ProcessGroupNCCL lives in libtorch_cuda, c10::cuda::set_device in libc10_cuda.
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// Include directories for the NCCL backend, or why it cannot be built.
///
/// ProcessGroupNCCL.hpp pulls in the CUDA runtime headers (cuda_runtime_api.h and the
/// `crt/` and `nv/target` headers it includes) and nccl.h. PyPI's torch CUDA wheel brings
/// `nvidia/cu13/include` (CUDA runtime) and `nvidia/nccl/include` next to `torch/` in
/// site-packages; `crt/` and `nv/` come from the small `nvidia-cuda-crt` and
/// `nvidia-cuda-cccl` wheels (pinned in requirements/torch.txt) that install into the same
/// folder. `FERROTUNE_CUDA_INCLUDE` and `FERROTUNE_NCCL_INCLUDE` (`:`-separated lists of
/// folders) replace those defaults, e.g. `/usr/local/cuda/include` of a CUDA toolkit.
fn nccl_headers(
    libtorch_lib: &std::path::Path,
    torch_include: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, String> {
    use std::path::PathBuf;
    println!("cargo:rerun-if-env-changed=FERROTUNE_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=FERROTUNE_NCCL_INCLUDE");
    if !ferrotune_build::cuda_libtorch(libtorch_lib) {
        return Err(format!(
            "{} is not a CUDA libtorch (no libtorch_cuda.so)",
            libtorch_lib.display()
        ));
    }
    if !torch_include.join("torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp").is_file() {
        return Err("this libtorch has no ProcessGroupNCCL.hpp".into());
    }
    // lib/ -> torch/ -> site-packages/
    let site =
        libtorch_lib.parent().and_then(|p| p.parent()).map(PathBuf::from).unwrap_or_default();
    let dirs = |var: &str, default: PathBuf| -> Vec<PathBuf> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => std::env::split_paths(&v).collect(),
            _ => vec![default],
        }
    };
    let cuda = dirs("FERROTUNE_CUDA_INCLUDE", site.join("nvidia/cu13/include"));
    let nccl = dirs("FERROTUNE_NCCL_INCLUDE", site.join("nvidia/nccl/include"));
    // Rebuild when headers appear there (`make setup` after a build without them).
    for d in cuda.iter().chain(&nccl).filter(|d| d.is_dir()) {
        println!("cargo:rerun-if-changed={}", d.display());
    }
    let find = |set: &[PathBuf], file: &str| set.iter().any(|d| d.join(file).is_file());
    let show =
        |set: &[PathBuf]| set.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    let mut missing = Vec::new();
    for f in ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"] {
        if !find(&cuda, f) {
            missing.push(format!("{f} (CUDA headers, searched {})", show(&cuda)));
        }
    }
    if !find(&nccl, "nccl.h") {
        missing.push(format!("nccl.h (searched {})", show(&nccl)));
    }
    if !missing.is_empty() {
        return Err(format!(
            "missing {}; `make setup` installs the pinned nvidia-cuda-crt and nvidia-cuda-cccl wheels, \
             or set FERROTUNE_CUDA_INCLUDE / FERROTUNE_NCCL_INCLUDE",
            missing.join(", ")
        ));
    }
    Ok(cuda.into_iter().chain(nccl).collect())
}
