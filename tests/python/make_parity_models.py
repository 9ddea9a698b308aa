"""Builds tiny random Llama / Qwen2 / Mistral checkpoints with transformers and the reference
outputs ferrotune's decoder must reproduce (tests/model_parity.rs).

Usage: make_parity_models.py OUT_DIR

OUT_DIR/<case>/                 the checkpoint, written by `save_pretrained` (safetensors)
OUT_DIR/<case>.logits.safetensors
    full        fp32 logits [B, T, V] of `inputs.full_ids` (no padding)
    padded      fp32 logits [B, T, V] of `inputs.padded_ids` with `inputs.padded_mask`
                (left padding; position ids = cumsum(mask) - 1, 0 on padding, as generate does)
OUT_DIR/<case>.generations.json greedy generations (single prompts, one left-padded batch), a
                                seeded sampled batch, and the smallest top-1/top-2 logit gap
                                seen while decoding greedily (how robust "same tokens" is)
OUT_DIR/inputs.json             the token ids every case uses
OUT_DIR/warpers.safetensors     temperature -> top-k -> top-p as transformers' logits warpers
OUT_DIR/DONE                    written last

Reference outputs are computed from the checkpoint as reloaded with `from_pretrained`, so they
describe what is on disk. All weights (biases and norms included) are drawn at random with a
spread that gives non-trivial logits, unlike transformers' zero biases and unit norms.
"""
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from reference_common import MarginRecorder, left_pad  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 320
NEW_TOKENS = 40
PAD = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)

CASES = [
    # name, config, save options
    ("qwen2-tied", Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                               tie_word_embeddings=True, max_position_embeddings=256,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), {}),
    ("qwen2-untied-swa", Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=False, max_position_embeddings=256,
                                     use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), {}),
    ("llama-gqa-sharded-bf16", LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                           attention_bias=False, max_position_embeddings=256,
                                           rms_norm_eps=1e-5), {"max_shard_size": "40KB", "bf16": True}),
    ("llama3-rope-bias", LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4,
                                     attention_bias=True, mlp_bias=True, max_position_embeddings=256,
                                     rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 32}), {}),
    ("mistral-swa-linear-oldcfg", MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                                sliding_window=8, max_position_embeddings=256,
                                                rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 5000.0}), {"old_config": True}),
]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def to_old_config(path: pathlib.Path):
    """Rewrites config.json the way transformers 4.x wrote it: top-level rope_theta and a
    `rope_scaling` dict keyed by `type`, `torch_dtype` instead of `dtype`."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2))


def position_ids(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def generate(model, prompts, **kw):
    ids, mask = left_pad(prompts, PAD)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD,
                         eos_token_id=None, bos_token_id=None, **kw)
    return [row[ids.shape[1]:].tolist() for row in out]


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    full_ids = torch.randint(1, VOCAB, (3, 12), generator=g)
    lengths = [10, 4, 7]
    padded_prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    padded_ids, padded_mask = left_pad(padded_prompts, PAD)
    single_prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 9)]
    batch_prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 11, 7)]
    inputs = {
        "vocab_size": VOCAB, "new_tokens": NEW_TOKENS, "pad_token_id": PAD,
        "full_ids": full_ids.tolist(), "padded_ids": padded_ids.tolist(), "padded_mask": padded_mask.tolist(),
        "single_prompts": single_prompts, "batch_prompts": batch_prompts,
        "sample": {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 1234},
    }
    (out / "inputs.json").write_text(json.dumps(inputs))

    for i, (name, config, opts) in enumerate(CASES):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, 100 + i)
        if opts.get("bf16"):
            model = model.to(torch.bfloat16)
        model.save_pretrained(out / name, max_shard_size=opts.get("max_shard_size", "5GB"))
        if opts.get("old_config"):
            to_old_config(out / name / "config.json")
        del model

        model = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        if opts.get("old_config"):
            rope = model.config.rope_parameters
            assert rope["rope_type"] == "linear" and rope["factor"] == 2.0 and rope["rope_theta"] == 5000.0, rope
        with torch.no_grad():
            full = model(input_ids=full_ids).logits.float()
            padded = model(input_ids=padded_ids, attention_mask=padded_mask,
                           position_ids=position_ids(padded_mask)).logits.float()
        save_file({"full": full.contiguous(), "padded": padded.contiguous()}, str(out / f"{name}.logits.safetensors"))

        recorder = MarginRecorder()
        greedy_single = [generate(model, [p], do_sample=False, logits_processor=[recorder])[0] for p in single_prompts]
        greedy_batch = generate(model, batch_prompts, do_sample=False, logits_processor=[recorder])
        s = inputs["sample"]
        torch.manual_seed(s["seed"])
        sampled_batch = generate(model, batch_prompts, do_sample=True, temperature=s["temperature"],
                                 top_k=s["top_k"], top_p=s["top_p"])
        for row in greedy_single + greedy_batch + sampled_batch:
            assert len(row) == NEW_TOKENS, (name, row)
        (out / f"{name}.generations.json").write_text(json.dumps({
            "greedy_single": greedy_single, "greedy_batch": greedy_batch, "sampled_batch": sampled_batch,
            "min_greedy_gap": recorder.min_gap,
        }))
        print(f"{name}: min top-1/top-2 gap while decoding {recorder.min_gap:.4g}")

    # Logits warpers, applied in generate's order: temperature, top-k, top-p.
    g = torch.Generator().manual_seed(7)
    scores = 3.0 * torch.randn((4, 50), generator=g)
    warped = {"scores": scores}
    for tag, (t, k, p) in {"t07_k10_p08": (0.7, 10, 0.8), "t1_k0_p05": (1.0, 0, 0.5),
                           "t13_k5_p1": (1.3, 5, 1.0), "t1_k3_p099": (1.0, 3, 0.99)}.items():
        x = scores.clone()
        x = TemperatureLogitsWarper(t)(None, x)
        if k > 0:
            x = TopKLogitsWarper(k)(None, x)
        if p < 1.0:
            x = TopPLogitsWarper(p)(None, x)
        warped[tag] = x.contiguous()
    save_file(warped, str(out / "warpers.safetensors"))
    (out / "DONE").write_text("ok\n")


if __name__ == "__main__":
    main()
