"""transformers 5 + peft 0.21 IA³ reference for tests/ia3_parity.rs.

Usage: ia3_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test:
  "base": a model directory (`ferrotune init-model`), "ids": [[token ids]] for the logits;
  "peft_writes": {"config", "seed", "dir", "out"}
      peft builds an IA3Config(**config) adapter on the base, draws every ia3_l as
      1 + 0.3 * N(0, 1) (so that each vector matters), saves it to `dir` (save_pretrained),
      and its logits to `out`;
  "peft_loads": [{"dir", "out"}]
      a PEFT directory ferrotune wrote: peft loads it onto the base
      (PeftModel.from_pretrained, which also parses its adapter_config.json through
      IA3Config); its logits go to `out`.
  "merged": [{"dir", "out"}]
      a model directory `ferrotune merge` wrote: transformers loads it (AutoModelForCausalLM);
      its logits go to `out`;
  "vl": {"base", "dir", "io", "out"}
      a tiny Qwen2-VL (`init-model --preset tiny-vl`) and an IA³ directory ferrotune wrote for
      it: peft loads it onto Qwen2VLForConditionalGeneration; the logits of the input in `io`
      (safetensors: `ids` [1, T], `pixel_values`, `grid` [n, 3]) go to `out`.
Every key is optional.
Logits files are safetensors with one tensor `logits` [B, T, vocab] (float32).
Exits non-zero with a message on any failure; prints one line per entry.
"""
import json
import pathlib
import sys
import warnings

import torch
from peft import IA3Config, PeftModel, get_peft_model
from safetensors.torch import save_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration


def load_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_logits(model, ids, out):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.float()
    save_file({"logits": logits.contiguous()}, out)


def peft_writes(plan, entry):
    config = IA3Config(task_type="CAUSAL_LM", **entry["config"])
    model = get_peft_model(load_model(plan["base"]), config)
    g = torch.Generator().manual_seed(entry["seed"])
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                n += 1
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    return f"peft_writes: {n} ia3_l vectors saved to {entry['dir']}"


def peft_loads(plan, entry):
    model = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    if not isinstance(model.peft_config["default"], IA3Config):
        raise SystemExit(f"{entry['dir']}: peft read {type(model.peft_config['default']).__name__}, not IA3Config")
    save_logits(model, plan["ids"], entry["out"])
    return f"peft_loads {entry['dir']}: {len(model.base_model.targeted_module_names)} modules adapted"


def merged(plan, entry):
    save_logits(load_model(entry["dir"]), plan["ids"], entry["out"])
    return f"merged {entry['dir']}: transformers logits"


def vl(entry):
    base = Qwen2VLForConditionalGeneration.from_pretrained(
        entry["base"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    model = PeftModel.from_pretrained(base, entry["dir"]).eval()
    if not isinstance(model.peft_config["default"], IA3Config):
        raise SystemExit(f"{entry['dir']}: peft read {type(model.peft_config['default']).__name__}, not IA3Config")
    t = load_file(entry["io"])
    ids = t["ids"]
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            pixel_values=t["pixel_values"],
            image_grid_thw=t["grid"],
            mm_token_type_ids=(ids == base.config.image_token_id).int(),
        ).logits.float()
    save_file({"logits": logits.contiguous()}, entry["out"])
    return f"vl {entry['dir']}: {len(model.base_model.targeted_module_names)} modules adapted on Qwen2-VL"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    torch.set_num_threads(1)
    if "peft_writes" in plan:
        print(peft_writes(plan, plan["peft_writes"]), flush=True)
    for entry in plan.get("peft_loads", []):
        print(peft_loads(plan, entry), flush=True)
    for entry in plan.get("merged", []):
        print(merged(plan, entry), flush=True)
    if "vl" in plan:
        print(vl(plan["vl"]), flush=True)


if __name__ == "__main__":
    main()
