"""transformers 5 + peft 0.21 LoHa / LoKr reference for tests/lycoris_parity.rs.

Usage: lycoris_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test:
  "base": a model directory (`ferrotune init-model`), "tokenizer": the folder of the
  tokenizer it was made with (AutoTokenizer reads the model folder's copy through the model's
  own tokenizer class, which this word-level tokenizer is not),
  "ids": [[token ids]] for the logits;
  "peft_writes": [{"name", "peft_type", "config", "seed", "dir", "out", "generate"}]
      peft builds the config class of `peft_type` (LOHA: LoHaConfig, LOKR: LoKrConfig) from
      `config` on the base (get_peft_model), draws every factor (hada_* / lokr_*) as
      0.4 * N(0, 1) from a generator seeded with `seed` (so that every factor, the zero-
      initialised one included, matters), saves it to `dir` (save_pretrained) and its logits to
      `out`; `generate` = {"prompt", "max_new_tokens", "out"}: greedy generation
      (model.generate, do_sample=False) of the adapted and the plain model, token ids up to
      the first eos, written as JSON {"token_ids", "base_token_ids"};
  "peft_loads": [{"name", "dir", "out"}]
      a PEFT directory ferrotune wrote: peft loads it (PeftModel.from_pretrained, which parses
      its adapter_config.json through the method's config class) and its logits go to `out`;
  "transformers_loads": [{"name", "dir", "out"}]
      a merged model directory ferrotune wrote: transformers loads it, logits to `out`.
Logits files are safetensors with one tensor `logits` [B, T, vocab] (float32).
Exits non-zero with a message on any failure; prints one line per entry.
"""
import json
import pathlib
import sys
import warnings

import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

CONFIGS = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}
FACTOR_PREFIXES = ("hada_", "lokr_")


def load_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def save_logits(model, ids, out):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)).logits.float()
    save_file({"logits": logits.contiguous()}, out)


def until_eos(new, eos):
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


def generate(model, directory, spec):
    tok = AutoTokenizer.from_pretrained(directory)
    eos = {tok.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) - {None}
    ids = tok(spec["prompt"], return_tensors="pt")["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos))
    kwargs = dict(max_new_tokens=spec["max_new_tokens"], do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        adapted = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
        with model.disable_adapter():
            plain = model.generate(input_ids=ids, **kwargs)[0, ids.shape[1]:].tolist()
    result = {"prompt_ids": ids[0].tolist(), "token_ids": until_eos(adapted, eos), "base_token_ids": until_eos(plain, eos)}
    pathlib.Path(spec["out"]).write_text(json.dumps(result))
    return len(result["token_ids"])


def peft_writes(plan, entry):
    config = CONFIGS[entry["peft_type"]](task_type="CAUSAL_LM", **entry["config"])
    model = get_peft_model(load_model(plan["base"]), config)
    g = torch.Generator().manual_seed(entry["seed"])
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{prefix}" in name for prefix in FACTOR_PREFIXES):
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
                names.append(name)
    if not names:
        raise SystemExit(f"{entry['name']}: peft made no adapter factors")
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    n_tokens = generate(model, plan["tokenizer"], entry["generate"])
    kinds = sorted({n.split(".")[-2] for n in names})
    return f"peft_writes {entry['name']}: {len(names)} factors ({', '.join(kinds)}) saved to {entry['dir']}, {n_tokens} greedy tokens"


def peft_loads(plan, entry):
    model = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    config = model.peft_config["default"]
    if type(config) not in CONFIGS.values():
        raise SystemExit(f"{entry['dir']}: peft read {type(config).__name__}, not LoHaConfig or LoKrConfig")
    save_logits(model, plan["ids"], entry["out"])
    return f"peft_loads {entry['name']}: {type(config).__name__}, {len(model.base_model.targeted_module_names)} modules adapted"


def transformers_loads(plan, entry):
    model = load_model(entry["dir"])
    save_logits(model, plan["ids"], entry["out"])
    return f"transformers_loads {entry['name']}"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    torch.set_num_threads(1)
    for entry in plan["peft_writes"]:
        print(peft_writes(plan, entry), flush=True)
    for entry in plan["peft_loads"]:
        print(peft_loads(plan, entry), flush=True)
    for entry in plan["transformers_loads"]:
        print(transformers_loads(plan, entry), flush=True)


if __name__ == "__main__":
    main()
