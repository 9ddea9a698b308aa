//! The harness of `ferrotune train` against transformers + peft + torch
//! (`tests/python/train_reference.py`): the same optimizer steps of adapter SFT on a tiny Qwen2
//! model (`init-model --preset tiny`, float32, a 49-token ChatML tokenizer) and an 11-row
//! alpaca file. One Python run per test binary serves every variant of that binary.
//!
//! The run: no shuffling, no eval split, micro-batch 2 × gradient accumulation 2 (11 samples,
//! so every epoch ends on a one-sample micro-batch and steps straddle epochs), AdamW lr 1e-3,
//! weight decay 0.01, clipping at 1.0, cosine schedule with 2 warm-up steps.
//!
//! Checked per variant: per step, the loss equal within the variant's tolerance and the
//! learning rate within 1e-12; the final adapter tensors (`output_dir/adapter_model.safetensors`
//! vs peft's `get_peft_model_state_dict`) equal within 1e-4 relative (max |diff| / max
//! |peft's|, per tensor).
use std::path::PathBuf;

use serde_json::{json, Value};
use tch::Tensor;

use crate::*;

/// Largest accepted relative difference of a final adapter tensor.
pub const WEIGHT_TOL: f64 = 1e-4;
pub const ROWS: usize = 11;
pub const WORDS: usize = 40;

/// One adapter run, trained by both sides.
pub struct Variant {
    pub name: &'static str,
    /// The ferrotune adapter plugin.
    pub plugin: &'static str,
    /// peft's `peft_type` (the Python side builds that config class).
    pub peft_type: &'static str,
    /// Config keys shared by the plugin and peft's config class (JSON).
    pub config: &'static str,
    /// Whether the run starts from the adapter peft saved right after `get_peft_model`
    /// (through `adapter_init`); otherwise both sides initialise deterministically.
    pub from_init: bool,
    /// Optimizer steps.
    pub steps: usize,
    /// Largest accepted |loss difference| at any step.
    pub loss_tol: f64,
}

pub struct Fixture {
    pub work: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
}

/// Builds the model and data under `tag` and runs the Python side for every variant.
pub fn prepare(tag: &str, variants: &[Variant]) -> Fixture {
    let work = temp_dir(tag);
    write_chat_tokenizer(&work.join("tokenizer"), WORDS);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, 7);
    let data = work.join("alpaca.jsonl");
    write_alpaca_rows(&data, ROWS, WORDS, 3);
    let plan_variants: Vec<Value> = variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v.name,
                "peft_type": v.peft_type,
                "seed": 1000 + i,
                "steps": v.steps,
                "config": serde_json::from_str::<Value>(v.config).unwrap(),
                "init_dir": if v.from_init { json!(work.join(format!("init-{}", v.name))) } else { Value::Null },
                "out": work.join(format!("peft-{}", v.name)),
            })
        })
        .collect();
    let plan = json!({
        "model": model, "tokenizer": work.join("tokenizer"), "data": data, "cutoff_len": 1024,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2,
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "scheduler": "cosine", "warmup_steps": 2,
        "variants": plan_variants,
    });
    std::fs::write(work.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/train_reference.py");
    let out = run_python(&[script.as_os_str(), work.as_os_str()]);
    println!("{}", stdout(&out).trim());
    Fixture { work, model, data }
}

/// The run's YAML config for one variant (the adapter section is the variant's JSON, which
/// is YAML too).
fn write_config(f: &Fixture, v: &Variant) -> PathBuf {
    let name = v.name;
    let mut adapter: Value = serde_json::from_str(v.config).unwrap();
    adapter["plugin"] = json!(v.plugin);
    let init = if v.from_init {
        format!("adapter_init: {}\n", f.work.join(format!("init-{name}")).display())
    } else {
        String::new()
    };
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 42\n\
         adapter: {adapter}\n{init}\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         data: {{plugin: alpaca, path: {data}, cutoff_len: 1024, eval_ratio: 0.0, shuffle: false}}\n\
         training: {{max_steps: {steps}, micro_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(format!("ours-{name}")).display(),
        data = f.data.display(),
        steps = v.steps,
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn sorted(mut v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Trains variant `name` of `variants` with the CLI and compares it with peft's run.
pub fn check_variant(f: &Fixture, variants: &[Variant], name: &str) {
    let v = variants.iter().find(|v| v.name == name).unwrap();
    let steps = v.steps;
    let config = write_config(f, v);
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{name}: train failed:\n{}", stderr(&out));
    let ours: Vec<Value> = read_jsonl(&f.work.join(format!("ours-{name}/metrics.jsonl")));
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(f.work.join(format!("peft-{name}/metrics.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(ours.len(), steps, "{name}: one metrics line per step");
    let (mut loss_diff, mut norm_diff) = (0f64, 0f64);
    for (i, line) in ours.iter().enumerate() {
        assert_eq!(line["step"], json!(i + 1));
        let (l, tl) = (line["loss"].as_f64().unwrap(), theirs["loss"][i].as_f64().unwrap());
        let (lr, tlr) = (line["lr"].as_f64().unwrap(), theirs["lr"][i].as_f64().unwrap());
        let (gn, tgn) =
            (line["grad_norm"].as_f64().unwrap(), theirs["grad_norm"][i].as_f64().unwrap());
        println!("{name} step {:>2}: loss {l:.7} vs {tl:.7} (|diff| {:.1e}), lr {lr:.3e}, grad norm {gn:.5} vs {tgn:.5}", i + 1, (l - tl).abs());
        assert!((lr - tlr).abs() <= 1e-12, "{name} step {}: lr {lr} vs transformers' {tlr}", i + 1);
        assert!((l - tl).abs() <= v.loss_tol, "{name} step {}: loss {l} vs peft's {tl}", i + 1);
        loss_diff = loss_diff.max((l - tl).abs());
        norm_diff = norm_diff.max((gn - tgn).abs() / tgn.abs().max(1e-12));
    }
    let first = theirs["loss"][0].as_f64().unwrap();
    let last = theirs["loss"][steps - 1].as_f64().unwrap();
    assert!(
        (first - last).abs() > 1e-3,
        "{name}: the loss must move over the run for the test to mean anything ({first} -> {last})"
    );

    let ours = sorted(
        Tensor::read_safetensors(f.work.join(format!("ours-{name}/adapter_model.safetensors")))
            .unwrap(),
    );
    let theirs = sorted(
        Tensor::read_safetensors(f.work.join(format!("peft-{name}/adapter_model.safetensors")))
            .unwrap(),
    );
    let keys = |v: &[(String, Tensor)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&ours), keys(&theirs), "{name}: adapter keys");
    let mut weight_diff = 0f64;
    for ((k, a), (_, b)) in ours.iter().zip(&theirs) {
        let e = relative_error(a, b);
        assert!(e <= WEIGHT_TOL, "{name}: `{k}` relative error {e:e}");
        weight_diff = weight_diff.max(e);
    }
    println!(
        "{name}: {steps} steps, max |loss diff| {loss_diff:.2e}, max relative grad-norm diff {norm_diff:.2e}, \
         {} adapter tensors, max relative weight diff {weight_diff:.2e}",
        ours.len()
    );
}
