"""Reference side of `make bench-train`: LoRA SFT training tokens/s and peak RSS of
transformers + peft at their best on a model directory, on the same rows ferrotune's
`bench train` uses (host/src/bench/train.rs). Prints one JSON line with the keys of ferrotune's.

Set-up as a tuned HF Trainer run: `attn_implementation="sdpa"`, `get_peft_model` with LoRA r
(alpha 2r, every linear layer but lm_head, dropout 0), `torch.optim.AdamW(fused=True)` (falls
back to `foreach=True` if the device refuses fused; the JSON's `optimizer` says which), weight
decay 0, constant lr, `clip_grad_norm_(1.0)`, loss = transformers' `ForCausalLMLoss` with
num_items_in_batch (what the Trainer does), `torch.set_num_threads(--threads)`. `--dtype bf16`
loads the weights in fp32 and trains under `torch.autocast(device, dtype=torch.bfloat16)`, as
the Trainer's `bf16=True` does.

Rows: fixed-length row r holds id = (7919 * (r * T + i) + 13) % vocab, i < T; with
`--lengths FILE` row r has lengths[r % n] ids (cut at T, the cutoff) of the same formula with T
= the cutoff. Labels are the ids except the first len // 4 positions, which are -100. Step s
trains on rows s*B .. s*B + B - 1: right-padded with an attention mask, or with `--packing`
through `DataCollatorWithFlattening` (padding-free: one [1, sum of lengths] row whose
`position_ids` restart at every row and no attention mask; transformers' SDPA path turns the
restarts into a block-diagonal causal mask, so rows do not see each other — exact on CPU).

W warm-up steps are not timed; tokens/s (padding not counted) and label tokens/s are over the N
timed steps, and the fastest step's tokens/s. Peak RSS is the process's VmHWM; on CUDA
`peak_gpu_mb` is torch.cuda.max_memory_reserved.

Roofline, the formula of ferrotune's `bench::roofline`: per step 4*N*n + 4*H*V*h + 6*A*n +
6*L*d*sum(T^2), N the decoder's linear weights, n the tokens, h the tokens that reach the head
(every token here: transformers computes the full logits), A the adapter's weights, L layers,
d = heads * head_dim, sum(T^2) over the rows (as ferrotune: the rows' sum(T^2) per token times
the step's tokens). `mfu` = achieved FLOP/s / the best of a few matmuls (2048, 8192 on CUDA)
in the compute dtype at the same threads."""
import argparse
import sys
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


def read_lengths(path):
    with open(path) as f:
        return [int(w) for line in f if not line.lstrip().startswith("#") for w in line.split()]


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
ap.add_argument("--lengths", default=None, help="variable-length rows: a file of token counts")
ap.add_argument("--packing", action="store_true", help="padding-free: DataCollatorWithFlattening")
args = ap.parse_args()
args.dtype = {"f32": "float32", "bf16": "bfloat16"}.get(args.dtype, args.dtype)

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

if args.threads:
    torch.set_num_threads(args.threads)
base_rss = proc_status_mib("VmRSS")
torch.manual_seed(args.seed)
device = torch.device(args.device)
autocast = args.dtype == "bfloat16"
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").to(device)
lora = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
model = get_peft_model(model, lora)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
trainable = sum(p.numel() for p in params)


def adamw():
    common = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        opt = torch.optim.AdamW(params, fused=True, **common)
        # Some builds accept the flag and refuse at the first step: try one on zero gradients.
        for p in params:
            p.grad = torch.zeros_like(p)
        state = [p.detach().clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, s in zip(params, state):
                p.copy_(s)
        opt.zero_grad(set_to_none=True)
        return torch.optim.AdamW(params, fused=True, **common), "adamw fused"
    except (RuntimeError, TypeError) as e:
        print(f"fused AdamW refused ({e}); using foreach", file=sys.stderr)
        return torch.optim.AdamW(params, foreach=True, **common), "adamw foreach"


opt, opt_name = adamw()
cfg = model.config
vocab = cfg.vocab_size
B, T = args.batch, args.seq_len
lengths = read_lengths(args.lengths) if args.lengths else None


def row(r):
    n = min(lengths[r % len(lengths)], T) if lengths else T
    ids = [(7919 * (r * T + i) + 13) % vocab for i in range(n)]
    return ids, [-100 if i < n // 4 else t for i, t in enumerate(ids)]


rows = [row(r) for r in range((args.warmup + args.steps) * B)]
flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)


def batch(step):
    chunk = rows[step * B:step * B + B]
    if args.packing:
        out = flatten([{"input_ids": ids, "labels": labels} for ids, labels in chunk])
        inputs = {"input_ids": out["input_ids"].to(device), "position_ids": out["position_ids"].to(device)}
        return inputs, out["labels"].to(device)
    width = max(len(ids) for ids, _ in chunk)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    ids = torch.tensor([pad(i, 0) for i, _ in chunk], device=device)
    mask = torch.tensor([pad([1] * len(i), 0) for i, _ in chunk], device=device)
    labels = torch.tensor([pad(lb, -100) for _, lb in chunk], device=device)
    return {"input_ids": ids, "attention_mask": mask}, labels


# The roofline's model (see the module docs).
hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
H, L, q, kv = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
non_embedding = L * (H * q + 2 * H * kv + q * H + 3 * H * cfg.intermediate_size)
all_tokens = sum(len(i) for i, _ in rows)
squares_per_token = sum(len(i) ** 2 for i, _ in rows) / all_tokens


def step_flops(tokens):
    return (4 * non_embedding * tokens + 4 * H * vocab * tokens + 6 * trainable * tokens
            + 6 * L * q * tokens * squares_per_token)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(size):
    kind = torch.bfloat16 if autocast else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=kind) for _ in range(2))
    best = float("inf")
    for i in range(4):
        sync()
        t0 = time.perf_counter()
        c = a @ b
        sync()
        del c
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


first_loss, last_loss = None, None
fwd = bwd = optim = timed = tokens_sum = labels_sum = flops = 0.0
best = 0.0
for step in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    inputs, labels = batch(step)
    num_items = int((labels[..., 1:] != -100).sum())
    tokens = sum(len(i) for i, _ in rows[step * B:step * B + B])
    # The logits are a temporary, as in the Trainer's compute_loss: freed before backward.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(**inputs, use_cache=False).logits
    loss = ForCausalLMLoss(logits, labels, vocab_size=vocab, num_items_in_batch=num_items)
    del logits
    value = loss.item()
    t1 = time.perf_counter()
    loss.backward()
    del loss
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad()
    sync()
    t3 = time.perf_counter()
    first_loss = value if first_loss is None else first_loss
    last_loss = value
    if step >= args.warmup:
        fwd, bwd, optim, timed = fwd + t1 - t0, bwd + t2 - t1, optim + t3 - t2, timed + t3 - t0
        tokens_sum, labels_sum, flops = tokens_sum + tokens, labels_sum + num_items, flops + step_flops(tokens)
        best = max(best, tokens / (t3 - t0))

peak_rss = proc_status_mib("VmHWM")
peak_gpu = torch.cuda.max_memory_reserved() / 2 ** 20 if device.type == "cuda" else None
del model, opt, params
matmul = matmul_flops(8192 if device.type == "cuda" else 2048)
n = max(args.steps, 1)
result = {
    "impl": f"transformers {transformers.__version__} + peft {__import__('peft').__version__}",
    "threads": torch.get_num_threads(),
    "device": args.device,
    "dtype": args.dtype + (" (autocast)" if autocast else ""),
    "batch": B, "seq_len": T, "steps": args.steps, "warmup": args.warmup,
    "lora_r": args.rank,
    "trainable_params": trainable,
    "variable_length": lengths is not None,
    "packing": args.packing,
    "optimizer": opt_name,
    "attention": "sdpa" + (" padding-free (DataCollatorWithFlattening)" if args.packing else ""),
    "tokens_per_s": tokens_sum / max(timed, 1e-9),
    "label_tokens_per_s": labels_sum / max(timed, 1e-9),
    "best_tokens_per_s": best,
    "step_s": timed / n, "forward_s": fwd / n, "backward_s": bwd / n, "optimizer_s": optim / n,
    "first_loss": first_loss, "last_loss": last_loss,
    "base_rss_mb": base_rss,
    "peak_rss_mb": peak_rss,
    "flops_per_s": flops / max(timed, 1e-9),
    "matmul_flops_per_s": matmul,
    "mfu": flops / max(timed, 1e-9) / matmul,
}
if peak_gpu is not None:
    result["peak_gpu_mb"] = peak_gpu
print(json.dumps(result))
