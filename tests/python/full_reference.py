"""transformers 5 + torch reference of `ferrotune train` with `finetuning: full` and
`finetuning: freeze`, for tests/full_finetune.rs.

Usage:
  full_reference.py WORK_DIR                  the training runs of WORK_DIR/plan.json
  full_reference.py --logits WORK_DIR MODEL_DIR OUT
      transformers' fp32 logits of the saved MODEL_DIR on WORK_DIR/plan.json's probe ids,
      into OUT ({"logits"})

WORK_DIR/plan.json, written by the Rust test: the keys of train_reference.py's plan ("model",
"tokenizer", "data", "cutoff_len", "micro_batch_size", "gradient_accumulation_steps",
"max_steps", "lr", "betas", "eps", "weight_decay", "max_grad_norm", "scheduler",
"warmup_steps"), "probe_ids" ([[id, …], …], equal lengths: the fixed logits input) and
"variants": [{"name", "finetuning": "full" | "freeze", "freeze": {"trainable_layers",
"trainable_modules", "extra_modules"} (freeze only), "out"}].

The recipe is train_reference.py's (its encoding, data order, collation, ForCausalLMLoss with
num_items_in_batch summed over the step's micro-batches, clip_grad_norm_, get_scheduler),
without peft: AutoModelForCausalLM in float32 with
  * full:   every parameter trainable (a tied lm_head is embed_tokens, one tensor);
  * freeze: only the selected ones, LLaMA-Factory's freeze tuning as the config documents it:
    decoder layers `model.layers.<i>.` with i among the last `trainable_layers` (negative:
    the first -trainable_layers), and within them every parameter (`trainable_modules: all`)
    or those whose module path inside the layer has a segment named in `trainable_modules`
    (`mlp` → `mlp.gate_proj`, `mlp.up_proj`, `mlp.down_proj`); plus every parameter outside
    the layers whose module's last path segment is in `extra_modules` (`norm` is
    `model.norm`, not the layers' `input_layernorm`: whole segments, not LLaMA-Factory's
    substring test).
The optimizer is torch.optim.AdamW(foreach=False) over two groups, exactly transformers
Trainer's: weight decay on `Trainer.get_decay_parameter_names` (which for these models are
the parameters of dim >= 2, asserted), none on the rest (biases, norm weights).

Writes to `out`: metrics.json ({"loss", "lr", "grad_norm"}: one value per step),
model.safetensors (the trained model's state_dict, float32, a tied lm_head.weight left out),
trainable.json (the names of the trained parameters, sorted) and logits.safetensors
({"logits": the trained model's logits on probe_ids}).
"""
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_reference  # noqa: E402  (imports data_reference, which sets HF_HUB_OFFLINE)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, get_scheduler  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def selected(name, num_layers, freeze):
    """Whether parameter `name` trains under the `freeze` section (see the module docstring)."""
    n = freeze["trainable_layers"]
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    modules = freeze.get("trainable_modules", "all")
    m = LAYER.match(name)
    if m:
        if int(m.group(1)) not in ids:
            return False
        if modules == "all":
            return True
        return any(seg in modules for seg in m.group(2).split(".")[:-1])
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in freeze.get("extra_modules", [])


def logits_of(model, probe_ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(probe_ids)).logits.float().contiguous()


def run(plan, variant, encoded, pad_id):
    model = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    named = dict(model.named_parameters())  # tied weights appear once, as model.embed_tokens
    for name, p in named.items():
        train = variant["finetuning"] == "full" or selected(name, num_layers, variant["freeze"])
        p.requires_grad_(train)
    trainable = sorted(name for name, p in named.items() if p.requires_grad)
    assert trainable, f"{variant['name']}: nothing trains"

    # Trainer's names list a tied lm_head.weight too; named_parameters() holds that tensor once,
    # as model.embed_tokens.weight.
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    alias = {name: first for name, p in model.named_parameters(remove_duplicate=False)
             for first, q in named.items() if p is q}
    decay_names = {alias[name] for name in decayed}
    by_dim = {name for name, p in named.items() if p.dim() >= 2}
    assert decay_names == by_dim, f"decay groups differ from dim >= 2: {sorted(decay_names ^ by_dim)}"
    groups = [
        {"params": [named[n] for n in trainable if n in decay_names], "weight_decay": plan["weight_decay"]},
        {"params": [named[n] for n in trainable if n not in decay_names], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    params = [named[n] for n in trainable]
    model.train()
    opt = torch.optim.AdamW(groups, lr=plan["lr"], betas=tuple(plan["betas"]), eps=plan["eps"], foreach=False)
    sched = get_scheduler(plan["scheduler"], opt, num_warmup_steps=plan["warmup_steps"], num_training_steps=plan["max_steps"])
    vocab = model.config.vocab_size
    n, b, g = len(encoded), plan["micro_batch_size"], plan["gradient_accumulation_steps"]
    metrics = {"loss": [], "lr": [], "grad_norm": []}
    for step in range(plan["max_steps"]):
        micro = [train_reference.micro_batch(step * g + j, n, b) for j in range(g)]
        num_items = sum(train_reference.label_tokens(encoded[i]) for idx in micro for i in idx)
        total = 0.0
        for idx in micro:
            ids, mask, labels = train_reference.collate([encoded[i] for i in idx], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=num_items)
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, plan["max_grad_norm"])
        metrics["loss"].append(total)
        metrics["lr"].append(opt.param_groups[0]["lr"])
        metrics["grad_norm"].append(grad_norm.item())
        opt.step()
        sched.step()
        opt.zero_grad()

    model.eval()
    out = pathlib.Path(variant["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "trainable.json").write_text(json.dumps(trainable))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"))
    save_file({"logits": logits_of(model, plan["probe_ids"])}, str(out / "logits.safetensors"))
    return (
        f"{variant['name']}: loss {metrics['loss'][0]:.6f} -> {metrics['loss'][-1]:.6f}, "
        f"{len(trainable)} of {len(named)} parameters trained, {len(state)} tensors saved"
    )


def write_logits(work, model_dir, out):
    """transformers' logits of the saved model directory `model_dir` on the plan's probe ids."""
    plan = json.loads((pathlib.Path(work) / "plan.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    logits = logits_of(model, plan["probe_ids"])
    save_file({"logits": logits}, out)
    print(f"{model_dir}: {type(model).__name__}, logits {tuple(logits.shape)}")


def main():
    if sys.argv[1] == "--logits":
        write_logits(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    tok = AutoTokenizer.from_pretrained(plan["tokenizer"])
    encoded = train_reference.encode_all(plan, tok)
    pad_id = tok.pad_token_id
    assert pad_id is not None, "the tokenizer needs a pad token"
    for variant in plan["variants"]:
        print(run(plan, variant, encoded, pad_id), flush=True)


if __name__ == "__main__":
    main()
