//! The `ferrotune` binary end to end: runs without LD_LIBRARY_PATH, lists plugins with
//! their kinds, explains refusals, and has `--help` on every verb.
use ferrotune_tests::*;

#[test]
fn plugins_lists_the_test_plugins_with_kinds() {
    let out = ferrotune(&["plugins"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for (name, kind) in [
        ("testkit-lowrank", "adapter"),
        ("testkit-bf16", "quantizer"),
        ("testkit-masked-ce", "objective"),
        ("testkit-length", "reward"),
        ("testkit-jsonl", "dataset"),
        ("testkit-sgd", "memory"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{text}"));
        assert!(
            line.contains(kind) && line.contains("ok") && line.contains("libferrotune_testkit.so"),
            "{line}"
        );
    }
    assert!(text.contains("libtorch 2.11.0"), "{text}");
}

#[test]
fn plugins_json_and_refusals_explained() {
    let dir = temp_dir("cli-refusal");
    std::fs::write(dir.join("libbroken.so"), "not a library").unwrap();
    std::fs::copy(libtorch_lib().join("libc10.so"), dir.join("libc10.so")).unwrap();
    let out = ferrotune(&["plugins", "--json", "--plugin-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let refused = v["refused"].as_array().unwrap();
    let reason = |file: &str| {
        refused
            .iter()
            .find(|r| r["file"].as_str().unwrap().ends_with(file))
            .map(|r| r["reason"].as_str().unwrap().to_string())
    };
    assert!(reason("libbroken.so").unwrap().contains("cannot be loaded as a shared library"));
    assert!(reason("libc10.so").unwrap().contains("not a ferrotune plugin"));
    assert!(v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "testkit-sgd" && p["kind"] == "memory"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn plugin_path_variable_is_searched() {
    let dir = temp_dir("cli-env");
    std::fs::copy(testkit_library(), dir.join("libcopied_testkit.so")).unwrap();
    let out = std::process::Command::new(ferrotune_bin())
        .args(["plugins"])
        .env("FERROTUNE_PLUGIN_PATH", &dir)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.contains("FERROTUNE_PLUGIN_PATH"), "{text}");
    // The copy comes first on the search path, so the build folder's copy is shadowed.
    let line = text
        .lines()
        .find(|l| l.starts_with("testkit-lowrank") && l.contains("libcopied_testkit.so"))
        .unwrap();
    assert!(line.contains(" ok "), "{line}");
    assert!(
        text.lines().any(|l| l.starts_with("testkit-lowrank") && l.contains("shadowed")),
        "{text}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn selfcheck_and_doctor_run() {
    let out = ferrotune(&["selfcheck", "--device", "cpu"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("result                          PASS"));
    let out = ferrotune(&["doctor"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("libtorch (built against)   2.11.0") && text.contains("CUDA"), "{text}");
    if !tch::Cuda::is_available() {
        let out = ferrotune(&["selfcheck", "--device", "cuda"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("CUDA is not available"), "{}", stderr(&out));
    }
}

#[test]
fn every_verb_has_help() {
    for verb in [
        vec!["--help"],
        vec!["plugins", "--help"],
        vec!["doctor", "--help"],
        vec!["selfcheck", "--help"],
    ] {
        let out = ferrotune(&verb);
        assert!(out.status.success(), "{verb:?}");
        assert!(stdout(&out).contains("Usage: ferrotune"), "{verb:?}: {}", stdout(&out));
    }
}

/// The README's plugin example is the external plugin the load tests really build.
#[test]
fn readme_plugin_example_is_the_tested_fixture() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("```rust\n").unwrap() + "```rust\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let fixture =
        std::fs::read_to_string(repo_root().join("tests/fixtures/external-plugin/src/lib.rs"))
            .unwrap();
    let fixture_code = &fixture[fixture.find("use ferrotune_plugin_api").unwrap()..];
    assert_eq!(
        example, fixture_code,
        "README.md's plugin example drifted from tests/fixtures/external-plugin/src/lib.rs"
    );
}
