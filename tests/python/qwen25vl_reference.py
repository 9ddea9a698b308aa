"""Builds a tiny random Qwen2.5-VL checkpoint (and a tiny Qwen2-VL one, for videos) with
transformers and the reference outputs ferrotune must reproduce (tests/qwen25vl_parity.rs).

Usage: qwen25vl_reference.py OUT_DIR

The Qwen2.5-VL model: fp32, 3 vision blocks of width 32 (blocks 0 and 2 windowed, block 1 full
attention), window_size 56 (2 x 2 merged tokens a window, so every grid here splits into several
windows, some partial), tokens_per_second 4, a 2-layer decoder with M-RoPE split [2, 3, 3].
Pixel values are random normal tensors for chosen grids (no image or video processor).

OUT_DIR/vl25/               Qwen2.5-VL in transformers 5's module paths (`save_original_format=False`)
OUT_DIR/vl25-hf/            the same as `save_pretrained` writes it by default (`visual.*`,
                            `model.layers.*`); checked here to give the same logits
OUT_DIR/vl2/                a tiny Qwen2-VL (module paths), for the video case
OUT_DIR/lora/               a peft LoRA adapter of vl25 (random A and B, r 4) on q_proj, v_proj,
                            qkv, gate_proj, down_proj: language and vision linears alike
OUT_DIR/inputs.json         every case: ids, masks, grids, second_per_grid_ts
OUT_DIR/pixels.safetensors  each case's pixel_values / pixel_values_videos
OUT_DIR/logits.safetensors  fp32 logits of each case (Qwen2.5-VL: images, video, both; with the
                            LoRA adapter: both; Qwen2-VL: video, both)
OUT_DIR/generations.json    greedy generations (32 new tokens) of the `both` batch and the video
                            prompt (Qwen2.5-VL), of the `both` batch (Qwen2-VL, `vl2.both`), and
                            the smallest top-1/top-2 gap while decoding
OUT_DIR/modules.json        vl25's `named_modules()` paths
OUT_DIR/DONE                written last
"""
import copy
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from reference_common import MarginRecorder, left_pad  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

VOCAB = 300
PAD = 0
VISION_START, VISION_END, IMAGE, VIDEO = 292, 293, 295, 296
NEW_TOKENS = 32
MERGE = 2
PATCH_VALUES = 3 * 2 * 14 * 14
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END, tie_word_embeddings=False)


def config25():
    return Qwen2_5_VLConfig(
        text_config=dict(TEXT),
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                           hidden_act="silu", window_size=56, fullatt_block_indexes=[1], tokens_per_second=4),
        **TOKENS,
    )


def config2():
    return Qwen2VLConfig(
        text_config=dict(TEXT),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, hidden_act="quick_gelu"),
        **TOKENS,
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


def prompt(g, parts):
    """`parts`: ints (that many random text tokens), ("image", grid) and ("video", grid)."""
    ids, images, videos = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids += torch.randint(1, 290, (p,), generator=g).tolist()
        else:
            kind, (t, h, w) = p
            token = IMAGE if kind == "image" else VIDEO
            ids += [VISION_START] + [token] * (t * h * w // (MERGE * MERGE)) + [VISION_END]
            (images if kind == "image" else videos).append([t, h, w])
    return ids, images, videos


def case(g, rows, seconds):
    """A left-padded batch of `rows` (lists of parts) with random pixels; `seconds`: the
    second_per_grid_ts of its videos (None: not given)."""
    prompts, images, videos = [], [], []
    for parts in rows:
        ids, im, vid = prompt(g, parts)
        prompts.append(ids)
        images += im
        videos += vid
    ids, mask = left_pad(prompts, PAD)
    n_img = sum(t * h * w for t, h, w in images)
    n_vid = sum(t * h * w for t, h, w in videos)
    return dict(prompts=prompts, ids=ids, mask=mask, images=images, videos=videos, seconds=seconds,
                pixels=torch.randn((n_img, PATCH_VALUES), generator=g),
                pixels_videos=torch.randn((n_vid, PATCH_VALUES), generator=g))


def mm_kwargs(c, seconds=True):
    """The forward's vision inputs; `seconds`: pass second_per_grid_ts (Qwen2.5-VL only)."""
    ids = c["ids"]
    kw = dict(mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int())
    if c["images"]:
        kw.update(pixel_values=c["pixels"], image_grid_thw=torch.tensor(c["images"], dtype=torch.long))
    if c["videos"]:
        kw.update(pixel_values_videos=c["pixels_videos"], video_grid_thw=torch.tensor(c["videos"], dtype=torch.long))
        if c["seconds"] is not None and seconds:
            # As Qwen2_5_VLProcessor returns it: a float32 tensor.
            kw["second_per_grid_ts"] = torch.tensor(c["seconds"], dtype=torch.float32)
    return kw


def logits(model, c, seconds=True):
    with torch.no_grad():
        return model(input_ids=c["ids"], attention_mask=c["mask"],
                     **mm_kwargs(c, seconds)).logits.float().contiguous()


def generate(model, c, recorder, seconds=True):
    out = model.generate(input_ids=c["ids"], attention_mask=c["mask"], max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None, bos_token_id=None, logits_processor=[recorder],
                         **mm_kwargs(c, seconds))
    rows = [row[c["ids"].shape[1]:].tolist() for row in out]
    assert all(len(r) == NEW_TOKENS for r in rows), rows
    return rows


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cases = {
        # Two images of different sizes: llm grids 3 x 5 (windows 2x2, 2x2, 2x1, 1x2, 1x2, 1x1) and 2 x 2.
        "images": case(g, [[3, ("image", (1, 6, 10)), 2, ("image", (1, 4, 4)), 3]], None),
        # A video of 3 temporal patches at 2/3 s each (time steps 0, 2.67, 5.33 -> 0, 2, 5).
        "video": case(g, [[2, ("video", (3, 4, 6)), 4]], [2.0 / 3.0]),
        # Both, in a left-padded batch of two rows; the second video at 0.5 s per patch.
        "both": case(g, [[3, ("image", (1, 6, 10)), 2, ("video", (3, 4, 6)), 3],
                         [2, ("video", (2, 4, 4)), 2, ("image", (1, 4, 4)), 1]], [2.0 / 3.0, 0.5]),
        # A video without second_per_grid_ts (1 s per patch).
        "video_default": case(g, [[2, ("video", (2, 4, 4)), 3]], None),
    }
    inputs = {
        "vocab_size": VOCAB, "pad_token_id": PAD, "new_tokens": NEW_TOKENS,
        "cases": {k: dict(ids=c["ids"].tolist(), mask=c["mask"].tolist(), prompts=c["prompts"], images=c["images"],
                          videos=c["videos"], seconds=c["seconds"]) for k, c in cases.items()},
    }
    (out / "inputs.json").write_text(json.dumps(inputs))
    pixels = {}
    for k, c in cases.items():
        pixels[f"{k}.pixel_values"] = c["pixels"].contiguous()
        pixels[f"{k}.pixel_values_videos"] = c["pixels_videos"].contiguous()
    save_file(pixels, str(out / "pixels.safetensors"))

    torch.manual_seed(7)
    model = Qwen2_5_VLForConditionalGeneration(config25())
    randomize(model, 7)
    model.save_pretrained(out / "vl25", save_original_format=False)
    model.save_pretrained(out / "vl25-hf")
    keys = lambda d: set(load_file(str(out / d / "model.safetensors")).keys())  # noqa: E731
    assert any(k.startswith("model.language_model.") for k in keys("vl25")), sorted(keys("vl25"))[:3]
    assert any(k.startswith("visual.") for k in keys("vl25-hf")), sorted(keys("vl25-hf"))[:3]
    del model

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "vl25", dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    results = {f"vl25.{k}": logits(model, c) for k, c in cases.items()}
    (out / "modules.json").write_text(json.dumps([n for n, _ in model.named_modules() if n]))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "vl25-hf", dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    assert torch.equal(logits(hf, cases["both"]), results["vl25.both"]), "both layouts load alike"
    del hf

    recorder = MarginRecorder()
    generations = {"both": generate(model, cases["both"], recorder), "video": generate(model, cases["video"], recorder)}
    generations["min_greedy_gap"] = recorder.min_gap
    print(f"min top-1/top-2 gap while decoding {recorder.min_gap:.4g}")
    (out / "generations.json").write_text(json.dumps(generations))

    from peft import LoraConfig, get_peft_model
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv", "gate_proj", "down_proj"],
        init_lora_weights=False))
    g2 = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g2))
    lora.eval()
    results["lora.both"] = logits(lora, cases["both"])
    assert (results["lora.both"] - results["vl25.both"]).abs().max() > 1e-2, "the adapter changes the logits"
    lora.save_pretrained(out / "lora")
    modules = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in lora.named_parameters() if ".lora_A" in n})
    (out / "lora_modules.json").write_text(json.dumps(modules))
    del lora, model

    torch.manual_seed(8)
    model2 = Qwen2VLForConditionalGeneration(config2())
    randomize(model2, 8)
    model2.save_pretrained(out / "vl2", save_original_format=False)
    model2 = Qwen2VLForConditionalGeneration.from_pretrained(out / "vl2", dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()
    # Qwen2-VL takes no second_per_grid_ts (its video time steps by one).
    results["vl2.video"] = logits(model2, cases["video"], seconds=False)
    results["vl2.both"] = logits(model2, cases["both"], seconds=False)
    recorder2 = MarginRecorder()
    generations["vl2.both"] = generate(model2, cases["both"], recorder2, seconds=False)
    generations["min_greedy_gap"] = min(generations["min_greedy_gap"], recorder2.min_gap)
    (out / "generations.json").write_text(json.dumps(generations))
    save_file(results, str(out / "logits.safetensors"))
    (out / "DONE").write_text("ok\n")


if __name__ == "__main__":
    main()
