"""transformers 5 + peft 0.21 reference for tests/adapter_interop.rs.

Usage: adapter_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test:
  "base": a model directory (`ferrotune init-model`), "ids": [[token ids]] for the logits;
  "peft_loads":   [{"name", "dir", "out"}]   - a PEFT directory ferrotune wrote: peft loads it
                                               onto the base (PeftModel.from_pretrained) and
                                               its logits go to `out`;
  "peft_writes":  [{"name", "config", "seed", "dir", "out", "out_disabled"}]
                                             - peft builds a LoraConfig(**config) adapter on the
                                               base, perturbs A, B (DoRA's magnitude, the copies
                                               of modules_to_save) so that the adapter matters,
                                               saves it to `dir` (save_pretrained), its logits to
                                               `out` and those with the adapter disabled to
                                               `out_disabled`;
  "transformers_loads": [{"name", "dir", "out"}]
                                             - a merged model directory ferrotune wrote:
                                               transformers loads it; logits to `out`;
  "generate": {"base", "adapter", "prompt", "max_new_tokens", "out"}
                                             - greedy generation of the base model, then of
                                               base + adapter (peft); JSON to `out`.
Logits files are safetensors with one tensor `logits` [B, T, vocab] (float32).
Exits non-zero with a message on any failure; prints one line per entry.
"""
import json
import pathlib
import sys
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def load_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_logits(model, ids, out):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.float()
    save_file({"logits": logits.contiguous()}, out)


def peft_loads(plan, entry):
    model = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    save_logits(model, plan["ids"], entry["out"])
    return f"peft_loads {entry['name']}: {len(model.base_model.targeted_module_names)} modules adapted"


def peft_writes(plan, entry):
    torch.manual_seed(entry["seed"])
    config = LoraConfig(task_type="CAUSAL_LM", **entry["config"])
    model = get_peft_model(load_model(plan["base"]), config)
    g = torch.Generator().manual_seed(entry["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    with model.disable_adapter():
        save_logits(model, plan["ids"], entry["out_disabled"])
    saved = [n for n, _ in model.named_parameters() if "modules_to_save" in n]
    return f"peft_writes {entry['name']}: saved to {entry['dir']}" + (f" (copies: {', '.join(saved)})" if saved else "")


def transformers_loads(plan, entry):
    model = load_model(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return f"transformers_loads {entry['name']}: lm_head tied: {tied}"


def until_eos(new, eos):
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


def generate(spec):
    tok = AutoTokenizer.from_pretrained(spec["base"])
    base = load_model(spec["base"])
    gen = base.generation_config
    eos = set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    ids = tok(spec["prompt"], return_tensors="pt")["input_ids"]
    n = spec["max_new_tokens"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        plain = base.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
        # from_pretrained wraps `base` in place: the plain generation comes first.
        model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
        adapted = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
    result = {"prompt_ids": ids[0].tolist(), "base_token_ids": until_eos(plain, eos), "token_ids": until_eos(adapted, eos)}
    pathlib.Path(spec["out"]).write_text(json.dumps(result))
    return f"generate: {len(result['token_ids'])} tokens with the adapter"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    torch.set_num_threads(1)
    for entry in plan.get("peft_loads", []):
        print(peft_loads(plan, entry), flush=True)
    for entry in plan.get("peft_writes", []):
        print(peft_writes(plan, entry), flush=True)
    for entry in plan.get("transformers_loads", []):
        print(transformers_loads(plan, entry), flush=True)
    if "generate" in plan:
        print(generate(plan["generate"]), flush=True)


if __name__ == "__main__":
    main()
