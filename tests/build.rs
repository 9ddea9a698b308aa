fn main() {
    ferrotune_build::executable();
    let dir = ferrotune_build::libtorch_lib_dir().unwrap_or_default();
    println!("cargo:rustc-env=FERROTUNE_TEST_LIBTORCH_LIB={}", dir.display());
}
