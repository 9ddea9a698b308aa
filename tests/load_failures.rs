//! Each load failure is an error value a user can act on, and the process keeps running.
//! Includes plugins built in this test outside the workspace: a compatible third-party
//! plugin, one against another plugin-API version, one with another libtorch fingerprint.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferrotune::plugins::{load_library, LoadError, Registry, SearchPath};
use ferrotune_plugin_api::fingerprint::{BuildFingerprint, Incompatibility};
use ferrotune_plugin_api::{PluginKind, Reward, RewardInput};
use ferrotune_tests::*;

#[test]
fn missing_file() {
    let e = load_library(Path::new("/no/such/dir/libplugin.so")).unwrap_err();
    assert!(matches!(e, LoadError::Missing { .. }));
    assert!(e.to_string().contains("/no/such/dir/libplugin.so: no such file"), "{e}");
}

#[test]
fn file_that_is_not_a_library() {
    let dir = temp_dir("junk");
    let junk = dir.join("libnotes.so");
    std::fs::write(&junk, "these are notes, not ELF").unwrap();
    let e = load_library(&junk).unwrap_err();
    assert!(matches!(e, LoadError::NotLoadable { .. }), "{e}");
    assert!(e.to_string().contains("cannot be loaded as a shared library"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn shared_library_that_is_not_a_plugin() {
    // libc10.so is a real shared library (already loaded by this process) without a manifest.
    let c10 = libtorch_lib().join("libc10.so");
    let e = load_library(&c10).unwrap_err();
    assert!(matches!(e, LoadError::NotAPlugin { .. }), "{e}");
    assert!(e.to_string().contains("not a ferrotune plugin"), "{e}");
    // The process goes on: real plugins still load afterwards.
    let lib = load_library(&testkit_library()).unwrap();
    assert!(lib.plugins.iter().any(|p| p.kind == PluginKind::ADAPTER));
}

/// The three externally built plugins, built once for all tests of this binary.
struct External {
    compatible: PathBuf,
    other_api: PathBuf,
    other_libtorch: PathBuf,
}

fn external() -> &'static External {
    static BUILT: OnceLock<External> = OnceLock::new();
    BUILT.get_or_init(|| {
        let build = ferrotune_tests::external::build_external_plugin;
        let compatible = build("compatible", &|_| {});
        let other_api = build("other-api", &|api| {
            let m = api.join("Cargo.toml");
            let text = std::fs::read_to_string(&m).unwrap().replacen(
                "version = \"0.2.0\"",
                "version = \"0.3.0\"",
                1,
            );
            std::fs::write(m, text).unwrap();
        });
        let other_libtorch = build("other-libtorch", &|api| {
            let f = api.join("src/fingerprint.rs");
            let text = std::fs::read_to_string(&f)
                .unwrap()
                .replace("env!(\"FERROTUNE_LIBTORCH_VERSION\")", "\"2.10.0\"");
            std::fs::write(f, text).unwrap();
        });
        External { compatible, other_api, other_libtorch }
    })
}

#[test]
fn third_party_plugin_built_outside_the_workspace_loads_and_runs() {
    let ext = external();
    let lib = load_library(&ext.compatible).unwrap();
    let names: Vec<(PluginKind, &str)> =
        lib.plugins.iter().map(|p| (p.kind, p.name.as_str())).collect();
    assert_eq!(
        names,
        [(PluginKind::REWARD, "external-contains"), (PluginKind::ADAPTER, "external-scale")]
    );
    assert_eq!(lib.fingerprint, BuildFingerprint::current());
    let mut reg = Registry::discover(&SearchPath::new(&[build_dir()], None, false));
    reg.add(&ext.compatible).unwrap();
    let r = reg.reward("external-contains", r#"{"needle": "cat"}"#).unwrap();
    let inputs: Vec<RewardInput> = ["a cat", "a dog"]
        .iter()
        .map(|c| RewardInput {
            prompt: String::new(),
            completion: c.to_string(),
            sample_json: "{}".into(),
        })
        .collect();
    assert_eq!(r.score(&inputs).unwrap(), vec![1.0, 0.0]);
}

#[test]
fn plugin_built_against_another_plugin_api_is_refused_naming_both_versions() {
    let e = load_library(&external().other_api).unwrap_err();
    match &e {
        LoadError::Incompatible { why: Incompatibility::PluginApi { plugin, host }, .. } => {
            assert_eq!(plugin, "0.3.0");
            assert_eq!(host, ferrotune_plugin_api::PLUGIN_API_VERSION);
        }
        other => panic!("expected a plugin-API refusal, got: {other}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("0.3.0") && msg.contains("0.2.0") && msg.contains("rebuild"), "{msg}");
    // The host goes on and still loads good plugins.
    assert!(load_library(&testkit_library()).is_ok());
}

#[test]
fn plugin_with_another_libtorch_fingerprint_is_refused() {
    let e = load_library(&external().other_libtorch).unwrap_err();
    match &e {
        LoadError::Incompatible { why: Incompatibility::Libtorch { plugin, host }, .. } => {
            assert_eq!(plugin, "2.10.0");
            assert!(host.starts_with("2.11.0"), "{host}");
        }
        other => panic!("expected a libtorch refusal, got: {other}"),
    }
    assert!(e.to_string().contains("libtorch 2.10.0"), "{e}");
}

/// The third-party reward, built outside the workspace against plugin-api only, scores GRPO's
/// completions in a real `ferrotune train` run found through `--plugin-dir` (no host rebuild).
#[test]
fn grpo_trains_with_a_reward_plugin_built_outside_the_workspace() {
    let ext = external();
    let work = temp_dir("external-reward-grpo");
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(&ext.compatible, plugins.join("libexternal_reward.so")).unwrap();
    write_chat_tokenizer(&work.join("tokenizer"), 12);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, 2);
    let rows: Vec<String> = (0..4)
        .map(|i| {
            serde_json::json!({"instruction": format!("w{i} w{}", i + 1), "output": "w3"})
                .to_string()
        })
        .collect();
    std::fs::write(work.join("prompts.jsonl"), rows.join("\n") + "\n").unwrap();
    let config = work.join("grpo.yaml");
    std::fs::write(
        &config,
        format!(
            "model: {}\noutput_dir: {}\nadapter: {{plugin: lora, r: 2, target_modules: [q_proj, v_proj]}}\n\
             objective: {{plugin: grpo, num_generations: 4, max_completion_length: 6, seed: 3}}\n\
             rewards: [{{plugin: external-contains, needle: w3, weight: 2.0}}]\n\
             data: {{plugin: alpaca, path: {}}}\ntraining: {{max_steps: 2, micro_batch_size: 2, progress_bar: false}}\n",
            model.display(),
            work.join("out").display(),
            work.join("prompts.jsonl").display()
        ),
    )
    .unwrap();
    let out =
        ferrotune(&["train", "--plugin-dir", plugins.to_str().unwrap(), config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = read_jsonl(&work.join("out/metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for line in &metrics {
        let mean = line["train/rewards/external-contains/mean"]
            .as_f64()
            .unwrap_or_else(|| panic!("no external reward metric: {line}"));
        assert!((0.0..=1.0).contains(&mean), "{line}");
        // `reward` is the weighted sum: twice the plugin's mean.
        assert!((line["train/reward"].as_f64().unwrap() - 2.0 * mean).abs() < 1e-9, "{line}");
    }
    assert!(work.join("out/adapter_model.safetensors").is_file());
}

#[path = "fixtures/hostile_plugins/mod.rs"]
mod hostile;

/// Libraries whose manifest symbol is data, returns null, wild or garbage pointers, holds bad
/// strings, a future layout or is truncated: each is refused by name and reason, in this
/// process (a crash would end the test binary), and good plugins still load afterwards.
#[test]
fn hostile_manifests_are_refused_without_reading_them() {
    let dir = temp_dir("hostile-manifests");
    for (path, why) in hostile::build_all(&dir) {
        let e = load_library(&path).expect_err("a hostile library must be refused");
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("{}: ", path.display())), "{msg}");
        assert!(msg.contains(why), "expected `{why}` in: {msg}");
        assert_eq!(e.path(), path);
        let name = path.file_name().unwrap().to_str().unwrap();
        let expected = match name {
            "libhostile_future.so" => matches!(e, LoadError::FutureManifest { layout: 99, .. }),
            "libhostile_data.so" | "libhostile_header_is_function.so" => {
                matches!(e, LoadError::Symbol { .. })
            }
            _ => matches!(e, LoadError::BadManifest { .. }),
        };
        assert!(expected, "{name}: unexpected kind of refusal: {e:?}");
    }
    // A registry over the folder refuses all of them and goes on.
    let reg = Registry::discover(&SearchPath::new(std::slice::from_ref(&dir), None, false));
    assert!(reg.libraries.is_empty());
    assert_eq!(reg.refused.len(), hostile::CASES.len());
    let lib = load_library(&testkit_library()).unwrap();
    assert!(lib.plugins.iter().any(|p| p.kind == PluginKind::ADAPTER));
    std::fs::remove_dir_all(dir).ok();
}

/// abi_stable's own symbol errors are reworded: never "Could load symbol".
#[test]
fn missing_abi_stable_header_is_named_as_a_symbol_that_cannot_be_loaded() {
    let dir = temp_dir("no-header");
    let src = dir.join("noheader.c");
    std::fs::write(&src, "const void *ferrotune_plugin_manifest(void) { return 0; }\n").unwrap();
    let lib = dir.join("libnoheader.so");
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let e = load_library(&lib).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, LoadError::Symbol { .. }), "{msg}");
    assert!(
        msg.contains(&format!("{}: cannot load symbol `_1as_0lib_1header", lib.display())),
        "{msg}"
    );
    assert!(!msg.contains("Could load"), "{msg}");
    std::fs::remove_dir_all(dir).ok();
}
