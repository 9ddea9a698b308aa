//! QLoRA end to end through the CLI (`quantization:` in a run config):
//! * an nf4 QLoRA fine-tune of a tiny Qwen2 lowers the loss and records what it quantized
//!   (`quantization.json`: every adapted linear but lm_head, packed ≤ 0.30× bf16);
//! * peft loads the saved adapter on the same base quantized by bitsandbytes' NF4 (its LoRA
//!   tensors equal ours), and its logits equal those of `ferrotune merge --merge-base
//!   dequantized`; that merge reports an error near float rounding, `--merge-base original`
//!   a larger one (the quantization error it reintroduces); `generate --adapter` (which
//!   rebuilds the quantized base) gives the merged model's greedy tokens;
//! * an int8 run trains; a LoftQ-initialised run stores LoftQ's Q exactly (nf4 without double
//!   quantization) and trains;
//! * a Qwen2-VL nf4 run quantizes the language model's layers and none of the vision
//!   tower's (which the adapter also targets), and trains;
//! * `bench train --quantization … --memory-phases` reports the packed base and the set-up and
//!   training peaks (`make bench-quant` runs it on a 0.5B-sized model).
//!
//! Needs the workspace build (`ferrotune`; plugins `lora`, `quant`, `sft`, `single`, `alpaca`,
//! `storyreasoning`), `assets/qwen2-tokenizer` and the reference stack (bitsandbytes, peft).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferrotune_tests::*;
use serde_json::Value;

const WORDS: usize = 20;

type Fixture = TextFixture;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| text_fixture("quant-train", WORDS, 1, 8, 1))
}

/// Trains `name` with the quantization section `quantization` (YAML flow mapping); returns
/// the run's folder.
fn train(f: &Fixture, name: &str, quantization: &str) -> PathBuf {
    train_with(f, name, quantization, "")
}

/// [`train`] with extra `lora` keys (`extra_lora`: `, key: value…`).
fn train_with(f: &Fixture, name: &str, quantization: &str, extra_lora: &str) -> PathBuf {
    let out = f.work.join(name);
    let config = f.work.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\nseed: 1\n\
             adapter: {{plugin: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0, target_modules: all-linear{extra_lora}}}\n\
             quantization: {quantization}\n\
             optimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: alpaca, path: {data}}}\n\
             training: {{max_steps: 8, micro_batch_size: 2, progress_bar: false}}\n",
            model = f.model.display(),
            out = out.display(),
            data = f.data.display(),
        ),
    )
    .unwrap();
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "train {name}: {}\n{}", stdout(&o), stderr(&o));
    out
}

fn json(path: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// (first, last) training loss of a run.
fn losses(run: &Path) -> (f64, f64) {
    let summary = json(&run.join("train_summary.json"));
    (summary["first_loss"].as_f64().unwrap(), summary["last_loss"].as_f64().unwrap())
}

fn modules(record: &Value) -> Vec<String> {
    record["modules"].as_array().unwrap().iter().map(|m| m.as_str().unwrap().to_string()).collect()
}

/// `ferrotune merge --merge-base BASE`: the printed `merge_error` object.
fn merge(f: &Fixture, run: &Path, base: &str) -> (PathBuf, Value) {
    let out = f.work.join(format!("merged-{base}"));
    let o = ferrotune(&[
        "merge",
        "--model",
        f.model.to_str().unwrap(),
        "--adapter",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--merge-base",
        base,
    ]);
    assert!(o.status.success(), "merge --merge-base {base}: {}", stderr(&o));
    let text = stdout(&o);
    let line = text
        .lines()
        .find(|l| l.starts_with("{\"merge_error\""))
        .unwrap_or_else(|| panic!("no merge_error line:\n{text}"));
    let v: Value = serde_json::from_str(line).unwrap();
    (out, v["merge_error"].clone())
}

#[test]
fn nf4_qlora_trains_loads_in_peft_and_merges_with_its_error() {
    let f = fixture();
    let run = train(f, "nf4", "{plugin: nf4}");
    let (first, last) = losses(&run);
    println!("nf4 QLoRA: loss {first:.4} -> {last:.4}");
    assert!(last < first * 0.95, "loss {first} -> {last}: did not fall");

    let record = json(&run.join("quantization.json"));
    let quantized = modules(&record);
    // all-linear: 7 projections in each of the tiny model's layers; lm_head is skipped
    assert!(!quantized.is_empty() && quantized.len().is_multiple_of(7), "{quantized:?}");
    assert!(
        quantized.iter().all(|m| m.contains(".layers.") && !m.contains("lm_head")),
        "{quantized:?}"
    );
    let ratio = record["packed_bytes"].as_f64().unwrap() / record["bf16_bytes"].as_f64().unwrap();
    println!("nf4: {} modules, packed {:.3}× bf16", quantized.len(), ratio);
    assert!(ratio <= 0.30, "packed/bf16 = {ratio}");

    let (merged, dequantized) = merge(f, &run, "dequantized");
    let (_, original) = merge(f, &run, "original");
    let (dq_max, orig_max) = (
        dequantized["max_abs_logit_diff"].as_f64().unwrap(),
        original["max_abs_logit_diff"].as_f64().unwrap(),
    );
    println!("merge error (max |logit diff|): dequantized {dq_max:.3e}, original {orig_max:.3e}");
    assert!(dq_max < 1e-4, "merging into the dequantized base changes the logits by {dq_max}");
    assert!(
        orig_max > 10.0 * dq_max.max(1e-6),
        "the original base should reintroduce the quantization error: {orig_max} vs {dq_max}"
    );

    // `generate --adapter` rebuilds the quantized base from quantization.json: the merged
    // model's greedy tokens
    let generate = |extra: &[&str]| -> Value {
        let mut args = vec![
            "generate",
            "--prompt",
            "w1 w2 w3 w4",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = ferrotune(&args);
        assert!(o.status.success(), "generate {extra:?}: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    let adapted =
        generate(&["--model", f.model.to_str().unwrap(), "--adapter", run.to_str().unwrap()]);
    let from_merged = generate(&["--model", merged.to_str().unwrap()]);
    assert_eq!(
        adapted["token_ids"], from_merged["token_ids"],
        "generate --adapter {adapted} vs the merged model {from_merged}"
    );

    let report = f.work.join("peft-check.json");
    let script = repo_root().join("tests/python/qlora_peft_check.py");
    run_python(&[
        script.as_os_str(),
        f.model.as_os_str(),
        run.as_os_str(),
        merged.as_os_str(),
        report.as_os_str(),
    ]);
    let check = json(&report);
    println!("peft on the NF4 base: {check}");
    assert!(check["lora_tensors"].as_u64().unwrap() as usize == 2 * quantized.len(), "{check}");
    assert_eq!(check["lora_max_diff"].as_f64().unwrap(), 0.0, "{check}");
    let diff = check["max_logit_diff"].as_f64().unwrap();
    assert!(
        diff < 1e-4,
        "peft (bitsandbytes NF4 base + our adapter) vs our dequantized merge: {diff}"
    );
}

#[test]
fn int8_qlora_trains() {
    let f = fixture();
    let run = train(f, "int8", "{plugin: int8}");
    let (first, last) = losses(&run);
    println!("int8: loss {first:.4} -> {last:.4}");
    assert!(last < first * 0.95, "loss {first} -> {last}: did not fall");
    let record = json(&run.join("quantization.json"));
    assert_eq!(record["quantization"]["plugin"], "int8");
    let ratio = record["packed_bytes"].as_f64().unwrap() / record["bf16_bytes"].as_f64().unwrap();
    assert!(ratio > 0.5 && ratio < 0.6, "int8 with a row absmax is about half of bf16: {ratio}");
}

#[test]
fn qwen2vl_nf4_quantizes_the_language_model_not_the_vision_tower() {
    let dir = temp_dir("quant-vl");
    let model = dir.join("model");
    init_tiny_vl_model(&model, 3);
    let run = dir.join("run");
    let config = dir.join("train.yaml");
    // the adapter targets vision-tower layers too (qkv, fc1, fc2): skip_modules keeps them dense
    std::fs::write(
        &config,
        format!(
            "model: {model}\noutput_dir: {out}\nseed: 1\n\
             adapter: {{plugin: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0, \
             target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, qkv, fc1, fc2]}}\n\
             quantization: {{plugin: nf4, compute_dtype: float32}}\n\
             optimizer: {{lr: 1.0e-2}}\nscheduler: {{type: constant}}\n\
             data: {{plugin: storyreasoning, path: {data}, cutoff_len: 512, image_max_pixels: 50176, config: {{max_images: 1}}}}\n\
             training: {{max_steps: 2, micro_batch_size: 1, progress_bar: false}}\n",
            model = model.display(),
            out = run.display(),
            data = repo_root().join("datasets/storyreasoning-sample").display(),
        ),
    )
    .unwrap();
    let o = ferrotune(&["train", config.to_str().unwrap()]);
    assert!(o.status.success(), "train: {}\n{}", stdout(&o), stderr(&o));
    let record = json(&run.join("quantization.json"));
    let quantized = modules(&record);
    println!("Qwen2-VL nf4: {} modules quantized", quantized.len());
    assert!(
        quantized.iter().any(|m| m.ends_with("mlp.down_proj"))
            && quantized.iter().any(|m| m.ends_with("self_attn.q_proj")),
        "{quantized:?}"
    );
    assert!(
        quantized.iter().all(|m| !m.contains("visual")),
        "vision tower quantized: {quantized:?}"
    );
    // the adapter did reach the vision tower: its LoRA weights are saved
    let adapter = tch::Tensor::read_safetensors(run.join("adapter_model.safetensors")).unwrap();
    assert!(
        adapter.iter().any(|(n, _)| n.contains("visual") && n.contains("lora_A")),
        "the adapter should target the vision tower too"
    );
    let (first, last) = losses(&run);
    println!("Qwen2-VL nf4: loss {first:.4} -> {last:.4}");
    assert!(first.is_finite() && last.is_finite() && summary_steps(&run) == 2);
}

fn summary_steps(run: &Path) -> u64 {
    json(&run.join("train_summary.json"))["steps"].as_u64().unwrap()
}

#[test]
fn bench_train_reports_the_packed_base_and_memory_phases() {
    let f = fixture();
    let run = |extra: &[&str]| -> Value {
        let mut args = vec![
            "bench",
            "train",
            "--model",
            f.model.to_str().unwrap(),
            "--batch",
            "1",
            "--seq-len",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rank",
            "2",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        let o = ferrotune(&args);
        assert!(o.status.success(), "bench train {extra:?}: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    let plain = run(&[]);
    assert!(
        plain.get("packed_base_bytes").is_none() && plain.get("train_peak_rss_mb").is_none(),
        "{plain}"
    );
    let q = run(&["--quantization", r#"{"plugin": "nf4"}"#, "--memory-phases"]);
    println!("bench train nf4: {q}");
    assert_eq!(q["quantization"], "nf4");
    let ratio = q["packed_base_bytes"].as_f64().unwrap() / q["bf16_base_bytes"].as_f64().unwrap();
    assert!(ratio > 0.2 && ratio <= 0.30, "{ratio}");
    let (setup_peak, train_peak, peak) = (
        q["setup_peak_rss_mb"].as_f64().unwrap(),
        q["train_peak_rss_mb"].as_f64().unwrap(),
        q["peak_rss_mb"].as_f64().unwrap(),
    );
    assert!(
        setup_peak > 0.0 && train_peak > 0.0 && peak >= setup_peak.max(train_peak) - 1e-9,
        "{q}"
    );
    let e = ferrotune(&[
        "bench",
        "train",
        "--model",
        f.model.to_str().unwrap(),
        "--quantization",
        "{plugin: nf4",
    ]);
    assert!(!e.status.success() && stderr(&e).contains("--quantization"), "{}", stderr(&e));
}

#[test]
fn loftq_qlora_stores_q_exactly_and_trains() {
    let f = fixture();
    let run = train_with(
        f,
        "loftq",
        "{plugin: nf4, double_quant: false}",
        ", init_lora_weights: loftq, loftq_config: {loftq_iter: 2}",
    );
    let record = json(&run.join("quantization.json"));
    assert_eq!(record["requantization_max_error"].as_f64(), Some(0.0), "{record}");
    let config = json(&run.join("adapter_config.json"));
    assert_eq!(config["init_lora_weights"], "loftq");
    assert_eq!(config["loftq_config"]["loftq_iter"], 2);
    let (first, last) = losses(&run);
    println!("LoftQ QLoRA: loss {first:.4} -> {last:.4}");
    assert!(last < first * 0.95, "loss {first} -> {last}: did not fall");
}
