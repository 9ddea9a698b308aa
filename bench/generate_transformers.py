"""Reference side of `make bench-generate`: prefill and decode tokens/s of transformers on a
model directory, for the same prompts ferrotune's `bench generate` uses.

Prompts: batch B of P token ids each, id = (7919 * (b * P + i) + 13) % vocab; greedy decoding
of N new tokens with the KV cache, eos disabled so every step runs. Prints one JSON line."""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--prompt-len", type=int, default=128)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
args = ap.parse_args()

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
vocab = model.config.vocab_size
B, P, N = args.batch, args.prompt_len, args.new_tokens
ids = torch.tensor([[(7919 * (b * P + i) + 13) % vocab for i in range(P)] for b in range(B)])
mask = torch.ones_like(ids)

prefill, decode = [], []
with torch.inference_mode():
    model(input_ids=ids, attention_mask=mask, logits_to_keep=1)  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        # logits_to_keep=1: only the last position's logits, as generate() does.
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        m = mask
        for _ in range(N - 1):
            m = torch.cat([m, torch.ones((B, 1), dtype=m.dtype)], dim=1)
            out = model(input_ids=nxt, attention_mask=m, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        prefill.append(B * P / (t1 - t0))
        decode.append(B * (N - 1) / (t2 - t1))

print(json.dumps({
    "impl": "transformers " + __import__("transformers").__version__,
    "threads": torch.get_num_threads(),
    "batch": B, "prompt_len": P, "new_tokens": N, "dtype": args.dtype,
    "prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
}))
