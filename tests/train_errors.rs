//! Bad inputs to `ferrotune train`, through the CLI: each fails with an error that names what
//! is wrong (the config key, the plugin and the installed ones, the target modules, the data
//! file and line) and writes no adapter.
//!
//! Needs `cargo build --workspace` (the CLI and the `lora`, `sft`, `single`, `alpaca` plugins).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune_tests::*;

const WORDS: usize = 20;

type Fixture = TextFixture;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("train-errors", WORDS, 1, 4, 1))
}

/// A config that trains (2 steps); `edit` changes its text.
fn config(f: &Fixture, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\n\
         adapter: {{plugin: lora, r: 2, target_modules: [q_proj, v_proj]}}\n\
         optimizer: {{lr: 1.0e-3}}\n\
         data: {{plugin: alpaca, path: {data}}}\n\
         training: {{max_steps: 2, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(name).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, edit(yaml)).unwrap();
    path
}

/// Runs `train` on `config`, which must fail; returns stderr.
fn fails(f: &Fixture, name: &str, config: &Path) -> String {
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    let err = stderr(&out);
    println!("--- {name}:\n{}", err.trim());
    assert!(!out.status.success(), "{name}: train must fail");
    assert!(
        !f.work.join(name).join("adapter_model.safetensors").exists(),
        "{name}: no adapter may be written"
    );
    err
}

fn data_file(f: &Fixture, name: &str, lines: &[&str]) -> PathBuf {
    let p = f.work.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn the_base_config_trains() {
    let f = fixture();
    let out = ferrotune(&["train", config(f, "good", |s| s).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(f.work.join("good/adapter_model.safetensors").is_file());
}

#[test]
fn unknown_config_keys_are_named() {
    let f = fixture();
    let e = fails(f, "top-key", &config(f, "top-key", |s| s + "lerning_rate: 0.1\n"));
    assert!(e.contains("unknown field `lerning_rate`") && e.contains("top-key.yaml"), "{e}");
    let e = fails(
        f,
        "nested-key",
        &config(f, "nested-key", |s| s.replace("{lr: 1.0e-3}", "{lr: 1.0e-3, weight_decai: 0.1}")),
    );
    assert!(
        e.contains("config key `optimizer") && e.contains("unknown field `weight_decai`"),
        "{e}"
    );
    // A plugin's own keys are the plugin's to check; its error names the key too.
    let e = fails(f, "plugin-key", &config(f, "plugin-key", |s| s.replace("r: 2,", "rank: 2,")));
    assert!(
        e.contains("plugin `lora`") && e.matches("unknown field `rank`").count() == 1,
        "named once: {e}"
    );
}

#[test]
fn plugins_that_are_not_installed_are_named_with_the_installed_ones() {
    let f = fixture();
    let e = fails(
        f,
        "no-adapter",
        &config(f, "no-adapter", |s| s.replace("plugin: lora", "plugin: lorra")),
    );
    assert!(e.contains("no adapter plugin named `lorra`") && e.contains("lora"), "{e}");
    let e = fails(
        f,
        "no-dataset",
        &config(f, "no-dataset", |s| s.replace("plugin: alpaca", "plugin: alpaka")),
    );
    assert!(
        e.contains("no dataset plugin named `alpaka`")
            && e.contains("alpaca")
            && e.contains("sharegpt"),
        "{e}"
    );
    let e =
        fails(f, "no-objective", &config(f, "no-objective", |s| s + "objective: {plugin: dpo2}\n"));
    assert!(e.contains("no objective plugin named `dpo2`") && e.contains("sft"), "{e}");
    let e = fails(f, "no-memory", &config(f, "no-memory", |s| s + "memory: {plugin: zero9}\n"));
    assert!(e.contains("no memory plugin named `zero9`") && e.contains("single"), "{e}");
}

#[test]
fn target_modules_matching_nothing_are_refused() {
    let f = fixture();
    let e = fails(
        f,
        "no-target",
        &config(f, "no-target", |s| s.replace("[q_proj, v_proj]", "[qkv_proj, query]")),
    );
    assert!(
        e.contains("qkv_proj")
            && e.contains("match no linear layer")
            && e.contains("model.layers.0.self_attn.q_proj"),
        "{e}"
    );
}

#[test]
fn a_malformed_json_line_is_named_by_file_and_line() {
    let f = fixture();
    let good = r#"{"instruction": "w1 w2", "output": "w3"}"#;
    let data = data_file(
        f,
        "malformed.jsonl",
        &[good, good, r#"{"instruction": "w1", "output": "w2""#, good],
    );
    let e = fails(
        f,
        "malformed",
        &config(f, "malformed", |s| {
            s.replace(&f.data.display().to_string(), &data.display().to_string())
        }),
    );
    assert!(e.contains(&format!("{}:3", data.display())) && e.contains("not valid JSON"), "{e}");
}

#[test]
fn a_data_set_of_empty_assistant_turns_is_refused() {
    let f = fixture();
    let row = r#"{"instruction": "w1 w2", "input": "w3", "output": ""}"#;
    let data = data_file(f, "empty-answers.jsonl", &[row, row, row]);
    let with_data =
        |s: String| s.replace(&f.data.display().to_string(), &data.display().to_string());
    let e = fails(f, "empty-answers", &config(f, "empty-answers", with_data));
    assert!(
        e.contains(&format!("{}:1", data.display())) && e.contains("empty assistant turn"),
        "{e}"
    );
    // Skipping bad rows leaves nothing: said as such.
    let skipping = |s: String| {
        with_data(s).replace("{plugin: alpaca,", "{plugin: alpaca, config: {skip_bad_rows: true},")
    };
    let e = fails(f, "empty-answers-skipped", &config(f, "empty-answers-skipped", skipping));
    assert!(
        e.contains(&data.display().to_string())
            && e.contains("no usable sample")
            && e.contains("all 3 rows are bad"),
        "{e}"
    );
}

#[test]
fn samples_left_without_label_tokens_are_refused() {
    let f = fixture();
    // cutoff_len 6 keeps `<|im_start|>user\nw.. ` of every sample: no assistant token is left.
    let e = fails(
        f,
        "cut",
        &config(f, "cut", |s| s.replace("{plugin: alpaca,", "{plugin: alpaca, cutoff_len: 6,")),
    );
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("no training samples")
            && last.contains("none of its 4 samples has a label token")
            && last.contains("`data.cutoff_len` (6)"),
        "{e}"
    );
    // An eval split that takes every sample (round(0.9 · 4) = 4).
    let e = fails(
        f,
        "all-eval",
        &config(f, "all-eval", |s| {
            s.replace("{plugin: alpaca,", "{plugin: alpaca, eval_ratio: 0.9,")
        }),
    );
    assert!(e.contains("`data.eval_ratio` 0.9 puts all 4 usable samples in the eval split"), "{e}");
}
