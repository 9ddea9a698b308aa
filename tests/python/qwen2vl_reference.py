"""Builds a tiny random Qwen2-VL checkpoint with transformers and the reference outputs
ferrotune's Qwen2-VL must reproduce (tests/qwen2vl_parity.rs).

Usage: qwen2vl_reference.py OUT_DIR

OUT_DIR/vl/                 the checkpoint in transformers 5's module paths (`model.visual.*`,
                            `model.language_model.*`; `save_original_format=False`), nested
                            config.json
OUT_DIR/vl-hf/              the checkpoint as `save_pretrained` writes it by default: the
                            original key layout (`visual.*`, `model.layers.*`), nested config
OUT_DIR/vl-old/             the original key layout with a flat 4.x-style config.json
                            (`rope_scaling: {type: mrope, ...}`)
                            (all three checked here to load in transformers to the same logits)
OUT_DIR/inputs.json         token ids, masks, image grids of every case
OUT_DIR/pixels.safetensors  pixel_values of the batch (random normal, no image processor)
OUT_DIR/logits.safetensors  mm: fp32 logits [2, T, V] of the left-padded two-row batch with
                            five images; text: logits of a text-only batch (no padding)
OUT_DIR/generations.json    greedy generations (32 new tokens) with images, batch of 1 and 2,
                            and a left-padded text-only batch; the smallest top-1/top-2 gap
OUT_DIR/peft.json           peft's adapter keys for LoRA on q_proj/v_proj and on qkv
OUT_DIR/DONE                written last
"""
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from reference_common import MarginRecorder, left_pad  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

VOCAB = 300
PAD = 0
VISION_START, VISION_END, IMAGE, VIDEO = 292, 293, 295, 296
NEW_TOKENS = 32
MERGE = 2
PATCH_VALUES = 3 * 2 * 14 * 14


def config():
    return Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu"),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=False,
    )


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                if name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "patch_embed" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def image_block(grid):
    t, h, w = grid
    return [VISION_START] + [IMAGE] * (t * h * w // (MERGE * MERGE)) + [VISION_END]


def prompt(g, parts):
    """`parts`: ints (that many random text tokens) and grids (an image block)."""
    ids, grids = [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(1, 290, (p,), generator=g).tolist()
        else:
            ids += image_block(p)
            grids.append(list(p))
    return ids, grids


def mm_kwargs(ids, grids, pixels):
    if not grids:
        return {}
    return dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids, dtype=torch.long),
                mm_token_type_ids=(ids == IMAGE).int())


def generate(model, prompts, grids, pixels, recorder):
    ids, mask = left_pad(prompts, PAD)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None, bos_token_id=None, logits_processor=[recorder],
                         **mm_kwargs(ids, grids, pixels))
    rows = [row[ids.shape[1]:].tolist() for row in out]
    assert all(len(r) == NEW_TOKENS for r in rows), rows
    return rows


def write_old_layout(src: pathlib.Path, dst: pathlib.Path):
    """The pre-transformers-5 layout: `visual.*`, `model.layers.*`, flat config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        renamed[k] = v
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.pop("text_config")
    text.pop("model_type", None)
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    cfg.update(text)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["vision_config"].pop("rope_parameters", None)
    cfg["vision_config"]["model_type"] = "qwen2_vl"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def peft_keys(model, targets):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    import copy
    m = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    return sorted(get_peft_model_state_dict(m).keys())


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    row0, grids0 = prompt(g, [3, (1, 4, 6), 2, (1, 2, 2), 4])
    row1, grids1 = prompt(g, [2, (1, 6, 4), 3, (1, 2, 2), 1, (1, 4, 4), 2])
    grids = grids0 + grids1
    patches = [t * h * w for t, h, w in grids]
    pixels = torch.randn((sum(patches), PATCH_VALUES), generator=g)
    n0 = sum(patches[: len(grids0)])
    text_rows = [torch.randint(1, 290, (n,), generator=g).tolist() for n in (9, 9)]
    text_prompts = [torch.randint(1, 290, (n,), generator=g).tolist() for n in (4, 10)]
    ids, mask = left_pad([row0, row1], PAD)
    inputs = {
        "vocab_size": VOCAB, "pad_token_id": PAD, "new_tokens": NEW_TOKENS, "image_token_id": IMAGE,
        "mm_ids": ids.tolist(), "mm_mask": mask.tolist(), "grids": grids, "grids_row0": grids0,
        "prompts": [row0, row1], "patches_row0": n0, "text_ids": text_rows, "text_prompts": text_prompts,
    }
    (out / "inputs.json").write_text(json.dumps(inputs))
    save_file({"pixel_values": pixels.contiguous()}, str(out / "pixels.safetensors"))

    torch.manual_seed(7)
    model = Qwen2VLForConditionalGeneration(config())
    randomize(model, 7)
    model.save_pretrained(out / "vl", save_original_format=False)
    model.save_pretrained(out / "vl-hf")
    write_old_layout(out / "vl", out / "vl-old")
    keys = lambda d: set(load_file(str(out / d / "model.safetensors")).keys())
    assert any(k.startswith("model.language_model.") for k in keys("vl")), sorted(keys("vl"))[:3]
    assert keys("vl-hf") == keys("vl-old") and keys("vl-hf") != keys("vl")
    del model

    model = Qwen2VLForConditionalGeneration.from_pretrained(out / "vl", dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        mm = model(input_ids=ids, attention_mask=mask, **mm_kwargs(ids, grids, pixels)).logits.float()
        text = model(input_ids=torch.tensor(text_rows)).logits.float()
        for other in ["vl-hf", "vl-old"]:
            old = Qwen2VLForConditionalGeneration.from_pretrained(out / other, dtype=torch.float32, attn_implementation="sdpa")
            old.eval()
            mm_old = old(input_ids=ids, attention_mask=mask, **mm_kwargs(ids, grids, pixels)).logits.float()
            assert torch.equal(mm, mm_old), f"{other} must load to the same model in transformers"
            del old
    save_file({"mm": mm.contiguous(), "text": text.contiguous()}, str(out / "logits.safetensors"))

    recorder = MarginRecorder()
    single = generate(model, [row0], grids0, pixels[:n0], recorder)
    batch = generate(model, [row0, row1], grids, pixels, recorder)
    text_batch = generate(model, text_prompts, [], None, recorder)
    (out / "generations.json").write_text(json.dumps({
        "single": single, "batch": batch, "text_batch": text_batch, "min_greedy_gap": recorder.min_gap,
    }))
    print(f"min top-1/top-2 gap while decoding {recorder.min_gap:.4g}")
    (out / "peft.json").write_text(json.dumps({
        "q_v": peft_keys(model, ["q_proj", "v_proj"]), "qkv": peft_keys(model, ["qkv"]),
    }))
    (out / "DONE").write_text("ok\n")


if __name__ == "__main__":
    main()
