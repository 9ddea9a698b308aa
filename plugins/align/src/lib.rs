//! Alignment objectives: `dpo`, `orpo`, `simpo`, `kto` and `grpo`, with TRL 1.16's losses, and
//! the RLHF pair `reward_model` (TRL 1.16's `RewardTrainer`) and `ppo` (the last TRL
//! `PPOTrainer`), whose tensor math is [`rlhf`].
//!
//! The loss math lives in [`losses`] as plain functions over per-sequence (GRPO: per-token)
//! log-probabilities; each follows one TRL 1.16 code path line by line, and
//! `tests/align_loss_parity.rs` checks them, through the loaded plugin, against TRL itself.
//! The plugins gather the inputs: one policy forward through [`ObjectiveContext::forward`]
//! asking for the log-probabilities of the scored tokens alone
//! ([`ferrotune_plugin_api::target_logps`]: the host computes them in chunks from the last
//! hidden state, never the `[B, T, V]` logits; prompt and padding positions have no target and
//! never reach the head), and the reference as the same model with
//! [`ForwardFlags::DISABLE_ADAPTER`] (no second copy of the weights) under `NO_GRAD`, unless
//! the batch carries precomputed reference log-probabilities. With full fine-tuning (no adapter) the host must supply those.
//!
//! # Batch conventions (what the host collates)
//! Token tensors are int (`i64`), masks 0/1 (any int or bool type), log-probabilities float.
//! Every other tensor in the batch (`pixel_values`, `image_grid_thw`, …) is passed to the
//! model's forward unchanged.
//!
//! **Preference pairs** (`dpo`, `orpo`, `simpo`): one concatenated batch, the B chosen rows
//! first, then the B rejected rows in the same pair order (TRL 1.16's
//! `DataCollatorForPreference`), right-padded to one width T:
//! * `input_ids` `[2B, T]`: prompt + completion;
//! * `attention_mask` `[2B, T]`: 1 on real tokens;
//! * `completion_mask` `[2B, T]`: 1 on completion tokens (the tokens that are scored);
//! * optional `ref_chosen_logps`, `ref_rejected_logps` `[B]` (dpo only): precomputed
//!   reference log-probabilities, each the sum over the completion tokens; give both or neither.
//!
//! Scored positions: position t scores token t + 1 when `completion_mask[t + 1]` is 1, so a
//! completion must hold at least one token after position 0. ORPO's NLL term covers every
//! token with `attention_mask` 1 (prompt and completion) of the chosen rows, as TRL's ORPO.
//!
//! **KTO** (`kto`), one row per (prompt, completion), right-padded:
//! * `input_ids`, `attention_mask`, `completion_mask` `[N, T]` as above;
//! * `kto_desirable` `[N]`: 1 (or true) for a desirable completion, 0 for an undesirable one
//!   (TRL's `label`);
//! * for `loss_type: kto`, the KL batch TRL builds by rotating the completions by one within
//!   the batch, (x₁, y_N), (x₂, y₁), …, (x_N, y_{N−1}): `KL_input_ids`, `KL_attention_mask`,
//!   `KL_completion_mask` `[N, T′]`;
//! * optional `ref_logps`, `ref_KL_logps` `[N]`: precomputed reference log-probabilities.
//!
//! **GRPO** (`grpo`), two forms:
//! * *scored* (TRL 1.16's `_compute_loss` inputs): `prompt_ids`, `prompt_mask` `[B, P]`
//!   (left-padded), `completion_ids`, `completion_mask` `[B, C]` (right-padded; the mask is 0
//!   after the first EOS), `advantages` `[B]` (or `[B, C]`), optional `old_per_token_logps`
//!   `[B, C]` (the sampling policy's; absent = the current policy's, detached: TRL's
//!   `num_iterations = 1`), optional `ref_per_token_logps` `[B, C]` (absent and `beta ≠ 0`:
//!   computed with the adapter disabled);
//! * *prompts only* (no `completion_ids`): `prompt_ids`, `prompt_mask` `[B, P]`; the plugin
//!   calls [`ObjectiveContext::generate`] for `num_generations` completions per prompt (rows
//!   grouped per prompt), decodes them, scores them with [`ObjectiveContext::rewards`]
//!   (each reward's weight as the host reports it), computes the advantages with
//!   [`losses::group_advantages`] and then the loss as above. Optional metadata: `prompts`
//!   (B rendered prompt strings; else the prompt ids are decoded), `samples` (B canonical
//!   samples, handed to the rewards as `sample_json`, where `exact_match` finds its reference
//!   answer), `pad_token_id` (completion padding, default 0). Completions are taken as
//!   `generate` returns them (EOS included, nothing after it).
//!
//! **Reward model** (`reward_model`): the preference-pairs layout above (`input_ids`,
//! `attention_mask` `[2B, T]`, chosen rows first; `completion_mask` is not read), optional
//! `margin` `[B]` (TRL's margin column; the host adds it when every sample of the batch has one).
//! One forward with [`ForwardFlags::SCORES`] (no logits): the score head at each row's last
//! `attention_mask` position, split into chosen and rejected, [`rlhf::reward_model_loss`]. Needs
//! `preference_pairs` and `score_head`.
//!
//! **PPO** (`ppo`): a prompts batch as GRPO's (`prompt_ids`, `prompt_mask`, vision inputs with
//! `images_per_prompt` / `videos_per_prompt`; metadata `prompts`, `samples`, `pad_token_id`,
//! and `eos_token_id`, an id or a list, else taken from the responses that stopped early).
//! Needs `generation`, `rewards`, `reference`, `value_head` and
//! `num_iterations=<num_ppo_epochs · num_mini_batches>`: iteration 0 generates one response per
//! prompt, scores it (Σ weight · reward), runs the policy (log-probs and values, one forward
//! with `TARGET_LOGPS | VALUES`) and the reference without a graph and keeps the rollout by
//! `micro_index`; each iteration trains one mini-batch of a per-epoch permutation (see [`ppo`]).
//!
//! **Metadata** (JSON object, all optional): `gradient_accumulation_steps` (every loss but
//! `dapo` is divided by it, as TRL's trainers do), `num_items_in_batch` (`dapo` only: the
//! completion tokens of the whole optimizer step; default this micro-batch's), `sample_ids`
//! (named in errors); GRPO's `num_iterations` (μ), `iteration` (0..μ) and `micro_index`
//! (the micro-batch within its optimizer step): the host sends each prompts batch for μ
//! consecutive optimizer steps; iteration 0 generates, scores and keeps the rollout with
//! the sampling policy's log-probabilities (`old_per_token_logps`), later iterations reuse it.
//!
//! # Guards
//! Non-finite policy or reference log-probabilities, advantages or precomputed inputs are an
//! error naming the tensor; a non-finite loss is an error naming the objective and the batch
//! (its `sample_ids`), so no NaN reaches the optimizer. A completion without tokens is an
//! error naming the row. Pairs whose chosen and rejected completions are identical are legal
//! (their DPO gradient is zero) and counted in the metric `pairs/identical`.
//!
//! # Metrics
//! Pairs: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected` (+ `nll_loss`, `log_odds_ratio`,
//! `log_odds_chosen` for ORPO; `nll_loss` for SimPO). KTO: `loss`, `kl`, `rewards/*`,
//! `logps/*`. GRPO: `loss`, `kl` (beta ≠ 0), `clip_ratio/low_mean`, `clip_ratio/high_mean`,
//! `clip_ratio/region_mean`, `entropy`; after a rollout also `rewards/<name>/mean`,
//! `rewards/<name>/std`, `reward`, `reward_std`, `frac_reward_zero_std`,
//! `completions/mean_length`, `/min_length`, `/max_length`. Reward model (TRL's names):
//! `loss`, `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`, at eval too. PPO
//! (TRL's names): after a rollout `objective/kl`, `objective/entropy`,
//! `objective/non_score_reward`, `objective/rlhf_reward`, `objective/scores`,
//! `val/num_eos_tokens`, GRPO's `rewards/<name>/mean`, `/std`, `reward`, `reward_std` and
//! completion lengths, and `kl_coef` with `adaptive_kl`; every step `loss` and the rollout's
//! running `policy/approxkl_avg`, `policy/clipfrac_avg`, `loss/policy_avg`, `loss/value_avg`,
//! `val/clipfrac_avg`, `policy/entropy_avg`, `val/ratio`, `val/ratio_var`.
use ferrotune_plugin_api::prelude::*;

pub mod common;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod losses;
pub mod orpo;
pub mod pair;
pub mod ppo;
pub mod reward_model;
pub mod rlhf;
pub mod rollout;
pub mod simpo;
#[cfg(test)]
mod testing;

pub use dpo::Dpo;
pub use grpo::Grpo;
pub use kto::Kto;
pub use orpo::Orpo;
pub use ppo::Ppo;
pub use reward_model::RewardModel;
pub use simpo::Simpo;

export_plugin!(
    objective: Dpo,
    objective: Orpo,
    objective: Simpo,
    objective: Kto,
    objective: Grpo,
    objective: RewardModel,
    objective: Ppo
);

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotune_plugin_api::schema::assert_schema_matches;
    use serde_json::json;

    #[test]
    fn schemas_match_the_parsers() {
        let s = assert_schema_matches::<Dpo>(json!({}));
        assert_eq!(
            (&s["properties"]["beta"]["default"], &s["properties"]["loss_type"]["default"]),
            (&json!(0.1), &json!("sigmoid"))
        );
        assert_eq!(s["properties"]["beta"]["exclusiveMinimum"], 0);
        assert_schema_matches::<Dpo>(
            json!({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, 0.5]}),
        );
        assert_schema_matches::<Orpo>(json!({}));
        assert_schema_matches::<Simpo>(json!({}));
        assert_schema_matches::<Kto>(json!({}));
        let s = assert_schema_matches::<Grpo>(json!({}));
        assert_eq!(s["properties"]["num_generations"]["default"], 8);
        assert_eq!(s["properties"]["scale_rewards"]["default"], "group");
        assert_schema_matches::<Grpo>(json!({"scale_rewards": false, "delta": 1.5}));
        assert_schema_matches::<RewardModel>(json!({}));
        let s = assert_schema_matches::<Ppo>(json!({}));
        assert_eq!(s["properties"]["response_length"]["default"], 53);
    }
}
