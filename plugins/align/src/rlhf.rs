//! The tensor math of RLHF (issue 21): TRL 1.16's reward-model loss and the PPO trainer's
//! rollout post-processing, advantages and clipped losses, as plain functions over tensors.
//! The `reward_model` and `ppo` plugins ([`crate::reward_model`], [`crate::ppo`]) call them.
//!
//! * [`reward_model_loss`]: `RewardTrainer.compute_loss` (trl/trainer/reward_trainer.py of
//!   TRL 1.16), with its `margin` column, `center_rewards_coefficient` and logged metrics.
//! * PPO: TRL 1.16 no longer ships a `PPOTrainer`; the math follows the last one,
//!   huggingface/trl's `trl/experimental/ppo/ppo_trainer.py` (`PPOTrainer.train`), line by
//!   line. [`ppo_rollout`] is the no-grad part after generation (truncation after the stop
//!   token, padding masks, `INVALID_LOGPROB`, the missing-EOS penalty, the per-token KL
//!   penalty, the score at each sequence's last token, reward whitening, GAE, returns and
//!   advantage whitening); [`ppo_step_loss`] is one micro-batch of the PPO epochs (clipped
//!   policy loss, clipped value loss and the stats); [`PpoStats`] and [`Rollout::metrics`]
//!   give what TRL logs.
//!
//! `tests/python/rlhf_reference.py` produced `tests/data/rlhf_reference.json` (inputs and
//! TRL's numbers, float64); the unit tests below compare with it.
use ferrotune_plugin_api::prelude::*;

/// The log-probability TRL writes at padding positions (`ppo_trainer.py`'s `INVALID_LOGPROB`).
pub const INVALID_LOGPROB: f64 = 1.0;

fn scalar(t: &Tensor) -> PluginResult<f64> {
    Ok(t.f_double_value(&[])?)
}

// ---------------------------------------------------------------- reward modelling

/// The reward model's loss and logged metrics for one batch of pairs.
pub struct RewardModelLoss {
    /// −log σ(r_c − r_r [− margin]) averaged over pairs, plus the centring term.
    pub loss: Tensor,
    /// `accuracy`: mean of (r_c > r_r) (computed in float32, as TRL's `.float()`).
    pub accuracy: f64,
    /// `margin`: mean of r_c − r_r (the `margin` column plays no part in it).
    pub margin: f64,
    /// `min_reward`, `mean_reward`, `max_reward` over the chosen and rejected scores.
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

impl RewardModelLoss {
    /// The metrics under TRL's names.
    pub fn metrics(&self) -> PluginResult<Vec<(String, f64)>> {
        Ok(vec![
            ("loss".into(), scalar(&self.loss)?),
            ("accuracy".into(), self.accuracy),
            ("margin".into(), self.margin),
            ("min_reward".into(), self.min_reward),
            ("mean_reward".into(), self.mean_reward),
            ("max_reward".into(), self.max_reward),
        ])
    }
}

/// TRL 1.16 `RewardTrainer.compute_loss` on the scores of B pairs (`[B]` each; the model's
/// `[2B, 1]` logits split in halves, chosen first). `margin`: the optional `[B]` column;
/// `center_rewards_coefficient`: adds `coef · mean((r_c + r_r)²)`.
pub fn reward_model_loss(
    rewards_chosen: &Tensor,
    rewards_rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> PluginResult<RewardModelLoss> {
    if rewards_chosen.size() != rewards_rejected.size() || rewards_chosen.dim() != 1 {
        return Err(PluginError::invalid(format!(
            "reward model: chosen scores {:?} and rejected scores {:?} must both be [B]",
            rewards_chosen.size(),
            rewards_rejected.size()
        )));
    }
    let diff = rewards_chosen.f_sub(rewards_rejected)?;
    let logits = match margin {
        Some(m) => {
            if m.size() != rewards_chosen.size() {
                return Err(PluginError::invalid(format!(
                    "reward model: margin {:?} must be [B] = {:?}",
                    m.size(),
                    rewards_chosen.size()
                )));
            }
            diff.f_sub(&m.f_to_kind(diff.kind())?)?
        }
        None => diff.shallow_clone(),
    };
    let mut loss = logits.f_log_sigmoid()?.f_mean(logits.kind())?.f_neg()?;
    if let Some(coef) = center_rewards_coefficient {
        let center = rewards_chosen.f_add(rewards_rejected)?.f_square()?.f_mean(logits.kind())?;
        loss = loss.f_add(&center.f_mul_scalar(coef)?)?;
    }
    let all = Tensor::f_cat(&[rewards_chosen, rewards_rejected], 0)?.f_detach()?;
    let accuracy = rewards_chosen.f_gt_tensor(rewards_rejected)?.f_to_kind(Kind::Float)?;
    Ok(RewardModelLoss {
        loss,
        accuracy: scalar(&accuracy.f_mean(Kind::Float)?)?,
        margin: scalar(&diff.f_detach()?.f_mean(diff.kind())?)?,
        min_reward: scalar(&all.f_min()?)?,
        mean_reward: scalar(&all.f_mean(all.kind())?)?,
        max_reward: scalar(&all.f_max()?)?,
    })
}

// ---------------------------------------------------------------- masked statistics

/// TRL's `first_true_indices`: per row (last dim), the index of the first true element, or
/// the row length when there is none.
pub fn first_true_indices(bools: &Tensor) -> PluginResult<Tensor> {
    let row_len = *bools.size().last().unwrap_or(&0);
    let not = bools.f_logical_not()?.f_to_kind(Kind::Int64)?;
    let idx = Tensor::f_arange(row_len, (Kind::Int64, bools.device()))?;
    let zero_or_index = not.f_mul_scalar(row_len)?.f_add(&idx)?;
    Ok(zero_or_index.f_min_dim(-1, false)?.0)
}

/// TRL's `truncate_response`: every token after the first `stop_token_id` becomes
/// `pad_token_id` (`[B, T]`).
pub fn truncate_response(
    stop_token_id: i64,
    pad_token_id: i64,
    responses: &Tensor,
) -> PluginResult<Tensor> {
    let trunc_idxs = first_true_indices(&responses.f_eq(stop_token_id)?)?.f_unsqueeze(-1)?;
    let t = responses.size()[1];
    let idxs = Tensor::f_arange(t, (Kind::Int64, responses.device()))?.f_view([1, t])?;
    Ok(responses.f_masked_fill(&idxs.f_gt_tensor(&trunc_idxs)?, pad_token_id)?)
}

/// `masked_mean(values, mask)` over all elements: Σ(values · mask) / Σ mask.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> PluginResult<Tensor> {
    let m = mask.f_to_kind(values.kind())?;
    Ok(values.f_mul(&m)?.f_sum(values.kind())?.f_div(&m.f_sum(values.kind())?)?)
}

/// `masked_var(values, mask, unbiased)`; an error when the mask is empty. The Bessel factor
/// n / (n − 1) is float32 whatever the values' type, as TRL's integer division gives.
pub fn masked_var(values: &Tensor, mask: &Tensor, unbiased: bool) -> PluginResult<Tensor> {
    let mean = masked_mean(values, mask)?;
    let centered = values.f_sub(&mean)?;
    let mut variance = masked_mean(&centered.f_square()?, mask)?;
    if unbiased {
        let mask_sum = mask.f_to_kind(values.kind())?.f_sum(values.kind())?;
        if scalar(&mask_sum)? == 0.0 {
            return Err(PluginError::invalid(
                "masked variance of an empty mask (a micro-batch without response tokens)",
            ));
        }
        // TRL divides the integer mask sums, which yields torch's default float32
        let n = mask_sum.f_to_kind(Kind::Float)?;
        let bessel = n.f_div(&n.f_sub_scalar(1.0)?)?.f_to_kind(values.kind())?;
        variance = variance.f_mul(&bessel)?;
    }
    Ok(variance)
}

/// `masked_whiten(values, mask, shift_mean)`: (x − mean) · rsqrt(var + 1e-8) with the masked,
/// unbiased statistics; `shift_mean = false` adds the mean back.
pub fn masked_whiten(values: &Tensor, mask: &Tensor, shift_mean: bool) -> PluginResult<Tensor> {
    let mean = masked_mean(values, mask)?;
    let var = masked_var(values, mask, true)?;
    let mut whitened = values.f_sub(&mean)?.f_mul(&var.f_add_scalar(1e-8)?.f_rsqrt()?)?;
    if !shift_mean {
        whitened = whitened.f_add(&mean)?;
    }
    Ok(whitened)
}

// ---------------------------------------------------------------- PPO

/// TRL's `kl_estimator`: `k1` (−log r) or `k3` ((r − 1) − log r), r = π_ref / π.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    K1,
    K3,
}

impl KlEstimator {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "k1" => Some(Self::K1),
            "k3" => Some(Self::K3),
            _ => None,
        }
    }
}

/// PPO's keys, with TRL's `PPOConfig` defaults.
#[derive(Debug, Clone)]
pub struct PpoConfig {
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub gamma: f64,
    pub lam: f64,
    pub whiten_rewards: bool,
    pub missing_eos_penalty: Option<f64>,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            missing_eos_penalty: None,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        }
    }
}

/// What the rollout produced, `[B, T]` over the T generated positions unless noted.
pub struct RolloutInputs<'a> {
    /// The generated tokens, as generated (before truncation).
    pub responses: &'a Tensor,
    /// The sampling policy's log-probabilities of `responses` (logits / (temperature + 1e-7)).
    pub logprobs: &'a Tensor,
    /// The reference model's, likewise.
    pub ref_logprobs: &'a Tensor,
    /// The value head at the positions that predict each response token.
    pub values: &'a Tensor,
    /// `[B]`: the reward model's score of the truncated response (and/or reward plugins').
    pub scores: &'a Tensor,
    pub pad_token_id: i64,
    /// TRL's `stop_token_id`: truncate after it (None: no truncation).
    pub stop_token_id: Option<i64>,
    /// The tokenizer's EOS: `missing_eos_penalty` applies to truncated responses without it.
    pub eos_token_id: i64,
}

/// The rollout after TRL's post-processing: everything the PPO epochs read.
pub struct Rollout {
    pub postprocessed_responses: Tensor,
    /// `[B]`: index of the last kept token (first pad − 1; −1 when the response starts with pad).
    pub sequence_lengths: Tensor,
    /// `[B]` bool: the truncated response holds `eos_token_id`.
    pub contain_eos_token: Tensor,
    /// `[B]`: the scores after the missing-EOS penalty.
    pub scores: Tensor,
    /// Bool, true after `sequence_lengths` (policy tokens that do not count).
    pub padding_mask: Tensor,
    /// Bool, true after `sequence_lengths + 1` (value positions that do not count).
    pub padding_mask_p1: Tensor,
    /// Log-probabilities with `INVALID_LOGPROB` under `padding_mask`.
    pub logprobs: Tensor,
    pub ref_logprobs: Tensor,
    /// Values with 0 under `padding_mask_p1`.
    pub values: Tensor,
    pub kl: Tensor,
    pub non_score_reward: Tensor,
    pub rewards: Tensor,
    /// Whitened over `~padding_mask`, 0 under it.
    pub advantages: Tensor,
    pub returns: Tensor,
    /// `val/num_eos_tokens`: EOS tokens in the responses as generated.
    pub num_eos_tokens: i64,
}

/// TRL's PPO rollout post-processing and advantage estimation (`PPOTrainer.train`, from
/// "Response Processing 1" to the advantage whitening), under no grad.
pub fn ppo_rollout(cfg: &PpoConfig, inp: &RolloutInputs) -> PluginResult<Rollout> {
    let _guard = tch::no_grad_guard();
    let size = inp.responses.size();
    if size.len() != 2 {
        return Err(PluginError::invalid(format!("PPO: responses {size:?} must be [B, T]")));
    }
    let (b, t) = (size[0], size[1]);
    for (name, x) in
        [("logprobs", inp.logprobs), ("ref_logprobs", inp.ref_logprobs), ("values", inp.values)]
    {
        if x.size() != size {
            return Err(PluginError::invalid(format!(
                "PPO: {name} {:?} must match the responses {size:?}",
                x.size()
            )));
        }
    }
    if inp.scores.size() != [b] {
        return Err(PluginError::invalid(format!(
            "PPO: scores {:?} must be [{b}]",
            inp.scores.size()
        )));
    }
    let kind = inp.logprobs.kind();
    let device = inp.responses.device();
    let postprocessed = match inp.stop_token_id {
        Some(stop) => truncate_response(stop, inp.pad_token_id, inp.responses)?,
        None => inp.responses.shallow_clone(),
    };
    let sequence_lengths =
        first_true_indices(&postprocessed.f_eq(inp.pad_token_id)?)?.f_sub_scalar(1)?;
    let contain_eos_token = postprocessed.f_eq(inp.eos_token_id)?.f_any_dim(-1, false)?;
    let mut scores = inp.scores.f_to_kind(kind)?;
    if let Some(penalty) = cfg.missing_eos_penalty {
        let missing = contain_eos_token.f_logical_not()?.f_to_kind(kind)?;
        scores = scores.f_sub(&missing.f_mul_scalar(penalty)?)?;
    }
    let response_idxs = Tensor::f_arange(t, (Kind::Int64, device))?.f_repeat([b, 1])?;
    let padding_mask = response_idxs.f_gt_tensor(&sequence_lengths.f_unsqueeze(1)?)?;
    let logprobs = inp.logprobs.f_masked_fill(&padding_mask, INVALID_LOGPROB)?;
    let ref_logprobs =
        inp.ref_logprobs.f_to_kind(kind)?.f_masked_fill(&padding_mask, INVALID_LOGPROB)?;
    let sequence_lengths_p1 = sequence_lengths.f_add_scalar(1)?;
    let padding_mask_p1 = response_idxs.f_gt_tensor(&sequence_lengths_p1.f_unsqueeze(1)?)?;
    let values = inp.values.f_to_kind(kind)?.f_masked_fill(&padding_mask_p1, 0.0)?;

    // 4. rewards: the per-token KL penalty, the score at the last token (the one after the
    // last kept token, which is the EOS when the response stopped; the last one otherwise)
    let logr = ref_logprobs.f_sub(&logprobs)?;
    let kl = match cfg.kl_estimator {
        KlEstimator::K1 => logr.f_neg()?,
        KlEstimator::K3 => logr.f_exp()?.f_sub_scalar(1.0)?.f_sub(&logr)?,
    };
    let non_score_reward = kl.f_mul_scalar(-cfg.kl_coef)?;
    let actual_end =
        sequence_lengths_p1.f_where_self(&sequence_lengths_p1.f_lt(t)?, &sequence_lengths)?;
    let mut rewards =
        non_score_reward.f_scatter_add(1, &actual_end.f_unsqueeze(1)?, &scores.f_unsqueeze(1)?)?;

    // 5. whiten rewards
    let valid_p1 = padding_mask_p1.f_logical_not()?;
    if cfg.whiten_rewards {
        rewards =
            masked_whiten(&rewards, &valid_p1, false)?.f_masked_fill(&padding_mask_p1, 0.0)?;
    }

    // 6. GAE backwards over the positions, returns, whitened advantages
    let mut lastgaelam = Tensor::f_zeros([b], (kind, device))?;
    let mut reversed = Vec::with_capacity(t as usize);
    for step in (0..t).rev() {
        let delta = if step < t - 1 {
            let next = values.f_select(1, step + 1)?.f_mul_scalar(cfg.gamma)?;
            rewards.f_select(1, step)?.f_add(&next)?
        } else {
            rewards.f_select(1, step)?.f_add_scalar(cfg.gamma * 0.0)?
        };
        let delta = delta.f_sub(&values.f_select(1, step)?)?;
        lastgaelam = delta.f_add(&lastgaelam.f_mul_scalar(cfg.gamma * cfg.lam)?)?;
        reversed.push(lastgaelam.shallow_clone());
    }
    reversed.reverse();
    let advantages = Tensor::f_stack(&reversed, 1)?;
    let returns = advantages.f_add(&values)?;
    let advantages = masked_whiten(&advantages, &padding_mask.f_logical_not()?, true)?
        .f_masked_fill(&padding_mask, 0.0)?;
    let num_eos_tokens = inp.responses.f_eq(inp.eos_token_id)?.f_sum(Kind::Int64)?.int64_value(&[]);

    Ok(Rollout {
        postprocessed_responses: postprocessed,
        sequence_lengths,
        contain_eos_token,
        scores,
        padding_mask,
        padding_mask_p1,
        logprobs,
        ref_logprobs,
        values,
        kl,
        non_score_reward,
        rewards,
        advantages,
        returns,
        num_eos_tokens,
    })
}

impl Rollout {
    /// The rollout's metrics as TRL logs them: `objective/kl` (Σ_t kl, mean over rows),
    /// `objective/entropy` (Σ_t −logprobs: padding counts −`INVALID_LOGPROB` per position, as
    /// in TRL), `objective/non_score_reward`, `objective/rlhf_reward`, `objective/scores`,
    /// `val/num_eos_tokens`.
    pub fn metrics(&self) -> PluginResult<Vec<(String, f64)>> {
        let k = self.kl.kind();
        let row_mean = |x: &Tensor| -> PluginResult<f64> {
            scalar(&x.f_sum_dim_intlist(1, false, k)?.f_mean(k)?)
        };
        let non_score = row_mean(&self.non_score_reward)?;
        let scores = scalar(&self.scores.f_mean(k)?)?;
        Ok(vec![
            ("objective/kl".into(), row_mean(&self.kl)?),
            ("objective/entropy".into(), row_mean(&self.logprobs.f_neg()?)?),
            ("objective/non_score_reward".into(), non_score),
            ("objective/rlhf_reward".into(), non_score + scores),
            ("objective/scores".into(), scores),
            ("val/num_eos_tokens".into(), self.num_eos_tokens as f64),
        ])
    }
}

/// Per-token log-probabilities of `tokens` `[b, T]` and TRL's entropy
/// (logsumexp − Σ p · logits) from the policy's logits `[b, T, V]` at the positions that
/// predict them, both after TRL's `logits / (temperature + 1e-7)`.
pub fn logprobs_and_entropy(
    logits: &Tensor,
    tokens: &Tensor,
    temperature: f64,
) -> PluginResult<(Tensor, Tensor)> {
    let logits = logits.f_div_scalar(temperature + 1e-7)?;
    let logp = logits
        .f_log_softmax(-1, logits.kind())?
        .f_gather(-1, &tokens.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?;
    let entropy = {
        let _g = tch::no_grad_guard();
        let p = logits.f_softmax(-1, logits.kind())?;
        logits.f_logsumexp([-1], false)?.f_sub(&p.f_mul(&logits)?.f_sum_dim_intlist(
            -1,
            false,
            logits.kind(),
        )?)?
    };
    Ok((logp, entropy))
}

/// One micro-batch of TRL's PPO epochs.
pub struct PpoStepLoss {
    /// `pg_loss + vf_coef · vf_loss` (with grad).
    pub loss: Tensor,
    pub pg_loss: Tensor,
    pub vf_loss: Tensor,
    pub pg_clipfrac: f64,
    pub vf_clipfrac: f64,
    /// 0.5 · mean((new − old)²) over every position, padding included (as TRL).
    pub approxkl: f64,
    /// Mean of the ratio over every position.
    pub ratio: f64,
    /// Mean per-token entropy over every position, when given.
    pub entropy: Option<f64>,
}

/// TRL's PPO loss for the micro-batch `indices` (`[b]`, int64 rows of the rollout):
/// `new_logprobs` `[b, T]` of the rollout's responses under the current policy, `vpred`
/// `[b, T]` the value head's predictions (both raw: this masks them as TRL does), `entropy`
/// optionally the per-token entropy `[b, T]` (for the stats only).
pub fn ppo_step_loss(
    cfg: &PpoConfig,
    rollout: &Rollout,
    indices: &Tensor,
    new_logprobs: &Tensor,
    vpred: &Tensor,
    entropy: Option<&Tensor>,
) -> PluginResult<PpoStepLoss> {
    let pick = |x: &Tensor| -> PluginResult<Tensor> { Ok(x.f_index_select(0, indices)?) };
    let (mb_advantage, mb_logprobs) = (pick(&rollout.advantages)?, pick(&rollout.logprobs)?);
    let (mb_return, mb_values) = (pick(&rollout.returns)?, pick(&rollout.values)?);
    let (padding_mask, padding_mask_p1) =
        (pick(&rollout.padding_mask)?, pick(&rollout.padding_mask_p1)?);
    if new_logprobs.size() != mb_logprobs.size() || vpred.size() != mb_values.size() {
        return Err(PluginError::invalid(format!(
            "PPO: new log-probabilities {:?} and value predictions {:?} must be {:?}",
            new_logprobs.size(),
            vpred.size(),
            mb_logprobs.size()
        )));
    }
    let new_logprobs = new_logprobs.f_masked_fill(&padding_mask, INVALID_LOGPROB)?;
    let vpred = vpred.f_masked_fill(&padding_mask_p1, 0.0)?;
    let vpredclipped = vpred.f_clamp_tensor(
        Some(&mb_values.f_sub_scalar(cfg.cliprange_value)?),
        Some(&mb_values.f_add_scalar(cfg.cliprange_value)?),
    )?;
    let vf_losses1 = vpred.f_sub(&mb_return)?.f_square()?;
    let vf_losses2 = vpredclipped.f_sub(&mb_return)?.f_square()?;
    let valid_p1 = padding_mask_p1.f_logical_not()?;
    let vf_loss = masked_mean(&vf_losses1.f_maximum(&vf_losses2)?, &valid_p1)?.f_mul_scalar(0.5)?;
    let logprobs_diff = new_logprobs.f_sub(&mb_logprobs)?;
    let ratio = logprobs_diff.f_exp()?;
    let neg_adv = mb_advantage.f_neg()?;
    let pg_losses = neg_adv.f_mul(&ratio)?;
    let pg_losses2 = neg_adv.f_mul(&ratio.f_clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let valid = padding_mask.f_logical_not()?;
    let pg_loss = masked_mean(&pg_losses.f_maximum(&pg_losses2)?, &valid)?;
    let loss = pg_loss.f_add(&vf_loss.f_mul_scalar(cfg.vf_coef)?)?;

    let _g = tch::no_grad_guard();
    let frac = |a: &Tensor, b: &Tensor, m: &Tensor| -> PluginResult<f64> {
        scalar(&masked_mean(&a.f_gt_tensor(b)?.f_to_kind(Kind::Float)?, m)?)
    };
    let k = logprobs_diff.kind();
    Ok(PpoStepLoss {
        pg_clipfrac: frac(&pg_losses2, &pg_losses, &valid)?,
        vf_clipfrac: frac(&vf_losses2, &vf_losses1, &valid_p1)?,
        approxkl: scalar(&logprobs_diff.f_square()?.f_mean(k)?)? * 0.5,
        ratio: scalar(&ratio.f_mean(k)?)?,
        entropy: match entropy {
            Some(e) => Some(scalar(&e.f_mean(e.kind())?)?),
            None => None,
        },
        loss,
        pg_loss,
        vf_loss,
    })
}

/// The PPO epochs' stats of one update, logged as TRL: the means over every micro-batch of
/// `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`,
/// `val/clipfrac_avg`, `policy/entropy_avg` (when given), `val/ratio`, and `val/ratio_var`
/// (the unbiased variance of the micro-batches' mean ratios).
#[derive(Default)]
pub struct PpoStats {
    rows: Vec<[f64; 7]>,
}

impl PpoStats {
    pub fn push(&mut self, step: &PpoStepLoss) -> PluginResult<()> {
        self.rows.push([
            step.approxkl,
            step.pg_clipfrac,
            scalar(&step.pg_loss)?,
            scalar(&step.vf_loss)?,
            step.vf_clipfrac,
            step.entropy.unwrap_or(f64::NAN),
            step.ratio,
        ]);
        Ok(())
    }

    pub fn metrics(&self) -> Vec<(String, f64)> {
        let n = self.rows.len() as f64;
        let mean = |i: usize| self.rows.iter().map(|r| r[i]).sum::<f64>() / n;
        let names = [
            "policy/approxkl_avg",
            "policy/clipfrac_avg",
            "loss/policy_avg",
            "loss/value_avg",
            "val/clipfrac_avg",
            "policy/entropy_avg",
            "val/ratio",
        ];
        let mut out: Vec<(String, f64)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 5 || self.rows.iter().all(|r| r[5].is_finite()))
            .map(|(i, name)| (name.to_string(), mean(i)))
            .collect();
        let m = mean(6);
        let var = self.rows.iter().map(|r| (r[6] - m).powi(2)).sum::<f64>() / (n - 1.0);
        out.push(("val/ratio_var".into(), var));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const REFERENCE: &str = include_str!("../tests/data/rlhf_reference.json");
    const TOL: f64 = 1e-6;

    fn shape(v: &Value) -> Vec<i64> {
        v["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
    }

    fn f64t(v: &Value) -> Tensor {
        let data: Vec<f64> =
            v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        Tensor::from_slice(&data).reshape(shape(v))
    }

    fn i64t(v: &Value) -> Tensor {
        let data: Vec<i64> =
            v["data"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        Tensor::from_slice(&data).reshape(shape(v))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        let a = a.to_kind(Kind::Double);
        (a - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    /// Asserts and returns |got − want|.
    fn check(what: &str, got: f64, want: f64) -> f64 {
        let d = (got - want).abs();
        assert!(d <= TOL, "{what}: got {got}, TRL {want} (|Δ| = {d:e})");
        if d > 1e-12 {
            println!("{what}: |Δ| = {d:e}");
        }
        d
    }

    #[test]
    fn reward_model_loss_matches_trl() {
        let all: Value = serde_json::from_str(REFERENCE).unwrap();
        let mut worst = 0f64;
        for (i, case) in all["reward"].as_array().unwrap().iter().enumerate() {
            let margin = case["margin"].is_object().then(|| f64t(&case["margin"]));
            let out = reward_model_loss(
                &f64t(&case["chosen"]),
                &f64t(&case["rejected"]),
                margin.as_ref(),
                case["center_rewards_coefficient"].as_f64(),
            )
            .unwrap();
            let m = out.metrics().unwrap();
            for (name, key) in [
                ("loss", "loss"),
                ("accuracy", "accuracy"),
                ("margin", "mean_margin"),
                ("min_reward", "min_reward"),
                ("mean_reward", "mean_reward"),
                ("max_reward", "max_reward"),
            ] {
                let got = m.iter().find(|(n, _)| n == name).unwrap().1;
                worst = worst.max(check(
                    &format!("reward case {i} {name}"),
                    got,
                    case[key].as_f64().unwrap(),
                ));
            }
        }
        println!("reward model: max |Δ| = {worst:e}");
        assert!(reward_model_loss(
            &Tensor::zeros([2], (Kind::Double, Device::Cpu)),
            &Tensor::zeros([3], (Kind::Double, Device::Cpu)),
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn ppo_rollout_and_steps_match_trl() {
        let all: Value = serde_json::from_str(REFERENCE).unwrap();
        let mut worst = 0f64;
        for (c, case) in all["ppo"].as_array().unwrap().iter().enumerate() {
            let k = &case["config"];
            let cfg = PpoConfig {
                kl_coef: k["kl_coef"].as_f64().unwrap(),
                kl_estimator: KlEstimator::parse(k["kl_estimator"].as_str().unwrap()).unwrap(),
                gamma: k["gamma"].as_f64().unwrap(),
                lam: k["lam"].as_f64().unwrap(),
                whiten_rewards: k["whiten_rewards"].as_bool().unwrap(),
                missing_eos_penalty: k["missing_eos_penalty"].as_f64(),
                cliprange: k["cliprange"].as_f64().unwrap(),
                cliprange_value: k["cliprange_value"].as_f64().unwrap(),
                vf_coef: k["vf_coef"].as_f64().unwrap(),
            };
            let temperature = k["temperature"].as_f64().unwrap();
            let eos = k["eos_token_id"].as_i64().unwrap();
            let inp = &case["inputs"];
            let responses = i64t(&inp["responses"]);
            let (logprobs, ref_logprobs) = (f64t(&inp["logprobs"]), f64t(&inp["ref_logprobs"]));
            let (values, scores) = (f64t(&inp["values"]), f64t(&inp["scores"]));
            let rollout = ppo_rollout(
                &cfg,
                &RolloutInputs {
                    responses: &responses,
                    logprobs: &logprobs,
                    ref_logprobs: &ref_logprobs,
                    values: &values,
                    scores: &scores,
                    pad_token_id: k["pad_token_id"].as_i64().unwrap(),
                    stop_token_id: Some(eos),
                    eos_token_id: eos,
                },
            )
            .unwrap();
            let r = &case["rollout"];
            for (name, got) in [
                ("postprocessed_responses", &rollout.postprocessed_responses),
                ("sequence_lengths", &rollout.sequence_lengths),
                ("contain_eos_token", &rollout.contain_eos_token),
                ("padding_mask", &rollout.padding_mask),
                ("padding_mask_p1", &rollout.padding_mask_p1),
            ] {
                assert_eq!(
                    got.to_kind(Kind::Int64),
                    i64t(&r[name]),
                    "case {c}: {name} differs from TRL's"
                );
            }
            for (name, got) in [
                ("scores", &rollout.scores),
                ("logprobs", &rollout.logprobs),
                ("ref_logprobs", &rollout.ref_logprobs),
                ("values", &rollout.values),
                ("kl", &rollout.kl),
                ("non_score_reward", &rollout.non_score_reward),
                ("rewards", &rollout.rewards),
                ("advantages", &rollout.advantages),
                ("returns", &rollout.returns),
            ] {
                worst = worst.max(check(
                    &format!("case {c} {name}"),
                    max_diff(got, &f64t(&r[name])),
                    0.0,
                ));
            }

            let mut stats = PpoStats::default();
            for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
                let idx: Vec<i64> = step["indices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect();
                let indices = Tensor::from_slice(&idx);
                let mb_responses = responses.index_select(0, &indices);
                let (new_logprobs, entropy) =
                    logprobs_and_entropy(&f64t(&step["logits"]), &mb_responses, temperature)
                        .unwrap();
                let out = ppo_step_loss(
                    &cfg,
                    &rollout,
                    &indices,
                    &new_logprobs,
                    &f64t(&step["vpred"]),
                    Some(&entropy),
                )
                .unwrap();
                let want = |key: &str| step[key].as_f64().unwrap();
                for (name, got) in [
                    ("loss", out.loss.double_value(&[])),
                    ("pg_loss", out.pg_loss.double_value(&[])),
                    ("vf_loss", out.vf_loss.double_value(&[])),
                    ("pg_clipfrac", out.pg_clipfrac),
                    ("vf_clipfrac", out.vf_clipfrac),
                    ("approxkl", out.approxkl),
                    ("entropy", out.entropy.unwrap()),
                    ("ratio", out.ratio),
                ] {
                    worst = worst.max(check(&format!("case {c} step {s} {name}"), got, want(name)));
                }
                stats.push(&out).unwrap();
            }
            let want = &case["metrics"];
            for (name, got) in rollout.metrics().unwrap().into_iter().chain(stats.metrics()) {
                worst = worst.max(check(
                    &format!("case {c} {name}"),
                    got,
                    want[&name].as_f64().unwrap(),
                ));
            }
        }
        println!("PPO: max |Δ| = {worst:e}");
    }

    /// The loss has the gradient of TRL's through the policy log-probabilities and values.
    #[test]
    fn ppo_step_loss_is_differentiable() {
        let cfg = PpoConfig::default();
        let responses = Tensor::from_slice(&[3i64, 4, 2, 0, 5, 6, 7, 2]).reshape([2, 4]);
        let lp = Tensor::from_slice(&[-1.0f64, -2.0, -0.5, -1.5, -0.7, -0.2, -3.0, -1.0])
            .reshape([2, 4]);
        let values =
            Tensor::from_slice(&[0.1f64, 0.2, 0.3, 0.4, -0.1, 0.0, 0.5, 0.2]).reshape([2, 4]);
        let scores = Tensor::from_slice(&[1.0f64, -1.0]);
        let rollout = ppo_rollout(
            &cfg,
            &RolloutInputs {
                responses: &responses,
                logprobs: &lp,
                ref_logprobs: &(&lp - 0.1),
                values: &values,
                scores: &scores,
                pad_token_id: 0,
                stop_token_id: Some(2),
                eos_token_id: 2,
            },
        )
        .unwrap();
        let new_lp = (&lp + 0.05).set_requires_grad(true);
        let vpred = (&values + 0.3).set_requires_grad(true);
        let out =
            ppo_step_loss(&cfg, &rollout, &Tensor::from_slice(&[0i64, 1]), &new_lp, &vpred, None)
                .unwrap();
        out.loss.backward();
        // padding positions (after each EOS) get no gradient
        let g = new_lp.grad();
        assert_eq!(g.double_value(&[0, 3]), 0.0);
        assert!(g.double_value(&[0, 0]) != 0.0);
        assert!(vpred.grad().double_value(&[1, 0]) != 0.0);
    }
}
