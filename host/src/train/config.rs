//! The `ferrotune train` configuration (YAML). Every key is documented in the README's config
//! reference; unknown keys are errors that name them. Plugin sections (`adapter`, `objective`,
//! `memory`, `data.config`) carry `plugin:` plus that plugin's own keys, which the plugin
//! validates.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A plugin section: `plugin: NAME` and the plugin's own configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct PluginSection {
    pub plugin: String,
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl PluginSection {
    pub fn config_json(&self) -> String {
        serde_json::Value::Object(self.config.clone()).to_string()
    }
    fn named(plugin: &str) -> Self {
        Self { plugin: plugin.into(), config: Default::default() }
    }
}

/// The top-level keys of a run config in the order written configs (`config import`, the
/// board's drafts) put them: the README's reference order.
pub const KEY_ORDER: [&str; 18] = [
    "model",
    "output_dir",
    "device",
    "dtype",
    "seed",
    "finetuning",
    "freeze",
    "adapter",
    "adapter_init",
    "quantization",
    "objective",
    "memory",
    "optimizer",
    "scheduler",
    "data",
    "vision",
    "training",
    "rewards",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json). Relative paths
    /// are relative to the config file.
    pub model: PathBuf,
    /// Where checkpoints, metrics and the final adapter go.
    pub output_dir: PathBuf,
    /// cpu, cuda or cuda:N (default cpu).
    #[serde(default = "default_device")]
    pub device: String,
    /// Compute dtype of the frozen base: f32 or bf16 (default f32). f16 is refused: training
    /// in it needs loss scaling, which the trainer does not do.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Seed of parameter init, shuffling and dropout (default 42).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// What trains: `adapter` (the `adapter:` section's plugin; the default when that section
    /// is given), `full` (every weight) or `freeze` (the decoder layers and modules `freeze:`
    /// names), as LLaMA-Factory's `finetuning_type`. Full and freeze take no `adapter:`.
    #[serde(default)]
    pub finetuning: Option<Finetuning>,
    /// `finetuning: freeze`: which layers and modules train.
    #[serde(default)]
    pub freeze: Option<FreezeConfig>,
    /// The adapter plugin and its configuration (e.g. `plugin: lora`, `r: 8`); required with
    /// `finetuning: adapter`, refused with full or freeze.
    #[serde(default)]
    pub adapter: Option<PluginSection>,
    /// Quantized base weights (QLoRA): `plugin: nf4|int8`, the plugin's keys and
    /// `skip_modules` (see `crate::peft::quant`). Default none (dense base).
    #[serde(default)]
    pub quantization: Option<crate::peft::quant::QuantizationConfig>,
    /// A PEFT adapter directory whose weights start the run instead of the plugin's init
    /// (continue training an adapter; relative to the config file).
    #[serde(default)]
    pub adapter_init: Option<PathBuf>,
    /// The objective plugin (default `sft`).
    #[serde(default = "default_objective")]
    pub objective: PluginSection,
    /// The memory plugin (default `single`).
    #[serde(default = "default_memory")]
    pub memory: PluginSection,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    /// Vision-language models (Qwen2-VL): which vision weights train, at which learning rates.
    #[serde(default)]
    pub vision: VisionTrainConfig,
    /// Reward plugins for objectives that generate (GRPO): each `plugin: NAME` with an
    /// optional `weight` (default 1.0) and `name` (default the plugin's; names must differ),
    /// plus the plugin's own keys.
    #[serde(default)]
    pub rewards: Vec<RewardSection>,
}

/// What a run trains (`finetuning:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finetuning {
    /// An adapter plugin's tensors (LoRA, …) on the frozen base.
    Adapter,
    /// Every weight of the model (for a vision-language model, the vision tower and merger
    /// too unless `vision:` freezes them).
    Full,
    /// The weights `freeze:` selects; the rest stays frozen.
    Freeze,
}

impl Finetuning {
    pub fn name(self) -> &'static str {
        match self {
            Self::Adapter => "adapter",
            Self::Full => "full",
            Self::Freeze => "freeze",
        }
    }
}

/// `finetuning: freeze`, with LLaMA-Factory's keys (`freeze_trainable_layers`,
/// `freeze_trainable_modules`, `freeze_extra_modules`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// The last N decoder layers train (default 2); a negative number: the first N.
    #[serde(default = "default_trainable_layers")]
    pub trainable_layers: i64,
    /// Within those layers, the modules that train, by module-name suffix (`mlp`, `self_attn`,
    /// `q_proj`, `mlp.down_proj`, `input_layernorm`); `all` (default) trains whole layers. A
    /// list, or one comma-separated string as LLaMA-Factory writes it.
    #[serde(default = "default_all_modules")]
    pub trainable_modules: ModuleList,
    /// Modules outside the decoder layers that train too, by their last path segment
    /// (`embed_tokens`, `norm`, `lm_head`). Default none.
    #[serde(default)]
    pub extra_modules: ModuleList,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        Self {
            trainable_layers: default_trainable_layers(),
            trainable_modules: default_all_modules(),
            extra_modules: ModuleList::default(),
        }
    }
}

fn default_trainable_layers() -> i64 {
    2
}
fn default_all_modules() -> ModuleList {
    ModuleList(vec!["all".into()])
}

/// Module names: a YAML list, or one comma-separated string (`mlp,self_attn`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleList(pub Vec<String>);

impl<'de> Deserialize<'de> for ModuleList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let names: Vec<String> = match Raw::deserialize(d)? {
            Raw::One(s) => s.split(',').map(|p| p.trim().to_string()).collect(),
            Raw::Many(v) => v.into_iter().map(|p| p.trim().to_string()).collect(),
        };
        Ok(Self(names.into_iter().filter(|n: &String| !n.is_empty()).collect()))
    }
}

impl ModuleList {
    /// Whether it says `all`.
    pub fn is_all(&self) -> bool {
        self.0.iter().any(|n| n == "all")
    }
}

/// One reward of a run (`rewards:` list): a reward plugin (`plugin:` and its keys), or a
/// trained reward model (`model:` a directory, optional `adapter:` its SEQ_CLS adapter).
#[derive(Debug, Clone, Deserialize)]
pub struct RewardSection {
    #[serde(default)]
    pub plugin: String,
    /// A reward model's directory (relative to the config file): a `…ForSequenceClassification`
    /// checkpoint, or the base of `adapter`.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// The reward model's sequence-classification adapter (what `objective: reward_model` saves).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Weight of this reward in the sum GRPO's advantages are computed from (default 1.0).
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// The name its metrics are logged under (default: the plugin's name).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl RewardSection {
    pub fn config_json(&self) -> String {
        serde_json::Value::Object(self.config.clone()).to_string()
    }
    pub fn display_name(&self) -> &str {
        match (&self.name, &self.model) {
            (Some(n), _) => n,
            (None, Some(_)) => REWARD_MODEL_NAME,
            (None, None) => &self.plugin,
        }
    }
}

/// The name a reward model's scores are logged under unless it has a `name:`.
pub const REWARD_MODEL_NAME: &str = "reward_model";

fn default_weight() -> f64 {
    1.0
}

/// What trains besides the adapter in a vision-language model, as Qwen2-VL-Finetune's
/// `freeze_vision_tower` / `tune_merger` / `vision_lr` / `merger_lr`. Full weights that train
/// are saved beside the PEFT adapter (`non_lora_state_dict.safetensors`) and restored by
/// `generate --adapter` and `merge`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionTrainConfig {
    /// Keep the vision tower's own weights (patch embed, blocks) frozen (default true, with
    /// `finetuning: full` false). LoRA can still target its linear layers (`qkv`, `proj`,
    /// `fc1`, `fc2`) through the adapter.
    #[serde(default)]
    pub freeze_vision_tower: Option<bool>,
    /// Train the PatchMerger (vision → language projection) in full (default false, with
    /// `finetuning: full` true).
    #[serde(default)]
    pub tune_merger: Option<bool>,
    /// Keep the language model's weights frozen (default false): with `finetuning: full` only
    /// the vision side trains; with an adapter, only the adapter does (as always).
    #[serde(default)]
    pub freeze_llm: bool,
    /// Learning rate of the vision tower's weights (default: optimizer.lr).
    #[serde(default)]
    pub vision_lr: Option<f64>,
    /// Learning rate of the merger's weights (default: optimizer.lr).
    #[serde(default)]
    pub merger_lr: Option<f64>,
}

impl VisionTrainConfig {
    /// `freeze_vision_tower` as set, else the mode's default (frozen unless full).
    pub fn tower_frozen(&self, mode: Finetuning) -> bool {
        self.freeze_vision_tower.unwrap_or(mode != Finetuning::Full)
    }
    /// `tune_merger` as set, else the mode's default (trained with full).
    pub fn merger_trained(&self, mode: Finetuning) -> bool {
        self.tune_merger.unwrap_or(mode == Finetuning::Full)
    }
}

/// What happens when a step's loss or gradient norm is NaN or infinite (the memory plugin has
/// skipped that step: nothing was updated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with exit status 1 after `training.max_nonfinite_steps` such steps in a row,
    /// naming the step and what was not finite (default).
    Stop,
    /// Keep skipping them; the end of the run says how many were skipped.
    Skip,
}

/// What happens to a sample that cannot be used (a bad image, an `<image>` count that differs
/// from its images, a row the dataset plugin refuses, an image block cut by truncation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Stop before training, listing every bad row (default).
    Stop,
    /// Skip them, count them and list them in the log.
    Skip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate (default 2e-4; typical LoRA 1e-4 – 5e-4).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay (default 0.0).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW betas (default [0.9, 0.999]).
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// AdamW epsilon (default 1e-8).
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this (default 1.0; null = no clipping).
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    /// AMSGrad variant of AdamW (default false).
    #[serde(default)]
    pub amsgrad: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            weight_decay: 0.0,
            betas: default_betas(),
            eps: default_eps(),
            max_grad_norm: default_clip(),
            amsgrad: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// constant, linear (to 0) or cosine (to 0) after warm-up (default cosine).
    #[serde(default = "default_schedule", rename = "type")]
    pub kind: ScheduleKind,
    /// Linear warm-up from 0 over this many optimizer steps (default 0).
    #[serde(default)]
    pub warmup_steps: usize,
    /// Or over this fraction of all steps (used when warmup_steps is 0).
    #[serde(default)]
    pub warmup_ratio: f64,
}

impl DataConfig {
    /// `base` (the model's video settings) with the run's `data.video_*` keys applied,
    /// checked; an error names the key.
    pub fn video_options(
        &self,
        base: crate::vision::VideoOptions,
    ) -> Result<crate::vision::VideoOptions> {
        let mut o = base;
        if let Some(v) = self.video_fps {
            if !(v > 0.0 && v.is_finite()) {
                bail!("config key `data.video_fps`: must be a positive number of frames a second, got {v}");
            }
            o.fps = v;
        }
        if self.video_nframes.is_some() {
            o.nframes = self.video_nframes;
        }
        o.min_frames = self.video_min_frames.unwrap_or(o.min_frames);
        o.max_frames = self.video_max_frames.unwrap_or(o.max_frames);
        o.min_pixels = self.video_min_pixels.unwrap_or(o.min_pixels);
        o.max_pixels = self.video_max_pixels.unwrap_or(o.max_pixels);
        if self.video_min_pixels.is_none() {
            // Only a lower max set: the default floor follows it down.
            o.min_pixels = o.min_pixels.min(o.max_pixels);
        }
        o.total_pixels = self.video_total_pixels.unwrap_or(o.total_pixels);
        o.validate().map_err(|e| anyhow::anyhow!("config keys `data.video_*`: {e}"))?;
        Ok(o)
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { kind: default_schedule(), warmup_steps: 0, warmup_ratio: 0.0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The dataset plugin (alpaca, sharegpt, …); with `path`. Not used with `datasets`.
    #[serde(default)]
    pub plugin: String,
    /// The data file or folder (relative to the config file); or `dataset_dir` + `datasets`.
    #[serde(default)]
    pub path: PathBuf,
    /// LLaMA-Factory's data registry: the folder holding `dataset_info.json` (relative to the
    /// config file); see `crate::data::registry`.
    #[serde(default)]
    pub dataset_dir: Option<PathBuf>,
    /// Data sets of `dataset_dir`'s `dataset_info.json` by name: a list, or `a,b` as
    /// LLaMA-Factory writes `dataset:`.
    #[serde(default)]
    pub datasets: Option<crate::data::registry::Names>,
    /// Where relative image and video paths of registry data sets are found (default
    /// `dataset_dir`; relative to the config file).
    #[serde(default)]
    pub media_dir: Option<PathBuf>,
    /// How several data sets mix: concat (default), interleave_under, interleave_over.
    #[serde(default)]
    pub mix_strategy: crate::data::registry::MixStrategy,
    /// With interleave_*: the probability of drawing from each data set (a list or `0.5,0.5`).
    #[serde(default)]
    pub interleave_probs: Option<crate::data::registry::Probs>,
    /// Read at most this many rows of each data set (default all).
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// `{{key}}` placeholders of the samples' text replaced by these values (LLaMA-Factory's
    /// `identity.json` holds `{{name}}` and `{{author}}`).
    #[serde(default)]
    pub replacements: std::collections::BTreeMap<String, String>,
    /// The plugin's own configuration (column mapping, …); with `datasets`, keys laid over
    /// every data set's configuration (`skip_bad_rows: true`).
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Split name passed to the plugin (default train); with `datasets`, each entry's own
    /// `split` of dataset_info.json is used instead.
    #[serde(default = "default_split")]
    pub split: String,
    /// Longer samples are truncated to this many tokens, and counted (default 1024).
    #[serde(default = "default_cutoff")]
    pub cutoff_len: usize,
    /// Put labels on prompt tokens too (default false: assistant turns only).
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Label only the last assistant turn (default false).
    #[serde(default)]
    pub mask_history: bool,
    /// Fraction of samples held out for eval loss (default 0.0 = no eval).
    #[serde(default)]
    pub eval_ratio: f64,
    /// Shuffle the training order every epoch (default true).
    #[serde(default = "default_true")]
    pub shuffle: bool,
    /// Images are resized to at least this many pixels (default: the model's
    /// preprocessor_config.json, else the data set's own setting, else 56×56).
    #[serde(default)]
    pub image_min_pixels: Option<u64>,
    /// And at most this many (default: as image_min_pixels; Qwen2-VL's 12845056).
    #[serde(default)]
    pub image_max_pixels: Option<u64>,
    /// Images larger than this many pixels (width × height, read from the file's header before
    /// anything is decoded) are refused as bad samples (default: 4 × the model's max_pixels).
    #[serde(default)]
    pub max_image_pixels: Option<u64>,
    /// Videos (`<video>` placeholders; Qwen2-VL / Qwen2.5-VL): frames a second sampled from a
    /// video file (default: the model's video_preprocessor_config.json, else qwen-vl-utils'
    /// 2.0). A frame folder's frames count as sampled at this rate.
    #[serde(default)]
    pub video_fps: Option<f64>,
    /// A fixed number of frames per video instead of `video_fps` (rounded to a multiple of 2).
    #[serde(default)]
    pub video_nframes: Option<u32>,
    /// Bounds on the frames sampled with `video_fps` (defaults 4 and 768).
    #[serde(default)]
    pub video_min_frames: Option<u32>,
    #[serde(default)]
    pub video_max_frames: Option<u32>,
    /// Each frame is resized to at least / at most this many pixels (defaults 128·28² =
    /// 100352 and 768·28² = 602112, qwen-vl-utils').
    #[serde(default)]
    pub video_min_pixels: Option<u64>,
    #[serde(default)]
    pub video_max_pixels: Option<u64>,
    /// The pixel budget of a whole video, shared by its frames (default 0.9·128000·28²).
    #[serde(default)]
    pub video_total_pixels: Option<u64>,
    /// stop (default) or skip samples that cannot be used; samples that only lose all their
    /// labels to truncation are always skipped and counted.
    #[serde(default = "default_on_bad")]
    pub on_bad_sample: OnBadSample,
    /// Pack several training samples into each row of at most `cutoff_len` tokens (default
    /// false; LLaMA-Factory's `neat_packing`): samples never attend to one another, and
    /// `training.micro_batch_size` counts packed rows. Sequence objectives (SFT) only; the
    /// eval split stays unpacked.
    #[serde(default)]
    pub packing: bool,
    /// Draw micro-batches of similar length (default false; transformers'
    /// `group_by_length`): each epoch's seeded order is cut into megabatches of up to 50
    /// optimizer steps' samples, each sorted longest first, the longest sample's first. Not
    /// with `packing`.
    #[serde(default)]
    pub group_by_length: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Passes over the data (default 1). Ignored when max_steps is set.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps (default: epochs decide).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Samples per forward/backward (default 2).
    #[serde(default = "default_micro_batch")]
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step (default 1).
    #[serde(default = "default_one")]
    pub gradient_accumulation_steps: usize,
    /// Log a metrics line every N optimizer steps (default 1).
    #[serde(default = "default_one")]
    pub logging_steps: usize,
    /// Eval loss every N optimizer steps (default: only at the end; needs data.eval_ratio).
    #[serde(default)]
    pub eval_steps: Option<usize>,
    /// Write a checkpoint every N optimizer steps (default: none until the end).
    #[serde(default)]
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints, at least 1 (default: all).
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    /// A step whose loss or gradient norm is NaN/Inf is skipped (nothing updated); `stop`
    /// (default) ends the run with exit status 1 after `max_nonfinite_steps` of them in a row,
    /// `skip` keeps going and reports how many were skipped.
    #[serde(default = "default_on_nonfinite")]
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite: stop`: how many skipped steps in a row end the run (default 3,
    /// at least 1; 1 stops at the first).
    #[serde(default = "default_max_nonfinite")]
    pub max_nonfinite_steps: usize,
    /// Start a new run (no `--resume`) in an output_dir that holds an earlier run's files
    /// (checkpoints, adapter, metrics.jsonl), deleting them first (default false: refused;
    /// also `train --overwrite-output-dir`). Other files there are left alone.
    #[serde(default)]
    pub overwrite_output_dir: bool,
    /// Show a progress bar on stderr (default true).
    #[serde(default = "default_true")]
    pub progress_bar: bool,
    /// Objectives that generate (GRPO): optimizer steps taken on each generation batch
    /// (TRL's `num_iterations`, μ; default 1). With more than 1, each step's micro-batches
    /// are generated and scored once and reused for that many consecutive steps, with the
    /// sampling policy's log-probabilities as `old_per_token_logps`.
    #[serde(default = "default_one")]
    pub num_iterations: usize,
    /// Recompute each decoder layer in backward instead of keeping its activations
    /// (activation checkpointing; default false): less memory for about one more forward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// `finetuning: full | freeze`: the largest weight file of the saved model before it is
    /// split into shards with an index (`"5GB"`, `"500MB"`, bytes); default transformers'
    /// (50GB).
    #[serde(default)]
    pub max_shard_size: Option<String>,
    /// Where metrics go besides `metrics.jsonl`: `tensorboard` (event files for TensorBoard),
    /// `all` (the same) or `none` (default); a name or a list, as transformers' `report_to`.
    #[serde(default)]
    pub report_to: super::tensorboard::ReportTo,
    /// The folder of the TensorBoard event files (relative to the config file); default
    /// `<output_dir>/runs/<Mon DD_HH-MM-SS>_<host>` (UTC), as transformers, and on
    /// `--resume` the newest folder there.
    #[serde(default)]
    pub logging_dir: Option<PathBuf>,
}

impl TrainingConfig {
    /// `max_shard_size` in bytes.
    pub fn max_shard_bytes(&self) -> Result<u64> {
        match &self.max_shard_size {
            None => Ok(crate::model::save::DEFAULT_MAX_SHARD_BYTES),
            Some(s) => crate::model::save::parse_size(s)
                .with_context(|| "config key `training.max_shard_size`".to_string()),
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            epochs: default_epochs(),
            max_steps: None,
            micro_batch_size: default_micro_batch(),
            gradient_accumulation_steps: 1,
            logging_steps: 1,
            eval_steps: None,
            save_steps: None,
            save_total_limit: None,
            on_nonfinite: default_on_nonfinite(),
            max_nonfinite_steps: default_max_nonfinite(),
            overwrite_output_dir: false,
            progress_bar: true,
            num_iterations: 1,
            gradient_checkpointing: false,
            max_shard_size: None,
            report_to: Default::default(),
            logging_dir: None,
        }
    }
}

fn default_device() -> String {
    "cpu".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_seed() -> u64 {
    42
}
fn default_objective() -> PluginSection {
    PluginSection::named("sft")
}
fn default_memory() -> PluginSection {
    PluginSection::named("single")
}
fn default_lr() -> f64 {
    2e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn default_split() -> String {
    "train".into()
}
fn default_cutoff() -> usize {
    1024
}
fn default_on_bad() -> OnBadSample {
    OnBadSample::Stop
}
fn default_on_nonfinite() -> OnNonFinite {
    OnNonFinite::Stop
}
fn default_max_nonfinite() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_epochs() -> usize {
    1
}
fn default_micro_batch() -> usize {
    2
}
fn default_one() -> usize {
    1
}

impl TrainConfig {
    /// Reads a YAML config; errors name the file and the key path.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg = Self::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.model, &mut cfg.output_dir, &mut cfg.data.path]
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .chain(cfg.data.dataset_dir.as_mut())
            .chain(cfg.data.media_dir.as_mut())
            .chain(cfg.adapter_init.as_mut())
            .chain(cfg.training.logging_dir.as_mut())
            .chain(
                cfg.rewards
                    .iter_mut()
                    .flat_map(|r| r.model.as_mut().into_iter().chain(r.adapter.as_mut())),
            )
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::parse(text, "config")
    }

    /// Parses and validates `text`, read from `file`: a YAML syntax error is named by the
    /// file, line and column; anything else by the config key (after `in FILE:`).
    fn parse(text: &str, file: &str) -> Result<Self> {
        let de = serde_yaml::Deserializer::from_str(text);
        let parsed: Result<Self> = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            if path == "?" || path.is_empty() {
                // No key reached: the text is not YAML (serde_yaml's message ends with the place).
                let inner = e.into_inner();
                return match inner.location() {
                    Some(l) => anyhow::anyhow!(
                        "{file} line {} column {}: {}",
                        l.line(),
                        l.column(),
                        yaml_message(&inner)
                    ),
                    None => anyhow::anyhow!("{file}: {inner}"),
                };
            }
            // serde_yaml starts its message with the same path: say it once.
            let message = e.inner().to_string();
            let message = message.strip_prefix(&format!("{path}: ")).unwrap_or(&message);
            let key = if path == "." { "(top level)".to_string() } else { path.clone() };
            anyhow::anyhow!("in {file}: config key `{key}`: {message}")
        });
        let cfg = parsed?;
        cfg.validate().map_err(|e| anyhow::anyhow!("in {file}: {e:#}"))?;
        Ok(cfg)
    }

    /// What the run trains: `finetuning:` as set, else an adapter.
    pub fn finetuning(&self) -> Finetuning {
        self.finetuning.unwrap_or(Finetuning::Adapter)
    }

    /// The `adapter:` section (validated to be there with `finetuning: adapter`).
    pub fn adapter_section(&self) -> Result<&PluginSection> {
        self.adapter.as_ref().with_context(|| {
            format!("finetuning: {} trains without an adapter", self.finetuning().name())
        })
    }

    /// `freeze:` as set, else its defaults.
    pub fn freeze_config(&self) -> FreezeConfig {
        self.freeze.clone().unwrap_or_default()
    }

    fn validate_finetuning(&self) -> Result<()> {
        let mode = self.finetuning();
        match (mode, &self.adapter) {
            (Finetuning::Adapter, None) => bail!(
                "config key `adapter`: missing: name an adapter plugin (`adapter: {{plugin: lora, r: 8}}`), \
                 or train the model's own weights with `finetuning: full` or `finetuning: freeze`"
            ),
            (Finetuning::Full | Finetuning::Freeze, Some(a)) => bail!(
                "config key `adapter`: finetuning: {} trains the model's own weights and takes no adapter (`{}`); \
                 remove the adapter section, or set finetuning: adapter",
                mode.name(),
                a.plugin
            ),
            _ => {}
        }
        if self.freeze.is_some() && mode != Finetuning::Freeze {
            bail!(
                "config key `freeze`: only read with finetuning: freeze (this run is finetuning: {})",
                mode.name()
            );
        }
        if mode != Finetuning::Adapter {
            if self.quantization.is_some() {
                bail!("config key `quantization`: quantized weights cannot train; with finetuning: {} remove it (QLoRA trains an adapter on a quantized base)", mode.name());
            }
            if self.adapter_init.is_some() {
                bail!(
                    "config key `adapter_init`: finetuning: {} has no adapter to start from",
                    mode.name()
                );
            }
        }
        if let Some(f) = &self.freeze {
            if f.trainable_layers == 0 {
                bail!("config key `freeze.trainable_layers`: must not be 0 (the last N layers train; a negative number: the first N)");
            }
            if f.trainable_modules.0.is_empty() {
                bail!("config key `freeze.trainable_modules`: names no module (`all`, or module names such as mlp, self_attn)");
            }
            if self.vision.freeze_llm {
                bail!("config key `vision.freeze_llm`: finetuning: freeze trains decoder layers, which freeze_llm freezes; use finetuning: full with freeze_llm to train the vision side only");
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.validate_finetuning()?;
        crate::data::registry::validate(&self.data)?;
        self.training.max_shard_bytes()?;
        let t = &self.training;
        // Every step count the trainer divides by (or takes a remainder of) is at least 1.
        for (key, n) in [
            ("training.micro_batch_size", Some(t.micro_batch_size)),
            ("training.gradient_accumulation_steps", Some(t.gradient_accumulation_steps)),
            ("training.logging_steps", Some(t.logging_steps)),
            ("training.eval_steps", t.eval_steps),
            ("training.save_steps", t.save_steps),
            ("training.save_total_limit", t.save_total_limit),
            ("training.max_steps", t.max_steps),
            ("training.max_nonfinite_steps", Some(t.max_nonfinite_steps)),
        ] {
            if n == Some(0) {
                bail!(
                    "config key `{key}`: must be at least 1, got 0 (omit the key for its default)"
                );
            }
        }
        if !matches!(
            self.dtype.to_ascii_lowercase().as_str(),
            "f32" | "fp32" | "float32" | "float" | "bf16" | "bfloat16"
        ) {
            bail!(
                "config key `dtype`: `{}` is not supported for training; use f32 or bf16 (f16 would need loss scaling)",
                self.dtype
            );
        }
        let o = &self.optimizer;
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            bail!(
                "config key `optimizer.eps`: must be positive and finite (typical 1e-8), got {}",
                o.eps
            );
        }
        if t.max_steps.is_none() && t.epochs == 0 {
            bail!("config key `training.epochs`: must be at least 1 (or set training.max_steps)");
        }
        if !(0.0..1.0).contains(&self.data.eval_ratio) {
            bail!("config key `data.eval_ratio`: must be in [0, 1), got {}", self.data.eval_ratio);
        }
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            bail!("config key `optimizer.lr`: must be positive, got {}", self.optimizer.lr);
        }
        if !(0.0..1.0).contains(&self.scheduler.warmup_ratio) {
            bail!(
                "config key `scheduler.warmup_ratio`: must be in [0, 1), got {}",
                self.scheduler.warmup_ratio
            );
        }
        for (key, lr) in [
            ("vision.vision_lr", self.vision.vision_lr),
            ("vision.merger_lr", self.vision.merger_lr),
        ] {
            if lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
                bail!("config key `{key}`: must be positive");
            }
        }
        if self.data.max_image_pixels == Some(0) {
            bail!("config key `data.max_image_pixels`: must be at least 1 (the most pixels, width x height, an image file may have)");
        }
        if let (Some(lo), Some(hi)) = (self.data.image_min_pixels, self.data.image_max_pixels) {
            if lo > hi {
                bail!("config key `data.image_min_pixels`: {lo} is larger than data.image_max_pixels {hi}");
            }
        }
        self.data.video_options(crate::vision::VideoOptions::default())?;
        if self.data.cutoff_len < 2 {
            bail!("config key `data.cutoff_len`: must be at least 2");
        }
        if self.data.packing && self.data.group_by_length {
            bail!("config keys `data.packing` and `data.group_by_length`: choose one (packed rows are already of similar length)");
        }
        if t.num_iterations == 0 {
            bail!("config key `training.num_iterations`: must be at least 1");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, r) in self.rewards.iter().enumerate() {
            if !r.weight.is_finite() {
                bail!(
                    "config key `rewards[{i}].weight`: must be a finite number, got {}",
                    r.weight
                );
            }
            match (r.plugin.is_empty(), &r.model) {
                (true, None) => bail!("config key `rewards[{i}]`: name a reward plugin (`plugin:`) or a reward model (`model:` a directory)"),
                (false, Some(_)) => bail!("config key `rewards[{i}]`: `plugin` and `model` both given; a reward is one or the other"),
                (true, Some(_)) if !r.config.is_empty() => {
                    let keys: Vec<&str> = r.config.keys().map(String::as_str).collect();
                    bail!("config key `rewards[{i}]`: unknown key(s) {} for a reward model (it takes model, adapter, weight, name)", keys.join(", "))
                }
                (false, None) if r.adapter.is_some() => bail!("config key `rewards[{i}].adapter`: only a reward model (`model:`) takes an adapter"),
                _ => {}
            }
            if !names.insert(r.display_name()) {
                bail!(
                    "config key `rewards[{i}]`: a second reward named `{}`; give one a `name:`",
                    r.display_name()
                );
            }
        }
        Ok(())
    }

    /// The keys that change what a run trains, flattened to `section.key` → value: what a
    /// checkpoint records and `--resume` compares (not logging, saving, evaluation cadence,
    /// the device, the progress bar or gradient checkpointing, which change no number).
    /// Paths are made absolute where they exist, so that the same config run from another
    /// folder records the same.
    pub fn training_record(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        use serde_json::json;
        let path = |p: &Path| {
            json!(std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string())
        };
        // A plugin section as written: `plugin` and the plugin's keys (`adapter.r`).
        let section = |s: &PluginSection| {
            let mut m = s.config.clone();
            m.insert("plugin".into(), json!(s.plugin));
            serde_json::Value::Object(m)
        };
        let (o, sc, d, t, v) =
            (&self.optimizer, &self.scheduler, &self.data, &self.training, &self.vision);
        let schedule = match sc.kind {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        };
        let record = json!({
            "model": path(&self.model),
            "dtype": self.dtype.to_ascii_lowercase(),
            "seed": self.seed,
            "finetuning": self.finetuning().name(),
            "freeze": self.freeze.as_ref().map(|f| json!({"trainable_layers": f.trainable_layers,
                        "trainable_modules": f.trainable_modules.0, "extra_modules": f.extra_modules.0})),
            "adapter": self.adapter.as_ref().map(section),
            "quantization": self.quantization,
            "adapter_init": self.adapter_init.as_deref().map(path),
            "objective": section(&self.objective),
            "memory": section(&self.memory),
            "optimizer": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": o.betas, "eps": o.eps,
                          "max_grad_norm": o.max_grad_norm, "amsgrad": o.amsgrad},
            "scheduler": {"type": schedule, "warmup_steps": sc.warmup_steps, "warmup_ratio": sc.warmup_ratio},
            "data": {"plugin": d.plugin, "path": path(&d.path), "config": d.config, "split": d.split,
                     "cutoff_len": d.cutoff_len, "train_on_prompt": d.train_on_prompt,
                     "mask_history": d.mask_history, "eval_ratio": d.eval_ratio, "shuffle": d.shuffle,
                     "image_min_pixels": d.image_min_pixels, "image_max_pixels": d.image_max_pixels,
                     "packing": d.packing, "group_by_length": d.group_by_length},
            "training": {"epochs": t.epochs, "max_steps": t.max_steps, "micro_batch_size": t.micro_batch_size,
                         "gradient_accumulation_steps": t.gradient_accumulation_steps,
                         "num_iterations": t.num_iterations},
            "vision": {"freeze_vision_tower": v.tower_frozen(self.finetuning()),
                       "tune_merger": v.merger_trained(self.finetuning()), "freeze_llm": v.freeze_llm,
                       "vision_lr": v.vision_lr, "merger_lr": v.merger_lr},
            "rewards": self.rewards.iter().map(|r| {
                let mut v = json!({"plugin": r.plugin, "weight": r.weight, "name": r.name, "config": r.config});
                // Reward models only when used: checkpoints written before them still resume.
                if let Some(m) = &r.model {
                    v["model"] = json!(m);
                    v["adapter"] = json!(r.adapter);
                }
                v
            }).collect::<Vec<_>>(),
        });
        let mut flat = std::collections::BTreeMap::new();
        flatten("", &record, &mut flat);
        // The video keys only when set: checkpoints written before they existed still resume.
        for (key, value) in [
            ("video_fps", d.video_fps.map(|v| json!(v))),
            ("video_nframes", d.video_nframes.map(|v| json!(v))),
            ("video_min_frames", d.video_min_frames.map(|v| json!(v))),
            ("video_max_frames", d.video_max_frames.map(|v| json!(v))),
            ("video_min_pixels", d.video_min_pixels.map(|v| json!(v))),
            ("video_max_pixels", d.video_max_pixels.map(|v| json!(v))),
            ("video_total_pixels", d.video_total_pixels.map(|v| json!(v))),
        ] {
            if let Some(v) = value {
                flat.insert(format!("data.{key}"), v);
            }
        }
        // The registry keys only when set: checkpoints written before them still resume.
        flat.extend(crate::data::registry::record(d));
        flat
    }

    /// The memory plugin's `optimizer_json`.
    pub fn optimizer_json(&self) -> String {
        let o = &self.optimizer;
        serde_json::json!({
            "betas": o.betas,
            "eps": o.eps,
            "weight_decay": o.weight_decay,
            "max_grad_norm": o.max_grad_norm,
            "amsgrad": o.amsgrad,
        })
        .to_string()
    }
}

/// serde_yaml's message without the " at line L column C" it ends with (said before it).
fn yaml_message(e: &serde_yaml::Error) -> String {
    let m = e.to_string();
    match m.rfind(" at line ") {
        Some(i) if m[i..].contains(" column ") => m[..i].to_string(),
        _ => m,
    }
}

/// `{"a": {"b": 1}}` → `a.b: 1`; a plugin section's own keys are leaves too (`adapter.r`).
fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut std::collections::BTreeMap<String, serde_json::Value>,
) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        _ => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "model: m\noutput_dir: out\nadapter: {plugin: lora, r: 8}\ndata: {plugin: alpaca, path: d.json}\n";

    #[test]
    fn defaults_and_plugin_sections() {
        let c = TrainConfig::from_yaml(MINIMAL).unwrap();
        let a = c.adapter.as_ref().unwrap();
        assert_eq!(a.plugin, "lora");
        assert_eq!(a.config_json(), r#"{"r":8}"#);
        assert_eq!(c.finetuning(), Finetuning::Adapter);
        assert_eq!(c.objective.plugin, "sft");
        assert_eq!(c.memory.plugin, "single");
        assert_eq!(c.scheduler.kind, ScheduleKind::Cosine);
        assert_eq!(c.training.micro_batch_size, 2);
        assert!(c.optimizer_json().contains("\"max_grad_norm\":1.0"));
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e =
            TrainConfig::from_yaml(&format!("{MINIMAL}lerning_rate: 1\n")).unwrap_err().to_string();
        assert!(e.contains("unknown field `lerning_rate`"), "{e}");
        let e =
            TrainConfig::from_yaml(&format!("{MINIMAL}training: {{epochs: 1, micro_batch: 4}}\n"))
                .unwrap_err()
                .to_string();
        assert!(e.contains("training") && e.contains("micro_batch"), "{e}");
        let e = TrainConfig::from_yaml(&format!("{MINIMAL}scheduler: {{type: exponential}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("scheduler.type") && e.contains("exponential"), "{e}");
        let e = TrainConfig::from_yaml(&format!(
            "{MINIMAL}training: {{gradient_accumulation_steps: 0}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("gradient_accumulation_steps"), "{e}");
        let e = TrainConfig::from_yaml("model: m\noutput_dir: o\ndata: {plugin: a, path: p}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config key `adapter`: missing") && e.contains("finetuning: full"),
            "{e}"
        );
    }

    #[test]
    fn finetuning_modes_and_their_keys() {
        const FULL: &str =
            "model: m\noutput_dir: out\nfinetuning: full\ndata: {plugin: alpaca, path: d.json}\n";
        let c = TrainConfig::from_yaml(FULL).unwrap();
        assert_eq!(c.finetuning(), Finetuning::Full);
        assert!(c.adapter.is_none());
        assert!(
            !c.vision.tower_frozen(Finetuning::Full) && c.vision.merger_trained(Finetuning::Full)
        );
        assert!(c.vision.tower_frozen(Finetuning::Adapter));
        let e = TrainConfig::from_yaml(&format!("{FULL}adapter: {{plugin: lora}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config key `adapter`") && e.contains("finetuning: full"), "{e}");
        let e = TrainConfig::from_yaml(&format!("{FULL}freeze: {{trainable_layers: 1}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config key `freeze`"), "{e}");
        let e = TrainConfig::from_yaml(&format!("{FULL}quantization: {{plugin: nf4}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config key `quantization`"), "{e}");
        let freeze = FULL.replace("full", "freeze");
        let f = TrainConfig::from_yaml(&freeze).unwrap().freeze_config();
        assert_eq!((f.trainable_layers, f.trainable_modules.is_all()), (2, true));
        let f = TrainConfig::from_yaml(&format!(
            "{freeze}freeze: {{trainable_layers: -1, trainable_modules: 'mlp, self_attn', extra_modules: [norm]}}\n"
        ))
        .unwrap()
        .freeze_config();
        assert_eq!(f.trainable_modules.0, ["mlp", "self_attn"]);
        assert_eq!(
            (f.trainable_layers, f.extra_modules.0.as_slice()),
            (-1, ["norm".to_string()].as_slice())
        );
        let e = TrainConfig::from_yaml(&format!("{freeze}freeze: {{trainable_layers: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config key `freeze.trainable_layers`"), "{e}");
        let e = TrainConfig::from_yaml(&format!("{freeze}finetuning: bogus\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("finetuning"), "{e}");
        let r = TrainConfig::from_yaml(FULL).unwrap().training_record();
        assert_eq!(r["finetuning"], serde_json::json!("full"));
    }

    #[test]
    fn packing_and_length_grouping_exclude_each_other() {
        let c = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert!(!c.data.packing && !c.data.group_by_length);
        let both = MINIMAL.replace("d.json}", "d.json, packing: true, group_by_length: true}");
        let e = TrainConfig::from_yaml(&both).unwrap_err().to_string();
        assert!(e.contains("data.packing") && e.contains("data.group_by_length"), "{e}");
        let one = MINIMAL.replace("d.json}", "d.json, packing: true}");
        assert!(TrainConfig::from_yaml(&one).unwrap().data.packing);
    }

    #[test]
    fn zero_step_counts_f16_and_zero_eps_are_refused_by_key() {
        for key in [
            "logging_steps",
            "save_steps",
            "eval_steps",
            "save_total_limit",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "max_steps",
            "max_nonfinite_steps",
        ] {
            let e = TrainConfig::from_yaml(&format!("{MINIMAL}training: {{{key}: 0}}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`training.{key}`")) && e.contains("at least 1"), "{e}");
        }
        let e = TrainConfig::from_yaml(&format!("{MINIMAL}dtype: f16\n")).unwrap_err().to_string();
        assert!(e.contains("`dtype`") && e.contains("f32 or bf16"), "{e}");
        assert!(TrainConfig::from_yaml(&format!("{MINIMAL}dtype: bf16\n")).is_ok());
        let e = TrainConfig::from_yaml(&format!("{MINIMAL}optimizer: {{eps: 0}}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`optimizer.eps`") && e.contains("positive"), "{e}");
        let c = TrainConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.training.on_nonfinite, OnNonFinite::Stop);
        assert_eq!(c.training.max_nonfinite_steps, 3);
        assert!(!c.training.overwrite_output_dir);
    }

    #[test]
    fn yaml_syntax_errors_name_the_line_and_column() {
        let e = TrainConfig::parse("model: m\noutput_dir: o\noptimizer: {lr: 1}}\n", "cfg.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cfg.yaml line 3 column "), "{e}");
        assert!(!e.contains("config key") && !e.contains(" at line "), "{e}");
        let e = TrainConfig::parse("model: m\n  bad: : x\n", "cfg.yaml").unwrap_err().to_string();
        assert!(e.starts_with("cfg.yaml line 2 column "), "{e}");
        // A key error still names the key (and the file).
        let e =
            TrainConfig::parse(&format!("{MINIMAL}seed: x\n"), "cfg.yaml").unwrap_err().to_string();
        assert!(e.contains("in cfg.yaml: config key `seed`: invalid type"), "{e}");
    }

    /// `data.video_*`: applied over the model's video settings, checked by name, and in the
    /// training record only when set.
    #[test]
    fn video_keys_apply_check_and_record() {
        let cfg = |data: &str| {
            MINIMAL.replace(
                "data: {plugin: alpaca, path: d.json}",
                &format!("data: {{plugin: alpaca, path: d.json{data}}}"),
            )
        };
        let c = TrainConfig::from_yaml(&cfg(
            ", video_fps: 1.0, video_max_frames: 16, video_max_pixels: 50176",
        ))
        .unwrap();
        let o = c.data.video_options(crate::vision::VideoOptions::default()).unwrap();
        assert_eq!((o.fps, o.max_frames, o.max_pixels, o.min_frames), (1.0, 16, 50176, 4));
        let r = c.training_record();
        assert_eq!(r["data.video_fps"], 1.0);
        assert!(!TrainConfig::from_yaml(MINIMAL)
            .unwrap()
            .training_record()
            .contains_key("data.video_fps"));
        let e = TrainConfig::from_yaml(&cfg(", video_fps: -2")).unwrap_err();
        assert!(format!("{e:#}").contains("data.video_fps"), "{e:#}");
        let e =
            TrainConfig::from_yaml(&cfg(", video_min_frames: 9, video_max_frames: 4")).unwrap_err();
        assert!(format!("{e:#}").contains("min_frames"), "{e:#}");
    }

    #[test]
    fn the_training_record_holds_what_changes_training_only() {
        let a = TrainConfig::from_yaml(MINIMAL).unwrap().training_record();
        assert_eq!(a["adapter.r"], serde_json::json!(8));
        assert_eq!(a["optimizer.lr"], serde_json::json!(2e-4));
        assert_eq!(a["data.cutoff_len"], serde_json::json!(1024));
        let cadence = format!(
            "{MINIMAL}training: {{logging_steps: 5, save_steps: 3, progress_bar: false}}\n"
        );
        assert_eq!(TrainConfig::from_yaml(&cadence).unwrap().training_record(), a);
        let lr = MINIMAL.replace("r: 8}", "r: 4}");
        let b = TrainConfig::from_yaml(&lr).unwrap().training_record();
        let differ: Vec<_> = a.keys().filter(|k| a[*k] != b[*k]).collect();
        assert_eq!(differ, ["adapter.r"]);
    }
}
