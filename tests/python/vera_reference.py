"""transformers 5 + peft 0.21 VeRA reference for tests/vera_parity.rs.

Usage: vera_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test:
  "base": a model directory (`ferrotune init-model`), "ids": [[token ids]] for the logits;
  "peft_writes": [{"config", "seed", "dir", "out", "greedy_out", "new_tokens"}]
      peft builds a VeraConfig(**config) adapter on the base, draws every vera_lambda_b as
      0.5 * N(0, 1) and every vera_lambda_d as 1 + 0.5 * N(0, 1) (so that each vector
      matters; peft starts them at 0 and d_initial), saves it to `dir` (save_pretrained),
      its logits to `out` and its greedy continuation of each row of "ids" (model.generate,
      do_sample=False, `new_tokens` tokens, no end-of-sequence token) to `greedy_out` (JSON);
  "peft_loads": [{"dir", "out"}]
      a PEFT directory ferrotune wrote: peft loads it onto the base (PeftModel.from_pretrained,
      which parses its adapter_config.json through VeraConfig, and with save_projection false
      regenerates vera_A / vera_B from projection_prng_key); its logits go to `out`;
  "merged": [{"dir", "out"}]
      a model directory `ferrotune merge` wrote: transformers loads it (AutoModelForCausalLM);
      its logits go to `out`.
Logits files are safetensors with one tensor `logits` [B, T, vocab] (float32).
Exits non-zero with a message on any failure; prints one line per entry.
"""
import json
import pathlib
import sys
import warnings

import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def load_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_logits(model, ids, out):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.float()
    save_file({"logits": logits.contiguous()}, out)


def peft_writes(plan, entry):
    config = VeraConfig(task_type="CAUSAL_LM", **entry["config"])
    model = get_peft_model(load_model(plan["base"]), config)
    g = torch.Generator().manual_seed(entry["seed"])
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_b" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
                n += 1
            elif "vera_lambda_d" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    ids = torch.tensor(plan["ids"])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=entry["new_tokens"],
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    greedy = out[:, ids.shape[1] :].tolist()
    pathlib.Path(entry["greedy_out"]).write_text(json.dumps(greedy))
    return f"peft_writes: {n} layers saved to {entry['dir']}, greedy {greedy}"


def peft_loads(plan, entry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False: "relying on PRNG initialisation"
        model = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    if not isinstance(model.peft_config["default"], VeraConfig):
        raise SystemExit(f"{entry['dir']}: peft read {type(model.peft_config['default']).__name__}, not VeraConfig")
    save_logits(model, plan["ids"], entry["out"])
    return f"peft_loads {entry['dir']}: {len(model.base_model.targeted_module_names)} modules adapted"


def merged(plan, entry):
    save_logits(load_model(entry["dir"]), plan["ids"], entry["out"])
    return f"merged {entry['dir']}: transformers logits"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    torch.set_num_threads(1)
    for entry in plan.get("peft_writes", []):
        print(peft_writes(plan, entry), flush=True)
    for entry in plan.get("peft_loads", []):
        print(peft_loads(plan, entry), flush=True)
    for entry in plan.get("merged", []):
        print(merged(plan, entry), flush=True)


if __name__ == "__main__":
    main()
