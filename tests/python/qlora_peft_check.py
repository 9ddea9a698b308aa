"""peft on the base a ferrotune QLoRA run trained against, for tests/quant_train.rs.

Usage: qlora_peft_check.py BASE_MODEL ADAPTER_DIR MERGED_DIR OUT_JSON

Loads BASE_MODEL with transformers (float32), replaces the weight of every module the run's
`quantization.json` lists by its NF4 round trip as bitsandbytes computes it
(quant_reference.nf4_round_trip, with the run's `double_quant`), loads ADAPTER_DIR with
`PeftModel.from_pretrained`, and writes to OUT_JSON:
* `lora_tensors`: how many LoRA tensors peft loaded, and `lora_max_diff`, their largest
  difference from the adapter file (each peft tensor against the file's tensor of its name);
* `max_logit_diff`: peft's logits against those of MERGED_DIR (`ferrotune merge
  --merge-base dequantized`, loaded by transformers) on a fixed batch.
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

from quant_reference import nf4_round_trip

base_dir, adapter_dir, merged_dir, out = (pathlib.Path(a) for a in sys.argv[1:5])
record = json.loads((adapter_dir / "quantization.json").read_text())
quant = record["quantization"]
assert quant["plugin"] == "nf4", f"this check knows nf4 only, not {quant['plugin']}"
double_quant = quant.get("double_quant", True)

model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
modules = dict(model.named_modules())
with torch.no_grad():
    for name in record["modules"]:
        layer = modules[name]
        layer.weight.copy_(nf4_round_trip(layer.weight.detach().clone(), double_quant))
peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()

saved = load_file(adapter_dir / "adapter_model.safetensors")
loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
max_diff, count = 0.0, 0
for key, tensor in saved.items():
    # peft's names in the file lack the adapter name (`lora_A.weight` -> `lora_A.default.weight`)
    live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
    assert live in loaded, f"peft did not load {key} ({live})"
    max_diff = max(max_diff, float((loaded[live] - tensor).abs().max()))
    count += 1

torch.manual_seed(7)
vocab = model.config.vocab_size
ids = torch.randint(3, vocab, (2, 24))
with torch.no_grad():
    theirs = peft_model(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ours = merged(input_ids=ids).logits
result = {
    "lora_tensors": count,
    "lora_max_diff": max_diff,
    "max_logit_diff": float((theirs - ours).abs().max()),
    "logit_scale": float(theirs.abs().max()),
}
print(json.dumps(result))
out.write_text(json.dumps(result))
