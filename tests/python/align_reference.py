"""Reference losses of the alignment objectives, computed by TRL 1.16's own trainer code.

Usage: align_reference.py OUT_DIR

For seeded random batches (token ids, masks) and random logits of a policy and a reference
model, this runs TRL's loss code paths on minimal trainer instances (`Trainer.__new__` with
the attributes the path reads) and fake models that return those logits:

* DPO: `DPOTrainer._compute_loss` for every loss type (reference computed by the trainer,
  precomputed, or zero for `reference_free`), and a weighted list of loss types;
* ORPO: `ORPOTrainer.get_batch_loss_metrics` (`concatenated_forward` + `odds_ratio_loss`);
* SimPO / CPO: `CPOTrainer.get_batch_loss_metrics` (`cpo_loss`) for simpo, sigmoid, hinge, ipo;
* KTO: `KTOTrainer._compute_loss` (with its KL batch) for kto and apo_zero_unpaired;
* GRPO: `GRPOTrainer._compute_loss` for grpo, dapo, dr_grpo, bnpo with beta 0 and > 0.

The fake models stand in for TRL's fused LM head: per-token log-probabilities are
`selective_log_softmax` (TRL's own) of the logits at the labelled positions, 0 elsewhere.
Writes `batches.safetensors` (inputs, logits) and `cases.json` (per case: objective, plugin
config, batch name, TRL's loss and metrics).
"""

import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax

torch.manual_seed(20240611)
V = 13
DT = torch.float64


class FakeAccelerator:
    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather_for_metrics(self, t):
        return t

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t

    def unwrap_model(self, m):
        return m


class FakeLM(torch.nn.Module):
    """A causal LM whose logits for a given `input_ids` are fixed (looked up by value)."""

    is_gradient_checkpointing = False

    def __init__(self, table):
        super().__init__()
        self.table = table  # list of (input_ids, logits)

    def logits_for(self, input_ids):
        for ids, logits in self.table:
            if ids.shape == input_ids.shape and torch.equal(ids, input_ids):
                return logits
        raise KeyError("no logits for these input_ids")

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        logits = self.logits_for(input_ids)
        if not fused_lm_head:
            return SimpleNamespace(logits=logits)
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        lp = selective_log_softmax(shift_logits, shift_labels.clamp(min=0)) * mask
        probs = shift_logits.softmax(-1)
        entropy = -(probs * shift_logits.log_softmax(-1)).sum(-1) * mask
        mean_logits = shift_logits.mean(-1) * mask
        is_top1 = (shift_logits.argmax(-1) == shift_labels) & mask
        return FusedCausalLMOutput(log_probs=lp, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


def rows(prompt_lens, completion_lens, width):
    """Right-padded rows: random ids, attention mask, completion mask."""
    n = len(prompt_lens)
    ids = torch.zeros(n, width, dtype=torch.int64)
    attn = torch.zeros(n, width, dtype=torch.int64)
    comp = torch.zeros(n, width, dtype=torch.int64)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        ids[i, : p + c] = torch.randint(1, V, (p + c,))
        attn[i, : p + c] = 1
        comp[i, p : p + c] = 1
    return ids, attn, comp


def logits(n, t, scale=2.0):
    return (torch.randn(n, t, V, dtype=DT) * scale).contiguous()


tensors = {}
cases = []


def metrics_of(store, keys):
    return {k: float(store[k][-1]) for k in keys if k in store and len(store[k])}


# ------------------------------------------------------------------ pairs (DPO, ORPO, CPO)
B, T = 4, 10
p_lens = [3, 2, 4, 3]
ids_c, attn_c, comp_c = rows(p_lens, [5, 7, 3, 6], T)
ids_r, attn_r, comp_r = rows(p_lens, [6, 4, 5, 2], T)
ids_r[:, :4] = ids_c[:, :4]  # the same prompt
pair_ids = torch.cat([ids_c, ids_r])
pair_attn = torch.cat([attn_c, attn_r])
pair_comp = torch.cat([comp_c, comp_r])
pol = logits(2 * B, T)
ref = logits(2 * B, T)
tensors.update({"pair.input_ids": pair_ids, "pair.attention_mask": pair_attn, "pair.completion_mask": pair_comp,
                "pair.policy_logits": pol, "pair.ref_logits": ref})
policy_lm, ref_lm = FakeLM([(pair_ids, pol)]), FakeLM([(pair_ids, ref)])

# Precomputed reference log-probabilities, as DPOTrainer.compute_ref_log_probs gives them.
labels = pair_ids.masked_fill(pair_comp == 0, -100)
ref_lp = ref_lm(input_ids=pair_ids, labels=labels, fused_lm_head=True).log_probs.sum(1)
tensors["pair.ref_chosen_logps"], tensors["pair.ref_rejected_logps"] = [t.contiguous() for t in ref_lp.chunk(2)]

PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def dpo_case(name, loss_types, beta=0.1, label_smoothing=0.0, weights=None, ref_mode="model", extra=None):
    tr = DPOTrainer.__new__(DPOTrainer)
    tr.model, tr.ref_model = policy_lm, ref_lm
    tr.accelerator = FakeAccelerator()
    tr.ld_alpha = None
    tr.precompute_ref_logps = ref_mode != "model"
    tr.f_divergence_type = "reverse_kl"
    tr.loss_types, tr.loss_weights = loss_types, weights or [1.0] * len(loss_types)
    tr.beta, tr.label_smoothing = beta, label_smoothing
    tr.use_weighting, tr.aux_loss_enabled = False, False
    tr._metrics = defaultdict(lambda: defaultdict(list))
    tr._total_train_tokens, tr._tp_size = 0, 1
    tr.args = SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=(extra or {}).get("discopop_tau", 0.05))
    inputs = {"input_ids": pair_ids, "attention_mask": pair_attn, "completion_mask": pair_comp}
    if ref_mode == "precomputed":
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = tensors["pair.ref_chosen_logps"], tensors["pair.ref_rejected_logps"]
    elif ref_mode == "zero":
        inputs["ref_chosen_logps"] = inputs["ref_rejected_logps"] = torch.zeros(B, dtype=DT)
    loss = tr._compute_loss(policy_lm, inputs, return_outputs=False)
    config = {"beta": beta, "loss_type": loss_types[0] if len(loss_types) == 1 else loss_types, "label_smoothing": label_smoothing}
    if weights:
        config["loss_weights"] = weights
    if ref_mode == "zero":
        config["reference_free"] = True
    config.update(extra or {})
    cases.append({"name": name, "objective": "dpo", "config": config, "batch": "pair", "ref_mode": ref_mode,
                  "loss": float(loss), "metrics": metrics_of(tr._metrics["train"], PAIR_METRICS)})


for lt in ["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm"]:
    dpo_case(f"dpo-{lt}", [lt])
dpo_case("dpo-robust", ["robust"], label_smoothing=0.2)
dpo_case("dpo-exo_pair", ["exo_pair"], label_smoothing=1e-3)
dpo_case("dpo-discopop", ["discopop"], extra={"discopop_tau": 0.05})
dpo_case("dpo-aot-smoothed", ["aot"], label_smoothing=0.1)
dpo_case("dpo-sigmoid-beta0.5", ["sigmoid"], beta=0.5)
dpo_case("dpo-ipo-beta1", ["ipo"], beta=1.0)
dpo_case("dpo-mixed", ["sigmoid", "ipo", "hinge"], weights=[0.5, 0.3, 0.2])
dpo_case("dpo-precomputed-ref", ["sigmoid"], ref_mode="precomputed")
dpo_case("dpo-reference-free", ["sigmoid"], ref_mode="zero")

pair_batch = {
    "chosen_input_ids": ids_c, "chosen_attention_mask": attn_c, "chosen_labels": ids_c.masked_fill(comp_c == 0, -100),
    "rejected_input_ids": ids_r, "rejected_attention_mask": attn_r, "rejected_labels": ids_r.masked_fill(comp_r == 0, -100),
}


def orpo_case(name, beta):
    tr = ORPOTrainer.__new__(ORPOTrainer)
    tr.is_encoder_decoder, tr.padding_value, tr.aux_loss_enabled = False, 0, False
    tr.accelerator, tr.beta = FakeAccelerator(), beta
    loss, m = tr.get_batch_loss_metrics(policy_lm, pair_batch)
    cases.append({"name": name, "objective": "orpo", "config": {"beta": beta}, "batch": "pair", "ref_mode": "none",
                  "loss": float(loss), "metrics": {k: m[k] for k in PAIR_METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"]}})


orpo_case("orpo-beta0.1", 0.1)
orpo_case("orpo-beta0.5", 0.5)


def cpo_case(name, loss_type, beta, gamma=0.5, label_smoothing=0.0, cpo_alpha=0.0):
    tr = CPOTrainer.__new__(CPOTrainer)
    tr.is_encoder_decoder, tr.pad_token_id, tr.aux_loss_enabled = False, 0, False
    tr.accelerator = FakeAccelerator()
    tr.loss_type, tr.beta, tr.simpo_gamma, tr.label_smoothing, tr.cpo_alpha, tr.alpha = loss_type, beta, gamma, label_smoothing, cpo_alpha, 0.0
    loss, m = tr.get_batch_loss_metrics(policy_lm, pair_batch)
    config = {"loss_type": loss_type, "beta": beta, "simpo_gamma": gamma, "label_smoothing": label_smoothing, "cpo_alpha": cpo_alpha}
    cases.append({"name": name, "objective": "simpo", "config": config, "batch": "pair", "ref_mode": "none",
                  "loss": float(loss), "metrics": {k: m[k] for k in PAIR_METRICS + ["nll_loss"]}})


cpo_case("simpo", "simpo", 2.0, gamma=0.5)
cpo_case("simpo-smoothed-cpo_alpha", "simpo", 2.5, gamma=1.0, label_smoothing=0.1, cpo_alpha=1.0)
cpo_case("cpo-sigmoid", "sigmoid", 0.1, cpo_alpha=1.0)
cpo_case("cpo-hinge", "hinge", 0.1)
cpo_case("cpo-ipo", "ipo", 0.5)

# ------------------------------------------------------------------ KTO
N, TK = 6, 9
k_prompts = [torch.randint(1, V, (n,)) for n in [3, 2, 4, 3, 2, 3]]
k_comps = [torch.randint(1, V, (n,)) for n in [4, 5, 2, 3, 6, 4]]


def kto_rows(prompts, comps, width):
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        ids[i, : len(p) + len(c)] = torch.cat([p, c])
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p) : len(p) + len(c)] = 1
    return ids, attn, comp


k_ids, k_attn, k_comp = kto_rows(k_prompts, k_comps, TK)
# KTOTrainer's KL completions: rotated by one within the batch.
kl_comps = [k_comps[-1]] + k_comps[:-1]
kl_ids, kl_attn, kl_comp = kto_rows(k_prompts, kl_comps, TK + 1)
k_pol, k_ref, kl_ref = logits(N, TK), logits(N, TK), logits(N, TK + 1)
# The policy favours the KL batch's tokens more than the reference does, so the KL estimate
# is positive (TRL clamps it at 0) and `kto` differs from `apo_zero_unpaired`.
next_tokens = torch.nn.functional.one_hot(torch.cat([kl_ids[:, 1:], kl_ids[:, :1]], 1), V).to(DT)
kl_pol = (kl_ref + 1.5 * next_tokens).contiguous()
tensors.update({"kto.input_ids": k_ids, "kto.attention_mask": k_attn, "kto.completion_mask": k_comp,
                "kto.KL_input_ids": kl_ids, "kto.KL_attention_mask": kl_attn, "kto.KL_completion_mask": kl_comp,
                "kto.policy_logits": k_pol, "kto.ref_logits": k_ref, "kto.KL_policy_logits": kl_pol, "kto.KL_ref_logits": kl_ref})
k_policy_lm = FakeLM([(k_ids, k_pol), (kl_ids, kl_pol)])
k_ref_lm = FakeLM([(k_ids, k_ref), (kl_ids, kl_ref)])
KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def kto_case(name, label, loss_type="kto", beta=0.1, dw=1.0, uw=1.0):
    tr = KTOTrainer.__new__(KTOTrainer)
    tr.model, tr.ref_model, tr.accelerator = k_policy_lm, k_ref_lm, FakeAccelerator()
    tr.calculate_KL = loss_type != "apo_zero_unpaired"
    tr.precompute_ref_logps, tr.aux_loss_enabled = False, False
    tr.loss_type, tr.beta, tr.desirable_weight, tr.undesirable_weight = loss_type, beta, dw, uw
    tr._metrics = defaultdict(lambda: defaultdict(list))
    tr._total_train_tokens, tr._tp_size = 0, 1
    tr.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    label_t = torch.tensor(label)
    inputs = {"input_ids": k_ids, "attention_mask": k_attn, "completion_mask": k_comp, "label": label_t}
    if tr.calculate_KL:
        inputs.update({"KL_input_ids": kl_ids, "KL_attention_mask": kl_attn, "KL_completion_mask": kl_comp})
    loss = tr._compute_loss(k_policy_lm, inputs, return_outputs=False)
    key = f"kto.label.{name}"
    tensors[key] = label_t.to(torch.int64)
    config = {"loss_type": loss_type, "beta": beta, "desirable_weight": dw, "undesirable_weight": uw}
    cases.append({"name": name, "objective": "kto", "config": config, "batch": "kto", "label": key, "ref_mode": "model",
                  "loss": float(loss), "metrics": metrics_of(tr._metrics["train"], KTO_METRICS)})


kto_case("kto", [True, False, True, True, False, False])
kto_case("kto-weighted-beta0.3", [True, False, False, True, False, False], beta=0.3, dw=1.33, uw=1.0)
kto_case("kto-all-desirable", [True] * N)
kto_case("kto-apo_zero_unpaired", [True, False, True, True, False, False], loss_type="apo_zero_unpaired")

# ------------------------------------------------------------------ GRPO
G, P, C = 6, 4, 7
prompt_ids = torch.zeros(G, P, dtype=torch.int64)
prompt_mask = torch.zeros(G, P, dtype=torch.int64)
for i, n in enumerate([4, 3, 4, 2, 3, 4]):  # left padding
    prompt_ids[i, P - n :] = torch.randint(1, V, (n,))
    prompt_mask[i, P - n :] = 1
completion_ids = torch.zeros(G, C, dtype=torch.int64)
completion_mask = torch.zeros(G, C, dtype=torch.int64)
for i, n in enumerate([7, 5, 3, 6, 1, 4]):
    completion_ids[i, :n] = torch.randint(1, V, (n,))
    completion_mask[i, :n] = 1
g_pol, g_ref = logits(G, P + C, 1.5), logits(G, P + C, 1.5)
advantages = torch.randn(G, dtype=DT)
tensors.update({"grpo.prompt_ids": prompt_ids, "grpo.prompt_mask": prompt_mask, "grpo.completion_ids": completion_ids,
                "grpo.completion_mask": completion_mask, "grpo.policy_logits": g_pol, "grpo.ref_logits": g_ref,
                "grpo.advantages": advantages})


def fused_completion_logps(logits_full, temperature):
    """What TRL's fused head returns for GRPO's labels: completion positions only, / temperature."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :-C] = -100
    lm = FakeLM([(ids, logits_full / temperature)])
    return lm(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[:, -C:]


GRPO_METRICS = ["kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]


def grpo_case(name, loss_type, beta, temperature=1.0, epsilon=0.2, epsilon_high=None, with_old=True, max_completion_length=8):
    per_token = fused_completion_logps(g_pol, temperature)
    ref_per_token = fused_completion_logps(g_ref, temperature)
    old = (per_token + 0.35 * torch.randn(G, C, dtype=DT)) * completion_mask
    tr = GRPOTrainer.__new__(GRPOTrainer)
    tr.model, tr.accelerator = FakeLM([]), FakeAccelerator()
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (per_token, torch.zeros_like(per_token), None)
    tr.top_entropy_quantile, tr.off_policy_mask_threshold, tr.importance_sampling_level = 1.0, None, "token"
    tr.beta, tr.loss_type = beta, loss_type
    tr.epsilon_low, tr.epsilon_high = epsilon, epsilon_high if epsilon_high is not None else epsilon
    tr.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    tr.use_vllm, tr.vllm_importance_sampling_correction = False, False
    tr.current_gradient_accumulation_steps, tr.max_completion_length = 1, max_completion_length
    tr._entropy_bonus_enabled, tr.aux_loss_enabled = False, False
    tr._metrics = defaultdict(lambda: defaultdict(list))
    num_items = int(completion_mask.sum()) + 5  # as if other micro-batches of the step held 5 more tokens
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref_per_token,
              "num_items_in_batch": torch.tensor(float(num_items))}
    if with_old:
        inputs["old_per_token_logps"] = old
        tensors[f"grpo.old.{name}"] = old.contiguous()
    loss = tr._compute_loss(tr.model, inputs)
    config = {"loss_type": loss_type, "beta": beta, "temperature": temperature, "epsilon": epsilon,
              "max_completion_length": max_completion_length, "num_generations": 2}
    if epsilon_high is not None:
        config["epsilon_high"] = epsilon_high
    cases.append({"name": name, "objective": "grpo", "config": config, "batch": "grpo", "ref_mode": "model",
                  "old": f"grpo.old.{name}" if with_old else None, "num_items_in_batch": num_items,
                  "loss": float(loss), "metrics": metrics_of(tr._metrics["train"], GRPO_METRICS)})


for lt in ["grpo", "dapo", "dr_grpo", "bnpo"]:
    for beta in [0.0, 0.04]:
        grpo_case(f"grpo-{lt}-beta{beta}", lt, beta)
grpo_case("grpo-dapo-eps_high-temp", "dapo", 0.04, temperature=0.7, epsilon_high=0.28)
grpo_case("grpo-grpo-no-old", "grpo", 0.1, with_old=False)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "batches.safetensors"))
(out / "cases.json").write_text(json.dumps(cases, indent=1))
print(f"{len(cases)} cases")
