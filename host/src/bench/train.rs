//! `bench train`: LoRA SFT training measured exactly as `bench/train_transformers.py` measures
//! transformers + peft: the model of a directory, a `lora` adapter (r, alpha = 2r by default,
//! every linear layer but `lm_head`, no dropout), the `sft` objective and the `single` memory
//! plugin (AdamW, weight decay 0, gradient clipping at 1.0, constant learning rate), set up by
//! the trainer's own [`Run::setup_on_items`] and driven by the same [`Run::step`] that
//! `ferrotune train` runs (see [`bench_config`]).
//!
//! Rows: fixed-length row r holds id = (7919·(r·T + i) + 13) mod vocab, i < T ([`bench_rows`]);
//! with `lengths` (variable length) row r has `lengths[r mod n]` ids (cut at T, the cutoff) of
//! the same formula with T = the cutoff. Labels are the ids except the first quarter of each
//! row (len/4 positions), which is −100 as a prompt is. Step s trains on rows s·B … s·B + B − 1
//! (right-padded to the longest; with `packing` the trainer's `data.packing: true` decides how
//! rows share a micro-batch). W warm-up steps are run and not timed, then N timed steps give
//! tokens/s (tokens the forward saw, padding not counted) and label tokens/s (the `sft`
//! objective's `num_label_tokens`) over their wall time, and the fastest step's tokens/s. Peak
//! RSS is the process's `VmHWM`. The roofline (`flops_per_s`, `mfu`) follows
//! [`super::roofline`].
//!
//! With `quantization` (`bench train --quantization '{"plugin": "nf4"}'`, QLoRA) the base
//! weights the adapter targets are stored by that quantizer plugin before the adapter is
//! attached (`crate::peft::quant::attach_quantized`, as `train` does), and the result adds the
//! packed and bf16 bytes of those weights. With `memory_phases` the result splits memory into
//! set-up (load, quantize, attach, optimizer: its peak and the RSS after it) and training (the
//! peak of the steps alone: `VmHWM` is reset through `/proc/self/clear_refs` after set-up).
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{Device, Kind};

use super::roofline::{measured_matmul_flops, ModelShape};
use super::{bench_rows, dtype_name};
use crate::data::{Encoded, Item, IGNORE_INDEX};
use crate::plugins::Registry;
use crate::train::config::TrainConfig;
use crate::train::{Run, StepResult, StepTiming};
use crate::util::procfs::{mib, proc_status_kib, reset_peak_rss};

/// What `bench train` runs.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub batch: usize,
    /// Tokens per row; with `lengths`, the cutoff rows are cut at.
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
    /// Variable-length rows: row r has `lengths[r mod n]` tokens (cut at `seq_len`).
    pub lengths: Option<Vec<usize>>,
    /// Set the trainer's `data.packing: true`.
    pub packing: bool,
}

/// What `bench train` trains on.
#[derive(Debug, Clone)]
pub enum BenchSource {
    /// Synthetic rows (see the module docs) on the model of this directory.
    Model(std::path::PathBuf),
    /// A run config's own model and data set (e.g. the story demo's Qwen2-VL and
    /// StoryReasoning sample), with its device and dtype; the bench sets `max_steps`
    /// (warm-up + steps), one micro-batch of `batch` samples a step, no shuffling, no
    /// progress bar, and `data.packing: true` with `packing`.
    Config(std::path::PathBuf),
}

/// Why `bench train` cannot run.
#[derive(Debug, thiserror::Error)]
pub enum TrainBenchError {
    #[error("bench train needs batch ≥ 1, seq_len ≥ 2 and steps ≥ 1")]
    Shape,
    #[error("bench train --lengths: every length must be at least 2 (got an empty list or a 0/1)")]
    Lengths,
    #[error("bench train --packing: this build's trainer does not take `data.packing` ({0})")]
    PackingUnsupported(String),
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
    /// Variable-length rows, and whether the trainer packed them.
    pub variable_length: bool,
    pub packing: bool,
    /// Tokens the timed steps' forward passes saw (padding not counted) per second of their
    /// wall time.
    pub tokens_per_s: f64,
    /// Label tokens (the loss's targets) of the timed steps per second.
    pub label_tokens_per_s: f64,
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
    /// Roofline (see `bench::roofline`): the timed steps' FLOPs per second, the best matmul
    /// FLOP/s of this process at the same threads and dtype, and their ratio.
    pub flops_per_s: f64,
    pub matmul_flops_per_s: f64,
    pub mfu: f64,
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

/// A bench row as a training item: labels = ids but the first `len / 4` positions, −100.
fn bench_item(ids: Vec<i64>) -> Item {
    let prompt = ids.len() / 4;
    let labels = ids.iter().enumerate().map(|(i, &id)| if i < prompt { IGNORE_INDEX } else { id });
    Item::Seq(Encoded {
        labels: labels.collect(),
        input_ids: ids,
        truncated_from: None,
        images: Vec::new(),
    })
}

/// The encoded rows `bench train` trains on: `rows` rows of [`bench_rows`] (from row 0) of
/// `seq_len` ids each, the first quarter of each unlabelled, as training items in order.
pub fn bench_train_items(rows: usize, seq_len: usize, vocab: i64) -> Vec<(usize, Item)> {
    bench_rows(0, rows, seq_len, vocab).into_iter().map(bench_item).enumerate().collect()
}

/// Variable-length rows: row r is the first `min(lengths[r mod n], cutoff)` ids of row r of
/// [`bench_rows`] with `cutoff` ids a row, labelled as [`bench_train_items`].
pub fn varlen_train_items(
    rows: usize,
    lengths: &[usize],
    cutoff: usize,
    vocab: i64,
) -> Vec<(usize, Item)> {
    let mut all = bench_rows(0, rows, cutoff, vocab);
    for (r, ids) in all.iter_mut().enumerate() {
        ids.truncate(lengths[r % lengths.len()].min(cutoff));
    }
    all.into_iter().map(bench_item).enumerate().collect()
}

/// The run `bench train` sets up: the model of `dir` with a `lora` adapter on every linear
/// layer but `lm_head` (no dropout), `sft`, the `single` memory plugin with AdamW (weight
/// decay 0, clipping at 1.0) at a constant learning rate, one micro-batch of `batch` rows a
/// step, the rows in order; `data.packing: true` only when asked (a build without packing
/// rejects the key).
fn bench_config(dir: &Path, device: Device, dtype: Kind, opts: &TrainBench) -> Result<TrainConfig> {
    let mut config = serde_json::json!({
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
            "gradient_accumulation_steps": 1,
            "progress_bar": false,
            "gradient_checkpointing": opts.gradient_checkpointing,
        },
    });
    if opts.packing {
        config["data"]["packing"] = serde_json::json!(true);
    }
    let mut cfg = parse_bench_config(&serde_yaml::to_string(&config)?, opts.packing)?;
    cfg.quantization = opts.quantization.clone();
    Ok(cfg)
}

/// The run config of `path` with the bench's overrides (see [`BenchSource::Config`]);
/// relative paths are resolved against the file's folder, as `train` does.
fn bench_config_file(path: &Path, opts: &TrainBench) -> Result<TrainConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("bench train --config: cannot read {}", path.display()))?;
    let mut value: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("bench train --config {}: not YAML", path.display()))?;
    let overrides = [
        ("training", "max_steps", serde_yaml::Value::from((opts.warmup + opts.steps) as u64)),
        ("training", "micro_batch_size", serde_yaml::Value::from(opts.batch as u64)),
        ("training", "gradient_accumulation_steps", serde_yaml::Value::from(1u64)),
        ("training", "progress_bar", serde_yaml::Value::from(false)),
        ("data", "shuffle", serde_yaml::Value::from(false)),
    ];
    let packing = opts.packing.then(|| ("data", "packing", serde_yaml::Value::from(true)));
    for (section, key, v) in overrides.into_iter().chain(packing) {
        value[section][key] = v;
    }
    let mut cfg = parse_bench_config(&serde_yaml::to_string(&value)?, opts.packing)
        .with_context(|| format!("in {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut cfg.model, &mut cfg.output_dir, &mut cfg.data.path] {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

/// A bench config's YAML as a [`TrainConfig`]; with `packing`, a build whose trainer rejects
/// `data.packing` is named as such.
fn parse_bench_config(yaml: &str, packing: bool) -> Result<TrainConfig> {
    match TrainConfig::from_yaml(yaml) {
        Err(e) if packing && format!("{e:#}").contains("packing") => {
            Err(TrainBenchError::PackingUnsupported(format!("{e:#}")).into())
        }
        other => other,
    }
}

/// The items of the whole bench: (warm-up + steps) · batch rows, and with `packing` of
/// variable-length rows [`rows_per_packed_row`] times as many (`batch` then counts packed rows
/// of up to `seq_len` tokens, so a step takes about that many rows).
fn bench_items(opts: &TrainBench, vocab: i64) -> Result<Vec<(usize, Item)>> {
    let rows = (opts.warmup + opts.steps) * opts.batch;
    match &opts.lengths {
        None => Ok(bench_train_items(rows, opts.seq_len, vocab)),
        Some(l) if l.is_empty() || l.iter().any(|&n| n < 2) => Err(TrainBenchError::Lengths.into()),
        Some(l) if opts.packing => Ok(varlen_train_items(
            rows * rows_per_packed_row(l, opts.seq_len),
            l,
            opts.seq_len,
            vocab,
        )),
        Some(l) => Ok(varlen_train_items(rows, l, opts.seq_len, vocab)),
    }
}

/// How many rows of `lengths` (cut at `cutoff`) fill one packed row of `cutoff` tokens, by
/// their mean: ⌈cutoff / mean⌉ (`scripts/bench-train.sh` gives the peer's flattened steps
/// batch × this many rows, the same tokens a step).
pub fn rows_per_packed_row(lengths: &[usize], cutoff: usize) -> usize {
    let total: usize = lengths.iter().map(|&n| n.min(cutoff)).sum();
    (cutoff * lengths.len()).div_ceil(total.max(1)).max(1)
}

/// The timed steps' totals.
#[derive(Default)]
struct Timed {
    seconds: f64,
    best_step_tokens_per_s: f64,
    tokens: f64,
    label_tokens: f64,
    flops: f64,
    timing: StepTiming,
}

/// What the roofline needs of the run: the model's shape, the adapter's weights, and the
/// attention's Σ T² per token of the rows (rows are not known per step once packed).
struct FlopModel {
    shape: ModelShape,
    adapter: f64,
    squares_per_token: f64,
    label_fraction: f64,
}

impl FlopModel {
    fn new(shape: ModelShape, adapter: i64, items: &[(usize, Item)]) -> Self {
        let lens: Vec<f64> = items.iter().map(|(_, i)| i.tokens() as f64).collect();
        let tokens: f64 = lens.iter().sum();
        let labels: f64 = items.iter().map(|(_, i)| i.label_tokens() as f64).sum();
        Self {
            shape,
            adapter: adapter as f64,
            squares_per_token: lens.iter().map(|t| t * t).sum::<f64>() / tokens.max(1.0),
            label_fraction: labels / tokens.max(1.0),
        }
    }

    /// The step's label tokens: the objective's `num_label_tokens` (one micro-batch a step),
    /// else the rows' label fraction of its tokens.
    fn label_tokens(&self, step: &StepResult) -> f64 {
        step.metrics
            .iter()
            .find(|(k, _)| k == "num_label_tokens")
            .map_or(step.tokens as f64 * self.label_fraction, |(_, v)| *v)
    }

    fn step_flops(&self, tokens: f64, label_tokens: f64) -> f64 {
        self.shape.step_flops(tokens, tokens * self.squares_per_token, label_tokens, self.adapter)
    }
}

impl Timed {
    fn add(&mut self, step: &StepResult, seconds: f64, flops: &FlopModel) {
        let (tokens, labels) = (step.tokens as f64, flops.label_tokens(step));
        self.seconds += seconds;
        self.best_step_tokens_per_s = self.best_step_tokens_per_s.max(tokens / seconds);
        self.tokens += tokens;
        self.label_tokens += labels;
        self.flops += flops.step_flops(tokens, labels);
        self.timing.forward_s += step.timing.forward_s;
        self.timing.backward_s += step.timing.backward_s;
        self.timing.optimizer_s += step.timing.optimizer_s;
    }
}

/// Runs `bench train` on `source` (see the module docs); `device` and `dtype` apply to
/// synthetic rows (a config names its own).
pub fn bench_train(
    source: &BenchSource,
    registry: &Registry,
    device: Device,
    dtype: Kind,
    opts: &TrainBench,
) -> Result<TrainBenchResult> {
    if opts.batch < 1 || opts.seq_len < 2 || opts.steps < 1 {
        return Err(TrainBenchError::Shape.into());
    }
    let base_rss = proc_status_kib("VmRSS");
    let (cfg, items) = match source {
        BenchSource::Model(dir) => {
            let vocab = crate::model::LlamaConfig::from_dir(dir)?.vocab_size;
            (bench_config(dir, device, dtype, opts)?, Some(bench_items(opts, vocab)?))
        }
        BenchSource::Config(path) => (bench_config_file(path, opts)?, None),
    };
    let (device, dtype) =
        (crate::device::resolve(&cfg.device)?, crate::model::init::parse_dtype(&cfg.dtype)?);
    // As `train` sets up: a QLoRA run quantizes each target layer as it is read.
    let mut run = match items {
        Some(items) => Run::setup_on_items(&cfg, registry, items)?,
        None => Run::setup(&cfg, registry, None)?,
    };
    let shape = ModelShape::of(&crate::model::LlamaConfig::from_dir(&cfg.model)?);
    let flop_model = FlopModel::new(shape, run.trainable_parameters, &run.data.train);
    let setup = if opts.memory_phases {
        let phases = (mib(proc_status_kib("VmHWM")), mib(proc_status_kib("VmRSS")));
        reset_peak_rss()?;
        Some(phases)
    } else {
        None
    };

    let (mut first_loss, mut last_loss) = (None, f64::NAN);
    let mut timed = Timed::default();
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
            timed.add(&out, elapsed, &flop_model);
        }
    }
    let peak_rss_mb = mib(proc_status_kib("VmHWM")).max(setup.map_or(0.0, |s| s.0));
    let train_peak_rss_mb = setup.map(|_| mib(proc_status_kib("VmHWM")));
    let quantized = run.quantized.take();
    let trainable_params = run.trainable_parameters;
    drop(run);
    // After the run (its memory freed): the matmul's buffers never raise the peak.
    let matmul = measured_matmul_flops(device, dtype, matmul_size(device))?;
    let n = opts.steps as f64;
    let flops_per_s = timed.flops / timed.seconds.max(1e-9);
    Ok(TrainBenchResult {
        implementation: format!("ferrotune {}", env!("CARGO_PKG_VERSION")),
        threads: tch::get_num_threads(),
        device: format!("{device:?}").to_lowercase(),
        dtype: dtype_name(dtype),
        batch: opts.batch,
        seq_len: cfg.data.cutoff_len,
        steps: opts.steps,
        warmup: opts.warmup,
        lora_r: opts.rank,
        trainable_params,
        variable_length: opts.lengths.is_some(),
        packing: opts.packing,
        tokens_per_s: timed.tokens / timed.seconds.max(1e-9),
        label_tokens_per_s: timed.label_tokens / timed.seconds.max(1e-9),
        best_tokens_per_s: timed.best_step_tokens_per_s,
        step_s: timed.seconds / n,
        forward_s: timed.timing.forward_s / n,
        backward_s: timed.timing.backward_s / n,
        optimizer_s: timed.timing.optimizer_s / n,
        first_loss: first_loss.unwrap_or(f64::NAN),
        last_loss,
        base_rss_mb: mib(base_rss),
        peak_rss_mb,
        flops_per_s,
        matmul_flops_per_s: matmul,
        mfu: flops_per_s / matmul,
        quantization: quantized.as_ref().map(|r| r.quantization.plugin.clone()),
        packed_base_bytes: quantized.as_ref().map(|r| r.packed_bytes),
        bf16_base_bytes: quantized.as_ref().map(|r| r.bf16_bytes),
        setup_peak_rss_mb: setup.map(|s| s.0),
        setup_rss_mb: setup.map(|s| s.1),
        train_peak_rss_mb,
    })
}

/// The roofline's matmul size: 2048 on CPU (a fraction of a second at a few threads), 8192 on
/// a GPU (long enough to time).
fn matmul_size(device: Device) -> i64 {
    if device.is_cuda() {
        8192
    } else {
        2048
    }
}

/// The lengths file `bench train --lengths` reads: whitespace-separated token counts, `#`
/// comment lines skipped.
pub fn read_lengths(path: &Path) -> Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--lengths: cannot read {}", path.display()))?;
    let words =
        text.lines().filter(|l| !l.trim_start().starts_with('#')).flat_map(str::split_whitespace);
    words
        .map(|w| {
            w.parse::<usize>().with_context(|| {
                format!("--lengths {}: `{w}` is not a token count", path.display())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_items_continue_the_formula_with_the_first_quarter_unlabelled() {
        let items = bench_train_items(4, 8, 100);
        let Item::Seq(e) = &items[2].1 else { panic!("a sequence") };
        assert_eq!(e.input_ids, bench_rows(2, 1, 8, 100)[0]);
        assert_eq!(e.labels[..2], [IGNORE_INDEX, IGNORE_INDEX]);
        assert_eq!(e.labels[2..], e.input_ids[2..]);
        assert_eq!(items.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3]);
        // Positions 2..7 are targets (position 0 never is): 6 label tokens.
        assert_eq!(items[0].1.label_tokens(), 6);
    }

    #[test]
    fn varlen_items_cycle_the_lengths_and_cut_at_the_cutoff() {
        let items = varlen_train_items(3, &[5, 40], 16, 1000);
        let lens: Vec<usize> = items.iter().map(|(_, i)| i.tokens()).collect();
        assert_eq!(lens, [5, 16, 5]);
        let Item::Seq(e) = &items[2].1 else { panic!("a sequence") };
        assert_eq!(e.input_ids[..], bench_rows(2, 1, 16, 1000)[0][..5]);
        assert_eq!(e.labels[0], IGNORE_INDEX);
        assert_eq!(e.labels[1], e.input_ids[1]);
    }

    #[test]
    fn packed_rows_take_cutoff_over_the_mean_length_rows() {
        // Mean of [100, 300] = 200: ⌈1024 / 200⌉ = 6; cut at 150: mean 125, ⌈150 / 125⌉ = 2.
        assert_eq!(rows_per_packed_row(&[100, 300], 1024), 6);
        assert_eq!(rows_per_packed_row(&[100, 300], 150), 2);
    }

    #[test]
    fn lengths_file_skips_comments() {
        let dir = std::env::temp_dir().join(format!("ft-lengths-{}", std::process::id()));
        std::fs::write(&dir, "# a comment\n3 4\n5\n").unwrap();
        assert_eq!(read_lengths(&dir).unwrap(), [3, 4, 5]);
        std::fs::write(&dir, "3 x\n").unwrap();
        assert!(format!("{:#}", read_lengths(&dir).unwrap_err()).contains("`x`"));
        std::fs::remove_file(&dir).ok();
    }

    #[test]
    fn the_committed_alpaca_lengths_parse() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bench/alpaca_lengths.txt");
        let l = read_lengths(&path).unwrap();
        assert_eq!(l.len(), 999);
        assert!(l.iter().all(|&n| (2..=1024).contains(&n)));
    }
}
