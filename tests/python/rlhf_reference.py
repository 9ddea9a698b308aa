"""Reference numbers for the RLHF tensor math of `plugins/align/src/rlhf.rs` (issue 21).

Usage: rlhf_reference.py OUT_JSON   (the committed fixture is plugins/align/tests/data/rlhf_reference.json)

Reward modelling: `RewardTrainer.compute_loss` of TRL 1.16 (trl/trainer/reward_trainer.py) on
fixed scores, transcribed line by line (the method needs a model; only its tensor math is
reproduced): loss = -logsigmoid(r_c - r_r [- margin]).mean() [+ coef * mean((r_c + r_r)^2)],
accuracy = (r_c > r_r).float().mean(), margin = (r_c - r_r).mean(), min/mean/max reward.

PPO: TRL 1.16 no longer ships `PPOTrainer` (it was dropped from the package; the last copy is
huggingface/trl's trl/experimental/ppo/ppo_trainer.py). Its `train` loop math is transcribed
here line by line (rollout post-processing, KL penalty rewards, score at the last token,
missing-EOS penalty, reward whitening, GAE, returns, advantage whitening; then, for every
micro-batch of `num_ppo_epochs` x `num_mini_batches` x `gradient_accumulation_steps`, the
clipped policy and value losses and the stats, and the logged metrics). TRL 1.16's own helpers
are imported where they still exist (`selective_log_softmax`, `first_true_indices`);
`masked_mean`, `masked_var`, `masked_whiten`, `truncate_response` and `INVALID_LOGPROB` lived
in the removed module and are transcribed.

Everything is float64 and seeded, except what TRL itself keeps in float32: the per-micro-batch
stats tensors (so the logged `*_avg` metrics are float32-rounded), the clip fractions and the
Bessel factor of `masked_var` (integer / integer). Case 2 whitens rewards with a per-rank
mini-batch of 4, which TRL's constructor would refuse (it asserts >= 8); the math is the same.
The fixture stores inputs and outputs as {shape, data}.
"""

import json
import sys

import numpy as np
import torch
from trl.experimental.utils import first_true_indices
from trl.trainer.utils import selective_log_softmax

INVALID_LOGPROB = 1.0


def masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError("mask sum is zero")
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def truncate_response(stop_token_id, pad_token_id, responses):
    trunc_idxs = first_true_indices(responses == stop_token_id).unsqueeze(-1)
    new_size = [1] * (len(responses.size()) - 1) + [responses.shape[1]]
    idxs = torch.arange(responses.shape[1], device=responses.device).view(*new_size)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)


def t(x):
    x = torch.as_tensor(x)
    if x.dtype == torch.bool:
        x = x.long()
    return {"shape": list(x.shape), "data": x.flatten().tolist()}


def reward_case(gen, n, margin, coef):
    rc = torch.randn(n, generator=gen, dtype=torch.float64)
    rr = torch.randn(n, generator=gen, dtype=torch.float64)
    m = torch.rand(n, generator=gen, dtype=torch.float64) if margin else None
    if m is not None:
        loss = -torch.nn.functional.logsigmoid(rc - rr - m).mean()
    else:
        loss = -torch.nn.functional.logsigmoid(rc - rr).mean()
    if coef is not None:
        loss += coef * torch.mean((rc + rr) ** 2)
    all_rewards = torch.cat([rc, rr]).unsqueeze(-1)  # outputs.logits, [2B, 1]
    return {
        "chosen": t(rc),
        "rejected": t(rr),
        "margin": t(m) if m is not None else None,
        "center_rewards_coefficient": coef,
        "loss": loss.item(),
        "accuracy": (rc > rr).float().mean().item(),
        "mean_margin": (rc - rr).mean().item(),
        "min_reward": all_rewards.min().item(),
        "mean_reward": all_rewards.mean().item(),
        "max_reward": all_rewards.max().item(),
    }


def ppo_case(seed, cfg):
    gen = torch.Generator().manual_seed(seed)
    np.random.seed(seed)
    B, T, V = 8, 7, 9
    pad, eos = cfg["pad_token_id"], cfg["eos_token_id"]
    temperature = cfg["temperature"]
    # responses as generated: random tokens (pad may occur as an ordinary token when pad != eos),
    # EOS at chosen positions, rows without EOS, tokens after EOS that truncation must drop
    responses = torch.randint(0, V, (B, T), generator=gen)
    responses[responses == eos] = 5
    for row, pos in cfg["eos_positions"].items():
        responses[row, pos] = eos
    policy_logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    ref_logits = policy_logits + torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 0.5
    logprobs = selective_log_softmax(policy_logits / (temperature + 1e-7), responses)
    ref_logprobs = selective_log_softmax(ref_logits / (temperature + 1e-7), responses)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    scores = torch.randn(B, generator=gen, dtype=torch.float64) * 2
    inputs = {
        "responses": t(responses),
        "logprobs": t(logprobs),
        "ref_logprobs": t(ref_logprobs),
        "values": t(values),
        "scores": t(scores),
    }

    # --- ppo_trainer.py train(): rollout post-processing (no grad)
    postprocessed_responses = responses
    if eos is not None:
        postprocessed_responses = truncate_response(eos, pad, responses)
    sequence_lengths = first_true_indices(postprocessed_responses == pad) - 1
    contain_eos_token = torch.any(postprocessed_responses == eos, dim=-1)
    scores = scores.clone()
    if cfg["missing_eos_penalty"] is not None:
        scores[~contain_eos_token] -= cfg["missing_eos_penalty"]
    response_idxs = torch.arange(responses.shape[1]).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    logr = ref_logprobs - logprobs
    kl = -logr if cfg["kl_estimator"] == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -cfg["kl_coef"] * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    if cfg["whiten_rewards"]:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for step in reversed(range(gen_length)):
        nextvalues = values[:, step + 1] if step < gen_length - 1 else 0.0
        delta = rewards[:, step] + cfg["gamma"] * nextvalues - values[:, step]
        lastgaelam = delta + cfg["gamma"] * cfg["lam"] * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)

    rollout = {
        "postprocessed_responses": t(postprocessed_responses),
        "sequence_lengths": t(sequence_lengths),
        "contain_eos_token": t(contain_eos_token),
        "scores": t(scores),
        "padding_mask": t(padding_mask),
        "padding_mask_p1": t(padding_mask_p1),
        "logprobs": t(logprobs),
        "ref_logprobs": t(ref_logprobs),
        "values": t(values),
        "kl": t(kl),
        "non_score_reward": t(non_score_reward),
        "rewards": t(rewards),
        "advantages": t(advantages),
        "returns": t(returns),
    }

    # --- the PPO epochs: per micro-batch, fresh "model outputs" (logits, value predictions)
    num_ppo_epochs, num_mini_batches, per_device = 2, 2, 2
    local_batch_size = B
    local_mini_batch_size = local_batch_size // num_mini_batches
    gas = local_mini_batch_size // per_device
    shape = (num_ppo_epochs, num_mini_batches, gas)
    names = ["approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio"]
    stats = {k: torch.zeros(shape) for k in names}  # float32, as TRL's stats tensors
    steps = []
    for ppo_epoch_idx in range(num_ppo_epochs):
        b_inds = np.random.permutation(local_batch_size)
        minibatch_idx = 0
        for mini_batch_start in range(0, local_batch_size, local_mini_batch_size):
            mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + local_mini_batch_size]
            gradient_accumulation_idx = 0
            for micro_batch_start in range(0, local_mini_batch_size, per_device):
                inds = torch.as_tensor(mini_batch_inds[micro_batch_start : micro_batch_start + per_device])
                mb_advantage = advantages[inds]
                mb_responses = responses[inds]
                mb_logprobs = logprobs[inds]
                mb_return = returns[inds]
                mb_values = values[inds]
                # the model's outputs at this step (the policy has moved since the rollout)
                step_logits = policy_logits[inds] + torch.randn(
                    len(inds), T, V, generator=gen, dtype=torch.float64
                ) * cfg["drift"]
                vpred_raw = values[inds] + torch.randn(len(inds), T, generator=gen, dtype=torch.float64) * 0.4

                logits = step_logits / (temperature + 1e-7)
                new_logprobs = selective_log_softmax(logits, mb_responses)
                new_logprobs = torch.masked_fill(new_logprobs, padding_mask[inds], INVALID_LOGPROB)
                vpred = torch.masked_fill(vpred_raw, padding_mask_p1[inds], 0)
                vpredclipped = torch.clamp(
                    vpred, mb_values - cfg["cliprange_value"], mb_values + cfg["cliprange_value"]
                )
                vf_losses1 = torch.square(vpred - mb_return)
                vf_losses2 = torch.square(vpredclipped - mb_return)
                vf_loss_max = torch.max(vf_losses1, vf_losses2)
                vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[inds])
                vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1[inds])
                logprobs_diff = new_logprobs - mb_logprobs
                ratio = torch.exp(logprobs_diff)
                pg_losses = -mb_advantage * ratio
                pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cfg["cliprange"], 1.0 + cfg["cliprange"])
                pg_loss_max = torch.max(pg_losses, pg_losses2)
                pg_loss = masked_mean(pg_loss_max, ~padding_mask[inds])
                loss = pg_loss + cfg["vf_coef"] * vf_loss
                pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask[inds])
                prob_dist = torch.nn.functional.softmax(logits, dim=-1)
                entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                approxkl = 0.5 * (logprobs_diff**2).mean()
                at = (ppo_epoch_idx, minibatch_idx, gradient_accumulation_idx)
                stats["approxkl"][at] = approxkl
                stats["pg_clipfrac"][at] = pg_clipfrac
                stats["pg_loss"][at] = pg_loss
                stats["vf_loss"][at] = vf_loss
                stats["vf_clipfrac"][at] = vf_clipfrac
                stats["entropy"][at] = entropy.mean()
                stats["ratio"][at] = ratio.mean()
                steps.append(
                    {
                        "indices": inds.tolist(),
                        "logits": t(step_logits),
                        "vpred": t(vpred_raw),
                        "loss": loss.item(),
                        "pg_loss": pg_loss.item(),
                        "vf_loss": vf_loss.item(),
                        "pg_clipfrac": pg_clipfrac.item(),
                        "vf_clipfrac": vf_clipfrac.item(),
                        "approxkl": approxkl.item(),
                        "entropy": entropy.mean().item(),
                        "ratio": ratio.mean().item(),
                    }
                )
                gradient_accumulation_idx += 1
            minibatch_idx += 1

    mean_kl = kl.sum(1).mean()
    mean_entropy = (-logprobs).sum(1).mean()
    mean_non_score_reward = non_score_reward.sum(1).mean()
    rlhf_reward = mean_non_score_reward + scores.mean()
    metrics = {
        "objective/kl": mean_kl.item(),
        "objective/entropy": mean_entropy.item(),
        "objective/non_score_reward": mean_non_score_reward.item(),
        "objective/rlhf_reward": rlhf_reward.item(),
        "objective/scores": scores.mean().item(),
        "policy/approxkl_avg": stats["approxkl"].mean().item(),
        "policy/clipfrac_avg": stats["pg_clipfrac"].mean().item(),
        "loss/policy_avg": stats["pg_loss"].mean().item(),
        "loss/value_avg": stats["vf_loss"].mean().item(),
        "val/clipfrac_avg": stats["vf_clipfrac"].mean().item(),
        "policy/entropy_avg": stats["entropy"].mean().item(),
        "val/ratio": stats["ratio"].mean().item(),
        "val/ratio_var": stats["ratio"].var().item(),
        "val/num_eos_tokens": (responses == eos).sum().item(),
    }
    cfg = {k: v for k, v in cfg.items() if k != "eos_positions"}
    return {"config": cfg, "inputs": inputs, "rollout": rollout, "steps": steps, "metrics": metrics}


def main():
    out = sys.argv[1]
    gen = torch.Generator().manual_seed(21)
    reward = [
        reward_case(gen, 6, False, None),
        reward_case(gen, 6, True, None),
        reward_case(gen, 5, True, 0.01),
        reward_case(gen, 7, False, 0.5),
    ]
    base = {
        "kl_coef": 0.05,
        "gamma": 1.0,
        "lam": 0.95,
        "cliprange": 0.2,
        "cliprange_value": 0.2,
        "vf_coef": 0.1,
        "temperature": 0.7,
        "drift": 0.3,
    }
    ppo = [
        # pad != eos; rows 6, 7 without EOS (penalised); row 3 stops at its first token
        ppo_case(
            1,
            dict(
                base,
                pad_token_id=0,
                eos_token_id=1,
                kl_estimator="k1",
                whiten_rewards=False,
                missing_eos_penalty=1.0,
                eos_positions={0: 2, 1: 4, 2: 6, 3: 0, 4: 3, 5: 5},
            ),
        ),
        # pad == eos (the usual Qwen setup): the EOS itself is masked; row 3's EOS at 0 leaves
        # no valid token; k3, whitened rewards, gamma < 1, no EOS penalty
        ppo_case(
            2,
            dict(
                base,
                gamma=0.9,
                kl_coef=0.2,
                pad_token_id=1,
                eos_token_id=1,
                kl_estimator="k3",
                whiten_rewards=True,
                missing_eos_penalty=None,
                drift=0.6,
                eos_positions={0: 2, 1: 4, 2: 6, 3: 0, 4: 3, 5: 1},
            ),
        ),
    ]
    with open(out, "w") as f:
        json.dump({"reward": reward, "ppo": ppo}, f)


if __name__ == "__main__":
    main()
