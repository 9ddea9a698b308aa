//! Builds the third-party plugin of `tests/fixtures/external-plugin` outside the workspace,
//! against a copy of plugin-api that a test may alter first (to stand for a library built by
//! an older or a mismatched plugin-api). The scratch workspace inherits the real workspace's
//! settings, pins and lock file, and builds offline into `target/ext-plugins`.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{repo_root, stderr};

/// Copies a folder recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}

/// Builds the external plugin against plugin-api as `alter` leaves a copy of it; returns
/// the library, kept as `target/ext-plugins-work/libexternal_reward_{variant}.so`.
pub fn build_external_plugin(variant: &str, alter: &dyn Fn(&Path)) -> PathBuf {
    let root = repo_root();
    let work = root.join("target/ext-plugins-work");
    let target = root.join("target/ext-plugins");
    let ws = work.join(variant);
    let _ = std::fs::remove_dir_all(&ws);
    copy_dir(&root.join("plugin-api"), &ws.join("plugin-api"));
    alter(&ws.join("plugin-api"));
    copy_dir(&root.join("tests/fixtures/external-plugin"), &ws.join("plugin"));
    let manifest = ws.join("plugin/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("@PLUGIN_API@", "../plugin-api")
        .replace("@BUILD_SUPPORT@", &root.join("build-support").display().to_string());
    std::fs::write(&manifest, text).unwrap();
    let ws_manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members_start = ws_manifest.find("members = [").unwrap();
    let members_end = members_start + ws_manifest[members_start..].find(']').unwrap() + 1;
    let ws_manifest = format!(
        "{}members = [\"plugin-api\", \"plugin\"]{}",
        &ws_manifest[..members_start],
        &ws_manifest[members_end..]
    );
    std::fs::write(ws.join("Cargo.toml"), ws_manifest).unwrap();
    std::fs::copy(root.join("Cargo.lock"), ws.join("Cargo.lock")).unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--offline", "-p", "external-reward", "--manifest-path"])
        .arg(ws.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "building the {variant} plugin failed:\n{}", stderr(&out));
    let kept = work.join(format!("libexternal_reward_{variant}.so"));
    std::fs::copy(target.join("debug/libexternal_reward.so"), &kept).unwrap();
    kept
}
