"""transformers + peft side of tests/story_vlm.rs.

    python story_peft_reference.py MODEL_DIR ADAPTER_DIR MERGED_DIR INPUTS.safetensors OUT.safetensors NEW_TOKENS

Loads the tiny Qwen2-VL with transformers (float32), puts back the full weights ferrotune
trained beside the adapter (non_lora_state_dict.safetensors, peft-style keys) and applies the
PEFT adapter with peft; runs the inputs ferrotune built (input_ids, pixel_values,
image_grid_thw) and writes the logits and NEW_TOKENS greedy tokens. Also loads the merged
directory `ferrotune merge` wrote and writes its logits.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import Qwen2VLForConditionalGeneration

model_dir, adapter_dir, merged_dir, inputs_file, out_file, new_tokens = sys.argv[1:7]
torch.manual_seed(0)
inputs = load_file(inputs_file)
ids = inputs["input_ids"]
kwargs = dict(
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    pixel_values=inputs["pixel_values"],
    image_grid_thw=inputs["image_grid_thw"],
)

base = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
non_lora = load_file(f"{adapter_dir}/non_lora_state_dict.safetensors")
state = {k.removeprefix("base_model.model."): v for k, v in non_lora.items()}
missing_in_model = [k for k in state if k not in base.state_dict()]
assert not missing_in_model, missing_in_model
base.load_state_dict(state, strict=False)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
image_token_id = base.config.image_token_id
mm = (ids == image_token_id).int()
with torch.no_grad():
    logits = model(**kwargs, mm_token_type_ids=mm).logits
    gen = model.generate(**kwargs, mm_token_type_ids=mm, max_new_tokens=int(new_tokens), do_sample=False,
                         eos_token_id=None, pad_token_id=base.config.text_config.pad_token_id)
merged = Qwen2VLForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
with torch.no_grad():
    merged_logits = merged(**kwargs, mm_token_type_ids=mm).logits
save_file({
    "logits": logits.contiguous(),
    "tokens": gen[:, ids.shape[1]:].contiguous(),
    "merged_logits": merged_logits.contiguous(),
}, out_file)
