//! `ferrotune train` with `finetuning: full` and `finetuning: freeze` against transformers +
//! torch: 10 optimizer steps on a tiny Qwen2 model (`init-model --preset tiny`, float32, tied
//! embeddings, a 49-token ChatML tokenizer) and an 11-row alpaca file, run by the trainer and
//! by `tests/python/full_reference.py` (train_reference.py's recipe without peft:
//! `torch.optim.AdamW(foreach=False)` over Trainer's two weight-decay groups, `clip_grad_norm_`,
//! `get_scheduler`, `ForCausalLMLoss` with `num_items_in_batch`).
//!
//! The run: no shuffling, no eval split, micro-batch 2 × gradient accumulation 2 (11 samples:
//! every epoch ends on a one-sample micro-batch), AdamW lr 1e-3, weight decay 0.01 (weights of
//! dim ≥ 2 only), clipping at 1.0, cosine schedule with 2 warm-up steps.
//!
//! Checked: per step, the loss within 1e-5 and the learning rate within 1e-12; every saved
//! tensor of `output_dir` (a Hugging Face model directory) within 1e-5 of the reference's
//! (max |diff| per tensor); transformers loads that directory, and its logits on a fixed input
//! equal ferrotune's own forward of the directory and the reference model's within 1e-5. Freeze
//! fine-tuning (the last layer's MLP and the final norm) leaves every other tensor
//! byte-identical and moves every selected one. A full run with an `adapter:` section and a
//! freeze run with `trainable_layers: 0` exit with status 1 naming the key.
//!
//! Needs `cargo build --workspace` (the CLI, `sft`, `single`, `alpaca`) and the reference stack
//! (`$PYTHON` or `.venv`). One Python run serves every test.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune::model::{CausalLM, ForwardArgs};
use ferrotune::peft::PeftModel;
use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// Largest accepted |loss difference| at any step.
const LOSS_TOL: f64 = 1e-5;
/// Largest accepted max |difference| of a final weight tensor. The worst is `k_proj.bias`
/// (3.2e-6 measured; the rest ≤ 6e-8): its gradient is a sum of nearly cancelling terms (a key
/// bias shifts every score of a query alike but for RoPE), ~1e-3 of `v_proj.bias`'s, so the two
/// sides' fp32 summation orders show most there once AdamW normalises it.
const WEIGHT_TOL: f64 = 1e-5;
/// Largest accepted max |difference| of the logits on the probe input.
const LOGITS_TOL: f64 = 1e-5;
const STEPS: usize = 10;
const ROWS: usize = 11;
const WORDS: usize = 40;
/// The fixed logits input: two unpadded ChatML-shaped rows of the tokenizer's ids.
const PROBE_IDS: [[i64; 12]; 2] =
    [[1, 7, 4, 9, 10, 11, 2, 1, 8, 4, 12, 13], [1, 8, 4, 20, 21, 22, 23, 24, 25, 2, 0, 5]];

/// The freeze run's `freeze:` section and the checkpoint keys it selects in the 2-layer tiny
/// model: the last layer's MLP and the final norm (not the layers' `*_layernorm`).
const FREEZE: &str = "{trainable_layers: 1, trainable_modules: [mlp], extra_modules: [norm]}";
const FROZEN_SELECTION: [&str; 4] = [
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
];

fn fixture() -> &'static TextFixture {
    static F: OnceLock<TextFixture> = OnceLock::new();
    F.get_or_init(prepare)
}

fn prepare() -> TextFixture {
    let f = text_fixture("full-finetune", WORDS, 7, ROWS, 3);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(f.model.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["tie_word_embeddings"], json!(true), "the tiny preset ties lm_head");
    assert_eq!(config["num_hidden_layers"], json!(2), "FROZEN_SELECTION assumes two layers");
    let plan = json!({
        "model": f.model, "tokenizer": f.work.join("tokenizer"), "data": f.data, "cutoff_len": 1024,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": STEPS,
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "scheduler": "cosine", "warmup_steps": 2,
        "probe_ids": PROBE_IDS,
        "variants": [
            {"name": "full", "finetuning": "full", "out": f.work.join("ref-full")},
            {"name": "freeze", "finetuning": "freeze", "out": f.work.join("ref-freeze"),
             "freeze": {"trainable_layers": 1, "trainable_modules": ["mlp"], "extra_modules": ["norm"]}},
        ],
    });
    std::fs::write(f.work.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = reference_script();
    let out = run_python(&[script.as_os_str(), f.work.as_os_str()]);
    println!("{}", stdout(&out).trim());
    f
}

fn reference_script() -> PathBuf {
    repo_root().join("tests/python/full_reference.py")
}

/// The run's YAML config: `finetuning` and `extra` (more top-level keys) on the shared recipe.
fn write_config(f: &TextFixture, name: &str, finetuning: &str, extra: &str) -> PathBuf {
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\ndevice: cpu\ndtype: f32\nseed: 42\n\
         finetuning: {finetuning}\n{extra}\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0}}\n\
         scheduler: {{type: cosine, warmup_steps: 2}}\n\
         data: {{plugin: alpaca, path: {data}, cutoff_len: 1024, eval_ratio: 0.0, shuffle: false}}\n\
         training: {{max_steps: {STEPS}, micro_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(format!("ours-{name}")).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Trains with the CLI; returns the output directory.
fn train(f: &TextFixture, name: &str, finetuning: &str, extra: &str) -> PathBuf {
    let config = write_config(f, name, finetuning, extra);
    let started = std::time::Instant::now();
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{name}: train failed:\n{}", stderr(&out));
    println!("{name}: ferrotune train took {:.1} s", started.elapsed().as_secs_f64());
    f.work.join(format!("ours-{name}"))
}

/// The tensors of a Hugging Face model directory (`model.safetensors`, or the shards of
/// `model.safetensors.index.json`), sorted by key.
fn model_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let single = dir.join("model.safetensors");
    let mut v = if single.is_file() {
        Tensor::read_safetensors(&single).unwrap()
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index)
            .unwrap_or_else(|e| panic!("{}: neither model.safetensors nor {e}", dir.display()));
        let index: Value = serde_json::from_str(&text).unwrap();
        let mut files: Vec<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|f| f.as_str().unwrap())
            .collect();
        files.sort();
        files.dedup();
        files.iter().flat_map(|f| Tensor::read_safetensors(dir.join(f)).unwrap()).collect()
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn keys(v: &[(String, Tensor)]) -> Vec<String> {
    v.iter().map(|(k, _)| k.clone()).collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max();
    d.double_value(&[])
}

/// Compares the run's metrics with the reference's; returns (max |loss diff|, max relative
/// grad-norm diff).
fn compare_metrics(f: &TextFixture, name: &str, ours: &Path) -> (f64, f64) {
    let lines = read_jsonl(&ours.join("metrics.jsonl"));
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(f.work.join(format!("ref-{name}/metrics.json"))).unwrap(),
    )
    .unwrap();
    let steps: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), STEPS, "{name}: one metrics line per step");
    let (mut loss_diff, mut norm_diff) = (0f64, 0f64);
    for (i, line) in steps.iter().enumerate() {
        assert_eq!(line["step"], json!(i + 1));
        let (l, tl) = (line["loss"].as_f64().unwrap(), theirs["loss"][i].as_f64().unwrap());
        let (lr, tlr) = (line["lr"].as_f64().unwrap(), theirs["lr"][i].as_f64().unwrap());
        let (gn, tgn) =
            (line["grad_norm"].as_f64().unwrap(), theirs["grad_norm"][i].as_f64().unwrap());
        println!(
            "{name} step {:>2}: loss {l:.7} vs {tl:.7} (|diff| {:.1e}), lr {lr:.3e}, grad norm {gn:.6} vs {tgn:.6}",
            i + 1,
            (l - tl).abs()
        );
        assert!((lr - tlr).abs() <= 1e-12, "{name} step {}: lr {lr} vs transformers' {tlr}", i + 1);
        assert!(
            (l - tl).abs() <= LOSS_TOL,
            "{name} step {}: loss {l} vs transformers' {tl} (|diff| {:e})",
            i + 1,
            (l - tl).abs()
        );
        loss_diff = loss_diff.max((l - tl).abs());
        norm_diff = norm_diff.max((gn - tgn).abs() / tgn.abs().max(1e-12));
    }
    let (first, last) =
        (theirs["loss"][0].as_f64().unwrap(), theirs["loss"][STEPS - 1].as_f64().unwrap());
    assert!(
        (first - last).abs() > 0.1,
        "{name}: the loss must move over the run for the test to mean anything ({first} -> {last})"
    );
    (loss_diff, norm_diff)
}

/// Compares the saved tensors with the reference's; returns the worst (max |diff|, key).
fn compare_weights(f: &TextFixture, name: &str, ours: &[(String, Tensor)]) -> (f64, String) {
    let theirs = model_tensors(&f.work.join(format!("ref-{name}")));
    assert_eq!(keys(ours), keys(&theirs), "{name}: saved keys (a tied lm_head is not saved)");
    let mut worst = (0f64, String::new());
    for ((k, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(a.kind(), Kind::Float, "{name}: `{k}` is saved in the run's dtype");
        let d = max_abs_diff(a, b);
        if d > worst.0 {
            worst = (d, k.clone());
        }
    }
    assert!(
        worst.0 <= WEIGHT_TOL,
        "{name}: `{}` differs from transformers' by {:e} (max |diff|)",
        worst.1,
        worst.0
    );
    worst
}

fn probe() -> Tensor {
    let flat: Vec<i64> = PROBE_IDS.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([PROBE_IDS.len() as i64, -1])
}

fn read_logits(path: &Path) -> Tensor {
    let t = Tensor::read_safetensors(path).unwrap();
    t.into_iter().find(|(n, _)| n == "logits").unwrap().1
}

#[test]
fn full_finetuning_equals_transformers() {
    let started = std::time::Instant::now();
    let f = fixture();
    let out = train(f, "full", "full", "");
    let (loss_diff, norm_diff) = compare_metrics(f, "full", &out);

    // output_dir is a Hugging Face model directory.
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(file).is_file(), "output_dir lacks {file}");
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let read = |dir: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        assert_eq!(read(&out), read(&f.model), "{file}: the input model's tokenizer");
    }
    let ours = model_tensors(&out);
    let initial = model_tensors(&f.model);
    assert_eq!(keys(&ours), keys(&initial), "every tensor of the input model is saved, no other");
    for ((k, a), (_, b)) in ours.iter().zip(&initial) {
        let moved = max_abs_diff(a, b);
        assert!(moved > 100.0 * WEIGHT_TOL, "full: `{k}` moved only {moved:e}: it did not train");
    }
    let (weight_diff, worst) = compare_weights(f, "full", &ours);

    // Logits of the saved directory: transformers' vs ferrotune's vs the reference model's.
    let theirs_path = f.work.join("hf-full-logits.safetensors");
    let o = run_python(&[
        reference_script().as_os_str(),
        "--logits".as_ref(),
        f.work.as_os_str(),
        out.as_os_str(),
        theirs_path.as_os_str(),
    ]);
    println!("{}", stdout(&o).trim());
    let hf = read_logits(&theirs_path);
    let reference = read_logits(&f.work.join("ref-full/logits.safetensors"));
    one_torch_thread();
    let model = PeftModel::new(CausalLM::load(&out, Device::Cpu, Kind::Float).unwrap());
    let ours_logits = tch::no_grad(|| model.forward(ForwardArgs::ids(&probe())).unwrap());
    let ours_vs_hf = max_abs_diff(&ours_logits, &hf);
    let hf_vs_reference = max_abs_diff(&hf, &reference);
    assert!(
        ours_vs_hf <= LOGITS_TOL,
        "logits of output_dir: ferrotune vs transformers {ours_vs_hf:e}"
    );
    assert!(
        hf_vs_reference <= LOGITS_TOL,
        "transformers' logits: output_dir vs the reference's final model {hf_vs_reference:e}"
    );
    println!(
        "full: {STEPS} steps, max |loss diff| {loss_diff:.2e}, max relative grad-norm diff {norm_diff:.2e}, \
         {} tensors, max |weight diff| {weight_diff:.2e} (`{worst}`), logits of output_dir: \
         ferrotune vs transformers {ours_vs_hf:.2e}, transformers vs reference {hf_vs_reference:.2e}; \
         {:.1} s",
        ours.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn freeze_trains_only_the_named_layers() {
    let started = std::time::Instant::now();
    let f = fixture();
    let selection: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(f.work.join("ref-freeze/trainable.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(selection, FROZEN_SELECTION, "the reference's freeze selection");
    let out = train(f, "freeze", "freeze", &format!("freeze: {FREEZE}\n"));
    let (loss_diff, norm_diff) = compare_metrics(f, "freeze", &out);

    let ours = model_tensors(&out);
    let initial = model_tensors(&f.model);
    assert_eq!(keys(&ours), keys(&initial), "every tensor of the input model is saved, no other");
    for ((k, a), (_, b)) in ours.iter().zip(&initial) {
        if FROZEN_SELECTION.contains(&k.as_str()) {
            let moved = max_abs_diff(a, b);
            assert!(moved > 100.0 * WEIGHT_TOL, "freeze: selected `{k}` moved only {moved:e}");
        } else {
            assert!(a.equal(b), "freeze: `{k}` is outside the selection but changed");
        }
    }
    let (weight_diff, worst) = compare_weights(f, "freeze", &ours);
    println!(
        "freeze: {STEPS} steps, max |loss diff| {loss_diff:.2e}, max relative grad-norm diff {norm_diff:.2e}, \
         {} of {} tensors trained, max |weight diff| {weight_diff:.2e} (`{worst}`); {:.1} s",
        FROZEN_SELECTION.len(),
        ours.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Runs `train` on a config that must be refused; returns stderr.
fn refused(f: &TextFixture, name: &str, finetuning: &str, extra: &str) -> String {
    let config = write_config(f, name, finetuning, extra);
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    let err = stderr(&out);
    println!("--- {name}:\n{}", err.trim());
    assert_eq!(out.status.code(), Some(1), "{name}: exit status");
    assert!(!f.work.join(format!("ours-{name}/model.safetensors")).exists());
    err
}

#[test]
fn contradictory_finetuning_configs_name_the_key() {
    // No Python needed: the fixture's model and data only.
    static F: OnceLock<TextFixture> = OnceLock::new();
    let f = F.get_or_init(|| text_fixture("full-finetune-errors", WORDS, 7, 4, 3));
    let e = refused(f, "full-with-adapter", "full", "adapter: {plugin: lora, r: 4}\n");
    assert!(e.contains("`adapter`"), "{e}");
    let e = refused(
        f,
        "freeze-zero-layers",
        "freeze",
        "freeze: {trainable_layers: 0, trainable_modules: all}\n",
    );
    assert!(e.contains("freeze.trainable_layers"), "{e}");
}
