//! A training run as a recipe, the shape torchtune's recipes have: [`Run::setup`] wires what
//! the config names (model and adapter, data, objective, memory plugin, resume), [`Run::step`]
//! takes one optimizer step, [`Run::evaluate`] computes the eval loss,
//! [`Run::save_checkpoint`] writes a checkpoint and [`Run::finish`] the adapter directory.
//! `train()` drives it with logging and checkpoints; `bench train` drives the same
//! [`Run::step`] on synthetic rows, so a benchmark measures the real path.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferrotune_plugin_api::kinds::memory::{
    MemoryStrategyHandle, OFFLOAD_OPTIMIZER_CPU, OFFLOAD_PARAMS_CPU, SHARD_FROZEN_PARAMS,
    SHARD_TRAINABLE_PARAMS,
};

use ferrotune_plugin_api::kinds::objective::ObjectiveHandle;
use ferrotune_plugin_api::{
    Batch, Collectives, MemoryStrategy, Objective, StepReport, TrainParam, NEED_NUM_ITERATIONS,
    NEED_SCORE_HEAD, NEED_VALUE_HEAD,
};
use tch::{Device, Tensor};

use super::checkpoint::{self, Provenance, STATE_FILE};
use super::config::{Finetuning, TrainConfig};
use super::context::{load_rewards, BatchContext, LoadedReward, PolicyContext};
use super::data::{
    data_fingerprint, image_prep, megabatch_size, prepare_data, rank_share, DataOrder, RunData,
};
use super::schedule::Schedule;
use super::step::{
    global_loss, micro_meta, on_device, optimizer_step_with, reduce_metrics, MicroPosition,
    StepTiming,
};
use super::trainable::full_weight_parameters;
use super::vision::vision_parameters;
use super::{Resume, TrainSummary};
use crate::data::layout::{Item, Layout};
use crate::data::ImagePrep;
use crate::dist::collectives::Group;
use crate::peft::non_lora;
use crate::peft::quant::{self, QuantizationRecord};
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::text::Tokenizer;

/// A run between its setup and its end: the model with its adapter, the data, the objective
/// and memory plugins, and how far it has come.
pub struct Run<'c> {
    pub cfg: &'c TrainConfig,
    group: Arc<Group>,
    pub device: Device,
    pub model: PeftModel,
    pub tokenizer: Tokenizer,
    objective: ObjectiveHandle,
    memory: MemoryStrategyHandle,
    rewards: Vec<LoadedReward>,
    /// Full / freeze runs of an objective that needs a reference: the frozen base.
    reference: Option<PeftModel>,
    pub layout: Layout,
    prep: Option<ImagePrep>,
    pub data: RunData,
    order: DataOrder,
    schedule: Schedule,
    pad_id: i64,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// With epochs (no max_steps): the global micro-batches the epochs hold.
    micro_limit: usize,
    /// Each micro-batch loss is multiplied by this before its backward (see `optimizer_step_with`).
    loss_scale: f64,
    /// The model's own weights this run trains: a vision model's trained beside the adapter,
    /// or every trained weight with `finetuning: full | freeze` (this rank's shards of the
    /// partitioned ones under ZeRO stage 3).
    full_weights: Vec<TrainParam>,
    /// Names of `full_weights` that are this rank's shard of a partitioned weight.
    partitioned: Vec<String>,
    /// Bytes of reduced gradients the memory plugin held at its last step (its
    /// `gradient_bytes` metric, if it reports one), for the memory report.
    gradient_bytes: Option<f64>,
    /// The quantized base (QLoRA), if any.
    pub quantized: Option<QuantizationRecord>,
    /// Trainable values, and their bytes.
    pub trainable_parameters: i64,
    trainable_bytes: usize,
    /// Optimizer steps taken (after a resume: counted from the run's start).
    pub step: usize,
    /// What the run is (training config keys, data fingerprint), recorded in its checkpoints;
    /// none for `bench train`'s rows.
    provenance: Option<Provenance>,
    /// Optimizer steps taken on each generation batch (`training.num_iterations`, or what the
    /// objective asks for).
    num_iterations: usize,
    started: Instant,
}

/// Metrics by name.
pub type Metrics = Vec<(String, f64)>;

/// What one [`Run::step`] did.
pub struct StepResult {
    /// The step just taken (1 for the first).
    pub step: usize,
    pub epoch: f64,
    /// The step's loss over all ranks.
    pub loss: f64,
    pub lr: f64,
    /// The objective's metrics over micro-batches and ranks.
    pub metrics: Vec<(String, f64)>,
    pub report: StepReport,
    pub timing: StepTiming,
    /// Tokens this rank's forward passes saw.
    pub tokens: usize,
    pub seconds: f64,
}

impl StepResult {
    /// The step's line of `metrics.jsonl`.
    pub fn json(&self) -> serde_json::Value {
        let mut line = serde_json::json!({
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.report.grad_norm,
            "skipped": self.report.skipped,
            "tokens_per_s": self.tokens as f64 / self.seconds.max(1e-9),
        });
        for (k, v) in self.metrics.iter().filter(|(k, _)| k != "loss") {
            line[format!("train/{k}")] = serde_json::json!(v);
        }
        line
    }
}

/// The losses a driver saw, for the run's summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct Losses {
    /// The first and last finite step losses.
    pub first: Option<f64>,
    pub last: Option<f64>,
    pub eval: Option<f64>,
    /// Steps skipped because their loss or gradient norm was not finite.
    pub nonfinite_steps: usize,
}

/// The model a run trains: loaded (quantized, sharded) and with its adapter attached.
struct LoadedModel {
    model: PeftModel,
    quantized: Option<QuantizationRecord>,
    shard_params: bool,
    offload_params: bool,
    /// The memory plugin's capabilities.
    capabilities: Vec<String>,
}

impl<'c> Run<'c> {
    /// Sets up (or resumes) the run `cfg` describes, reading its data through the dataset
    /// plugin. A resumed run's checkpoint must record this run's config and data
    /// ([`checkpoint::check_resume`]). Nothing is written: the driver creates the output
    /// directory once this succeeded.
    pub fn setup(
        cfg: &'c TrainConfig,
        registry: &Registry,
        resume: Option<Resume>,
    ) -> Result<Self> {
        Self::build(cfg, registry, resume, None)
    }

    /// Sets up a run on rows already encoded (`bench train`'s synthetic ones) instead of the
    /// config's data set; nothing is written.
    pub fn setup_on_items(
        cfg: &'c TrainConfig,
        registry: &Registry,
        items: Vec<(usize, Item)>,
    ) -> Result<Self> {
        Self::build(cfg, registry, None, Some(items))
    }

    fn build(
        cfg: &'c TrainConfig,
        registry: &Registry,
        resume: Option<Resume>,
        items: Option<Vec<(usize, Item)>>,
    ) -> Result<Self> {
        let started = Instant::now();
        // A plain `cuda` means cuda:LOCAL_RANK in a launched run.
        let device = crate::dist::resolve_for_rank(&cfg.device)?;
        // Several ranks (RANK/WORLD_SIZE set by `ferrotune launch` or torchrun): c10d group,
        // NCCL for a CUDA device, Gloo for CPU (FERROTUNE_DIST_BACKEND overrides).
        let group = Arc::new(Group::from_env_for(device)?);
        let world = group.as_dyn().world_size();
        // Where to resume from is settled first, so that a missing checkpoint fails before any work.
        let resume_dir = resume_dir(cfg, resume)?;
        let from_config = items.is_none();
        tch::manual_seed(cfg.seed as i64);
        let (objective, layout, rewards, num_iterations) = objective_and_rewards(cfg, registry)?;
        let heads = Heads::of(&objective.needs());
        let LoadedModel { mut model, quantized, shard_params, offload_params, capabilities } =
            load_model(cfg, registry, device, &group, heads)?;
        let tokenizer = Tokenizer::from_dir(&cfg.model)?;
        let (mut params, mut full_weights) = parameters(&model, cfg)?;
        if let (Some(v), Finetuning::Adapter) = (model.value_head(), cfg.finetuning()) {
            // PPO's value head trains in full beside the adapter and is kept with the weights
            // trained in full (saved beside the adapter, restored on resume).
            let p = super::trainable::train_param(VALUE_HEAD_KEY, v, None, cfg.optimizer.lr);
            full_weights.push(copy_param(&p));
            params.push(p);
        }
        // ZeRO stage 3 with the model's own weights training: each rank keeps its shard of
        // every large trained weight, which the memory plugin then steps (see
        // `partition_full_weights`).
        let partitioned = if shard_params && cfg.finetuning() != Finetuning::Adapter {
            partition_full_weights(
                &mut model,
                &mut params,
                &mut full_weights,
                group.clone(),
                offload_params,
                &capabilities,
                &cfg.memory.plugin,
            )?
        } else {
            Vec::new()
        };
        // What this rank holds (its shards of partitioned weights).
        let trainable_bytes: usize =
            params.iter().map(|p| p.tensor.numel() * p.tensor.kind().elt_size_in_bytes()).sum();
        let trainable_parameters: i64 = params.iter().map(|p| p.tensor.numel() as i64).sum();

        // Data: canonical samples → token ids and labels (and images, for a vision model).
        let prep = image_prep(cfg, &tokenizer)?;

        // An objective that compares with a reference (DPO, KTO, GRPO's KL) gets the base with
        // its adapter disabled; when the base itself trains, a frozen copy of it, as
        // LLaMA-Factory's `ref_model` (stage 3 shards its decoder weights too).
        let reference = if cfg.finetuning() != Finetuning::Adapter
            && objective.needs().iter().any(|n| n == "reference")
        {
            let base = crate::model::CausalLM::load(&cfg.model, device, model.dtype())
                .context("loading the frozen reference model")?;
            let mut reference = PeftModel::new(base);
            if shard_params {
                shard_frozen_weights(&mut reference, group.clone(), offload_params)?;
            }
            Some(reference)
        } else {
            None
        };
        let mut data = match items {
            Some(items) => RunData::given(items),
            None => RunData::split(
                cfg,
                prepare_data(cfg, registry, &tokenizer, prep.as_ref(), layout)?,
                layout,
            )?,
        };
        let provenance = if from_config {
            let mut record = cfg.training_record();
            record.extend(data_fingerprint(
                &crate::data::registry::fingerprint_paths(&cfg.data)?,
                &data,
            )?);
            Some(Provenance(record))
        } else {
            None
        };
        if let (Some(dir), Some(p)) = (&resume_dir, &provenance) {
            checkpoint::check_resume(dir, p)?;
        }
        if let Some(stats) = data.pack(cfg)? {
            if group.as_dyn().rank() == 0 {
                eprintln!("packing: {}", stats.describe());
            }
        }

        let t = &cfg.training;
        // Several ranks: global micro-batch k holds micro_batch_size × world samples and rank r
        // takes its r-th contiguous share, so a step sees the same samples as one process with
        // micro_batch_size × world (see `rank_share`).
        let order = DataOrder {
            n: data.train.len(),
            micro: t.micro_batch_size * world,
            seed: cfg.seed,
            shuffle: cfg.data.shuffle,
            by_length: cfg.data.group_by_length.then(|| {
                let batch = t.micro_batch_size * world * t.gradient_accumulation_steps;
                let lengths: Vec<usize> = data.train.iter().map(|(_, i)| i.tokens()).collect();
                (lengths, megabatch_size(data.train.len(), batch))
            }),
        };
        let (accum, mu) = (t.gradient_accumulation_steps, num_iterations);
        // Generation objectives take `num_iterations` optimizer steps on each generation batch.
        let total_steps = t
            .max_steps
            .unwrap_or_else(|| (t.epochs * order.micro_per_epoch()).div_ceil(accum) * mu);
        // With epochs (no max_steps) the last step takes only the micro-batches the epochs have left.
        let micro_limit =
            if t.max_steps.is_some() { usize::MAX } else { t.epochs * order.micro_per_epoch() };
        let schedule = Schedule::new(&cfg.scheduler, cfg.optimizer.lr, total_steps);
        let pad_id = tokenizer.pad_token_id().or(tokenizer.eos_token_id()).unwrap_or(0);

        let mut memory = registry.memory(&cfg.memory.plugin, &cfg.memory.config_json())?;
        let mut optimizer_json: serde_json::Value = serde_json::from_str(&cfg.optimizer_json())?;
        if !partitioned.is_empty() {
            // Only plugins that report `shard_trainable_params` are given this key.
            optimizer_json["partitioned"] = serde_json::json!(partitioned);
        }
        memory.setup(params, &optimizer_json.to_string(), device, group.as_dyn())?;
        if shard_params {
            check_shardable(
                layout,
                data.train.len(),
                t.micro_batch_size,
                world,
                &cfg.memory.plugin,
            )?;
            // Layers whose base was rewritten or quantized after loading: shard what is whole.
            shard_frozen_weights(&mut model, group.clone(), offload_params)?;
        }
        let mut run = Self {
            cfg,
            group,
            device,
            model,
            tokenizer,
            objective,
            memory,
            rewards,
            reference,
            layout,
            prep,
            data,
            order,
            schedule,
            pad_id,
            total_steps,
            micro_limit,
            loss_scale: if layout == Layout::Sequences { world as f64 } else { 1.0 },
            full_weights,
            partitioned,
            gradient_bytes: None,
            quantized,
            trainable_parameters,
            trainable_bytes,
            step: 0,
            provenance,
            num_iterations,
            started,
        };
        if let Some(dir) = resume_dir {
            run.step = checkpoint::load_checkpoint(
                &dir,
                &mut run.model,
                &run.full_weights,
                !run.partitioned.is_empty(),
                &mut run.memory,
                run.group.as_dyn(),
            )?;
            eprintln!("resumed from {} at step {}", dir.display(), run.step);
        }
        // Loading peaks once (a whole model before ZeRO-3 partitions it, checkpoint tensors
        // read while resuming): give that memory back before training starts. A run that
        // offloads to host memory makes it the scarce resource: from now on freed pages go
        // back within a second (on the 0.5B full fine-tuning benchmark: peak RSS −9 %, step
        // time about 1.6× on CPU, where every step's buffers are then faulted in afresh).
        if capabilities.iter().any(|c| c == OFFLOAD_OPTIMIZER_CPU || c == OFFLOAD_PARAMS_CPU) {
            crate::util::alloc::return_freed_memory();
        } else {
            crate::util::alloc::release_free_memory();
        }
        Ok(run)
    }

    /// This process's rank, and the number of ranks.
    pub fn rank(&self) -> usize {
        self.group.as_dyn().rank()
    }

    pub fn world_size(&self) -> usize {
        self.group.as_dyn().world_size()
    }

    /// Whether every step of the run has been taken.
    pub fn done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// Takes the next optimizer step: builds this rank's share of each micro-batch (lazily,
    /// one at a time), runs the objective and backward through the shared inner loop, steps the
    /// optimizer, and combines the loss and metrics over the ranks.
    pub fn step(&mut self) -> Result<StepResult> {
        let t = &self.cfg.training;
        tch::manual_seed(step_seed(self.cfg.seed, self.step));
        let started = Instant::now();
        let (accum, mu) = (t.gradient_accumulation_steps, self.num_iterations);
        let (data_step, iteration) = (self.step / mu, self.step % mu);
        // (epoch, sample indices) per micro-batch; the epoch is only informative here.
        let micro: Vec<(usize, Vec<usize>)> = (0..accum)
            .map(|j| data_step * accum + j)
            .take_while(|&k| k < self.micro_limit)
            .map(|k| self.order.micro_batch(k))
            .collect();
        let train = &self.data.train;
        let num_items: i64 =
            micro.iter().flat_map(|(_, idx)| idx.iter().map(|&i| train[i].1.label_tokens())).sum();
        let micro_count = micro.len();
        let rank = self.rank();
        let micro: Vec<Vec<usize>> = micro
            .into_iter()
            .map(|(_, idx)| rank_share(&idx, rank, t.micro_batch_size).to_vec())
            .filter(|idx| !idx.is_empty())
            .collect();
        let mut tokens = 0usize;
        let (layout, pad_id, prep, device) =
            (self.layout, self.pad_id, self.prep.as_ref(), self.device);
        let eos_id = self.tokenizer.eos_token_id();
        let batches = micro.iter().enumerate().map(|(j, idx)| {
            let items: Vec<&Item> = idx.iter().map(|&i| &train[i].1).collect();
            tokens += items.iter().map(|e| e.tokens()).sum::<usize>();
            let at = MicroPosition {
                num_items,
                gradient_accumulation_steps: micro_count,
                micro_index: j,
                iteration,
                num_iterations: mu,
                eos_token_id: eos_id,
            };
            let ids = idx.iter().map(|&i| item_id(train[i].0, &train[i].1)).collect();
            let (tensors, extra) = crate::data::collate(layout, &items, pad_id, prep)?;
            Ok(Batch {
                tensors: on_device(tensors, device)?,
                meta_json: micro_meta(layout, at, ids, extra),
            })
        });
        let lr = self.schedule.lr(self.step);
        let comm = self.group.as_dyn();
        let ctx = PolicyContext {
            model: &self.model,
            tokenizer: &self.tokenizer,
            train: true,
            rewards: &self.rewards,
            max_len: self.cfg.data.cutoff_len,
            reference: self.reference.as_ref(),
        };
        let out = optimizer_step_with(
            &ctx,
            &mut self.objective,
            &mut self.memory,
            batches,
            lr,
            comm,
            self.loss_scale,
        )?;
        if let Some((_, b)) = out.report.metrics.iter().find(|(k, _)| k == "gradient_bytes") {
            self.gradient_bytes = Some(*b);
        }
        let loss = global_loss(comm, out.loss, layout)?;
        let metrics = reduce_metrics(comm, out.metrics)?;
        self.step += 1;
        Ok(StepResult {
            step: self.step,
            epoch: ((data_step + 1) * accum) as f64 / self.order.micro_per_epoch() as f64,
            loss,
            lr,
            metrics,
            report: out.report,
            timing: out.timing,
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The eval loss and the objective's metrics over the eval set (no graph, dropout off);
    /// `None` without an eval set.
    pub fn evaluate(&mut self) -> Result<Option<(f64, Metrics)>> {
        if self.data.eval.is_empty() {
            return Ok(None);
        }
        self.evaluate_rows(false).map(Some)
    }

    /// The eval loss and the objective's metrics over every row of the run's data set, its
    /// training rows included, through the same eval step as [`Self::evaluate`] (`ferrotune
    /// eval`: a held-out split read as the run's data).
    pub fn evaluate_all(&mut self) -> Result<(f64, Metrics)> {
        if self.data.train.is_empty() && self.data.eval.is_empty() {
            bail!(
                "no usable rows in {} to evaluate on",
                crate::data::registry::describe(&self.cfg.data)
            );
        }
        self.evaluate_rows(true)
    }

    /// The eval step over the eval set, or with `all` over the training rows too.
    fn evaluate_rows(&mut self, all: bool) -> Result<(f64, Metrics)> {
        let every: Vec<(usize, Item)>;
        let rows: &[(usize, Item)] = if all {
            every = self.data.train.iter().chain(self.data.eval.iter()).cloned().collect();
            &every
        } else {
            &self.data.eval
        };
        let ctx = PolicyContext {
            model: &self.model,
            tokenizer: &self.tokenizer,
            train: false,
            rewards: &self.rewards,
            max_len: self.cfg.data.cutoff_len,
            reference: self.reference.as_ref(),
        };
        evaluate(
            &ctx,
            &mut self.objective,
            self.layout,
            rows,
            self.cfg.training.micro_batch_size,
            self.pad_id,
            self.prep.as_ref(),
            self.device,
        )
    }

    /// The model as objectives see it outside a training step (dropout off), with `rewards` as
    /// the reward plugins (`ferrotune eval --generate`).
    pub fn policy<'s>(&'s self, rewards: &'s [LoadedReward]) -> PolicyContext<'s> {
        PolicyContext {
            model: &self.model,
            tokenizer: &self.tokenizer,
            train: false,
            rewards,
            max_len: self.cfg.data.cutoff_len,
            reference: self.reference.as_ref(),
        }
    }

    /// The run's image settings (a vision-language model) and pad id, to build batches as the
    /// trainer does.
    pub fn image_prep(&self) -> Option<&ImagePrep> {
        self.prep.as_ref()
    }
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }
    pub fn device(&self) -> tch::Device {
        self.device
    }
    /// Usable rows of the run's data set (training and eval shares).
    pub fn data_rows(&self) -> usize {
        self.data.train.len() + self.data.eval.len()
    }

    /// Writes `checkpoint-{step}` (every rank takes part); refused if a trained value is not
    /// finite.
    pub fn save_checkpoint(&self) -> Result<()> {
        self.check_finite()?;
        let t = &self.cfg.training;
        let comm = self.group.as_dyn();
        let saved = checkpoint::save_checkpoint(
            &self.cfg.output_dir,
            self.step,
            &self.model,
            &self.full_weights,
            !self.partitioned.is_empty(),
            &self.memory,
            t.save_total_limit,
            self.provenance.as_ref(),
            comm,
        );
        // The write's buffers are a one-off peak: give them back.
        crate::util::alloc::release_free_memory();
        saved
    }

    /// Every trained value (adapter, full vision weights) is finite; else the error names the
    /// tensor and the step, so that nothing non-finite is saved.
    pub fn check_finite(&self) -> Result<()> {
        let adapter = match self.model.active_adapter() {
            Some(_) => self.model.trainable_parameters()?,
            None => Vec::new(),
        };
        for p in adapter.iter().chain(&self.full_weights) {
            if let Some(counts) = crate::util::safetensors::non_finite_counts(&p.tensor)? {
                bail!(
                    "after step {}: trained tensor `{}` holds {}; nothing was saved \
                     (lower optimizer.lr, set optimizer.max_grad_norm, check the model's weights)",
                    self.step,
                    p.name,
                    crate::util::safetensors::describe_non_finite(counts, p.tensor.numel())
                );
            }
        }
        Ok(())
    }

    /// Ends the run: rank 0 writes the PEFT adapter directory (with the full weights trained
    /// beside it and the quantization record), the loss curve and `train_summary.json` into
    /// the output directory. The driver must have closed `metrics.jsonl`.
    pub fn finish(self, losses: Losses) -> Result<TrainSummary> {
        let (rank, world) = (self.rank(), self.world_size());
        if let Some(b) = report_state_bytes(&self.memory) {
            eprintln!("rank {rank} of {world}: optimizer state {b} bytes");
            let (frozen, decoder) = frozen_resident_bytes(&self.model);
            let report = serde_json::json!({
                "optimizer_state": b,
                "trainable": self.trainable_bytes,
                "frozen": frozen,
                "frozen_decoder_linears": decoder,
                "params": self.model.resident_weight_bytes(),
                "gradients": self.gradient_bytes,
                "peak_rss": crate::util::procfs::proc_status_kib("VmHWM").map(|k| k * 1024),
            });
            eprintln!("rank {rank} of {world}: memory {report}");
        }
        let out = &self.cfg.output_dir;
        let summary = TrainSummary {
            steps: self.step,
            train_samples: self.data.train_samples(),
            eval_samples: self.data.eval.len(),
            truncated_samples: self.data.truncated,
            skipped_samples: self.data.skipped,
            first_loss: losses.first,
            last_loss: losses.last,
            eval_loss: losses.eval,
            nonfinite_steps: losses.nonfinite_steps,
            trainable_parameters: self.trainable_parameters,
            seconds: self.started.elapsed().as_secs_f64(),
            output_dir: out.clone(),
        };
        // Every rank holds the same trained values (or its shards of them): each refuses
        // alike, none waits for another.
        self.check_finite()?;
        let comm = self.group.as_dyn();
        let full = self.cfg.finetuning() != Finetuning::Adapter;
        // Partitioned weights are gathered by every rank (a collective) for rank 0 to write.
        let gathered = if full && !self.partitioned.is_empty() {
            // One weight at a time; only rank 0 keeps them (DeepSpeed's
            // `stage3_gather_16bit_weights_on_model_save`).
            let mut all = Vec::new();
            self.model.visit_gathered_weights(&mut |key, t| {
                if rank == 0 {
                    all.push((key.to_string(), t));
                }
                Ok(())
            })?;
            Some(all)
        } else {
            None
        };
        if rank != 0 {
            comm.barrier()?;
            return Ok(summary);
        }
        if full {
            self.save_model_dir(out, gathered)?;
        } else {
            self.model.save_peft_adapter(out)?;
            non_lora::save(out, &self.full_weights)?;
        }
        if let Some(record) = &self.quantized {
            quant::write_record(out, record)?;
        }
        let metrics_file = out.join(checkpoint::METRICS_FILE);
        if let Err(e) = super::plot::write_loss_curve(&metrics_file, &out.join("loss.png")) {
            tracing::warn!("no loss curve: {e:#}");
        }
        std::fs::write(out.join("train_summary.json"), serde_json::to_string_pretty(&summary)?)?;
        comm.barrier()?;
        Ok(summary)
    }
}

impl Run<'_> {
    /// Writes the trained model as a Hugging Face directory into `out` (full and freeze
    /// fine-tuning): `weights` gathered from the ranks' shards, or the model's own.
    fn save_model_dir(&self, out: &Path, weights: Option<Vec<(String, Tensor)>>) -> Result<()> {
        let source = self.model.source_dir().context("the model was not loaded from a folder")?;
        let opts = crate::model::save::SaveOptions {
            dtype: Some(self.model.dtype()),
            max_shard_bytes: self.cfg.training.max_shard_bytes()?,
            into_existing: true,
        };
        self.model
            .save_pretrained_with(weights, out, source, &opts)
            .with_context(|| format!("writing the trained model into {}", out.display()))?;
        Ok(())
    }
}

/// The checkpoint `--resume` names, checked to be one.
fn resume_dir(cfg: &TrainConfig, resume: Option<Resume>) -> Result<Option<PathBuf>> {
    let dir = match resume {
        None => return Ok(None),
        Some(Resume::Path(p)) => p,
        Some(Resume::Latest) => checkpoint::latest_checkpoint(&cfg.output_dir)?.with_context(|| {
            format!(
                "--resume: no checkpoint to resume from: {} holds no checkpoint-N folder (run without --resume to start, \
                 or name a checkpoint folder: --resume DIR)",
                cfg.output_dir.display()
            )
        })?,
    };
    if !dir.join(STATE_FILE).is_file() {
        bail!("--resume: {} is not a checkpoint (it has no {STATE_FILE})", dir.display());
    }
    Ok(Some(dir))
}

/// Loads the model and attaches the run's adapter: ZeRO stage 3 over several ranks shards
/// each decoder linear layer as soon as it is read, so a rank never holds the whole model
/// (see `CausalLM::load_with`); QLoRA quantizes the adapter's targets as they are read, too
/// (a quantized layer stays whole, the others are sharded). `adapter_init` weights replace
/// the plugin's initialisation.
fn load_model(
    cfg: &TrainConfig,
    registry: &Registry,
    device: Device,
    group: &Arc<Group>,
    heads: Heads,
) -> Result<LoadedModel> {
    let dtype = crate::model::init::parse_dtype(&cfg.dtype)?;
    let capabilities =
        registry.memory_capabilities(&cfg.memory.plugin, &cfg.memory.config_json())?;
    let shard_params =
        capabilities.iter().any(|c| c == SHARD_FROZEN_PARAMS) && group.as_dyn().world_size() > 1;
    let offload_params = capabilities.iter().any(|c| c == OFFLOAD_PARAMS_CPU);
    let shard_group: Arc<dyn Collectives + Send + Sync> = group.clone();
    if cfg.finetuning() != Finetuning::Adapter {
        // The model's own weights train: which ones is known once it is built, so it loads
        // whole and stage 3 partitions it afterwards (`Run::build`).
        let mut base =
            crate::model::CausalLM::load_with(&cfg.model, device, dtype, &mut |_| Ok(()))?;
        heads.add_to(&mut base)?;
        let mut model = PeftModel::new(base);
        model.set_gradient_checkpointing(cfg.training.gradient_checkpointing);
        return Ok(LoadedModel {
            model,
            quantized: None,
            shard_params,
            offload_params,
            capabilities,
        });
    }
    let adapter = cfg.adapter_section()?;
    let method = registry.adapter(&adapter.plugin, &adapter.config_json())?;
    let base = quant::load_for_adapter(
        &cfg.model,
        device,
        dtype,
        cfg.quantization.as_ref(),
        registry,
        &method,
        &mut |lin| {
            if shard_params {
                lin.shard_weight(shard_group.clone(), offload_params)
                    .with_context(|| format!("sharding `{}`", lin.name))?;
            }
            Ok(())
        },
    )?;
    let mut base = base;
    heads.add_to(&mut base)?;
    let mut model = PeftModel::new(base);
    model.set_gradient_checkpointing(cfg.training.gradient_checkpointing);
    let (attach, quantized) = quant::attach_quantized(
        &mut model,
        "default",
        Box::new(method),
        cfg.quantization.as_ref(),
        registry,
    )?;
    tracing::info!("adapter `{}` on {} modules", adapter.plugin, attach.modules.len());
    if cfg.data.packing && model.adapter_prompt("default").is_some() {
        bail!(
            "config key `data.packing`: adapter `{}` is a prompt-learning method, whose virtual tokens go before each sequence, \
             not before each packed row; remove data.packing",
            adapter.plugin
        );
    }
    if let Some(init) = &cfg.adapter_init {
        check_adapter_init_config(init, &model.adapter_peft_config()?)?;
        let file = init.join("adapter_model.safetensors");
        let weights = crate::util::safetensors::read(&file)
            .with_context(|| format!("adapter_init: cannot read {}", file.display()))?;
        model
            .load_adapter_state_dict(weights)
            .with_context(|| format!("adapter_init {}", init.display()))?;
        // And the weights trained in full beside it (a PatchMerger), as `generate --adapter`
        // and `merge` restore them: the adapter alone would meet an untrained merger.
        let restored = crate::peft::non_lora::load_into(&model, init)
            .with_context(|| format!("adapter_init {}", init.display()))?;
        if !restored.is_empty() {
            tracing::info!(
                "adapter_init: restored {} full weight(s) beside the adapter",
                restored.len()
            );
        }
    }
    Ok(LoadedModel { model, quantized, shard_params, offload_params, capabilities })
}

/// What the memory plugin trains: the adapter's parameters, then the vision weights the
/// config trains in full (also returned alone: they are saved beside the adapter); with
/// `finetuning: full | freeze`, the model's weights the config selects (both lists).
fn parameters(model: &PeftModel, cfg: &TrainConfig) -> Result<(Vec<TrainParam>, Vec<TrainParam>)> {
    let copy = copy_param;
    if cfg.finetuning() != Finetuning::Adapter {
        let full = full_weight_parameters(model, cfg)?;
        return Ok((full.iter().map(copy).collect(), full));
    }
    let mut params = model.trainable_parameters()?;
    let vision = vision_parameters(model, &cfg.vision, cfg.optimizer.lr)?;
    params.extend(vision.iter().map(copy));
    Ok((params, vision))
}

/// A second handle on the same trainable tensor.
fn copy_param(p: &TrainParam) -> TrainParam {
    TrainParam {
        name: p.name.clone(),
        tensor: p.tensor.shallow_clone(),
        lr_scale: p.lr_scale,
        weight_decay_scale: p.weight_decay_scale,
    }
}

/// Checkpoint key of PPO's value head.
const VALUE_HEAD_KEY: &str = "v_head.weight";

/// The heads an objective asks the host to put on the model ([`NEED_SCORE_HEAD`],
/// [`NEED_VALUE_HEAD`]).
#[derive(Clone, Copy, Debug, Default)]
struct Heads {
    score: bool,
    value: bool,
}

impl Heads {
    fn of(needs: &[String]) -> Self {
        let has = |n: &str| needs.iter().any(|x| x == n);
        Self { score: has(NEED_SCORE_HEAD), value: has(NEED_VALUE_HEAD) }
    }

    /// Adds them to the base before any adapter is attached (an adapter then trains a copy of
    /// the score head, as peft's SEQ_CLS task; the value head trains in full).
    fn add_to(self, base: &mut crate::model::CausalLM) -> Result<()> {
        if self.score && base.add_score_head()? {
            tracing::info!("added a score head (`score`, hidden → 1) for the objective");
        }
        if self.value {
            let _ = base.add_value_head()?;
            tracing::info!("added a value head (`v_head`, hidden → 1) for the objective");
        }
        Ok(())
    }
}

/// Optimizer steps on each generation batch: `training.num_iterations`, or what the objective
/// asks for ([`NEED_NUM_ITERATIONS`]); a config that sets another value is refused by name.
fn num_iterations(cfg: &TrainConfig, needs: &[String]) -> Result<usize> {
    let asked = needs.iter().find_map(|n| n.strip_prefix(NEED_NUM_ITERATIONS));
    let Some(asked) = asked else { return Ok(cfg.training.num_iterations) };
    let asked: usize = asked.parse().ok().filter(|&n| n >= 1).with_context(|| {
        format!(
            "objective `{}` asks for `{NEED_NUM_ITERATIONS}{asked}`, which is not a positive count",
            cfg.objective.plugin
        )
    })?;
    let set = cfg.training.num_iterations;
    if set != 1 && set != asked {
        bail!(
            "config key `training.num_iterations` = {set}: objective `{}` takes {asked} optimizer steps on each generation batch \
             (its configuration decides, e.g. PPO's num_ppo_epochs × num_mini_batches); remove training.num_iterations",
            cfg.objective.plugin
        );
    }
    Ok(asked)
}

/// The objective, the batch layout it asks for, the reward plugins (which only objectives
/// that score completions take, and which they need), and the optimizer steps on each
/// generation batch.
fn objective_and_rewards(
    cfg: &TrainConfig,
    registry: &Registry,
) -> Result<(ObjectiveHandle, Layout, Vec<LoadedReward>, usize)> {
    let objective = registry.objective(&cfg.objective.plugin, &cfg.objective.config_json())?;
    let needs = objective.needs();
    let mu = num_iterations(cfg, &needs)?;
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
    check_packing(cfg.data.packing, &cfg.objective.plugin, layout)?;
    if mu > 1 && layout != Layout::Prompts {
        bail!("config key `training.num_iterations`: only objectives that generate (GRPO, PPO) reuse a generation batch; `{}` does not", cfg.objective.plugin);
    }
    Ok((objective, layout, load_rewards(cfg, registry)?, mu))
}

/// `data.packing` packs sequences (SFT) only: other layouts are refused, naming the objective.
fn check_packing(packing: bool, objective: &str, layout: Layout) -> Result<()> {
    if packing && layout != Layout::Sequences {
        bail!(
            "config key `data.packing`: objective `{objective}` trains on {}, and only sequence objectives (sft) \
             pack samples; remove data.packing",
            layout.name()
        );
    }
    Ok(())
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
        let (tensors, extra) = crate::data::collate(layout, &items, pad_id, prep)?;
        let at = MicroPosition {
            num_items: total,
            gradient_accumulation_steps: 1,
            micro_index: j,
            iteration: 0,
            num_iterations: 1,
            eos_token_id: ctx.tokenizer.eos_token_id(),
        };
        let ids = chunk.iter().map(|(row, _)| serde_json::json!(format!("row {row}"))).collect();
        let batch = Batch {
            tensors: on_device(tensors, device)?,
            meta_json: micro_meta(layout, at, ids, extra),
        };
        let out = tch::no_grad(|| objective.loss(&batch, &BatchContext::new(ctx, &batch)))?;
        let value = out.loss.f_double_value(&[])?;
        let weight = chunk.len() as f64;
        sum += if layout == Layout::Sequences {
            value
        } else {
            value * weight / eval_set.len() as f64
        };
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

/// `adapter_init`'s adapter_config.json must describe the adapter this run configures:
/// weights trained with another scale or method would load (same shapes) and silently train
/// something else.
fn check_adapter_init_config(init: &Path, ours: &serde_json::Value) -> Result<()> {
    let file = init.join("adapter_config.json");
    let Ok(text) = std::fs::read_to_string(&file) else { return Ok(()) };
    let theirs: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("adapter_init: {} is not JSON", file.display()))?;
    let differing: Vec<String> = ["peft_type", "r", "lora_alpha", "use_rslora", "use_dora"]
        .iter()
        .filter(|k| {
            let (a, b) = (&ours[**k], &theirs[**k]);
            !a.is_null()
                && !b.is_null()
                && a.as_f64().zip(b.as_f64()).map_or(a != b, |(x, y)| x != y)
        })
        .map(|k| format!("{k}: run {} vs adapter_init {}", ours[*k], theirs[*k]))
        .collect();
    if !differing.is_empty() {
        bail!("adapter_init {} was made with another adapter configuration ({}); make the `adapter` section match it", file.display(), differing.join(", "));
    }
    Ok(())
}

/// Bytes of optimizer state this rank holds, printed by launched runs (`WORLD_SIZE` set)
/// for the memory benchmark.
fn report_state_bytes(memory: &dyn MemoryStrategy) -> Option<usize> {
    std::env::var_os("WORLD_SIZE")?;
    let state = memory.state_dict().ok()?;
    Some(
        state
            .iter()
            .filter(|(n, _)| n != "step")
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum(),
    )
}

/// ZeRO stage 3 gathers each layer's weight with a collective, so every rank must run the
/// same forwards: refuse what would let one rank run fewer (a rank left without samples at
/// the short end of an epoch, per-rank generation of different lengths).
fn check_shardable(
    layout: Layout,
    samples: usize,
    micro: usize,
    world: usize,
    plugin: &str,
) -> Result<()> {
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
fn shardable(model: &PeftModel, name: &str) -> bool {
    name.starts_with(&format!("{}.layers.", model.decoder_path()))
        || (name == "lm_head" && !model.lm_head_is_tied())
}

/// ZeRO stage 3 of the model's own weights (`finetuning: full | freeze`): every large trained
/// weight (decoder linear weights, an untied `lm_head`, the embedding and a tied head with it)
/// is partitioned over the ranks of `group` ([`crate::model::CausalLM::partition_trainable`]),
/// and its entry in `params` and `full_weights` becomes this rank's 1-D shard, keeping the
/// entry's learning-rate and weight-decay scales (decided on the whole weight). Small trained
/// tensors (norms, biases) and the vision side stay whole. Returns the partitioned names, for
/// the memory plugin, which must report `shard_trainable_params`.
fn partition_full_weights(
    model: &mut PeftModel,
    params: &mut [TrainParam],
    full_weights: &mut [TrainParam],
    group: Arc<Group>,
    offload: bool,
    capabilities: &[String],
    plugin: &str,
) -> Result<Vec<String>> {
    if !capabilities.iter().any(|c| c == SHARD_TRAINABLE_PARAMS) {
        bail!(
            "memory `{plugin}` shards the model's weights (stage 3) but cannot step trained weights the host partitions \
             (it does not report `{SHARD_TRAINABLE_PARAMS}`): update the plugin, or use stage 1 or 2 with finetuning: full / freeze"
        );
    }
    let group: Arc<dyn Collectives + Send + Sync> = group;
    let shards = model.partition_trainable(group, offload)?;
    let mut names = Vec::with_capacity(shards.len());
    for (key, leaf) in shards {
        for list in [&mut *params, &mut *full_weights] {
            let p = list.iter_mut().find(|p| p.name == key).with_context(|| {
                format!("partitioned weight `{key}` is not one this run trains")
            })?;
            p.tensor = leaf.shallow_clone();
        }
        names.push(key);
    }
    Ok(names)
}

/// Shards the frozen weight of every [`shardable`] layer over the ranks of `group` (those
/// already sharded while loading are left as they are).
fn shard_frozen_weights(model: &mut PeftModel, group: Arc<Group>, offload: bool) -> Result<()> {
    let group: Arc<dyn Collectives + Send + Sync> = group;
    let names: Vec<String> = model
        .linears()
        .into_iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| shardable(model, n))
        .collect();
    for lin in model.linears_mut().into_iter().filter(|l| names.contains(&l.name)) {
        lin.shard_weight(group.clone(), offload)
            .with_context(|| format!("sharding `{}`", lin.name))?;
    }
    Ok(())
}

/// Bytes of frozen weights this rank holds: all of them, and those of the decoder's linear
/// layers (most of what ZeRO stage 3 shards).
fn frozen_resident_bytes(model: &PeftModel) -> (usize, usize) {
    let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
    let prefix = format!("{}.layers.", model.decoder_path());
    let linears: Vec<_> = model
        .linears()
        .into_iter()
        .filter(|(n, l)| shardable(model, n) && !l.is_partitioned())
        .collect();
    let listed: usize = model
        .named_weights()
        .iter()
        .filter(|(k, t)| !t.requires_grad() && !model.is_partitioned(k))
        .map(|(_, t)| bytes(t))
        .sum();
    let stand_ins: usize = linears
        .iter()
        .map(|(_, l)| bytes(&l.weight) + l.bias.as_ref().map(bytes).unwrap_or(0))
        .sum();
    let resident: usize = linears.iter().map(|(_, l)| l.resident_bytes()).sum();
    let decoder: usize = linears
        .iter()
        .filter(|(n, l)| n.starts_with(&prefix) && !l.weight.requires_grad())
        .map(|(_, l)| l.resident_bytes())
        .sum();
    ((listed + resident).saturating_sub(stand_ins), decoder)
}

/// How a training row is named in the batch metadata: `row N`, or `rows A+B+…` packed.
fn item_id(row: usize, item: &Item) -> serde_json::Value {
    let name = match item {
        Item::Packed(p) => {
            let rows: Vec<String> = p.rows.iter().map(|r| r.to_string()).collect();
            format!("rows {}", rows.join("+"))
        }
        _ => format!("row {row}"),
    };
    serde_json::json!(name)
}

fn step_seed(seed: u64, step: usize) -> i64 {
    (seed.wrapping_mul(1_000_003).wrapping_add(step as u64) & 0x7FFF_FFFF_FFFF_FFFF) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn packing_is_refused_for_other_layouts() {
        check_packing(true, "sft", Layout::Sequences).unwrap();
        check_packing(false, "dpo", Layout::Pairs).unwrap();
        let e = check_packing(true, "dpo", Layout::Pairs).unwrap_err().to_string();
        assert!(e.contains("data.packing") && e.contains("`dpo`"), "{e}");
    }

    #[test]
    fn adapter_init_with_another_configuration_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("ferrotune-adapter-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8}"#,
        )
        .unwrap();
        let ours = serde_json::json!({"peft_type": "LORA", "r": 8, "lora_alpha": 8.0, "use_rslora": false});
        let e = check_adapter_init_config(&dir, &ours).unwrap_err().to_string();
        assert!(e.contains("r: run 8 vs adapter_init 4") && !e.contains("lora_alpha"), "{e}");
        let same = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
        check_adapter_init_config(&dir, &same).unwrap();
        std::fs::remove_dir_all(dir).ok();
    }
}
