//! Sample packing (`data.packing: true`):
//! * one micro-batch of packed rows (samples of different lengths, rows right-padded) gives
//!   the `sft` loss and the LoRA gradients of the same samples run one at a time, summed
//!   (within 1e-5 in fp32): samples never see one another and no label crosses a boundary;
//! * `ferrotune train` with packing trains the tiny model (finite, falling loss) and reports
//!   the packing at start-up, with the same figures `data check` gives.
//! * the same for Qwen2-VL samples with images (M-RoPE positions per sample).
//!
//! Needs `cargo build --workspace` (the CLI and the `lora`, `sft`, `single`, `alpaca`,
//! `llava` plugins) and `assets/qwen2-tokenizer`; no Python.
use ferrotune::data::pack::pack_sequences;
use ferrotune::data::{collate, Encoded, ImagePrep, Item, Layout, IGNORE_INDEX};
use ferrotune::model::CausalLM;
use ferrotune::peft::PeftModel;
use ferrotune::text::Tokenizer;
use ferrotune::train::config::TrainConfig;
use ferrotune::train::{image_prep, read_data, PolicyContext};
use ferrotune_plugin_api::{Batch, Objective};
use ferrotune_tests::*;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const WORDS: usize = 40;

/// Sample `k` of `len` tokens: random ids, the first third unlabelled (a prompt).
fn sample(k: i64, len: usize, vocab: i64) -> Encoded {
    tch::manual_seed(100 + k);
    let ids: Vec<i64> =
        Vec::try_from(&Tensor::randint(vocab, [len as i64], (Kind::Int64, Device::Cpu))).unwrap();
    let labels =
        ids.iter().enumerate().map(|(i, &t)| if i < len / 3 { IGNORE_INDEX } else { t }).collect();
    Encoded { input_ids: ids, labels, truncated_from: None, images: Vec::new() }
}

/// The `sft` loss of `items` as one micro-batch (normalised by `num_items` label tokens),
/// backward taken; gradients accumulate in the adapter.
fn sft_loss(
    ctx: &PolicyContext,
    items: &[&Item],
    pad: i64,
    prep: Option<&ImagePrep>,
    num_items: i64,
) -> f64 {
    let (tensors, _) = collate(Layout::Sequences, items, pad, prep).unwrap();
    let batch = Batch {
        tensors,
        meta_json: serde_json::json!({"num_items_in_batch": num_items}).to_string(),
    };
    let mut sft = registry().objective("sft", "{}").unwrap();
    let out = sft.loss(&batch, ctx).unwrap();
    out.loss.backward();
    out.loss.double_value(&[])
}

/// The adapter's gradients (copied), then zeroed.
fn take_grads(model: &PeftModel) -> Vec<(String, Tensor)> {
    model
        .trainable_parameters()
        .unwrap()
        .into_iter()
        .map(|p| {
            let g = p.tensor.grad();
            let out = g.copy();
            let _ = g.shallow_clone().zero_();
            (p.name, out)
        })
        .collect()
}

/// A LoRA model of `dir` (fp32, no dropout) with its adapter moved off its initial value.
fn lora_model(dir: &Path, targets: &str) -> PeftModel {
    let mut model = CausalLM::load(dir, Device::Cpu, Kind::Float).map(PeftModel::new).unwrap();
    let config =
        format!(r#"{{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": {targets}}}"#);
    let method = registry().adapter("lora", &config).unwrap();
    model.attach_adapter("default", Box::new(method)).unwrap();
    perturb_adapter(&mut model, 7, 0.1);
    model
}

/// Packs `samples` into rows of `capacity` tokens and checks that the packed rows, as one
/// micro-batch, give the loss and the adapter gradients of the samples run one at a time.
fn assert_packed_equals_alone(
    model: &PeftModel,
    dir: &Path,
    samples: Vec<(usize, Item)>,
    capacity: usize,
    prep: Option<&ImagePrep>,
) {
    let tokenizer = Tokenizer::from_dir(dir).unwrap();
    let ctx = PolicyContext {
        model,
        tokenizer: &tokenizer,
        train: true,
        rewards: &[],
        max_len: capacity,
        reference: None,
    };
    let num_items: i64 = samples.iter().map(|(_, i)| i.label_tokens()).sum();
    let (rows, stats) = pack_sequences(samples.clone(), capacity, 3).unwrap();
    assert!(stats.rows < samples.len(), "{stats:?}");
    assert_eq!(rows.iter().map(|(_, i)| i.label_tokens()).sum::<i64>(), num_items);

    let alone: f64 = samples.iter().map(|(_, s)| sft_loss(&ctx, &[s], 0, prep, num_items)).sum();
    let alone_grads = take_grads(model);
    let packed_items: Vec<&Item> = rows.iter().map(|(_, i)| i).collect();
    let packed = sft_loss(&ctx, &packed_items, 0, prep, num_items);
    let packed_grads = take_grads(model);

    println!("{}; loss alone {alone}, packed {packed}", stats.describe());
    assert!((alone - packed).abs() <= 1e-5, "loss: {alone} alone vs {packed} packed");
    let mut worst = 0f64;
    for ((n1, g1), (n2, g2)) in alone_grads.iter().zip(&packed_grads) {
        assert_eq!(n1, n2);
        assert!(f64::try_from(g1.abs().max()).unwrap() > 0.0, "{n1}: no gradient");
        worst = worst.max(f64::try_from((g1 - g2).abs().max()).unwrap());
    }
    println!("max |grad diff| {worst:.2e} over {} parameters", alone_grads.len());
    assert!(worst <= 1e-5, "gradients differ by {worst}");
}

#[test]
fn a_packed_batch_equals_its_samples_run_alone() {
    let f = text_fixture("packing-exact", WORDS, 3, 1, 1);
    let model = lora_model(&f.model, r#""all-linear""#);
    let vocab = model.config().vocab_size;
    let samples: Vec<(usize, Item)> = [9usize, 14, 5, 11, 7, 16, 6]
        .iter()
        .enumerate()
        .map(|(k, &len)| (k, Item::Seq(sample(k as i64, len, vocab))))
        .collect();
    // 3 rows or more of 24 tokens: rows of several samples, and padding.
    assert_packed_equals_alone(&model, &f.model, samples, 24, None);
}

/// Qwen2-VL: samples with images (and one without) packed into a row, each with its own
/// M-RoPE positions and its images in order.
#[test]
fn a_packed_vlm_batch_equals_its_samples_run_alone() {
    let dir = temp_dir("packing-vlm");
    let model_dir = dir.join("model");
    init_tiny_vl_model(&model_dir, 3);
    let img = |n: &str| repo_root().join("datasets/story-llava/images").join(n);
    let turn = |from: &str, value: &str| serde_json::json!({"from": from, "value": value});
    let rows = serde_json::json!([
        {"id": "two", "image": [img("toy-train-000_1.png"), img("toy-train-000_2.png")],
         "conversations": [turn("human", "<image>\n<image>\nTell the story."), turn("gpt", "Mira walks home.")]},
        {"id": "text", "conversations": [turn("human", "Say hi."), turn("gpt", "Hi there.")]},
        {"id": "one", "image": [img("toy-train-000_3.png")],
         "conversations": [turn("human", "What is here? <image>"), turn("gpt", "A cat.")]},
    ]);
    let data = dir.join("data.json");
    std::fs::write(&data, rows.to_string()).unwrap();
    let yaml = format!(
        "model: {}\noutput_dir: {}\nadapter: {{plugin: lora}}\n\
         data: {{plugin: llava, path: {}, image_max_pixels: 12544, cutoff_len: 1024, packing: true}}\n",
        model_dir.display(),
        dir.join("out").display(),
        data.display()
    );
    let cfg = TrainConfig::from_yaml(&yaml).unwrap();
    let tok = Tokenizer::from_dir(&model_dir).unwrap();
    let prep = image_prep(&cfg, &tok).unwrap().expect("a vision model");
    let prepared = read_data(&cfg, &registry(), &tok, Some(&prep)).unwrap();
    assert_eq!(prepared.items.len(), 3, "bad rows: {:?}", prepared.bad);
    let model = lora_model(&model_dir, r#"["q_proj", "v_proj"]"#);
    assert_packed_equals_alone(&model, &model_dir, prepared.items, 1024, Some(&prep));
}

#[test]
fn training_with_packing_lowers_the_loss() {
    let f = text_fixture("packing-train", WORDS, 5, 24, 2);
    let out = f.work.join("run");
    let yaml = format!(
        "model: {model}\noutput_dir: {out}\nseed: 4\n\
         adapter: {{plugin: lora, r: 8, lora_alpha: 16, lora_dropout: 0.0, target_modules: all-linear}}\n\
         optimizer: {{lr: 5.0e-3}}\nscheduler: {{type: constant}}\n\
         data: {{plugin: alpaca, path: {data}, cutoff_len: 96, packing: true}}\n\
         training: {{max_steps: 12, micro_batch_size: 2, progress_bar: false}}\n",
        model = f.model.display(),
        out = out.display(),
        data = f.data.display(),
    );
    let config = f.work.join("train.yaml");
    std::fs::write(&config, yaml).unwrap();
    let check = ferrotune(&["data", "check", config.to_str().unwrap()]);
    assert!(check.status.success(), "data check failed:\n{}", stderr(&check));
    let report = stdout(&check);
    assert!(report.contains("packing (data.packing): 24 samples →"), "{report}");
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "train failed:\n{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("packing: 24 samples →"), "no packing line at start-up:\n{log}");
    let losses: Vec<f64> = read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
        .collect();
    assert_eq!(losses.len(), 12, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    println!("{}", log.lines().find(|l| l.starts_with("packing:")).unwrap_or_default());
    println!("losses {losses:?}");
    // Random words: the loss falls by several percent in 12 steps, no more.
    assert!(mean(&losses[8..]) < 0.97 * mean(&losses[..4]), "the loss does not fall: {losses:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["train_samples"], 24, "samples, not packed rows: {summary}");
}
