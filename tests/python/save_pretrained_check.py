"""Loads a model directory ferrotune wrote (sharded or not) with transformers and writes what
tests/save_pretrained.rs compares: the fp32 logits of a fixed batch (OUT/logits.safetensors)
and transformers' own save_pretrained of the same model at the same max_shard_size (OUT/hf).

usage: save_pretrained_check.py MODEL_DIR MAX_SHARD_SIZE OUT_DIR"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

model_dir, max_shard_size, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = torch.tensor([[5, 17, 42, 3, 199, 7, 1, 64], [9, 9, 120, 31, 2, 150, 11, 4]])
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().contiguous()
save_file({"ids": ids, "logits": logits}, os.path.join(out, "logits.safetensors"))
size = int(max_shard_size) if max_shard_size.isdigit() else max_shard_size
model.save_pretrained(os.path.join(out, "hf"), max_shard_size=size)
