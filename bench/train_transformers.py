"""Reference side of `make bench-train`: LoRA SFT training tokens/s and peak RSS of
transformers + peft on a model directory, on the same batches ferrotune's `bench train` uses.

Model in `--dtype`, `get_peft_model` with LoRA r (alpha 2r, every linear layer but lm_head,
dropout 0), `torch.optim.AdamW` (weight decay 0, constant lr) after `clip_grad_norm_(1.0)`,
loss = transformers' `ForCausalLMLoss` with num_items_in_batch (what the Trainer does).
Step s trains on rows s*B .. s*B + B - 1 of id = (7919 * (row * T + i) + 13) % vocab, an
all-ones attention mask, labels = ids. W warm-up steps are not timed; tokens/s is over the N
timed steps (and over the fastest one: less sensitive to other load). Peak RSS is the process's VmHWM. Prints one JSON line (the keys of ferrotune's)."""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


def proc_status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq-len", type=int, default=512)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--alpha", type=float, default=None)
ap.add_argument("--lr", type=float, default=2e-4)
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--device", default="cpu")
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "f32", "bf16"])
args = ap.parse_args()
args.dtype = {"f32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
base_rss = proc_status_mib("VmRSS")
torch.manual_seed(args.seed)
device = torch.device(args.device)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), attn_implementation="sdpa").to(device)
lora = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
model = get_peft_model(model, lora)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
trainable = sum(p.numel() for p in params)
opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
vocab = model.config.vocab_size
B, T = args.batch, args.seq_len


def batch(step):
    rows = range(step * B, step * B + B)
    ids = torch.tensor([[(7919 * (r * T + i) + 13) % vocab for i in range(T)] for r in rows], device=device)
    return ids, torch.ones_like(ids)


num_items = B * (T - 1)
first_loss, last_loss = None, None
fwd = bwd = optim = timed = 0.0
best = float("inf")
for step in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    ids, mask = batch(step)
    # The logits are a temporary, as in the Trainer's compute_loss: freed before backward.
    loss = ForCausalLMLoss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids,
                           vocab_size=vocab, num_items_in_batch=num_items)
    value = loss.item()
    t1 = time.perf_counter()
    loss.backward()
    del loss
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t3 = time.perf_counter()
    first_loss = value if first_loss is None else first_loss
    last_loss = value
    if step >= args.warmup:
        fwd, bwd, optim, timed = fwd + t1 - t0, bwd + t2 - t1, optim + t3 - t2, timed + t3 - t0
        best = min(best, t3 - t0)

n = max(args.steps, 1)
print(json.dumps({
    "impl": f"transformers {transformers.__version__} + peft {__import__('peft').__version__}",
    "threads": torch.get_num_threads(),
    "device": args.device,
    "dtype": args.dtype,
    "batch": B, "seq_len": T, "steps": args.steps, "warmup": args.warmup,
    "lora_r": args.rank,
    "trainable_params": trainable,
    "tokens_per_s": args.steps * B * T / max(timed, 1e-9),
    "best_tokens_per_s": B * T / best,
    "step_s": timed / n, "forward_s": fwd / n, "backward_s": bwd / n, "optimizer_s": optim / n,
    "first_loss": first_loss, "last_loss": last_loss,
    "base_rss_mb": base_rss,
    "peak_rss_mb": proc_status_mib("VmHWM"),
}))
