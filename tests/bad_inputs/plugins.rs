//! Bad-input cases: plugin libraries.
//!
//! | input | answer |
//! | --- | --- |
//! | a library whose `ferrotune_plugin_manifest` is data, not a function | refused before it is opened, naming the file and the symbol's type; the other plugins list |
//! | a manifest function returning null, a wild pointer or garbage | refused naming the file and the pointer or the wrong magic |
//! | a manifest whose strings point at unmapped memory, are unterminated or not UTF-8 | refused naming the file and the field |
//! | a manifest with a future layout | `FILE: manifest layout 99 is newer than this host's 1; upgrade ferrotune`, nothing else read |
//! | a manifest with the right magic, truncated by the end of the library's memory | refused naming the file and how many bytes lie in it |
//! | abi_stable's header exported as a function | `FILE: cannot load symbol `…`: it is a function` (was "Could load symbol") |
//! | `train` / `generate --adapter` with all of the above on the plugin path | work as without them; a config naming a plugin only a refused library could hold says which libraries were refused and why |
//!
//! Every case asserts the exit status is a status (no signal: these were segfaults, 139).
use std::path::PathBuf;
use std::process::Output;
use std::sync::OnceLock;

use ferrotune_tests::*;

#[path = "../fixtures/hostile_plugins/mod.rs"]
mod hostile;

/// A folder holding every hostile library (built once), with each one's expected reason.
fn hostile_dir() -> &'static (PathBuf, Vec<(PathBuf, &'static str)>) {
    static DIR: OnceLock<(PathBuf, Vec<(PathBuf, &'static str)>)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("bad-plugins");
        let built = hostile::build_all(&dir);
        (dir, built)
    })
}

/// The exit code, failing the test on a signal (a crash).
fn code(out: &Output, what: &str) -> i32 {
    out.status.code().unwrap_or_else(|| {
        panic!("{what} was killed by a signal ({:?}):\n{}", out.status, stderr(out))
    })
}

#[test]
fn plugins_lists_the_good_and_refuses_each_hostile_library_by_file_and_reason() {
    let (dir, built) = hostile_dir();
    let out = ferrotune(&["plugins", "--plugin-dir", dir.to_str().unwrap()]);
    assert_eq!(code(&out, "ferrotune plugins"), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let refused = text.split("\nrefused:\n").nth(1).unwrap_or_else(|| panic!("{text}"));
    for (path, why) in built {
        let line = refused
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{}: ", path.display())))
            .unwrap_or_else(|| panic!("{} not listed as refused:\n{text}", path.display()));
        assert!(line.contains(why), "expected `{why}` in: {line}");
    }
    for good in ["lora", "sft", "alpaca"] {
        assert!(
            text.lines().any(|l| l.starts_with(good) && l.contains(" ok ")),
            "{good} no longer listed:\n{text}"
        );
    }

    // The JSON listing says the same.
    let out = ferrotune(&["plugins", "--json", "--plugin-dir", dir.to_str().unwrap()]);
    assert_eq!(code(&out, "ferrotune plugins --json"), 0, "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let refused = json["refused"].as_array().unwrap();
    for (path, why) in built {
        let entry = refused
            .iter()
            .find(|r| r["file"] == path.display().to_string())
            .unwrap_or_else(|| panic!("{} not in {json}", path.display()));
        assert!(entry["reason"].as_str().unwrap().contains(why), "{entry}");
    }
    assert!(json["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "lora"));
}

/// `train` and `generate --adapter` with every hostile library on the plugin path: they run
/// as without them; a config that needs a plugin none of the good libraries has is refused
/// with the refused libraries and their reasons named.
#[test]
fn train_and_generate_go_on_past_refused_libraries() {
    let (dir, built) = hostile_dir();
    let plugin_dir = dir.to_str().unwrap();
    let f = text_fixture("bad-plugins-train", 16, 1, 4, 1);
    let config = |name: &str, adapter: &str| -> PathBuf {
        let path = f.work.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "model: {}\noutput_dir: {}\nadapter: {{plugin: {adapter}, r: 2, target_modules: [q_proj, v_proj]}}\n\
                 data: {{plugin: alpaca, path: {}}}\ntraining: {{max_steps: 1, progress_bar: false}}\n",
                f.model.display(),
                f.work.join(name).display(),
                f.data.display()
            ),
        )
        .unwrap();
        path
    };

    let good = config("good", "lora");
    let out = ferrotune(&["train", "--plugin-dir", plugin_dir, good.to_str().unwrap()]);
    assert_eq!(code(&out, "ferrotune train"), 0, "{}", stderr(&out));
    let adapter = f.work.join("good");
    assert!(adapter.join("adapter_model.safetensors").is_file());

    let out = ferrotune(&[
        "generate",
        "--plugin-dir",
        plugin_dir,
        "--model",
        f.model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "w1 w2",
        "--max-new-tokens",
        "3",
        "--greedy",
    ]);
    assert_eq!(code(&out, "ferrotune generate --adapter"), 0, "{}", stderr(&out));

    let needs_missing = config("needs-missing", "hostile-adapter");
    let out = ferrotune(&["train", "--plugin-dir", plugin_dir, needs_missing.to_str().unwrap()]);
    assert_eq!(code(&out, "ferrotune train (missing plugin)"), 1, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("no adapter plugin named `hostile-adapter`"), "{err}");
    assert!(err.contains(&format!("{} plugin libraries were refused", built.len())), "{err}");
    for (path, why) in built {
        assert!(err.contains(&format!("{}: ", path.display())) && err.contains(why), "{err}");
    }
    assert!(!f.work.join("needs-missing/adapter_model.safetensors").exists());
}
