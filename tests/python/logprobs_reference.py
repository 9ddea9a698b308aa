"""Reference log-probabilities for tests/logprobs.rs: transformers' greedy generation on a
model directory, and at each step `log_softmax` of the raw logits (`generate(output_logits=True)`,
before any logits processor), the chosen token's value and the K most likely tokens.

Usage: logprobs_reference.py CASES.json > OUT.json

CASES.json is a list of cases, each {"model": DIR, "chat": bool, "prompt": str, "n": int,
"k": int, "images": [PNG...]} (images: a Qwen2-VL directory, chat only; each image opens the
user turn as `<|vision_start|><|image_pad|>×N<|vision_end|>`, N = its patches / merge_size²,
with pixel values from `AutoImageProcessor.from_pretrained(DIR)`, as ferrotune's
`generate --chat --image` builds the prompt). Without chat the prompt is tokenized with the
tokenizer's special tokens.

OUT.json is a list of {"prompt_ids", "token_ids" (up to the first end-of-sequence id, which is
left out), "token_texts", "logprobs" (of each token), "top_ids", "top_texts", "top_logprobs"
(K per token, most likely first)}. Token texts are `tokenizer.decode([id])`.
"""
import json
import sys

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

torch.manual_seed(0)


def load(case):
    d = case["model"]
    cfg = json.load(open(f"{d}/config.json"))
    if "vision_config" in cfg:
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    # transformers 5 picks the tokenizer class by model_type (Qwen2Tokenizer, whose own
    # pre-tokenizer drops a WordLevel test vocabulary's words); honour tokenizer_config.json's
    # tokenizer_class when it names the plain fast tokenizer, as ferrotune reads tokenizer.json.
    tok_cfg = json.load(open(f"{d}/tokenizer_config.json"))
    if tok_cfg.get("tokenizer_class") == "PreTrainedTokenizerFast":
        return model.eval(), PreTrainedTokenizerFast.from_pretrained(d)
    return model.eval(), AutoTokenizer.from_pretrained(d)


def run(case):
    model, tok = load(case)
    extra = {}
    prompt = case["prompt"]
    if case.get("images"):
        processor = AutoImageProcessor.from_pretrained(case["model"])
        images = [Image.open(p) for p in case["images"]]
        processed = processor(images=images, return_tensors="pt")
        merge = processor.merge_size
        blocks = "".join(
            "<|vision_start|>" + "<|image_pad|>" * (int(g.prod()) // (merge * merge)) + "<|vision_end|>"
            for g in processed["image_grid_thw"]
        )
        prompt = blocks + prompt
        extra = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
    if case["chat"]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    if "pixel_values" in extra:
        # M-RoPE needs to know which tokens are image tokens (the processor's mm_token_type_ids).
        extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    gc = model.generation_config
    eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    eos = [e for e in eos if e is not None]
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=case["n"], do_sample=False,
                             temperature=None, top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos or None,
                             output_logits=True, return_dict_in_generate=True, **extra)
    new = out.sequences[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    k = case["k"]
    res = {"prompt_ids": ids[0].tolist(), "token_ids": new[:cut], "token_texts": [], "logprobs": [],
           "top_ids": [], "top_texts": [], "top_logprobs": []}
    for step in range(cut):
        logp = torch.log_softmax(out.logits[step][0].float(), dim=-1)
        t = new[step]
        res["token_texts"].append(tok.decode([t]))
        res["logprobs"].append(float(logp[t]))
        values, top = logp.topk(k) if k > 0 else (torch.empty(0), torch.empty(0, dtype=torch.long))
        res["top_ids"].append(top.tolist())
        res["top_texts"].append([tok.decode([i]) for i in top.tolist()])
        res["top_logprobs"].append(values.tolist())
    return res


if __name__ == "__main__":
    print(json.dumps([run(c) for c in json.load(open(sys.argv[1]))]))
