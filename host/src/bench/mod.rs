//! Benchmarks (commands that print numbers; never timed tests).
//!
//! `bench generate` measures prefill and decode tokens/s exactly as
//! `bench/generate_transformers.py` does for transformers, so both can be printed side by
//! side: B prompts of P ids each (id = (7919·(b·P + i) + 13) mod vocab), greedy decoding of N
//! new tokens with the KV cache and no end-of-sequence stop, best of R repeats after one
//! warm-up prefill.
//!
//! `bench train` measures LoRA SFT training exactly as `bench/train_transformers.py` does
//! for transformers + peft: the model of a directory, a `lora` adapter (r, alpha = 2r by
//! default, every linear layer but `lm_head`, no dropout), the `sft` objective and the `single`
//! memory plugin (AdamW, weight decay 0, gradient clipping at 1.0, constant learning rate),
//! set up by the trainer's own [`Run::setup_on_items`] and driven by the same [`Run::step`]
//! that `ferrotune train` runs (see [`bench_config`]). Step `s` trains on rows `s·B … s·B + B − 1` of the shared formula
//! id = (7919·(row·T + i) + 13) mod vocab (row 0… of [`bench_prompts`]), with an all-ones
//! attention mask and labels = ids. W warm-up steps are run and not timed, then N timed
//! steps give tokens/s = N·B·T / their wall time (and B·T / the fastest step's, which other
//! load on the machine disturbs less). Peak RSS is the process's `VmHWM`.
//!
//! With `quantization` (`bench train --quantization '{"plugin": "nf4"}'`, QLoRA) the base
//! weights the adapter targets are stored by that quantizer plugin before the adapter is
//! attached (`crate::peft::quant::attach_quantized`, as `train` does), and the result adds the
//! packed and bf16 bytes of those weights. With `memory_phases` the result splits memory into
//! set-up (load, quantize, attach, optimizer: its peak and the RSS after it) and training (the
//! peak of the steps alone: `VmHWM` is reset through `/proc/self/clear_refs` after set-up).
//! `make bench-quant` runs fp32 LoRA, bf16 LoRA and QLoRA each in its own process.
pub mod memory;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{Device, Kind};

use crate::data::layout::Item;
use crate::data::Encoded;
use crate::generate::{generate_with_stats, SamplingParams};
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::train::config::TrainConfig;
use crate::train::{Run, StepTiming};
use crate::util::procfs::{mib, proc_status_kib, reset_peak_rss};

/// What to run.
#[derive(Debug, Clone)]
pub struct GenerateBench {
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub repeats: usize,
}

/// One implementation's result (the JSON line the Python side prints has the same keys).
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchResult {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub threads: i32,
    pub batch: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub dtype: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The benchmark's prompts (shared formula with the Python side).
pub fn bench_prompts(batch: usize, prompt_len: usize, vocab: i64) -> Vec<Vec<i64>> {
    bench_rows(0, batch, prompt_len, vocab)
}

/// Rows `first … first + rows − 1` of the shared formula: id = (7919·(row·len + i) + 13) mod vocab.
pub fn bench_rows(first: usize, rows: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    (first..first + rows)
        .map(|r| (0..len).map(|i| (7919 * (r * len + i) as i64 + 13) % vocab).collect())
        .collect()
}

pub fn bench_generate(model: &PeftModel, opts: &GenerateBench) -> Result<GenerateBenchResult> {
    let prompts = bench_prompts(opts.batch, opts.prompt_len, model.config().vocab_size);
    let params = SamplingParams::greedy(opts.new_tokens);
    // Warm-up: one prefill (lazy libtorch initialisation, allocator pools).
    generate_with_stats(model, &prompts, &SamplingParams::greedy(1))?;
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..opts.repeats.max(1) {
        let g = generate_with_stats(model, &prompts, &params)?;
        prefill = prefill.max(g.stats.prefill_tokens_per_second());
        decode = decode.max(g.stats.decode_tokens_per_second());
    }
    Ok(GenerateBenchResult {
        implementation: format!("ferrotune {}", env!("CARGO_PKG_VERSION")),
        threads: tch::get_num_threads(),
        batch: opts.batch,
        prompt_len: opts.prompt_len,
        new_tokens: opts.new_tokens,
        dtype: dtype_name(model.dtype()),
        prefill_tok_s: prefill,
        decode_tok_s: decode,
    })
}

/// What `bench train` runs.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub batch: usize,
    pub seq_len: usize,
    /// Timed optimizer steps.
    pub steps: usize,
    /// Untimed optimizer steps before them.
    pub warmup: usize,
    /// LoRA rank and alpha.
    pub rank: i64,
    pub alpha: f64,
    pub lr: f64,
    pub seed: u64,
    /// Recompute each decoder layer in backward (activation checkpointing).
    pub gradient_checkpointing: bool,
    /// Quantize the adapted base weights (QLoRA); None: a dense base.
    pub quantization: Option<crate::peft::quant::QuantizationConfig>,
    /// Report set-up and training memory separately (see the module docs).
    pub memory_phases: bool,
}

/// One implementation's result (`bench/train_transformers.py` prints the same keys).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchResult {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub threads: i32,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub warmup: usize,
    pub lora_r: i64,
    pub trainable_params: i64,
    /// Timed tokens (steps · batch · seq_len) per second of the timed steps' wall time.
    pub tokens_per_s: f64,
    /// Tokens per second of the fastest timed step (less sensitive to other load on the machine).
    pub best_tokens_per_s: f64,
    /// Mean wall time of a timed step and its parts (forward + loss, backward, clip + optimizer).
    pub step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Loss of the first step (B = 0: the base model's loss, equal on both sides) and the last.
    pub first_loss: f64,
    pub last_loss: f64,
    /// Resident memory once the framework is loaded, before the model (`VmRSS`, MiB).
    pub base_rss_mb: f64,
    /// Peak resident memory of the process (`VmHWM`, MiB).
    pub peak_rss_mb: f64,
    /// The quantizer plugin (QLoRA runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Bytes the quantized base weights take packed, and the same weights in bf16.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed_base_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bf16_base_bytes: Option<u64>,
    /// `memory_phases`: peak RSS of the set-up, RSS right after it, and peak RSS of the
    /// training steps alone (MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_peak_rss_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_rss_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_peak_rss_mb: Option<f64>,
}

/// The encoded rows `bench train` trains on: `rows` rows of [`bench_rows`] (from row 0) of
/// `seq_len` ids each, labels = ids, as training items in order.
pub fn bench_train_items(rows: usize, seq_len: usize, vocab: i64) -> Vec<(usize, Item)> {
    bench_rows(0, rows, seq_len, vocab)
        .into_iter()
        .enumerate()
        .map(|(i, ids)| {
            (
                i,
                Item::Seq(Encoded {
                    labels: ids.clone(),
                    input_ids: ids,
                    truncated_from: None,
                    images: Vec::new(),
                }),
            )
        })
        .collect()
}

/// The run `bench train` sets up: the model of `dir` with a `lora` adapter on every linear
/// layer but `lm_head` (no dropout), `sft`, the `single` memory plugin with AdamW (weight
/// decay 0, clipping at 1.0) at a constant learning rate, one micro-batch of `batch` rows a
/// step, the rows in order.
fn bench_config(dir: &Path, device: Device, dtype: Kind, opts: &TrainBench) -> Result<TrainConfig> {
    let config = serde_json::json!({
        "model": dir,
        "output_dir": dir.join("bench-train-unused"),
        "device": ferrotune_plugin_api::tensor::device_name(device),
        "dtype": dtype_name(dtype),
        "seed": opts.seed,
        "adapter": {"plugin": "lora", "r": opts.rank, "lora_alpha": opts.alpha, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "objective": {"plugin": "sft"},
        "memory": {"plugin": "single"},
        "optimizer": {"lr": opts.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "scheduler": {"type": "constant"},
        "data": {"plugin": "synthetic", "path": "(bench rows)", "shuffle": false, "cutoff_len": opts.seq_len.max(2)},
        "training": {
            "max_steps": opts.warmup + opts.steps,
            "micro_batch_size": opts.batch,
            "progress_bar": false,
            "gradient_checkpointing": opts.gradient_checkpointing,
        },
    });
    let mut cfg = TrainConfig::from_yaml(&serde_yaml::to_string(&config)?)?;
    cfg.quantization = opts.quantization.clone();
    Ok(cfg)
}

/// Runs `bench train` on the model directory `dir` (see the module docs).
pub fn bench_train(
    dir: &Path,
    registry: &Registry,
    device: Device,
    dtype: Kind,
    opts: &TrainBench,
) -> Result<TrainBenchResult> {
    anyhow::ensure!(
        opts.batch >= 1 && opts.seq_len >= 2 && opts.steps >= 1,
        "bench train needs batch ≥ 1, seq_len ≥ 2 and steps ≥ 1"
    );
    let base_rss = proc_status_kib("VmRSS");
    let cfg = bench_config(dir, device, dtype, opts)?;
    let vocab = crate::model::LlamaConfig::from_dir(dir)?.vocab_size;
    let items = bench_train_items((opts.warmup + opts.steps) * opts.batch, opts.seq_len, vocab);
    // As `train` sets up: a QLoRA run quantizes each target layer as it is read.
    let mut run = Run::setup_on_items(&cfg, registry, items)?;
    let setup = if opts.memory_phases {
        let phases = (mib(proc_status_kib("VmHWM")), mib(proc_status_kib("VmRSS")));
        reset_peak_rss()?;
        Some(phases)
    } else {
        None
    };

    let (mut first_loss, mut last_loss) = (None, f64::NAN);
    let mut timing = StepTiming::default();
    let (mut timed, mut best) = (0f64, f64::INFINITY);
    for step in 0..opts.warmup + opts.steps {
        let started = Instant::now();
        let out = run.step().with_context(|| format!("bench train: step {step}"))?;
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        let elapsed = started.elapsed().as_secs_f64();
        first_loss.get_or_insert(out.loss);
        last_loss = out.loss;
        if step >= opts.warmup {
            timed += elapsed;
            best = best.min(elapsed);
            timing.forward_s += out.timing.forward_s;
            timing.backward_s += out.timing.backward_s;
            timing.optimizer_s += out.timing.optimizer_s;
        }
    }
    let n = opts.steps.max(1) as f64;
    let quantized = run.quantized.as_ref();
    Ok(TrainBenchResult {
        implementation: format!("ferrotune {}", env!("CARGO_PKG_VERSION")),
        threads: tch::get_num_threads(),
        device: format!("{device:?}").to_lowercase(),
        dtype: dtype_name(dtype),
        batch: opts.batch,
        seq_len: opts.seq_len,
        steps: opts.steps,
        warmup: opts.warmup,
        lora_r: opts.rank,
        trainable_params: run.trainable_parameters,
        tokens_per_s: (opts.steps * opts.batch * opts.seq_len) as f64 / timed.max(1e-9),
        best_tokens_per_s: (opts.batch * opts.seq_len) as f64 / best,
        step_s: timed / n,
        forward_s: timing.forward_s / n,
        backward_s: timing.backward_s / n,
        optimizer_s: timing.optimizer_s / n,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        base_rss_mb: mib(base_rss),
        peak_rss_mb: mib(proc_status_kib("VmHWM")).max(setup.map_or(0.0, |s| s.0)),
        quantization: quantized.map(|r| r.quantization.plugin.clone()),
        packed_base_bytes: quantized.map(|r| r.packed_bytes),
        bf16_base_bytes: quantized.map(|r| r.bf16_bytes),
        setup_peak_rss_mb: setup.map(|s| s.0),
        setup_rss_mb: setup.map(|s| s.1),
        train_peak_rss_mb: setup.map(|_| mib(proc_status_kib("VmHWM"))),
    })
}

fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::BFloat16 => "bfloat16".into(),
        Kind::Half => "float16".into(),
        _ => "float32".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_follow_the_shared_formula() {
        let p = bench_prompts(2, 3, 100);
        assert_eq!(p, vec![vec![13, 32, 51], vec![70, 89, 8]]);
        assert_eq!(bench_rows(1, 1, 3, 100), vec![vec![70, 89, 8]]);
    }

    #[test]
    fn train_items_continue_the_formula_with_labels_equal_to_ids() {
        let items = bench_train_items(4, 3, 100);
        let Item::Seq(e) = &items[2].1 else { panic!("a sequence") };
        assert_eq!(e.input_ids, bench_rows(2, 1, 3, 100)[0]);
        assert_eq!(e.labels, e.input_ids);
        assert_eq!(items.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }
}
