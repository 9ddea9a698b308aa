"""transformers 5 + peft 0.21 prompt-learning reference for tests/prompt_parity.rs
(PROMPT_TUNING, P_TUNING, PREFIX_TUNING).

Usage: prompt_reference.py WORK_DIR          (WORK_DIR/plan.json, below)
       prompt_reference.py --train WORK_DIR  (train_reference.py's plan.json, below)

WORK_DIR/plan.json, written by the Rust test:
  "base": a model directory (`ferrotune init-model`), "ids": [[token ids]] for the logits;
  "peft_writes": [{"peft_type", "config", "seed", "dir", "out", "greedy": {"ids", "new_tokens", "out"}}]
      torch.manual_seed(seed); peft builds that config class (task_type CAUSAL_LM) on the
      base (get_peft_model: its default initialisation, non-trivial for every method) and
      saves it to `dir` (save_pretrained: `prompt_embeddings`, the encoder's output). Then peft
      loads `dir` back (PeftModel.from_pretrained, as a user would) and writes the logits of
      `ids` to `out`, and, if `greedy` is given, its greedy continuation of `greedy.ids`
      WITHOUT the KV cache: each step calls model(input_ids=all ids so far) and appends the
      argmax of the last position (peft 0.21 + transformers 5's cached generate of a
      prompt-learning model differs from this, its own forward); the new ids go to
      `greedy.out` (JSON);
  "peft_loads": [{"dir", "peft_type", "out"}]
      a PEFT directory ferrotune wrote: peft loads it (its adapter_config.json parsed by
      peft's config class, which must be `peft_type`'s); its logits go to `out`;
  "vl": {"base", "dir", "io", "out"}
      a tiny Qwen2-VL (`init-model --preset tiny-vl`) and a prompt-tuning directory ferrotune
      wrote: peft loads it onto Qwen2VLForConditionalGeneration; the logits of the input in
      `io` (safetensors: `ids` [1, T], `pixel_values`, `grid` [n, 3]) go to `out`.
Every key is optional. Logits are the input's positions only: peft returns the virtual
tokens' logits first for prompt tuning and P-tuning, which are dropped. Logits files are
safetensors with one tensor `logits` [B, T, vocab] (float32).

--train: train_reference.py's run (same plan.json format) for every variant, and for a
variant with "full_init": PATH, the whole initial trainable state right after get_peft_model
(every parameter of the prompt encoder under peft's name, `prompt_encoder.default.*`) is saved
to PATH, so that the Rust side starts its encoder from it (peft saves only the encoder's
output in an adapter directory).
"""
import json
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402
from peft import PeftModel, PeftType, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2VLForConditionalGeneration  # noqa: E402


def load_model(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def input_logits(model, ids):
    """The logits of `ids`' own positions (virtual tokens' dropped)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return logits[:, -ids.shape[1]:].contiguous()


def check_type(model, peft_type, where):
    got = model.peft_config["default"].peft_type
    if got != PeftType(peft_type):
        raise SystemExit(f"{where}: peft read {got}, not {peft_type}")


def peft_writes(plan, entry):
    torch.manual_seed(entry["seed"])
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(entry["peft_type"])]
    config = config_class(task_type="CAUSAL_LM", **entry["config"])
    model = get_peft_model(load_model(plan["base"]), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(entry["dir"])
    loaded = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    check_type(loaded, entry["peft_type"], entry["dir"])
    save_file({"logits": input_logits(loaded, torch.tensor(plan["ids"]))}, entry["out"])
    line = f"peft_writes {entry['peft_type']} {entry['config']}: saved to {entry['dir']}"
    g = entry.get("greedy")
    if g:
        ids = torch.tensor([g["ids"]])
        new = []
        with torch.no_grad():
            for _ in range(g["new_tokens"]):
                logits = loaded(input_ids=ids, use_cache=False).logits
                nxt = int(logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        pathlib.Path(g["out"]).write_text(json.dumps(new))
        line += f", greedy {new}"
    return line


def peft_loads(plan, entry):
    model = PeftModel.from_pretrained(load_model(plan["base"]), entry["dir"]).eval()
    check_type(model, entry["peft_type"], entry["dir"])
    save_file({"logits": input_logits(model, torch.tensor(plan["ids"]))}, entry["out"])
    return f"peft_loads {entry['dir']}: {type(model.peft_config['default']).__name__}"


def vl(entry):
    base = Qwen2VLForConditionalGeneration.from_pretrained(
        entry["base"], dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    model = PeftModel.from_pretrained(base, entry["dir"]).eval()
    check_type(model, "PROMPT_TUNING", entry["dir"])
    t = load_file(entry["io"])
    ids = t["ids"]
    with torch.no_grad():
        logits = model(
            input_ids=ids, pixel_values=t["pixel_values"], image_grid_thw=t["grid"], use_cache=False
        ).logits.float()
    save_file({"logits": logits[:, -ids.shape[1]:].contiguous()}, entry["out"])
    return f"vl {entry['dir']}: prompt tuning on Qwen2-VL, logits {tuple(logits.shape)}"


def train(work):
    import train_reference

    current = {}
    make = train_reference.get_peft_model

    def get_peft_model_saving_init(base, config):
        model = make(base, config)
        path = current.get("full_init")
        if path:
            state = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, path)
        return model

    train_reference.get_peft_model = get_peft_model_saving_init
    # train_reference keeps the input's positions with logits[:, -T:], a view that is not
    # contiguous when virtual tokens come first, which ForCausalLMLoss's .view refuses
    loss = train_reference.ForCausalLMLoss
    train_reference.ForCausalLMLoss = lambda logits, *a, **k: loss(logits.contiguous(), *a, **k)
    plan = json.loads((work / "plan.json").read_text())
    tok = train_reference.AutoTokenizer.from_pretrained(plan["tokenizer"])
    encoded = train_reference.encode_all(plan, tok)
    (work / "encoded.json").write_text(json.dumps(encoded))
    for variant in plan["variants"]:
        current.clear()
        current.update(variant)
        print(train_reference.run(plan, variant, encoded, tok.pad_token_id), flush=True)


def main():
    torch.set_num_threads(1)
    if sys.argv[1] == "--train":
        train(pathlib.Path(sys.argv[2]))
        return
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    for entry in plan.get("peft_writes", []):
        print(peft_writes(plan, entry), flush=True)
    for entry in plan.get("peft_loads", []):
        print(peft_loads(plan, entry), flush=True)
    if "vl" in plan:
        print(vl(plan["vl"]), flush=True)


if __name__ == "__main__":
    main()
