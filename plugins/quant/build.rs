//! RUNPATH to libtorch (ferrotune-build), and the C++ autograd function in
//! `csrc/dequant_linear.cpp` compiled against the libtorch headers beside that `lib/`.
fn main() {
    ferrotune_build::plugin();
    println!("cargo:rerun-if-changed=csrc/dequant_linear.cpp");
    let Some(lib) = ferrotune_build::libtorch_lib_dir() else {
        panic!("libtorch directory unknown: build with LIBTORCH_USE_PYTORCH=1 (or LIBTORCH) as for the rest of the workspace");
    };
    let root = lib.parent().expect("libtorch lib/ has a parent");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .file("csrc/dequant_linear.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .extra_warnings(false)
        .flag_if_supported("-Wno-unused-parameter")
        .compile("ferrotune_dequant_linear");
}
