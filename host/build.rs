fn main() {
    ferrotune_build::executable();
    // Where the workspace build puts plugins, for the default search path and `doctor`.
    let libtorch = ferrotune_build::libtorch_lib_dir().unwrap_or_default();
    println!("cargo:rustc-env=FERROTUNE_BUILD_LIBTORCH_DIR={}", libtorch.display());
}
