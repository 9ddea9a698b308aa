//! The policy model as objective plugins see it ([`PolicyContext`]: forward, generate,
//! decode, rewards; [`BatchContext`] during a micro-batch, whose prompts generate with their
//! images), and the run's reward plugins.
use anyhow::{Context, Result};
use ferrotune_plugin_api::kinds::objective::{
    select_prompt_rows, vision_counts, ObjectiveContext, RewardScores, IMAGES_PER_PROMPT,
    PROMPT_ROWS, VIDEOS_PER_PROMPT,
};
use ferrotune_plugin_api::kinds::reward::RewardHandle;
use ferrotune_plugin_api::{
    Batch, ForwardFlags, PluginError, PluginResult, Reward, RewardInput, SCORES, TARGET_IDS,
    TARGET_TEMPERATURE, VALUES,
};
use tch::Tensor;

use super::config::TrainConfig;
use super::reward_model::RewardModel;
use crate::data;
use crate::model::target::{target_logps, TargetOptions};
use crate::model::{ForwardArgs, VideoInputs, VisionInputs};
use crate::peft::PeftModel;
use crate::plugins::Registry;
use crate::text::Tokenizer;

/// A reward of the run, with its name and weight.
pub struct LoadedReward {
    pub name: String,
    pub weight: f64,
    pub source: RewardSource,
}

/// What scores a reward's completions.
pub enum RewardSource {
    Plugin(RewardHandle),
    Model(Box<RewardModel>),
}

impl LoadedReward {
    /// One score per input.
    pub fn score(&self, inputs: &[RewardInput]) -> PluginResult<Vec<f64>> {
        match &self.source {
            RewardSource::Plugin(h) => h.score(inputs),
            RewardSource::Model(m) => {
                m.score(inputs).map_err(|e| PluginError::runtime(format!("{e:#}")))
            }
        }
    }
}

/// Loads the run's rewards (`rewards:`): reward plugins, and reward models on `device` in the
/// run's dtype.
pub fn load_rewards(cfg: &TrainConfig, registry: &Registry) -> Result<Vec<LoadedReward>> {
    let device = crate::dist::resolve_for_rank(&cfg.device)?;
    let dtype = crate::model::init::parse_dtype(&cfg.dtype)?;
    cfg.rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let source = match &r.model {
                Some(dir) => RewardSource::Model(Box::new(
                    RewardModel::load(
                        dir,
                        r.adapter.as_deref(),
                        device,
                        dtype,
                        registry,
                        cfg.data.cutoff_len,
                    )
                    .with_context(|| format!("config key `rewards[{i}]`"))?,
                )),
                None => RewardSource::Plugin(
                    registry
                        .reward(&r.plugin, &r.config_json())
                        .with_context(|| format!("config key `rewards[{i}]`"))?,
                ),
            };
            Ok(LoadedReward { name: r.display_name().to_string(), weight: r.weight, source })
        })
        .collect()
}

/// The model as objectives see it.
pub struct PolicyContext<'a> {
    pub model: &'a PeftModel,
    pub tokenizer: &'a Tokenizer,
    /// Dropout on (training steps) or off (eval, reference passes are the objective's call).
    pub train: bool,
    /// The run's reward plugins (GRPO).
    pub rewards: &'a [LoadedReward],
    /// Prompt plus generated tokens stay within this many (`data.cutoff_len`).
    pub max_len: usize,
    /// The frozen reference model of a run whose own weights train (`finetuning: full |
    /// freeze`): a pass with `DISABLE_ADAPTER` runs it. `None`: the policy with its adapter
    /// disabled is the reference (an adapter run).
    pub reference: Option<&'a PeftModel>,
}

fn generation_options(options_json: &str) -> PluginResult<serde_json::Value> {
    serde_json::from_str(if options_json.trim().is_empty() { "{}" } else { options_json })
        .map_err(|e| PluginError::invalid(format!("generation options: {e}")))
}

impl PolicyContext<'_> {
    /// Generates completions for `prompts` (token ids) under the sampling options `opts`
    /// (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`), with `images` the
    /// prompts' vision inputs in prompt order (each prompt's images fill its image-pad blocks).
    pub fn generate_with(
        &self,
        prompts: &[Vec<i64>],
        images: Option<&VisionInputs>,
        opts: &serde_json::Value,
    ) -> PluginResult<Vec<Vec<i64>>> {
        let mut p = crate::generate::SamplingParams::greedy(
            opts["max_new_tokens"].as_u64().unwrap_or(64) as usize,
        );
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
        p.pad_token_id =
            self.tokenizer.pad_token_id().or(self.tokenizer.eos_token_id()).unwrap_or(0);
        // Sampling records no graph (an objective calls this inside its loss, with gradients on).
        tch::no_grad(|| crate::generate::generate_mm(self.model, prompts, images, &p))
            .map_err(|e| PluginError::runtime(format!("{e:#}")))
    }
}

/// The policy during one micro-batch: [`PolicyContext`] plus the batch, so that prompts of a
/// batch with images generate with their images. The plugin API's `generate` takes token ids
/// and a JSON of options, and pixels cannot travel as JSON; rather than a new method (a new
/// plugin-API series), an objective names, in the options' `prompt_rows`
/// ([`PROMPT_ROWS`]), the batch row each prompt comes from, and the host, which holds the
/// batch, selects those rows' images and videos ([`select_prompt_rows`], the same selection
/// GRPO applies to its forward inputs). Plugins built before it keep working: without
/// `prompt_rows`, a batch with no vision inputs generates as before, and one with images is
/// refused by name.
pub struct BatchContext<'c, 'a> {
    pub policy: &'c PolicyContext<'a>,
    pub batch: &'c Batch,
}

impl<'c, 'a> BatchContext<'c, 'a> {
    pub fn new(policy: &'c PolicyContext<'a>, batch: &'c Batch) -> Self {
        Self { policy, batch }
    }

    /// The prompts' vision inputs for `rows` of the batch, `None` when they hold none.
    fn vision_for_rows(&self, rows: &[usize]) -> PluginResult<Option<VisionInputs>> {
        let meta: serde_json::Value = if self.batch.meta_json.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&self.batch.meta_json)
                .map_err(|e| PluginError::invalid(format!("batch metadata: {e}")))?
        };
        let prompts = self.batch.get("prompt_ids")?.size()[0] as usize;
        let vision: Vec<(String, Tensor)> = self
            .batch
            .tensors
            .iter()
            .filter(|(n, _)| VISION_INPUTS.contains(&n.as_str()))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let images = vision_counts(&meta, IMAGES_PER_PROMPT)?;
        let videos = vision_counts(&meta, VIDEOS_PER_PROMPT)?;
        let chosen =
            select_prompt_rows(&vision, prompts, images.as_deref(), videos.as_deref(), rows)?;
        let get = |name: &str| chosen.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        vision_inputs(&get).map_err(|e| PluginError::invalid(format!("{e:#}")))
    }
}

/// The batch tensors that carry images and videos.
pub const VISION_INPUTS: [&str; 5] = [
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
];

impl ObjectiveContext for BatchContext<'_, '_> {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        self.policy.forward(inputs, flags)
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let opts = generation_options(options_json)?;
        let has_vision =
            self.batch.tensors.iter().any(|(n, _)| VISION_INPUTS.contains(&n.as_str()));
        let images = match opts.get(PROMPT_ROWS) {
            None if has_vision => {
                return Err(PluginError::unsupported(format!(
                    "the batch's prompts hold images or videos, and the objective's generate call does not say which prompt comes from which row (generation option `{PROMPT_ROWS}`); rebuild the objective plugin against this host"
                )))
            }
            None => None,
            Some(v) => {
                let rows: Vec<usize> = v
                    .as_array()
                    .and_then(|a| a.iter().map(|r| r.as_u64().map(|r| r as usize)).collect())
                    .ok_or_else(|| {
                        PluginError::invalid(format!(
                            "generation option `{PROMPT_ROWS}` must be a list of row indices, got {v}"
                        ))
                    })?;
                if rows.len() != prompts.len() {
                    return Err(PluginError::invalid(format!(
                        "generation option `{PROMPT_ROWS}` has {} rows for {} prompts",
                        rows.len(),
                        prompts.len()
                    )));
                }
                self.vision_for_rows(&rows)?
            }
        };
        self.policy.generate_with(prompts, images.as_ref(), &opts)
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        self.policy.decode(ids)
    }
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        self.policy.rewards(inputs)
    }
}

impl ObjectiveContext for PolicyContext<'_> {
    fn forward(
        &self,
        inputs: &[(String, Tensor)],
        flags: ForwardFlags,
    ) -> PluginResult<Vec<(String, Tensor)>> {
        let get = |name: &str| inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let ids =
            get("input_ids").ok_or_else(|| PluginError::invalid("forward needs `input_ids`"))?;
        let mask = get("attention_mask");
        let images = vision_inputs(&get).map_err(|e| PluginError::invalid(format!("{e:#}")))?;
        let targets = if flags.contains(ForwardFlags::TARGET_LOGPS) {
            let ids = get(TARGET_IDS).ok_or_else(|| {
                PluginError::invalid(format!("forward with TARGET_LOGPS needs `{TARGET_IDS}`"))
            })?;
            let temperature = match get(TARGET_TEMPERATURE) {
                Some(t) => t.f_double_value(&[]).map_err(|e| {
                    PluginError::invalid(format!("`{TARGET_TEMPERATURE}` must be a scalar: {e}"))
                })?,
                None => 1.0,
            };
            let entropy = flags.contains(ForwardFlags::TARGET_ENTROPY);
            Some((ids, TargetOptions { temperature, entropy }))
        } else {
            None
        };
        // The reference pass: a frozen copy when the run trains the model's own weights.
        let model = match self.reference {
            Some(reference) if flags.contains(ForwardFlags::DISABLE_ADAPTER) => reference,
            _ => self.model,
        };
        let mode = model.mode(flags, self.train);
        let run = || -> anyhow::Result<Vec<(String, Tensor)>> {
            let args = ForwardArgs::ids(ids)
                .mask(mask)
                .positions(get("position_ids"))
                .images(images.as_ref())
                .mode(mode);
            let (scores, values) =
                (flags.contains(ForwardFlags::SCORES), flags.contains(ForwardFlags::VALUES));
            if targets.is_none() && !scores && !values {
                return Ok(vec![("logits".to_string(), model.forward(args)?)]);
            }
            // One pass to the last hidden state; the heads asked for read it.
            let hidden = model.forward(args.hidden())?;
            let mut named = Vec::new();
            if let Some((target_ids, opts)) = &targets {
                let out = target_logps(model.lm_head(), mode, &hidden, target_ids, *opts)?;
                named.push(("target_logps".to_string(), out.logps));
                named.push(("target_correct".to_string(), out.correct));
                named.extend(out.entropy.map(|e| ("target_entropy".to_string(), e)));
            }
            if scores {
                named.push((SCORES.to_string(), model.scores(&hidden, mode)?));
            }
            if values {
                named.push((VALUES.to_string(), model.values(&hidden)?));
            }
            Ok(named)
        };
        let out = if flags.contains(ForwardFlags::NO_GRAD) { tch::no_grad(run) } else { run() };
        out.map_err(|e| PluginError::runtime(format!("{e:#}")))
    }
    fn generate(&self, prompts: &[Vec<i64>], options_json: &str) -> PluginResult<Vec<Vec<i64>>> {
        let opts = generation_options(options_json)?;
        if opts.get(PROMPT_ROWS).is_some() {
            return Err(PluginError::invalid(format!(
                "generation option `{PROMPT_ROWS}` names rows of a batch, and this context has none"
            )));
        }
        self.generate_with(prompts, None, &opts)
    }
    fn decode(&self, ids: &[i64]) -> PluginResult<String> {
        self.tokenizer.decode(ids, true).map_err(|e| PluginError::runtime(format!("{e:#}")))
    }
    fn rewards(&self, inputs: &[RewardInput]) -> PluginResult<Vec<RewardScores>> {
        if self.rewards.is_empty() {
            return Err(PluginError::unsupported(
                "this run configures no reward plugins (add a `rewards:` list to the config)",
            ));
        }
        self.rewards
            .iter()
            .map(|r| {
                let scores =
                    r.score(inputs).map_err(|e| e.context(format!("reward `{}`", r.name)))?;
                Ok(RewardScores { name: r.name.clone(), weight: r.weight, scores })
            })
            .collect()
    }
}

/// The images and videos among a forward's named inputs (`pixel_values` + `image_grid_thw`,
/// `pixel_values_videos` + `video_grid_thw` [+ `second_per_grid_ts`]), `None` without any.
pub fn vision_inputs<'t>(
    get: &dyn Fn(&str) -> Option<&'t Tensor>,
) -> anyhow::Result<Option<VisionInputs>> {
    let images = match (get("pixel_values"), get("image_grid_thw")) {
        (Some(pv), Some(grid)) => Some((pv.shallow_clone(), data::images::grids_of(grid)?)),
        (None, None) => None,
        _ => anyhow::bail!("forward needs both `pixel_values` and `image_grid_thw`, or neither"),
    };
    let videos = match (get("pixel_values_videos"), get("video_grid_thw")) {
        (Some(pv), Some(grid)) => Some(VideoInputs {
            pixel_values: pv.shallow_clone(),
            grid_thw: data::images::grids_of(grid)?,
            second_per_grid_ts: match get("second_per_grid_ts") {
                Some(t) => Vec::<f64>::try_from(&t.f_to_kind(tch::Kind::Double)?.f_reshape([-1])?)?,
                None => Vec::new(),
            },
        }),
        (None, None) => None,
        _ => anyhow::bail!(
            "forward needs both `pixel_values_videos` and `video_grid_thw`, or neither"
        ),
    };
    Ok(match (images, videos) {
        (None, None) => None,
        (images, videos) => {
            let (pixel_values, image_grid_thw) = match images {
                Some(i) => i,
                None => {
                    let width = videos.as_ref().map_or(0, |v| v.pixel_values.size()[1]);
                    let like = videos.as_ref().map(|v| &v.pixel_values).unwrap();
                    (Tensor::f_zeros([0, width], (like.kind(), like.device()))?, Vec::new())
                }
            };
            Some(VisionInputs { pixel_values, image_grid_thw, videos })
        }
    })
}
