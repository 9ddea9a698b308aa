fn main() {
    ferrotune_build::executable();
    // Where the workspace build puts plugins, for the default search path and `doctor`.
    let libtorch = ferrotune_build::libtorch_lib_dir().unwrap_or_default();
    println!("cargo:rustc-env=FERROTUNE_BUILD_LIBTORCH_DIR={}", libtorch.display());
    native_layer(&libtorch);
}

/// The C++ layer (host/csrc): activation checkpointing always, the c10d Gloo process group
/// when the gloo headers are installed (`apt-get install libgloo-dev`; the torch wheel
/// ships gloo's code but not its headers). Sets `cfg(ferrotune_c10d)` when c10d is built.
fn native_layer(libtorch_lib: &std::path::Path) {
    println!("cargo:rustc-check-cfg=cfg(ferrotune_c10d)");
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=FERROTUNE_GLOO_INCLUDE");
    let Some(root) = libtorch_lib.parent() else { return };
    let include = root.join("include");
    if !include.join("torch").is_dir() {
        println!("cargo:warning=libtorch headers not found under {}: no C++ layer", include.display());
        return;
    }
    let gloo = std::env::var("FERROTUNE_GLOO_INCLUDE").map(std::path::PathBuf::from).unwrap_or_else(|_| "/usr/include".into());
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
        .file("csrc/checkpoint.cpp");
    if with_c10d {
        build.define("USE_C10D_GLOO", None).include(&gloo).file("csrc/c10d.cpp");
        println!("cargo:rustc-cfg=ferrotune_c10d");
    } else {
        println!("cargo:warning=gloo headers not found ({}): building without the c10d process group (apt-get install libgloo-dev)", gloo.join("gloo").display());
    }
    build.compile("ferrotune_native");
    println!("cargo:rustc-link-search=native={}", libtorch_lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
