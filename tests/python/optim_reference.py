"""Reference side of tests/optim_parity.rs: torch.optim.AdamW(fused=True) + clip_grad_norm_, and
transformers' ForCausalLMLoss, on inputs the Rust test wrote. Tensors travel as
safetensors files in DIR, options as JSON.

    optim_reference.py adamw DIR   # adamw_in.{json,safetensors} -> adamw_out.safetensors
    optim_reference.py sft DIR     # sft_in.{json,safetensors}   -> sft_out.safetensors
"""
import json
import pathlib
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.loss.loss_utils import ForCausalLMLoss


def adamw(d: pathlib.Path) -> None:
    """adamw_in.json: {"params": [{"name", "lr_scale", "weight_decay_scale"}], "lrs": [...],
    "optimizer": {betas, eps, weight_decay, amsgrad, max_grad_norm}}; adamw_in.safetensors:
    `init.<name>`, `grad.<step>.<name>` (steps from 1). Writes `param.<step>.<name>` after
    every step and `grad_norm` (pre-clip global norm per step, fp64)."""
    spec = json.loads((d / "adamw_in.json").read_text())
    tensors = load_file(str(d / "adamw_in.safetensors"))
    opt = spec["optimizer"]
    betas = tuple(opt.get("betas", (0.9, 0.999)))
    eps = opt.get("eps", 1e-8)
    weight_decay = opt.get("weight_decay", 0.01)
    amsgrad = opt.get("amsgrad", False)
    max_grad_norm = opt.get("max_grad_norm")

    params = {p["name"]: tensors[f"init.{p['name']}"].clone().requires_grad_(True) for p in spec["params"]}
    # One torch param group per distinct (lr_scale, weight_decay_scale), as the plugin treats them.
    groups = {}
    for p in spec["params"]:
        key = (p["lr_scale"], p["weight_decay_scale"])
        groups.setdefault(key, []).append(params[p["name"]])
    param_groups = [
        {"params": ps, "lr_scale": ls, "weight_decay": weight_decay * ws} for (ls, ws), ps in groups.items()
    ]
    optimizer = torch.optim.AdamW(
        param_groups, lr=spec["lrs"][0], betas=betas, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, fused=True,  # the plugin runs the same `_fused_adamw_` kernel
    )
    out = {}
    norms = []
    for step, lr in enumerate(spec["lrs"], start=1):
        for name, p in params.items():
            p.grad = tensors[f"grad.{step}.{name}"].clone()
        grads = [p.grad for p in params.values()]
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.item())
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]  # the plugin's product, in the same order
        optimizer.step()
        optimizer.zero_grad()
        for name, p in params.items():
            out[f"param.{step}.{name}"] = p.detach().clone()
    out["grad_norm"] = torch.tensor(norms, dtype=torch.float64)
    save_file(out, str(d / "adamw_out.safetensors"))


def smoothed_causal_lm_loss(logits, labels, num_items_in_batch, label_smoothing, ignore_index=-100):
    """ForCausalLMLoss's steps (upcast, pad-and-shift labels, flatten, cross_entropy, sum /
    num_items_in_batch or mean) with `label_smoothing` given to torch's cross_entropy:
    ForCausalLMLoss itself does not pass it on."""
    vocab = logits.shape[-1]
    logits = logits.float()
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(
        logits.view(-1, vocab), shift_labels.view(-1), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing,
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def sft(d: pathlib.Path) -> None:
    """sft_in.json: {"cases": [{"name", "num_items_in_batch" (int or null),
    "label_smoothing"}]}; sft_in.safetensors: `<case>.logits`, `<case>.labels`. Writes
    `<case>.loss` (fp64) and `<case>.grad` (d loss / d logits, the logits' dtype)."""
    spec = json.loads((d / "sft_in.json").read_text())
    tensors = load_file(str(d / "sft_in.safetensors"))
    out = {}
    for case in spec["cases"]:
        name = case["name"]
        logits = tensors[f"{name}.logits"].clone().requires_grad_(True)
        labels = tensors[f"{name}.labels"]
        n = case["num_items_in_batch"]
        n = torch.tensor(n) if n is not None else None  # the Trainer passes a tensor
        eps = case["label_smoothing"]
        if eps == 0.0:
            loss = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=n)
        else:
            # Anchor the smoothing path to transformers: with ε = 0 it is ForCausalLMLoss.
            with torch.no_grad():
                ours = smoothed_causal_lm_loss(logits, labels, n, 0.0)
                theirs = ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=n)
            if not torch.equal(ours, theirs):
                sys.exit(f"{name}: smoothed reference at eps=0 gives {ours}, ForCausalLMLoss {theirs}")
            loss = smoothed_causal_lm_loss(logits, labels, n, eps)
        loss.backward()
        out[f"{name}.loss"] = loss.detach().double().reshape(())
        out[f"{name}.grad"] = logits.grad.detach().clone()
    save_file(out, str(d / "sft_out.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("adamw", "sft"):
        sys.exit(__doc__)
    {"adamw": adamw, "sft": sft}[sys.argv[1]](pathlib.Path(sys.argv[2]))
