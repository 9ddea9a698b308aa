"""transformers 5 + peft 0.21 + torch reference of `ferrotune train` for tests/train_parity.rs.

Usage: train_reference.py WORK_DIR

WORK_DIR/plan.json, written by the Rust test:
  "model":     a model directory (`ferrotune init-model`);
  "tokenizer": the tokenizer folder init-model copied into it (transformers 5's AutoTokenizer
               on the model folder would build a Qwen2Tokenizer from config.json's model_type,
               ignoring tokenizer_class, and drop every word of a WordLevel vocabulary);
  "data":      an alpaca JSON Lines file;
  "cutoff_len", "micro_batch_size", "gradient_accumulation_steps",
  "lr", "betas", "eps", "weight_decay", "max_grad_norm", "scheduler", "warmup_steps";
  "variants":  [{"name", "peft_type", "seed", "steps", "config": that config class's keys,
                 "init_dir": path or null, "out": path}]

For every variant: torch.manual_seed(seed); peft builds its config class for `peft_type`
(LORA: `LoraConfig`, IA3: `IA3Config`, ...) from `config` on the model
(get_peft_model); when `init_dir` is given the fresh adapter is saved there (save_pretrained:
the run's starting point, which ferrotune loads with `adapter_init`). Then the same run as the
trainer's recipe, written out independently of the Rust code:
  * samples: data_reference.py's alpaca conversation and encoding (labels on each assistant
    turn's content and end-of-turn token, rendered with the tokenizer's chat template);
  * order: no shuffling; micro-batch k of the run is samples [(k mod m)·b, …) of the file
    with m = ceil(n / b) micro-batches per epoch (the last one of an epoch may be short);
    optimizer step s takes micro-batches s·g … s·g + g − 1;
  * a micro-batch: right padding with the tokenizer's pad id (attention mask 0, label −100);
  * the loss of step s: the sum over its micro-batches of ForCausalLMLoss(logits, labels, V,
    num_items_in_batch = label tokens (after the shift) of all the step's samples), each
    backpropagated; the logged loss is the sum of the micro-batch values;
  * clip_grad_norm_(max_grad_norm), torch.optim.AdamW(foreach=False) on every trainable
    tensor (one group), transformers' get_scheduler(warmup, total = steps).
  Prompt-based methods (prompt tuning, P-tuning) put their virtual tokens' logits first;
  the loss reads the last len(input_ids) positions, the text's own.
Writes to `out`: metrics.json ({"loss", "lr", "grad_norm"}: one value per step) and
adapter_model.safetensors (get_peft_model_state_dict after the last step). Also writes
WORK_DIR/encoded.json: [{"input_ids", "labels"}] of every sample.
"""
import json
import math
import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import data_reference  # noqa: E402  (sets HF_HUB_OFFLINE)
import torch  # noqa: E402
from peft import PeftType, get_peft_model, get_peft_model_state_dict  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

IGNORE = -100


def encode_all(plan, tok):
    case = {"cutoff_len": plan["cutoff_len"], "train_on_prompt": False, "mask_history": False}
    encoded = []
    for row in data_reference.read_rows(plan["data"]):
        e = data_reference.encode(tok, data_reference.alpaca_messages(row), case)
        assert "error" not in e, f"row {row}: {e}"
        encoded.append({"input_ids": e["input_ids"], "labels": e["labels"]})
    return encoded


def micro_batch(k, n, b):
    per_epoch = math.ceil(n / b)
    start = (k % per_epoch) * b
    return list(range(start, min(start + b, n)))


def collate(samples, pad_id):
    width = max(len(s["input_ids"]) for s in samples)
    ids, mask, labels = [], [], []
    for s in samples:
        pad = width - len(s["input_ids"])
        ids.append(s["input_ids"] + [pad_id] * pad)
        mask.append([1] * len(s["input_ids"]) + [0] * pad)
        labels.append(s["labels"] + [IGNORE] * pad)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(labels)


def label_tokens(sample):
    return sum(1 for label in sample["labels"][1:] if label != IGNORE)


def run(plan, variant, encoded, pad_id):
    torch.manual_seed(variant["seed"])
    base = AutoModelForCausalLM.from_pretrained(plan["model"], dtype=torch.float32)
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(variant.get("peft_type", "LORA"))]
    config = config_class(task_type="CAUSAL_LM", **variant["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PiSSA's note on converting the adapter
        model = get_peft_model(base, config)
        if variant.get("init_dir"):
            model.save_pretrained(variant["init_dir"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=plan["lr"], betas=tuple(plan["betas"]), eps=plan["eps"], weight_decay=plan["weight_decay"], foreach=False
    )
    sched = get_scheduler(plan["scheduler"], opt, num_warmup_steps=plan["warmup_steps"], num_training_steps=variant["steps"])
    vocab = model.config.vocab_size
    n, b, g = len(encoded), plan["micro_batch_size"], plan["gradient_accumulation_steps"]
    metrics = {"loss": [], "lr": [], "grad_norm": []}
    for step in range(variant["steps"]):
        micro = [micro_batch(step * g + j, n, b) for j in range(g)]
        num_items = sum(label_tokens(encoded[i]) for idx in micro for i in idx)
        total = 0.0
        for idx in micro:
            ids, mask, labels = collate([encoded[i] for i in idx], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1] :].contiguous()
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
    out = pathlib.Path(variant["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out / "adapter_model.safetensors"))
    return f"{variant['name']}: loss {metrics['loss'][0]:.6f} -> {metrics['loss'][-1]:.6f}, {len(state)} tensors"


def main():
    work = pathlib.Path(sys.argv[1])
    plan = json.loads((work / "plan.json").read_text())
    tok = AutoTokenizer.from_pretrained(plan["tokenizer"])
    encoded = encode_all(plan, tok)
    (work / "encoded.json").write_text(json.dumps(encoded))
    pad_id = tok.pad_token_id
    assert pad_id is not None, "the tokenizer needs a pad token"
    for variant in plan["variants"]:
        print(run(plan, variant, encoded, pad_id), flush=True)


if __name__ == "__main__":
    main()
