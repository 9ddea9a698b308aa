//! `ppo`: Proximal Policy Optimization from rewards, as the last TRL `PPOTrainer`
//! (huggingface/trl `trl/experimental/ppo/ppo_trainer.py`; TRL 1.16 ships none): responses
//! sampled from prompt batches, scored by the run's reward plugins (rule rewards and reward
//! models alike), a per-token KL penalty to the reference (the policy with its adapter
//! disabled), GAE over a value head on the policy's hidden states, and the clipped policy and
//! value losses over `num_ppo_epochs × num_mini_batches` optimizer steps per rollout. The
//! tensor math is [`crate::rlhf`]'s, checked there against TRL's.
//!
//! # How a TRL update maps onto the host's loop
//! `needs()` asks for `num_iterations = num_ppo_epochs · num_mini_batches`: the host sends each
//! prompts micro-batch (b prompts, metadata `micro_index`) for that many consecutive optimizer
//! steps (`iteration` 0..N). Each micro-batch is one TRL rollout batch:
//! * `iteration` 0: one response per prompt (`max_new_tokens = response_length`, the
//!   sampling keys, seed `seed` + the call's index, each row's images / videos through
//!   `prompt_rows`), padded with the batch's `pad_token_id`; then without a graph the
//!   policy's log-probabilities and values of the responses (one forward), the reference's
//!   log-probabilities (adapter disabled), the score Σ weight · reward of each decoded
//!   response, and [`ppo_rollout`] (truncation, masks, KL, rewards, whitening, GAE). The
//!   rollout is kept by `micro_index`.
//! * `iteration` i: epoch e = i / M and mini-batch m = i mod M (M = `num_mini_batches`) of a
//!   permutation of the b rows drawn for epoch e from (`seed`, `micro_index`, e); its b / M
//!   rows (b must be divisible by M) go through one policy forward with a graph (log-probs,
//!   entropies and values) and [`ppo_step_loss`]; the loss is divided by
//!   `gradient_accumulation_steps`.
//!
//! With `gradient_accumulation_steps` 1 this is TRL's update with local rollout batch b and
//! `per_device_train_batch_size` b / M (TRL's `gradient_accumulation_steps` 1). With several
//! micro-batches per step each micro-batch is its own rollout (its own reward whitening,
//! advantage whitening and permutation); their gradients add up in one optimizer step.
//!
//! Differences from TRL: generation always stops at EOS (the host's generate), so
//! `stop_token` only matters for `stop_token_id`s other than EOS; the forwards attend to every
//! generated token (TRL's masks every token equal to `pad_token_id`, EOS included when the two
//! are the same); the adaptive KL controller and its `kl_coef` live in each process.
//!
//! # Batch and metadata
//! A prompts batch (`prompt_ids`, `prompt_mask` `[b, P]`, left-padded; vision inputs with
//! `images_per_prompt` / `videos_per_prompt`), metadata `prompts`, `samples` (for the
//! rewards), `pad_token_id`, `eos_token_id` (an id or a list, the first is TRL's
//! `eos_token_id`; absent: the last token of the responses that stopped before
//! `response_length`), and the host's `iteration`, `num_iterations`, `micro_index`,
//! `gradient_accumulation_steps`. An evaluation batch (`num_iterations` 1 while PPO asked for
//! more) gets a rollout and the loss over all its rows, kept nowhere and without a KL update.
//!
//! # Metrics (TRL's names)
//! After a rollout: `objective/kl`, `objective/entropy`, `objective/non_score_reward`,
//! `objective/rlhf_reward`, `objective/scores`, `val/num_eos_tokens`, `rewards/<name>/mean`,
//! `rewards/<name>/std`, `reward`, `reward_std`, `completions/mean_length`, `/min_length`,
//! `/max_length`, and `kl_coef` (the one the rollout used) with `adaptive_kl`. Every step:
//! `loss` and the running averages over the rollout's steps so far of
//! `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`,
//! `val/clipfrac_avg`, `policy/entropy_avg`, `val/ratio` and (from the second step)
//! `val/ratio_var`: at the last iteration they are TRL's logged values of the update.
use ferrotune_plugin_api::kinds::objective::select_prompt_rows;
use ferrotune_plugin_api::prelude::*;
use ferrotune_plugin_api::{
    take_output, target_logps, NEED_NUM_ITERATIONS, NEED_VALUE_HEAD, TARGET_IDS,
    TARGET_TEMPERATURE, VALUES,
};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::common::{check_loss, ensure_finite, model_inputs, Meta};
use crate::grpo::GRPO_NON_MODEL_KEYS;
use crate::rlhf::{
    ppo_rollout, ppo_step_loss, KlEstimator, PpoConfig as PpoMath, PpoStats, Rollout, RolloutInputs,
};
use crate::rollout::{
    length_metrics, pad_completions, pad_token_id, Metrics, Prompts, RewardTable,
};

/// Configuration (`objective: {plugin: ppo, ...}`), the last TRL `PPOConfig`'s names.
#[derive(Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PpoObjectiveConfig {
    /// KL penalty coefficient (the initial one with `adaptive_kl`). Default 0.05.
    #[serde(default = "default_kl_coef")]
    #[schemars(range(min = 0))]
    pub kl_coef: f64,
    /// `k1` (default, −log r, unbiased but noisy) or `k3` ((r − 1) − log r).
    #[serde(default = "default_kl_estimator")]
    #[schemars(extend("enum" = ["k1", "k3"]))]
    pub kl_estimator: String,
    /// TRL's former `AdaptiveKLController` (Ziegler et al. 2019): after each rollout
    /// `kl_coef *= 1 + clip(kl / target − 1, −0.2, 0.2) · rows / horizon`. Default false.
    #[serde(default)]
    pub adaptive_kl: bool,
    /// Adaptive KL: the KL (Σ over a response, mean over responses) aimed at. Default 6.0.
    #[serde(default = "default_target")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub target: f64,
    /// Adaptive KL: responses over which the coefficient adapts. Default 10000.
    #[serde(default = "default_horizon")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub horizon: f64,
    /// Discount factor. Default 1.0.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1))]
    pub gamma: f64,
    /// GAE λ. Default 0.95.
    #[serde(default = "default_lam")]
    #[schemars(range(min = 0, max = 1))]
    pub lam: f64,
    /// Policy ratio clip range. Default 0.2.
    #[serde(default = "default_clip")]
    #[schemars(range(min = 0))]
    pub cliprange: f64,
    /// Value clip range. Default 0.2.
    #[serde(default = "default_clip")]
    #[schemars(range(min = 0))]
    pub cliprange_value: f64,
    /// Weight of the value loss. Default 0.1.
    #[serde(default = "default_vf_coef")]
    #[schemars(range(min = 0))]
    pub vf_coef: f64,
    /// Whiten the rewards before GAE. Default false (TRL wants mini-batches of ≥ 8 with it).
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Subtracted from the score of responses without EOS. Default null (off); 1.0 is usual.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// Passes over each rollout. Default 4.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1))]
    pub num_ppo_epochs: u64,
    /// Mini-batches per pass (each one optimizer step). Default 1.
    #[serde(default = "default_one_u64")]
    #[schemars(range(min = 1))]
    pub num_mini_batches: u64,
    /// Longest response generated (max new tokens). Default 53.
    #[serde(default = "default_response_length")]
    #[schemars(range(min = 1))]
    pub response_length: i64,
    /// Sampling temperature; log-probabilities are of logits / (temperature + 1e-7) as TRL's.
    /// Default 0.7.
    #[serde(default = "default_temperature")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub temperature: f64,
    /// Top-k sampling. Default 0 (off).
    #[serde(default)]
    pub top_k: u64,
    /// Nucleus sampling. Default 1.0 (off).
    #[serde(default = "one")]
    #[schemars(extend("exclusiveMinimum" = 0), range(max = 1))]
    pub top_p: f64,
    /// Base seed of the sampling (each generation call adds its index) and of the
    /// mini-batch permutations. Default 0.
    #[serde(default)]
    pub seed: u64,
    /// `eos`: responses end after their first EOS (TRL's `stop_token`). Default null.
    #[serde(default)]
    #[schemars(extend("enum" = ["eos", null]))]
    pub stop_token: Option<String>,
    /// Responses end after the first of this token (`stop_token: eos` overrides it, as TRL).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub stop_token_id: Option<i64>,
}

fn default_kl_coef() -> f64 {
    0.05
}
fn default_kl_estimator() -> String {
    "k1".into()
}
fn default_target() -> f64 {
    6.0
}
fn default_horizon() -> f64 {
    10000.0
}
fn one() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_epochs() -> u64 {
    4
}
fn default_one_u64() -> u64 {
    1
}
fn default_response_length() -> i64 {
    53
}
fn default_temperature() -> f64 {
    0.7
}

/// The rows of a rollout: prompts, responses and the other model inputs.
pub struct RolloutRows {
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    /// The responses as generated, `[b, C]`, and 1 on their tokens.
    pub responses: Tensor,
    response_mask: Tensor,
    /// The batch's other model inputs (vision) and each row's image / video counts.
    inputs: Vec<(String, Tensor)>,
    images_per_prompt: Option<Vec<usize>>,
    videos_per_prompt: Option<Vec<usize>>,
}

impl RolloutRows {
    fn len(&self) -> usize {
        self.prompt_ids.size()[0] as usize
    }

    /// The model inputs of rows `rows` (prompt + response, their attention mask and the rows'
    /// vision inputs) and the `target_ids` scoring every response position (padding too, as
    /// TRL's log-probabilities: the rollout masks them).
    fn forward_inputs(&self, rows: &[usize]) -> PluginResult<ForwardInputs> {
        let device = self.prompt_ids.device();
        let pick = |t: &Tensor| -> PluginResult<Tensor> {
            Ok(t.f_index_select(0, &row_index(rows, t.device())?)?.f_to_device(device)?)
        };
        let (prompt_ids, prompt_mask) = (pick(&self.prompt_ids)?, pick(&self.prompt_mask)?);
        let responses = pick(&self.responses)?.f_to_kind(Kind::Int64)?;
        let response_mask = pick(&self.response_mask)?.f_to_kind(prompt_mask.kind())?;
        let (n, p, c) = (rows.len() as i64, prompt_ids.size()[1], responses.size()[1]);
        if p < 1 {
            return Err(PluginError::invalid("PPO needs at least one prompt token per row"));
        }
        let mut inputs = select_prompt_rows(
            &self.inputs,
            self.len(),
            self.images_per_prompt.as_deref(),
            self.videos_per_prompt.as_deref(),
            rows,
        )?;
        // Position P − 1 + t predicts response token t.
        let none = |w: i64| Tensor::f_full([n, w], -1, (Kind::Int64, device));
        let targets = Tensor::f_cat(&[none(p - 1)?, responses.shallow_clone(), none(1)?], 1)?;
        inputs.push(("input_ids".into(), Tensor::f_cat(&[prompt_ids, responses], 1)?));
        inputs.push(("attention_mask".into(), Tensor::f_cat(&[prompt_mask, response_mask], 1)?));
        Ok(ForwardInputs { inputs, targets, p, c })
    }

    /// 1 on the response tokens of rows `rows`, as bool on `device`.
    fn real(&self, rows: &[usize], device: Device) -> PluginResult<Tensor> {
        let m = self.response_mask.f_to_device(device)?;
        Ok(m.f_index_select(0, &row_index(rows, device)?)?.f_ne(0)?)
    }
}

/// A forward over rollout rows: the inputs, `target_ids` `[n, P + C]`, and the prompt and
/// response widths.
struct ForwardInputs {
    inputs: Vec<(String, Tensor)>,
    targets: Tensor,
    p: i64,
    c: i64,
}

fn row_index(rows: &[usize], device: Device) -> PluginResult<Tensor> {
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Ok(Tensor::from_slice(&idx).f_to_device(device)?)
}

/// A rollout kept for the optimizer steps of its update.
pub struct KeptRollout {
    pub rows: RolloutRows,
    pub rollout: Rollout,
    stats: PpoStats,
}

/// What one policy forward gives over a rollout's rows, `[n, C]` each.
struct PolicyOutputs {
    logps: Tensor,
    entropy: Option<Tensor>,
    values: Tensor,
}

pub struct Ppo {
    pub cfg: PpoObjectiveConfig,
    /// The rollout math's settings; `kl_coef` is the current one (adaptive KL moves it).
    pub math: PpoMath,
    generation_calls: u64,
    rollouts: Vec<(u64, KeptRollout)>,
}

impl Plugin for Ppo {
    const NAME: &'static str = "ppo";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "PPO from reward plugins / reward models with a value head, KL to the reference and GAE (TRL's PPOTrainer)";
    fn config_schema() -> Option<serde_json::Value> {
        Some(schema_of::<PpoObjectiveConfig>())
    }
    fn from_config(config_json: &str) -> PluginResult<Self> {
        let cfg: PpoObjectiveConfig = parse_config(config_json)?;
        let finite = |key: &str, v: f64, lo: f64, lo_open: bool| -> PluginResult<()> {
            if !v.is_finite() || v < lo || (lo_open && v == lo) {
                let bound = if lo_open { "above" } else { "at least" };
                return Err(PluginError::config(
                    key,
                    format!("must be a finite number {bound} {lo}, got {v}"),
                ));
            }
            Ok(())
        };
        finite("kl_coef", cfg.kl_coef, 0.0, false)?;
        finite("target", cfg.target, 0.0, true)?;
        finite("horizon", cfg.horizon, 0.0, true)?;
        finite("cliprange", cfg.cliprange, 0.0, false)?;
        finite("cliprange_value", cfg.cliprange_value, 0.0, false)?;
        finite("vf_coef", cfg.vf_coef, 0.0, false)?;
        finite("temperature", cfg.temperature, 0.0, true)?;
        for (key, v) in [("gamma", cfg.gamma), ("lam", cfg.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(PluginError::config(key, format!("must lie in [0, 1], got {v}")));
            }
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(PluginError::config(
                "top_p",
                format!("must lie in (0, 1], got {}", cfg.top_p),
            ));
        }
        if let Some(p) = cfg.missing_eos_penalty {
            if !p.is_finite() {
                return Err(PluginError::config(
                    "missing_eos_penalty",
                    format!("must be finite, got {p}"),
                ));
            }
        }
        let kl_estimator = KlEstimator::parse(&cfg.kl_estimator).ok_or_else(|| {
            PluginError::config(
                "kl_estimator",
                format!("one of k1, k3; got `{}`", cfg.kl_estimator),
            )
        })?;
        for (key, v) in
            [("num_ppo_epochs", cfg.num_ppo_epochs), ("num_mini_batches", cfg.num_mini_batches)]
        {
            if v < 1 {
                return Err(PluginError::config(key, format!("must be at least 1, got {v}")));
            }
        }
        if cfg.response_length < 1 {
            return Err(PluginError::config(
                "response_length",
                format!("must be at least 1, got {}", cfg.response_length),
            ));
        }
        if let Some(s) = &cfg.stop_token {
            if s != "eos" {
                return Err(PluginError::config("stop_token", format!("`eos` or null, got `{s}`")));
            }
        }
        if let Some(id) = cfg.stop_token_id {
            if id < 0 {
                return Err(PluginError::config(
                    "stop_token_id",
                    format!("must be a token id, got {id}"),
                ));
            }
        }
        let math = PpoMath {
            kl_coef: cfg.kl_coef,
            kl_estimator,
            gamma: cfg.gamma,
            lam: cfg.lam,
            whiten_rewards: cfg.whiten_rewards,
            missing_eos_penalty: cfg.missing_eos_penalty,
            cliprange: cfg.cliprange,
            cliprange_value: cfg.cliprange_value,
            vf_coef: cfg.vf_coef,
        };
        Ok(Self { cfg, math, generation_calls: 0, rollouts: Vec::new() })
    }
}

/// Where an evaluation batch's rollout is kept during its call (no host sends this
/// `micro_index`).
const EVAL_KEY: u64 = u64::MAX;

/// Optimizer steps per rollout.
fn iterations(cfg: &PpoObjectiveConfig) -> u64 {
    cfg.num_ppo_epochs * cfg.num_mini_batches
}

/// A permutation of `0..n` from `seed` (splitmix64 and Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// The rows of mini-batch `m` of epoch `epoch` of micro-batch `micro`'s rollout of `b` rows.
pub fn mini_batch_rows(
    cfg: &PpoObjectiveConfig,
    micro: u64,
    epoch: u64,
    m: u64,
    b: usize,
) -> Vec<usize> {
    let seed = cfg
        .seed
        .wrapping_mul(0x1000_0000_01B3)
        .wrapping_add(micro.wrapping_mul(0x9E37_79B9))
        .wrapping_add(epoch);
    let perm = permutation(b, seed);
    let size = b / cfg.num_mini_batches as usize;
    perm[m as usize * size..(m as usize + 1) * size].to_vec()
}

/// TRL's EOS: metadata `eos_token_id` (an id, or a list whose first entry counts); else the
/// last token of the responses that stopped before `max_new` (the host's generate stops at
/// EOS); else none (−1).
fn eos_token(meta: &Meta, completions: &[Vec<i64>], max_new: usize) -> PluginResult<i64> {
    match meta.value.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(completions
            .iter()
            .find(|c| !c.is_empty() && c.len() < max_new)
            .and_then(|c| c.last().copied())
            .unwrap_or(-1)),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_array().and_then(|a| a.first()).and_then(|x| x.as_i64()))
            .ok_or_else(|| {
                PluginError::invalid(format!(
                    "batch metadata `eos_token_id` must be a token id or a list of them, got {v}"
                ))
            }),
    }
}

impl Ppo {
    /// The policy over rows `rows` of the rollout: the log-probabilities of every response
    /// position under logits / (temperature + 1e-7) (TRL's), the entropies with
    /// `TARGET_ENTROPY`, and the value head, at the positions that predict each response
    /// token. One forward.
    fn policy(
        &self,
        ctx: &dyn ObjectiveContext,
        r: &RolloutRows,
        rows: &[usize],
        flags: ForwardFlags,
    ) -> PluginResult<PolicyOutputs> {
        let ForwardInputs { mut inputs, targets, p, c } = r.forward_inputs(rows)?;
        inputs.push((TARGET_IDS.to_string(), targets));
        inputs.push((TARGET_TEMPERATURE.to_string(), Tensor::from(self.cfg.temperature + 1e-7)));
        let flags = flags | ForwardFlags::TARGET_LOGPS | ForwardFlags::VALUES;
        let mut out = ctx.forward(&inputs, flags)?;
        let n = rows.len() as i64;
        let logps =
            response_positions("target_logps", &take_output(&mut out, "target_logps")?, n, p, c)?;
        let values = response_positions(VALUES, &take_output(&mut out, VALUES)?, n, p, c)?;
        let entropy = if flags.contains(ForwardFlags::TARGET_ENTROPY) {
            let e = take_output(&mut out, "target_entropy")?;
            Some(response_positions("target_entropy", &e, n, p, c)?)
        } else {
            None
        };
        Ok(PolicyOutputs { logps, entropy, values })
    }

    /// The reference's (adapter disabled) log-probabilities of the responses, no graph.
    fn reference(
        &self,
        ctx: &dyn ObjectiveContext,
        r: &RolloutRows,
        rows: &[usize],
    ) -> PluginResult<Tensor> {
        let ForwardInputs { inputs, targets, p, c } = r.forward_inputs(rows)?;
        let flags = ForwardFlags::DISABLE_ADAPTER | ForwardFlags::NO_GRAD;
        let out = target_logps(ctx, &inputs, &targets, self.cfg.temperature + 1e-7, flags)?;
        response_positions("target_logps", &out.logps, rows.len() as i64, p, c)
    }

    /// Iteration 0: generate, score, and post-process one rollout (TRL's no-grad part). An
    /// evaluation rollout is one batch, whatever its size.
    fn rollout(
        &mut self,
        batch: &Batch,
        meta: &Meta,
        ctx: &dyn ObjectiveContext,
        eval: bool,
    ) -> PluginResult<(KeptRollout, Metrics)> {
        let prompts = Prompts::from_batch(batch, meta)?;
        let b = prompts.len();
        let m = if eval { 1 } else { self.cfg.num_mini_batches as usize };
        if b == 0 || !b.is_multiple_of(m) {
            return Err(PluginError::invalid(format!(
                "PPO splits each rollout into `num_mini_batches` = {m} mini-batches: the micro-batch's {b} prompts are not a multiple of it (set the batch size to a multiple of num_mini_batches)"
            )));
        }
        let rows: Vec<usize> = (0..b).collect();
        let call = self.generation_calls;
        self.generation_calls += 1;
        let options = serde_json::json!({
            "max_new_tokens": self.cfg.response_length,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "top_k": self.cfg.top_k,
            "seed": self.cfg.seed.wrapping_add(call),
        });
        let completions = prompts.generate(ctx, &rows, options)?;
        let pad = pad_token_id(meta);
        let eos = eos_token(meta, &completions, self.cfg.response_length as usize)?;
        let stop = match self.cfg.stop_token.as_deref() {
            Some("eos") => Some(eos),
            _ => self.cfg.stop_token_id,
        };
        // The rewards score the responses truncated after the stop token (TRL's
        // `postprocessed_response`).
        let truncated: Vec<Vec<i64>> = completions
            .iter()
            .map(|c| match stop.and_then(|s| c.iter().position(|&t| t == s)) {
                Some(at) => c[..=at].to_vec(),
                None => c.clone(),
            })
            .collect();
        let table = RewardTable::score(ctx, &prompts.reward_inputs(ctx, meta, &rows, &truncated)?)?;
        let (sums, reward_metrics) = table.weighted()?;
        let device = prompts.ids.device();
        let (responses, response_mask) = pad_completions(&completions, pad, device)?;
        let r = RolloutRows {
            prompt_ids: prompts.ids.shallow_clone(),
            prompt_mask: prompts.mask.shallow_clone(),
            responses,
            response_mask,
            inputs: model_inputs(batch, &GRPO_NON_MODEL_KEYS),
            images_per_prompt: prompts.images_per_prompt.clone(),
            videos_per_prompt: prompts.videos_per_prompt.clone(),
        };
        let (policy, ref_logprobs) = tch::no_grad(|| -> PluginResult<_> {
            Ok((
                self.policy(ctx, &r, &rows, ForwardFlags::NO_GRAD)?,
                self.reference(ctx, &r, &rows)?,
            ))
        })?;
        let (logprobs, values) = (policy.logps, policy.values);
        let real = r.real(&rows, logprobs.device())?;
        for (what, t) in [
            ("the policy's response log-probabilities", &logprobs),
            ("the reference's response log-probabilities", &ref_logprobs),
            ("the value head's values", &values),
        ] {
            ensure_finite(
                &format!("{what} in {}", meta.describe(b as i64)),
                &t.f_where_scalarother(&real, 0.0)?,
            )?;
        }
        let kind = logprobs.kind();
        let scores = Tensor::from_slice(&sums).f_to_kind(kind)?.f_to_device(logprobs.device())?;
        let responses = r.responses.f_to_device(logprobs.device())?;
        let rollout = ppo_rollout(
            &self.math,
            &RolloutInputs {
                responses: &responses,
                logprobs: &logprobs,
                ref_logprobs: &ref_logprobs,
                values: &values.f_to_kind(kind)?,
                scores: &scores,
                pad_token_id: pad,
                stop_token_id: stop,
                eos_token_id: eos,
            },
        )?;
        let mut metrics = rollout.metrics()?;
        metrics.extend(reward_metrics);
        metrics.extend(length_metrics(&completions));
        Ok((KeptRollout { rows: r, rollout, stats: PpoStats::default() }, metrics))
    }

    /// TRL's former `AdaptiveKLController.update` after a rollout of `rows` responses whose
    /// mean summed KL is `kl`.
    fn update_kl_coef(&mut self, kl: f64, rows: usize) {
        let err = (kl / self.cfg.target - 1.0).clamp(-0.2, 0.2);
        self.math.kl_coef *= 1.0 + err * rows as f64 / self.cfg.horizon;
    }

    /// The kept rollout of micro-batch `micro`, if any.
    pub fn kept(&self, micro: u64) -> Option<&KeptRollout> {
        self.rollouts.iter().find(|(m, _)| *m == micro).map(|(_, k)| k)
    }
}

/// The `[n, C]` response positions (P − 1 .. P − 1 + C) of a `[n, P + C]` host output.
fn response_positions(what: &str, t: &Tensor, n: i64, p: i64, c: i64) -> PluginResult<Tensor> {
    if t.size() != [n, p + c] {
        return Err(PluginError::invalid(format!(
            "the host's `{what}` {:?} do not cover the [{n}, {}] prompt + response positions",
            t.size(),
            p + c
        )));
    }
    Ok(t.f_narrow(1, p - 1, c)?)
}

impl Objective for Ppo {
    fn needs(&self) -> Vec<String> {
        vec![
            "generation".to_string(),
            "rewards".to_string(),
            "reference".to_string(),
            NEED_VALUE_HEAD.to_string(),
            format!("{NEED_NUM_ITERATIONS}{}", iterations(&self.cfg)),
        ]
    }

    fn loss(&mut self, batch: &Batch, ctx: &dyn ObjectiveContext) -> PluginResult<LossOutput> {
        let meta = Meta::parse(&batch.meta_json)?;
        let key = |k: &str| -> PluginResult<Option<u64>> {
            match meta.value.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    PluginError::invalid(format!(
                        "batch metadata `{k}` must be a non-negative integer, got {v}"
                    ))
                }),
            }
        };
        let n = iterations(&self.cfg);
        let iteration = key("iteration")?.unwrap_or(0);
        let sent = key("num_iterations")?.unwrap_or(n);
        let micro = key("micro_index")?.unwrap_or(0);
        // An evaluation batch: one pass over every row, nothing kept.
        let eval = sent == 1 && n != 1;
        if sent != n && !eval {
            return Err(PluginError::invalid(format!(
                "batch metadata `num_iterations` = {sent}, but PPO needs each prompts batch for num_ppo_epochs × num_mini_batches = {n} steps"
            )));
        }
        if iteration >= sent {
            return Err(PluginError::invalid(format!(
                "batch metadata `iteration` = {iteration} is outside 0..{sent}"
            )));
        }
        let mut metrics = Vec::new();
        if iteration == 0 {
            let kl_coef = self.math.kl_coef;
            let (kept, rollout_metrics) = self.rollout(batch, &meta, ctx, eval)?;
            metrics = rollout_metrics;
            if self.cfg.adaptive_kl {
                metrics.push(("kl_coef".into(), kl_coef));
                if !eval {
                    let kl = metrics.iter().find(|(k, _)| k == "objective/kl").map_or(0.0, |m| m.1);
                    self.update_kl_coef(kl, kept.rows.len());
                }
            }
            // An evaluation rollout is kept (for this call only) apart from the training ones.
            let micro_key = if eval { EVAL_KEY } else { micro };
            self.rollouts.retain(|(m, _)| *m != micro_key);
            self.rollouts.push((micro_key, kept));
        }
        let micro_key = if eval { EVAL_KEY } else { micro };
        let at = self.rollouts.iter().position(|(m, _)| *m == micro_key).ok_or_else(|| {
            PluginError::invalid(format!(
                "iteration {iteration} of micro-batch {micro}: no rollout kept from iteration 0"
            ))
        })?;
        let k = &self.rollouts[at].1;
        let b = k.rows.len();
        let rows: Vec<usize> = if eval {
            (0..b).collect()
        } else {
            let m = self.cfg.num_mini_batches;
            mini_batch_rows(&self.cfg, micro, iteration / m, iteration % m, b)
        };
        let new = self.policy(ctx, &k.rows, &rows, ForwardFlags::TARGET_ENTROPY)?;
        let real = k.rows.real(&rows, new.logps.device())?;
        ensure_finite(
            &format!(
                "the policy's response log-probabilities in {}",
                meta.describe(rows.len() as i64)
            ),
            &new.logps.f_detach()?.f_where_scalarother(&real, 0.0)?,
        )?;
        let device = k.rollout.logprobs.device();
        let kind = k.rollout.logprobs.kind();
        let step = ppo_step_loss(
            &self.math,
            &k.rollout,
            &row_index(&rows, device)?,
            &new.logps.f_to_device(device)?.f_to_kind(kind)?,
            &new.values.f_to_device(device)?.f_to_kind(kind)?,
            new.entropy.as_ref(),
        )?;
        let loss = step.loss.f_div_scalar(meta.gradient_accumulation_steps as f64)?;
        let value = check_loss(Self::NAME, &loss, &meta, rows.len() as i64)?;
        let kept = &mut self.rollouts[at].1;
        kept.stats.push(&step)?;
        let mut out = vec![("loss".to_string(), value)];
        out.extend(kept.stats.metrics().into_iter().filter(|(_, v)| v.is_finite()));
        out.append(&mut metrics);
        if eval || iteration + 1 == sent {
            self.rollouts.remove(at);
        }
        Ok(LossOutput { loss, num_items: rows.len() as i64, metrics: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rlhf::logprobs_and_entropy;
    use crate::testing::TinyModel;

    const PAD: i64 = 0;
    const EOS: i64 = 1;

    /// Four prompts, left-padded with 0.
    fn prompts() -> (Tensor, Tensor) {
        let ids = Tensor::from_slice(&[0i64, 5, 6, 7, 8, 9, 0, 0, 4, 3, 2, 5]).view([4, 3]);
        (ids.shallow_clone(), ids.ne(0).to_kind(Kind::Int64))
    }

    fn batch(micro: u64, iteration: u64, iterations: u64) -> Batch {
        let (ids, mask) = prompts();
        let meta = serde_json::json!({
            "gradient_accumulation_steps": 2, "micro_index": micro, "iteration": iteration,
            "num_iterations": iterations, "pad_token_id": PAD, "eos_token_id": EOS,
            "sample_ids": [micro, iteration],
        });
        Batch {
            tensors: vec![("prompt_ids".into(), ids), ("prompt_mask".into(), mask)],
            meta_json: meta.to_string(),
        }
    }

    fn metric(m: &[(String, f64)], name: &str) -> f64 {
        m.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no metric {name} in {m:?}")).1
    }

    /// The rollout computed here from the model's full logits with TRL's own path
    /// (`logprobs_and_entropy`), the completions the fake generates and the rewards by hand.
    fn expected_rollout(model: &TinyModel, ppo: &Ppo, seed: u64) -> (Rollout, Tensor, i64) {
        let (ids, mask) = prompts();
        let completions: Vec<Vec<i64>> = (0..4)
            .map(|r| {
                let row = Vec::<i64>::try_from(&ids.get(r)).unwrap();
                let m = Vec::<i64>::try_from(&mask.get(r)).unwrap();
                let p: Vec<i64> =
                    row.into_iter().zip(m).filter(|(_, k)| *k != 0).map(|(i, _)| i).collect();
                model.completion(&p, seed, ppo.cfg.response_length as usize)
            })
            .collect();
        let (responses, _) = pad_completions(&completions, PAD, Device::Cpu).unwrap();
        let c = responses.size()[1];
        let full = Tensor::cat(&[ids, responses.shallow_clone()], 1);
        let t = ppo.cfg.temperature;
        let (lp, rlp, values) = tch::no_grad(|| {
            let lp =
                logprobs_and_entropy(&model.logits(&full, false).narrow(1, 2, c), &responses, t)
                    .unwrap()
                    .0;
            let rlp =
                logprobs_and_entropy(&model.logits(&full, true).narrow(1, 2, c), &responses, t)
                    .unwrap()
                    .0;
            (lp, rlp, model.values(&full).narrow(1, 2, c))
        });
        let scores: Vec<f32> = completions
            .iter()
            .map(|c| 0.5 * c.len() as f32 + c.iter().filter(|&&x| x == 3).count() as f32)
            .collect();
        let rollout = ppo_rollout(
            &ppo.math,
            &RolloutInputs {
                responses: &responses,
                logprobs: &lp,
                ref_logprobs: &rlp,
                values: &values,
                scores: &Tensor::from_slice(&scores),
                pad_token_id: PAD,
                stop_token_id: None,
                eos_token_id: EOS,
            },
        )
        .unwrap();
        (rollout, full, c)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    /// Two micro-batches, 2 epochs × 2 mini-batches: each rollout is generated and scored once,
    /// equals the rollout computed here with TRL's path, every epoch's mini-batches cover the
    /// rows once, and each step's loss and the update's stats equal `ppo_step_loss` on the
    /// model's outputs (the head moves between steps, as an optimizer would move it).
    #[test]
    fn rollout_is_kept_and_steps_are_trls() {
        let model = TinyModel::new(11, 6, EOS);
        let cfg = r#"{"num_ppo_epochs": 2, "num_mini_batches": 2, "response_length": 4, "seed": 5, "kl_coef": 0.2}"#;
        let mut ppo = Ppo::from_config(cfg).unwrap();
        assert!(ppo.needs().contains(&"num_iterations=4".to_string()), "{:?}", ppo.needs());
        let mut expected: Vec<(Rollout, Tensor, i64, PpoStats)> = Vec::new();
        let mut worst = 0f64;
        for iteration in 0..4u64 {
            let mut seen = [Vec::new(), Vec::new()];
            for micro in 0..2u64 {
                let out = ppo.loss(&batch(micro, iteration, 4), &model).unwrap();
                if iteration == 0 {
                    // The fake's seed: `seed` + the generation call's index.
                    let (rollout, full, c) = expected_rollout(&model, &ppo_like(cfg), 5 + micro);
                    let kept = ppo.kept(micro).unwrap();
                    for (name, got, want) in [
                        ("advantages", &kept.rollout.advantages, &rollout.advantages),
                        ("returns", &kept.rollout.returns, &rollout.returns),
                        ("rewards", &kept.rollout.rewards, &rollout.rewards),
                        ("logprobs", &kept.rollout.logprobs, &rollout.logprobs),
                        ("ref_logprobs", &kept.rollout.ref_logprobs, &rollout.ref_logprobs),
                    ] {
                        let d = max_diff(got, want);
                        assert!(d < 1e-5, "micro {micro} {name}: |Δ| = {d}");
                        worst = worst.max(d);
                    }
                    for (name, want) in rollout.metrics().unwrap() {
                        assert!((metric(&out.metrics, &name) - want).abs() < 1e-4, "{name}");
                    }
                    assert!(metric(&out.metrics, "rewards/threes/mean").is_finite());
                    assert!(metric(&out.metrics, "completions/mean_length") > 0.0);
                    expected.push((rollout, full, c, PpoStats::default()));
                } else {
                    assert!(out.metrics.iter().all(|(n, _)| !n.starts_with("objective/")));
                }
                // The step as computed here from the model's current weights.
                let (epoch, m) = (iteration / 2, iteration % 2);
                let rows = mini_batch_rows(&ppo.cfg, micro, epoch, m, 4);
                seen[micro as usize].push((epoch, rows.clone()));
                let (rollout, full, c, stats) = &mut expected[micro as usize];
                let idx = row_index(&rows, Device::Cpu).unwrap();
                let (ids, responses) =
                    (full.index_select(0, &idx), full.index_select(0, &idx).narrow(1, 3, *c));
                let step = tch::no_grad(|| {
                    let logits = model.logits(&ids, false).narrow(1, 2, *c);
                    let (lp, ent) =
                        logprobs_and_entropy(&logits, &responses, ppo.cfg.temperature).unwrap();
                    let v = model.values(&ids).narrow(1, 2, *c);
                    ppo_step_loss(&ppo.math, rollout, &idx, &lp, &v, Some(&ent)).unwrap()
                });
                let d = (out.loss.double_value(&[]) * 2.0 - step.loss.double_value(&[])).abs();
                assert!(d < 1e-5, "iteration {iteration} micro {micro}: loss |Δ| = {d}");
                worst = worst.max(d);
                assert_eq!(out.num_items, 2);
                stats.push(&step).unwrap();
                for (name, want) in stats.metrics() {
                    if want.is_finite() {
                        let d = (metric(&out.metrics, &name) - want).abs();
                        assert!(d < 1e-5, "iteration {iteration} micro {micro} {name}: |Δ| = {d}");
                    }
                }
                // The loss has a graph to the policy's head, the value head and the embeddings.
                out.loss.backward();
                for (name, p) in [("lm_head", &model.lm_head), ("v_head", &model.v_head)] {
                    assert!(p.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}");
                }
            }
            // Move the policy as an optimizer step would.
            tch::no_grad(|| {
                let _ = model.lm_head.shallow_clone().f_add_(&(model.lm_head.sin() * 0.1)).unwrap();
                let _ = model.v_head.shallow_clone().f_add_scalar_(0.05).unwrap();
            });
            for s in seen.iter().filter(|s| s.len() == 2) {
                let mut all: Vec<usize> = s.iter().flat_map(|(_, r)| r.clone()).collect();
                all.sort();
                assert_eq!(all, vec![0, 1, 2, 3], "an epoch's mini-batches cover each row once");
            }
        }
        // Generation and rewards ran once per rollout, with the seed counter.
        let generated = model.generated.borrow();
        assert_eq!(generated.len(), 2);
        assert_eq!(generated[1].1["seed"], 6);
        assert_eq!(generated[0].1["max_new_tokens"], 4);
        assert!(generated[0].1.get("prompt_rows").is_none());
        assert_eq!(*model.reward_calls.borrow(), 2);
        // The last iteration dropped the rollouts.
        assert!(ppo.kept(0).is_none() && ppo.kept(1).is_none());
        let e = ppo.loss(&batch(0, 1, 4), &model).unwrap_err().to_string();
        assert!(e.contains("no rollout kept"), "{e}");
        println!("ppo plugin vs TRL's path: max |Δ| = {worst:e}");
        // The permutations differ between epochs (for this seed) and cover the rows.
        let p0 = mini_batch_rows(&ppo.cfg, 0, 0, 0, 4);
        let p1 = mini_batch_rows(&ppo.cfg, 0, 1, 0, 4);
        assert_ne!(p0, p1);
    }

    /// A fresh plugin with the same config (for its `math` and `cfg`).
    fn ppo_like(cfg: &str) -> Ppo {
        Ppo::from_config(cfg).unwrap()
    }

    #[test]
    fn config_is_validated_by_key() {
        for (cfg, key) in [
            (r#"{"kl_coef": -1}"#, "kl_coef"),
            (r#"{"kl_estimator": "k2"}"#, "kl_estimator"),
            (r#"{"target": 0}"#, "target"),
            (r#"{"horizon": -5}"#, "horizon"),
            (r#"{"gamma": 1.5}"#, "gamma"),
            (r#"{"lam": -0.1}"#, "lam"),
            (r#"{"cliprange": -0.2}"#, "cliprange"),
            (r#"{"cliprange_value": "x"}"#, "cliprange_value"),
            (r#"{"vf_coef": -1}"#, "vf_coef"),
            (r#"{"num_ppo_epochs": 0}"#, "num_ppo_epochs"),
            (r#"{"num_mini_batches": 0}"#, "num_mini_batches"),
            (r#"{"response_length": 0}"#, "response_length"),
            (r#"{"temperature": 0}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"stop_token": "eot"}"#, "stop_token"),
            (r#"{"stop_token_id": -3}"#, "stop_token_id"),
            (r#"{"beta": 0.1}"#, "beta"),
        ] {
            let e =
                Ppo::from_config(cfg).err().unwrap_or_else(|| panic!("{cfg} accepted")).to_string();
            assert!(e.contains(key), "{cfg}: {e}");
        }
        let ppo = Ppo::from_config("{}").unwrap();
        assert_eq!(
            ppo.needs(),
            vec!["generation", "rewards", "reference", "value_head", "num_iterations=4"]
        );
        assert_eq!(
            (ppo.math.kl_coef, ppo.cfg.response_length, ppo.cfg.temperature),
            (0.05, 53, 0.7)
        );
        // A batch that does not split into the mini-batches is refused by name.
        let model = TinyModel::new(11, 6, EOS);
        let mut ppo = Ppo::from_config(r#"{"num_mini_batches": 3, "num_ppo_epochs": 1}"#).unwrap();
        let e = ppo.loss(&batch(0, 0, 3), &model).unwrap_err().to_string();
        assert!(e.contains("num_mini_batches") && e.contains("4 prompts"), "{e}");
        // A host that sends the batch for another number of steps is refused.
        let e = ppo.loss(&batch(0, 0, 2), &model).unwrap_err().to_string();
        assert!(e.contains("num_iterations"), "{e}");
        // A host without a value head is named.
        let old = TinyModel { no_scores: true, ..TinyModel::new(11, 6, EOS) };
        let mut ppo = Ppo::from_config(r#"{"num_ppo_epochs": 1}"#).unwrap();
        let e = ppo.loss(&batch(0, 0, 1), &old).unwrap_err().to_string();
        assert!(e.contains("`values`"), "{e}");
    }

    /// The adaptive controller raises `kl_coef` when the KL exceeds the target and lowers it
    /// below, by TRL's proportional rule; an evaluation batch leaves it alone.
    #[test]
    fn adaptive_kl_moves_towards_the_target() {
        for (target, up) in [(1e-6, true), (1e6, false)] {
            let model = TinyModel::new(11, 6, EOS);
            let cfg = format!(
                r#"{{"adaptive_kl": true, "kl_estimator": "k3", "target": {target}, "horizon": 10, "num_ppo_epochs": 1, "kl_coef": 0.1}}"#
            );
            let mut ppo = Ppo::from_config(&cfg).unwrap();
            let out = ppo.loss(&batch(0, 0, 1), &model).unwrap();
            let kl = metric(&out.metrics, "objective/kl");
            assert!(kl > 0.0, "k3 is positive: {kl}");
            assert_eq!(metric(&out.metrics, "kl_coef"), 0.1);
            // 4 rows over a horizon of 10, the error clipped to ±0.2.
            let want = if up { 0.1 * (1.0 + 0.2 * 0.4) } else { 0.1 * (1.0 - 0.2 * 0.4) };
            assert!((ppo.math.kl_coef - want).abs() < 1e-12, "{} vs {want}", ppo.math.kl_coef);
            // Evaluation (num_iterations 1 while 4 were asked) keeps nothing and leaves it.
            let mut ppo =
                Ppo::from_config(&cfg.replace(r#""num_ppo_epochs": 1"#, r#""num_ppo_epochs": 4"#))
                    .unwrap();
            let out = ppo.loss(&batch(0, 0, 1), &model).unwrap();
            assert_eq!(out.num_items, 4);
            assert_eq!(ppo.math.kl_coef, 0.1);
            assert!(ppo.kept(0).is_none() && ppo.rollouts.is_empty());
            // ... nor disturbs a training rollout of the same micro-batch index, and takes a
            // batch of any size.
            ppo.loss(&batch(0, 0, 4), &model).unwrap();
            let kept = ppo.kept(0).unwrap().rollout.advantages.copy();
            let mut odd = batch(0, 0, 1);
            for (_, t) in odd.tensors.iter_mut() {
                *t = t.narrow(0, 0, 3);
            }
            assert_eq!(ppo.loss(&odd, &model).unwrap().num_items, 3);
            assert!(ppo.kept(0).unwrap().rollout.advantages.equal(&kept));
            ppo.loss(&batch(0, 1, 4), &model).unwrap();
        }
    }

    /// Prompts with images: generation names each prompt's row, and every forward carries
    /// exactly its rows' image patches (prompt 0: one image of 4 patches, prompt 1 none,
    /// prompt 2: two images of 4 and 8, prompt 3: one of 4).
    #[test]
    fn image_prompts_carry_their_rows_pixels() {
        let model = TinyModel::new(11, 6, EOS);
        let mut ppo =
            Ppo::from_config(r#"{"num_ppo_epochs": 1, "num_mini_batches": 2, "seed": 3}"#).unwrap();
        let grid = Tensor::from_slice(&[1i64, 2, 2, 1, 2, 2, 1, 2, 4, 1, 2, 2]).view([4, 3]);
        let pixels = Tensor::arange(20, (Kind::Float, Device::Cpu)).view([20, 1]);
        let mut b = batch(0, 0, 2);
        let mut meta: serde_json::Value = serde_json::from_str(&b.meta_json).unwrap();
        meta["images_per_prompt"] = serde_json::json!([1, 0, 2, 1]);
        b.meta_json = meta.to_string();
        b.tensors.push(("pixel_values".into(), pixels));
        b.tensors.push(("image_grid_thw".into(), grid));
        // Each row's patches: row 0 → 0..4, row 1 → none, row 2 → 4..16, row 3 → 16..20.
        let patches = |rows: &[usize]| -> Vec<f32> {
            let blocks = [0..4, 0..0, 4..16, 16..20];
            rows.iter().flat_map(|&r| blocks[r].clone().map(|p| p as f32)).collect()
        };
        for iteration in 0..2u64 {
            let mut bi = Batch {
                tensors: b.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
                meta_json: b.meta_json.clone(),
            };
            let mut meta: serde_json::Value = serde_json::from_str(&bi.meta_json).unwrap();
            meta["iteration"] = serde_json::json!(iteration);
            bi.meta_json = meta.to_string();
            model.forward_pixels.borrow_mut().clear();
            ppo.loss(&bi, &model).unwrap();
            let seen = model.forward_pixels.borrow();
            let rows = mini_batch_rows(&ppo.cfg, 0, 0, iteration, 4);
            // Iteration 0: the policy and reference rollout passes over all rows, then the step.
            let mut want: Vec<Vec<usize>> = Vec::new();
            if iteration == 0 {
                want.push((0..4).collect());
                want.push((0..4).collect());
            }
            want.push(rows);
            assert_eq!(seen.len(), want.len());
            for (got, rows) in seen.iter().zip(&want) {
                let got = got
                    .as_ref()
                    .map_or(Vec::new(), |t| Vec::<f32>::try_from(&t.reshape([-1])).unwrap());
                assert_eq!(got, patches(rows), "rows {rows:?}");
            }
        }
        assert_eq!(model.generated.borrow()[0].1["prompt_rows"], serde_json::json!([0, 1, 2, 3]));
    }

    /// `stop_token_id`: the rewards score each response up to its first stop token, and the
    /// rollout pads what follows (TRL's `truncate_response`).
    #[test]
    fn stop_token_truncates_what_is_scored() {
        let model = TinyModel::new(11, 6, EOS);
        let (ids, mask) = prompts();
        let rows: Vec<Vec<i64>> = (0..4)
            .map(|r| {
                let row = Vec::<i64>::try_from(&ids.get(r)).unwrap();
                let m = Vec::<i64>::try_from(&mask.get(r)).unwrap();
                row.into_iter().zip(m).filter(|(_, k)| *k != 0).map(|(i, _)| i).collect()
            })
            .collect();
        let completions: Vec<Vec<i64>> = rows.iter().map(|p| model.completion(p, 0, 53)).collect();
        let (row, stop) = completions
            .iter()
            .enumerate()
            .find(|(_, c)| c.len() >= 3 && c[0] != c[1])
            .map(|(r, c)| (r, c[1]))
            .expect("a completion of 3+ tokens");
        // Two epochs, so that the rollout stays kept after the first step.
        let cfg = format!(r#"{{"num_ppo_epochs": 2, "stop_token_id": {stop}}}"#);
        let mut ppo = Ppo::from_config(&cfg).unwrap();
        ppo.loss(&batch(0, 0, 2), &model).unwrap();
        let scored = model.rewarded.borrow();
        for (r, c) in completions.iter().enumerate() {
            let end = c.iter().position(|&t| t == stop).map_or(c.len(), |at| at + 1);
            let want: Vec<String> = c[..end].iter().map(|t| t.to_string()).collect();
            assert_eq!(scored[r], want.join(" "), "row {r}");
        }
        let post = &ppo.kept(0).unwrap().rollout.postprocessed_responses;
        let got = Vec::<i64>::try_from(&post.get(row as i64)).unwrap();
        assert_eq!(&got[..2], &completions[row][..2]);
        assert!(got[2..].iter().all(|&t| t == PAD), "{got:?}");
    }
}
