"""Builds tiny random Qwen3 checkpoints with transformers and the reference outputs ferrotune's
Qwen3 must reproduce (tests/qwen3.rs).

Usage: qwen3_reference.py OUT_DIR
       qwen3_reference.py peft-load BASE_DIR ADAPTER_DIR IDS_JSON OUT_SAFETENSORS

OUT_DIR/untied/              Qwen3ForCausalLM, fp32: hidden 64, 4 heads of head_dim 24 (not
                             64 / 4), 2 key/value heads, untied lm_head, no attention bias;
                             a WordLevel tokenizer whose tokenizer_config.json carries the
                             original Qwen3 chat template
OUT_DIR/tied/                the same with head_dim 8, 1 key/value head, attention_bias and a
                             tied lm_head
OUT_DIR/inputs.json          the left-padded batch (ids, mask), greedy prompts, pad id
OUT_DIR/logits.safetensors   `untied` / `tied`: fp32 logits [2, T, V] of the padded batch;
                             `peft`: those of `untied` with OUT_DIR/peft-adapter
OUT_DIR/generations.json     greedy generations (32 new tokens, KV cache) of both models for a
                             left-padded batch of 2; the smallest top-1/top-2 logit gap
OUT_DIR/peft-adapter/        peft's LoRA (r 4 on all seven linear layers) with random non-zero
                             A and B, saved by `save_pretrained`
OUT_DIR/chat.json            the chat template, conversations, and transformers'
                             `apply_chat_template` texts and ids for each case; `training`:
                             TRL's prefix-preserving `qwen3_training.jinja` (with
                             `{% generation %}` blocks), its texts, the blocks' character spans
                             (`generation_indices`) and `assistant_masks` for the conversations
                             that end with an assistant turn
OUT_DIR/DONE                 written last

`peft-load` mode: peft loads a LoRA directory ferrotune wrote onto BASE_DIR and writes the
logits of the token ids in IDS_JSON (`{"ids": [[...]], "mask": [[...]]}`) as `logits`.
"""
import json
import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from reference_common import MarginRecorder, left_pad  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 300
PAD = 0
NEW_TOKENS = 32
WORDS = 200
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
ADDED = ["<think>", "</think>"]
PLAIN = ["\n", " ", "system", "user", "assistant"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trl_template(name):
    """A chat template of trl's collection: `qwen3.jinja` is the original Qwen3 template (as
    Qwen/Qwen3-* ship it), `qwen3_training.jinja` its training variant."""
    import trl
    return (pathlib.Path(trl.__file__).parent / "chat_templates" / name).read_text()


def write_tokenizer(d: pathlib.Path, template: str):
    """A WordLevel tokenizer: specials, `<think>` / `</think>`, whitespace tokens, `w0`.."""
    tokens = SPECIALS + ADDED + PLAIN + [f"w{i}" for i in range(WORDS)]
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": t in SPECIALS} for t in SPECIALS + ADDED]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s"}, "behavior": "Isolated", "invert": False},
        "post_processor": None, "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (d / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "bos_token": None,
              "model_max_length": 2048, "chat_template": template}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def config(head_dim, kv_heads, tied, bias):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                       attention_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=None, eos_token_id=2, pad_token_id=PAD)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # q_norm / k_norm too: far from 1 so that a missing norm shows.
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().contiguous()


def generate(model, prompts, recorder):
    ids, mask = left_pad(prompts, PAD)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None, bos_token_id=None, logits_processor=[recorder])
    rows = [row[ids.shape[1]:].tolist() for row in out]
    assert all(len(r) == NEW_TOKENS for r in rows), rows
    return rows


def conversations():
    """Chat cases: (name, messages, add_generation_prompt, extra template variables)."""
    multi = [
        {"role": "system", "content": "w1 w2 w3"},
        {"role": "user", "content": "w4 w5"},
        {"role": "assistant", "content": "<think>\nw6 w7\n</think>\n\nw8 w9"},
        {"role": "user", "content": "w10 w11 w12"},
        {"role": "assistant", "content": "w13 w14"},
        {"role": "user", "content": "w15"},
    ]
    reasoning = [
        {"role": "user", "content": "w20 w21"},
        {"role": "assistant", "content": "w22", "reasoning_content": "w23 w24"},
    ]
    tools = [
        {"role": "user", "content": "w30"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "w31", "arguments": {"a": 1, "b": "w32"}}}]},
        {"role": "tool", "content": "w33"},
        {"role": "tool", "content": "w34"},
        {"role": "assistant", "content": "w35"},
    ]
    return [
        ("multi_turn", multi[:-1], False, {}),
        ("multi_turn_prompt", multi, True, {}),
        ("multi_turn_prompt_no_thinking", multi, True, {"enable_thinking": False}),
        ("multi_turn_prompt_thinking", multi, True, {"enable_thinking": True}),
        ("single_turn", multi[1:3], False, {}),
        ("reasoning_content", reasoning, False, {}),
        ("tool_calls", tools, False, {}),
    ]


def build(out: pathlib.Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.manual_seed(0)
    template = trl_template("qwen3.jinja")
    models = {}
    for name, cfg, seed in [("untied", config(24, 2, False, False), 1), ("tied", config(8, 1, True, True), 2)]:
        model = Qwen3ForCausalLM(cfg).eval()
        randomize(model, seed)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        model.save_pretrained(out / name)
        write_tokenizer(out / name, template)
        models[name] = model

    g = torch.Generator().manual_seed(5)
    rand = lambda n: torch.randint(11, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    batch_rows = [rand(11), rand(6)]
    ids, mask = left_pad(batch_rows, PAD)
    prompts = [rand(7), rand(3)]
    tensors = {name: logits_of(m, ids, mask) for name, m in models.items()}

    recorder = MarginRecorder()
    generations = {name: generate(m, prompts, recorder) for name, m in models.items()}

    # peft writes an adapter with non-trivial A and B; its logits are what we must give.
    peft_model = get_peft_model(models["untied"], LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    gp = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=gp))
    peft_model.eval()
    peft_model.save_pretrained(out / "peft-adapter")
    tensors["peft"] = logits_of(peft_model, ids, mask)
    assert (tensors["peft"] - tensors["untied"]).abs().max() > 1e-2, "the adapter must matter"
    save_file(tensors, out / "logits.safetensors")

    tok = AutoTokenizer.from_pretrained(out / "untied")
    cases = []
    for name, messages, gen, extra in conversations():
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, **extra)
        ids_ = tok(text, add_special_tokens=False)["input_ids"]
        # Every token is known except the JSON of the tool call.
        assert name == "tool_calls" or tok.unk_token_id not in ids_, (name, text)
        cases.append({"name": name, "messages": messages, "add_generation_prompt": gen, "extra": extra,
                      "text": text, "ids": ids_})
    from transformers.utils.chat_template_utils import render_jinja_template
    training_template = trl_template("qwen3_training.jinja")
    training = []
    for name, messages, gen, extra in conversations():
        if gen:
            continue
        texts, spans = render_jinja_template(conversations=[messages], chat_template=training_template,
                                             add_generation_prompt=False, return_assistant_tokens_mask=True, **extra)
        enc = tok.apply_chat_template(messages, chat_template=training_template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **extra)
        assert any(enc["assistant_masks"]), name
        training.append({"name": name, "messages": messages, "extra": extra, "text": texts[0],
                         "spans": [list(s) for s in spans[0]], "ids": list(enc["input_ids"]),
                         "assistant_masks": list(enc["assistant_masks"])})
    (out / "chat.json").write_text(json.dumps({"template": template, "cases": cases,
                                               "training_template": training_template,
                                               "training": training}, indent=1))

    (out / "inputs.json").write_text(json.dumps({
        "ids": ids.tolist(), "mask": mask.tolist(), "prompts": prompts, "pad_token_id": PAD,
        "new_tokens": NEW_TOKENS, "lora_targets": LORA_TARGETS,
    }))
    (out / "generations.json").write_text(json.dumps({**generations, "min_margin": recorder.min_gap}))
    for name, t in tensors.items():
        print(f"{name}: logits {tuple(t.shape)}")
    print(f"generations: smallest top-1/top-2 gap {recorder.min_gap:.4f}")
    (out / "DONE").write_text("ok\n")


def peft_load(base, adapter, ids_json, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = json.loads(pathlib.Path(ids_json).read_text())
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids, mask = torch.tensor(inputs["ids"]), torch.tensor(inputs["mask"])
    save_file({"logits": logits_of(model, ids, mask)}, out)
    print(f"peft-load: {len(model.base_model.targeted_module_names)} modules adapted")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "peft-load":
        peft_load(*sys.argv[2:])
    elif len(sys.argv) == 2:
        out = pathlib.Path(sys.argv[1])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        build(out)
    else:
        sys.exit(__doc__)
