//! `ferrotune train config.yaml`: the recipe that wires the plugins a config names.
//!
//! model (host) + adapter plugin → trainable parameters → dataset plugin → chat template,
//! token ids and label masks (host) → objective plugin (loss) → backward → memory plugin
//! (clipping, optimizer step) → metrics (JSON lines), checkpoints (atomic), final PEFT
//! adapter directory.
//!
//! Determinism, so that `--resume` continues exactly: the data order of epoch `e` is a
//! permutation drawn from a generator seeded by `(seed, e)`; libtorch's generator (dropout)
//! is re-seeded from `(seed, step)` at the start of every optimizer step; the learning-rate
//! schedule is a function of the step. A checkpoint therefore needs only the adapter, the
//! optimizer state and the step number. Resuming also cuts `metrics.jsonl` back to the
//! checkpoint's step, so a killed and resumed run logs each step once, as an uninterrupted one.
pub mod config;
pub mod schedule;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::kinds::objective::{ObjectiveContext, RewardScores};
use ferrotune_plugin_api::{Batch, ForwardFlags, MemoryStrategy, Objective, PluginError, PluginResult, RewardInput, StepReport};
use tch::Tensor;

use crate::collectives::SingleProcess;
use crate::data::{self, EncodeOptions, Encoded};
use crate::data::ImagePrep;
use crate::model::{CausalLM, VisionInputs};
use crate::non_lora::{self, vision_parameters};
use crate::plugins::Registry;
use crate::text::Tokenizer;
use config::TrainConfig;
use schedule::Schedule;

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub truncated_samples: usize,
    pub skipped_samples: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub trainable_parameters: i64,
    pub seconds: f64,
    pub output_dir: PathBuf,
}

/// Where to resume from.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The newest `checkpoint-N` in the output directory.
    Latest,
    Path(PathBuf),
}

/// The model as objectives see it.
struct PolicyContext<'a> {
    model: &'a CausalLM,
    tokenizer: &'a Tokenizer,
    /// Dropout on (training steps) or off (eval, reference passes are the objective's call).
    train: bool,
}

impl ObjectiveContext for PolicyContext<'_> {
    fn forward(&self, inputs: &[(String, Tensor)], flags: ForwardFlags) -> PluginResult<Vec<(String, Tensor)>> {
        let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let ids = get("input_ids").ok_or_else(|| PluginError::invalid("forward needs `input_ids`"))?;
        let mask = get("attention_mask");
        let images = match (get("pixel_values"), get("image_grid_thw")) {
            (Some(pv), Some(grid)) => Some(VisionInputs {
                pixel_values: pv.shallow_clone(),
                image_grid_thw: data::images::grids_of(grid).map_err(|e| PluginError::invalid(format!("{e:#}")))?,
            }),
            (None, None) => None,
            _ => return Err(PluginError::invalid("forward needs both `pixel_values` and `image_grid_thw`, or neither")),
        };
        let run = || {
            self.model
                .forward_mm_with(ids, mask, images.as_ref(), None, self.model.mode(flags, self.train))
                .map_err(|e| PluginError::runtime(format!("{e:#}")))
        };
        let logits = if flags.contains(ForwardFlags::NO_GRAD) { tch::no_grad(run)? } else { run()? };
        Ok(vec![("logits".to_string(), logits)])
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let opts: serde_json::Value = serde_json::from_str(if options_json.trim().is_empty() { "{}" } else { options_json })
            .map_err(|e| PluginError::invalid(format!("generation options: {e}")))?;
        let mut p = crate::generate::SamplingParams::greedy(opts["max_new_tokens"].as_u64().unwrap_or(64) as usize);
        p.temperature = opts["temperature"].as_f64().unwrap_or(0.0);
        p.top_k = opts["top_k"].as_u64().unwrap_or(0) as usize;
        p.top_p = opts["top_p"].as_f64().unwrap_or(1.0);
        p.seed = opts["seed"].as_u64().unwrap_or(0);
        p.eos_token_ids = self.tokenizer.eos_token_id().into_iter().collect();
        p.pad_token_id = self.tokenizer.pad_token_id().or(self.tokenizer.eos_token_id()).unwrap_or(0);
        crate::generate::generate(self.model, prompts, &p).map_err(|e| PluginError::runtime(format!("{e:#}")))
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        self.tokenizer.decode(ids, true).map_err(|e| PluginError::runtime(format!("{e:#}")))
    }
    fn rewards(&self, _inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        Err(PluginError::unsupported("this run configures no reward plugins"))
    }
}

/// `adapter_init`'s adapter_config.json must describe the adapter this run configures:
/// weights trained with another scale or method would load (same shapes) and silently train
/// something else.
fn check_adapter_init_config(init: &Path, ours: &serde_json::Value) -> Result<()> {
    let file = init.join("adapter_config.json");
    let Ok(text) = std::fs::read_to_string(&file) else { return Ok(()) };
    let theirs: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("adapter_init: {} is not JSON", file.display()))?;
    let differing: Vec<String> = ["peft_type", "r", "lora_alpha", "use_rslora", "use_dora"]
        .iter()
        .filter(|k| {
            let (a, b) = (&ours[**k], &theirs[**k]);
            !a.is_null() && !b.is_null() && a.as_f64().zip(b.as_f64()).map_or(a != b, |(x, y)| x != y)
        })
        .map(|k| format!("{k}: run {} vs adapter_init {}", ours[*k], theirs[*k]))
        .collect();
    if !differing.is_empty() {
        bail!("adapter_init {} was made with another adapter configuration ({}); make the `adapter` section match it", file.display(), differing.join(", "));
    }
    Ok(())
}

/// A permutation of `0..n` determined by `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    crate::rng::SplitMix64(seed).permutation(n)
}

/// The order in which micro-batches are drawn: epoch after epoch over the training set.
struct DataOrder {
    n: usize,
    micro: usize,
    seed: u64,
    shuffle: bool,
}

impl DataOrder {
    fn micro_per_epoch(&self) -> usize {
        self.n.div_ceil(self.micro)
    }
    /// Sample indices of global micro-batch `k`, and its epoch.
    fn micro_batch(&self, k: usize) -> (usize, Vec<usize>) {
        let per = self.micro_per_epoch();
        let (epoch, within) = (k / per, k % per);
        let order = if self.shuffle {
            permutation(self.n, self.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407))
        } else {
            (0..self.n).collect()
        };
        let start = within * self.micro;
        (epoch, order[start..(start + self.micro).min(self.n)].to_vec())
    }
}

/// What one optimizer step did ([`optimizer_step`]).
pub struct StepOutcome {
    /// The sum of the micro-batch losses (with `num_items_in_batch` in the batch metadata:
    /// the mean token loss of the whole step).
    pub loss: f64,
    /// The objective's metrics of the last micro-batch.
    pub metrics: Vec<(String, f64)>,
    /// The memory plugin's report (gradient norm, skipped).
    pub report: StepReport,
    /// Where the wall time went.
    pub timing: StepTiming,
}

/// Seconds spent in one optimizer step: the objective's `loss` calls (batch building, forward
/// and loss), `backward`, and the memory plugin's `step` (clipping, optimizer update, zeroing
/// the gradients). On CUDA, asynchronous kernels are counted where something waits for them.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepTiming {
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// The batch metadata of a micro-batch: `num_items_in_batch`, the label tokens of every
/// micro-batch of the optimizer step (the `sft` objective divides its token sum by it).
pub fn batch_meta(num_items_in_batch: i64) -> String {
    serde_json::json!({ "num_items_in_batch": num_items_in_batch }).to_string()
}

/// One optimizer step, the trainer's inner loop: for each micro-batch `batches` yields (built
/// lazily, one at a time), the objective's loss through `model` in training mode (adapter
/// dropout on) and its backward; then the memory plugin's step at learning rate `lr` (which
/// also zeroes the gradients).
pub fn optimizer_step(
    model: &CausalLM,
    tokenizer: &Tokenizer,
    objective: &mut dyn Objective,
    memory: &mut dyn MemoryStrategy,
    batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
) -> Result<StepOutcome> {
    let mut timing = StepTiming::default();
    let (mut loss, mut metrics) = (0f64, Vec::new());
    let mut clock = Instant::now();
    let lap = |clock: &mut Instant| {
        let s = clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        s
    };
    for batch in batches {
        let batch = batch?;
        let ctx = PolicyContext { model, tokenizer, train: true };
        let out = objective.loss(&batch, &ctx)?;
        timing.forward_s += lap(&mut clock);
        out.loss.f_backward()?;
        loss += out.loss.f_double_value(&[])?;
        metrics = out.metrics;
        timing.backward_s += lap(&mut clock);
    }
    let report = memory.step(lr, &SingleProcess)?;
    timing.optimizer_s += lap(&mut clock);
    Ok(StepOutcome { loss, metrics, report, timing })
}

fn on_device(tensors: Vec<(String, Tensor)>, device: tch::Device) -> Result<Vec<(String, Tensor)>> {
    tensors.into_iter().map(|(n, t)| Ok((n, t.f_to_device(device)?))).collect()
}

/// A micro-batch's tensors: ids, mask and labels, and the pixel values of its images.
fn batch_tensors(items: &[Encoded], pad_id: i64, prep: Option<&ImagePrep>, device: tch::Device) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = data::collate(items, pad_id);
    if let Some(p) = prep {
        tensors.extend(p.batch_tensors(items)?);
    }
    on_device(tensors, device)
}

/// The image settings of a run on a vision model (none for a text model).
pub fn image_prep(cfg: &TrainConfig, tok: &Tokenizer) -> Result<Option<ImagePrep>> {
    let mut prep = ImagePrep::for_model_dir(&cfg.model, tok)?;
    if let Some(p) = prep.as_mut() {
        p.min_pixels = cfg.data.image_min_pixels;
        p.max_pixels = cfg.data.image_max_pixels;
    }
    Ok(prep)
}

/// The run's encoding options.
pub fn encode_options(cfg: &TrainConfig) -> EncodeOptions {
    EncodeOptions { cutoff_len: cfg.data.cutoff_len, train_on_prompt: cfg.data.train_on_prompt, mask_history: cfg.data.mask_history }
}

/// Reads and encodes the run's data as the trainer does, every row kept or reported.
pub fn read_data(cfg: &TrainConfig, registry: &Registry, tok: &Tokenizer, prep: Option<&ImagePrep>) -> Result<data::Prepared> {
    let rows = data::read_rows(registry, &cfg.data.plugin, &serde_json::Value::Object(cfg.data.config.clone()).to_string(), &cfg.data.path, &cfg.data.split)?;
    data::prepare_rows(rows, tok, prep, &encode_options(cfg))
}

/// Reads and encodes the run's data; with `on_bad_sample: stop`, any unusable row stops the
/// run before training, listing them all.
fn prepare_data(cfg: &TrainConfig, registry: &Registry, tok: &Tokenizer, prep: Option<&ImagePrep>) -> Result<data::Prepared> {
    let prepared = read_data(cfg, registry, tok, prep)?;
    if !prepared.bad.is_empty() {
        if cfg.data.on_bad_sample == config::OnBadSample::Stop {
            bail!(
                "{} of the {} rows of {} cannot be used (data.on_bad_sample: stop; set it to skip to train without them;                  `ferrotune data check` reports every row):\n{}",
                prepared.bad.len(),
                prepared.rows,
                cfg.data.path.display(),
                prepared.bad_report(20)
            );
        }
        eprintln!("note: skipping {} unusable rows of {}:\n{}", prepared.bad.len(), cfg.data.path.display(), prepared.bad_report(20));
    }
    for (i, why) in &prepared.no_labels {
        tracing::warn!("sample {i}: {why}; skipped");
    }
    Ok(prepared)
}

fn label_tokens(e: &Encoded) -> i64 {
    e.labels.iter().skip(1).filter(|&&l| l != -100).count() as i64
}

fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step as u64) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

/// Runs (or resumes) a training run.
pub fn train(cfg: &TrainConfig, registry: &Registry, resume: Option<Resume>) -> Result<TrainSummary> {
    let started = Instant::now();
    let device = crate::device::resolve(&cfg.device)?;
    let dtype = crate::model::init::parse_dtype(&cfg.dtype)?;
    // Where to resume from is settled first, so that a missing checkpoint fails before any work.
    let resume_dir = match resume {
        None => None,
        Some(Resume::Path(p)) => Some(p),
        Some(Resume::Latest) => Some(latest_checkpoint(&cfg.output_dir)?.with_context(|| {
            format!(
                "--resume: no checkpoint to resume from: {} holds no checkpoint-N folder (run without --resume to start, \
                 or name a checkpoint folder: --resume DIR)",
                cfg.output_dir.display()
            )
        })?),
    };
    if let Some(dir) = &resume_dir {
        if !dir.join(STATE_FILE).is_file() {
            bail!("--resume: {} is not a checkpoint (it has no {STATE_FILE})", dir.display());
        }
    }
    std::fs::create_dir_all(&cfg.output_dir).with_context(|| format!("cannot create {}", cfg.output_dir.display()))?;
    tch::manual_seed(cfg.seed as i64);

    let mut model = CausalLM::load(&cfg.model, device, dtype)?;
    let tokenizer = Tokenizer::from_dir(&cfg.model)?;
    let method = registry.adapter(&cfg.adapter.plugin, &cfg.adapter.config_json())?;
    let (attach, quantized) = crate::quant::attach_quantized(&mut model, "default", Box::new(method), cfg.quantization.as_ref(), registry)?;
    tracing::info!("adapter `{}` on {} modules", cfg.adapter.plugin, attach.modules.len());
    if let Some(init) = &cfg.adapter_init {
        check_adapter_init_config(init, &model.adapter_peft_config()?)?;
        let file = init.join("adapter_model.safetensors");
        let weights = Tensor::read_safetensors(&file).with_context(|| format!("adapter_init: cannot read {}", file.display()))?;
        model.load_adapter_state_dict(weights).with_context(|| format!("adapter_init {}", init.display()))?;
    }
    let params = model.trainable_parameters()?;

    // Data: canonical samples → token ids and labels (and images, for a vision model).
    let prep = image_prep(cfg, &tokenizer)?;
    let trainable_vision = vision_parameters(&model, &cfg.vision, cfg.optimizer.lr)?;
    let mut params = params;
    params.extend(trainable_vision.iter().map(|p| ferrotune_plugin_api::TrainParam {
        name: p.name.clone(),
        tensor: p.tensor.shallow_clone(),
        lr_scale: p.lr_scale,
        weight_decay_scale: p.weight_decay_scale,
    }));
    let trainable: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();
    let prepared = prepare_data(cfg, registry, &tokenizer, prep.as_ref())?;
    let (rows, truncated) = (prepared.rows, prepared.truncated());
    let mut skipped = prepared.no_labels.len() + prepared.bad.len();
    let mut encoded = Vec::with_capacity(prepared.encoded.len());
    for (_, e) in prepared.encoded {
        if label_tokens(&e) > 0 { encoded.push(e) } else { skipped += 1 }
    }
    if truncated > 0 {
        eprintln!("note: {truncated} of {} samples were longer than cutoff_len {} and were truncated", encoded.len(), cfg.data.cutoff_len);
    }
    if skipped > 0 {
        eprintln!("note: {skipped} samples were skipped ({} without label tokens, {} unusable)", skipped - prepared.bad.len(), prepared.bad.len());
    }
    // Eval: a seeded random subset; training keeps the file order (shuffled per epoch below).
    let eval_n = (encoded.len() as f64 * cfg.data.eval_ratio).round() as usize;
    let mut is_eval = vec![false; encoded.len()];
    for &i in permutation(encoded.len(), cfg.seed).iter().take(eval_n) {
        is_eval[i] = true;
    }
    let (mut train_set, mut eval_set) = (Vec::new(), Vec::new());
    for (e, eval) in encoded.into_iter().zip(is_eval) {
        if eval { eval_set.push(e) } else { train_set.push(e) }
    }
    if train_set.is_empty() {
        if eval_set.is_empty() {
            bail!(
                "no training samples left in {}: none of its {} samples has a label token (each skip is logged above): \
                 check that the samples have non-empty assistant turns, or raise `data.cutoff_len` ({}) if they \
                 were truncated",
                cfg.data.path.display(),
                rows,
                cfg.data.cutoff_len
            );
        }
        bail!(
            "no training samples left in {}: `data.eval_ratio` {} puts all {} usable samples in the eval split; lower it",
            cfg.data.path.display(),
            cfg.data.eval_ratio,
            eval_set.len()
        );
    }

    let t = &cfg.training;
    let data_order = DataOrder { n: train_set.len(), micro: t.micro_batch_size, seed: cfg.seed, shuffle: cfg.data.shuffle };
    let accum = t.gradient_accumulation_steps;
    let total_steps = t.max_steps.unwrap_or_else(|| (t.epochs * data_order.micro_per_epoch()).div_ceil(accum));
    // With epochs (no max_steps) the last step takes only the micro-batches the epochs have left.
    let micro_limit = if t.max_steps.is_some() { usize::MAX } else { t.epochs * data_order.micro_per_epoch() };
    let schedule = Schedule::new(&cfg.scheduler, cfg.optimizer.lr, total_steps);
    let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);

    let mut objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let mut memory = registry.memory(&cfg.memory.plugin, &cfg.memory.config_json())?;
    memory.setup(params, &cfg.optimizer_json(), device, &SingleProcess)?;

    let mut step = 0usize;
    if let Some(dir) = resume_dir {
        step = load_checkpoint(&dir, &mut model, &mut memory)?;
        rewind_metrics(&cfg.output_dir.join(METRICS_FILE), step)?;
        eprintln!("resumed from {} at step {step}", dir.display());
    }

    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.output_dir.join(METRICS_FILE))
        .with_context(|| format!("cannot open {}", cfg.output_dir.join(METRICS_FILE).display()))?;
    let bar = progress_bar(t.progress_bar, total_steps, step);
    let (mut first_loss, mut last_loss, mut eval_loss) = (None, None, None);
    let mut last_eval_step = None;
    while step < total_steps {
        tch::manual_seed(step_seed(cfg.seed, step));
        let step_start = Instant::now();
        let micro: Vec<(usize, Vec<usize>)> =
            (0..accum).map(|j| step * accum + j).take_while(|&k| k < micro_limit).map(|k| data_order.micro_batch(k)).collect();
        // (epoch, sample indices) per micro-batch; the epoch is only informative here.
        let num_items: i64 = micro.iter().flat_map(|(_, idx)| idx.iter().map(|&i| label_tokens(&train_set[i]))).sum();
        let mut tokens = 0usize;
        let batches = micro.iter().map(|(_, idx)| {
            let items: Vec<Encoded> = idx.iter().map(|&i| train_set[i].clone()).collect();
            tokens += items.iter().map(|e| e.input_ids.len()).sum::<usize>();
            Ok(Batch { tensors: batch_tensors(&items, pad_id, prep.as_ref(), device)?, meta_json: batch_meta(num_items) })
        });
        let lr = schedule.lr(step);
        let StepOutcome { loss: loss_sum, metrics: extra, report, .. } =
            optimizer_step(&model, &tokenizer, &mut objective, &mut memory, batches, lr)?;
        step += 1;
        first_loss.get_or_insert(loss_sum);
        last_loss = Some(loss_sum);
        let mut line = serde_json::json!({
            "step": step,
            "epoch": (step * accum) as f64 / data_order.micro_per_epoch() as f64,
            "loss": loss_sum,
            "lr": lr,
            "grad_norm": report.grad_norm,
            "skipped": report.skipped,
            "tokens_per_s": tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9),
        });
        for (k, v) in extra.iter().filter(|(k, _)| k != "loss") {
            line[format!("train/{k}")] = serde_json::json!(v);
        }
        if let Some(every) = t.eval_steps {
            if step % every == 0 && !eval_set.is_empty() {
                let l = evaluate(&model, &tokenizer, &mut objective, &eval_set, t.micro_batch_size, pad_id, prep.as_ref(), device)?;
                line["eval_loss"] = serde_json::json!(l);
                eval_loss = Some(l);
                last_eval_step = Some(step);
            }
        }
        if step % t.logging_steps == 0 || step == total_steps {
            write_metrics_line(&mut metrics, &line)?;
            println!("{line}");
        }
        if let Some(b) = &bar {
            b.set_message(format!("loss {loss_sum:.4} lr {lr:.2e}"));
            b.inc(1);
        }
        if t.save_steps.is_some_and(|every| step % every == 0) && step < total_steps {
            save_checkpoint(&cfg.output_dir, step, &model, &trainable_vision, &memory, t.save_total_limit)?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    if !eval_set.is_empty() && last_eval_step != Some(step) {
        let l = evaluate(&model, &tokenizer, &mut objective, &eval_set, t.micro_batch_size, pad_id, prep.as_ref(), device)?;
        write_metrics_line(&mut metrics, &serde_json::json!({"step": step, "eval_loss": l}))?;
        eval_loss = Some(l);
    }
    model.save_peft_adapter(&cfg.output_dir)?;
    non_lora::save(&cfg.output_dir, &trainable_vision)?;
    if let Some(record) = &quantized {
        crate::quant::write_record(&cfg.output_dir, record)?;
    }
    drop(metrics);
    let metrics_file = cfg.output_dir.join(METRICS_FILE);
    if let Err(e) = crate::plot::write_loss_curve(&metrics_file, &cfg.output_dir.join("loss.png")) {
        tracing::warn!("no loss curve: {e:#}");
    }
    let summary = TrainSummary {
        steps: step,
        train_samples: train_set.len(),
        eval_samples: eval_set.len(),
        truncated_samples: truncated,
        skipped_samples: skipped,
        first_loss,
        last_loss,
        eval_loss,
        trainable_parameters: trainable,
        seconds: started.elapsed().as_secs_f64(),
        output_dir: cfg.output_dir.clone(),
    };
    std::fs::write(cfg.output_dir.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(summary)
}

/// Token-weighted mean loss over the eval set (no graph, dropout off).
fn evaluate(
    model: &CausalLM,
    tokenizer: &Tokenizer,
    objective: &mut dyn Objective,
    eval_set: &[Encoded],
    micro: usize,
    pad_id: i64,
    prep: Option<&ImagePrep>,
    device: tch::Device,
) -> Result<f64> {
    let total: i64 = eval_set.iter().map(label_tokens).sum();
    let mut sum = 0f64;
    for chunk in eval_set.chunks(micro) {
        let batch = Batch {
            tensors: batch_tensors(chunk, pad_id, prep, device)?,
            meta_json: batch_meta(total),
        };
        let ctx = PolicyContext { model, tokenizer, train: false };
        let out = tch::no_grad(|| objective.loss(&batch, &ctx))?;
        sum += out.loss.f_double_value(&[])?;
    }
    Ok(sum)
}

fn progress_bar(enabled: bool, total: usize, done: usize) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps (eta {eta}) {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(done as u64);
    Some(bar)
}

// ------------------------------------------------------------------ metrics

const METRICS_FILE: &str = "metrics.jsonl";

/// Appends one JSON line with a single `write` call: formatting straight into the file would
/// issue one call per JSON token, and a run killed between two of them leaves a torn line.
fn write_metrics_line(file: &mut std::fs::File, line: &serde_json::Value) -> Result<()> {
    file.write_all(format!("{line}\n").as_bytes()).context("cannot append to metrics.jsonl")
}

/// Cuts `metrics.jsonl` back to what the run had written when it reached `step`: lines of
/// later steps (written after that checkpoint by the interrupted run) and a torn last line are
/// dropped, so that a resumed run's file reads as one uninterrupted run.
fn rewind_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let line_step = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64());
    let kept: String =
        text.split_inclusive('\n').filter(|l| l.ends_with('\n') && line_step(l).is_some_and(|s| s as usize <= step)).collect();
    if kept.len() != text.len() {
        crate::atomic::write(path, kept)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ checkpoints

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";

/// `checkpoint-N` folders of a run, by step.
fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(found) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<usize>().ok()) {
            if e.path().join(STATE_FILE).is_file() {
                found.push((n, e.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Writes `checkpoint-{step}` atomically: everything goes to a temporary folder that is
/// renamed into place only when complete, so a killed run never leaves a half checkpoint.
fn save_checkpoint(
    out: &Path,
    step: usize,
    model: &CausalLM,
    full_weights: &[ferrotune_plugin_api::TrainParam],
    memory: &dyn MemoryStrategy,
    keep: Option<usize>,
) -> Result<()> {
    let final_dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    model.save_peft_adapter(&tmp.join("adapter"))?;
    non_lora::save(&tmp.join("adapter"), full_weights)?;
    let state = memory.state_dict()?;
    let refs: Vec<(&str, &Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, tmp.join(OPTIMIZER_FILE))?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&serde_json::json!({ "step": step }))?)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move checkpoint into {}", final_dir.display()))?;
    if let Some(keep) = keep {
        let all = checkpoints(out)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
            std::fs::remove_dir_all(old).ok();
        }
    }
    Ok(())
}

fn load_checkpoint(dir: &Path, model: &mut CausalLM, memory: &mut dyn MemoryStrategy) -> Result<usize> {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(STATE_FILE)).with_context(|| format!("{} has no {STATE_FILE}", dir.display()))?,
    )?;
    let step = state["step"].as_u64().with_context(|| format!("{}/{STATE_FILE}: no `step`", dir.display()))? as usize;
    let adapter = Tensor::read_safetensors(dir.join("adapter/adapter_model.safetensors"))
        .with_context(|| format!("cannot read the adapter of {}", dir.display()))?;
    model.load_adapter_state_dict(adapter)?;
    non_lora::load_into(model, &dir.join("adapter"))?;
    let opt = Tensor::read_safetensors(dir.join(OPTIMIZER_FILE)).with_context(|| format!("cannot read {}/{OPTIMIZER_FILE}", dir.display()))?;
    memory.load_state_dict(opt)?;
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_seeded() {
        let p = permutation(100, 7);
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(p, permutation(100, 7));
        assert_ne!(p, permutation(100, 8));
    }

    #[test]
    fn rewind_metrics_drops_later_steps_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("ferrotune-rewind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_FILE);
        let lines = ["{\"step\":1,\"loss\":2.0}\n", "{\"step\":2,\"loss\":1.5}\n", "{\"step\":3,\"loss\":1.2}\n"];
        std::fs::write(&path, lines.concat() + "{\"step\":4,\"lo").unwrap();
        rewind_metrics(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines[..2].concat());
        rewind_metrics(&path, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), lines[..2].concat(), "nothing to cut: unchanged");
        rewind_metrics(&dir.join("absent.jsonl"), 2).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn data_order_covers_each_epoch_once() {
        let o = DataOrder { n: 7, micro: 3, seed: 1, shuffle: true };
        assert_eq!(o.micro_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|k| o.micro_batch(k).1).collect();
        seen.sort();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        assert_eq!(o.micro_batch(3).0, 1, "micro-batch 3 starts epoch 1");
        assert_eq!(o.micro_batch(2).1.len(), 1, "the last micro-batch of an epoch is short");
    }

    #[test]
    fn adapter_init_with_another_configuration_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferrotune-adapter-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8}"#).unwrap();
        let ours = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8.0, "use_rslora": false});
        let e = check_adapter_init_config(&dir, &ours).unwrap_err().to_string();
        assert!(e.contains("r: run 8 vs adapter_init 4") && !e.contains("lora_alpha"), "{e}");
        let same = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
        check_adapter_init_config(&dir, &same).unwrap();
        std::fs::remove_dir_all(dir).ok();
    }
}
