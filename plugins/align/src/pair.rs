//! The preference-pair batch shared by `dpo`, `orpo` and `simpo`: one concatenated batch,
//! chosen rows first (TRL 1.16's `DataCollatorForPreference` layout), one forward for both.
use ferrotune_plugin_api::prelude::*;

use crate::common::{
    bool_mask, get_2d, masked_sum, mean_f64, next_token_logps, next_token_targets_where,
};
use crate::losses::PairLoss;

/// Tensor names of the pair batch that are not model inputs.
pub const PAIR_NON_MODEL_KEYS: [&str; 3] =
    ["completion_mask", "ref_chosen_logps", "ref_rejected_logps"];

/// One forward over a pair batch.
pub struct PairForward {
    /// `log p(input_ids[:, t+1])` at each scored position (0 elsewhere), `[2B, T − 1]`, with a
    /// graph.
    pub per_token: Tensor,
    /// The `target_ids` of the completion tokens alone (`[2B, T]`, −1 elsewhere), for a
    /// reference pass.
    pub completion_targets: Tensor,
    /// `completion_mask[:, 1:]` as bool: the positions whose next token is a completion token.
    pub completion: Tensor,
    /// `attention_mask[:, 1:]` as bool: the positions whose next token is real (prompt or completion).
    pub attention: Tensor,
    /// Completion tokens per row, `completion_mask.sum(1)` (`[2B]`, TRL's IPO lengths).
    pub lengths: Tensor,
    /// Pairs in the batch (B).
    pub pairs: i64,
    /// Chosen and rejected rows with the same completion tokens (a pair that carries no preference).
    pub identical_pairs: i64,
    /// The model inputs, for a reference pass.
    pub inputs: Vec<(String, Tensor)>,
}

/// Checks the pair batch, runs the policy once over it and returns the per-token
/// log-probabilities of the completion tokens; with `chosen_prompt`, also of every real
/// (`attention_mask`) token of the chosen rows (ORPO's NLL). Only those positions reach the
/// model's head.
pub fn pair_forward(
    batch: &Batch,
    ctx: &dyn ObjectiveContext,
    temperature: f64,
    chosen_prompt: bool,
) -> PluginResult<PairForward> {
    let ids = get_2d(batch, "input_ids", None, None)?;
    let (rows, t) = (ids.size()[0], ids.size()[1]);
    if rows == 0 || rows % 2 != 0 {
        return Err(PluginError::invalid(format!(
            "a preference batch holds the chosen rows then the rejected rows (2·pairs rows); `input_ids` has {rows}"
        )));
    }
    let completion_mask = get_2d(batch, "completion_mask", Some(rows), Some(t))?;
    let attention_mask = get_2d(batch, "attention_mask", Some(rows), Some(t))?;
    let inputs = crate::common::model_inputs(batch, &PAIR_NON_MODEL_KEYS);
    let completion_targets = next_token_targets_where(ids, completion_mask)?;
    let targets = if chosen_prompt {
        let device = ids.device();
        let chosen_rows =
            Tensor::f_arange(rows, (Kind::Int64, device))?.f_lt(rows / 2)?.f_unsqueeze(-1)?;
        let scored = bool_mask(attention_mask, device)?
            .f_logical_and(&chosen_rows)?
            .f_logical_or(&bool_mask(completion_mask, device)?)?;
        next_token_targets_where(ids, &scored)?
    } else {
        completion_targets.shallow_clone()
    };
    let per_token = next_token_logps(ctx, &inputs, &targets, temperature, ForwardFlags::NONE)?;
    let device = per_token.device();
    let completion = bool_mask(&completion_mask.f_narrow(1, 1, t - 1)?, device)?;
    let attention = bool_mask(&attention_mask.f_narrow(1, 1, t - 1)?, device)?;
    let per_row = completion.f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)?;
    let empty = per_row.f_eq(0)?.f_nonzero()?;
    if empty.size()[0] > 0 {
        let row = empty.int64_value(&[0, 0]);
        let (side, pair) =
            if row < rows / 2 { ("chosen", row) } else { ("rejected", row - rows / 2) };
        return Err(PluginError::invalid(format!(
            "pair {pair}: the {side} completion has no tokens after the first position (`completion_mask` row {row}); \
             its log-probability is undefined"
        )));
    }
    let lengths = completion_mask.f_to_device(device)?.f_ne(0)?.f_sum_dim_intlist(
        [-1i64].as_slice(),
        false,
        Kind::Int64,
    )?;
    let identical_pairs = tch::no_grad(|| -> PluginResult<i64> {
        let cm = completion_mask.f_ne(0)?;
        let tokens = ids.f_where_scalarother(&cm, -1)?;
        let halves = tokens.f_chunk(2, 0)?;
        let same = halves[0].f_eq_tensor(&halves[1])?.f_all_dim(-1, false)?;
        Ok(same.f_sum(Kind::Int64)?.int64_value(&[]))
    })?;
    Ok(PairForward {
        per_token,
        completion_targets,
        completion,
        attention,
        lengths,
        pairs: rows / 2,
        identical_pairs,
        inputs,
    })
}

impl PairForward {
    /// Per-row log-probability summed over completion tokens, `[2B]`.
    pub fn sum_logps(&self, per_token: &Tensor) -> PluginResult<Tensor> {
        masked_sum(per_token, &self.completion)
    }
    /// Per-row log-probability averaged over completion tokens, `[2B]`.
    pub fn mean_logps(&self, per_token: &Tensor) -> PluginResult<Tensor> {
        let n = self.completion.f_sum_dim_intlist([-1i64].as_slice(), false, per_token.kind())?;
        Ok(masked_sum(per_token, &self.completion)?.f_div(&n)?)
    }
    /// Mean next-token NLL over the chosen rows at positions where `mask` is set (TRL's
    /// `nn.CrossEntropyLoss()` on the chosen half).
    pub fn chosen_nll(&self, mask: &Tensor) -> PluginResult<Tensor> {
        let lp = self.per_token.f_narrow(0, 0, self.pairs)?;
        let m = mask.f_narrow(0, 0, self.pairs)?;
        let n = m.f_sum(Kind::Int64)?.int64_value(&[]).max(1);
        Ok(lp.f_where_scalarother(&m, 0.0)?.f_sum(lp.kind())?.f_neg()?.f_div_scalar(n as f64)?)
    }
}

/// Splits a `[2B]` tensor into its chosen and rejected halves.
pub fn halves(t: &Tensor) -> PluginResult<(Tensor, Tensor)> {
    let mut v = t.f_chunk(2, 0)?;
    let r = v.pop().ok_or_else(|| PluginError::invalid("empty pair batch"))?;
    let c = v.pop().ok_or_else(|| PluginError::invalid("empty pair batch"))?;
    Ok((c, r))
}

/// TRL's reward metrics of a pairwise loss: `rewards/chosen`, `rewards/rejected`,
/// `rewards/accuracies` (chosen reward strictly above rejected), `rewards/margins`.
pub fn reward_metrics(l: &PairLoss) -> PluginResult<Vec<(String, f64)>> {
    let acc = l.chosen_rewards.f_gt_tensor(&l.rejected_rewards)?.f_to_kind(Kind::Double)?;
    Ok(vec![
        ("rewards/chosen".into(), mean_f64(&l.chosen_rewards)?),
        ("rewards/rejected".into(), mean_f64(&l.rejected_rewards)?),
        ("rewards/accuracies".into(), mean_f64(&acc)?),
        ("rewards/margins".into(), mean_f64(&l.chosen_rewards.f_sub(&l.rejected_rewards)?)?),
    ])
}
