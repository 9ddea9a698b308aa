//! `ferrotune train` against transformers + peft + torch: the same 20 optimizer steps of LoRA
//! SFT on a tiny Qwen2 model (`init-model --preset tiny`, float32, a 49-token ChatML
//! tokenizer) and an 11-row alpaca file, run by the trainer and by
//! `tests/python/train_reference.py` (peft model, `torch.optim.AdamW(foreach=False)`,
//! `clip_grad_norm_`, transformers' `get_scheduler` and `ForCausalLMLoss`).
//!
//! The run: no shuffling, no eval split, micro-batch 2 × gradient accumulation 2 (11 samples,
//! so every epoch ends on a one-sample micro-batch and steps straddle epochs), AdamW lr 1e-3,
//! weight decay 0.01, clipping at 1.0, cosine schedule with 2 warm-up steps. Variants: LoRA,
//! rsLoRA, DoRA (each starting from the adapter peft saved right after `get_peft_model`,
//! through `adapter_init`), and PiSSA (both sides initialise from W by SVD).
//!
//! Checked: the encoded samples (ids and labels) equal Python's; per step, the loss equal
//! within 1e-4 and the learning rate equal within 1e-12; the final adapter tensors
//! (`output_dir/adapter_model.safetensors` vs peft's `get_peft_model_state_dict`) equal within
//! 1e-4 relative (max |diff| / max |peft's|, per tensor).
//!
//! Needs `cargo build --workspace` (the CLI, `lora`, `sft`, `single`, `alpaca`) and the
//! reference stack (`$PYTHON` or `.venv`). One Python run serves every test.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune_tests::*;
use serde_json::{json, Value};
use tch::Tensor;

/// Largest accepted |loss difference| at any step.
const LOSS_TOL: f64 = 1e-4;
/// Largest accepted relative difference of a final adapter tensor.
const WEIGHT_TOL: f64 = 1e-4;
const STEPS: usize = 20;
const ROWS: usize = 11;
const WORDS: usize = 40;

/// (name, LoraConfig keys shared by the plugin and peft, whether the run starts from peft's
/// saved initial adapter).
const VARIANTS: &[(&str, &str, bool)] = &[
    (
        "lora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}"#,
        true,
    ),
    (
        "rslora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_rslora": true}"#,
        true,
    ),
    (
        "dora",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "use_dora": true}"#,
        true,
    ),
    (
        "pissa",
        r#"{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "init_lora_weights": "pissa"}"#,
        false,
    ),
];

struct Fixture {
    work: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(prepare)
}

fn prepare() -> Fixture {
    let work = temp_dir("train-parity");
    write_chat_tokenizer(&work.join("tokenizer"), WORDS);
    let model = work.join("model");
    init_tiny_model(&work.join("tokenizer"), &model, 7);
    let data = work.join("alpaca.jsonl");
    write_alpaca_rows(&data, ROWS, WORDS, 3);
    let variants: Vec<Value> = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, (name, config, from_init))| {
            json!({
                "name": name,
                "seed": 1000 + i,
                "config": serde_json::from_str::<Value>(config).unwrap(),
                "init_dir": if *from_init { json!(work.join(format!("init-{name}"))) } else { Value::Null },
                "out": work.join(format!("peft-{name}")),
            })
        })
        .collect();
    let plan = json!({
        "model": model, "tokenizer": work.join("tokenizer"), "data": data, "cutoff_len": 1024,
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": STEPS,
        "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0,
        "scheduler": "cosine", "warmup_steps": 2,
        "variants": variants,
    });
    std::fs::write(work.join("plan.json"), serde_json::to_string_pretty(&plan).unwrap()).unwrap();
    let script = repo_root().join("tests/python/train_reference.py");
    let out = run_python(&[script.as_os_str(), work.as_os_str()]);
    println!("{}", stdout(&out).trim());
    Fixture { work, model, data }
}

/// The run's YAML config for one variant (the adapter section is the variant's JSON, which
/// is YAML too).
fn write_config(f: &Fixture, name: &str, adapter: &str, from_init: bool) -> PathBuf {
    let mut adapter: Value = serde_json::from_str(adapter).unwrap();
    adapter["plugin"] = json!("lora");
    let init = if from_init {
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
         training: {{max_steps: {STEPS}, micro_batch_size: 2, gradient_accumulation_steps: 2, logging_steps: 1, progress_bar: false}}\n",
        model = f.model.display(),
        out = f.work.join(format!("ours-{name}")).display(),
        data = f.data.display(),
    );
    let path = f.work.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

fn sorted(mut v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Trains variant `name` with the CLI and compares it with peft's run.
fn check_variant(name: &str) {
    let f = fixture();
    let (_, adapter, from_init) = VARIANTS.iter().find(|v| v.0 == name).unwrap();
    let config = write_config(f, name, adapter, *from_init);
    let out = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{name}: train failed:\n{}", stderr(&out));

    let ours: Vec<Value> = read_jsonl(&f.work.join(format!("ours-{name}/metrics.jsonl")));
    let theirs: Value = serde_json::from_str(
        &std::fs::read_to_string(f.work.join(format!("peft-{name}/metrics.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(ours.len(), STEPS, "{name}: one metrics line per step");
    let (mut loss_diff, mut norm_diff) = (0f64, 0f64);
    for (i, line) in ours.iter().enumerate() {
        assert_eq!(line["step"], json!(i + 1));
        let (l, tl) = (line["loss"].as_f64().unwrap(), theirs["loss"][i].as_f64().unwrap());
        let (lr, tlr) = (line["lr"].as_f64().unwrap(), theirs["lr"][i].as_f64().unwrap());
        let (gn, tgn) =
            (line["grad_norm"].as_f64().unwrap(), theirs["grad_norm"][i].as_f64().unwrap());
        println!("{name} step {:>2}: loss {l:.7} vs {tl:.7} (|diff| {:.1e}), lr {lr:.3e}, grad norm {gn:.5} vs {tgn:.5}", i + 1, (l - tl).abs());
        assert!((lr - tlr).abs() <= 1e-12, "{name} step {}: lr {lr} vs transformers' {tlr}", i + 1);
        assert!((l - tl).abs() <= LOSS_TOL, "{name} step {}: loss {l} vs peft's {tl}", i + 1);
        loss_diff = loss_diff.max((l - tl).abs());
        norm_diff = norm_diff.max((gn - tgn).abs() / tgn.abs().max(1e-12));
    }
    let first = theirs["loss"][0].as_f64().unwrap();
    let last = theirs["loss"][STEPS - 1].as_f64().unwrap();
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
        "{name}: {STEPS} steps, max |loss diff| {loss_diff:.2e}, max relative grad-norm diff {norm_diff:.2e}, \
         {} adapter tensors, max relative weight diff {weight_diff:.2e}",
        ours.len()
    );
}

#[test]
fn encoded_samples_equal_the_python_encoding() {
    let f = fixture();
    let theirs: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(f.work.join("encoded.json")).unwrap())
            .unwrap();
    let registry = registry();
    let samples =
        ferrotune::data::load_samples(&registry, "alpaca", "{}", &f.data, "train").unwrap();
    let tok = ferrotune::text::Tokenizer::from_dir(&f.model).unwrap();
    assert_eq!(samples.len(), theirs.len());
    for (i, (s, t)) in samples.iter().zip(&theirs).enumerate() {
        let e = ferrotune::data::encode_sample(&tok, s, &Default::default()).unwrap();
        assert_eq!(json!(e.input_ids), t["input_ids"], "sample {i}: ids");
        assert_eq!(json!(e.labels), t["labels"], "sample {i}: labels");
    }
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        let read = |dir: &str| std::fs::read(f.work.join(dir).join(file)).unwrap();
        assert_eq!(
            read("model"),
            read("tokenizer"),
            "Python reads {file} from the tokenizer folder, the trainer from the model's copy"
        );
    }
    let pad = |p: &Path| ferrotune::text::Tokenizer::from_dir(p).unwrap().pad_token_id();
    assert_eq!(pad(&f.model), Some(0), "right padding with `<|endoftext|>`, as Python pads");
}

#[test]
fn lora_matches_peft() {
    check_variant("lora");
}

#[test]
fn rslora_matches_peft() {
    check_variant("rslora");
}

#[test]
fn dora_matches_peft() {
    check_variant("dora");
}

#[test]
fn pissa_matches_peft() {
    check_variant("pissa");
}
