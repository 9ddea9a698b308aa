//! What the on-policy objectives (`grpo`, `ppo`) share for a rollout from a prompts batch:
//! the unpadded prompts, sampling completions through the host (with each prompt row's images
//! and videos), the reward plugins' scores and their weighted sum, and padding the completions
//! into tensors.
use ferrotune_plugin_api::kinds::objective::{
    vision_counts, IMAGES_PER_PROMPT, PROMPT_ROWS, VIDEOS_PER_PROMPT,
};
use ferrotune_plugin_api::prelude::*;

use crate::common::{get_2d, Meta};
use crate::losses::{group_advantages, ScaleRewards};

/// A prompts batch (`prompt_ids`, `prompt_mask` `[B, P]`, left-padded) as the host collates it.
pub struct Prompts<'a> {
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
    /// Each row's prompt tokens, padding removed.
    pub rows: Vec<Vec<i64>>,
    /// Each row's image / video counts ([`IMAGES_PER_PROMPT`], [`VIDEOS_PER_PROMPT`]), when
    /// the batch holds vision inputs.
    pub images_per_prompt: Option<Vec<usize>>,
    pub videos_per_prompt: Option<Vec<usize>>,
}

impl<'a> Prompts<'a> {
    pub fn from_batch(batch: &'a Batch, meta: &Meta) -> PluginResult<Self> {
        let ids = get_2d(batch, "prompt_ids", None, None)?;
        let (b, p) = (ids.size()[0], ids.size()[1]);
        let mask = get_2d(batch, "prompt_mask", Some(b), Some(p))?;
        let ids_cpu = ids.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?;
        let mask_cpu = mask.f_to_device(Device::Cpu)?.f_ne(0)?;
        let mut rows = Vec::with_capacity(b as usize);
        for row in 0..b {
            let ids = Vec::<i64>::try_from(&ids_cpu.get(row))?;
            let m = Vec::<bool>::try_from(&mask_cpu.get(row))?;
            rows.push(ids.into_iter().zip(m).filter(|(_, k)| *k).map(|(i, _)| i).collect());
        }
        Ok(Self {
            ids,
            mask,
            rows,
            images_per_prompt: vision_counts(&meta.value, IMAGES_PER_PROMPT)?,
            videos_per_prompt: vision_counts(&meta.value, VIDEOS_PER_PROMPT)?,
        })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn has_vision(&self) -> bool {
        self.images_per_prompt.is_some() || self.videos_per_prompt.is_some()
    }

    /// Samples one completion per entry of `rows` (the batch row each prompt comes from) with
    /// the sampling `options` (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`).
    /// Prompts with images or videos are generated with their row's vision inputs, named by
    /// row ([`PROMPT_ROWS`]: pixels cannot travel in the options JSON).
    pub fn generate(
        &self,
        ctx: &dyn ObjectiveContext,
        rows: &[usize],
        mut options: serde_json::Value,
    ) -> PluginResult<Vec<Vec<i64>>> {
        let prompts: Vec<Vec<i64>> = rows.iter().map(|&r| self.rows[r].clone()).collect();
        if self.has_vision() {
            options[PROMPT_ROWS] = serde_json::json!(rows);
        }
        let completions = ctx.generate(&prompts, &options.to_string())?;
        if completions.len() != prompts.len() {
            return Err(PluginError::invalid(format!(
                "generate returned {} completions for {} prompts",
                completions.len(),
                prompts.len()
            )));
        }
        Ok(completions)
    }

    /// The reward plugins' inputs for `completions` of prompt `rows`: the rendered prompt and
    /// the canonical sample of each row from the metadata (`prompts`, `samples`) when the host
    /// put them there (else the prompt ids decoded, and `{}`), and the decoded completion.
    pub fn reward_inputs(
        &self,
        ctx: &dyn ObjectiveContext,
        meta: &Meta,
        rows: &[usize],
        completions: &[Vec<i64>],
    ) -> PluginResult<Vec<RewardInput>> {
        let texts = |key: &str| -> Option<Vec<serde_json::Value>> {
            meta.value.get(key).and_then(|v| v.as_array()).cloned()
        };
        let (prompt_texts, samples) = (texts("prompts"), texts("samples"));
        for (key, v) in [("prompts", &prompt_texts), ("samples", &samples)] {
            if let Some(v) = v {
                if v.len() != self.len() {
                    return Err(PluginError::invalid(format!(
                        "batch metadata `{key}` has {} entries for {} prompts",
                        v.len(),
                        self.len()
                    )));
                }
            }
        }
        let mut inputs = Vec::with_capacity(completions.len());
        for (&row, comp) in rows.iter().zip(completions) {
            let prompt = match &prompt_texts {
                Some(v) => {
                    v[row].as_str().map(str::to_string).unwrap_or_else(|| v[row].to_string())
                }
                None => ctx.decode(&self.rows[row])?,
            };
            let sample_json =
                samples.as_ref().map_or_else(|| "{}".to_string(), |v| v[row].to_string());
            inputs.push(RewardInput { prompt, completion: ctx.decode(comp)?, sample_json });
        }
        Ok(inputs)
    }
}

/// Named metrics, as [`LossOutput::metrics`].
pub type Metrics = Vec<(String, f64)>;

/// The run's reward plugins' scores of some completions.
pub struct RewardTable {
    pub names: Vec<String>,
    pub weights: Vec<f64>,
    pub per_func: Vec<Vec<f64>>,
}

impl RewardTable {
    /// Scores `inputs` with every reward plugin of the run ([`ObjectiveContext::rewards`]).
    pub fn score(ctx: &dyn ObjectiveContext, inputs: &[RewardInput]) -> PluginResult<Self> {
        let scores = ctx.rewards(inputs)?;
        Ok(Self {
            names: scores.iter().map(|s| s.name.clone()).collect(),
            weights: scores.iter().map(|s| s.weight).collect(),
            per_func: scores.into_iter().map(|s| s.scores).collect(),
        })
    }

    /// Each completion's weighted sum Σ weight · score (checked: one finite score per
    /// completion from every reward), with the metrics `rewards/<name>/mean`,
    /// `rewards/<name>/std`, `reward` and `reward_std`.
    pub fn weighted(&self) -> PluginResult<(Vec<f64>, Metrics)> {
        if self.per_func.is_empty() {
            return Err(PluginError::invalid(
                "the host returned no reward scores: the run needs at least one reward (a reward plugin or a reward model)",
            ));
        }
        // Groups of one: the sums and metrics of GRPO's advantages, without the grouping.
        let adv =
            group_advantages(&self.per_func, &self.names, &self.weights, 1, ScaleRewards::None)?;
        let metrics =
            adv.metrics.into_iter().filter(|(n, _)| n != "frac_reward_zero_std").collect();
        Ok((adv.rewards, metrics))
    }
}

/// Completions right-padded with `pad` to their longest (at least 1): ids and a 0/1 mask,
/// `[N, C]` int64 on `device`.
pub fn pad_completions(
    completions: &[Vec<i64>],
    pad: i64,
    device: Device,
) -> PluginResult<(Tensor, Tensor)> {
    let c = completions.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let n = completions.len();
    let (mut ids, mut mask) = (vec![pad; n * c], vec![0i64; n * c]);
    for (i, comp) in completions.iter().enumerate() {
        ids[i * c..i * c + comp.len()].copy_from_slice(comp);
        mask[i * c..i * c + comp.len()].fill(1);
    }
    let shape = [n as i64, c as i64];
    Ok((
        Tensor::from_slice(&ids).f_view(shape)?.f_to_device(device)?,
        Tensor::from_slice(&mask).f_view(shape)?.f_to_device(device)?,
    ))
}

/// `completions/mean_length`, `/min_length`, `/max_length` in tokens.
pub fn length_metrics(completions: &[Vec<i64>]) -> Vec<(String, f64)> {
    let lengths: Vec<f64> = completions.iter().map(|c| c.len() as f64).collect();
    vec![
        (
            "completions/mean_length".into(),
            lengths.iter().sum::<f64>() / lengths.len().max(1) as f64,
        ),
        ("completions/min_length".into(), lengths.iter().cloned().fold(f64::INFINITY, f64::min)),
        ("completions/max_length".into(), lengths.iter().cloned().fold(0.0, f64::max)),
    ]
}

/// The batch's `pad_token_id` metadata (the prompts collate's), default 0.
pub fn pad_token_id(meta: &Meta) -> i64 {
    meta.value.get("pad_token_id").and_then(|v| v.as_i64()).unwrap_or(0)
}
