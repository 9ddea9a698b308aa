//! Build-script helper shared by the host, the plugins and the test crates.
//!
//! torch-sys passes `-Wl,-rpath` only to its own C++ compile step, so a binary or plugin
//! that links libtorch has no RUNPATH and fails with "libtorch_cpu.so: cannot open shared
//! object file" unless LD_LIBRARY_PATH is set (see LIBTORCH-NOTES.md). Each crate that
//! links libtorch calls one function of this crate from its `build.rs`.
//!
//! The libtorch directory comes from `ferrotune-plugin-api`'s build script, which
//! re-exports torch-sys's `libtorch_lib` under its own `links` key, so a plugin needs to
//! depend on plugin-api only (`DEP_FERROTUNE_PLUGIN_API_LIBTORCH_LIB`). Crates that depend
//! on torch-sys directly can use `DEP_TCH_LIBTORCH_LIB` instead.

use std::path::PathBuf;

/// The libtorch `lib/` directory this build links against, if known.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    for var in ["DEP_FERROTUNE_PLUGIN_API_LIBTORCH_LIB", "DEP_TCH_LIBTORCH_LIB"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Ok(dir) = std::env::var(var) {
            if !dir.is_empty() {
                return Some(PathBuf::from(dir));
            }
        }
    }
    None
}

/// For a plugin (cdylib): RUNPATH to libtorch so the library also loads outside the host.
pub fn plugin() {
    if let Some(dir) = libtorch_lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    } else {
        println!("cargo:warning=libtorch directory unknown: does this crate depend on ferrotune-plugin-api?");
    }
}

/// For an executable (the host binary, test binaries): RUNPATH to libtorch, and
/// libtorch_cuda kept as a real dependency when this libtorch has one.
///
/// `--as-needed` silently drops `-ltorch_cuda` because no symbol of it is referenced
/// directly; the binary then never loads libtorch_cuda.so and CUDA is unavailable even on
/// a GPU machine. PyPI's CUDA wheels carry libtorch_cuda.so (it loads fine on machines
/// without a GPU), so whenever it exists it is linked with `--no-as-needed`.
pub fn executable() {
    let Some(dir) = libtorch_lib_dir() else {
        println!("cargo:warning=libtorch directory unknown: does this crate depend on ferrotune-plugin-api?");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    if cuda_libtorch(&dir) {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-cfg=ferrotune_cuda_linked");
    }
    println!("cargo:rustc-check-cfg=cfg(ferrotune_cuda_linked)");
}

/// Whether the libtorch in `dir` is a CUDA build (has libtorch_cuda.so).
pub fn cuda_libtorch(dir: &std::path::Path) -> bool {
    dir.join("libtorch_cuda.so").exists()
}
