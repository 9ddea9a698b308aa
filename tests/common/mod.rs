//! Helpers shared by the integration tests: where the workspace build put the plugins and
//! the CLI, and a registry loaded from there.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrotune::plugins::{Registry, SearchPath};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The folder holding the built plugins and the `ferrotune` binary (`target/debug`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/<test-binary>
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// The libtorch `lib/` folder this build links against.
pub fn libtorch_lib() -> PathBuf {
    PathBuf::from(env!("FERROTUNE_TEST_LIBTORCH_LIB"))
}

/// The test-kit plugin library, checked to exist.
pub fn testkit_library() -> PathBuf {
    let p = build_dir().join("libferrotune_testkit.so");
    assert!(p.exists(), "{} is missing: build the workspace first (`cargo build --workspace`; `make test` does)", p.display());
    p
}

/// A registry holding only the plugins in the build folder.
pub fn registry() -> Registry {
    testkit_library();
    Registry::discover(&SearchPath::new(&[build_dir()], None, false))
}

/// The `ferrotune` binary of this build.
pub fn ferrotune_bin() -> PathBuf {
    let p = build_dir().join("ferrotune");
    assert!(p.exists(), "{} is missing: build the workspace first (`cargo build --workspace`)", p.display());
    p
}

/// Runs the CLI with `args`, without LD_LIBRARY_PATH (the binary must find libtorch itself).
pub fn ferrotune(args: &[&str]) -> Output {
    Command::new(ferrotune_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("FERROTUNE_PLUGIN_PATH")
        .output()
        .expect("run ferrotune")
}

/// A fresh, empty temporary folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferrotune-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
