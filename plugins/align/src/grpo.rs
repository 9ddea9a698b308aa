//! `grpo`: Group Relative Policy Optimization, as TRL 1.16's `GRPOTrainer`: completions are
//! sampled in groups per prompt, scored by the run's reward plugins, turned into
//! group-relative advantages, and trained with a clipped policy-gradient loss (plus a k3 KL
//! to the reference when `beta ≠ 0`).
use ferrotune_plugin_api::kinds::objective::select_prompt_rows;
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::target_logps;
use schemars::JsonSchema;
use serde::Deserialize;
use std::cell::Cell;

use crate::common::{bool_mask, check_loss, ensure_finite, get_2d, model_inputs, Meta};
use crate::losses::{group_advantages, grpo_loss, GrpoLossType, GrpoParams, ScaleRewards};
use crate::rollout::{length_metrics, pad_completions, pad_token_id, Prompts, RewardTable};

/// Tensor names of the GRPO batch that are not model inputs.
pub const GRPO_NON_MODEL_KEYS: [&str; 7] = [
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "advantages",
    "old_per_token_logps",
    "ref_per_token_logps",
];

/// Configuration (`objective: {plugin: grpo, ...}`), TRL's `GRPOConfig` names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// KL coefficient. Default 0.0 (no reference pass); DeepSeek-R1 used 0.001.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub beta: f64,
    /// Lower clipping ε of the importance ratio. Default 0.2.
    #[serde(default = "default_epsilon")]
    #[schemars(range(min = 0))]
    pub epsilon: f64,
    /// Upper clipping ε; default = `epsilon` (DAPO recommends 0.28).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub epsilon_high: Option<f64>,
    /// Two-sided clipping: upper bound of the unclipped ratio (INTELLECT-2). Default off;
    /// should exceed 1 + ε.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 1))]
    pub delta: Option<f64>,
    /// `dapo` (default, TRL's), `grpo`, `dr_grpo` or `bnpo`: how token losses are averaged.
    #[serde(default = "default_loss_type")]
    #[schemars(extend("enum" = ["dapo", "grpo", "dr_grpo", "bnpo"]))]
    pub loss_type: String,
    /// Completions sampled per prompt (group size). Default 8; at least 2.
    #[serde(default = "default_num_generations")]
    #[schemars(range(min = 2))]
    pub num_generations: usize,
    /// Longest completion generated, and `dr_grpo`'s normaliser. Default 512.
    #[serde(default = "default_max_completion_length")]
    #[schemars(range(min = 1))]
    pub max_completion_length: i64,
    /// Sampling temperature; the log-probabilities are of `logits / temperature` as in TRL.
    /// Default 1.0.
    #[serde(default = "one")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub temperature: f64,
    /// Nucleus sampling. Default 1.0 (off).
    #[serde(default = "one")]
    #[schemars(extend("exclusiveMinimum" = 0), range(max = 1))]
    pub top_p: f64,
    /// Top-k sampling. Default 0 (off).
    #[serde(default)]
    pub top_k: u64,
    /// `group` / `true` (default): divide by each group's reward std; `batch`: by the batch's;
    /// `none` / `false`: no scaling (Dr. GRPO).
    #[serde(default = "default_scale_rewards")]
    #[schemars(schema_with = "scale_rewards_schema")]
    pub scale_rewards: serde_json::Value,
    /// Base seed of the sampling; each generation call adds its index.
    #[serde(default)]
    pub seed: u64,
}

fn scale_rewards_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["group", "batch", "none"]}]
    })
}

fn default_epsilon() -> f64 {
    0.2
}
fn default_loss_type() -> String {
    "dapo".into()
}
fn default_num_generations() -> usize {
    8
}
fn default_max_completion_length() -> i64 {
    512
}
fn one() -> f64 {
    1.0
}
fn default_scale_rewards() -> serde_json::Value {
    serde_json::Value::String("group".into())
}

pub struct Grpo {
    pub cfg: GrpoConfig,
    params: GrpoParams,
    scale: ScaleRewards,
    generation_calls: Cell<u64>,
    /// Generation batches kept for the later iterations of `num_iterations` (batch metadata),
    /// by micro-batch index.
    rollouts: Vec<(u64, Scored)>,
}

impl Plugin for Grpo {
    const NAME: &'static str = "grpo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "GRPO: group-relative advantages from reward plugins, clipped policy gradient (TRL's GRPOTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<GrpoConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: GrpoConfig = parse_config(config_json)?;
        if !cfg.beta.is_finite() || cfg.beta < 0.0 {
            return Err(PluginError::config(
                "beta",
                format!("must be a non-negative number, got {}", cfg.beta),
            ));
        }
        let epsilon_high = cfg.epsilon_high.unwrap_or(cfg.epsilon);
        for (key, v) in [("epsilon", cfg.epsilon), ("epsilon_high", epsilon_high)] {
            if !v.is_finite() || v < 0.0 {
                return Err(PluginError::config(
                    key,
                    format!("must be a non-negative number, got {v}"),
                ));
            }
        }
        if let Some(d) = cfg.delta {
            if !d.is_finite() || d <= 1.0 {
                return Err(PluginError::config(
                    "delta",
                    format!("must exceed 1 (usually 1 + epsilon or more), got {d}"),
                ));
            }
        }
        let loss_type = GrpoLossType::parse(&cfg.loss_type).ok_or_else(|| {
            PluginError::config(
                "loss_type",
                format!("unknown loss type `{}`; one of grpo, dapo, dr_grpo, bnpo", cfg.loss_type),
            )
        })?;
        if cfg.num_generations < 2 {
            return Err(PluginError::config(
                "num_generations",
                format!(
                    "GRPO needs at least 2 completions per prompt, got {}",
                    cfg.num_generations
                ),
            ));
        }
        if cfg.max_completion_length < 1 {
            return Err(PluginError::config(
                "max_completion_length",
                format!("must be at least 1, got {}", cfg.max_completion_length),
            ));
        }
        if !cfg.temperature.is_finite() || cfg.temperature <= 0.0 {
            return Err(PluginError::config(
                "temperature",
                format!("must be positive, got {}", cfg.temperature),
            ));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(PluginError::config(
                "top_p",
                format!("must lie in (0, 1], got {}", cfg.top_p),
            ));
        }
        let scale = match &cfg.scale_rewards {
            serde_json::Value::Bool(true) => ScaleRewards::Group,
            serde_json::Value::Bool(false) => ScaleRewards::None,
            serde_json::Value::String(s) if s == "group" => ScaleRewards::Group,
            serde_json::Value::String(s) if s == "batch" => ScaleRewards::Batch,
            serde_json::Value::String(s) if s == "none" => ScaleRewards::None,
            other => {
                return Err(PluginError::config(
                    "scale_rewards",
                    format!("one of group, batch, none, true, false; got {other}"),
                ))
            }
        };
        let params = GrpoParams {
            loss_type,
            beta: cfg.beta,
            epsilon_low: cfg.epsilon,
            epsilon_high,
            delta: cfg.delta,
            max_completion_length: cfg.max_completion_length,
        };
        Ok(Self { cfg, params, scale, generation_calls: Cell::new(0), rollouts: Vec::new() })
    }
}

/// A scored GRPO batch: completions with their advantages (TRL's `_compute_loss` inputs).
#[derive(Debug)]
struct Scored {
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    advantages: Tensor,
    old: Option<Tensor>,
    reference: Option<Tensor>,
    extra_inputs: Vec<(String, Tensor)>,
    metrics: Vec<(String, f64)>,
}

impl Scored {
    fn share(&self) -> Scored {
        let sh = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Scored {
            prompt_ids: self.prompt_ids.shallow_clone(),
            prompt_mask: self.prompt_mask.shallow_clone(),
            completion_ids: self.completion_ids.shallow_clone(),
            completion_mask: self.completion_mask.shallow_clone(),
            advantages: self.advantages.shallow_clone(),
            old: sh(&self.old),
            reference: sh(&self.reference),
            extra_inputs: self
                .extra_inputs
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            metrics: self.metrics.clone(),
        }
    }
}

impl Grpo {
    /// Per-token log-probabilities of the completions (`[B, C]`, 0 at masked positions as
    /// TRL's fused head) and, when asked, the per-token entropies (0 at masked positions),
    /// under `logits / temperature`. Only the completion positions reach the model's head.
    fn completion_logps(
        &self,
        ctx: &dyn ObjectiveContext,
        s: &Scored,
        flags: ForwardFlags,
        entropy: bool,
    ) -> PluginResult<(Tensor, Option<Tensor>)> {
        let p = s.prompt_ids.size()[1];
        let c = s.completion_ids.size()[1];
        if p < 1 {
            return Err(PluginError::invalid("GRPO needs at least one prompt token per row"));
        }
        let mut inputs: Vec<(String, Tensor)> =
            s.extra_inputs.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let ids = Tensor::f_cat(
            &[s.prompt_ids.shallow_clone(), s.completion_ids.f_to_device(s.prompt_ids.device())?],
            1,
        )?;
        let mask = Tensor::f_cat(
            &[
                s.prompt_mask.shallow_clone(),
                s.completion_mask
                    .f_to_device(s.prompt_mask.device())?
                    .f_to_kind(s.prompt_mask.kind())?,
            ],
            1,
        )?;
        // Position P − 1 + j scores completion token j; only the completion tokens are targets.
        let device = ids.device();
        let keep = bool_mask(&s.completion_mask, device)?;
        let completion = s
            .completion_ids
            .f_to_device(device)?
            .f_to_kind(Kind::Int64)?
            .f_where_scalarother(&keep, -1)?;
        let b = completion.size()[0];
        let none = |n: i64| Tensor::f_full([b, n], -1, (Kind::Int64, device));
        let targets = Tensor::f_cat(&[none(p - 1)?, completion, none(1)?], 1)?;
        inputs.push(("input_ids".into(), ids));
        inputs.push(("attention_mask".into(), mask));
        let flags = if entropy { flags | ForwardFlags::TARGET_ENTROPY } else { flags };
        let out = target_logps(ctx, &inputs, &targets, self.cfg.temperature, flags)?;
        if out.logps.size() != [b, p + c] {
            return Err(PluginError::invalid(format!(
                "the model's target log-probabilities {:?} do not cover the {} prompt + completion positions",
                out.logps.size(),
                p + c
            )));
        }
        let lp = out.logps.f_narrow(1, p - 1, c)?;
        let ent = match out.entropy {
            Some(e) if entropy => Some(e.f_narrow(1, p - 1, c)?),
            _ => None,
        };
        Ok((lp, ent))
    }

    /// The batch as given: completions already sampled and scored.
    fn scored_from_batch(&self, batch: &Batch) -> PluginResult<Scored> {
        let prompt_ids = get_2d(batch, "prompt_ids", None, None)?;
        let (b, p) = (prompt_ids.size()[0], prompt_ids.size()[1]);
        let prompt_mask = get_2d(batch, "prompt_mask", Some(b), Some(p))?;
        let completion_ids = get_2d(batch, "completion_ids", Some(b), None)?;
        let c = completion_ids.size()[1];
        let completion_mask = get_2d(batch, "completion_mask", Some(b), Some(c))?;
        let advantages = batch.get("advantages")?;
        if advantages.size() != [b] && advantages.size() != [b, c] {
            return Err(PluginError::invalid(format!(
                "batch `advantages` has shape {:?}, expected [{b}] or [{b}, {c}]",
                advantages.size()
            )));
        }
        ensure_finite("batch `advantages`", advantages)?;
        let opt = |name: &str| -> PluginResult<Option<Tensor>> {
            match batch.tensors.iter().find(|(n, _)| n == name) {
                None => Ok(None),
                Some(_) => {
                    let t = get_2d(batch, name, Some(b), Some(c))?;
                    Ok(Some(t.shallow_clone()))
                }
            }
        };
        Ok(Scored {
            prompt_ids: prompt_ids.shallow_clone(),
            prompt_mask: prompt_mask.shallow_clone(),
            completion_ids: completion_ids.shallow_clone(),
            completion_mask: completion_mask.shallow_clone(),
            advantages: advantages.shallow_clone(),
            old: opt("old_per_token_logps")?,
            reference: opt("ref_per_token_logps")?,
            extra_inputs: model_inputs(batch, &GRPO_NON_MODEL_KEYS),
            metrics: Vec::new(),
        })
    }

    /// The batch holds prompts only: sample `num_generations` completions per prompt, score
    /// them with the run's reward plugins and compute the advantages.
    fn rollout(
        &self,
        batch: &Batch,
        meta: &Meta,
        ctx: &dyn ObjectiveContext,
    ) -> PluginResult<Scored> {
        let prompts = Prompts::from_batch(batch, meta)?;
        let (b, g) = (prompts.len(), self.cfg.num_generations);
        let call = self.generation_calls.get();
        self.generation_calls.set(call + 1);
        let options = serde_json::json!({
            "max_new_tokens": self.cfg.max_completion_length,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "top_k": self.cfg.top_k,
            "seed": self.cfg.seed.wrapping_add(call),
        });
        // Each prompt's rows repeat g times, grouped per prompt.
        let rows: Vec<usize> = (0..b).flat_map(|r| std::iter::repeat_n(r, g)).collect();
        let completions = prompts.generate(ctx, &rows, options)?;
        let inputs = prompts.reward_inputs(ctx, meta, &rows, &completions)?;
        let table = RewardTable::score(ctx, &inputs)?;
        let adv = group_advantages(&table.per_func, &table.names, &table.weights, g, self.scale)?;
        let device = prompts.ids.device();
        let (completion_ids, completion_mask) =
            pad_completions(&completions, pad_token_id(meta), device)?;
        let mut metrics = adv.metrics;
        metrics.extend(length_metrics(&completions));
        // Other model inputs belong to the prompts; each prompt's rows repeat, and with them its
        // block of images (`pixel_values` rows are patches of every image of the batch).
        let extra_inputs = select_prompt_rows(
            &model_inputs(batch, &GRPO_NON_MODEL_KEYS),
            b,
            prompts.images_per_prompt.as_deref(),
            prompts.videos_per_prompt.as_deref(),
            &rows,
        )?;
        let g = g as i64;
        Ok(Scored {
            prompt_ids: prompts.ids.f_repeat_interleave_self_int(g, 0, None::<i64>)?,
            prompt_mask: prompts.mask.f_repeat_interleave_self_int(g, 0, None::<i64>)?,
            completion_ids,
            completion_mask,
            advantages: Tensor::from_slice(&adv.advantages).f_to_device(device)?,
            old: None,
            reference: None,
            extra_inputs,
            metrics,
        })
    }
}

impl Objective for Grpo {
    fn needs(&self) -> Vec<String> {
        let mut v = vec!["generation".to_string(), "rewards".to_string()];
        if self.cfg.beta != 0.0 {
            v.push("reference".into());
        }
        v
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let has_completions = batch.tensors.iter().any(|(n, _)| n == "completion_ids");
        // `num_iterations` (TRL's μ): the host sends each prompts batch for μ consecutive
        // optimizer steps (`iteration` 0..μ, `micro_index` within the step); the first
        // generates, scores and keeps the rollout with the sampling policy's
        // log-probabilities, the others reuse it.
        let key = |k: &str| meta.value.get(k).and_then(|v| v.as_u64());
        let (iteration, iterations, micro) = (
            key("iteration").unwrap_or(0),
            key("num_iterations").unwrap_or(1),
            key("micro_index").unwrap_or(0),
        );
        let mut s = if has_completions {
            self.scored_from_batch(batch)?
        } else if iteration > 0 {
            self.rollouts.iter().find(|(m, _)| *m == micro).map(|(_, s)| s.share()).ok_or_else(|| {
                PluginError::invalid(format!("iteration {iteration} of micro-batch {micro}: no generation batch kept from iteration 0"))
            })?
        } else {
            let mut s = self.rollout(batch, &meta, ctx)?;
            self.rollouts.retain(|(m, _)| *m != micro);
            if iterations > 1 {
                let old =
                    tch::no_grad(|| self.completion_logps(ctx, &s, ForwardFlags::NO_GRAD, false))?
                        .0;
                s.old = Some(old);
                self.rollouts.push((micro, s.share()));
            }
            s
        };
        if s.prompt_ids.size()[1] < 1 {
            return Err(PluginError::invalid("GRPO needs at least one prompt token per row"));
        }
        let (per_token, entropy) = self.completion_logps(ctx, &s, ForwardFlags::NONE, true)?;
        let (kind, device) = (per_token.kind(), per_token.device());
        let mask = bool_mask(&s.completion_mask, device)?;
        ensure_finite("the policy's completion log-probabilities", &per_token.f_detach()?)?;
        // Masked positions are 0 in TRL's log-probabilities whatever the batch holds there.
        let clean = |t: Tensor| -> PluginResult<Tensor> {
            Ok(t.f_to_device(device)?.f_to_kind(kind)?.f_where_scalarother(&mask, 0.0)?)
        };
        let old = s.old.take().map(clean).transpose()?;
        if let Some(o) = &old {
            ensure_finite("batch `old_per_token_logps` (completion positions)", o)?;
        }
        let reference = if self.cfg.beta != 0.0 {
            let r = match s.reference.take() {
                Some(r) => clean(r)?,
                None => {
                    let flags = ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD;
                    tch::no_grad(|| self.completion_logps(ctx, &s, flags, false))?.0
                }
            };
            ensure_finite("the reference's completion log-probabilities", &r)?;
            Some(r)
        } else {
            None
        };
        let advantages = s.advantages.f_to_device(device)?.f_to_kind(kind)?;
        let tokens = s.completion_mask.f_ne(0)?.f_sum(Kind::Int64)?.int64_value(&[]);
        let dapo_normalizer = meta.num_items_in_batch.unwrap_or(tokens) as f64;
        if self.params.loss_type == GrpoLossType::Dapo
            && meta.num_items_in_batch.is_some_and(|n| n < tokens)
        {
            return Err(PluginError::invalid(format!(
                "batch metadata `num_items_in_batch` = {dapo_normalizer} is smaller than this micro-batch's {tokens} completion tokens"
            )));
        }
        let out = grpo_loss(
            &self.params,
            &per_token,
            old.as_ref(),
            reference.as_ref(),
            &advantages,
            &mask,
            meta.gradient_accumulation_steps as f64,
            dapo_normalizer,
        )?;
        let rows = per_token.size()[0];
        let value = check_loss(Self::NAME, &out.loss, &meta, rows)?;
        let mut metrics = vec![("loss".to_string(), value)];
        metrics.append(&mut s.metrics);
        metrics.extend(out.metrics);
        if let Some(e) = entropy {
            let m = mask.f_to_kind(Kind::Double)?;
            let sum =
                e.f_to_kind(Kind::Double)?.f_mul(&m)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            metrics.push(("entropy".into(), sum / (tokens.max(1) as f64)));
        }
        let num_items = match self.params.loss_type {
            GrpoLossType::Dapo | GrpoLossType::Bnpo => tokens,
            _ => rows,
        };
        Ok(LossOutput { loss: out.loss, num_items, metrics })
    }
}
