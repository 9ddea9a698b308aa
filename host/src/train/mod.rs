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
pub mod layout;
pub mod schedule;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::kinds::objective::{ObjectiveContext, RewardScores};
use ferrotune_plugin_api::{Batch, ForwardFlags, MemoryStrategy, Objective, PluginError, PluginResult, Reward, RewardInput, StepReport};
use ferrotune_plugin_api::kinds::reward::RewardHandle;
use tch::Tensor;

use crate::collectives::{Group, SingleProcess};
use ferrotune_plugin_api::Collectives;
use ferrotune_plugin_api::kinds::memory::{OFFLOAD_PARAMS_CPU, SHARD_FROZEN_PARAMS};
use crate::data::{self, EncodeOptions};
use crate::data::ImagePrep;
use crate::model::{CausalLM, VisionInputs};
use crate::non_lora::{self, vision_parameters};
use crate::plugins::Registry;
use crate::text::Tokenizer;
use config::TrainConfig;
use layout::{Item, Layout};
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

/// A reward plugin of the run, with its name and weight.
pub struct LoadedReward {
    pub name: String,
    pub weight: f64,
    pub handle: RewardHandle,
}

/// Loads the run's reward plugins (`rewards:`).
pub fn load_rewards(cfg: &TrainConfig, registry: &Registry) -> Result<Vec<LoadedReward>> {
    cfg.rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let handle = registry.reward(&r.plugin, &r.config_json()).with_context(|| format!("config key `rewards[{i}]`"))?;
            Ok(LoadedReward { name: r.display_name().to_string(), weight: r.weight, handle })
        })
        .collect()
}

/// The model as objectives see it.
pub struct PolicyContext<'a> {
    pub model: &'a CausalLM,
    pub tokenizer: &'a Tokenizer,
    /// Dropout on (training steps) or off (eval, reference passes are the objective's call).
    pub train: bool,
    /// The run's reward plugins (GRPO).
    pub rewards: &'a [LoadedReward],
    /// Prompt plus generated tokens stay within this many (`data.cutoff_len`).
    pub max_len: usize,
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
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let room = self.max_len.saturating_sub(longest);
        if room == 0 {
            return Err(PluginError::invalid(format!(
                "a prompt of {longest} tokens leaves no room for generation within cutoff_len {}",
                self.max_len
            )));
        }
        p.max_new_tokens = p.max_new_tokens.min(room);
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
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        if self.rewards.is_empty() {
            return Err(PluginError::unsupported("this run configures no reward plugins (add a `rewards:` list to the config)"));
        }
        self.rewards
            .iter()
            .map(|r| {
                let scores = r.handle.score(inputs).map_err(|e| e.context(format!("reward `{}`", r.name)))?;
                Ok(RewardScores { name: r.name.clone(), weight: r.weight, scores })
            })
            .collect()
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
    /// The objective's metrics over the step's micro-batches (see [`MetricOp`]).
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

/// Where a micro-batch sits in the run, for its metadata.
#[derive(Clone, Copy, Debug)]
struct MicroPosition {
    /// Label tokens of the whole optimizer step (sequences only).
    num_items: i64,
    gradient_accumulation_steps: usize,
    /// Index of the micro-batch within its optimizer step.
    micro_index: usize,
    /// Generation objectives: which reuse of the generation batch this step is.
    iteration: usize,
    num_iterations: usize,
}

/// The metadata of a micro-batch in `layout`: SFT's `num_items_in_batch` (sequences only:
/// other objectives count their own items), `gradient_accumulation_steps`, the position of
/// the micro-batch for objectives that reuse a generation batch, the sample ids, and what
/// the layout adds.
fn micro_meta(layout: Layout, at: MicroPosition, sample_ids: Vec<serde_json::Value>, extra: serde_json::Map<String, serde_json::Value>) -> String {
    let mut meta = extra;
    if layout == Layout::Sequences {
        meta.insert("num_items_in_batch".into(), serde_json::json!(at.num_items));
    }
    meta.insert("gradient_accumulation_steps".into(), serde_json::json!(at.gradient_accumulation_steps));
    meta.insert("micro_index".into(), serde_json::json!(at.micro_index));
    meta.insert("iteration".into(), serde_json::json!(at.iteration));
    meta.insert("num_iterations".into(), serde_json::json!(at.num_iterations));
    meta.insert("sample_ids".into(), serde_json::Value::Array(sample_ids));
    serde_json::Value::Object(meta).to_string()
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
    let ctx = PolicyContext { model, tokenizer, train: true, rewards: &[], max_len: usize::MAX };
    optimizer_step_with(&ctx, objective, memory, batches, lr, &SingleProcess, 1.0)
}

/// [`optimizer_step`] with the run's full context (reward plugins, length bound), its process
/// group, and the factor each micro-batch loss is multiplied by before its backward (the world
/// size for a sequence loss divided by the global token count: the memory plugin averages
/// gradients over the ranks). The reported loss is this rank's, unscaled.
fn optimizer_step_with(
    ctx: &PolicyContext<'_>,
    objective: &mut dyn Objective,
    memory: &mut dyn MemoryStrategy,
    batches: impl IntoIterator<Item = Result<Batch>>,
    lr: f64,
    comm: &dyn Collectives,
    loss_scale: f64,
) -> Result<StepOutcome> {
    let mut timing = StepTiming::default();
    let (mut loss, mut micro_metrics) = (0f64, Vec::new());
    let mut clock = Instant::now();
    let lap = |clock: &mut Instant| {
        let s = clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        s
    };
    for batch in batches {
        let batch = batch?;
        let out = objective.loss(&batch, ctx)?;
        timing.forward_s += lap(&mut clock);
        if loss_scale == 1.0 { out.loss.f_backward()? } else { out.loss.f_mul_scalar(loss_scale)?.f_backward()? }
        loss += out.loss.f_double_value(&[])?;
        micro_metrics.push(out.metrics);
        timing.backward_s += lap(&mut clock);
    }
    let metrics = combine_metrics(&micro_metrics);
    let report = memory.step(lr, comm)?;
    timing.optimizer_s += lap(&mut clock);
    Ok(StepOutcome { loss, metrics, report, timing })
}

/// How a metric of several micro-batches or ranks becomes one value, by its name's last
/// part: `min…` / `…_min` the minimum, `max…` / `…_max` the maximum, anything else the mean
/// (as trl gathers its metrics over processes, then takes the mean, min or max).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricOp {
    Mean,
    Min,
    Max,
}

impl MetricOp {
    fn of(name: &str) -> Self {
        let last = name.rsplit('/').next().unwrap_or(name);
        if last.starts_with("min") || last.ends_with("_min") {
            MetricOp::Min
        } else if last.starts_with("max") || last.ends_with("_max") {
            MetricOp::Max
        } else {
            MetricOp::Mean
        }
    }
}

/// The step's metrics from those of its micro-batches (each micro-batch counts once; a
/// metric some micro-batches lack is combined over those that have it).
fn combine_metrics(micro: &[Vec<(String, f64)>]) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64, usize)> = Vec::new();
    for (k, v) in micro.iter().flatten() {
        match out.iter_mut().find(|(n, _, _)| n == k) {
            Some(m) => {
                m.1 = match MetricOp::of(k) {
                    MetricOp::Mean => m.1 + v,
                    MetricOp::Min => m.1.min(*v),
                    MetricOp::Max => m.1.max(*v),
                };
                m.2 += 1;
            }
            None => out.push((k.clone(), *v, 1)),
        }
    }
    out.into_iter().map(|(k, v, n)| if MetricOp::of(&k) == MetricOp::Mean { (k, v / n as f64) } else { (k, v) }).collect()
}

/// The step's metrics over all ranks: each rank's value combined by [`MetricOp`]. Ranks run
/// the same objective, so they report the same metric names; if their lists differ anyway,
/// each rank keeps its own values (rank 0's are logged) and a warning says so.
fn reduce_metrics(comm: &dyn Collectives, metrics: Vec<(String, f64)>) -> Result<Vec<(String, f64)>> {
    use ferrotune_plugin_api::ReduceOp;
    if comm.world_size() == 1 {
        return Ok(metrics);
    }
    let n = metrics.len() as f64;
    let counts = Tensor::from_slice(&[n, -n]);
    comm.all_reduce(&counts, ReduceOp::MAX)?;
    if counts.f_double_value(&[0])? != -counts.f_double_value(&[1])? {
        tracing::warn!("ranks report different objective metrics this step; logging rank 0's");
        return Ok(metrics);
    }
    let mut out = metrics;
    for (op, reduce) in [(MetricOp::Mean, ReduceOp::AVG), (MetricOp::Min, ReduceOp::MIN), (MetricOp::Max, ReduceOp::MAX)] {
        let idx: Vec<usize> = (0..out.len()).filter(|&i| MetricOp::of(&out[i].0) == op).collect();
        if idx.is_empty() {
            continue;
        }
        let values = Tensor::from_slice(&idx.iter().map(|&i| out[i].1).collect::<Vec<f64>>());
        comm.all_reduce(&values, reduce)?;
        for (j, &i) in idx.iter().enumerate() {
            out[i].1 = values.f_double_value(&[j as i64])?;
        }
    }
    Ok(out)
}

fn on_device(tensors: Vec<(String, Tensor)>, device: tch::Device) -> Result<Vec<(String, Tensor)>> {
    tensors.into_iter().map(|(n, t)| Ok((n, t.f_to_device(device)?))).collect()
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

/// Reads and encodes the run's data as the trainer does, in the batch layout of the run's
/// objective, every row kept or reported.
pub fn read_data(cfg: &TrainConfig, registry: &Registry, tok: &Tokenizer, prep: Option<&ImagePrep>) -> Result<data::Prepared> {
    let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let layout = Layout::from_needs(&cfg.objective.plugin, &objective.needs())?;
    let rows = data::read_rows(registry, &cfg.data.plugin, &serde_json::Value::Object(cfg.data.config.clone()).to_string(), &cfg.data.path, &cfg.data.split)?;
    if layout == Layout::Sequences {
        return data::prepare_rows(rows, tok, prep, &encode_options(cfg));
    }
    Ok(layout::prepare(layout, rows, tok, prep, &encode_options(cfg))?.into_prepared())
}

/// Reads the run's data and encodes it in the objective's batch layout; with
/// `on_bad_sample: stop`, any unusable row stops the run before training, listing them all.
fn prepare_data(cfg: &TrainConfig, registry: &Registry, tok: &Tokenizer, prep: Option<&ImagePrep>, layout: Layout) -> Result<layout::PreparedItems> {
    let rows = data::read_rows(registry, &cfg.data.plugin, &serde_json::Value::Object(cfg.data.config.clone()).to_string(), &cfg.data.path, &cfg.data.split)?;
    let prepared = layout::prepare(layout, rows, tok, prep, &encode_options(cfg))?;
    if !prepared.bad.is_empty() {
        if cfg.data.on_bad_sample == config::OnBadSample::Stop {
            bail!(
                "{} of the {} rows of {} cannot be used as {} (data.on_bad_sample: stop; set it to skip to train without them; \
                 `ferrotune data check` reports every row):\n{}",
                prepared.bad.len(),
                prepared.rows,
                cfg.data.path.display(),
                layout.name(),
                prepared.bad_report(20)
            );
        }
        eprintln!("note: skipping {} unusable rows of {}:\n{}", prepared.bad.len(), cfg.data.path.display(), prepared.bad_report(20));
    }
    for (i, why) in &prepared.skipped {
        tracing::warn!("row {i}: {why}; skipped");
    }
    Ok(prepared)
}

/// Rank `rank`'s share of a global micro-batch: its `per_rank` samples in order (fewer, or
/// none, at the short end of an epoch).
///
/// The global batch of an optimizer step is `micro_batch_size × gradient_accumulation_steps ×
/// world_size` samples: global micro-batch k of the data order holds `micro_batch_size ×
/// world_size` samples and rank r takes samples `r·mbs .. (r+1)·mbs` of it. A run on N ranks
/// therefore trains on the same samples per step as one process with `micro_batch_size × N`
/// (and, when the data size divides, as one with `gradient_accumulation_steps × N`). A
/// sequence loss is divided by the label tokens of the whole global step and scaled by the
/// world size before its backward, so the averaged gradient is the one-process gradient.
pub fn rank_share(global: &[usize], rank: usize, per_rank: usize) -> &[usize] {
    let start = (rank * per_rank).min(global.len());
    &global[start..(start + per_rank).min(global.len())]
}

/// The loss of a step over all ranks: the sum of the ranks' shares for a sequence loss
/// (each is divided by the global token count), else the mean of the ranks' losses.
fn global_loss(comm: &dyn Collectives, local: f64, layout: Layout) -> Result<f64> {
    if comm.world_size() == 1 {
        return Ok(local);
    }
    let t = Tensor::from_slice(&[local]);
    let op = if layout == Layout::Sequences { ferrotune_plugin_api::ReduceOp::SUM } else { ferrotune_plugin_api::ReduceOp::AVG };
    comm.all_reduce(&t, op)?;
    Ok(t.f_double_value(&[0])?)
}

/// Bytes of optimizer state this rank holds, printed by launched runs (`WORLD_SIZE` set)
/// for the memory benchmark.
fn report_state_bytes(memory: &dyn MemoryStrategy) -> Option<usize> {
    std::env::var_os("WORLD_SIZE")?;
    let state = memory.state_dict().ok()?;
    Some(state.iter().filter(|(n, _)| n != "step").map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes()).sum())
}

/// ZeRO stage 3 gathers each layer's weight with a collective, so every rank must run the
/// same forwards: refuse what would let one rank run fewer (a rank left without samples at
/// the short end of an epoch, per-rank generation of different lengths).
fn check_shardable(layout: Layout, samples: usize, micro: usize, world: usize, plugin: &str) -> Result<()> {
    if layout == Layout::Prompts {
        bail!("memory `{plugin}` shards the frozen weights (stage 3), which generation objectives do not support yet (ranks generate different lengths); use stage 2");
    }
    let rem = samples % (micro * world);
    if rem != 0 && rem <= micro * (world - 1) {
        bail!(
            "memory `{plugin}` shards the frozen weights (stage 3), so every rank must run every micro-batch, but the last global micro-batch \
             of an epoch holds {rem} of {samples} samples and leaves rank {} without any; make the sample count a multiple of \
             training.micro_batch_size × ranks ({}) or drop that many rows",
            rem.div_ceil(micro),
            micro * world
        );
    }
    Ok(())
}

/// The linear layers ZeRO stage 3 shards: every decoder linear layer (q, k, v, o, gate, up,
/// down of each layer) and an untied `lm_head`; not a tied `lm_head` (the embedding, which
/// stays whole) or a vision tower.
fn shardable(model: &CausalLM, name: &str) -> bool {
    name.starts_with(&format!("{}.layers.", model.decoder_path())) || (name == "lm_head" && !model.lm_head_is_tied())
}

/// Shards the frozen weight of every [`shardable`] layer over the ranks of `group` (those
/// already sharded while loading are left as they are).
fn shard_frozen_weights(model: &mut CausalLM, group: std::sync::Arc<Group>, offload: bool) -> Result<()> {
    let group: std::sync::Arc<dyn Collectives + Send + Sync> = group;
    let names: Vec<String> = model.linears().into_iter().map(|(n, _)| n.to_string()).filter(|n| shardable(model, n)).collect();
    for lin in model.linears_mut().into_iter().filter(|l| names.contains(&l.name)) {
        lin.shard_weight(group.clone(), offload).with_context(|| format!("sharding `{}`", lin.name))?;
    }
    Ok(())
}

/// Bytes of frozen weights this rank holds: all of them, and those of the decoder's linear
/// layers (most of what ZeRO stage 3 shards).
fn frozen_resident_bytes(model: &CausalLM) -> (usize, usize) {
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let prefix = format!("{}.layers.", model.decoder_path());
    let linears: Vec<_> = model.linears().into_iter().filter(|(n, _)| shardable(model, n)).collect();
    let listed: usize = model.named_weights().iter().filter(|(_, t)| !t.requires_grad()).map(|(_, t)| bytes(t)).sum();
    let stand_ins: usize = linears.iter().map(|(_, l)| bytes(&l.weight) + l.bias.as_ref().map(bytes).unwrap_or(0)).sum();
    let resident: usize = linears.iter().map(|(_, l)| l.resident_bytes()).sum();
    let decoder: usize = linears.iter().filter(|(n, _)| n.starts_with(&prefix)).map(|(_, l)| l.resident_bytes()).sum();
    ((listed + resident).saturating_sub(stand_ins), decoder)
}

fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step as u64) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

/// Runs (or resumes) a training run.
pub fn train(cfg: &TrainConfig, registry: &Registry, resume: Option<Resume>) -> Result<TrainSummary> {
    let started = Instant::now();
    // A plain `cuda` means cuda:LOCAL_RANK in a launched run.
    let device = crate::device::resolve_for_rank(&cfg.device)?;
    // Several ranks (RANK/WORLD_SIZE set by `ferrotune launch` or torchrun): c10d group,
    // NCCL for a CUDA device, Gloo for CPU (FERROTUNE_DIST_BACKEND overrides).
    let group = std::sync::Arc::new(Group::from_env_for(device)?);
    let comm = group.as_dyn();
    let (rank, world) = (comm.rank(), comm.world_size());
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

    // ZeRO stage 3 over several ranks: each decoder linear layer is sharded as soon as it is
    // read, so a rank never holds the whole model (see `CausalLM::load_with`).
    let capabilities = registry.memory_capabilities(&cfg.memory.plugin, &cfg.memory.config_json())?;
    let shard_params = capabilities.iter().any(|c| c == SHARD_FROZEN_PARAMS) && world > 1;
    let offload_params = capabilities.iter().any(|c| c == OFFLOAD_PARAMS_CPU);
    let shard_group: std::sync::Arc<dyn Collectives + Send + Sync> = group.clone();
    // QLoRA: the adapter's targets are quantized as they are read, too (see
    // `quant::quantize_while_loading`); a quantized layer stays whole, the others are sharded.
    let method = registry.adapter(&cfg.adapter.plugin, &cfg.adapter.config_json())?;
    let mut model = crate::quant::load_for_adapter(&cfg.model, device, dtype, cfg.quantization.as_ref(), registry, &method, &mut |lin| {
        if shard_params {
            lin.shard_weight(shard_group.clone(), offload_params).with_context(|| format!("sharding `{}`", lin.name))?;
        }
        Ok(())
    })?;
    model.set_gradient_checkpointing(cfg.training.gradient_checkpointing);
    let tokenizer = Tokenizer::from_dir(&cfg.model)?;
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
    let trainable_bytes: usize = params.iter().map(|p| p.tensor.numel() * p.tensor.kind().elt_size_in_bytes()).sum();

    // The objective decides the batch layout (and whether the run needs reward plugins).
    let mut objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let needs = objective.needs();
    let layout = Layout::from_needs(&cfg.objective.plugin, &needs)?;
    let wants_rewards = needs.iter().any(|n| n == "rewards");
    if wants_rewards && cfg.rewards.is_empty() {
        bail!(
            "objective `{}` scores its completions with reward plugins, and the config names none: add e.g. \
             `rewards: [{{plugin: format, pattern: \"...\"}}]` (`ferrotune plugins` lists the reward plugins)",
            cfg.objective.plugin
        );
    }
    if !wants_rewards && !cfg.rewards.is_empty() {
        bail!("config key `rewards`: objective `{}` does not use reward plugins; remove the `rewards` list", cfg.objective.plugin);
    }
    if cfg.training.num_iterations > 1 && layout != Layout::Prompts {
        bail!("config key `training.num_iterations`: only objectives that generate (GRPO) reuse a generation batch; `{}` does not", cfg.objective.plugin);
    }
    let rewards = load_rewards(cfg, registry)?;

    let prepared = prepare_data(cfg, registry, &tokenizer, prep.as_ref(), layout)?;
    let (rows, truncated) = (prepared.rows, prepared.truncated());
    let mut skipped = prepared.skipped.len() + prepared.bad.len();
    let mut encoded = Vec::with_capacity(prepared.items.len());
    for (row, e) in prepared.items {
        if e.label_tokens() > 0 { encoded.push((row, e)) } else { skipped += 1 }
    }
    if truncated > 0 {
        eprintln!("note: {truncated} of {} samples were longer than cutoff_len {} and were truncated", encoded.len(), cfg.data.cutoff_len);
    }
    if skipped > 0 {
        eprintln!("note: {skipped} samples were skipped ({} with nothing to learn, {} unusable)", skipped - prepared.bad.len(), prepared.bad.len());
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
                "no training samples left in {}: none of its {} samples {} (each skip is logged above): \
                 check that the samples have non-empty assistant turns, or raise `data.cutoff_len` ({}) if they \
                 were truncated",
                cfg.data.path.display(),
                rows,
                if layout == Layout::Sequences { "has a label token".to_string() } else { format!("can be used as {}", layout.name()) },
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
    // Several ranks: global micro-batch k holds micro_batch_size × world samples and rank r
    // takes its r-th contiguous share, so a step sees the same samples as one process with
    // micro_batch_size × world (see `rank_share`).
    let data_order = DataOrder { n: train_set.len(), micro: t.micro_batch_size * world, seed: cfg.seed, shuffle: cfg.data.shuffle };
    let accum = t.gradient_accumulation_steps;
    // Generation objectives take `num_iterations` optimizer steps on each generation batch.
    let mu = t.num_iterations;
    let total_steps = t.max_steps.unwrap_or_else(|| (t.epochs * data_order.micro_per_epoch()).div_ceil(accum) * mu);
    // With epochs (no max_steps) the last step takes only the micro-batches the epochs have left.
    let micro_limit = if t.max_steps.is_some() { usize::MAX } else { t.epochs * data_order.micro_per_epoch() };
    let schedule = Schedule::new(&cfg.scheduler, cfg.optimizer.lr, total_steps);
    let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);

    let mut memory = registry.memory(&cfg.memory.plugin, &cfg.memory.config_json())?;
    memory.setup(params, &cfg.optimizer_json(), device, comm)?;
    if shard_params {
        check_shardable(layout, train_set.len(), t.micro_batch_size, world, &cfg.memory.plugin)?;
        // Layers whose base was rewritten or quantized after loading: shard what is whole.
        shard_frozen_weights(&mut model, group.clone(), offload_params)?;
    }

    let mut step = 0usize;
    if let Some(dir) = resume_dir {
        step = load_checkpoint(&dir, &mut model, &mut memory, comm)?;
        if rank == 0 {
            rewind_metrics(&cfg.output_dir.join(METRICS_FILE), step)?;
        }
        eprintln!("resumed from {} at step {step}", dir.display());
    }

    // Only rank 0 writes metrics, checkpoints' shared files and the adapter.
    let mut metrics = if rank == 0 {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.output_dir.join(METRICS_FILE))
                .with_context(|| format!("cannot open {}", cfg.output_dir.join(METRICS_FILE).display()))?,
        )
    } else {
        None
    };
    let bar = if rank == 0 { progress_bar(t.progress_bar, total_steps, step) } else { None };
    let loss_scale = if layout == Layout::Sequences { world as f64 } else { 1.0 };
    let (mut first_loss, mut last_loss, mut eval_loss) = (None, None, None);
    let mut last_eval_step = None;
    while step < total_steps {
        tch::manual_seed(step_seed(cfg.seed, step));
        let step_start = Instant::now();
        let (data_step, iteration) = (step / mu, step % mu);
        let micro: Vec<(usize, Vec<usize>)> =
            (0..accum).map(|j| data_step * accum + j).take_while(|&k| k < micro_limit).map(|k| data_order.micro_batch(k)).collect();
        // (epoch, sample indices) per micro-batch; the epoch is only informative here.
        let num_items: i64 = micro.iter().flat_map(|(_, idx)| idx.iter().map(|&i| train_set[i].1.label_tokens())).sum();
        let mut tokens = 0usize;
        let micro_count = micro.len();
        let micro: Vec<(usize, Vec<usize>)> =
            micro.into_iter().map(|(e, idx)| (e, rank_share(&idx, rank, t.micro_batch_size).to_vec())).filter(|(_, idx)| !idx.is_empty()).collect();
        let batches = micro.iter().enumerate().map(|(j, (_, idx))| {
            let items: Vec<&Item> = idx.iter().map(|&i| &train_set[i].1).collect();
            tokens += items.iter().map(|e| e.tokens()).sum::<usize>();
            let at = MicroPosition { num_items, gradient_accumulation_steps: micro_count, micro_index: j, iteration, num_iterations: mu };
            let ids = idx.iter().map(|&i| serde_json::json!(format!("row {}", train_set[i].0))).collect();
            let (tensors, extra) = layout::collate(layout, &items, pad_id, prep.as_ref())?;
            Ok(Batch { tensors: on_device(tensors, device)?, meta_json: micro_meta(layout, at, ids, extra) })
        });
        let lr = schedule.lr(step);
        let ctx = PolicyContext { model: &model, tokenizer: &tokenizer, train: true, rewards: &rewards, max_len: cfg.data.cutoff_len };
        let StepOutcome { loss: local_loss, metrics: extra, report, .. } =
            optimizer_step_with(&ctx, &mut objective, &mut memory, batches, lr, comm, loss_scale)?;
        let loss_sum = global_loss(comm, local_loss, layout)?;
        let extra = reduce_metrics(comm, extra)?;
        step += 1;
        first_loss.get_or_insert(loss_sum);
        last_loss = Some(loss_sum);
        let mut line = serde_json::json!({
            "step": step,
            "epoch": ((data_step + 1) * accum) as f64 / data_order.micro_per_epoch() as f64,
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
                let (l, eval_metrics) = evaluate(&ctx_eval(&model, &tokenizer, &rewards, cfg), &mut objective, layout, &eval_set, t.micro_batch_size, pad_id, prep.as_ref(), device)?;
                line["eval_loss"] = serde_json::json!(l);
                for (k, v) in eval_metrics {
                    line[format!("eval/{k}")] = serde_json::json!(v);
                }
                eval_loss = Some(l);
                last_eval_step = Some(step);
            }
        }
        if let Some(metrics) = metrics.as_mut().filter(|_| step % t.logging_steps == 0 || step == total_steps) {
            write_metrics_line(metrics, &line)?;
            println!("{line}");
        }
        if let Some(b) = &bar {
            b.set_message(format!("loss {loss_sum:.4} lr {lr:.2e}"));
            b.inc(1);
        }
        if t.save_steps.is_some_and(|every| step % every == 0) && step < total_steps {
            save_checkpoint(&cfg.output_dir, step, &model, &trainable_vision, &memory, t.save_total_limit, comm)?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    if !eval_set.is_empty() && last_eval_step != Some(step) {
        let (l, eval_metrics) = evaluate(&ctx_eval(&model, &tokenizer, &rewards, cfg), &mut objective, layout, &eval_set, t.micro_batch_size, pad_id, prep.as_ref(), device)?;
        let mut line = serde_json::json!({"step": step, "eval_loss": l});
        for (k, v) in eval_metrics {
            line[format!("eval/{k}")] = serde_json::json!(v);
        }
        if let Some(metrics) = metrics.as_mut() {
            write_metrics_line(metrics, &line)?;
            println!("{line}");
        }
        eval_loss = Some(l);
    }
    if let Some(b) = report_state_bytes(&memory) {
        eprintln!("rank {rank} of {world}: optimizer state {b} bytes");
        let (frozen, decoder) = frozen_resident_bytes(&model);
        let report = serde_json::json!({
            "optimizer_state": b,
            "trainable": trainable_bytes,
            "frozen": frozen,
            "frozen_decoder_linears": decoder,
            "peak_rss": crate::bench::proc_status_kib("VmHWM").map(|k| k * 1024),
        });
        eprintln!("rank {rank} of {world}: memory {report}");
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
    if rank != 0 {
        comm.barrier()?;
        return Ok(summary);
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
    std::fs::write(cfg.output_dir.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)?;
    comm.barrier()?;
    Ok(summary)
}

fn ctx_eval<'a>(model: &'a CausalLM, tokenizer: &'a Tokenizer, rewards: &'a [LoadedReward], cfg: &TrainConfig) -> PolicyContext<'a> {
    PolicyContext { model, tokenizer, train: false, rewards, max_len: cfg.data.cutoff_len }
}

/// The eval loss (no graph, dropout off) and the mean of the objective's metrics over the
/// eval set. Sequences: the token-weighted mean loss; other layouts: the row-weighted mean of
/// the micro-batch losses.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    ctx: &PolicyContext<'_>,
    objective: &mut dyn Objective,
    layout: Layout,
    eval_set: &[(usize, Item)],
    micro: usize,
    pad_id: i64,
    prep: Option<&ImagePrep>,
    device: tch::Device,
) -> Result<(f64, Vec<(String, f64)>)> {
    let total: i64 = eval_set.iter().map(|(_, e)| e.label_tokens()).sum();
    let mut sum = 0f64;
    let mut metric_sums: Vec<(String, f64, f64)> = Vec::new();
    for (j, chunk) in eval_set.chunks(micro).enumerate() {
        let items: Vec<&Item> = chunk.iter().map(|(_, e)| e).collect();
        let (tensors, extra) = layout::collate(layout, &items, pad_id, prep)?;
        let at = MicroPosition { num_items: total, gradient_accumulation_steps: 1, micro_index: j, iteration: 0, num_iterations: 1 };
        let ids = chunk.iter().map(|(row, _)| serde_json::json!(format!("row {row}"))).collect();
        let batch = Batch { tensors: on_device(tensors, device)?, meta_json: micro_meta(layout, at, ids, extra) };
        let out = tch::no_grad(|| objective.loss(&batch, ctx))?;
        let value = out.loss.f_double_value(&[])?;
        let weight = chunk.len() as f64;
        sum += if layout == Layout::Sequences { value } else { value * weight / eval_set.len() as f64 };
        for (k, v) in out.metrics.into_iter().filter(|(k, v)| k != "loss" && v.is_finite()) {
            match metric_sums.iter_mut().find(|(n, _, _)| *n == k) {
                Some(m) => {
                    m.1 += v * weight;
                    m.2 += weight;
                }
                None => metric_sums.push((k, v * weight, weight)),
            }
        }
    }
    Ok((sum, metric_sums.into_iter().map(|(k, s, w)| (k, s / w)).collect()))
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

/// The optimizer-state file of `rank`: one file for a one-process run, one per rank
/// (`optimizer-rank{r}.safetensors`) for a sharded one.
fn optimizer_file(rank: usize, world: usize) -> String {
    if world == 1 {
        OPTIMIZER_FILE.to_string()
    } else {
        format!("optimizer-rank{rank}.safetensors")
    }
}

/// Writes `checkpoint-{step}` atomically: everything goes to a temporary folder that is
/// renamed into place only when complete, so a killed run never leaves a half checkpoint.
/// With several ranks each writes its optimizer shard into rank 0's temporary folder (a
/// folder all ranks see: the same machine or a shared file system) between barriers, and
/// rank 0 writes the adapter and renames the folder.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    out: &Path,
    step: usize,
    model: &CausalLM,
    full_weights: &[ferrotune_plugin_api::TrainParam],
    memory: &dyn MemoryStrategy,
    keep: Option<usize>,
    comm: &dyn Collectives,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let final_dir = out.join(format!("checkpoint-{step}"));
    let tmp = out.join(format!(".checkpoint-{step}.tmp"));
    if rank == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
    }
    comm.barrier()?;
    let state = memory.state_dict()?;
    let refs: Vec<(&str, &Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, tmp.join(optimizer_file(rank, world)))
        .with_context(|| format!("rank {rank}: cannot write its optimizer state into {}", tmp.display()))?;
    comm.barrier()?;
    if rank != 0 {
        return Ok(comm.barrier()?);
    }
    model.save_peft_adapter(&tmp.join("adapter"))?;
    non_lora::save(&tmp.join("adapter"), full_weights)?;
    std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&serde_json::json!({ "step": step, "world_size": world }))?)?;
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
    comm.barrier()?;
    Ok(())
}

fn load_checkpoint(dir: &Path, model: &mut CausalLM, memory: &mut dyn MemoryStrategy, comm: &dyn Collectives) -> Result<usize> {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(STATE_FILE)).with_context(|| format!("{} has no {STATE_FILE}", dir.display()))?,
    )?;
    let step = state["step"].as_u64().with_context(|| format!("{}/{STATE_FILE}: no `step`", dir.display()))? as usize;
    let adapter = Tensor::read_safetensors(dir.join("adapter/adapter_model.safetensors"))
        .with_context(|| format!("cannot read the adapter of {}", dir.display()))?;
    model.load_adapter_state_dict(adapter)?;
    non_lora::load_into(model, &dir.join("adapter"))?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let saved_world = state["world_size"].as_u64().unwrap_or(1) as usize;
    if saved_world != world {
        bail!(
            "{} was saved by a run on {saved_world} rank(s) and this run has {world}: a sharded checkpoint resumes with the same world size",
            dir.display()
        );
    }
    let file = optimizer_file(rank, world);
    let opt = Tensor::read_safetensors(dir.join(&file)).with_context(|| format!("cannot read {}/{file}", dir.display()))?;
    memory.load_state_dict(opt)?;
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_combine_by_mean_min_or_max_over_micro_batches() {
        assert_eq!(MetricOp::of("completions/min_length"), MetricOp::Min);
        assert_eq!(MetricOp::of("clip_ratio/region_max"), MetricOp::Max);
        assert_eq!(MetricOp::of("rewards/margins"), MetricOp::Mean);
        assert_eq!(MetricOp::of("rewards/maximal_thing_mean"), MetricOp::Max, "a name starting with max is a maximum");
        let m = |v: &[(&str, f64)]| v.iter().map(|(k, x)| (k.to_string(), *x)).collect::<Vec<_>>();
        let got = combine_metrics(&[
            m(&[("a", 1.0), ("completions/min_length", 4.0), ("completions/max_length", 9.0)]),
            m(&[("a", 3.0), ("completions/min_length", 2.0), ("completions/max_length", 7.0), ("b", 5.0)]),
        ]);
        assert_eq!(got, m(&[("a", 2.0), ("completions/min_length", 2.0), ("completions/max_length", 9.0), ("b", 5.0)]));
        assert_eq!(reduce_metrics(&crate::collectives::SingleProcess, got.clone()).unwrap(), got);
    }

    #[test]
    fn stage3_refuses_what_would_leave_a_rank_without_forwards() {
        // 2 per rank on 2 ranks: 16 samples split evenly; 14 end with 2 (rank 1 gets none);
        // 15 end with 3 (rank 1 gets one: the same number of forwards).
        assert!(check_shardable(Layout::Sequences, 16, 2, 2, "zero").is_ok());
        let e = check_shardable(Layout::Sequences, 14, 2, 2, "zero").unwrap_err().to_string();
        assert!(e.contains("leaves rank 1 without any") && e.contains("micro_batch_size"), "{e}");
        assert!(check_shardable(Layout::Sequences, 15, 2, 2, "zero").is_ok());
        let e = check_shardable(Layout::Sequences, 13, 2, 4, "zero").unwrap_err().to_string();
        assert!(e.contains("rank 3"), "{e}");
        let e = check_shardable(Layout::Prompts, 16, 2, 2, "zero").unwrap_err().to_string();
        assert!(e.contains("generation"), "{e}");
    }

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

    /// Two ranks' shares of each global micro-batch are disjoint and cover it in order: the
    /// samples a one-process run with micro_batch_size × 2 sees.
    #[test]
    fn rank_shares_partition_the_global_micro_batch() {
        let global = [7, 3, 9, 1, 4];
        assert_eq!(rank_share(&global, 0, 3), [7, 3, 9]);
        assert_eq!(rank_share(&global, 1, 3), [1, 4]);
        assert!(rank_share(&global, 2, 3).is_empty());
        let o = DataOrder { n: 11, micro: 4, seed: 3, shuffle: true };
        for k in 0..6 {
            let (_, idx) = o.micro_batch(k);
            assert_eq!([rank_share(&idx, 0, 2), rank_share(&idx, 1, 2)].concat(), idx);
        }
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
